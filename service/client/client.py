"""A client of the gateway, sync and async: trigger a run, wait for its outcome, follow its events.

The protocol is written once, without I/O: request flows are generators that yield what to do (send
a `Call`, or `Sleep`) and receive the answer, and `SseFollow` keeps the place in an event stream.
`RunbellClient` and `AsyncRunbellClient` only drive them with httpx, blocking or awaiting.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import (
    Any,
    TypeVar,
)
from urllib.parse import quote

import anyio
import httpx

from runbell.bus.schema import LEGACY_EPOCH, START, Position, parse_position
from runbell.service.core import clock

DEFAULT_URL = "http://127.0.0.1:8080"
POLL_MAX = 60.0  # the gateway's default long-poll maximum; a smaller configured one is learnt from its 400
ATTEMPTS = 4  # tries of one request, when a retry is safe (GET, or POST with an idempotency key)
BACKOFF = 0.25  # seconds before the first retry; doubles
MAX_DELAY = 5.0  # cap of a backoff or a Retry-After
RETRYABLE_STATUSES = (502, 503, 504)
SSE_READ_TIMEOUT = 60.0  # four missed heartbeats (every 15 s by default): the connection is dead
SSE_RETRY_DEFAULT = 1.0  # seconds before a reconnect until the gateway's `retry:` says otherwise
SSE_RETRY_MAX = 10.0
SSE_MAX_FAILURES = 10  # reconnects in a row without a new event before giving up
RECOVERY = "recovery"  # the gateway's first event on a resume: whether the history is complete
FAREWELLS = ("error", "shutdown")  # the gateway's "reconnect with Last-Event-ID"
RUN_TOKEN_FIELDS = ("token", "token_expires_at")  # in a trigger's answer, not part of the outcome

T = TypeVar("T")


# -- what the gateway answers -----------------------------------------------------------------------


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Failure:
    task_id: str | None  # None when the run itself failed with no failed task seen
    map_index: int
    try_number: int | None
    error_type: str
    message: str


@dataclass(frozen=True)
class ResultTask:
    task_id: str
    map_index: int
    try_number: int | None
    is_ref: bool  # the value was too large for the bus: `result` is where Airflow keeps it
    size: int


@dataclass(frozen=True)
class Outcome:
    status: str  # success | failed
    dag_id: str
    run_id: str
    result: Any
    result_task: ResultTask | None
    failure: Failure | None
    decided_by: str | None  # result_task | critical_task | run
    run_state: str
    seq: int
    body: dict = field(repr=False, compare=False)  # as the gateway sent it, e.g. to print

    @property
    def succeeded(self) -> bool:
        return self.status == "success"


@dataclass(frozen=True)
class Triggered:
    dag_id: str
    run_id: str
    token: str  # may read this run's result and events only; hand it to whoever else waits
    token_expires_at: datetime
    outcome: Outcome | None  # set when the outcome landed within the trigger's wait


class RunbellError(Exception):
    """The gateway said no (status, code and message from its JSON error body), or did not answer (status None)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error", body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.body = body if body is not None else {"error": code, "message": message}


class InvalidRequest(RunbellError):
    """400, 422: e.g. bad_timeout, idempotency_key_reused."""


class AuthError(RunbellError):
    """401, 403: a missing, bad or expired token, or one without the role."""


class NotFound(RunbellError):
    """404: e.g. unknown_dag."""


class Conflict(RunbellError):
    """409: dag_paused, run_exists, idempotency_in_progress."""


class Unavailable(RunbellError):
    """5xx (the gateway, or Airflow behind it), or no answer at all after the retries."""


class RunFailed(RunbellError):
    def __init__(self, outcome: Outcome):
        failure = outcome.failure or Failure(None, -1, None, "unknown", "")
        where = f"task {failure.task_id} (try {failure.try_number})" if failure.task_id else "the run"
        super().__init__(
            f"{outcome.dag_id}/{outcome.run_id} failed in {where}: {failure.error_type}: {failure.message}",
            status=200,
            code="failed",
            body=outcome.body,
        )
        self.outcome, self.failure = outcome, failure


class RunPending(RunbellError):
    """The timeout passed before the outcome was decided; `body` is the gateway's last pending answer."""

    def __init__(self, body: dict):
        body = without_run_token(body)
        super().__init__(
            f"{body.get('dag_id')}/{body.get('run_id')} is still pending (run {body.get('run_state')})",
            status=202,
            code="pending",
            body=body,
        )


