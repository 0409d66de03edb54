"""Review of the long-poll direct answer (runbell.service.http.server.DirectWrite.answer): interleavings
uvicorn's own send does not have, the shared bytes' bound, and a served gateway's answers in the cases
around it (a pipelined long-poll behind a direct answer, HEAD, HTTP/1.0, not found, the access log)."""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Any

import httpx
import pytest
from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.server import ServerState

from runbell.bus.schema import Event, EventKind, InputRequest
from runbell.service.bench.delivery import DAG, Target
from runbell.service.http.server import DIRECT_WRITE, DirectWrite, guarded_http
from runbell.service.live.hub import SharedBytes
from runbell.service.settings import Settings
from tests.test_long_poll_direct import request, responses, undated, waiting
from tests.test_sse_direct import metric, raw_exchange, target, until  # noqa: F401  # target: the served gateway, a fixture

# -- the cycle's completion, against uvicorn's real httptools protocol ------------------------------------


class Transport:
    """What uvicorn's protocol needs of a socket transport; records what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5000) if name in ("sockname", "peername") else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def served_protocol(app: Any, keep_alive_timeout: float) -> tuple[asyncio.Protocol, Transport]:
    config = Config(app=app, proxy_headers=False, timeout_keep_alive=keep_alive_timeout, log_level="warning")  # type: ignore[arg-type]
    state = ServerState()
    state.default_headers = [(b"date", b"Thu, 03 Dec 2026 22:00:00 GMT")]
    protocol_class = guarded_http(Settings())
    protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def test_a_request_read_right_after_a_direct_answer_is_not_cut_off_by_the_keep_alive_timer() -> None:
    """The fan-out answers a waiter and, in the same loop iteration, the client's next request on that
    connection is read (its bytes were in the same select()). uvicorn's send runs on_response before
    anything else can happen; answer() deferred it with call_soon, so on_response_complete ran after
    the next request had started and armed the keep-alive timer over it: the connection was closed
    under the second request (a long-poll of 60 s cut after timeout_keep_alive, no answer)."""
    waiting_first, second_started, release, finish = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    directs: list[DirectWrite] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if not directs:
            directs.append(scope["extensions"][DIRECT_WRITE])
            waiting_first.set()
            await release.wait()  # the waiter's task: it leaves once answered
            return
        second_started.set()
        await finish.wait()  # the second request: a long-poll still waiting
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    protocol, transport = served_protocol(app, keep_alive_timeout=0.2)
    wire = b"GET /r HTTP/1.1\r\nHost: t\r\n\r\n"
    protocol.data_received(wire)  # type: ignore[attr-defined]
    await asyncio.wait_for(waiting_first.wait(), 5)
    (direct,) = directs
    assert direct.can_answer()
    # One callback: the fan-out's answer, then the connection's next bytes, as one loop iteration runs them.
    direct.answer(SharedBytes(), "k", lambda: Response(b"{}", media_type="application/json"))
    protocol.data_received(wire)  # type: ignore[attr-defined]
    release.set()
    await asyncio.wait_for(second_started.wait(), 5)
    await asyncio.sleep(0.6)  # three keep-alive timeouts: a timer armed over the second request has fired
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not transport.closed, "the connection was closed while its second request was being served"
    finish.set()
    await asyncio.sleep(0.05)
    protocol.connection_lost(None)  # type: ignore[attr-defined]


# -- the shared bytes: once per outcome, not once per waiter ---------------------------------------------------


class FakeCycle:
    """A httptools cycle's fields that DirectWrite.answer reads and sets."""

    def __init__(self, date: bytes, keep_alive: bool) -> None:
        self.default_headers = [(b"date", date)]
        self.keep_alive = keep_alive
        self.response_started = self.response_complete = self.waiting_for_100_continue = False
        self.access_log = False
        self.transport = Transport()
        self.message_event = asyncio.Event()
        self.on_response = lambda: None


async def test_a_large_outcome_is_built_once_per_date_and_keep_alive_not_once_per_waiter() -> None:
    """Waiters that came in over 30 seconds hold 30 Dates (x2 keep-alive): 60 entries of a 256 KiB
    answer do not fit hub.shared's 4 MiB, and the fan-out visits waiters in a set's order, not by
    Date, so each waiter evicted another's entry and rebuilt (and re-encoded) the whole answer."""
    body = b'{"result":"' + b"x" * (256 * 1024) + b'"}'
    builds = 0

    def build() -> Response:
        nonlocal builds
        builds += 1
        return Response(body, media_type="application/json")

    variants = [(f"Thu, 03 Dec 2026 22:00:{second:02d} GMT".encode(), keep_alive) for second in range(30) for keep_alive in (True, False)]
    waiters = variants * 20  # 1,200 waiters
    random.Random(7).shuffle(waiters)
    shared = SharedBytes()
    for date, keep_alive in waiters:
        cycle = FakeCycle(date, keep_alive)
        DirectWrite(cycle).answer(shared, ("answer", DAG, "r", 1, 9), build)
        assert cycle.transport.written.endswith(body) and b"date: " + date + b"\r\n" in cycle.transport.written
    assert shared.held <= shared.max_bytes + len(body) + 1024
    assert builds <= len(variants), f"{builds} builds of a 256 KiB answer for {len(waiters)} waiters"


