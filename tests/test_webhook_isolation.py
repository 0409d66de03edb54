"""One bad webhook receiver never slows the others: per-endpoint shares of the dispatcher's slots,
circuit breakers, connect/read timeouts and a deadline per attempt, and a capped read of the answer.
Real receivers (uvicorn on loopback ports) and real PostgreSQL / SQLite."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runbell.service.webhooks.breaker import BreakerState
from runbell.service.webhooks.outbox import WebhookStore
from tests.test_webhook_delivery import dispatchers, drive, receiver, serving, until, webhooks  # noqa: F401  (fixtures)
from tests.test_webhook_store import a_run

HANGING, RUNS = 50, 8
READ_TIMEOUT = 30.0  # what a hanging receiver costs an attempt (its deadline is longer still)
HEALTHY_WITHIN = 10.0  # the healthy receiver's deliveries all arrive well before any hang could end


class HangingReceivers:
    """/hang/N holds every request until ``release`` is set (then answers 200); /ok answers at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hits: list[tuple[str, str]] = []  # (path, webhook-id)
        self.hanging_now = 0
        self.url = ""

    async def handle(self, request: Request) -> Response:
        await request.body()
        self.hits.append((request.url.path, request.headers["webhook-id"]))
        if request.url.path.startswith("/hang/"):
            self.hanging_now += 1
            try:
                await self.release.wait()
            finally:
                self.hanging_now -= 1
        return Response(b"ok")

    def ids_at(self, path: str) -> list[str]:
        return [webhook_id for hit_path, webhook_id in self.hits if hit_path == path]


@pytest.fixture
async def hanging_receivers():
    receivers = HangingReceivers()
    app = Starlette(routes=[Route("/{path:path}", receivers.handle, methods=["POST"])])
    async with serving(app) as url:
        receivers.url = url
        yield receivers
        receivers.release.set()  # let the held requests end before the server stops


async def test_fifty_hanging_receivers_never_delay_a_healthy_one_and_lose_nothing(webhooks, store, dispatchers, hanging_receivers):
    receivers = hanging_receivers
    dispatcher = dispatchers(
        webhooks,
        run=True,
        attempt_timeout=2 * READ_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        lease_seconds=4 * READ_TIMEOUT,
        max_in_flight=64,  # the old shared pool: 17 receivers hanging with 4 slots each filled it
        per_endpoint=4,
        schedule=(0, 3600),
    )
    store.outbox.on_enqueued = dispatcher.wake
    hanging = [await webhooks.create_endpoint(url=f"{receivers.url}/hang/{n}", dag_ids=["etl"]) for n in range(HANGING)]
    healthy = await webhooks.create_endpoint(url=f"{receivers.url}/ok", dag_ids=["etl"])
    for i in range(RUNS):  # each run's outcome: one message for each of the 51 endpoints
        await store.record(a_run(run_id=f"r{i}"))

    # Every delivery to the healthy receiver arrives while every hanging one still hangs: a bound far
    # above a loopback delivery and far below the read timeout a hanging attempt waits for.
    await until(lambda: len(set(receivers.ids_at("/ok"))) == RUNS, timeout=HEALTHY_WITHIN)
    assert all([await webhooks.attempts(endpoint_id=e.id) == [] for e in hanging])  # no hanging attempt has ended
    assert receivers.hanging_now == HANGING  # one slot each, however much waits for them
    assert Counter(m.status for m in await webhooks.messages(healthy.id)) == {"delivered": RUNS}

    receivers.release.set()  # they answer now: everything queued for them goes out, each once

    async def all_delivered() -> bool:
        statuses = [m.status for e in [*hanging, healthy] for m in await webhooks.messages(e.id)]
        return len(statuses) == (HANGING + 1) * RUNS and set(statuses) == {"delivered"}

    await until(all_delivered, timeout=2 * READ_TIMEOUT)
    assert set(Counter(webhook_id for _, webhook_id in receivers.hits).values()) == {1}
    assert len(receivers.hits) == (HANGING + 1) * RUNS
    assert dispatcher.metrics.webhook_deliveries.labels("timeout")._value.get() == 0


async def test_failures_in_a_row_open_the_breaker_its_messages_wait_unclaimed_and_a_probe_closes_it(
    webhooks: WebhookStore, store, dispatchers, receiver
):
    dispatcher = dispatchers(
        webhooks, per_endpoint=4, breaker_failures=3, breaker_open_seconds=30, breaker_max_open_seconds=120, schedule=(0, 3600)
    )
    now = [1000.0]
    dispatcher.breakers.clock = lambda: now[0]
    endpoint = await webhooks.create_endpoint(url=receiver.on("/down", default=(503, {}, b"down")), kinds=["task", "run"])
    await store.record(a_run())  # 7 messages
    for _ in range(3):  # one at a time: the endpoint has not answered yet
        assert await dispatcher.step() == 1
        await dispatcher.idle()
    assert dispatcher.breakers.state(endpoint.id) is BreakerState.OPEN
    assert dispatcher.metrics.webhook_breaker_opened._value.get() == 1
    assert dispatcher.metrics.registry.get_sample_value("runbell_webhook_breakers_open") == 1
    assert await dispatcher.step() == 0  # 4 messages are due, none is claimed while the breaker is open
    waiting = [m for m in await webhooks.messages(endpoint.id) if m.attempts == 0]
    assert len(waiting) == 4 and {m.status for m in waiting} == {"pending"}  # kept, their attempts not used up

    now[0] += 31  # past the open time: half-open, one probe, which fails and opens it again for longer
    assert await dispatcher.step() == 1
    await dispatcher.idle()
    assert dispatcher.breakers.state(endpoint.id) is BreakerState.OPEN and await dispatcher.step() == 0
    now[0] += 31
    assert await dispatcher.step() == 0  # doubled (±20%): not yet
    assert dispatcher.metrics.webhook_breaker_opened._value.get() == 1  # one outage, one opening

    receiver.default["/down"] = (200, {}, b"")
    now[0] += 100
    assert await dispatcher.step() == 1  # the probe
    await dispatcher.idle()
    assert dispatcher.breakers.state(endpoint.id) is BreakerState.CLOSED
    assert dispatcher.metrics.registry.get_sample_value("runbell_webhook_breakers_open") == 0
    assert await dispatcher.step() == 2  # closed: its full share (the other failed ones wait for their retry)
    await dispatcher.idle()
    statuses = Counter(m.status for m in await webhooks.messages(endpoint.id))
    assert statuses == {"delivered": 3, "pending": 4}  # the 4 that failed retry on their schedule: nothing lost


