"""The HTTP endpoints of a run: its outcome by long-poll, its events as Server-Sent Events, publishing."""

from __future__ import annotations

import asyncio
import json
import math
from typing import AsyncIterator, Callable, Optional

import anyio
from pydantic import ValidationError
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import Envelope, Event, EventKind
from runbell.service.http.auth import Role, authorize
from runbell.service.http.errors import ApiError
from runbell.service.live.hub import Hub, Signal, SubscriptionClosed
from runbell.service.core.outcome import Outcome, OutcomeFold

MAX_ID_LENGTH = 250
LAST_EVENT_ID_PARAM = "last_event_id"  # EventSource sends the header only on reconnects
PENDING_RETRY_AFTER = "1"
BACKLOG_READ_SECONDS = 2.0  # the longest a timeout=0 caller waits for the stored events to be read


# -- long-poll ------------------------------------------------------------------------------------


async def run_result(request: Request) -> Response:
    """Wait until the run's outcome is decided, or the timeout passes (then 202 pending)."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    timeout = parse_timeout(request)
    outcome = await wait_for_outcome(request, dag_id, run_id, timeout)
    return await outcome_response(request, outcome)


async def wait_for_outcome(request: Request, dag_id: str, run_id: str, timeout: float) -> Outcome:
    """Follow the run until its outcome is decided or the timeout passes; the outcome either way."""
    hub = hub_with_room(request)
    if hub.is_missing(dag_id, run_id):
        raise run_not_found(dag_id, run_id)
    metrics = request.app.state.metrics
    fold = OutcomeFold(dag_id, run_id)
    deadline = anyio.current_time() + timeout
    metrics.waiters.inc()
    try:
        async with hub.subscribe(dag_id, run_id) as subscription:
            # anyio's scopes, not asyncio.timeout: they compose with the anyio scopes of the server.
            # What is stored is always read, even with timeout=0 (unless Redis is down that long).
            with anyio.move_on_after(max(timeout, BACKLOG_READ_SECONDS)):
                for envelope in await subscription.backlog():
                    fold.apply(envelope)
                if fold.outcome.decided:
                    return fold.outcome
            with anyio.move_on_at(deadline):
                try:
                    async for envelope in subscription:
                        if fold.apply(envelope):
                            return fold.outcome
                except SubscriptionClosed as closed:
                    if closed.reason is Signal.NOT_FOUND:
                        raise run_not_found(dag_id, run_id) from None
                    # shutdown, or too slow: the caller asks again
    finally:
        metrics.waiters.dec()
    return fold.outcome


async def outcome_response(request: Request, outcome: Outcome, extra: Optional[dict] = None, headers: Optional[dict] = None) -> Response:
    """200 with the decided outcome (a large result fetched from Airflow), else 202 pending."""
    if not outcome.decided:
        headers = {"Retry-After": PENDING_RETRY_AFTER, **(headers or {})}
        return JSONResponse({**pending_body(outcome), **(extra or {})}, status_code=202, headers=headers)
    request.app.state.metrics.outcomes.labels(outcome.status.value, "long-poll").inc()
    if extra is None and headers is None and not (outcome.result_task and outcome.result_task.is_ref):
        return Response(outcome_json(request.app.state.hub, outcome), media_type="application/json")
    body = await with_fetched_result(request, outcome_body(outcome))
    return JSONResponse({**body, **(extra or {})}, headers=headers)


async def with_fetched_result(request: Request, body: dict) -> dict:
    """A result published as a reference (too large for the bus) is read from Airflow's XCom."""
    info, airflow = body.get("result_task") or {}, request.app.state.airflow
    if not info.get("is_ref") or airflow is None or not isinstance(body.get("result"), dict):
        return body
    ref = body["result"]
    try:
        value = await airflow.xcom_value(ref["dag_id"], ref["run_id"], ref["task_id"], ref.get("map_index", -1))
    except Exception as exc:  # the reference still says where the value is
        body["result_error"] = f"{type(exc).__name__}: the value could not be read from Airflow"
        return body
    return {**body, "result": value, "result_ref": ref}


def run_not_found(dag_id: str, run_id: str) -> ApiError:
    return ApiError(404, "run_not_found", f"Airflow has no run {run_id!r} of DAG {dag_id!r}")


def outcome_body(outcome: Outcome) -> dict:
    return outcome.model_dump(mode="json")


def outcome_json(hub: Hub, outcome: Outcome) -> bytes:
    """The 200 body of a decided outcome, as JSONResponse renders it."""
    return hub.shared.get(("body", outcome.dag_id, outcome.run_id, outcome.seq),
                          lambda: JSONResponse(outcome_body(outcome)).body)


def pending_body(outcome: Outcome) -> dict:
    return {
        "status": "pending",
        "dag_id": outcome.dag_id,
        "run_id": outcome.run_id,
        "run_state": outcome.run_state,
        "seq": outcome.seq,
    }


# -- Server-Sent Events -----------------------------------------------------------------------------


