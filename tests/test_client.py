"""runbell.service.client.client, sync and async: long-poll and SSE against a real gateway; trigger against a stand-in
for POST /v1/dags/{dag_id}/runs (httpx.MockTransport answering its contract)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any, Union

import httpx
import pytest

from runbell.service.client import client as client_module
from runbell.service.client.client import (
    ATTEMPTS,
    AsyncRunbellClient,
    AuthError,
    Conflict,
    Failure,
    InvalidRequest,
    NotFound,
    RunbellClient,
    RunFailed,
    RunPending,
    SseEvent,
    Unavailable,
)
from tests.conftest import PUBLISH_TOKEN, READ_TOKEN, TRIGGER_TOKEN
from tests.test_gateway import DAG, event_id, publish, until, waiting

# -- one set of calls for both clients --------------------------------------------------------------


class Caller:
    """A client's calls, awaitable. The sync client runs in a thread: the gateway serves in this event loop."""

    def __init__(self, flavor: str, base_url: str, token: str, transport: Any):
        self.sync = flavor == "sync"
        kind = RunbellClient if self.sync else AsyncRunbellClient
        self.client: Any = kind(base_url, token, transport=transport)

    async def call(self, name: str, *args: Any, **kw: Any) -> Any:
        method = getattr(self.client, name)
        return await asyncio.to_thread(method, *args, **kw) if self.sync else await method(*args, **kw)

    async def follow(self, dag_id: str, run_id: str, into: list[SseEvent], **kw: Any) -> None:
        """Append the run's events to `into` as they come, until the stream is over."""
        if self.sync:
            await asyncio.to_thread(lambda: into.extend(self.client.events(dag_id, run_id, **kw)))
            return
        async with contextlib.aclosing(self.client.events(dag_id, run_id, **kw)) as events:
            async for event in events:
                into.append(event)

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close) if self.sync else await self.client.aclose()


@pytest.fixture(params=["sync", "async"])
async def connect(request):
    callers: list[Caller] = []

    def make(base_url: str, token: str = READ_TOKEN, transport: Any = None) -> Caller:
        callers.append(Caller(request.param, base_url, token, transport))
        return callers[-1]

    yield make
    for caller in callers:
        await caller.close()


