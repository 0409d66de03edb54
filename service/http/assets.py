"""The HTTP endpoints of an asset: its next update by long-poll, its updates as Server-Sent Events.

An asset's events have a sequence of their own (``seq``, gap-free, assigned by Redis in
publish.lua); both endpoints take a position in it and give what comes after. Unlike a run's, an
asset's stream never ends. SSE ids are positions, EPOCH-SEQ (see runbell.bus.schema), so a client
that reconnects after Redis lost the asset's state gets the new epoch's events from its start; a
bare seq (``after``, an older id) means a seq of the asset's current epoch.

Asset names may hold ``/`` and ``:`` (they are often URIs): ``{name}`` takes the rest of the path
up to the endpoint's last segment, and is percent-decoded, so ``s3://bucket/key`` may be sent as it
is (``/v1/assets/s3://bucket/key/next``) or as one encoded segment
(``/v1/assets/s3%3A%2F%2Fbucket%2Fkey/next``, what proxies that merge ``//`` need). ``?``, ``#``,
``%`` and spaces must be encoded.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator

import anyio
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runbell.bus.schema import ASSET_NAME_MAX, LEGACY_EPOCH, AssetEnvelope, Position
from runbell.service.core.loops import keep_trying
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import AssetEventBody, AssetPending, AssetReady
from runbell.service.http.errors import ApiError
from runbell.service.http.params import (
    LAST_EVENT_ID_PARAM,
    ascii_int,
    has_control,
    hub_with_room,
    parse_last_event_id,
    parse_timeout,
    query_value,
)
from runbell.service.http.run_routes import BACKLOG_READ_SECONDS, PENDING_RETRY_AFTER
from runbell.service.http.sse import EventStream, farewell
from runbell.service.live.hub import REDIS_DOWN, SubscriptionClosed
from runbell.service.live.topics import AssetTopic

ASSET = "/v1/assets/{name}"
AFTER_PARAM = "after"


class AssetRoute(Route):
    """A route whose ``{name}`` matches any characters, '/' included (Starlette's path converter),
    while its ``path`` reads as OpenAPI spells it (``/v1/assets/{name}/events``)."""

    def __init__(self, path: str, endpoint, **kwargs) -> None:
        super().__init__(path.replace("{name}", "{name:path}"), endpoint, **kwargs)
        self.path = path
        # '.' of the path converter stops at a line break: such a name is then refused (400), not "no route"
        self.path_regex = re.compile(self.path_regex.pattern, re.DOTALL)


# -- long-poll ------------------------------------------------------------------------------------


async def asset_next(request: Request) -> Response:
    """The first event of the asset with seq > after (default: its current seq), or 202 pending."""
    name = asset_name(request)
    authorize(request, Role.READ, query_token=True)
    after = parse_after(request)
    timeout = parse_timeout(request)
    hub_with_room(request)
    assets: AssetTopic = request.app.state.assets
    metrics = request.app.state.metrics
    deadline = anyio.current_time() + timeout
    metrics.waiters.inc()
    try:
        # "From now" (no after): the current position read before subscribing, so whatever is
        # published after the read is in the log the subscription reads first. Read even with timeout=0.
        position = None
        with anyio.move_on_after(max(timeout, BACKLOG_READ_SECONDS)):
            position = await current_position(assets, name, after)
        if position is None:  # Redis unreadable all along
            return pending_response(name, after)
        async with assets.subscribe(name, position) as subscription:
            # What is stored is always read, even with timeout=0 (unless Redis is down that long).
            with anyio.move_on_after(max(timeout, BACKLOG_READ_SECONDS)):
                backlog = await subscription.backlog()
                if backlog:
                    return event_response(backlog[0])  # type: ignore[arg-type]  # the hub's Subscription is typed for run envelopes; an asset subscription carries AssetEnvelopes
            with anyio.move_on_at(deadline):
                try:
                    async for envelope in subscription:
                        return event_response(envelope)  # type: ignore[arg-type]
                except SubscriptionClosed:
                    pass  # shutdown, or too slow: the caller asks again
    finally:
        metrics.waiters.dec()
    return pending_response(name, await pending_seq(assets, name, after))


def pending_response(name: str, seq: int | None) -> Response:
    body = AssetPending(asset=name, seq=seq).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Retry-After": PENDING_RETRY_AFTER})


def event_response(envelope: AssetEnvelope) -> Response:
    return JSONResponse(json.loads(event_data(envelope)))


def event_data(envelope: AssetEnvelope) -> str:
    """The event with its seq: the long-poll answer and the SSE `asset` event's data."""
    body = AssetEventBody(**dict(envelope.event), seq=envelope.seq)
    return json.dumps(body.model_dump(mode="json", exclude_none=True))


async def pending_seq(assets: AssetTopic, name: str, known: int | None) -> int | None:
    """The asset's current seq for a 202 (what to pass as `after` next); null when Redis cannot say
    and the caller gave no `after`."""
    with anyio.move_on_after(BACKLOG_READ_SECONDS):
        try:
            return (await assets.current(name)).seq
        except (RedisError, OSError):
            pass
    return known


async def current_position(assets: AssetTopic, name: str, seq: int | None = None) -> Position:
    """The asset's current position, or ``seq`` in its current epoch; while Redis is down, keep
    trying (the caller's scope bounds it)."""
    current = await keep_trying(lambda: assets.current(name), retry_on=REDIS_DOWN, log_once=assets.hub.log_once, what="asset seq")
    return current if seq is None else Position(current.epoch, seq)


# -- Server-Sent Events -----------------------------------------------------------------------------


async def asset_events(request: Request) -> Response:
    """The asset's events as SSE: after Last-Event-ID (default: from now on), live, never ending."""
    name = asset_name(request)
    authorize(request, Role.READ, query_token=True)
    last_id = parse_asset_last_event_id(request)
    hub_with_room(request)
    return EventStream(request, asset_sse_stream(request, request.app.state.assets, name, last_id))


async def asset_sse_stream(
    request: Request, assets: AssetTopic, name: str, last_id: Position | None
) -> AsyncGenerator[ServerSentEvent | bytes, None]:
    settings, metrics = request.app.state.settings, request.app.state.metrics
    metrics.sse_clients.inc()
    try:
        yield ServerSentEvent(comment="runbell", retry=settings.sse_retry_ms)
        if last_id is None or last_id.epoch == LEGACY_EPOCH:  # from now, or a bare seq: read before subscribing (see asset_next)
            last_id = await current_position(assets, name, None if last_id is None else last_id.seq)
        async with assets.subscribe(name, last_id) as subscription:
            # Where this stream starts, as an id: a reconnect before the first event resumes here.
            yield ServerSentEvent(data=AssetReady(asset=name, seq=last_id.seq).model_dump_json(), event="ready", id=str(last_id))
            try:
                async for envelope in subscription:
                    yield ServerSentEvent(data=event_data(envelope), event="asset", id=str(envelope.position))  # type: ignore[arg-type]  # the hub's Subscription is typed for run envelopes; an asset subscription carries AssetEnvelopes
            except SubscriptionClosed as closed:
                yield farewell(closed.reason, settings.sse_retry_ms)
    finally:
        metrics.sse_clients.dec()


# -- input parsing --------------------------------------------------------------------------------


def asset_name(request: Request) -> str:
    name = request.path_params["name"]
    if not name or len(name) > ASSET_NAME_MAX or has_control(name):
        raise ApiError(400, "bad_asset", f"the asset name must be 1 to {ASSET_NAME_MAX} characters, none of them a control character")
    return name


def parse_after(request: Request) -> int | None:
    """`after`: a sequence number (integer >= 0); None when not given (then: the current seq)."""
    raw = query_value(request, AFTER_PARAM)
    if raw is None:
        return None
    after = ascii_int(raw)
    if after is None:
        raise ApiError(400, "bad_after", "after must be a sequence number (a non-negative integer)", accepted="integer >= 0")
    return after


def parse_asset_last_event_id(request: Request) -> Position | None:
    """As a run's (header, else ?last_event_id=), but None when neither is given: start from now."""
    if not request.headers.get("last-event-id") and not request.query_params.get(LAST_EVENT_ID_PARAM):
        return None
    return parse_last_event_id(request)


ROUTES = [
    AssetRoute(ASSET + "/events", asset_events, methods=["GET"], name="asset_events"),
    AssetRoute(ASSET + "/next", asset_next, methods=["GET"], name="asset_next"),
]
