"""The webhook API (role admin): subscriptions, secret rotation, and inspecting and replaying deliveries.

The store behind it is `request.app.state.webhooks` (runbell.service.webhooks.outbox.WebhookStore); the target
policy is `request.app.state.webhook_policy`. A subscription's secret is shown twice only: in the
answer that creates it and in the answer that rotates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import ID_MAX
from runbell.service.core import clock
from runbell.service.http.auth import Role, authorize
from runbell.service.http.errors import ApiError
from runbell.service.webhooks.outbox import DEFAULT_KINDS, WebhookKind, WebhookStore
from runbell.service.webhooks.target_guard import (
    ALLOW_SETTING,
    TargetPolicy,
    TargetRefused,
    check_url,
    parse_target,
)

KINDS = tuple(kind.value for kind in WebhookKind)
SECRET_FIELDS = ("secret", "previous_secret")
MAX_URL_LENGTH = 2048
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
BASE = "/v1/webhooks"

Model = TypeVar("Model", bound=BaseModel)


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH)
    description: str = Field(default="", max_length=1000)
    dag_ids: list[str] | None = Field(default=None, max_length=1000)
    kinds: list[str] = Field(default_factory=lambda: list(DEFAULT_KINDS))
    enabled: bool = True


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=1, max_length=MAX_URL_LENGTH)
    description: str | None = Field(default=None, max_length=1000)
    dag_ids: list[str] | None = Field(default=None, max_length=1000)
    kinds: list[str] | None = None
    enabled: bool | None = None


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: float | None = Field(default=None, ge=0, le=30 * 24 * 3600)


class Recovery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: Annotated[datetime, AfterValidator(clock.as_utc)]  # out of range: a 400, not an OverflowError


CREATE_ACCEPTED = {
    "url": "http(s) URL",
    "description": "string",
    "dag_ids": "list of DAG ids, or null for every DAG",
    "kinds": f"non-empty subset of {list(KINDS)} (default {DEFAULT_KINDS})",
    "enabled": "boolean",
}
UPDATE_ACCEPTED = {**CREATE_ACCEPTED, "kinds": f"non-empty subset of {list(KINDS)}"}


# -- subscriptions --------------------------------------------------------------------------------


async def create_webhook(request: Request) -> Response:
    store = webhook_store(request)
    body = await parse_body(request, EndpointCreate, CREATE_ACCEPTED, required=True)
    dag_ids, kinds = checked_dag_ids(body.dag_ids), checked_kinds(body.kinds)
    await check_target(request, body.url)
    endpoint = await store.create_endpoint(url=body.url, description=body.description, dag_ids=dag_ids, kinds=kinds, enabled=body.enabled)
    return JSONResponse(endpoint_body(endpoint, with_secret=True), status_code=201, headers={"Location": f"{BASE}/{endpoint.id}"})


async def list_webhooks(request: Request) -> Response:
    store = webhook_store(request)
    return JSONResponse({"webhooks": [endpoint_body(endpoint) for endpoint in await store.list_endpoints()]})


async def get_webhook(request: Request) -> Response:
    store = webhook_store(request)
    return JSONResponse(endpoint_body(await known_endpoint(store, request)))


async def update_webhook(request: Request) -> Response:
    store = webhook_store(request)
    body = await parse_body(request, EndpointUpdate, UPDATE_ACCEPTED, required=True)
    given = body.model_fields_set
    if not given:
        raise ApiError(
            400, "bad_body", "nothing to change: give any of url, description, dag_ids, kinds, enabled", accepted=UPDATE_ACCEPTED
        )
    fields: dict[str, Any] = {}
    for name in sorted(given):
        value = getattr(body, name)
        if value is None and name != "dag_ids":
            raise ApiError(400, "bad_body", f"{name} may not be null", accepted=UPDATE_ACCEPTED)
        fields[name] = value
    if "dag_ids" in fields:
        fields["dag_ids"] = checked_dag_ids(fields["dag_ids"])
    if "kinds" in fields:
        fields["kinds"] = checked_kinds(fields["kinds"])
    if "url" in fields:
        await check_target(request, fields["url"])
    endpoint = await store.update_endpoint(endpoint_id(request), **fields)
    if endpoint is None:
        raise unknown_endpoint(request)
    return JSONResponse(endpoint_body(endpoint))


async def delete_webhook(request: Request) -> Response:
    store = webhook_store(request)
    if not await store.delete_endpoint(endpoint_id(request)):
        raise unknown_endpoint(request)
    return Response(status_code=204)


async def rotate_secret(request: Request) -> Response:
    """A new secret; the old one keeps signing beside it for the grace period (the setting by default)."""
    store = webhook_store(request)
    body = await parse_body(request, Rotation, {"grace_seconds": "seconds the old secret still signs (>= 0)"})
    grace = body.grace_seconds if body.grace_seconds is not None else request.app.state.settings.webhook_secret_grace
    endpoint = await store.rotate_secret(endpoint_id(request), grace)
    if endpoint is None:
        raise unknown_endpoint(request)
    return JSONResponse(
        {
            "id": endpoint.id,
            "secret": endpoint.secret,
            "previous_secret_expires_at": jsonable(endpoint.previous_secret_expires_at),
            "grace_seconds": grace,
        }
    )


# -- inspect and replay ---------------------------------------------------------------------------


async def endpoint_attempts(request: Request) -> Response:
    store = webhook_store(request)
    endpoint = await known_endpoint(store, request)
    attempts = await store.attempts(endpoint_id=endpoint.id, limit=parse_limit(request))
    return JSONResponse({"attempts": [record_body(attempt) for attempt in attempts]})


async def endpoint_messages(request: Request) -> Response:
    store = webhook_store(request)
    endpoint = await known_endpoint(store, request)
    since = parse_since(request.query_params.get("since"))
    messages = await store.messages(endpoint.id, since=since, limit=parse_limit(request))
    return JSONResponse({"messages": [message_body(message) for message in messages]})


async def get_message(request: Request) -> Response:
    store = webhook_store(request)
    message = await store.get_message(message_id(request))
    if message is None:
        raise unknown_message(request)
    attempts = await store.attempts(message_id=message.id, limit=parse_limit(request))
    return JSONResponse({**message_body(message), "attempt_log": [record_body(attempt) for attempt in attempts]})


async def resend_message(request: Request) -> Response:
    """Deliver the message again, as it was (same webhook-id), however it ended before."""
    store = webhook_store(request)
    message = await store.resend(message_id(request))
    if message is None:
        raise unknown_message(request)
    return JSONResponse(message_body(message), status_code=202)


async def recover_endpoint(request: Request) -> Response:
    """Deliver again every message of the endpoint created since a time that was not delivered."""
    store = webhook_store(request)
    body = await parse_body(request, Recovery, {"since": "ISO-8601 date-time"}, required=True)
    endpoint = await known_endpoint(store, request)
    requeued = await store.recover(endpoint.id, body.since)
    return JSONResponse({"requeued": requeued}, status_code=202)


# -- helpers --------------------------------------------------------------------------------------


def webhook_store(request: Request) -> WebhookStore:
    """Authorize (admin) and return the store; 503 when this gateway has none."""
    authorize(request, Role.ADMIN)
    store = getattr(request.app.state, "webhooks", None)
    if store is None:
        raise ApiError(503, "webhooks_unavailable", "this gateway has no webhook store")
    return store


async def check_target(request: Request, url: str) -> None:
    try:
        parse_target(url)
    except TargetRefused as refused:
        raise ApiError(400, "bad_url", f"url: {refused.reason}", accepted="an http or https URL without credentials") from None
    policy: TargetPolicy = getattr(request.app.state, "webhook_policy", None) or TargetPolicy([])
    try:
        await check_url(policy, url)
    except TargetRefused as refused:
        raise ApiError(
            422, "target_refused", f"url: {refused.reason}", accepted={"allowed_hosts": policy.allowed, "setting": ALLOW_SETTING}
        ) from None


def checked_kinds(kinds: list[str]) -> list[str]:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ApiError(400, "unknown_kind", f"unknown kind {unknown[0]!r}: accepted are {', '.join(KINDS)}", accepted=list(KINDS))
    if not kinds:
        raise ApiError(400, "unknown_kind", f"kinds may not be empty: give some of {', '.join(KINDS)}", accepted=list(KINDS))
    return list(dict.fromkeys(kinds))


def checked_dag_ids(dag_ids: list[str] | None) -> list[str] | None:
    if dag_ids is None:
        return None
    if not dag_ids:
        raise ApiError(
            400, "bad_dag_ids", "dag_ids may not be empty: give null (or leave it out) for every DAG", accepted="list of DAG ids, or null"
        )
    if any(not dag_id or len(dag_id) > ID_MAX for dag_id in dag_ids):
        raise ApiError(400, "bad_dag_ids", f"each DAG id is 1 to {ID_MAX} characters", accepted="list of DAG ids, or null")
    return list(dict.fromkeys(dag_ids))


async def parse_body(request: Request, model: type[Model], accepted: dict, *, required: bool = False) -> Model:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(400, "bad_body", "a JSON body is required", accepted=accepted)
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        )
        raise ApiError(400, "bad_body", f"the body is not valid: {problems}", accepted=accepted) from None


def parse_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be an integer from 1 to {MAX_LIMIT}", accepted={"min": 1, "max": MAX_LIMIT})
    return int(raw)


def parse_since(raw: str | None) -> datetime | None:
    if raw is None or raw == "":
        return None
    try:
        return clock.parse(raw)
    except ValueError:
        raise ApiError(400, "bad_since", "since must be an ISO-8601 date-time", accepted="e.g. 2026-05-01T12:00:00Z") from None


def endpoint_id(request: Request) -> str:
    return request.path_params["endpoint_id"]


def message_id(request: Request) -> str:
    return request.path_params["message_id"]


async def known_endpoint(store: WebhookStore, request: Request):
    endpoint = await store.get_endpoint(endpoint_id(request))
    if endpoint is None:
        raise unknown_endpoint(request)
    return endpoint


def unknown_endpoint(request: Request) -> ApiError:
    return ApiError(404, "unknown_webhook", f"there is no webhook endpoint {endpoint_id(request)!r}")


def unknown_message(request: Request) -> ApiError:
    return ApiError(404, "unknown_message", f"there is no webhook message {message_id(request)!r}")


def endpoint_body(endpoint, *, with_secret: bool = False) -> dict:
    """The endpoint as JSON; its secrets only when asked (on creation)."""
    body = record_body(endpoint, leave_out=SECRET_FIELDS)
    if with_secret:
        body["secret"] = endpoint.secret
    return body


def message_body(message) -> dict:
    """The message as JSON, its payload (the exact text delivered) parsed."""
    body = record_body(message)
    if isinstance(body.get("payload"), str):
        with contextlib.suppress(ValueError):
            body["payload"] = json.loads(body["payload"])
    return body


def record_body(record, leave_out: tuple[str, ...] = ()) -> dict:
    return {f.name: jsonable(getattr(record, f.name)) for f in dataclasses.fields(record) if f.name not in leave_out}


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return clock.iso(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    return value