class Recording(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The real network, with every request kept."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.sync, self.asynchronous = httpx.HTTPTransport(), httpx.AsyncHTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.sync.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.asynchronous.handle_async_request(request)

    def close(self) -> None:
        self.sync.close()

    async def aclose(self) -> None:
        await self.asynchronous.aclose()

    def polls(self) -> list[float]:
        return [float(r.url.params["timeout"]) for r in self.requests if r.url.path.endswith("/result")]


def pairs(events: list[SseEvent]) -> list[tuple[str, str]]:
    """(event, seq) of each event: its id without the epoch (each test's run has one epoch)."""
    return [(e.event, (e.id or "").rpartition("-")[2]) for e in events]


# -- long-poll, real gateway ------------------------------------------------------------------------


async def test_wait_returns_the_success_decided_while_it_waits(gateway, connect):
    caller = connect(gateway.url)
    waiter = asyncio.create_task(caller.call("wait", DAG, "w1", timeout=20))
    await until(waiting(gateway))
    await publish(gateway, "w1", "running")
    await publish(gateway, "w1", "success", task_id="answer", result_task=True, result={"rows": 3})
    outcome = await waiter
    assert (outcome.status, outcome.succeeded, outcome.result, outcome.decided_by) == ("success", True, {"rows": 3}, "result_task")
    assert outcome.result_task.task_id == "answer" and not outcome.result_task.is_ref
    assert outcome.failure is None and outcome.seq == 2 and outcome.body["result"] == {"rows": 3}


async def test_wait_returns_a_failed_outcome_with_its_failure(gateway, connect):
    await publish(gateway, "w2", "failed", task_id="extract", critical=True, try_number=2, error="boom", error_type="KeyError")
    outcome = await connect(gateway.url).call("wait", DAG, "w2", timeout=5)
    assert outcome.status == "failed" and outcome.decided_by == "critical_task"
    assert outcome.failure == Failure(task_id="extract", map_index=-1, try_number=2, error_type="KeyError", message="boom")


async def test_wait_loops_over_202s_and_raises_pending_at_its_timeout(gateway, connect):
    recording = Recording()
    caller = connect(gateway.url, transport=recording)
    await publish(gateway, "w3", "running")
    with pytest.raises(RunPending) as pending:
        await caller.call("wait", DAG, "w3", timeout=1.0, poll=0.25)
    epoch = (await event_id(gateway, "w3", 1)).partition("-")[0]
    assert pending.value.body == {"status": "pending", "dag_id": DAG, "run_id": "w3", "run_state": "running", "epoch": epoch, "seq": 1}
    assert pending.value.status == 202 and pending.value.code == "pending"
    assert len(recording.polls()) >= 3 and max(recording.polls()) <= 0.25


async def test_wait_answers_an_outcome_landing_after_several_202s(gateway, connect):
    recording = Recording()
    waiter = asyncio.create_task(connect(gateway.url, transport=recording).call("wait", DAG, "w4", timeout=20, poll=0.2))
    await until(lambda: len(recording.polls()) >= 3)
    await publish(gateway, "w4", "success", task_id="answer", result_task=True, result="late")
    assert (await waiter).result == "late"


async def test_wait_learns_a_smaller_long_poll_maximum_from_the_gateway(gateway_factory, connect):
    gateway = await gateway_factory(long_poll_max=0.3, long_poll_default=0.3)
    recording = Recording()
    with pytest.raises(RunPending):
        await connect(gateway.url, transport=recording).call("wait", DAG, "w5", timeout=1.0)
    polls = recording.polls()
    assert polls[0] > 0.9 and polls[1:] and max(polls[1:]) <= 0.3  # the 400 said max 0.3


async def test_gateway_errors_are_typed(gateway, connect):
    with pytest.raises(AuthError) as bad:
        await connect(gateway.url, token="wrong").call("wait", DAG, "w6", timeout=1)
    assert (bad.value.status, bad.value.code) == (401, "bad_token")


# -- Server-Sent Events, real gateway ---------------------------------------------------------------


async def test_events_follow_a_run_to_its_end(gateway, connect):
    seen: list[SseEvent] = []
    follower = asyncio.create_task(connect(gateway.url).follow(DAG, "e1", seen))
    await until(waiting(gateway))
    await publish(gateway, "e1", "running")
    await publish(gateway, "e1", "success", task_id="answer", result_task=True, result=[1, 2])
    await publish(gateway, "e1", "success")
    await asyncio.wait_for(follower, 10)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("outcome", "2"), ("run", "3"), ("end", "3")]
    assert seen[2].json()["result"] == [1, 2]


async def test_events_after_the_end_are_none(gateway, connect):
    await publish(gateway, "e2", "success")
    seen: list[SseEvent] = []
    last = await event_id(gateway, "e2", 1)
    await asyncio.wait_for(connect(gateway.url).follow(DAG, "e2", seen, last_event_id=last), 10)  # the gateway: 204
    assert seen == []


class Proxy:
    """A TCP relay in front of a gateway: the test cuts its connections or moves it to another gateway."""

    def __init__(self, gateway) -> None:
        self.port = port_of(gateway)
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self.server.close()

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()  # a reset, as a crashed load balancer or a dead network would give

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


def port_of(gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


async def test_events_resume_after_the_connection_drops_each_event_once(gateway_factory, connect):
    gateway = await gateway_factory(sse_retry_ms=50)
    seen: list[SseEvent] = []
    async with Proxy(gateway) as proxy:
        follower = asyncio.create_task(connect(proxy.url).follow(DAG, "e3", seen))
        await until(waiting(gateway))
        await publish(gateway, "e3", "running")
        await publish(gateway, "e3", "running", task_id="answer", result_task=True)
        await until(lambda: len(seen) == 2)
        proxy.cut()
        await publish(gateway, "e3", "success", task_id="answer", result_task=True, result=42)
        await until(lambda: proxy.connections >= 2)
        await publish(gateway, "e3", "success")
        await asyncio.wait_for(follower, 20)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("task", "3"), ("outcome", "3"), ("run", "4"), ("end", "4")]
    assert seen[3].json()["result"] == 42


