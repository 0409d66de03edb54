"""The dispatcher's batches (issue 14): claims prefetched per endpoint, attempts recorded together, on
PostgreSQL and SQLite. Each message is still delivered exactly once across replicas, a queued message
never starts on a lease that could run out mid-attempt, and SQLite never says "database is locked"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError

from runbell.service.core import clock
from runbell.service.store.models import MESSAGES
from runbell.service.store.store import Store
from runbell.service.webhooks import outbox
from runbell.service.webhooks.outbox import Finish, MessageStatus, Verdict, WebhookOutbox, WebhookStore
from tests.test_webhook_delivery import dispatchers, receiver, until, webhooks  # noqa: F401  # fixtures
from tests.test_webhook_store import a_run

RUNS = 40  # 8 messages each (7 events and the outcome) per endpoint


async def test_three_replicas_deliver_a_backlog_exactly_once(database_url, store, receiver, dispatchers, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    url = receiver.on("/hook")
    stores = [store]
    for _ in range(2):  # two more replicas, each its own engine
        other = Store(database_url)
        await other.start()
        stores.append(other)
    try:
        for each in stores:
            each.outbox = WebhookOutbox()
        replicas = [WebhookStore(each) for each in stores]
        endpoints = [await replicas[0].create_endpoint(url=url, kinds=["task", "run", "outcome"]) for _ in range(2)]
        running = [dispatchers(webhooks, run=True, per_endpoint=4, max_in_flight=16) for webhooks in replicas]
        for each, dispatcher in zip(stores, running):
            each.outbox.on_enqueued = dispatcher.wake
        # Recorded by every replica at once (each run twice: a re-delivered batch), while they deliver.
        await asyncio.gather(*(stores[i % 3].record(a_run(run_id=f"r{i // 2}")) for i in range(2 * RUNS)))
        total = 2 * RUNS * 8

        async def all_delivered() -> bool:
            statuses = [m.status for e in endpoints for m in await replicas[0].messages(e.id, limit=10 * total)]
            return len(statuses) == total and set(statuses) == {"delivered"}

        await until(all_delivered, timeout=120)
        hits = Counter(hit.webhook_id for hit in receiver.hits)
        assert len(hits) == total and set(hits.values()) == {1}
        for endpoint in endpoints:
            attempts = await replicas[0].attempts(endpoint_id=endpoint.id, limit=10 * total)
            assert len(attempts) == total // 2 and {a.status_code for a in attempts} == {200}
        assert sum(d.metrics.webhook_deliveries.labels("success")._value.get() for d in running) == total
        assert sum(1 for d in running if d.metrics.webhook_deliveries.labels("success")._value.get()) > 1  # shared
        assert "database is locked" not in caplog.text
        assert "could not record the attempt" not in caplog.text
    finally:
        for other in stores[1:]:
            await other.close()


async def test_attempts_that_end_together_are_recorded_in_one_transaction(webhooks, store, receiver, dispatchers, monkeypatch):  # noqa: F811
    dispatcher = dispatchers(webhooks, run=True, per_endpoint=8)
    store.outbox.on_enqueued = dispatcher.wake
    batches: list[int] = []
    real = webhooks.finish_many

    async def slow_finish_many(items, **kw):
        batches.append(len(items))
        await asyncio.sleep(0.3)  # the others end meanwhile
        return await real(items, **kw)

    monkeypatch.setattr(webhooks, "finish_many", slow_finish_many)
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"])
    await store.record(a_run())  # 7 messages

    async def all_delivered() -> bool:
        return Counter(m.status for m in await webhooks.messages(endpoint.id)) == {"delivered": 7}

    await until(all_delivered)
    assert sum(batches) == 7 and max(batches) > 1
    assert len(receiver.hits) == 7


async def test_a_queued_message_whose_lease_would_run_out_is_handed_back_not_sent(webhooks, store, receiver, dispatchers):  # noqa: F811
    # Two replicas of one slot each; each answer takes 0.8 s; a lease of 3.2 s outlasts an attempt (2 s)
    # plus the margin (1 s) only for 0.2 s after the claim. Sent later, a queued message could still be
    # under way when its lease runs out and the other replica claims it: sent twice.
    options = dict(run=True, per_endpoint=1, attempt_timeout=2.0, lease_seconds=3.2)
    first, second = dispatchers(webhooks, **options), dispatchers(webhooks, **options)
    store.outbox.on_enqueued = lambda count: (first.wake(), second.wake())
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook", default=("hang", {}, 0.8)), kinds=["task", "run"])
    await store.record(a_run())  # 7 messages

    async def all_delivered() -> bool:
        return Counter(m.status for m in await webhooks.messages(endpoint.id)) == {"delivered": 7}

    await until(all_delivered, timeout=60)
    hits = Counter(hit.webhook_id for hit in receiver.hits)
    assert len(hits) == 7 and set(hits.values()) == {1}  # none sent twice
    assert {a.status_code for a in await webhooks.attempts(endpoint_id=endpoint.id)} == {200}


async def test_an_attempt_the_database_refuses_does_not_hold_back_those_recorded_with_it(
    webhooks, store, receiver, dispatchers, monkeypatch
):  # noqa: F811
    dispatcher = dispatchers(webhooks, run=True, per_endpoint=8, schedule=(0, 3600))
    store.outbox.on_enqueued = dispatcher.wake
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"])
    real = webhooks.finish_many
    poison: list[str] = []

    async def refusing(items, **kw):
        await asyncio.sleep(0.3)  # the others end meanwhile: batches of several
        if not poison and len(items) > 1:
            poison.append(items[-1].message.id)  # refused inside a batch of several
        if any(item.message.id in poison for item in items):
            raise DataError("INSERT INTO webhook_attempts ...", {}, ValueError("a value the database refuses"))
        return await real(items, **kw)

    monkeypatch.setattr(webhooks, "finish_many", refusing)
    refused: list[str] = []  # the attempts told their recording failed
    record = dispatcher._record

    async def told(item):
        try:
            return await record(item)
        except Exception:
            refused.append(item.message.id)
            raise

    monkeypatch.setattr(dispatcher, "_record", told)
    await store.record(a_run())  # 7 messages

    async def six_delivered() -> bool:
        return Counter(m.status for m in await webhooks.messages(endpoint.id))["delivered"] == 6

    await until(six_delivered)
    await until(lambda: refused)  # the poison's attempt is told, after the others (alone, last)
    [pending] = [m for m in await webhooks.messages(endpoint.id) if m.status != "delivered"]
    assert pending.id == poison[0] and pending.status == "pending"  # retried once its lease runs out
    assert set(refused) == {poison[0]}  # the others recorded at their first try, though batched with it


async def test_a_nul_in_a_receivers_answer_is_kept_escaped(webhooks, store, receiver, dispatchers):  # noqa: F811
    dispatcher = dispatchers(webhooks)
    endpoint = await webhooks.create_endpoint(url=receiver.on("/hook", default=(200, {}, b"ok\x00then")), kinds=["run"])
    await store.record(a_run()[:1])

    async def recorded() -> bool:
        return bool(await webhooks.attempts(endpoint_id=endpoint.id))

    async with asyncio.timeout(20):
        while not await recorded():
            await dispatcher.step()
            await dispatcher.idle()
    [attempt] = await webhooks.attempts(endpoint_id=endpoint.id)
    assert (attempt.status_code, attempt.response_body) == (200, "ok\\x00then")


async def test_on_shutdown_queued_messages_are_handed_back_not_started(webhooks, store, receiver, dispatchers):  # noqa: F811
    # One slot, an endpoint known to answer (so its claims are prefetched, queued here): stopping the
    # attempt under way must not start the next queued one (posted while the process shuts down,
    # its lease held) but hand every one back, due at once for another replica.
    dispatcher = dispatchers(webhooks, per_endpoint=1, max_in_flight=1)
    await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"])
    await store.record(a_run()[:1])
    await dispatcher.step()
    await dispatcher.idle()  # delivered: the endpoint is known to answer
    receiver.default["/hook"] = ("hang", {}, 30)
    await store.record(a_run())  # 6 more messages
    assert await dispatcher.step() == 6  # one posting, five queued
    await until(lambda: len(receiver.hits) == 2)
    await dispatcher.aclose()
    await asyncio.sleep(0.3)
    assert len(receiver.hits) == 2  # nothing more was posted
    assert not dispatcher._tasks
    due = await webhooks.claim("another-replica", limit=100, per_endpoint=100, lease_seconds=10)
    assert len(due) == 6


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the writers' queue is SQLite's
async def test_a_lease_runs_from_when_the_claim_holds_the_writer_not_from_when_it_queued(webhooks, store, receiver):  # noqa: F811
    # SQLite's writers queue in this process (the recorder's batch may hold the lock for seconds). A
    # lease counted from before that wait is shorter than lease_seconds once the claim returns, and
    # the dispatcher times its queued messages from there: one could outlive its lease mid-attempt.
    assert store._single_writer
    await webhooks.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"])
    await store.record(a_run())
    writer = store._writers.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    await writer.acquire()  # another writer's transaction under way
    claim = asyncio.create_task(webhooks.claim("t", limit=10, per_endpoint=10, lease_seconds=10))
    await asyncio.sleep(1.5)
    writer.release()
    claimed = await claim
    returned = clock.now()
    async with store.engine.connect() as conn:
        leases = (await conn.execute(select(MESSAGES.c.locked_until).where(MESSAGES.c.id.in_([m.id for m in claimed])))).scalars().all()
    assert claimed and all(clock.as_utc(until) >= returned + timedelta(seconds=9) for until in leases)


async def test_idle_pools_closed_by_two_attempts_at_once(webhooks, dispatchers, monkeypatch):  # noqa: F811
    # Past MAX_HOST_CLIENTS each attempt closes idle pools; two at once must neither close one twice
    # (a KeyError failing an attempt) nor close a pool that an attempt took up meanwhile.
    monkeypatch.setattr("runbell.service.webhooks.dispatcher.MAX_HOST_CLIENTS", 1)
    dispatcher = dispatchers(webhooks)
    closed: list[str] = []

    class Pool:
        def __init__(self, origin: str):
            self.origin = origin

        async def aclose(self) -> None:
            await asyncio.sleep(0.01)
            closed.append(self.origin)

    for origin in ("a", "b", "c"):
        dispatcher._clients[origin] = Pool(origin)  # type: ignore[assignment]

    async def taking_up_c() -> None:
        await asyncio.sleep(0)  # while the first closes "a"
        dispatcher._host_in_flight["c"] += 1

    await asyncio.gather(dispatcher._trim_clients(), dispatcher._trim_clients(), taking_up_c())
    assert sorted(closed) == ["a", "b"] and list(dispatcher._clients) == ["c"]


async def test_two_replicas_recording_failures_of_the_same_endpoints_in_other_orders_do_not_deadlock(
    database_url, store, receiver, monkeypatch
):  # noqa: F811
    # finish_many updates several endpoints' rows in one transaction, one verdict after another: two
    # replicas whose batches name two endpoints in the other order locked them crosswise (PostgreSQL:
    # a deadlock, one batch failed, its attempts retried, at worst re-sent when their leases ran out).
    other = Store(database_url)
    await other.start()
    try:
        store.outbox = WebhookOutbox()
        first, second = WebhookStore(store), WebhookStore(other)
        endpoints = [await first.create_endpoint(url=receiver.on("/hook"), kinds=["task", "run"]) for _ in range(2)]
        await store.record(a_run()[:2])  # two messages per endpoint
        claimed = await first.claim("t", limit=10, per_endpoint=10, lease_seconds=60)
        by_endpoint = {e.id: [m for m in claimed if m.endpoint_id == e.id] for e in endpoints}
        failed = Verdict(MessageStatus.PENDING, next_attempt_at=clock.now(), endpoint="failure")
        attempt = dict(attempted_at=clock.now(), duration_ms=1.0, status_code=500, error=None, response_body="no")

        def items(order: list[int], which: int) -> list[Finish]:
            return [Finish(by_endpoint[endpoints[i].id][which], "t", attempt, failed) for i in order]

        real, barrier = outbox._apply_verdict, asyncio.Barrier(2)
        applied: Counter[int] = Counter()

        async def in_step(conn, item, disable_after, now):  # each batch's first verdict, then the other's
            result = await real(conn, item, disable_after, now)
            applied[id(conn)] += 1
            if applied[id(conn)] == 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(barrier.wait(), 3)
            return result

        monkeypatch.setattr(outbox, "_apply_verdict", in_step)
        results = await asyncio.gather(
            first.finish_many(items([0, 1], 0), disable_after=3600),
            second.finish_many(items([1, 0], 1), disable_after=3600),
            return_exceptions=True,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
    finally:
        await other.close()