# -- a served gateway -------------------------------------------------------------------------------------------


async def test_a_long_poll_pipelined_behind_a_direct_answer_is_answered_directly_in_order(target) -> None:
    """Two long-polls of two runs on one kept-alive connection, pipelined: the first answered from the
    fan-out, then the second (started by on_response) waits and is answered from the fan-out too."""
    first, second = "lp-review-pipe-1", "lp-review-pipe-2"
    target.publish(first, "running")
    target.publish(second, "running")
    wire = request(first, close=False) + request(second, close=True)
    reader = asyncio.create_task(raw_exchange(target.port, wire, bytearray()))
    await waiting(target, 1)
    target.publish_result(first)
    await until(lambda: metric(target.url, "runbell_long_poll_direct_answers_total") == 1, "the first answered directly")
    await waiting(target, 1)  # the pipelined second now waits
    target.publish_result(second)
    answers = responses(await reader)
    assert [head.split(b"\r\n", 1)[0] for head, _ in answers] == [b"HTTP/1.1 200 OK"] * 2
    assert first.encode() in answers[0][1] and second.encode() in answers[1][1]
    assert b"connection: close" not in answers[0][0] and b"connection: close" in answers[1][0]
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 2
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "both waiters' tasks ended")


@pytest.fixture
def logged(served_gateway, redis_url, namespace):
    """The served gateway, logging at info (its access log on), and its log file."""
    served = served_gateway(RUNBELL_LOG_LEVEL="info")
    logged = Target.of(served.process, served.port, redis_url, namespace)
    logged.url, logged.log = served.url, served.log  # type: ignore[attr-defined]
    yield logged
    logged.http.close()
    logged.redis.close()


async def test_head_http10_and_direct_answers_match_the_usual_heads_and_log_lines_redacted(logged) -> None:
    target = logged
    run_id = "lp-review-kinds"
    target.publish(run_id, "running")
    secret = "rb_" + "s3cr3t" * 6
    query = f"timeout=60&access_token={secret}"
    kinds = {
        "direct": request(run_id, query=query),
        "1.0": request(run_id, version="1.0", close=False, query=query),
        "head": request(run_id, query=query).replace(b"GET ", b"HEAD ", 1),
    }
    readers = {kind: asyncio.create_task(raw_exchange(target.port, wire, bytearray())) for kind, wire in kinds.items()}
    await waiting(target, len(kinds))
    target.publish_result(run_id)
    wires = {kind: await reader for kind, reader in readers.items()}
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "every waiter's task ended")
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 2  # not the HEAD
    usual = {kind: await raw_exchange(target.port, wire, bytearray()) for kind, wire in kinds.items()}  # decided: from the log
    for kind in ("direct", "1.0"):
        ((head, body),) = responses(wires[kind])
        ((usual_head, usual_body),) = responses(usual[kind])
        assert (undated(head), body) == (undated(usual_head), usual_body), kind
    head_wire, usual_head_wire = wires["head"], usual["head"]
    assert undated(head_wire.rstrip(b"\r\n")) == undated(usual_head_wire.rstrip(b"\r\n"))
    log = target.log.read_text()
    assert secret not in log
    assert log.count(f'"GET /v1/dags/{DAG}/runs/{run_id}/result?timeout=60&access_token=') == 4, log[-3000:]
    assert log.count(f'"HEAD /v1/dags/{DAG}/runs/{run_id}/result?timeout=60&access_token=') == 2


async def test_a_waiter_asked_after_an_input_request_gets_the_outcome_directly_then(target) -> None:
    """needs_input first (202 by the task), then asked again with ?after= of it: the later outcome
    goes straight from the fan-out, once."""
    run_id = "lp-review-after"
    target.publish(run_id, "running")
    ask = InputRequest(kind="approval", subject="Ship?", options=["Approve", "Reject"])
    published(target, task(run_id, "approve", "awaiting_input", try_number=1, input_request=ask))
    async with httpx.AsyncClient(base_url=target.url, timeout=60) as client:
        told = await client.get(f"/v1/dags/{DAG}/runs/{run_id}/result", params={"timeout": 30})
        assert told.status_code == 202 and told.json()["status"] == "needs_input"
        after = told.json()["after"]
        asking = asyncio.create_task(client.get(f"/v1/dags/{DAG}/runs/{run_id}/result", params={"timeout": 60, "after": after}))
        await waiting(target, 1)
        target.publish_result(run_id)
        answer = await asking
    assert answer.status_code == 200 and answer.json()["status"] == "success", answer.text
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 1


