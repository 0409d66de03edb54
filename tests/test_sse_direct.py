"""A caught-up SSE client gets each event written to its connection straight from the hub's fan-out
(runbell.service.http.server.DirectWrite), not by waking its task. Over a real uvicorn-served gateway:
every client gets every event once and in order, then the outcome and the end, whichever path each
frame took; a client that resumes mid-run goes the usual way until it has caught up. Unit tests hold the
rules: a gap, a connection that cannot take a write now, or a failing taker sends the item the usual
way (or cuts that one subscriber off), never the fan-out."""

from __future__ import annotations

import asyncio
import socket
import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from runbell.bus.schema import Position
from runbell.service.bench.delivery import DAG, Target
from runbell.service.core.metrics import Metrics
from runbell.service.http.server import DirectWrite
from runbell.service.live.hub import Hub, Signal, Topic
from tests.engines import wait_until
from tests.test_gateway import read_sse

CLIENTS, EVENTS = 30, 60


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def until(check, what: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def target(served_gateway, redis_url, namespace):
    served = served_gateway()
    target = Target.of(served.process, served.port, redis_url, namespace)
    target.url = served.url  # type: ignore[attr-defined]
    yield target
    target.http.close()
    target.redis.close()


async def test_every_client_gets_every_event_once_in_order_whichever_path_it_took(target) -> None:
    url, run_id = target.url, "direct-fanout"
    path = f"/v1/dags/{DAG}/runs/{run_id}/events"
    target.publish(run_id, "running")  # seq 1
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=120)) as client:
        seen: list[list] = [[] for _ in range(CLIENTS)]
        readers = [asyncio.create_task(read_sse(client, path, events=events)) for events in seen]
        # Every client has had seq 1 (its first read is over) and waits for news: caught up, so the
        # first frames published can take the direct path. (Publishing at once, on a loaded machine
        # every event could be in the log before any client's first read ended: no frame direct.)
        await until(lambda: all(any(e.event == "run" for e in events) for events in seen), "every client had seq 1")
        await asyncio.sleep(0.2)
        published = []

        def publish() -> None:  # from a thread, while the clients read: frames take either path
            for k in range(EVENTS):
                published.append(target.publish(run_id, "running", task_id=f"step{k}").seq)
            published.append(target.publish_result(run_id).seq)
            published.append(target.publish(run_id, "success").seq)  # the run's end

        publisher = threading.Thread(target=publish)
        publisher.start()
        # One more client resumes mid-run from an event it saw: replayed, then live.
        await until(lambda: len(published) >= EVENTS // 2, "half the events published")
        _, _, first_part = await read_sse(client, path, until_event="task")
        resumed = asyncio.create_task(read_sse(client, path, headers={"Last-Event-ID": first_part[-1].id}))
        await asyncio.to_thread(publisher.join)
        results = await asyncio.gather(*readers, resumed)
    expected = list(range(2, 2 + EVENTS + 2))
    assert published == expected
    for status, _, events in results[:-1]:
        assert status == 200
        ids = [int(e.id.rpartition("-")[2]) for e in events if e.event in ("task", "run")]
        assert ids == [1, *expected], "each event once, in order"
        names = [e.event for e in events if e.event in ("outcome", "end")]
        assert names == ["outcome", "end"] and events[-1].event == "end"
    status, _, events = results[-1]
    resumed_ids = [int(e.id.rpartition("-")[2]) for e in events if e.event in ("task", "run")]
    start = int(first_part[-1].id.rpartition("-")[2])
    assert resumed_ids == list(range(start + 1, expected[-1] + 1)) and events[-1].event == "end"
    direct = metric(url, "runbell_sse_direct_frames_total")
    assert 0 < direct <= (CLIENTS + 1) * len(expected), direct  # the direct path was taken, never twice per frame
    # Each client's outcome counted once, whichever path its frame took; the one that left after its
    # first task event is counted when its replay already held the result.
    assert CLIENTS + 1 <= metric(url, 'runbell_outcomes_total{status="success",via="sse"}') <= CLIENTS + 2


def cycle(**overrides: Any) -> SimpleNamespace:
    """A stand-in for uvicorn's httptools RequestResponseCycle: what DirectWrite reads and writes."""
    written: list[bytes] = []
    transport = SimpleNamespace(write=written.append, is_closing=lambda: overrides.pop("closing", False))
    fields = dict(response_started=True, chunked_encoding=True, response_complete=False, disconnected=False)
    fields.update({k: v for k, v in overrides.items() if k in fields})
    flow = SimpleNamespace(write_paused=overrides.get("paused", False))
    return SimpleNamespace(**fields, flow=flow, transport=transport, written=written)


def test_a_direct_write_is_framed_as_uvicorns_send_and_only_when_the_connection_takes_it() -> None:
    ready = cycle()
    writer = DirectWrite(ready)
    assert writer.ready()
    writer.write(b"id: 1-2\r\nevent: task\r\ndata: {}\r\n\r\n")
    assert ready.written == [b"22\r\nid: 1-2\r\nevent: task\r\ndata: {}\r\n\r\n\r\n"]
    for not_now in (
        dict(response_started=False),
        dict(chunked_encoding=False),
        dict(response_complete=True),
        dict(disconnected=True),
        dict(paused=True),  # flow control: the client's socket buffer is full
        dict(closing=True),
    ):
        assert not DirectWrite(cycle(**not_now)).ready(), not_now


class Items(Topic[str, Any]):
    def route(self, key: str) -> str:
        return f"items:{key}"

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError

    def route_of(self, item: Any) -> str:
        return "items:k"

    async def read(self, key: str, after: Position) -> list[Any]:
        return []


def item(seq: int) -> SimpleNamespace:
    return SimpleNamespace(position=Position("e1", seq), event=SimpleNamespace(ts=0.0))


async def test_a_subscriber_takes_directly_only_the_next_item_while_it_waits() -> None:
    hub = Hub(None, Metrics())  # type: ignore[arg-type]  # no Redis: items are offered by hand
    topic = Items(hub, "items", [])
    taken: list[int] = []
    async with hub.subscribe(topic, "k") as sub:
        sub.direct = lambda it: taken.append(it.position.seq) is None
        assert await sub.backlog() == []
        sub.offer(item(1))  # nobody waits yet: queued
        assert taken == [] and len(sub.queue) == 1
        assert (await sub.__anext__()).position.seq == 1
        waiting = asyncio.ensure_future(sub.__anext__())
        await asyncio.sleep(0)  # it waits for the next item now
        sub.offer(item(2))
        sub.offer(item(3))
        assert taken == [2, 3] and not sub.queue and sub.last == Position("e1", 3)
        sub.offer(item(5))  # a gap: the usual way, which reads the log first
        assert taken == [2, 3] and len(sub.queue) == 1
        assert (await waiting).position.seq == 5
        waiting = asyncio.ensure_future(sub.__anext__())
        await asyncio.sleep(0)
        sub.direct = lambda it: False  # cannot take it now (say, the socket's buffer is full)
        sub.offer(item(6))
        assert (await waiting).position.seq == 6
        waiting = asyncio.ensure_future(sub.__anext__())
        await asyncio.sleep(0)

        def broken(it: Any) -> bool:
            raise RuntimeError("a bug in one taker")

        sub.direct = broken
        sub.offer(item(7))  # cuts this subscriber off, and nothing else
        with pytest.raises(Exception) as closed:
            await waiting
        assert getattr(closed.value, "reason", None) is Signal.OVERFLOW


# -- over a raw connection: the bytes on the wire, chunk by chunk ------------------------------------


async def raw_exchange(port: int, request: bytes, seen: bytearray) -> bytes:
    """Send `request` (one or more requests, pipelined) and read until the server closes the connection
    (or, a keep-alive one, goes quiet after it has answered); what came so far is in `seen`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 15)
            except TimeoutError:
                break
            if not data:
                break
            seen += data
    finally:
        writer.close()
    return bytes(seen)


def has_seq(seen: bytearray, seq: int) -> bool:
    return f"-{seq}\r\n".encode() in seen or f"-{seq}\n".encode() in seen


def unchunked(wire: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what follows the response): the body's chunk framing checked strictly."""
    head, _, rest = wire.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        assert sep, "a chunk cut short"
        size = int(size_line, 16)
        chunk, crlf, rest = rest[:size], rest[size : size + 2], rest[size + 2 :]
        assert len(chunk) == size and crlf == b"\r\n", "a chunk's framing is broken"
        if size == 0:
            return head, body, rest
        body += chunk


def sse_events(body: bytes) -> list[tuple[str, str | None]]:
    """(event, id) of each frame of an SSE body (comments left out)."""
    found = []
    for frame in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        fields = dict(line.split(b": ", 1) for line in frame.split(b"\n") if line and not line.startswith(b":") and b": " in line)
        if b"event" in fields or b"data" in fields:
            event_id = fields.get(b"id")
            found.append((fields.get(b"event", b"message").decode(), event_id.decode() if event_id else None))
    return found


def seqs_of(events: list[tuple[str, str | None]]) -> list[int]:
    return [int(i.rpartition("-")[2]) for e, i in events if e in ("task", "run") and i]


async def publish_while_reading(target, run_id: str, seen: bytearray, events: int) -> list[int]:
    """The first half paced (each published once the client has the one before: it is caught up, so
    frames go straight from the fan-out), the second half in a burst (frames take either path)."""

    def publish() -> list[int]:
        wait_until(lambda: has_seq(seen, 1), "the stream's first event")
        seqs = []
        for k in range(events):
            seqs.append(target.publish(run_id, "running", task_id=f"step{k}").seq)
            if k < events // 2:
                wait_until(lambda: has_seq(seen, seqs[-1]), f"event {seqs[-1]} read")
        seqs.append(target.publish(run_id, "success").seq)
        return seqs

    return await asyncio.to_thread(publish)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_request_pipelined_behind_a_stream_is_answered_after_its_intact_end(target, version: str) -> None:
    run_id = f"direct-pipelined-{version}"
    target.publish(run_id, "running")  # seq 1
    request = f"GET /v1/dags/{DAG}/runs/{run_id}/events HTTP/{version}\r\nHost: t\r\n\r\n".encode()
    if version == "1.1":
        request += b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    seen = bytearray()
    reading = asyncio.create_task(raw_exchange(target.port, request, seen))
    published = await publish_while_reading(target, run_id, seen, EVENTS)
    head, body, after = unchunked(await reading)
    assert head.startswith(b"HTTP/1.1 200"), head
    events = sse_events(body)
    assert seqs_of(events) == [1, *published], "each event once, in order, the frames intact"
    assert events[-1][0] == "end"
    if version == "1.1":
        assert after.startswith(b"HTTP/1.1 200"), after[:200]  # the pipelined request, answered after
    else:
        assert after == b""
    assert metric(target.url, "runbell_sse_direct_frames_total") >= EVENTS // 2 - 1  # the paced ones at least


async def test_sigterm_while_frames_go_directly_ends_each_stream_with_the_farewell_after_every_frame(
    served_gateway, redis_url, namespace
) -> None:
    served = served_gateway()
    target = Target.of(served.process, served.port, redis_url, namespace)
    try:
        run_id = "direct-sigterm"
        target.publish(run_id, "running")
        request = f"GET /v1/dags/{DAG}/runs/{run_id}/events HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        seen = [bytearray() for _ in range(5)]
        readers = [asyncio.create_task(raw_exchange(served.port, request, s)) for s in seen]
        await asyncio.to_thread(wait_until, lambda: all(has_seq(s, 1) for s in seen), "every stream's first event")
        stop = threading.Event()

        def publish() -> int:
            k = 0
            while not stop.is_set() and k < 5000:
                try:
                    target.publish(run_id, "running", task_id=f"step{k}")
                except Exception:
                    break
                k += 1
            return k

        publishing = asyncio.create_task(asyncio.to_thread(publish))
        await asyncio.sleep(0.5)  # events flow, most of them straight from the fan-out
        await asyncio.to_thread(served.stop)
        stop.set()
        await publishing
        for wire in await asyncio.gather(*readers):
            _, body, _ = unchunked(wire)
            events = sse_events(body)
            seqs = seqs_of(events)
            assert seqs == list(range(1, len(seqs) + 1)), "each event once, in order, none lost before the farewell"
            assert events[-1][0] == "shutdown", events[-3:]
    finally:
        target.http.close()
        target.redis.close()


async def test_a_client_that_stops_reading_falls_back_to_the_usual_send_and_is_cut_off_by_the_send_timeout(
    served_gateway, redis_url, namespace
) -> None:
    served = served_gateway(RUNBELL_SEND_TIMEOUT="1")
    target = Target.of(served.process, served.port, redis_url, namespace)
    try:
        run_id, blob = "direct-stops-reading", "x" * 16_000
        target.publish(run_id, "running")
        path = f"/v1/dags/{DAG}/runs/{run_id}/events"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its window fills at once
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        wait_until(lambda: b": runbell" in sock.recv(65536), "the stuck client's stream started")  # then it reads no more
        async with httpx.AsyncClient(base_url=served.url, timeout=httpx.Timeout(10, read=120)) as client:
            reader = asyncio.create_task(read_sse(client, path))
            await until(lambda: metric(served.url, "runbell_sse_clients") == 2, "both clients connected")

            def publish() -> list[int]:
                seqs = [target.publish(run_id, "success", task_id=f"t{n}", result={"blob": blob}).seq for n in range(200)]
                return [*seqs, target.publish(run_id, "success").seq]

            published = await asyncio.to_thread(publish)
            status, _, events = await reader
        assert status == 200 and [int(e.id.rpartition("-")[2]) for e in events if e.event in ("task", "run")] == [1, *published]
        await until(lambda: metric(served.url, "runbell_sse_send_timeouts_total") == 1, "the stuck client cut off by the send timeout")
        await until(lambda: metric(served.url, "runbell_sse_clients") == 0, "its stream ended")
        assert metric(served.url, "runbell_subscriber_overflows_total") == 0
        sock.close()
    finally:
        target.http.close()
        target.redis.close()


async def test_a_caught_up_client_gets_every_event_once_across_a_lost_pubsub_connection(target) -> None:
    """Frames written straight from the fan-out, then the listener's connection killed (RESYNC: the
    stream re-reads its log from its last position), then more: none lost, none twice."""
    run_id = "direct-resync"
    target.publish(run_id, "running")
    seen = bytearray()
    request = f"GET /v1/dags/{DAG}/runs/{run_id}/events HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    reading = asyncio.create_task(raw_exchange(target.port, request, seen))
    resubscribed = metric(target.url, "runbell_resubscribes_total")

    def publish() -> list[int]:
        wait_until(lambda: has_seq(seen, 1), "the stream's first event")
        seqs = []
        for k in range(30):
            seqs.append(target.publish(run_id, "running", task_id=f"step{k}").seq)
            if k < 10:  # caught up: straight from the fan-out
                wait_until(lambda: has_seq(seen, seqs[-1]), f"event {seqs[-1]} read")
            if k == 10:
                target.redis.client_kill_filter(_type="pubsub")  # the next ones while the listener comes back
        wait_until(lambda: metric(target.url, "runbell_resubscribes_total") > resubscribed, "the hub subscribed again")
        seqs.append(target.publish(run_id, "running", task_id="after").seq)
        return [*seqs, target.publish(run_id, "success").seq]

    published = await asyncio.to_thread(publish)
    _, body, _ = unchunked(await reading)
    events = sse_events(body)
    assert seqs_of(events) == [1, *published] and events[-1][0] == "end"
    assert metric(target.url, "runbell_sse_direct_frames_total") >= 10


async def test_a_head_then_a_stream_on_one_kept_alive_connection(target) -> None:
    """HEAD gets the headers only; the stream after it on the same connection is written straight
    from the fan-out with its own framing, and ends whole."""
    run_id = "direct-head"
    target.publish(run_id, "running")
    path = f"/v1/dags/{DAG}/runs/{run_id}/events"
    seen = bytearray()
    request = f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\nGET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    reading = asyncio.create_task(raw_exchange(target.port, request, seen))
    published = await publish_while_reading(target, run_id, seen, 20)
    wire = await reading
    head, _, rest = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200"), wire[:300]
    _, body, after = unchunked(rest)
    events = sse_events(body)
    assert seqs_of(events) == [1, *published] and events[-1][0] == "end" and after == b""
    assert metric(target.url, "runbell_sse_direct_frames_total") >= 10
