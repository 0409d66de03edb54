"""The HTTP endpoints of a run: its outcome by long-poll, its events as Server-Sent Events, publishing.

SSE ids are positions, EPOCH-SEQ (runbell.bus.schema). A client that resumes (Last-Event-ID) is told
first whether its history is complete, as Centrifugo's ``recovered`` flag does: the `recovery`
event says ``recovered: true`` when its last id is in the run's history (what follows is exactly
what it missed), else ``recovered: false`` and the run's whole history follows (its last id is of
an epoch the gateway no longer has, e.g. Redis lost the run's state before it was stored): the
client rebuilds its view from it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import START, Envelope, Event, EventKind, Position, ResultRef, TraceContext, parse_position
from runbell.listeners.publisher import SpoolUnavailable, json_size, utf8_size
from runbell.service.core import tracing
from runbell.service.core.outcome import InputNeeded, Outcome, OutcomeFold
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import (
    InputClosed,
    NeedsInput,
    ProgressPage,
    Published,
    RunEnd,
    RunOutcome,
    RunPending,
    RunToken,
    Spooled,
    TriggeredOutcome,
    TriggeredPending,
)
from runbell.service.http.errors import ApiError
from runbell.service.http.params import (
    hub_with_room,
    parse_last_event_id,
    parse_timeout,
    position_value,
    query_value,
    read_body,
    run_path,
)
from runbell.service.http.server import DIRECT_WRITE, DirectWrite
from runbell.service.http.sse import EventStream, farewell
from runbell.service.live.hub import Hub, Signal, Subscription, SubscriptionClosed
from runbell.service.live.topics import RunTopic

PENDING_RETRY_AFTER = "1"
SPOOL_RETRY_AFTER = 5  # seconds: Redis or the spool directory has to come back first
RESOLVE_PARAM = "resolve"
AFTER_PARAM = "after"
XCOM_READS_AT_ONCE = 8  # a mapped result's references, read from Airflow at once
REF_KEYS = set(ResultRef.model_fields)
BACKLOG_READ_SECONDS = 2.0  # the longest a timeout=0 caller waits for the stored events to be read
PROGRESS_PAGE_MAX = 100  # progress events one long-poll answer carries at most


# -- long-poll ------------------------------------------------------------------------------------


async def run_result(request: Request) -> Response:
    """Wait until the run's outcome is decided, a task asks a person something asked after `after`
    (then 202 needs_input), or the timeout passes (then 202 pending). With the caller's traceparent,
    in a span of its trace."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    return await in_caller_span(request, "runbell.wait", dag_id, run_id, lambda: answer_result(request, dag_id, run_id))


async def in_caller_span(request: Request, name: str, dag_id: str, run_id: str, answer: Callable[[], Awaitable[Response]]) -> Response:
    """The answer, made in a span of the caller's trace when it sent a traceparent (else as it is)."""
    caller = caller_trace(request)
    if caller is None:
        return await answer()
    with tracing.span(name, caller, kind=SpanKind.SERVER, attributes={"runbell.dag_id": dag_id, "runbell.run_id": run_id}) as span:
        response = await answer()
        span.set_attribute("http.response.status_code", response.status_code)
        return response


def caller_trace(request: Request) -> TraceContext | None:
    """The caller's W3C trace context (traceparent, tracestate headers); 400 when malformed."""
    try:
        return tracing.from_headers(request.headers)
    except tracing.BadTraceContext as exc:
        raise ApiError(
            400, "bad_traceparent", f"traceparent or tracestate is not W3C Trace Context: {exc}", accepted="VERSION-TRACEID-SPANID-FLAGS"
        ) from None


async def answer_result(request: Request, dag_id: str, run_id: str) -> Response:
    timeout = parse_timeout(request)
    resolve = parse_resolve(request)
    after = parse_after(request)
    direct: DirectWrite | None = request.scope.get("extensions", {}).get(DIRECT_WRITE)
    outcome = await wait_for_outcome(request, dag_id, run_id, timeout, after=after, direct=direct, resolve=resolve)
    if direct is not None and direct.answered:
        return ANSWERED  # from the hub's fan-out (answer_directly)
    return await outcome_response(request, outcome, resolve=resolve, after=after)


