"""The webhook API (role admin): subscriptions, secret rotation, and inspecting and replaying deliveries.

The store behind it is `request.app.state.webhooks` (runbell.service.webhooks.outbox.WebhookStore); the target
policy is `request.app.state.webhook_policy`. A subscription's secret is shown twice only: in the
answer that creates it and in the answer that rotates it.
"""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.service.core import clock
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import (
    AttemptList,
    CreatedWebhook,
    MessageList,
    Recovered,
    RotatedSecret,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookList,
    WebhookMessage,
    WebhookMessageWithAttempts,
)
from runbell.service.http.errors import ApiError
from runbell.service.http.params import int_param, path_id, read_body
from runbell.service.webhooks.outbox import WebhookStore
from runbell.service.webhooks.rules import EndpointCreate, EndpointUpdate, Recovery, Rotation, check_target
from runbell.service.webhooks.target_guard import ALLOW_SETTING, TargetPolicy, TargetRefused

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
BASE = "/v1/webhooks"


# -- subscriptions --------------------------------------------------------------------------------


async def create_webhook(request: Request) -> Response:
    store = webhook_store(request)
    body = await read_body(request, EndpointCreate)
    await reachable_target(request, body.url)
    endpoint = await store.create_endpoint(**body.model_dump(mode="json"))
    created = CreatedWebhook.of(endpoint).model_dump(mode="json")
    return JSONResponse(created, status_code=201, headers={"Location": f"{BASE}/{endpoint.id}"})


async def list_webhooks(request: Request) -> Response:
    store = webhook_store(request)
    listed = WebhookList(webhooks=[WebhookEndpoint.of(endpoint) for endpoint in await store.list_endpoints()])
    return JSONResponse(listed.model_dump(mode="json"))


async def get_webhook(request: Request) -> Response:
    store = webhook_store(request)
    return JSONResponse(WebhookEndpoint.of(await known_endpoint(store, request)).model_dump(mode="json"))


async def update_webhook(request: Request) -> Response:
    store = webhook_store(request)
    body = await read_body(request, EndpointUpdate)
    changes = body.changes()
    if "url" in changes:
        await reachable_target(request, changes["url"])
    endpoint = await store.update_endpoint(endpoint_id(request), **changes)
    if endpoint is None:
        raise unknown_endpoint(request)
    return JSONResponse(WebhookEndpoint.of(endpoint).model_dump(mode="json"))


async def delete_webhook(request: Request) -> Response:
    store = webhook_store(request)
    if not await store.delete_endpoint(endpoint_id(request)):
        raise unknown_endpoint(request)
    return Response(status_code=204)


async def rotate_secret(request: Request) -> Response:
    """A new secret; the old one keeps signing beside it for the grace period (the setting by default)."""
    store = webhook_store(request)
    body = await read_body(request, Rotation, required=False)
    grace = body.grace_seconds if body.grace_seconds is not None else request.app.state.settings.webhook_secret_grace
    endpoint = await store.rotate_secret(endpoint_id(request), grace)
    if endpoint is None:
        raise unknown_endpoint(request)
    rotated = RotatedSecret(
        id=endpoint.id, secret=endpoint.secret, previous_secret_expires_at=endpoint.previous_secret_expires_at, grace_seconds=grace
    )
    return JSONResponse(rotated.model_dump(mode="json"))


# -- inspect and replay ---------------------------------------------------------------------------


async def endpoint_attempts(request: Request) -> Response:
    store = webhook_store(request)
    endpoint = await known_endpoint(store, request)
    attempts = await store.attempts(endpoint_id=endpoint.id, limit=parse_limit(request))
    return JSONResponse(AttemptList(attempts=[WebhookAttempt.of(attempt) for attempt in attempts]).model_dump(mode="json"))


async def endpoint_messages(request: Request) -> Response:
    store = webhook_store(request)
    endpoint = await known_endpoint(store, request)
    since = parse_since(request.query_params.get("since"))
    messages = await store.messages(endpoint.id, since=since, limit=parse_limit(request))
    return JSONResponse(MessageList(messages=[WebhookMessage.of(message) for message in messages]).model_dump(mode="json"))


async def get_message(request: Request) -> Response:
    store = webhook_store(request)
    message = await store.get_message(message_id(request))
    if message is None:
        raise unknown_message(request)
    attempts = await store.attempts(message_id=message.id, limit=parse_limit(request))
    logged = [WebhookAttempt.of(attempt) for attempt in attempts]
    return JSONResponse(WebhookMessageWithAttempts(**dict(WebhookMessage.of(message)), attempt_log=logged).model_dump(mode="json"))


async def resend_message(request: Request) -> Response:
    """Deliver the message again, as it was (same webhook-id), however it ended before."""
    store = webhook_store(request)
    message = await store.resend(message_id(request))
    if message is None:
        raise unknown_message(request)
    return JSONResponse(WebhookMessage.of(message).model_dump(mode="json"), status_code=202)


async def recover_endpoint(request: Request) -> Response:
    """Deliver again every message of the endpoint created since a time that was not delivered."""
    store = webhook_store(request)
    body = await read_body(request, Recovery)
    endpoint = await known_endpoint(store, request)
    requeued = await store.recover(endpoint.id, body.since)
    return JSONResponse(Recovered(requeued=requeued).model_dump(mode="json"), status_code=202)


# -- helpers --------------------------------------------------------------------------------------


def webhook_store(request: Request) -> WebhookStore:
    """Authorize (admin) and return the store; 503 when this gateway has none."""
    authorize(request, Role.ADMIN)
    store = getattr(request.app.state, "webhooks", None)
    if store is None:
        raise ApiError(503, "webhooks_unavailable", "this gateway has no webhook store")
    return store


async def reachable_target(request: Request, url: str) -> None:
    """422 target_refused when the URL leads where webhooks may not go (its shape is the body's rule)."""
    policy: TargetPolicy = getattr(request.app.state, "webhook_policy", None) or TargetPolicy([])
    try:
        await check_target(policy, url)
    except TargetRefused as refused:
        raise ApiError(
            422, "target_refused", f"url: {refused.reason}", accepted={"allowed_hosts": policy.allowed, "setting": ALLOW_SETTING}
        ) from None


def parse_limit(request: Request) -> int:
    return int_param(request, "limit", minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT)


def parse_since(raw: str | None) -> datetime | None:
    if raw is None or raw == "":
        return None
    try:
        return clock.parse(raw)
    except ValueError:
        raise ApiError(400, "bad_since", "since must be an ISO-8601 date-time", accepted="e.g. 2026-05-01T12:00:00Z") from None


def endpoint_id(request: Request) -> str:
    return path_id(request, "endpoint_id")


def message_id(request: Request) -> str:
    return path_id(request, "message_id")


async def known_endpoint(store: WebhookStore, request: Request):
    endpoint = await store.get_endpoint(endpoint_id(request))
    if endpoint is None:
        raise unknown_endpoint(request)
    return endpoint


def unknown_endpoint(request: Request) -> ApiError:
    return ApiError(404, "unknown_webhook", f"there is no webhook endpoint {endpoint_id(request)!r}")


def unknown_message(request: Request) -> ApiError:
    return ApiError(404, "unknown_message", f"there is no webhook message {message_id(request)!r}")
