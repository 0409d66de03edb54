"""The recorder against real Redis and real PostgreSQL / SQLite: the publisher's events end up in
the store once each, whatever the stream loses, repeats, or a crashed replica leaves pending."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, decode_envelope, envelope_json
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.store.models import EventRow
from runbell.service.store.recorder import Recorder, gaps
from runbell.service.store.store import Store

DAG = "etl"
WAIT = 20.0  # upper bound for anything that should happen at once; never reached when it works


@pytest.fixture
async def client(redis_url, redis_cleanup):
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    yield client
    await client.aclose()


@pytest.fixture
def publisher(redis_url, namespace, tmp_path):
    # A generous timeout: a publish that spools instead would make the test wait for nothing.
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5)
    return Publisher(config)


def recorder(client, store, namespace, consumer="replica-1", **kw) -> Recorder:
    kw.setdefault("block_ms", 100)
    return Recorder(client, store, namespace, consumer, **kw)


def publish_run(publisher: Publisher, run_id: str, tasks: int = 1) -> int:
    """A run with `tasks` tasks, the last of which is the result task. Returns how many events."""
    sent = [emit(DAG, run_id, "running", publisher=publisher)]
    for i in range(tasks):
        last = i == tasks - 1
        sent.append(emit(DAG, run_id, "running", task_id=f"t{i}", try_number=1, publisher=publisher))
        sent.append(
            emit(
                DAG,
                run_id,
                "success",
                task_id=f"t{i}",
                try_number=1,
                publisher=publisher,
                **({"result": {"n": i}, "result_task": True} if last else {}),
            )
        )
    assert None not in sent, "an event was spooled: Redis did not answer in time"
    return len(sent)


def run_stream(namespace: str, run_id: str = "r1") -> str:
    """The partition stream of one run's events."""
    return keys.run_keys(namespace, DAG, run_id).stream


async def pending_count(client, namespace) -> int:
    """Entries read and not acknowledged, over every stream partition."""
    total = 0
    for stream in keys.partition_streams(namespace, keys.DEFAULT_PARTITIONS):
        if await client.exists(stream):
            total += (await client.xpending(stream, keys.recorder_group()))["pending"]
    return total


async def stored_count(store) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(EventRow))).scalar()


async def global_entry_id(client, namespace, run_id: str, seq: int):
    for entry_id, fields in await client.xrange(run_stream(namespace, run_id)):
        envelope = decode_envelope(fields[b"env"])
        if envelope.event.run_id == run_id and envelope.seq == seq:
            return entry_id
    raise AssertionError(f"no entry for {run_id} seq {seq}")


async def read_without_ack(client, namespace, consumer: str) -> int:
    """What a replica that crashed between reading and acknowledging leaves behind."""
    stream, group = run_stream(namespace), keys.recorder_group()
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    reply = await client.xreadgroup(group, consumer, {stream: ">"}, count=100)
    return len(reply[0][1])


async def steps_until(rec: Recorder, entries: int) -> None:
    handled = 0
    while handled < entries:
        handled += await rec.step()


def test_gaps():
    assert gaps(0, {1, 2, 3}) == []
    assert gaps(0, {3}) == [(1, 2)]
    assert gaps(4, {6, 9, 10}) == [(5, 5), (7, 8)]
    assert gaps(5, {3, 4, 6}) == []


async def test_records_what_was_published(client, store, publisher, namespace):
    count = publish_run(publisher, "r1", tasks=2)  # published before the group exists: still read
    rec = recorder(client, store, namespace)
    assert await rec.step() == count
    assert [e.seq for e in await store.events(DAG, "r1")] == list(range(1, count + 1))
    run = await store.get_run(DAG, "r1")
    assert run.outcome_status == "success"
    assert run.outcome["result"] == {"n": 1}
    assert await pending_count(client, namespace) == 0
    assert await rec.step() == 0  # nothing new: blocks block_ms and returns


async def test_resent_event_is_stored_once(client, store, publisher, namespace):
    publish_run(publisher, "r1")
    stream = run_stream(namespace)
    entries = await client.xrange(stream)
    await client.xadd(stream, entries[1][1])  # a re-send: the same envelope again
    rec = recorder(client, store, namespace)
    assert await rec.step() == len(entries) + 1
    assert await stored_count(store) == len(entries)


async def test_gap_in_the_stream_is_filled_from_the_replay_log(client, store, publisher, namespace):
    count = publish_run(publisher, "r1", tasks=2)
    stream = run_stream(namespace)
    await client.xdel(stream, await global_entry_id(client, namespace, "r1", 2))
    await client.xdel(stream, await global_entry_id(client, namespace, "r1", 3))
    rec = recorder(client, store, namespace)
    assert await rec.step() == count - 2
    assert [e.seq for e in await store.events(DAG, "r1")] == list(range(1, count + 1))