def parse_after(request: Request) -> Position:
    """?after=EPOCH-SEQ: the caller has been told of the input requests up to there (the `after` of a
    needs_input answer); absent: of none."""
    return position_value(query_value(request, AFTER_PARAM), "bad_after", "after must be a position as answered")


def asks_after(outcome: Outcome, after: Position) -> bool:
    """Undecided, with an open input request asked after `after`: the caller must be told."""
    return not outcome.decided and any(request_position(r) > after for r in outcome.needs_input)


def request_position(request: InputNeeded) -> Position:
    return parse_position(request.position) or START


def parse_resolve(request: Request) -> bool:
    """?resolve=true: a result published as a reference (too large for the bus) is read from Airflow."""
    raw = request.query_params.get(RESOLVE_PARAM, "false")
    if raw not in ("true", "false"):
        raise ApiError(400, "bad_resolve", "resolve must be true or false", accepted=["true", "false"])
    return raw == "true"


async def wait_for_outcome(
    request: Request,
    dag_id: str,
    run_id: str,
    timeout: float,
    *,
    after: Position = START,
    direct: DirectWrite | None = None,
    resolve: bool = False,
) -> Outcome:
    """Follow the run until its outcome is decided, an input request is asked after `after`, or the
    timeout passes; the outcome either way. With `direct` (the request's connection), a caught-up
    waiter takes the run's events from the hub's fan-out and a plain decided outcome is written
    there (answer_directly): the caller sees direct.answered and sends nothing more."""
    hub_with_room(request)
    runs: RunTopic = request.app.state.runs
    if runs.is_missing(dag_id, run_id):
        raise run_not_found(dag_id, run_id)
    metrics = request.app.state.metrics
    fold = OutcomeFold(dag_id, run_id)
    deadline = anyio.current_time() + timeout
    metrics.waiters.inc()
    try:
        async with runs.subscribe(dag_id, run_id) as subscription:
            # anyio's scopes, not asyncio.timeout: they compose with the anyio scopes of the server.
            # What is stored is always read, even with timeout=0 (unless Redis is down that long).
            with anyio.move_on_after(max(timeout, BACKLOG_READ_SECONDS)):
                for envelope in await subscription.backlog():
                    fold.apply(envelope)
                if fold.outcome.decided or asks_after(fold.outcome, after):
                    return fold.outcome
            if direct is not None:
                subscription.direct = answer_directly(request, subscription, fold, direct, after, resolve)
            with anyio.move_on_at(deadline):
                try:
                    async for envelope in subscription:
                        if fold.apply(envelope) or (fold.opened is not None and asks_after(fold.outcome, after)):
                            return fold.outcome
                except SubscriptionClosed as closed:
                    if closed.reason is Signal.NOT_FOUND:
                        raise run_not_found(dag_id, run_id) from None
                    # answered from the fan-out (DONE: the fold has it), or shutdown, or too slow: the caller asks again
    finally:
        metrics.waiters.dec()
    return fold.outcome


async def outcome_response(
    request: Request,
    outcome: Outcome,
    token: RunToken | None = None,
    headers: dict | None = None,
    *,
    resolve: bool = False,
    after: Position = START,
) -> Response:
    """200 with the decided outcome (with `resolve`, a result published as a reference read from
    Airflow), else 202: needs_input when an open request was asked after `after`, else pending; with
    the run-scoped token when given (the trigger endpoint's answer)."""
    if not outcome.decided:
        headers = {"Retry-After": PENDING_RETRY_AFTER, **(headers or {})}
        pending = RunPending.of(outcome, asking=asks_after(outcome, after))
        if token is not None:
            pending = TriggeredPending(**pending.model_dump(), **token.model_dump())
        return JSONResponse(pending.body(), status_code=202, headers=headers)
    request.app.state.metrics.count_outcome(outcome.status.value, "long-poll")
    resolving = resolves_ref(outcome, resolve)
    if token is None and headers is None and not resolving:
        return plain_outcome_response(request.app.state.hub, outcome)
    fields = {**outcome.model_dump(), **(await fetched_result(request, outcome) if resolving else {})}
    answer = RunOutcome(**fields) if token is None else TriggeredOutcome(**fields, **token.model_dump())
    return JSONResponse(answer.body(), headers=headers)