async def run_events(request: Request) -> Response:
    """The run's events as SSE: replay after Last-Event-ID, then live, then `end` and close."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    last_id = parse_last_event_id(request)
    hub = hub_with_room(request)
    if hub.is_missing(dag_id, run_id):
        raise run_not_found(dag_id, run_id)  # EventSource stops on a 404
    if last_id > 0 and await stream_already_ended(hub, dag_id, run_id, last_id):
        return Response(status_code=204)  # EventSource stops reconnecting on 204
    return EventStream(request, sse_stream(request, hub, dag_id, run_id, last_id))


class EventStream(Response):
    """A Server-Sent Events response with the gateway's settings (heartbeat, send timeout).

    Lean, because one process holds thousands: the request's own task sends the stream's frames, one
    more task waits for the client to leave (its stream ends at once, releasing its subscription),
    and one timer per stream, ticking every half of min(heartbeat, send timeout), sends the heartbeat
    comment when the stream was quiet and ends a write stuck for send_timeout. sse-starlette, used
    before, ran four tasks per stream and a cancel scope per write: 50 KiB per idle stream and a
    slower fan-out (runbell bench); a deadline per write alone cost ~4 µs, 40 ms over 10,000 clients.

    A client that does not take a write within send_timeout (checked at the next tick: up to 1.5 times
    that) is dropped and counted (runbell_sse_send_timeouts_total), not raised to uvicorn as an
    application error; what is left is to wait, briefly, for the connection to go (the kernel drops it,
    see runbell.service.http.server.GuardedHttp). Shutdown needs nothing here: the hub's drain ends every stream
    with a farewell."""

    media_type = "text/event-stream"

    def __init__(self, request: Request, stream: AsyncIterator[ServerSentEvent | bytes]):
        settings = request.app.state.settings
        self.status_code, self.background, self.stream = 200, None, stream
        self.init_headers({"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"})
        self.metrics, self.linger = request.app.state.metrics, settings.unacked_timeout + 1
        self.heartbeat, self.send_timeout = settings.heartbeat_seconds, settings.send_timeout
        self.every = min(self.heartbeat, self.send_timeout) / 2
        self.cancel = anyio.CancelScope()  # cancelled when the client leaves or a write is stuck
        self.left = False
        self.sending_since: Optional[float] = None  # loop time a write began, while it has not gone
        self.pinging: Optional[asyncio.Future] = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "HEAD":  # headers only: a stream would never end
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()
        watcher = self.loop.create_task(self._until_left(receive))
        self.timer = self.loop.call_later(self.every, self._tick, send)
        try:
            with self.cancel:
                await self._send(send, {"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for item in self.stream:
                    body = item if isinstance(item, bytes) else item.encode()
                    await self._send(send, {"type": "http.response.body", "body": body, "more_body": True})
                await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
            if self.cancel.cancelled_caught and not self.left:  # a write did not go within send_timeout
                self.metrics.sse_send_timeouts.inc()
                with anyio.move_on_after(self.linger):  # else uvicorn closes it, saying the response is incomplete
                    while (await receive())["type"] != "http.disconnect":
                        pass
        finally:
            watcher.cancel()
            self.timer.cancel()
            if self.pinging is not None:
                self.pinging.cancel()
            await self.stream.aclose()  # a stream stopped at a yield (a write timed out) releases its subscription

    async def _send(self, send, message: dict) -> None:
        self.sending_since = self.loop.time()
        await send(message)
        self.sending_since, self.last_write = None, self.loop.time()

    async def _until_left(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self.cancel.cancel()

    def _tick(self, send) -> None:
        now = self.loop.time()
        if self.sending_since is not None and now - self.sending_since >= self.send_timeout:
            self.cancel.cancel()  # the client stopped reading
            return
        if now - self.last_write >= self.heartbeat and (self.pinging is None or self.pinging.done()):
            # A whole frame per write, so a ping never lands inside an event's frame.
            self.pinging = asyncio.ensure_future(self._send(send, {"type": "http.response.body", "body": PING, "more_body": True}))
        self.timer = self.loop.call_later(self.every, self._tick, send)


PING = b": ping\r\n\r\n"


async def sse_stream(request: Request, hub: Hub, dag_id: str, run_id: str, last_id: int) -> AsyncIterator[ServerSentEvent | bytes]:
    settings, metrics = request.app.state.settings, request.app.state.metrics
    fold = OutcomeFold(dag_id, run_id)
    metrics.sse_clients.inc()
    try:
        # The whole history is folded so the outcome is known, but only what is after last_id is sent.
        async with hub.subscribe(dag_id, run_id) as subscription:
            yield ServerSentEvent(comment="runbell", retry=settings.sse_retry_ms)
            try:
                async for envelope in subscription:
                    decided = fold.apply(envelope)
                    if envelope.seq <= last_id:
                        continue
                    if decided:
                        metrics.outcomes.labels(fold.outcome.status.value, "sse").inc()
                    end = is_run_end(envelope)
                    yield frames(hub, envelope, fold.outcome, decided, end)
                    if end:
                        return
            except SubscriptionClosed as closed:
                yield farewell(closed.reason, settings.sse_retry_ms)
    finally:
        metrics.sse_clients.dec()


def frames(hub: Hub, envelope: Envelope, outcome: Outcome, decided: bool, end: bool) -> bytes:
    """The event's frame (`id:` its seq, `event:` task or run), then `outcome` when it decided the run
    and `end` when it ended it, with the same id: one write per client, built once per event (whether
    an event decides or ends the run is the same for every client, all fold the same events)."""
    def build() -> bytes:
        seq = str(envelope.seq)
        parts = [ServerSentEvent(data=event_data(envelope), event=envelope.event.kind.value, id=seq).encode()]
        if decided:
            parts.append(ServerSentEvent(data=json.dumps(outcome_body(outcome)), event="outcome", id=seq).encode())
        if end:
            parts.append(ServerSentEvent(data=json.dumps(end_body(outcome)), event="end", id=seq).encode())
        return b"".join(parts)

    return hub.shared.get(("frames", outcome.dag_id, outcome.run_id, envelope.seq), build)


def event_data(envelope: Envelope) -> str:
    body = envelope.event.model_dump(mode="json", exclude_none=True)
    return json.dumps({"seq": envelope.seq, **body})


def end_body(outcome: Outcome) -> dict:
    return {"run_state": outcome.run_state, "status": outcome.status.value, "seq": outcome.seq}


def farewell(reason: Signal, retry_ms: int) -> ServerSentEvent:
    if reason is Signal.OVERFLOW:
        message = {"error": "slow_consumer", "message": "this client fell too far behind; reconnect with Last-Event-ID"}
        return ServerSentEvent(data=json.dumps(message), event="error", retry=retry_ms)
    if reason is Signal.NOT_FOUND:
        message = {"error": "run_not_found", "message": "Airflow has no such run; a reconnect gets 404"}
        return ServerSentEvent(data=json.dumps(message), event="error")
    message = {"reason": "shutdown", "message": "the gateway is restarting; reconnect with Last-Event-ID"}
    return ServerSentEvent(data=json.dumps(message), event="shutdown", retry=retry_ms)


def is_run_end(envelope: Envelope) -> bool:
    event = envelope.event
    return event.kind is EventKind.RUN and event.run_state.terminal


async def stream_already_ended(hub: Hub, dag_id: str, run_id: str, last_id: int) -> bool:
    """True when the client has already been sent the run's end (its terminal run event)."""
    try:
        history = await hub.replay.read(dag_id, run_id, 0)
    except (RedisError, OSError):
        return False  # cannot tell now: stream, and the subscription retries the log
    for envelope in history:
        if envelope.seq > last_id:
            return False
        if is_run_end(envelope):
            return True
    return False