async def test_gap_the_replay_log_cannot_fill_is_left(client, store, publisher, namespace):
    count = publish_run(publisher, "r1")
    await client.xdel(run_stream(namespace), await global_entry_id(client, namespace, "r1", 1))
    await client.xdel(keys.run_keys(namespace, DAG, "r1").log, "0-1")  # the log expired
    rec = recorder(client, store, namespace)
    assert await rec.step() == count - 1
    assert [e.seq for e in await store.events(DAG, "r1")] == list(range(2, count + 1))


async def test_malformed_entries_are_counted_and_skipped(client, store, publisher, namespace):
    stream = run_stream(namespace)
    bad = [
        {"env": "not json"},
        {"env": "[1, 2]"},
        {"env": '{"seq": 1, "event": {"v": 2}}'},
        {"env": '{"seq": 0, "event": {"v": 1, "kind": "run", "dag_id": "d", "run_id": "r", "state": "x"}}'},
        {"something": "else"},
    ]
    for fields in bad:
        await client.xadd(stream, fields)
    count = publish_run(publisher, "r1")
    await client.xadd(stream, {"env": b"\xff\xfe"})
    rec = recorder(client, store, namespace)
    await asyncio.wait_for(steps_until(rec, len(bad) + count + 1), WAIT)
    assert rec.decode_errors == Counter({"json": 2, "shape": 1, "version": 1, "schema": 1, "field": 1})
    assert await stored_count(store) == count
    assert await pending_count(client, namespace) == 0


