"""The webhook dispatcher against a real receiver (a Starlette app served by uvicorn on a loopback
port, verifying with the reference `standardwebhooks` library) and real PostgreSQL / SQLite:
signed deliveries, retries, Retry-After, 410, redirects, hanging receivers, dead letters,
continuous-failure disabling, leases that outlive their worker, two dispatchers on one database,
rotation, and the gateway's own dispatcher across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Union

import pytest
import uvicorn
from sqlalchemy import update
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runbell.service.core.redaction import url_label
from runbell.service.store.store import Store
from runbell.service.webhooks.dispatcher import Dispatcher, parse_retry_after
from runbell.service.webhooks.outbox import (
    ENDPOINTS,
    MessageStatus,
    WebhookOutbox,
    WebhookStore,
)
from runbell.service.webhooks.signing import new_secret
from runbell.service.webhooks.target_guard import TargetPolicy
from tests.conftest import free_port
from tests.test_webhook_store import a_run

WAIT = 20.0  # upper bound for anything that should happen promptly; never reached when it works
LOOPBACK = TargetPolicy(["127.0.0.1"])  # tests permit loopback explicitly
TINY = (0, 0.05, 0.05)  # a schedule of three attempts, retried at once


# -- the receiver -----------------------------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    def verify(self, secret: str) -> Any:
        return Webhook(secret).verify(self.body, self.headers)


Answer = Union[tuple, Callable[["Hit"], tuple]]


class Receiver:
    """Records every POST; answers each path from its script (then its default, else 200).
    An answer is (status, headers, body); status "hang" sleeps body seconds first."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.script: dict[str, list[Answer]] = defaultdict(list)
        self.default: dict[str, Answer] = {}
        self.url = ""

    def at(self, path: str) -> str:
        return f"{self.url}{path}"

    def on(self, path: str, *answers: Answer, default: Answer | None = None) -> str:
        self.script[path].extend(answers)
        if default is not None:
            self.default[path] = default
        return self.at(path)

    def hits_at(self, path: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path == path]

    async def handle(self, request: Request) -> Response:
        hit = Hit(request.url.path, dict(request.headers), await request.body())
        self.hits.append(hit)
        queued = self.script[hit.path]
        answer = queued.pop(0) if queued else self.default.get(hit.path, (200, {}, b"thanks"))
        if callable(answer):
            answer = answer(hit)
        status, headers, body = answer
        if status == "hang":
            await asyncio.sleep(body)
            status, body = 200, b"late"
        return Response(body, status_code=status, headers=headers)


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port, for the test's duration: its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # pytest owns the signals
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(WAIT):
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        except Exception:
            task.cancel()


@pytest.fixture
async def receiver():
    receiver = Receiver()
    app = Starlette(routes=[Route("/{path:path}", receiver.handle, methods=["POST"])])
    async with serving(app) as url:
        receiver.url = url
        yield receiver


# -- the dispatcher and its store ------------------------------------------------------------------


@pytest.fixture
async def webhooks(store) -> WebhookStore:
    store.outbox = WebhookOutbox()
    return WebhookStore(store)


@pytest.fixture
async def dispatchers():
    made: list[Dispatcher] = []
    background: list[asyncio.Task] = []

    def make(webhooks: WebhookStore, *, run: bool = False, **kw) -> Dispatcher:
        options = dict(
            policy=LOOPBACK,
            worker=f"test-{len(made)}",
            schedule=TINY,
            jitter=0.0,
            attempt_timeout=5.0,
            lease_seconds=10.0,
            poll_seconds=0.05,
            breaker_open_seconds=0.05,  # a breaker opened by a test's failures costs it little time
            breaker_max_open_seconds=0.2,
        )
        options.update(kw)
        dispatcher = Dispatcher(webhooks, **options)
        made.append(dispatcher)
        if run:
            background.append(asyncio.create_task(dispatcher.run()))
        return dispatcher

    yield make
    for task in background:
        task.cancel()
    for task in background:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for dispatcher in made:
        await dispatcher.aclose()


async def drive(dispatcher: Dispatcher, done: Callable[[], Any], timeout: float = WAIT) -> None:
    """Step the dispatcher (and let its attempts finish) until done() holds (it may be async)."""
    async with asyncio.timeout(timeout):
        while True:
            result = done()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await dispatcher.step()
            await dispatcher.idle()
            await asyncio.sleep(0.01)