def resolves_ref(outcome: Outcome, resolve: bool) -> bool:
    """Whether the answer reads the result from Airflow: asked to, and published as a reference."""
    return resolve and outcome.result_task is not None and outcome.result_task.is_ref


def plain_outcome_response(hub: Hub, outcome: Outcome) -> Response:
    """The 200 of a decided outcome as every waiter of the run gets it (no token, nothing read from Airflow)."""
    return Response(outcome_json(hub, outcome), media_type="application/json")


def answer_directly(
    request: Request, subscription: Subscription, fold: OutcomeFold, direct: DirectWrite, after: Position, resolve: bool
) -> Callable[[Envelope], bool]:
    """A caught-up waiter's taker of the run's next event, called from the hub's fan-out: the event is
    folded there without waking the waiter's task, and the outcome it decides is written straight to
    the connection, its bytes built once per outcome and shared by the run's waiters (DirectWrite.answer).
    Whatever else it has to answer (an input request, a result read from Airflow) ends the wait for the
    task to answer as usual. A connection that cannot take a whole response now (the client left, its
    buffers are full, a HEAD) gets the event the usual way: its task is woken, as before."""
    hub, metrics = request.app.state.hub, request.app.state.metrics

    def take(envelope: Envelope) -> bool:
        if not direct.can_answer():
            return False
        if not (fold.apply(envelope) or (fold.opened is not None and asks_after(fold.outcome, after))):
            return True  # nothing to answer yet
        outcome = fold.outcome
        if outcome.decided and not resolves_ref(outcome, resolve):
            metrics.count_outcome(outcome.status.value, "long-poll")
            key = ("answer", outcome.dag_id, outcome.run_id, outcome.epoch, outcome.seq)
            direct.answer(hub.shared, key, lambda: plain_outcome_response(hub, outcome))
            metrics.long_poll_direct_answers.inc()
        subscription.close(Signal.DONE)  # the task leaves (answered), or answers what the fold has
        return True

    return take


class Answered(Response):
    """The answer went straight to the connection (DirectWrite.answer): nothing more to send."""

    def __init__(self) -> None:
        self.status_code, self.background = 200, None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return


ANSWERED = Answered()


async def fetched_result(request: Request, outcome: Outcome) -> dict[str, Any]:
    """A result published as a reference (too large for the bus) is read from Airflow's XCom: the
    fields of the answer that change (none when there is nothing to read). A mapped result task's
    values are a list, of which those that were too large are each their own reference."""
    result, task, airflow = outcome.result, outcome.result_task, request.app.state.airflow
    if task is None or not task.is_ref or not isinstance(result, (dict, list)):
        return {}
    if airflow is None:
        return {"result_error": "this gateway has no Airflow connection (set RUNBELL_AIRFLOW_URL): the value is where result says"}
    mapped = isinstance(result, list)
    values: list[Any] = result if isinstance(result, list) else [result]
    refs: list[dict[str, Any] | None] = [value if is_own_ref(value, outcome) else None for value in values]
    limit = asyncio.Semaphore(XCOM_READS_AT_ONCE)

    async def read(ref: dict) -> Any:
        async with limit:
            return await airflow.xcom_value(ref["dag_id"], ref["run_id"], ref["task_id"], ref.get("map_index", -1))

    try:
        read_values = await asyncio.gather(*(read(ref) for ref in refs if ref is not None))
    except Exception as exc:  # the references still say where the values are
        return {"result_error": f"{type(exc).__name__}: the value could not be read from Airflow"}
    found = iter(read_values)
    resolved = [next(found) if ref is not None else value for value, ref in zip(values, refs)]
    if not mapped:
        return {"result": resolved[0], "result_ref": refs[0]}
    return {"result": resolved, "result_ref": [ref for ref in refs if ref is not None]}