async def test_two_recorders_share_the_work_and_store_each_event_once(client, store, publisher, namespace, redis_url, database_url):
    total = sum(publish_run(publisher, f"r{i}", tasks=4) for i in range(6))
    other_client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    other_store = Store(database_url)  # a second replica: its own connections to the same database
    await other_store.start()
    try:
        first = recorder(client, store, namespace, "replica-1", count=7)
        second = recorder(other_client, other_store, namespace, "replica-2", count=7)
        handled = Counter()

        async def share() -> None:
            while handled.total() < total:
                a, b = await asyncio.gather(first.step(), second.step())
                handled.update({"first": a, "second": b})

        await asyncio.wait_for(share(), WAIT)
        assert handled.total() == total  # every entry delivered to exactly one replica
        assert handled["first"] > 0 and handled["second"] > 0
        assert await stored_count(store) == total
        for i in range(6):
            seqs = [e.seq for e in await store.events(DAG, f"r{i}")]
            assert seqs == list(range(1, total // 6 + 1))
            assert (await store.get_run(DAG, f"r{i}")).outcome_status == "success"
        assert await pending_count(client, namespace) == 0
    finally:
        await other_client.aclose()
        await other_store.close()


async def test_own_pending_entries_are_recorded_after_a_crash(client, store, publisher, namespace):
    count = publish_run(publisher, "r1")
    assert await read_without_ack(client, namespace, "replica-1") == count
    # Another replica does not take them while they are fresh.
    assert await recorder(client, store, namespace, "replica-2").step() == 0
    assert await stored_count(store) == 0
    # The crashed replica, restarted under its name, records them first thing.
    assert await recorder(client, store, namespace, "replica-1").step() == count
    assert await stored_count(store) == count
    assert await pending_count(client, namespace) == 0


async def test_entries_of_a_dead_consumer_are_claimed(client, store, publisher, namespace):
    count = publish_run(publisher, "r1")
    assert await read_without_ack(client, namespace, "gone-for-good") == count
    rec = recorder(client, store, namespace, "replica-2", claim_idle_ms=0)
    assert await rec.step() == count
    assert await stored_count(store) == count
    assert await pending_count(client, namespace) == 0


async def test_database_failure_leaves_entries_pending(client, store, publisher, namespace, monkeypatch):
    count = publish_run(publisher, "r1")
    rec = recorder(client, store, namespace)
    real_record = store.record

    async def failing(envelopes):
        raise OperationalError("INSERT", {}, ConnectionRefusedError("database down"))

    monkeypatch.setattr(store, "record", failing)
    with pytest.raises(OperationalError):
        await rec.step()
    assert await pending_count(client, namespace) == count  # not acknowledged
    monkeypatch.setattr(store, "record", real_record)
    assert await rec.step() == count  # re-read from its own pending list
    assert await stored_count(store) == count
    assert await pending_count(client, namespace) == 0


async def test_stream_lost_with_its_group_is_recreated(client, store, publisher, namespace):
    """Redis restarted without persistence: the stream and the group are gone."""
    rec = recorder(client, store, namespace)
    first = publish_run(publisher, "r1")
    assert await rec.step() == first
    await client.delete(run_stream(namespace, "r1"), run_stream(namespace, "r2"))
    second = publish_run(publisher, "r2")  # re-creates the stream, without the group
    with pytest.raises(Exception, match="NOGROUP"):
        await rec.step()
    assert await rec.step() == second
    assert await stored_count(store) == first + second


async def test_run_survives_failures_and_keeps_recording(client, store, publisher, namespace, monkeypatch):
    count = publish_run(publisher, "r1")
    rec = recorder(client, store, namespace)
    real_step = rec.step
    failures = [RedisConnectionError("Redis went away"), OperationalError("SELECT 1", {}, OSError("db down"))]
    calls = Counter()

    async def flaky_step() -> int:
        calls["step"] += 1
        if failures:
            raise failures.pop(0)
        return await real_step()

    monkeypatch.setattr(rec, "step", flaky_step)
    task = asyncio.create_task(rec.run())

    async def recorded() -> None:
        while await stored_count(store) < count:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(recorded(), WAIT)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls["step"] >= 3


async def test_run_backs_off_while_redis_is_unreachable(store, namespace):
    unreachable = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=None)
    rec = recorder(unreachable, store, namespace)
    attempts = Counter()
    real_step = rec.step

    async def counted_step() -> int:
        attempts["step"] += 1
        return await real_step()

    rec.step = counted_step  # type: ignore[method-assign]
    task = asyncio.create_task(rec.run())
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await unreachable.aclose()
    # Without backoff a refused connection is retried thousands of times a second.
    assert 1 <= attempts["step"] < 20


async def test_runs_spread_over_the_partitions_are_all_recorded(client, store, publisher, namespace):
    runs = [f"spread-{i}" for i in range(12)]
    count = sum(publish_run(publisher, run_id) for run_id in runs)
    assert len({run_stream(namespace, run_id) for run_id in runs}) > 4  # several partitions at once
    rec = recorder(client, store, namespace)
    await asyncio.wait_for(steps_until(rec, count), WAIT)
    assert await stored_count(store) == count
    assert await pending_count(client, namespace) == 0


async def test_the_stream_of_hooks_before_partitions_is_drained_too(client, store, publisher, namespace):
    """An older hook (during an upgrade) still adds its events to the one global stream: they are
    recorded, whether that stream was there when the recorder started or appeared later."""
    rec = recorder(client, store, namespace)
    assert await rec.step() == 0  # started with no global stream
    event = Event(kind=EventKind.RUN, dag_id=DAG, run_id="old-hook", state="success")
    await client.xadd(keys.global_stream(namespace), {"env": envelope_json(1, event.to_json())})
    await asyncio.wait_for(steps_until(rec, 1), WAIT)
    assert [e.seq for e in await store.events(DAG, "old-hook")] == [1]
    assert (await client.xpending(keys.global_stream(namespace), keys.recorder_group()))["pending"] == 0


async def test_the_absent_stream_of_hooks_before_partitions_is_not_asked_for_a_group_every_poll(client, store, namespace, monkeypatch):
    """An idle recorder's polls only ask whether the global stream exists; its group is made once it does."""
    legacy = keys.global_stream(namespace)
    made: Counter[str] = Counter()
    xgroup_create = client.xgroup_create

    async def counting(name, *args, **kwargs):
        made[name] += 1
        return await xgroup_create(name, *args, **kwargs)

    monkeypatch.setattr(client, "xgroup_create", counting)
    rec = recorder(client, store, namespace, block_ms=1)
    for _ in range(20):
        assert await rec.step() == 0
    assert made[legacy] == 1  # at the start only
    event = Event(kind=EventKind.RUN, dag_id=DAG, run_id="old-hook", state="success")
    await client.xadd(legacy, {"env": envelope_json(1, event.to_json())})
    await asyncio.wait_for(steps_until(rec, 1), WAIT)
    for _ in range(5):
        assert await rec.step() == 0
    assert made[legacy] == 2  # once more, when it was seen to exist


async def test_an_idle_recorder_polls_less_often_until_an_entry_comes(client, store, publisher, namespace, monkeypatch):
    pauses: list[float] = []
    sleep = asyncio.sleep

    async def noted(seconds: float) -> None:
        pauses.append(seconds)
        await sleep(0)

    rec = recorder(client, store, namespace, block_ms=1000)
    monkeypatch.setattr("runbell.service.store.recorder.asyncio.sleep", noted)
    for _ in range(5):
        assert await rec.step() == 0
    assert pauses == [0.1, 0.2, 0.4, 0.5, 0.5]
    count = publish_run(publisher, "r1")
    await asyncio.wait_for(steps_until(rec, count), WAIT)
    pauses.clear()
    assert await rec.step() == 0
    assert pauses == [0.1]  # busy again: the next empty poll pauses the shortest time