async def test_deadline_and_outcome_together_each_waiter_gets_exactly_one_answer_counted_once(target) -> None:
    """Waiters whose timeout ends about when the outcome comes: each gets one whole answer (200 or
    202, nothing after it), and an outcome is counted once per 200."""
    run_id = "lp-review-deadline"
    target.publish(run_id, "running")
    readers = [asyncio.create_task(raw_exchange(target.port, request(run_id, query="timeout=2"), bytearray())) for _ in range(30)]
    await until(lambda: metric(target.url, "runbell_waiters") == 30, "30 waiters")
    await asyncio.sleep(1.5)
    target.publish_result(run_id)
    statuses = []
    for wire in await asyncio.gather(*readers):
        ((head, body),) = responses(wire)  # exactly one response on each connection
        statuses.append(head.split(b"\r\n", 1)[0])
        assert (b'"status":"success"' in body) == (statuses[-1] == b"HTTP/1.1 200 OK"), (head, body)
    assert set(statuses) <= {b"HTTP/1.1 200 OK", b"HTTP/1.1 202 Accepted"}, statuses
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "every waiter's task ended")
    ok = statuses.count(b"HTTP/1.1 200 OK")
    assert metric(target.url, 'runbell_outcomes_total{status="success",via="long-poll"}') == ok
    assert metric(target.url, "runbell_long_poll_direct_answers_total") <= ok


async def test_sigterm_while_waiters_wait_answers_each_202_pending_once(served_gateway, redis_url, namespace) -> None:
    served = served_gateway()
    target = Target.of(served.process, served.port, redis_url, namespace)
    target.url = served.url  # type: ignore[attr-defined]
    run_id = "lp-review-drain"
    try:
        target.publish(run_id, "running")
        readers = [asyncio.create_task(raw_exchange(target.port, request(run_id, close=False), bytearray())) for _ in range(10)]
        await waiting(target, 10)
        stopping = asyncio.create_task(asyncio.to_thread(served.stop))
        for wire in await asyncio.gather(*readers):
            ((head, body),) = responses(wire)
            assert head.startswith(b"HTTP/1.1 202 Accepted") and b"\r\nretry-after: 1" in head and b'"pending"' in body, (head, body)
        assert await stopping in (0, -signal.SIGTERM)  # uvicorn re-raises it once shut down
    finally:
        target.http.close()
        target.redis.close()


def task(run_id: str, task_id: str, state: str, **fields: Any) -> Event:
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=run_id, task_id=task_id, state=state, **fields)


def published(target, event: Event) -> None:
    assert target.publisher.publish(event) is not None


async def test_a_run_airflow_does_not_have_is_still_404_and_a_timeout_still_202_once(target) -> None:
    missing = await raw_exchange(target.port, request("lp-review-nope-never-published", query="timeout=1"), bytearray())
    ((head, body),) = responses(missing)
    assert head.split(b"\r\n", 1)[0] in (b"HTTP/1.1 202 Accepted", b"HTTP/1.1 404 Not Found"), head
    async with httpx.AsyncClient(base_url=target.url, timeout=30) as client:
        answer = await client.get(f"/v1/dags/{DAG}/runs/lp-review-nope/result", params={"timeout": "abc"})
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json"


async def test_a_waiter_served_by_the_app_not_stream_routes_is_answered_once_and_a_pipelined_head_after(target) -> None:
    """A GET with a (chunked, empty) body is not matched ahead of the middleware (StreamRoutes leaves it
    to the app's BodyLimit): its waiter still has the connection's DirectWrite, is answered from the
    fan-out through the app's route, and a HEAD pipelined behind it is answered after it."""
    run_id = "lp-review-app-path"
    target.publish(run_id, "running")
    chunked = request(run_id, close=False).replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    head = request(run_id, close=True).replace(b"GET ", b"HEAD ", 1)
    reader = asyncio.create_task(raw_exchange(target.port, chunked + head, bytearray()))
    await waiting(target, 1)
    target.publish_result(run_id)
    wire = await reader
    first_head, rest = wire.split(b"\r\n\r\n", 1)
    assert first_head.startswith(b"HTTP/1.1 200 OK\r\n"), wire[:300]
    length = int(first_head.split(b"content-length: ")[1].split(b"\r\n")[0])
    body, second = rest[:length], rest[length:]
    assert b'"status":"success"' in body
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"\r\n\r\n"), second  # the HEAD: a head, no body
    assert int(second.split(b"content-length: ")[1].split(b"\r\n")[0]) == length
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "the waiter's task ended")
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 1
    assert metric(target.url, 'runbell_outcomes_total{status="success",via="long-poll"}') == 2


async def test_a_large_result_reaches_every_waiter_whole_from_the_fan_out(target) -> None:
    """A result near the bus's inline bound, to 100 waiters at once: each gets the whole answer (the
    transport buffers what its socket does not take), the same bytes, each written directly once."""
    run_id = "lp-review-large"
    target.publish(run_id, "running")
    readers = [asyncio.create_task(raw_exchange(target.port, request(run_id), bytearray())) for _ in range(100)]
    await waiting(target, 100)
    big = "y" * (200 * 1024)
    target.publish(run_id, "success", task_id="answer", result_task=True, result={"answer": big})
    bodies = set()
    for wire in await asyncio.gather(*readers):
        ((head, body),) = responses(wire)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and len(body) == int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.add(body)
    (body,) = bodies
    assert big.encode() in body
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "every waiter's task ended")
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 100