def is_own_ref(value: Any, outcome: Outcome) -> bool:
    """Whether a result value is the reference to an XCom of the run's result task (a ResultRef)."""
    task = outcome.result_task
    return (
        isinstance(value, dict)
        and task is not None
        and set(value) == REF_KEYS
        and (value["dag_id"], value["run_id"], value["task_id"]) == (outcome.dag_id, outcome.run_id, task.task_id)
    )


def run_not_found(dag_id: str, run_id: str) -> ApiError:
    return ApiError(404, "run_not_found", f"Airflow has no run {run_id!r} of DAG {dag_id!r}")


def outcome_body(outcome: Outcome) -> dict:
    return outcome.model_dump(mode="json")


def outcome_json(hub: Hub, outcome: Outcome) -> bytes:
    """The 200 body of a decided outcome, as JSONResponse renders it."""
    key = ("body", outcome.dag_id, outcome.run_id, outcome.epoch, outcome.seq)
    return hub.shared.get(key, lambda: JSONResponse(outcome_body(outcome)).body)  # type: ignore[arg-type,return-value]  # JSONResponse.body is bytes (typed bytes | memoryview)


# -- progress by long-poll -------------------------------------------------------------------------


async def run_progress(request: Request) -> Response:
    """The run's progress events after `after` (default: from its start): at once when there are
    some, else as soon as one comes. 200 with them (at most PROGRESS_PAGE_MAX), or with none and
    `ended` once the run has ended without more; 202 with none when the timeout passes first."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    return await in_caller_span(request, "runbell.wait_progress", dag_id, run_id, lambda: answer_progress(request, dag_id, run_id))


async def answer_progress(request: Request, dag_id: str, run_id: str) -> Response:
    timeout = parse_timeout(request)
    after = position_value(query_value(request, AFTER_PARAM), "bad_after", "after must be a position as answered")
    hub_with_room(request)
    runs: RunTopic = request.app.state.runs
    if runs.is_missing(dag_id, run_id):
        raise run_not_found(dag_id, run_id)
    found: list[Envelope] = []
    ended, last = False, after
    request.app.state.metrics.waiters.inc()
    try:
        async with runs.subscribe(dag_id, run_id, after) as subscription:
            with anyio.move_on_after(max(timeout, BACKLOG_READ_SECONDS)):
                for envelope in await subscription.backlog():
                    ended, last = take_progress(envelope, found, ended, last)
                    if len(found) > PROGRESS_PAGE_MAX:
                        break  # enough for one answer: the rest comes with the next
            if not found and not ended:
                with anyio.move_on_after(timeout):
                    try:
                        async for envelope in subscription:
                            ended, last = take_progress(envelope, found, ended, last)
                            if found or ended:
                                break
                    except SubscriptionClosed as closed:
                        if closed.reason is Signal.NOT_FOUND:
                            raise run_not_found(dag_id, run_id) from None
    finally:
        request.app.state.metrics.waiters.dec()
    page = found[:PROGRESS_PAGE_MAX]
    if len(found) > PROGRESS_PAGE_MAX:
        last, ended = page[-1].position, False  # the rest comes with the next ask
    answer = ProgressPage(
        dag_id=dag_id,
        run_id=run_id,
        events=[json.loads(event_data(envelope)) for envelope in page],
        after=str(last),
        ended=ended,
    )
    status = 200 if page or ended else 202
    headers = {} if status == 200 else {"Retry-After": PENDING_RETRY_AFTER}
    return JSONResponse(answer.model_dump(mode="json"), status_code=status, headers=headers)


def take_progress(envelope: Envelope, found: list[Envelope], ended: bool, last: Position) -> tuple[bool, Position]:
    """Keep a progress envelope; say whether the run has ended and where the caller stands: at the
    last progress kept, or past everything read once the run has ended (nothing is left to wait for)."""
    if envelope.event.kind is EventKind.PROGRESS:
        found.append(envelope)
        return ended, envelope.position
    if is_run_end(envelope):
        return True, last if found else envelope.position
    return ended, last if found else envelope.position


# -- Server-Sent Events -----------------------------------------------------------------------------


async def run_events(request: Request) -> Response:
    """The run's events as SSE: replay after Last-Event-ID, then live, then `end` and close (its
    opening in a span of the caller's trace, when it sent a traceparent)."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    return await in_caller_span(request, "runbell.follow", dag_id, run_id, lambda: open_events(request, dag_id, run_id))