# -- publishing -----------------------------------------------------------------------------------


async def publish_event(request: Request) -> Response:
    """Publish one event over HTTP, exactly as `runbell emit` would (role: publish)."""
    authorize(request, Role.PUBLISH)
    try:
        body = await request.body()
        event = Event.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(422, "bad_event", "the body is not a valid event",
                       accepted=exc.errors(include_url=False, include_context=False, include_input=False)) from None
    publisher = request.app.state.publisher
    seq = await asyncio.to_thread(publisher.publish, event)
    if seq is None:
        return JSONResponse({"id": event.id, "spooled": True}, status_code=202)
    return JSONResponse({"id": event.id, "seq": seq}, status_code=201)


# -- input parsing --------------------------------------------------------------------------------


def run_path(request: Request) -> tuple[str, str]:
    dag_id, run_id = request.path_params["dag_id"], request.path_params["run_id"]
    for name, value in (("dag_id", dag_id), ("run_id", run_id)):
        if not value or len(value) > MAX_ID_LENGTH:
            raise ApiError(400, f"bad_{name}", f"{name} must be 1 to {MAX_ID_LENGTH} characters")
    return dag_id, run_id


def parse_timeout(request: Request) -> float:
    settings = request.app.state.settings
    raw = request.query_params.get("timeout")
    if raw is None:
        return settings.long_poll_default
    accepted = {"min": 0, "max": settings.long_poll_max, "unit": "seconds"}
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 <= value <= settings.long_poll_max):  # also false for nan
        raise ApiError(400, "bad_timeout", f"timeout must be a number of seconds from 0 to {settings.long_poll_max:g}", accepted=accepted)
    return value


def parse_last_event_id(request: Request) -> int:
    raw: Optional[str] = request.headers.get("last-event-id") or request.query_params.get(LAST_EVENT_ID_PARAM)
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID must be a sequence number (a non-negative integer)", accepted="integer >= 0")
    return int(raw)


def hub_with_room(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    if not hub.has_room():
        request.app.state.metrics.rejected.inc()
        message = "the gateway is shutting down" if hub.draining else "too many waiters and streams on this process"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "1"})
    return hub