ERRORS_BY_STATUS: dict[int, type[RunbellError]] = {
    400: InvalidRequest,
    422: InvalidRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
}


# -- parsing ----------------------------------------------------------------------------------------


def without_run_token(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in RUN_TOKEN_FIELDS}


def parse_outcome(body: dict) -> Outcome:
    body = without_run_token(body)
    task, failure = body.get("result_task"), body.get("failure")
    return Outcome(
        status=body["status"],
        dag_id=body["dag_id"],
        run_id=body["run_id"],
        result=body.get("result"),
        result_task=ResultTask(
            task["task_id"], task.get("map_index", -1), task.get("try_number"), bool(task.get("is_ref")), task.get("size", 0)
        )
        if task
        else None,
        failure=Failure(
            failure.get("task_id"),
            failure.get("map_index", -1),
            failure.get("try_number"),
            failure.get("error", {}).get("type", ""),
            failure.get("error", {}).get("message", ""),
        )
        if failure
        else None,
        decided_by=body.get("decided_by"),
        run_state=body.get("run_state", "unknown"),
        seq=body.get("seq", 0),
        body=body,
    )


def parse_triggered(response: httpx.Response) -> Triggered:
    body = response.json()
    return Triggered(
        dag_id=body["dag_id"],
        run_id=body["run_id"],
        token=body["token"],
        token_expires_at=clock.parse(body["token_expires_at"]),
        outcome=parse_outcome(body) if response.status_code == 200 else None,
    )


def error_body(response: httpx.Response) -> dict | None:
    try:
        body = response.json()
    except ValueError:
        return None  # e.g. a load balancer's HTML page
    return body if isinstance(body, dict) and "error" in body else None


def error_from(response: httpx.Response) -> RunbellError:
    status = response.status_code
    body = error_body(response) or {"error": f"http_{status}", "message": response.text[:200] or response.reason_phrase}
    kind = ERRORS_BY_STATUS.get(status, Unavailable if status >= 500 else RunbellError)
    return kind(str(body.get("message", "")), status=status, code=str(body["error"]), body=body)


def retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    return min(float(raw), MAX_DELAY) if raw.isdigit() else None  # an HTTP-date is not worth parsing here


def retry_delay(answer: httpx.Response | httpx.TransportError, attempt: int) -> float | None:
    """Seconds before trying again when the failure is momentary, else None."""
    backoff = min(BACKOFF * 2 ** (attempt - 1), MAX_DELAY)
    if isinstance(answer, httpx.TransportError):
        return backoff
    in_progress = answer.status_code == 409 and (error_body(answer) or {}).get("error") == "idempotency_in_progress"
    if answer.status_code in RETRYABLE_STATUSES or in_progress:
        hinted = retry_after(answer)
        return backoff if hinted is None else hinted
    return None


def accepted_max(response: httpx.Response, asked: float) -> float | None:
    """The gateway's largest long-poll when `asked` was over it (its maximum is configurable)."""
    body = error_body(response) if response.status_code == 400 else None
    accepted = body.get("accepted") if body else None
    limit = accepted.get("max") if isinstance(accepted, dict) else None
    return float(limit) if isinstance(limit, (int, float)) and limit < asked else None


# -- request flows, without I/O ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict = field(default_factory=dict)
    json: Any = None
    headers: dict = field(default_factory=dict)
    hold: float = 0.0  # seconds the gateway may hold the request before answering (added to the read timeout)
    retry_safe: bool = True


@dataclass(frozen=True)
class Sleep:
    seconds: float


Flow = Generator[Call | Sleep, Any, T]


def dag_path(dag_id: str) -> str:
    return f"/v1/dags/{quote(dag_id, safe='')}/runs"


def run_path(dag_id: str, run_id: str, leaf: str) -> str:
    return f"{dag_path(dag_id)}/{quote(run_id, safe='')}/{leaf}"


def send(call: Call) -> Flow[httpx.Response]:
    """One request, retried with backoff when that is safe and the failure momentary."""
    for attempt in range(1, ATTEMPTS + 1):
        answer = yield call  # a Response, or the TransportError the request raised
        delay = retry_delay(answer, attempt) if call.retry_safe and attempt < ATTEMPTS else None
        if delay is None:
            break
        yield Sleep(delay)
    if isinstance(answer, httpx.TransportError):
        raise Unavailable(f"the gateway did not answer: {answer!r}") from answer
    return answer