def test_what_an_attempt_says_about_its_receiver() -> None:
    from runbell.service.webhooks.breaker import healthy

    assert healthy(200, "success") and healthy(404, "failure") and healthy(410, "gone")
    assert not healthy(503, "failure") and not healthy(429, "failure") and not healthy(408, "failure")
    assert healthy(None, "timeout") is False and healthy(None, "error") is False
    assert healthy(None, "refused") is None


async def test_a_receiver_silent_after_connecting_is_cut_by_the_read_timeout(webhooks, store, dispatchers, receiver):
    dispatcher = dispatchers(webhooks, read_timeout=0.5, connect_timeout=2, attempt_timeout=30, lease_seconds=70, schedule=(0, 3600))
    assert (dispatcher.client().timeout.connect, dispatcher.client().timeout.read) == (2, 0.5)
    endpoint = await webhooks.create_endpoint(url=receiver.on("/silent", ("hang", {}, 60)), dag_ids=["etl"])
    await store.record(a_run())
    await drive(dispatcher, lambda: webhooks.attempts(endpoint_id=endpoint.id))
    [attempt] = await webhooks.attempts(endpoint_id=endpoint.id)
    assert attempt.status_code is None and attempt.error == "read timeout (0.5 s)"


@pytest.fixture
async def endless_receiver():
    """A raw HTTP/1.1 server. /trickle answers a byte every 50 ms for ever; /huge a 100 MiB answer,
    written as the socket takes it. ``sent`` counts the bytes the socket took from each."""
    sent: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            path = "trickle" if b" /trickle " in head.split(b"\r\n")[0] else "huge"
            if path == "trickle":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                while True:
                    writer.write(b"1\r\nx\r\n")
                    await writer.drain()
                    sent[path] += 1
                    await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % (100 * 2**20))
            chunk = b"x" * 65536
            for _ in range(100 * 16):
                writer.write(chunk)
                await writer.drain()  # waits while the peer does not read: what it read is what went out
                sent[path] += len(chunk)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the dispatcher hung up: what it wanted, it had
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", sent
    finally:
        server.close()


async def test_a_receiver_trickling_its_answer_is_cut_by_the_attempts_deadline(webhooks, store, dispatchers, endless_receiver):
    url, sent = endless_receiver
    dispatcher = dispatchers(webhooks, read_timeout=10, attempt_timeout=1, lease_seconds=20, schedule=(0, 3600))
    endpoint = await webhooks.create_endpoint(url=f"{url}/trickle", dag_ids=["etl"])
    await store.record(a_run())
    await drive(dispatcher, lambda: webhooks.attempts(endpoint_id=endpoint.id))
    [attempt] = await webhooks.attempts(endpoint_id=endpoint.id)
    assert attempt.status_code is None and attempt.error == "no answer within 1 s"
    assert sent["trickle"] > 0  # it was answering, a byte at a time, within the read timeout


async def test_a_100_mib_answer_is_read_no_further_than_the_4_kib_kept(webhooks, store, dispatchers, endless_receiver):
    url, sent = endless_receiver
    dispatcher = dispatchers(webhooks, schedule=(0, 3600))
    endpoint = await webhooks.create_endpoint(url=f"{url}/huge", dag_ids=["etl"])
    await store.record(a_run())
    await drive(dispatcher, lambda: webhooks.attempts(endpoint_id=endpoint.id))
    [attempt] = await webhooks.attempts(endpoint_id=endpoint.id)
    assert attempt.status_code == 200 and attempt.response_body == "x" * 4096
    await asyncio.sleep(0.5)  # the receiver writes until the closed connection stops it
    # What the receiver could hand over before the dispatcher closed the connection: socket buffers'
    # worth (a few MiB on loopback), nowhere near the 100 MiB a full read would have taken in.
    assert sent["huge"] < 32 * 2**20


def test_breakers_remember_a_bounded_number_of_endpoints_healthy_ones_forgotten_first(monkeypatch) -> None:
    from runbell.service.webhooks import breaker as breaker_module
    from runbell.service.webhooks.breaker import Breakers

    monkeypatch.setattr(breaker_module, "MAX_TRACKED", 3)
    breakers = Breakers(per_endpoint=4, failures=1)
    breakers.record("failing", False)
    for n in range(5):
        breakers.record(f"ok{n}", True)
    assert breakers.state("failing") is BreakerState.OPEN and breakers.limit("failing") == 0  # kept
    assert [breakers.limit(f"ok{n}") for n in range(5)] == [1, 1, 1, 4, 4]  # the oldest healthy: slow start again
    for n in range(5):
        breakers.record(f"down{n}", False)
    assert breakers.limit("failing") == 1  # forgotten in the end too: bounded whatever the states
    assert len(breakers._breakers) == 3