async def test_events_move_to_another_gateway_when_one_shuts_down(gateway_factory, connect):
    first, second = await gateway_factory(sse_retry_ms=50), await gateway_factory(sse_retry_ms=50)
    seen: list[SseEvent] = []
    async with Proxy(first) as proxy:
        follower = asyncio.create_task(connect(proxy.url).follow(DAG, "e4", seen))
        await until(waiting(first))
        await publish(first, "e4", "running")
        await publish(first, "e4", "success", task_id="answer", result_task=True, result="x")
        await until(lambda: len(seen) == 3)
        proxy.port = port_of(second)
        first.app.state.hub.drain()  # `event: shutdown` with retry: the client comes back through the proxy
        await until(waiting(second))
        await publish(second, "e4", "success")
        await asyncio.wait_for(follower, 20)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("outcome", "2"), ("run", "3"), ("end", "3")]


# -- Server-Sent Events, scripted -------------------------------------------------------------------


def stream(*blocks: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content="".join(blocks).encode())


def sse(event: str, seq: int | str, data: Any = None) -> str:
    return f"event: {event}\nid: {seq}\ndata: {json.dumps(data or {})}\n\n"


async def follow_scripted(connect, connections: list[httpx.Response]) -> tuple[list[SseEvent], list[str | None]]:
    """Follow a run on a gateway that answers each connection with the next response; what was
    handed out, and the Last-Event-ID of each connection."""
    resumed_from: list[str | None] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        resumed_from.append(request.headers.get("last-event-id"))
        return connections.pop(0)

    seen: list[SseEvent] = []
    await connect("http://gw", transport=httpx.MockTransport(gateway)).follow(DAG, "s1", seen)
    return seen, resumed_from


async def test_events_never_lose_an_outcome_whose_connection_dropped_after_its_event(connect):
    """The outcome has the id of the event that decided it: resuming after that id would skip it."""
    connections = [
        httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "unavailable", "message": "draining"}),
        stream(": runbell\nretry: 10\n\n", sse("run", 1), sse("task", 2)),  # dropped before the outcome of 2
        stream(sse("task", 2), sse("outcome", 2, {"status": "success"}), "event: shutdown\ndata: {}\nretry: 10\n\n"),
        stream(sse("task", 2), sse("outcome", 2, {"status": "success"}), sse("run", 3), sse("end", 3)),
    ]
    seen, resumed_from = await follow_scripted(connect, connections)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("outcome", "2"), ("run", "3"), ("end", "3")]
    assert resumed_from == [None, None, "1", "1"]


async def test_events_of_a_new_epoch_are_handed_out_and_resumed_by_position(connect):
    """Redis lost the run's state mid-stream: ids go from epoch a to epoch b, seq from 1 again. The
    new events are not taken for repeats, and a reconnect resumes by position (EPOCH-SEQ)."""
    connections = [
        stream(": runbell\nretry: 10\n\n", sse("run", "a-1"), sse("task", "a-2"), sse("task", "b-1")),  # dropped
        stream(
            'event: recovery\ndata: {"recovered": true, "from": "a-2"}\n\n',
            sse("task", "b-1"),
            sse("outcome", "b-1", {"status": "success"}),
            sse("run", "b-2"),
            sse("end", "b-2"),
        ),
    ]
    seen, resumed_from = await follow_scripted(connect, connections)
    assert [(e.event, e.id) for e in seen] == [
        ("run", "a-1"),
        ("task", "a-2"),
        ("task", "b-1"),
        ("outcome", "b-1"),
        ("run", "b-2"),
        ("end", "b-2"),
    ]
    assert resumed_from == [None, "a-2"]