async def open_events(request: Request, dag_id: str, run_id: str) -> Response:
    last_id = parse_last_event_id(request)
    hub = hub_with_room(request)
    runs: RunTopic = request.app.state.runs
    if runs.is_missing(dag_id, run_id):
        raise run_not_found(dag_id, run_id)  # EventSource stops on a 404
    if last_id != START and await stream_already_ended(runs, dag_id, run_id, last_id):
        return Response(status_code=204)  # EventSource stops reconnecting on 204
    response = EventStream(request)
    response.stream = sse_stream(request, hub, dag_id, run_id, last_id, response)
    return response


async def sse_stream(
    request: Request, hub: Hub, dag_id: str, run_id: str, last_id: Position, response: EventStream
) -> AsyncGenerator[ServerSentEvent | bytes, None]:
    settings, metrics = request.app.state.settings, request.app.state.metrics
    fold = OutcomeFold(dag_id, run_id)
    metrics.sse_clients.inc()

    def frame_of(envelope: Envelope) -> tuple[bytes | None, bool]:
        """(the frame to send, None for one at or before last_id; whether it ends the stream)."""
        decided = fold.apply(envelope)
        if envelope.position <= last_id:
            return None, False
        if decided:
            metrics.count_outcome(fold.outcome.status.value, "sse")
        end = is_run_end(envelope)
        return frames(hub, envelope, fold, decided, end), end

    def take_directly(envelope: Envelope) -> bool:
        """A caught-up stream's next event, written at once from the hub's fan-out (no task woken);
        not the last, after which the stream closes (that one goes the usual way)."""
        if is_run_end(envelope) or not response.can_write_now():
            return False
        frame, _ = frame_of(envelope)
        if frame is not None:
            response.write_now(frame)
        return True

    try:
        # The whole history is folded so the outcome is known, but only what is after last_id is sent.
        async with request.app.state.runs.subscribe(dag_id, run_id) as subscription:
            yield ServerSentEvent(comment="runbell", retry=settings.sse_retry_ms)
            try:
                if last_id != START:
                    recovered = any(envelope.position == last_id for envelope in await subscription.ahead())
                    last_id = last_id if recovered else START
                    yield ServerSentEvent(data=json.dumps({"recovered": recovered, "from": str(last_id)}), event="recovery")
                subscription.direct = take_directly
                async for envelope in subscription:
                    frame, end = frame_of(envelope)
                    if frame is not None:
                        yield frame
                    if end:
                        return
            except SubscriptionClosed as closed:
                yield farewell(closed.reason, settings.sse_retry_ms)
    finally:
        metrics.sse_clients.dec()


def frames(hub: Hub, envelope: Envelope, fold: OutcomeFold, decided: bool, end: bool) -> bytes:
    """The event's frame (`id:` its position, `event:` task or run), then `input_received` for each
    input request it closed and `needs_input` when it opened one, `outcome` when it decided the run
    and `end` when it ended it, with the same id: one write per client, built once per event (what an
    event opens, closes, decides or ends is the same for every client, all fold the same events)."""
    outcome, opened, closed = fold.outcome, fold.opened, fold.closed

    def build() -> bytes:
        event_id = str(envelope.position)
        parts = [ServerSentEvent(data=event_data(envelope), event=envelope.event.kind.value, id=event_id).encode()]
        for request in closed:
            data = InputClosed.of(request, envelope.event.state).model_dump_json()
            parts.append(ServerSentEvent(data=data, event="input_received", id=event_id).encode())
        if opened is not None:
            data = NeedsInput.of(outcome.dag_id, outcome.run_id, opened).model_dump_json()
            parts.append(ServerSentEvent(data=data, event="needs_input", id=event_id).encode())
        if decided:
            parts.append(ServerSentEvent(data=json.dumps(outcome_body(outcome)), event="outcome", id=event_id).encode())
        if end:
            parts.append(ServerSentEvent(data=json.dumps(end_body(outcome)), event="end", id=event_id).encode())
        return b"".join(parts)

    return hub.shared.get(("frames", outcome.dag_id, outcome.run_id, *envelope.position), build)