def trigger_flow(
    dag_id: str,
    *,
    conf: dict | None,
    run_id: str | None,
    logical_date: datetime | str | None,
    note: str | None,
    idempotency_key: str | None,
    wait: float,
    unpause: bool = False,
    resolve: bool = False,
) -> Flow[Triggered]:
    body: dict[str, Any] = {
        "conf": conf or {},
        "logical_date": logical_date.isoformat() if isinstance(logical_date, datetime) else logical_date,
    }
    if run_id is not None:
        body["run_id"] = run_id
    if note is not None:
        body["note"] = note
    # Prefer (RFC 7240) rather than ?wait=: the gateway caps it at its maximum instead of refusing it.
    headers = {"Prefer": f"wait={wait:g}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    params = {"unpause": "true"} if unpause else {}  # a paused DAG is refused (409 dag_paused) unless so asked
    params.update(resolve_params(resolve))
    call = Call("POST", dag_path(dag_id), params=params, json=body, headers=headers, hold=wait, retry_safe=bool(idempotency_key))
    response = yield from send(call)
    if response.status_code not in (200, 202):
        raise error_from(response)
    return parse_triggered(response)


def resolve_params(resolve: bool) -> dict[str, str]:
    """Ask the gateway to read a result published as a reference (too large for the bus) from Airflow."""
    return {"resolve": "true"} if resolve else {}


def wait_flow(dag_id: str, run_id: str, timeout: float, poll: float, resolve: bool = False) -> Flow[Outcome]:
    """Long-poll until the outcome is decided; 202s are looped over until `timeout` has passed. A 202
    needs_input (a task waits for a person) is passed by: the next calls wait past it (after=)."""
    deadline = time.monotonic() + timeout
    after: str | None = None
    while True:
        started = time.monotonic()
        asked = min(poll, max(0.0, deadline - started))
        params = {"timeout": f"{asked:g}", **resolve_params(resolve), **({"after": after} if after else {})}
        call = Call("GET", run_path(dag_id, run_id, "result"), params=params, hold=asked)
        response = yield from send(call)
        if (limit := accepted_max(response, asked)) is not None:
            poll = limit
            continue
        if response.status_code == 200:
            return parse_outcome(response.json())
        if response.status_code != 202:
            raise error_from(response)
        now = time.monotonic()
        if now >= deadline:
            raise RunPending(response.json())
        body = response.json()
        if isinstance(body, dict) and body.get("status") == "needs_input" and isinstance(body.get("after"), str):
            after = body["after"]  # told: wait past it, for the outcome or a newer request
            continue
        if now - started < asked / 2:  # answered well before its timeout (a draining gateway): do not spin
            hinted = retry_after(response)
            yield Sleep(min(1.0 if hinted is None else hinted, deadline - now))


def trigger_and_wait_flow(
    dag_id: str, *, conf: dict | None, timeout: float, run_id: str | None, idempotency_key: str | None, resolve: bool = False
) -> Flow[Any]:
    deadline = time.monotonic() + timeout
    # A key of our own, so that retrying a POST whose answer was lost cannot start a second run.
    triggered = yield from trigger_flow(
        dag_id,
        conf=conf,
        run_id=run_id,
        logical_date=None,
        note=None,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
        wait=min(timeout, POLL_MAX),
        resolve=resolve,
    )
    outcome = triggered.outcome
    if outcome is None:
        outcome = yield from wait_flow(dag_id, triggered.run_id, max(0.0, deadline - time.monotonic()), POLL_MAX, resolve)
    if not outcome.succeeded:
        raise RunFailed(outcome)
    return outcome.result


# -- Server-Sent Events -----------------------------------------------------------------------------


def dead_letters_flow(after: int, limit: int) -> Flow[dict]:
    """A page of the recorder's dead letters (admin)."""
    response = yield from send(Call("GET", "/v1/dead-letters", params={"after": after, "limit": limit}))
    if response.status_code != 200:
        raise error_from(response)
    return response.json()


def redrive_flow(letter_id: int | None, after: int = 0, limit: int = 50) -> Flow[dict]:
    """Record one dead letter again (letter_id), or those after `after`, up to limit (None) (admin)."""
    if letter_id is None:
        call = Call("POST", "/v1/dead-letters/redrive", params={"after": after, "limit": limit}, retry_safe=False)
    else:
        call = Call("POST", f"/v1/dead-letters/{letter_id}/redrive", retry_safe=False)
    response = yield from send(call)
    if response.status_code != 200:
        raise error_from(response)
    return response.json()


class SseParser:
    """The text/event-stream format, a line at a time: fields until a blank line; comments (':') ignored."""

    _data: list[str]

    def __init__(self) -> None:
        self.retry: int | None = None  # the last `retry:` seen, also from a block that is not an event
        self._start()

    def _start(self) -> None:
        self._event, self._data, self._seen = SseEvent(), [], False

    def feed(self, line: str) -> SseEvent | None:
        """The event a blank line completes, else None."""
        if line == "":
            event, seen = self._event, self._seen
            event.data = "\n".join(self._data)
            self._start()
            return event if seen else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
            self._seen = True
        elif name == "event":
            self._event.event, self._seen = value, True
        elif name == "id":
            self._event.id, self._seen = value, True
        elif name == "retry" and value.isdigit():
            self._event.retry = self.retry = int(value)
        return None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    parser = SseParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


def recovered(event: SseEvent) -> bool:
    """What a `recovery` event says: whether the stream resumed where asked."""
    try:
        return bool(event.json().get("recovered"))
    except (ValueError, AttributeError):
        return False


def resume_position(last_event_id: int | str) -> Position:
    """Where to resume: an id as the gateway sent it (EPOCH-SEQ), or a bare seq."""
    position = Position(LEGACY_EPOCH, last_event_id) if isinstance(last_event_id, int) else parse_position(last_event_id)
    if position is None or position.seq < 0:
        raise ValueError(f"not an event id: {last_event_id!r}")
    return position


class SseFollow:
    """The place in one run's event stream, so that a new connection resumes it with nothing lost or repeated.

    A reconnect asks for what follows the id *before* the last one seen: the gateway sends `outcome`
    and `end` with the id of the event that caused them, so resuming after the last id would lose an
    outcome whose connection dropped right after its event. What was already handed out is skipped.
    Ids are positions (EPOCH-SEQ): events of a newer epoch (Redis lost the run's state and counted
    from 1 again) come after every older one, so they are handed out, not skipped as repeats. The
    gateway's `recovery` event is handed out when it says ``recovered: false`` (it could not resume
    where asked: what was missed may be gone, and the whole history it has follows); a resume that
    lost nothing is not worth telling.
    """

    def __init__(self, dag_id: str, run_id: str, last_event_id: int | str = 0):
        self.path = run_path(dag_id, run_id, "events")
        self.last_id = resume_position(last_event_id)
        self.before_last = self.last_id  # the position before last_id: where a reconnect resumes
        self.names_at_last: set[str] = set()  # events already handed out with id == last_id
        self.retry = SSE_RETRY_DEFAULT
        self.failures = 0  # connections in a row that brought nothing new
        self.done = False  # `end` seen, or 204: the stream is over
        self.closing = False  # this connection is over (done, or the gateway said reconnect)
        self.parser = SseParser()
        self.hint: float | None = None  # Retry-After of a refused connection

    def call(self) -> Call:
        resume = self.before_last if self.names_at_last else self.last_id
        self.parser, self.closing, self.hint = SseParser(), False, None
        headers = {"Last-Event-ID": str(resume)} if resume != START else {}
        return Call("GET", self.path, headers=headers, hold=SSE_READ_TIMEOUT)

    def opened(self, response: httpx.Response) -> bool:
        """Whether to read this response's events. Raises what is not momentary (an error body must be read)."""
        if response.status_code == 200:
            return True
        if response.status_code == 204:  # the stream had already ended
            self.done = True
            return False
        if retry_delay(response, 1) is None:
            raise error_from(response)
        self.hint = retry_after(response)
        return False

    def feed(self, line: str) -> SseEvent | None:
        """The event to hand out for this line, if any."""
        event = self.parser.feed(line)
        if self.parser.retry is not None:
            self.retry = min(self.parser.retry / 1000, SSE_RETRY_MAX)
        if event is None:
            return None
        if event.event in FAREWELLS:
            self.closing = True
            return None
        if event.event == RECOVERY:
            return None if recovered(event) else event
        position = parse_position(event.id) if event.id is not None else None
        if position is None:
            return event
        if position < self.last_id or (position == self.last_id and event.event in self.names_at_last):
            return None  # replayed by the resume
        if position > self.last_id:
            self.before_last, self.last_id, self.names_at_last, self.failures = self.last_id, position, set(), 0
        self.names_at_last.add(event.event)
        if event.event == "end":
            self.done = self.closing = True
        return event

    def reconnect_delay(self, error: Exception | None = None) -> float:
        """Seconds before the next connection; raises Unavailable after too many that brought nothing."""
        self.failures += 1
        if self.failures > SSE_MAX_FAILURES:
            raise Unavailable(f"lost the event stream {SSE_MAX_FAILURES} times in a row: {error!r}") from error
        return self.hint if self.hint is not None else min(self.retry * 2 ** (self.failures - 1), SSE_RETRY_MAX)


# -- the clients: only the I/O ----------------------------------------------------------------------


class _Base:
    """`base_url` is one gateway (or a load balancer), or several replicas tried in turn: a request that a
    gateway does not answer, or answers 502/503/504, moves the client on to the next one."""

    def __init__(self, base_url: str | Sequence[str], token: str | None, timeout: float):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url: at least one gateway URL")
        self.base_urls = [url.rstrip("/") for url in urls]
        self._current = 0
        self.timeout = timeout  # connect, write and pool; and the slack on a held request's read
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def base_url(self) -> str:
        """The gateway the next request goes to."""
        return self.base_urls[self._current]

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call) -> httpx.Request:
        return http.build_request(
            call.method,
            self.base_url + call.path,
            params=call.params,
            json=call.json,
            headers=call.headers,
            timeout=httpx.Timeout(self.timeout, read=self.timeout + call.hold),
        )

    def _answered(self, request: httpx.Request, answer: httpx.Response | httpx.TransportError) -> None:
        """After a gateway did not answer or said it is unavailable, the next request goes to the next one:
        once, however many requests in flight saw the same gateway fail."""
        failed = isinstance(answer, httpx.TransportError) or answer.status_code in RETRYABLE_STATUSES
        if failed and len(self.base_urls) > 1 and str(request.url).startswith(self.base_url + "/"):
            self._current = (self._current + 1) % len(self.base_urls)