async def test_events_give_up_after_many_connections_bring_nothing(connect, monkeypatch):
    monkeypatch.setattr(client_module, "SSE_RETRY_DEFAULT", 0.001)
    attempts = []

    def down(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused")

    with pytest.raises(Unavailable):
        await connect("http://gw", transport=httpx.MockTransport(down)).follow(DAG, "s2", [])
    assert len(attempts) == client_module.SSE_MAX_FAILURES + 1


async def test_events_refused_for_good_raise_the_error(connect):
    answer = httpx.Response(403, json={"error": "token_scope", "message": "this token is scoped to another run"})
    with pytest.raises(AuthError) as refused:
        await connect("http://gw", transport=httpx.MockTransport(lambda request: answer)).follow(DAG, "s3", [])
    assert refused.value.code == "token_scope"


# -- several gateways: the next one when one does not answer ----------------------------------------


async def test_requests_move_to_the_next_gateway_when_one_does_not_answer(connect):
    hosts: list[str] = []

    def gateways(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "gw1":
            raise httpx.ConnectError("connection refused")  # killed
        if request.url.host == "gw2":
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "unavailable", "message": "draining"})
        return decided(request.url.path.split("/")[-2], token=False)

    caller = connect(["http://gw1", "http://gw2/", "http://gw3"], transport=httpx.MockTransport(gateways))
    assert (await caller.call("wait", DAG, "r1", timeout=5)).result == {"answer": 42}
    assert (await caller.call("wait", DAG, "r2", timeout=5)).run_id == "r2"
    assert hosts == ["gw1", "gw2", "gw3", "gw3"]  # and it stays with the one that answers


async def test_requests_failing_together_move_on_once():
    """Many requests in flight to a gateway that dies move the client on once, not once each."""
    hosts: list[str] = []
    gate = asyncio.Event()

    async def gateways(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "gw1":
            await gate.wait()
            raise httpx.RemoteProtocolError("peer closed connection")
        return decided(request.url.path.split("/")[-2], token=False)

    async with AsyncRunbellClient(["http://gw1", "http://gw2"], transport=httpx.MockTransport(gateways)) as client:
        waits = [asyncio.create_task(client.wait(DAG, f"r{i}", timeout=5)) for i in range(4)]
        await until(lambda: len(hosts) == 4)
        gate.set()
        assert [outcome.run_id for outcome in await asyncio.gather(*waits)] == ["r0", "r1", "r2", "r3"]
    assert hosts == ["gw1"] * 4 + ["gw2"] * 4


async def test_events_move_to_the_next_gateway_when_one_dies(connect):
    resumed: list[tuple[str, str | None]] = []

    def gateways(request: httpx.Request) -> httpx.Response:
        resumed.append((request.url.host, request.headers.get("last-event-id")))
        if len(resumed) == 1:
            return stream(": runbell\nretry: 10\n\n", sse("run", 1), sse("task", 2))  # then the process died
        if request.url.host == "gw1":
            raise httpx.ConnectError("connection refused")
        return stream(sse("task", 2), sse("outcome", 2, {"status": "success"}), sse("run", 3), sse("end", 3))

    seen: list[SseEvent] = []
    await connect(["http://gw1", "http://gw2"], transport=httpx.MockTransport(gateways)).follow(DAG, "s4", seen)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("outcome", "2"), ("run", "3"), ("end", "3")]
    assert resumed == [("gw1", None), ("gw1", "1"), ("gw2", "1")]


# -- trigger: a stand-in for POST /v1/dags/{dag_id}/runs ----------------------------------------------

EXPIRES = "2030-01-01T00:00:00+00:00"
Answer = Union[httpx.Response, Exception, Callable[[httpx.Request], httpx.Response]]


def pending(run_id: str = "r1", run_state: str = "queued", token: bool = True) -> httpx.Response:
    body = {"status": "pending", "dag_id": DAG, "run_id": run_id, "run_state": run_state, "seq": 1}
    if token:
        body |= {"token": "run.scoped.jwt", "token_expires_at": EXPIRES}
    return httpx.Response(202, json=body, headers={"Location": f"/v1/dags/{DAG}/runs/{run_id}/result", "Retry-After": "1"})


def decided(run_id: str = "r1", *, failed: bool = False, token: bool = True) -> httpx.Response:
    body: dict[str, Any] = {
        "status": "success",
        "dag_id": DAG,
        "run_id": run_id,
        "result": {"answer": 42},
        "result_task": {"task_id": "answer", "map_index": -1, "try_number": 1, "is_ref": False, "size": 13},
        "failure": None,
        "decided_by": "result_task",
        "decided_seq": 3,
        "run_state": "running",
        "seq": 3,
    }
    if failed:
        body |= {
            "status": "failed",
            "result": None,
            "result_task": None,
            "decided_by": "critical_task",
            "failure": {"task_id": "load", "map_index": 2, "try_number": 3, "error": {"type": "IOError", "message": "disk full"}},
        }
    if token:
        body |= {"token": "run.scoped.jwt", "token_expires_at": EXPIRES}
    return httpx.Response(200, json=body)