def event_data(envelope: Envelope) -> str:
    body = envelope.event.model_dump(mode="json", exclude_none=True)
    return json.dumps({"epoch": envelope.epoch, "seq": envelope.seq, **body})


def end_body(outcome: Outcome) -> dict:
    return RunEnd(run_state=outcome.run_state, status=outcome.status, epoch=outcome.epoch, seq=outcome.seq).model_dump(mode="json")


def is_run_end(envelope: Envelope) -> bool:
    event = envelope.event
    return event.kind is EventKind.RUN and event.run_state.terminal


async def stream_already_ended(runs: RunTopic, dag_id: str, run_id: str, last_id: Position) -> bool:
    """True when the client has already been sent the run's end (its terminal run event)."""
    try:
        history = await runs.read((dag_id, run_id), START)
    except (RedisError, OSError):
        return False  # cannot tell now: stream, and the subscription retries the log
    for envelope in history:
        if envelope.position > last_id:
            return False
        if is_run_end(envelope):
            return True
    return False


# -- publishing -----------------------------------------------------------------------------------


async def publish_event(request: Request) -> Response:
    """Publish one event over HTTP, exactly as `runbell emit` would (role: publish, on the event's DAG)."""
    principal = authorize(request, Role.PUBLISH, per_dag=True)  # before the body is read: see read_body
    event = await read_body(request, Event, code="bad_event")
    principal.check_dag(event.dag_id)
    publisher = request.app.state.publisher
    check_sizes(event, publisher.config.event_max_bytes, publisher.config.result_max_bytes)
    try:
        seq = await asyncio.to_thread(publisher.publish_or_spool, event)
    except SpoolUnavailable as exc:  # a 202 would promise what the spool cannot keep
        raise ApiError(
            503,
            "spool_unavailable",
            f"Redis is unreachable and the event cannot be spooled in {exc.directory} ({exc.reason}); it was not accepted: send it again",
            headers={"Retry-After": str(SPOOL_RETRY_AFTER)},
        ) from exc
    if seq is None:
        return JSONResponse(Spooled(id=event.id).model_dump(mode="json"), status_code=202)
    return JSONResponse(Published(id=event.id, seq=seq).model_dump(mode="json"), status_code=201)


def check_sizes(event: Event, event_max_bytes: int, result_max_bytes: int) -> None:
    """An inline result over the result cap, or an event over the event cap, is refused (413) saying
    the limit: a larger result is published as a reference to its XCom, as the hook does."""
    if event.result is not None and not event.result.is_ref:
        size = json_size(event.result.value)
        if size > result_max_bytes:
            raise ApiError(
                413,
                "result_too_large",
                f"the result is {size} bytes of JSON, over the limit of {result_max_bytes}: publish it as a reference to its XCom instead",
                accepted={"max_bytes": result_max_bytes, "instead": {"result": {"ref": REF_FIELDS, "size": size}}},
            )
    size = utf8_size(event.to_json())
    if size > event_max_bytes:
        raise ApiError(
            413,
            "event_too_large",
            f"the event is {size} bytes of JSON, over the limit of {event_max_bytes}",
            accepted={"max_bytes": event_max_bytes},
        )


REF_FIELDS = {"dag_id": "...", "run_id": "...", "task_id": "...", "map_index": -1}