class RunbellClient(_Base):
    """The blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, token, timeout)
        self._http = httpx.Client(headers=self.headers, transport=transport)

    def trigger(
        self,
        dag_id: str,
        *,
        conf: dict | None = None,
        run_id: str | None = None,
        logical_date: datetime | str | None = None,
        note: str | None = None,
        idempotency_key: str | None = None,
        wait: float = 0,
        unpause: bool = False,
        resolve: bool = False,
    ) -> Triggered:
        """Start a run; with `wait`, hold up to that long (capped by the gateway) for its outcome;
        with `unpause`, unpause a paused DAG first; with `resolve`, a result too large for the bus is read
        from Airflow (see wait). Retried on a lost connection only with an idempotency_key."""
        return self._drive(
            trigger_flow(
                dag_id,
                conf=conf,
                run_id=run_id,
                logical_date=logical_date,
                note=note,
                idempotency_key=idempotency_key,
                wait=wait,
                unpause=unpause,
                resolve=resolve,
            )
        )

    def wait(self, dag_id: str, run_id: str, *, timeout: float = 300, poll: float = POLL_MAX, resolve: bool = False) -> Outcome:
        """The decided outcome (success or failed); RunPending once `timeout` seconds have passed.

        A result larger than the bus carries (result_task.is_ref) is, as `result`, a reference to its
        XCom; with `resolve`, the gateway reads the value from Airflow (`result`; the reference is in
        `body["result_ref"]`, or why it could not be read in `body["result_error"]`)."""
        return self._drive(wait_flow(dag_id, run_id, timeout, poll, resolve))

    def trigger_and_wait(
        self,
        dag_id: str,
        *,
        conf: dict | None = None,
        timeout: float = 300,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        resolve: bool = False,
    ) -> Any:
        """The run's result value (with `resolve`, read from Airflow when too large for the bus); RunFailed
        with the failure, or RunPending at the timeout."""
        flow = trigger_and_wait_flow(dag_id, conf=conf, timeout=timeout, run_id=run_id, idempotency_key=idempotency_key, resolve=resolve)
        return self._drive(flow)

    def events(self, dag_id: str, run_id: str, *, last_event_id: int | str = 0) -> Iterator[SseEvent]:
        """The run's events (task, run, outcome, end) each once, across reconnects, until `end`."""
        follow = SseFollow(dag_id, run_id, last_event_id)
        while True:
            error: Exception | None = None
            request = self._request(self._http, follow.call())
            try:
                response = self._http.send(request, stream=True)
                try:
                    if response.status_code not in (200, 204):
                        response.read()
                        self._answered(request, response)
                    if follow.opened(response):
                        for line in response.iter_lines():
                            if (event := follow.feed(line)) is not None:
                                yield event
                            if follow.closing:
                                break
                finally:
                    response.close()
            except httpx.TransportError as exc:
                error = exc
                self._answered(request, exc)
            if follow.done:
                return
            time.sleep(follow.reconnect_delay(error))

    def dead_letters(self, *, after: int = 0, limit: int = 50) -> dict:
        """A page of the recorder's dead letters, oldest first (admin): {dead_letters, next_after}."""
        return self._drive(dead_letters_flow(after, limit))

    def redrive(self, letter_id: int | None = None, *, after: int = 0, limit: int = 50) -> dict:
        """Record a dead letter again; without letter_id, those after `after`, up to limit of them (admin)."""
        return self._drive(redrive_flow(letter_id, after, limit))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RunbellClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drive(self, flow: Flow[T]) -> T:
        answer: Any = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                answer = None
                continue
            request = self._request(self._http, step)
            try:
                answer = self._http.send(request)
            except httpx.TransportError as exc:
                answer = exc
            self._answered(request, answer)