def refused(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, json={"error": code, "message": f"{code} said the stand-in"}, headers=headers)


class StandIn:
    """Answers POSTs and GETs from two scripts (the last GET answer repeats); keeps every request."""

    def __init__(self, posts: list[Answer], gets: list[Answer] = ()):
        self.posts, self.gets = list(posts), list(gets)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        script = self.posts if request.method == "POST" else self.gets
        answer = script.pop(0) if len(script) > 1 or request.method == "POST" else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer

    def client(self, connect) -> Caller:
        return connect("http://gw", PUBLISH_TOKEN, httpx.MockTransport(self))

    def posted(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]


def fresh(response_factory: Callable[[], httpx.Response]) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: response_factory()  # a Response is read once: a repeated answer is made anew


async def test_trigger_sends_the_contract_and_reads_a_202(connect):
    gateway = StandIn([pending()])
    triggered = await gateway.client(connect).call("trigger", DAG, conf={"rows": 3}, note="by hand", idempotency_key="k1", wait=5)
    assert (triggered.dag_id, triggered.run_id, triggered.token, triggered.outcome) == (DAG, "r1", "run.scoped.jwt", None)
    assert triggered.token_expires_at.isoformat() == EXPIRES
    request = gateway.requests[0]
    assert (request.method, request.url.path) == ("POST", f"/v1/dags/{DAG}/runs")
    assert json.loads(request.content) == {"conf": {"rows": 3}, "logical_date": None, "note": "by hand"}
    assert request.headers["prefer"] == "wait=5" and request.headers["idempotency-key"] == "k1"
    assert request.headers["authorization"] == f"Bearer {PUBLISH_TOKEN}"


async def test_trigger_with_the_outcome_in_its_answer(connect):
    triggered = await StandIn([decided()]).client(connect).call("trigger", DAG, run_id="mine", wait=30)
    assert triggered.outcome.result == {"answer": 42} and triggered.outcome.result_task.size == 13
    assert "token" not in triggered.outcome.body  # the outcome is what the result endpoint answers


async def test_trigger_and_wait_returns_the_result_from_the_post(connect):
    gateway = StandIn([decided()])
    assert await gateway.client(connect).call("trigger_and_wait", DAG, conf={"a": 1}, timeout=300) == {"answer": 42}
    request = gateway.requests[0]
    assert request.headers["prefer"] == "wait=60"  # at most one long-poll
    assert len(request.headers["idempotency-key"]) == 32  # made up, as the caller gave none


async def test_trigger_and_wait_polls_the_result_after_a_202(connect):
    gateway = StandIn([pending("r7")], gets=[pending("r7", "running", token=False), decided("r7", token=False)])
    assert await gateway.client(connect).call("trigger_and_wait", DAG, timeout=30) == {"answer": 42}
    polls = [r for r in gateway.requests if r.method == "GET"]
    assert [r.url.path for r in polls] == [f"/v1/dags/{DAG}/runs/r7/result"] * 2


async def test_trigger_and_wait_raises_the_failure(connect):
    with pytest.raises(RunFailed) as failed:
        await StandIn([decided(failed=True)]).client(connect).call("trigger_and_wait", DAG, timeout=30)
    assert failed.value.failure == Failure(task_id="load", map_index=2, try_number=3, error_type="IOError", message="disk full")
    assert failed.value.outcome.decided_by == "critical_task"
    assert "load" in str(failed.value) and "disk full" in str(failed.value)


async def test_trigger_and_wait_raises_pending_at_its_timeout(connect):
    gateway = StandIn([pending()], gets=[fresh(lambda: pending(run_state="running", token=False))])
    with pytest.raises(RunPending) as still:
        await gateway.client(connect).call("trigger_and_wait", DAG, timeout=0.3)
    assert still.value.body["run_state"] == "running" and "token" not in still.value.body


