"""The recorder's batches (issue 14): one transaction per poll over every partition, correct under load.

Thousands of events over many runs, recorded by two replicas at once and partly re-delivered, land once
each, in order, with every run's outcome and task rows; a row the store refuses inside a batch that
spans partitions is dead-lettered alone while the rest of the batch lands. PostgreSQL and SQLite.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from runbell.bus import keys
from runbell.service.store import recorder as recorder_module
from runbell.service.store import store as store_module
from runbell.service.store.dead_letters import DeadLetters
from runbell.service.store.models import EventRow, TaskInstance
from runbell.service.store.recorder import Recorder
from runbell.service.store.store import Store
from tests.test_recorder import DAG, pending_count, publish_run, publisher  # noqa: F401  # publisher: a fixture

WAIT = 120.0  # a bound for recording a few thousand events on a busy machine; never reached when it works
RUNS, TASKS = 50, 49  # 50 runs of 1 + 2 * 49 + ... = 99 events each (with its run event and the tasks')


@pytest.fixture
async def client(redis_url, redis_cleanup):
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    yield client
    await client.aclose()


async def count_rows(store: Store, table: type) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def counted_records(store: Store, monkeypatch) -> list[int]:
    """The sizes of the store's record() calls from now on (each a transaction)."""
    calls: list[int] = []
    real = store.record

    async def record(envelopes):
        calls.append(len(envelopes))
        return await real(envelopes)

    monkeypatch.setattr(store, "record", record)
    return calls


async def test_thousands_of_events_over_many_runs_are_recorded_once_each(client, store, publisher, namespace, redis_url, database_url):
    per_run = publish_run(publisher, "r0", tasks=TASKS)
    total = per_run + sum(publish_run(publisher, f"r{i}", tasks=TASKS) for i in range(1, RUNS))
    # Some entries delivered twice (a publisher's retry): the same envelopes again.
    stream = keys.run_keys(namespace, DAG, "r7").stream
    for _, fields in (await client.xrange(stream))[:40]:
        await client.xadd(stream, fields)
    other_client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    other_store = Store(database_url)  # a second replica, its own connections: both write at once
    await other_store.start()
    try:
        first = Recorder(client, store, namespace, "replica-1", block_ms=100)
        second = Recorder(other_client, other_store, namespace, "replica-2", block_ms=100, count=50)
        handled: Counter[str] = Counter()

        async def share() -> None:
            while handled.total() < total + 40:
                a, b = await asyncio.gather(first.step(), second.step())
                handled.update({"first": a, "second": b})

        await asyncio.wait_for(share(), WAIT)
    finally:
        await other_client.aclose()
        await other_store.close()
    assert handled.total() == total + 40
    assert await count_rows(store, EventRow) == total == RUNS * per_run
    for i in range(RUNS):
        assert [e.seq for e in await store.events(DAG, f"r{i}")] == list(range(1, per_run + 1))
        run = await store.get_run(DAG, f"r{i}")
        assert (run.outcome_status, run.last_seq) == ("success", per_run)
        assert run.outcome["result"] == {"n": TASKS - 1}
    assert await count_rows(store, TaskInstance) == RUNS * TASKS
    assert await pending_count(client, namespace) == 0


async def test_a_poll_over_every_partition_is_one_transaction(client, store, publisher, namespace, monkeypatch):
    total = sum(publish_run(publisher, f"r{i}") for i in range(12))
    streams = {keys.run_keys(namespace, DAG, f"r{i}").stream for i in range(12)}
    assert len(streams) > 1  # the runs sit in several partitions
    calls = counted_records(store, monkeypatch)
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100)
    assert await rec.step() == total
    assert calls == [total]
    assert await count_rows(store, EventRow) == total
    assert await pending_count(client, namespace) == 0


async def test_a_row_refused_inside_a_batch_of_every_partition_is_dead_lettered_alone(client, store, publisher, namespace, monkeypatch):
    total = sum(publish_run(publisher, f"r{i}") for i in range(12))
    poison = (await store_events_of(client, namespace, "r5"))[1]  # r5's second event
    real = store.record

    async def record(envelopes):
        if any(e.event.id == poison for e in envelopes):
            raise DBAPIError("INSERT INTO events ...", {}, ValueError("value out of range"))
        return await real(envelopes)

    monkeypatch.setattr(store, "record", record)
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100)
    assert await rec.step() == total
    assert await count_rows(store, EventRow) == total - 1
    assert [letter.event_id for letter in await DeadLetters(store).list()] == [poison]
    for i in range(12):
        assert len(await store.events(DAG, f"r{i}")) == (2 if i == 5 else 3)  # r5: events 1 and 3
    assert await pending_count(client, namespace) == 0


async def store_events_of(client, namespace: str, run_id: str) -> list[str]:
    """The event ids of a run, in its stream's order."""
    from runbell.bus.schema import decode_envelope

    ids = []
    for _, fields in await client.xrange(keys.run_keys(namespace, DAG, run_id).stream):
        envelope = decode_envelope(fields[b"env"])
        if envelope.event.run_id == run_id:
            ids.append(envelope.event.id)
    return ids


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # row locks are PostgreSQL's (SQLite has one writer)
async def test_runs_are_locked_in_one_order_whatever_the_databases_collation(store, monkeypatch):
    # A batch's runs are locked chunk after chunk, in the key order sorted here (code points). Ordered
    # by a locale's collation inside each chunk ("a" before "B"), two recorders' batches chunked
    # differently locked the same runs crosswise: a deadlock (PostgreSQL; SQLite has one writer).
    assert store.engine.dialect.name == "postgresql"
    async with store.engine.begin() as conn:
        await conn.execute(text('ALTER TABLE runs ALTER COLUMN dag_id TYPE varchar COLLATE "en-x-icu"'))
    monkeypatch.setattr(store_module, "INSERT_CHUNK", 2)
    runs = [(("B", "r"), 0.0), (("a", "r"), 0.0), (("c", "r"), 0.0)]
    async with store._transaction(write=True) as conn:
        locked = list(await store_module._lock_runs(conn, runs))
    assert locked == sorted(run for run, _ in runs)


async def test_a_poll_larger_than_a_transactions_bound_is_recorded_in_several(client, store, publisher, namespace, monkeypatch):
    # A poll holds up to count entries of every partition (1024 of them: 204,800 entries). As one
    # transaction it would hold SQLite's one writer (the webhook dispatcher's claims and attempts
    # waiting behind it, their leases running) and the memory of all of it: bounded per transaction.
    total = sum(publish_run(publisher, f"r{i}") for i in range(12))
    calls = counted_records(store, monkeypatch)
    monkeypatch.setattr(recorder_module, "RECORD_BATCH_MAX", 10)
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100)
    assert await rec.step() == total
    assert sum(calls) == total and len(calls) > 1 and max(calls) <= 10
    assert await count_rows(store, EventRow) == total
    assert await pending_count(client, namespace) == 0