class AsyncRunbellClient(_Base):
    """The asyncio (or trio) client: the same methods, awaited. Use as an async context manager, or aclose()."""

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, token, timeout)
        self._http = httpx.AsyncClient(headers=self.headers, transport=transport)

    async def trigger(
        self,
        dag_id: str,
        *,
        conf: dict | None = None,
        run_id: str | None = None,
        logical_date: datetime | str | None = None,
        note: str | None = None,
        idempotency_key: str | None = None,
        wait: float = 0,
        unpause: bool = False,
        resolve: bool = False,
    ) -> Triggered:
        return await self._drive(
            trigger_flow(
                dag_id,
                conf=conf,
                run_id=run_id,
                logical_date=logical_date,
                note=note,
                idempotency_key=idempotency_key,
                wait=wait,
                unpause=unpause,
                resolve=resolve,
            )
        )

    async def wait(self, dag_id: str, run_id: str, *, timeout: float = 300, poll: float = POLL_MAX, resolve: bool = False) -> Outcome:
        return await self._drive(wait_flow(dag_id, run_id, timeout, poll, resolve))

    async def trigger_and_wait(
        self,
        dag_id: str,
        *,
        conf: dict | None = None,
        timeout: float = 300,
        run_id: str | None = None,
        idempotency_key: str | None = None,
        resolve: bool = False,
    ) -> Any:
        flow = trigger_and_wait_flow(dag_id, conf=conf, timeout=timeout, run_id=run_id, idempotency_key=idempotency_key, resolve=resolve)
        return await self._drive(flow)

    async def dead_letters(self, *, after: int = 0, limit: int = 50) -> dict:
        return await self._drive(dead_letters_flow(after, limit))

    async def redrive(self, letter_id: int | None = None, *, after: int = 0, limit: int = 50) -> dict:
        return await self._drive(redrive_flow(letter_id, after, limit))

    async def events(self, dag_id: str, run_id: str, *, last_event_id: int | str = 0) -> AsyncIterator[SseEvent]:
        follow = SseFollow(dag_id, run_id, last_event_id)
        while True:
            error: Exception | None = None
            request = self._request(self._http, follow.call())
            try:
                response = await self._http.send(request, stream=True)
                try:
                    if response.status_code not in (200, 204):
                        await response.aread()
                        self._answered(request, response)
                    if follow.opened(response):
                        async for line in response.aiter_lines():
                            if (event := follow.feed(line)) is not None:
                                yield event
                            if follow.closing:
                                break
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                error = exc
                self._answered(request, exc)
            if follow.done:
                return
            await anyio.sleep(follow.reconnect_delay(error))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRunbellClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _drive(self, flow: Flow[T]) -> T:
        answer: Any = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Sleep):
                await anyio.sleep(step.seconds)
                answer = None
                continue
            request = self._request(self._http, step)
            try:
                answer = await self._http.send(request)
            except httpx.TransportError as exc:
                answer = exc
            self._answered(request, answer)