@pytest.mark.parametrize(
    "status, code, error",
    [
        (404, "unknown_dag", NotFound),
        (409, "dag_paused", Conflict),
        (409, "run_exists", Conflict),
        (422, "idempotency_key_reused", InvalidRequest),
        (403, "forbidden", AuthError),
    ],
)
async def test_trigger_refusals_are_typed_and_not_retried(connect, status, code, error):
    gateway = StandIn([refused(status, code)])
    with pytest.raises(error) as refusal:
        await gateway.client(connect).call("trigger_and_wait", DAG, timeout=30)
    assert (refusal.value.status, refusal.value.code) == (status, code)
    assert refusal.value.message == f"{code} said the stand-in"
    assert len(gateway.requests) == 1


async def test_a_lost_post_is_retried_with_the_same_idempotency_key(connect):
    gateway = StandIn([httpx.ReadError("connection reset by peer"), refused(409, "idempotency_in_progress", "0"), decided()])
    assert await gateway.client(connect).call("trigger_and_wait", DAG, timeout=30) == {"answer": 42}
    keys = {r.headers["idempotency-key"] for r in gateway.posted()}
    assert len(gateway.posted()) == 3 and len(keys) == 1


async def test_a_post_without_an_idempotency_key_is_not_retried(connect):
    gateway = StandIn([httpx.ReadError("connection reset by peer"), decided()])
    with pytest.raises(Unavailable) as lost:
        await gateway.client(connect).call("trigger", DAG)
    assert lost.value.status is None and len(gateway.requests) == 1


async def test_an_unavailable_airflow_is_retried_then_reported(connect):
    gateway = StandIn([refused(503, "airflow_unavailable", "0") for _ in range(ATTEMPTS)])
    with pytest.raises(Unavailable) as down:
        await gateway.client(connect).call("trigger", DAG, idempotency_key="k2")
    assert (down.value.status, down.value.code) == (503, "airflow_unavailable")
    assert len(gateway.requests) == ATTEMPTS


# -- trigger against the real endpoint (a stand-in Airflow behind it) -------------------------------


@pytest.fixture
def airflow(stand_in_airflow):
    return stand_in_airflow


@pytest.fixture
async def triggering_gateway(gateway_factory, airflow):
    return await gateway_factory(airflow_url=airflow.url, token_secret="test-secret-of-at-least-32-bytes!!")


async def test_trigger_and_wait_against_the_gateway(triggering_gateway, airflow, connect):
    gateway = triggering_gateway
    call = asyncio.create_task(connect(gateway.url, TRIGGER_TOKEN).call("trigger_and_wait", DAG, conf={"q": 1}, timeout=20))
    await until(lambda: airflow.runs)
    ((_, run_id),) = airflow.runs  # drawn by the gateway, with ':' and '+' in it
    await publish(gateway, run_id, "success", task_id="answer", result_task=True, result={"a": 42})
    assert await call == {"a": 42}
    assert airflow.posts == [{"dag_run_id": run_id, "logical_date": None, "conf": {"q": 1}, "note": None}]


async def test_trigger_then_wait_and_follow_with_the_run_token(triggering_gateway, airflow, connect):
    gateway = triggering_gateway
    caller = connect(gateway.url, TRIGGER_TOKEN)
    first = await caller.call("trigger", DAG, idempotency_key="order-17")
    again = await caller.call("trigger", DAG, idempotency_key="order-17")
    assert again.run_id == first.run_id and len(airflow.runs) == 1
    await publish(gateway, first.run_id, "failed", task_id="load", critical=True, error="disk full")
    await publish(gateway, first.run_id, "failed")
    scoped = connect(gateway.url, first.token)  # what the caller hands to whoever else waits
    outcome = await scoped.call("wait", DAG, first.run_id, timeout=5)
    assert outcome.failure.task_id == "load" and outcome.failure.message == "disk full"
    seen: list[SseEvent] = []
    await asyncio.wait_for(scoped.follow(DAG, first.run_id, seen), 10)
    assert pairs(seen) == [("run", "1"), ("task", "2"), ("outcome", "2"), ("run", "3"), ("end", "3")]
    with pytest.raises(NotFound) as unknown:
        await caller.call("trigger", "nope")
    assert unknown.value.code == "unknown_dag"