async def until(condition: Callable[[], Any], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def outcome_message(webhooks: WebhookStore, store: Store, url: str, run_id: str = "r1", dag_id: str = "etl"):
    """An endpoint (outcome only, of this DAG) and one recorded run: one pending message."""
    endpoint = await webhooks.create_endpoint(url=url, dag_ids=[dag_id])
    await store.record(a_run(run_id=run_id, dag_id=dag_id))
    [message] = await webhooks.messages(endpoint.id)
    return endpoint, message


async def has_status(webhooks: WebhookStore, message_id: str, status: str) -> bool:
    return (await webhooks.get_message(message_id)).status == status


# -- delivery ---------------------------------------------------------------------------------------


async def test_a_delivery_is_signed_as_standard_webhooks_says(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks)
    endpoint, message = await outcome_message(webhooks, store, receiver.on("/hook", (204, {}, b"")))
    await drive(dispatcher, lambda: receiver.hits)
    await dispatcher.idle()
    [hit] = receiver.hits
    assert hit.verify(endpoint.secret) == json.loads(message.payload)  # the reference library's verdict
    assert hit.body == message.payload.encode()
    assert hit.webhook_id == message.id
    assert hit.headers["content-type"] == "application/json" and hit.headers["user-agent"] == "runbell"
    assert len(hit.headers["webhook-signature"].split(" ")) == 1
    with pytest.raises(WebhookVerificationError):
        hit.verify(new_secret())
    delivered = await webhooks.get_message(message.id)
    assert (delivered.status, delivered.attempts) == ("delivered", 1) and delivered.delivered_at is not None
    [attempt] = await webhooks.attempts(message_id=message.id)
    assert (attempt.status_code, attempt.error, attempt.endpoint_id) == (204, None, endpoint.id)
    assert attempt.duration_ms >= 0
    assert dispatcher.metrics.webhook_deliveries.labels("success")._value.get() == 1
    assert dispatcher.metrics.webhook_in_flight._value.get() == 0


async def test_500s_are_retried_on_the_schedule_with_the_same_id_and_bytes(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, schedule=(0, 0.05, 0.05, 0.05))
    url = receiver.on("/flaky", (500, {}, b"down"), (500, {}, b"still down"), (200, {}, b"ok"))
    endpoint, message = await outcome_message(webhooks, store, url)
    await drive(dispatcher, lambda: has_status(webhooks, message.id, "delivered"))
    assert len(receiver.hits) == 3
    assert {hit.webhook_id for hit in receiver.hits} == {message.id}
    assert {hit.body for hit in receiver.hits} == {message.payload.encode()}
    for hit in receiver.hits:
        hit.verify(endpoint.secret)
    attempts = await webhooks.attempts(message_id=message.id)
    assert [(a.status_code, a.response_body) for a in reversed(attempts)] == [(500, "down"), (500, "still down"), (200, "ok")]
    assert (await webhooks.get_message(message.id)).attempts == 3
    assert (await webhooks.get_endpoint(endpoint.id)).failing_since is None  # cleared by the success


async def test_a_failure_waits_its_step_of_the_schedule_with_jitter(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, schedule=(0, 3600), jitter=0.2)
    endpoint, message = await outcome_message(webhooks, store, receiver.on("/down", default=(500, {}, b"")))
    await drive(dispatcher, lambda: receiver.hits)
    await dispatcher.idle()
    waiting = await webhooks.get_message(message.id)
    [attempt] = await webhooks.attempts(message_id=message.id)
    delay = (waiting.next_attempt_at - attempt.attempted_at).total_seconds()
    assert waiting.status == "pending" and 3600 * 0.8 <= delay <= 3600 * 1.2 + 60
    assert await dispatcher.step() == 0  # not due
    assert (await webhooks.get_endpoint(endpoint.id)).failing_since is not None


async def test_retry_after_is_honoured_on_429_and_503_only(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, schedule=(0, 3600, 3600, 3600), retry_after_max=600)
    # 429 with Retry-After: 0 is retried at once, although the schedule says an hour
    url = receiver.on("/busy", (429, {"retry-after": "0"}, b""), (200, {}, b""))
    _, busy = await outcome_message(webhooks, store, url, run_id="busy", dag_id="busy")
    await drive(dispatcher, lambda: has_status(webhooks, busy.id, "delivered"))
    assert len(receiver.hits_at("/busy")) == 2

    # 503 with an HTTP date two days ahead: bounded by retry_after_max
    later = format_datetime(datetime.now(timezone.utc) + timedelta(days=2), usegmt=True)
    _, unavailable = await outcome_message(
        webhooks, store, receiver.on("/maint", (503, {"retry-after": later}, b"")), run_id="maint", dag_id="maint"
    )
    # 500 with a Retry-After: the schedule, not the header
    _, broken = await outcome_message(
        webhooks, store, receiver.on("/broken", (500, {"retry-after": "1"}, b"")), run_id="broken", dag_id="broken"
    )
    await drive(dispatcher, lambda: receiver.hits_at("/maint") and receiver.hits_at("/broken"))
    await dispatcher.idle()
    for message, low, high in ((unavailable, 590, 660), (broken, 3600 * 0.99, 3600 * 1.01 + 60)):
        waiting = await webhooks.get_message(message.id)
        [attempt] = await webhooks.attempts(message_id=message.id)
        assert low <= (waiting.next_attempt_at - attempt.attempted_at).total_seconds() <= high


def test_parse_retry_after():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("120", maximum=600, now=now) == 120
    assert parse_retry_after("100000", maximum=600, now=now) == 600
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", maximum=600, now=now) == 60
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", maximum=600, now=now) == 0
    assert parse_retry_after("-5", maximum=600, now=now) is None
    assert parse_retry_after("soon", maximum=600, now=now) is None


async def test_410_disables_the_endpoint_and_cancels_its_pending_messages(webhooks, store, receiver, dispatchers, caplog):
    dispatcher = dispatchers(webhooks, per_endpoint=1, max_in_flight=1)
    url = receiver.on("/gone", default=(410, {}, b"unsubscribed"))
    endpoint = await webhooks.create_endpoint(url=url, kinds=["task", "run"])
    await store.record(a_run())  # 7 messages
    with caplog.at_level(logging.WARNING, logger="runbell.webhooks.events"):
        await drive(dispatcher, lambda: receiver.hits)
        await dispatcher.idle()
    disabled = await webhooks.get_endpoint(endpoint.id)
    assert not disabled.enabled and "410" in disabled.disabled_reason
    statuses = Counter(m.status for m in await webhooks.messages(endpoint.id))
    assert statuses == {"cancelled": 7}
    assert len(receiver.hits) == 1
    assert await dispatcher.step() == 0
    [event] = [r for r in caplog.records if getattr(r, "runbell_event", None) == "webhook.endpoint_disabled"]
    assert event.webhook["endpoint_id"] == endpoint.id and event.webhook["cancelled_messages"] == 6
    assert endpoint.secret not in caplog.text
    # re-enabled, it takes messages again (recover replays the cancelled ones)
    await webhooks.update_endpoint(endpoint.id, enabled=True)
    receiver.default["/gone"] = (200, {}, b"")
    assert await webhooks.recover(endpoint.id, since=endpoint.created_at) == 7
    await drive(dispatcher, lambda: len(receiver.hits) == 8)


async def test_a_redirect_is_a_failure_and_is_not_followed(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, schedule=(0, 3600))
    url = receiver.on("/moved", default=(302, {"location": receiver.at("/new")}, b""))
    _, message = await outcome_message(webhooks, store, url)
    await drive(dispatcher, lambda: receiver.hits)
    await dispatcher.idle()
    [attempt] = await webhooks.attempts(message_id=message.id)
    assert attempt.status_code == 302
    assert (await webhooks.get_message(message.id)).status == "pending"
    assert receiver.hits_at("/new") == []
    assert dispatcher.metrics.webhook_deliveries.labels("failure")._value.get() == 1


async def test_a_hanging_receiver_is_cut_and_does_not_stall_another_endpoint(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(
        webhooks, run=True, attempt_timeout=3.0, lease_seconds=10.0, per_endpoint=1, max_in_flight=4, schedule=(0, 3600)
    )
    slow = await webhooks.create_endpoint(url=receiver.on("/hang", default=("hang", {}, 30)), kinds=["task", "run"])
    fast = await webhooks.create_endpoint(url=receiver.on("/fast"), kinds=["task", "run"])
    await store.record(a_run())  # 7 messages each
    await until(lambda: len(receiver.hits_at("/fast")) == 7)
    # every message of the fast endpoint went out while the first attempt to the slow one still hangs
    assert len(receiver.hits_at("/hang")) == 1 and await webhooks.attempts(endpoint_id=slow.id) == []
    await until(lambda: webhooks.attempts(endpoint_id=slow.id))
    [cut] = await webhooks.attempts(endpoint_id=slow.id)
    assert cut.status_code is None and "3 s" in cut.error
    await until(lambda: len(receiver.hits_at("/hang")) == 2)  # per_endpoint=1: one at a time
    assert Counter(m.status for m in await webhooks.messages(fast.id)) == {"delivered": 7}
    assert dispatcher.metrics.webhook_deliveries.labels("timeout")._value.get() >= 1


async def test_a_message_is_dead_lettered_after_the_schedule(webhooks, store, receiver, dispatchers, caplog):
    dispatcher = dispatchers(webhooks, schedule=(0, 0.02, 0.02))
    endpoint, message = await outcome_message(webhooks, store, receiver.on("/down", default=(500, {}, b"no")))
    with caplog.at_level(logging.WARNING, logger="runbell.webhooks.events"):
        await drive(dispatcher, lambda: has_status(webhooks, message.id, "dead"))
        for _ in range(3):
            await dispatcher.step()
            await dispatcher.idle()
    assert len(receiver.hits) == 3
    dead = await webhooks.get_message(message.id)
    assert (dead.status, dead.attempts, dead.next_attempt_at) == ("dead", 3, None)
    events = [r for r in caplog.records if getattr(r, "runbell_event", None) == "webhook.dead_lettered"]
    assert len(events) == 1 and events[0].levelno == logging.WARNING
    assert events[0].webhook == dict(
        endpoint_id=endpoint.id,
        target=url_label(endpoint.url),  # scheme://host:port: the URL itself may be the receiver's key
        message_id=message.id,
        dag_id="etl",
        run_id="r1",
        seq=message.seq,
        kind="outcome",
        attempts=3,
        last_error="HTTP 500",
    )
    assert endpoint.secret not in caplog.text and endpoint.url not in caplog.text
    assert f"endpoint {endpoint.id} ({url_label(endpoint.url)})" in caplog.text
    assert dispatcher.metrics.webhook_dead_letters._value.get() == 1
    # a resend is one more attempt (the schedule is used up)
    receiver.default["/down"] = (200, {}, b"")
    await webhooks.resend(message.id)
    await drive(dispatcher, lambda: has_status(webhooks, message.id, "delivered"))
    assert (await webhooks.get_endpoint(endpoint.id)).enabled


async def test_an_endpoint_failing_continuously_is_disabled(webhooks, store, receiver, dispatchers, caplog):
    dispatcher = dispatchers(webhooks, schedule=(0, 3600), disable_after=5 * 86400)
    url = receiver.on("/down", (500, {}, b""), (200, {}, b""), default=(500, {}, b""))
    endpoint, first = await outcome_message(webhooks, store, url, run_id="a")
    await drive(dispatcher, lambda: receiver.hits)
    await dispatcher.idle()
    since = (await webhooks.get_endpoint(endpoint.id)).failing_since
    assert since is not None
    await store.record(a_run(run_id="b"))  # delivered: failing_since cleared
    await drive(dispatcher, lambda: len(receiver.hits) == 2)
    await dispatcher.idle()
    assert (await webhooks.get_endpoint(endpoint.id)).failing_since is None
    await store.record(a_run(run_id="c"))  # fails: failing since now, not disabled
    await drive(dispatcher, lambda: len(receiver.hits) == 3)
    await dispatcher.idle()
    assert (await webhooks.get_endpoint(endpoint.id)).enabled
    # as if the failures had gone on for six days
    async with store._transaction(write=True) as conn:
        await conn.execute(
            update(ENDPOINTS).where(ENDPOINTS.c.id == endpoint.id).values(failing_since=datetime.now(timezone.utc) - timedelta(days=6))
        )
    with caplog.at_level(logging.WARNING, logger="runbell.webhooks.events"):
        await store.record(a_run(run_id="d"))
        await drive(dispatcher, lambda: len(receiver.hits) == 4)
        await dispatcher.idle()
    disabled = await webhooks.get_endpoint(endpoint.id)
    assert not disabled.enabled and disabled.disabled_reason.startswith("failing continuously")
    statuses = {m.run_id: m.status for m in await webhooks.messages(endpoint.id)}
    assert statuses == {"a": "cancelled", "b": "delivered", "c": "cancelled", "d": "cancelled"}
    assert any(getattr(r, "runbell_event", None) == "webhook.endpoint_disabled" for r in caplog.records)
    assert dispatcher.metrics.webhook_endpoints_disabled._value.get() == 1


async def test_a_refused_target_is_a_failed_attempt(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, policy=TargetPolicy([]), schedule=(0, 3600))  # loopback not allowed
    _, message = await outcome_message(webhooks, store, receiver.on("/hook"))
    await drive(dispatcher, lambda: webhooks.attempts(message_id=message.id))
    [attempt] = await webhooks.attempts(message_id=message.id)
    assert attempt.status_code is None and "refused" in attempt.error and "loopback" in attempt.error
    assert (await webhooks.get_message(message.id)).status == "pending"
    assert receiver.hits == []
    assert dispatcher.metrics.webhook_deliveries.labels("refused")._value.get() == 1


async def test_only_4_kib_of_an_answer_is_kept(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks)
    _, message = await outcome_message(webhooks, store, receiver.on("/chatty", (200, {}, b"x" * 100_000)))
    await drive(dispatcher, lambda: has_status(webhooks, message.id, "delivered"))
    [attempt] = await webhooks.attempts(message_id=message.id)
    assert attempt.response_body == "x" * 4096


# -- leases, replicas, restarts ---------------------------------------------------------------------


async def test_a_message_claimed_by_a_worker_that_died_is_delivered_by_another_after_the_lease(webhooks, store, receiver, dispatchers):
    _, message = await outcome_message(webhooks, store, receiver.on("/hook"))
    # a worker claims it and dies before posting (or mid-post): nobody finishes its lease
    [claimed] = await webhooks.claim("dead-worker/1", limit=10, per_endpoint=10, lease_seconds=0.5)
    assert claimed.id == message.id
    survivor = dispatchers(webhooks, lease_seconds=10)
    assert await survivor.step() == 0  # still leased
    await drive(survivor, lambda: has_status(webhooks, message.id, "delivered"))
    assert [hit.webhook_id for hit in receiver.hits] == [message.id]


async def test_two_dispatchers_on_one_database_deliver_each_attempt_once(database_url, store, receiver, dispatchers):
    """Two replicas (each its own engine) share the outbox; the receiver fails the first attempt of
    every message, so each webhook-id must arrive exactly twice."""
    first_seen: set[str] = set()

    def fail_first(hit: Hit) -> tuple:
        if hit.webhook_id in first_seen:
            return 200, {}, b""
        first_seen.add(hit.webhook_id)
        return 500, {}, b""

    url = receiver.on("/hook", default=fail_first)
    one = WebhookStore(store)
    store.outbox = WebhookOutbox()
    other_store = Store(database_url, outbox=WebhookOutbox())
    await other_store.start()
    try:
        two = WebhookStore(other_store)
        endpoints = [await one.create_endpoint(url=url, kinds=["task", "run", "outcome"]) for _ in range(3)]
        a = dispatchers(one, run=True, per_endpoint=4, max_in_flight=8)
        b = dispatchers(two, run=True, per_endpoint=4, max_in_flight=8)
        store.outbox.on_enqueued = a.wake
        other_store.outbox.on_enqueued = b.wake
        runs = [a_run(run_id=f"r{i}") for i in range(4)]
        await asyncio.gather(*(s.record(run) for run in runs for s in (store, other_store)))
        total = 3 * 4 * 8  # 3 endpoints, 4 runs, 7 events + 1 outcome each

        async def all_delivered() -> bool:
            statuses = [m.status for e in endpoints for m in await one.messages(e.id, limit=1000)]
            return len(statuses) == total and set(statuses) == {"delivered"}

        await until(all_delivered)
        hits = Counter(hit.webhook_id for hit in receiver.hits)
        assert len(hits) == total and set(hits.values()) == {2}
        for endpoint in endpoints:
            attempts = await one.attempts(endpoint_id=endpoint.id, limit=1000)
            assert Counter(a.message_id for a in attempts) == Counter({m: 2 for m in {a.message_id for a in attempts}})
            assert len(attempts) == 2 * 4 * 8
        assert (
            a.metrics.webhook_deliveries.labels("success")._value.get() + b.metrics.webhook_deliveries.labels("success")._value.get()
            == total
        )
    finally:
        await other_store.close()


async def test_during_a_rotation_both_signatures_are_sent_and_each_verifies(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks)
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["run"])
    rotated = await webhooks.rotate_secret(endpoint.id, grace_seconds=3600)
    await store.record(a_run(run_id="during")[:1])
    await drive(dispatcher, lambda: len(receiver.hits) == 1)
    hit = receiver.hits[0]
    signatures = hit.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    for secret, signature in ((rotated.secret, signatures[0]), (endpoint.secret, signatures[1])):
        hit.verify(secret)  # each secret verifies on its own ...
        Webhook(secret).verify(hit.body, {**hit.headers, "webhook-signature": signature})  # ... with its signature
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint.secret).verify(hit.body, {**hit.headers, "webhook-signature": signatures[0]})
    # after the grace only the new secret signs
    final = await webhooks.rotate_secret(endpoint.id, grace_seconds=0)
    await store.record(a_run(run_id="after")[:1])
    await drive(dispatcher, lambda: len(receiver.hits) == 2)
    after = receiver.hits[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    after.verify(final.secret)
    with pytest.raises(WebhookVerificationError):
        after.verify(rotated.secret)


async def test_wake_sends_a_new_message_at_once_rather_than_at_the_next_poll(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, run=True, poll_seconds=3600)
    store.outbox.on_enqueued = dispatcher.wake
    await asyncio.sleep(0.1)  # the dispatcher has looked once and now sleeps for an hour
    _, message = await outcome_message(webhooks, store, receiver.on("/hook"))
    await until(lambda: receiver.hits)
    assert receiver.hits[0].webhook_id == message.id


@pytest.mark.parametrize("turns", range(6))
async def test_a_stop_that_meets_a_wake_up_stops_the_dispatcher(webhooks, dispatchers, turns):
    """Cancelled just as a wake-up ends its wait (an attempt ending, the recorder enqueuing), the loop
    stopped anyway. On Python 3.11 asyncio.wait_for lost such a cancellation and the loop slept on
    for a whole poll: a gateway's shutdown, and CI once, hung there. Each ``turns`` cancels one loop
    turn later, so one of them lands in that window."""
    dispatcher = dispatchers(webhooks, poll_seconds=3600)
    task = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.1)  # the dispatcher has looked once and now sleeps for an hour
    dispatcher.wake()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=5)  # not wait_for: that would cancel the task once more
    try:
        assert task.cancelled(), "the dispatcher's loop went on after it was cancelled"
    finally:
        task.cancel()  # a second cancellation ends the one that went on
        await asyncio.gather(task, return_exceptions=True)


