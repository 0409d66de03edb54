"""A caught-up long-poll waiter gets the run's events folded by the hub's fan-out, and the outcome they
decide written to its connection from there (runbell.service.http.server.DirectWrite.answer), its bytes
built once per outcome and shared by the run's waiters. Over a real uvicorn-served gateway: every
waiter gets the one answer once, byte for byte what the usual path answers; a waiter whose client left
is not written to; a request pipelined behind a waiter is answered after it. Unit tests hold the bytes
against uvicorn's own send, and when a connection may not be answered directly."""

from __future__ import annotations

import asyncio
import logging
import re
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from runbell.bus.schema import Event, EventKind, InputRequest, Result, ResultRef
from runbell.service.bench.delivery import DAG
from runbell.service.http.server import DirectWrite
from runbell.service.live.hub import SharedBytes
from tests.test_sse_direct import metric, raw_exchange, target, until  # noqa: F401  # target: the served gateway, a fixture

WAITERS = 40
DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")


def request(run_id: str, version: str = "1.1", close: bool = True, query: str = "timeout=60") -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET /v1/dags/{DAG}/runs/{run_id}/result?{query} HTTP/{version}\r\nHost: t\r\n{connection}\r\n".encode()


def responses(wire: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each response on the wire, each body cut by its Content-Length, strictly."""
    found = []
    while wire:
        head, sep, rest = wire.partition(b"\r\n\r\n")
        assert sep, f"a head cut short: {wire[:200]!r}"
        length = int(re.search(rb"\r\ncontent-length: (\d+)\r\n", head + b"\r\n").group(1))  # type: ignore[union-attr]
        found.append((head, rest[:length]))
        wire = rest[length:]
    return found


def undated(head: bytes) -> bytes:
    """The head without its Date (the second the request came in: two requests may straddle one)."""
    return DATE.sub(b"\r\ndate: *\r\n", head + b"\r\n")


async def waiting(target, count: int) -> None:
    """Until `count` waiters are subscribed, and a little more: each has read the run's log and waits
    for news (caught up), so the outcome can go straight from the fan-out."""
    await until(lambda: metric(target.url, "runbell_waiters") == count, f"{count} waiters")
    await asyncio.sleep(0.5)


async def test_every_waiter_of_a_run_gets_the_same_answer_once_byte_for_byte_the_usual_one(target) -> None:
    run_id = "lp-direct-crowd"
    target.publish(run_id, "running")
    # Most close after their answer; some keep the connection with a request pipelined behind the
    # wait (answered after it, on the same connection); one speaks HTTP/1.0 (not kept alive).
    kinds = [("close", request(run_id))] * (WAITERS - 6)
    kinds += [("pipelined", request(run_id, close=False) + b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")] * 5
    kinds += [("1.0", request(run_id, version="1.0", close=False))]
    readers = [asyncio.create_task(raw_exchange(target.port, wire, bytearray())) for _, wire in kinds]
    await waiting(target, len(kinds))
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 0
    target.publish_result(run_id)
    wires = await asyncio.gather(*readers)
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "every waiter's task ended")
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == len(kinds)  # once each, none the usual way
    # The same answer the usual way: the run is decided, the waiter's task answers from the log.
    ((usual_head, usual_body),) = responses(await raw_exchange(target.port, request(run_id), bytearray()))
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == len(kinds)
    assert usual_head.startswith(b"HTTP/1.1 200 OK\r\n") and b'"status":"success"' in usual_body
    for (kind, _), wire in zip(kinds, wires):
        answers = responses(wire)
        head, body = answers[0]
        assert body == usual_body, kind
        if kind == "close":
            assert len(answers) == 1 and undated(head) == undated(usual_head)
        elif kind == "pipelined":  # kept alive: no Connection header, then the request behind it
            assert len(answers) == 2 and undated(head) == undated(usual_head).replace(b"connection: close\r\n", b"")
            assert answers[1][0].startswith(b"HTTP/1.1 200 OK\r\n") and b'"status":"ok"' in answers[1][1], answers[1]
        else:
            assert len(answers) == 1 and undated(head) == undated(usual_head), head


async def test_a_waiter_whose_client_left_is_not_written_to_and_the_others_are_answered(target) -> None:
    run_id = "lp-direct-left"
    target.publish(run_id, "running")
    staying = [asyncio.create_task(raw_exchange(target.port, request(run_id), bytearray())) for _ in range(5)]
    leaving = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        writer.write(request(run_id))
        leaving.append(writer)
    await waiting(target, 8)
    for writer in leaving:  # gone before the outcome; their waiters still wait (a long-poll reads no more)
        writer.close()
    await asyncio.sleep(0.5)  # uvicorn has seen them go
    target.publish_result(run_id)
    for wire in await asyncio.gather(*staying):
        ((head, body),) = responses(wire)
        assert head.startswith(b"HTTP/1.1 200 OK") and b'"status":"success"' in body
    await until(lambda: metric(target.url, "runbell_waiters") == 0, "every waiter's task ended, the left ones too")
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 5  # the ones still there, only


async def test_what_is_not_the_shared_outcome_is_answered_by_the_waiters_task(target) -> None:
    """A pending answer at the timeout, and a decided run asked with resolve=true whose result is a
    reference (read from Airflow): each its usual answer, none written from the fan-out."""
    run_id = "lp-direct-usual"
    target.publish(run_id, "running")
    pending = asyncio.create_task(raw_exchange(target.port, request(run_id, query="timeout=1"), bytearray()))
    ((head, body),) = responses(await pending)
    assert head.startswith(b"HTTP/1.1 202 Accepted") and b"\r\nretry-after: 1" in head and b'"status":"pending"' in body
    resolving = asyncio.create_task(raw_exchange(target.port, request(run_id, query="timeout=60&resolve=true"), bytearray()))
    await waiting(target, 1)
    ref = ResultRef(dag_id=DAG, run_id=run_id, task_id="answer")
    published(target, task(run_id, "answer", "success", result_task=True, try_number=1, result=Result(ref=ref, size=10**6)))
    ((head, body),) = responses(await resolving)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"result_error" in body  # no Airflow here: said in the answer
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 0


async def test_a_waiter_asked_after_an_input_request_is_answered_202_by_its_task(target) -> None:
    run_id = "lp-direct-input"
    target.publish(run_id, "running")
    asking = asyncio.create_task(raw_exchange(target.port, request(run_id), bytearray()))
    await waiting(target, 1)
    ask = InputRequest(kind="approval", subject="Ship?", options=["Approve", "Reject"])
    published(target, task(run_id, "approve", "awaiting_input", try_number=1, input_request=ask))
    ((head, body),) = responses(await asking)
    assert head.startswith(b"HTTP/1.1 202 Accepted") and b'"needs_input"' in body, (head, body)
    assert metric(target.url, "runbell_long_poll_direct_answers_total") == 0


def task(run_id: str, task_id: str, state: str, **fields: Any) -> Event:
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=run_id, task_id=task_id, state=state, **fields)


def published(target, event: Event) -> None:
    assert target.publisher.publish(event) is not None


# -- DirectWrite.answer against uvicorn's own send ------------------------------------------------------


class Transport:
    def __init__(self, closing: bool = False):
        self.written: list[bytes] = []
        self.closed, self.closing = False, closing

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing or self.closed

    def close(self) -> None:
        self.closed = True


def uvicorn_cycle(keep_alive: bool, transport: Transport, completed: list[str], method: str = "GET") -> RequestResponseCycle:
    """uvicorn's own httptools cycle over a recording transport."""
    scope: Any = {
        "type": "http",
        "method": method,
        "path": "/r",
        "raw_path": b"/r",
        "query_string": b"t=1",
        "http_version": "1.1",
        "client": ("127.0.0.1", 5),
    }
    flow = SimpleNamespace(write_paused=False)
    dated = [(b"date", b"Thu, 03 Dec 2026 22:00:00 GMT"), (b"server", b"x")]
    logger = logging.getLogger("test.access")
    return RequestResponseCycle(
        scope,
        transport,
        flow,
        logger,
        logger,
        True,
        dated,
        asyncio.Event(),
        False,
        keep_alive,
        lambda: completed.append("done"),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("keep_alive", [True, False])
async def test_a_direct_answer_is_the_bytes_and_the_state_uvicorns_send_leaves(keep_alive: bool, caplog) -> None:
    caplog.set_level(logging.INFO, "test.access")

    def build() -> Response:
        return JSONResponse({"status": "success", "result": {"answer": 42}})

    theirs, their_done = Transport(), []
    cycle = uvicorn_cycle(keep_alive, theirs, their_done)
    response = build()
    await response({"type": "http"}, None, cycle.send)  # type: ignore[arg-type]
    ours, our_done = Transport(), []
    direct_cycle = uvicorn_cycle(keep_alive, ours, our_done)
    direct, shared = DirectWrite(direct_cycle), SharedBytes()
    assert direct.can_answer() and not direct.answered
    direct.answer(shared, "k", build)
    assert direct.answered and not direct.can_answer()  # never twice
    assert ours.written == [b"".join(theirs.written)]  # one write, the same bytes
    assert [r.getMessage() for r in caplog.records] == ['127.0.0.1:5 - "GET /r?t=1 HTTP/1.1" 200'] * 2  # the same access log line
    assert (ours.closed, theirs.closed) == (not keep_alive, not keep_alive)
    for name in ("response_started", "response_complete", "chunked_encoding", "expected_content_length"):
        assert getattr(direct_cycle, name) == getattr(cycle, name), name
    assert direct_cycle.message_event.is_set()
    await asyncio.sleep(0)  # what follows a response runs after the fan-out
    assert our_done == their_done == ["done"]
    again = uvicorn_cycle(keep_alive, Transport(), [])
    DirectWrite(again).answer(shared, "k", lambda: pytest.fail("built once per key"))  # type: ignore[arg-type, return-value]
    assert again.transport.written == ours.written  # type: ignore[attr-defined]


async def test_a_connection_is_answered_directly_only_when_it_takes_a_whole_response_now() -> None:
    def ready(**change: Any) -> bool:
        cycle = uvicorn_cycle(True, Transport(closing=change.pop("closing", False)), [], method=change.pop("method", "GET"))
        for name, value in change.items():
            if name == "paused":
                cycle.flow.write_paused = value  # type: ignore[attr-defined]
            else:
                setattr(cycle, name, value)
        return DirectWrite(cycle).can_answer()

    assert ready()
    for not_now in (
        dict(response_started=True),  # something was sent already
        dict(disconnected=True),  # the client left
        dict(paused=True),  # flow control: its socket buffer is full
        dict(closing=True),
        dict(method="HEAD"),  # its answer has no body
    ):
        assert not ready(**not_now), not_now