async def test_a_backlog_beyond_the_per_endpoint_bound_drains_without_waiting_for_the_poll(webhooks, store, receiver, dispatchers):
    dispatcher = dispatchers(webhooks, run=True, poll_seconds=3600, per_endpoint=2)
    store.outbox.on_enqueued = dispatcher.wake
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"])
    await asyncio.sleep(0.1)  # the dispatcher has looked once and now sleeps for an hour
    await store.record(a_run())  # 7 messages: one wake, at most 2 at a time

    async def all_delivered() -> bool:
        return Counter(m.status for m in await webhooks.messages(endpoint.id)) == {"delivered": 7}

    await until(all_delivered)
    assert len(receiver.hits) == 7


# -- the gateway's dispatcher -----------------------------------------------------------------------


async def test_the_gateway_delivers_and_a_restart_resumes_a_delivery_cut_short(gateway_factory, receiver, tmp_path):
    """A gateway is stopped while its attempt hangs; the next one (same database) delivers it."""
    from runbell.listeners.publisher import emit

    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = await gateway_factory(database_url=database_url, webhook_allowed_hosts="127.0.0.1")
    webhooks: WebhookStore = first.app.state.webhooks
    url = receiver.on("/hook", ("hang", {}, 60), default=(200, {}, b""))
    endpoint = await webhooks.create_endpoint(url=url, dag_ids=["etl"])

    def publish(state: str, **kw) -> None:
        assert emit("etl", "r1", state, publisher=first.publisher(), **kw) is not None

    await asyncio.to_thread(publish, "running")
    await asyncio.to_thread(publish, "success", task_id="answer", result_task=True, result={"answer": 42})
    await until(lambda: receiver.hits)  # the recorder stored it, the dispatcher was woken and posts
    [message] = await webhooks.messages(endpoint.id)
    assert receiver.hits[0].webhook_id == message.id

    first.server.should_exit = True  # stopped mid-delivery: the lease is handed back on the way out
    await until(lambda: first.app.state.store._engine is None)  # the lifespan has ended
    second = await gateway_factory(database_url=database_url, webhook_allowed_hosts="127.0.0.1")
    await until(lambda: len(receiver.hits) >= 2)
    second_webhooks: WebhookStore = second.app.state.webhooks
    await until(lambda: has_status(second_webhooks, message.id, MessageStatus.DELIVERED.value))
    assert {hit.webhook_id for hit in receiver.hits} == {message.id}
    data = receiver.hits[-1].verify(endpoint.secret)["data"]
    assert (data["status"], data["result"], data["terminal"]) == ("success", {"answer": 42}, True)
