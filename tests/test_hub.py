"""The hub on its own, against real Redis: subscriber counts, fan-out order, overflow, replay then
live without gap or repeat, re-subscribing after the pub/sub connection drops, and a topic of a
kind the hub has never heard of."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import START, BadEvent, Position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.core.metrics import Metrics
from runbell.service.live.hub import Hub, Signal, Subscription, SubscriptionClosed, Topic
from runbell.service.live.topics import RunTopic

DAG = "etl"
WAIT = 20.0  # upper bound for what should happen at once; never reached when it works


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


@dataclass
class Parts:
    hub: Hub
    runs: RunTopic
    client: aioredis.Redis
    publisher: Publisher
    name: str  # the client name of the hub's pub/sub connection

    async def emit(self, run_id: str, state: str = "running", **kw) -> int:
        seq = await asyncio.to_thread(emit, DAG, run_id, state, publisher=self.publisher, **kw)
        assert seq is not None, "spooled: Redis did not answer in time"
        return seq


@pytest.fixture
async def make_hub(redis_url, namespace, redis_cleanup, tmp_path):
    made: list[tuple[Hub, list[aioredis.Redis]]] = []

    async def make(buffer: int = 1000) -> Parts:
        name = f"{namespace}-hub-{len(made)}"
        client = aioredis.Redis.from_url(redis_url)
        pubsub_client = aioredis.Redis.from_url(redis_url, socket_timeout=None, client_name=name)
        hub = Hub(pubsub_client, Metrics(), buffer=buffer)
        runs = RunTopic(hub, client, namespace)
        made.append((hub, [client, pubsub_client]))
        await hub.start()
        await until(hub.connected.is_set)
        publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))
        return Parts(hub, runs, client, publisher, name)

    yield make
    for hub, clients in made:
        await hub.stop()
        for client in clients:
            await client.aclose()


async def take(sub: Subscription, n: int) -> list[int]:
    seqs = []
    async with asyncio.timeout(WAIT):
        async for item in sub:
            seqs.append(item.seq)
            if len(seqs) == n:
                return seqs
    return seqs


async def test_subscribers_are_counted_and_forgotten(make_hub):
    parts = await make_hub()
    hub, runs = parts.hub, parts.runs
    async with runs.subscribe(DAG, "a"), runs.subscribe(DAG, "a"), runs.subscribe(DAG, "b"):
        assert hub.count == 3
        assert {ch: len(subs) for ch, subs in hub.subscribers.items()} == {runs.route((DAG, "a")): 2, runs.route((DAG, "b")): 1}
        assert set(hub.heard) == set(hub.subscribers)
    assert hub.count == 0 and hub.subscribers == {} and hub.heard == {}


async def test_the_hub_holds_one_shard_subscription_per_partition_however_many_waiters(make_hub):
    parts = await make_hub()
    runs = [f"r{i}" for i in range(40)]
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(parts.runs.subscribe(DAG, run_id)) for run_id in runs for _ in range(2)]
        (info,) = [c for c in await parts.client.client_list() if c.get("name") == parts.name]
        assert (int(info["ssub"]), int(info["psub"]), int(info["sub"])) == (keys.DEFAULT_PARTITIONS, 0, 0)
        partitions = {keys.run_partition(DAG, run_id) for run_id in runs}
        assert len(partitions) > 1  # the runs share the partitions' channels
        await parts.emit("r7")
        assert await take(subs[14], 1) == [1]


async def test_a_message_of_a_run_nobody_waits_on_here_is_not_decoded(make_hub, monkeypatch):
    parts = await make_hub()
    decoded = []
    real_decode = parts.runs.decode
    monkeypatch.setattr(parts.runs, "decode", lambda data: decoded.append(data) or real_decode(data))
    async with parts.runs.subscribe(DAG, "waited") as sub:
        k = keys.run_keys(parts.publisher.config.namespace, DAG, "nobody")
        await parts.client.spublish(k.live, keys.live_message(k.route, b"not even json"))
        await parts.emit("nobody")
        await parts.emit("waited")
        assert await take(sub, 1) == [1]
    assert decoded and not [data for data in decoded if b'"nobody"' in data or b"not even" in data]
    assert parts.hub.metrics.decode_errors.labels("json")._value.get() == 0


async def test_every_subscriber_gets_every_event_in_order(make_hub):
    parts = await make_hub()
    async with parts.runs.subscribe(DAG, "r") as s1, parts.runs.subscribe(DAG, "r") as s2, parts.runs.subscribe(DAG, "other") as s3:
        for sub in (s1, s2, s3):
            assert await sub.backlog() == []
        for i in range(5):
            await parts.emit("r", task_id=f"t{i}", try_number=1)
        await parts.emit("other")
        assert await take(s1, 5) == [1, 2, 3, 4, 5]
        assert await take(s2, 5) == [1, 2, 3, 4, 5]
        assert await take(s3, 1) == [1]


async def test_a_slow_subscriber_is_cut_off_with_its_signal_and_the_others_go_on(make_hub):
    parts = await make_hub(buffer=3)
    async with parts.runs.subscribe(DAG, "r") as slow, parts.runs.subscribe(DAG, "r") as reader:
        await slow.backlog()
        await reader.backlog()
        reading = asyncio.create_task(take(reader, 5))
        for i in range(5):
            await parts.emit("r", task_id=f"t{i}", try_number=1)
            await until(lambda: reader.last.seq == i + 1)  # the reader keeps up, one event at a time
        assert await reading == [1, 2, 3, 4, 5]
        await until(lambda: slow._closed is Signal.OVERFLOW)
        assert list(slow.queue) == [Signal.OVERFLOW]  # what was buffered is dropped at once
        with pytest.raises(SubscriptionClosed) as closed:
            await take(slow, 1)
    assert closed.value.reason is Signal.OVERFLOW
    assert parts.hub.metrics.overflows._value.get() == 1


async def test_replay_then_live_without_gap_or_repeat(make_hub):
    parts = await make_hub()
    for i in range(3):
        await parts.emit("r", task_id=f"t{i}", try_number=1)  # before anyone subscribed: only in the log
    epoch = (await parts.runs.read((DAG, "r"), START))[0].epoch
    async with parts.runs.subscribe(DAG, "r", Position(epoch, 1)) as sub:
        await parts.emit("r", task_id="t3", try_number=1)  # both in the log and offered live
        await parts.emit("r", task_id="t4", try_number=1)
        await until(lambda: len(sub.queue) >= 2)  # offered live, and in the log too
        seqs = await take(sub, 4)  # the log (2..5); what was offered too is skipped
        await parts.emit("r", "success")
        seqs += await take(sub, 1)
    assert seqs == [2, 3, 4, 5, 6]


async def test_a_gap_in_what_pubsub_offered_is_filled_from_the_log(make_hub):
    parts = await make_hub()
    async with parts.runs.subscribe(DAG, "r") as sub:
        assert await sub.backlog() == []
        for i in range(3):
            await parts.emit("r", task_id=f"t{i}", try_number=1)
        await until(lambda: len(sub.queue) == 3)
        sub.queue.popleft()
        sub.queue.popleft()  # lost on the way: only seq 3 arrives
        assert await take(sub, 3) == [1, 2, 3]


async def test_after_the_pubsub_connection_drops_the_hub_resubscribes_and_nothing_is_lost(make_hub, monkeypatch):
    parts = await make_hub()
    hub, runs = parts.hub, parts.runs
    async with runs.subscribe(DAG, "r") as sub:
        await parts.emit("r", task_id="t0", try_number=1)
        assert await take(sub, 1) == [1]
        reads = []
        real_read = runs.read

        async def counted_read(key, after):
            reads.append(after.seq)
            return await real_read(key, after)

        monkeypatch.setattr(runs, "read", counted_read)
        before = hub.metrics.resubscribes._value.get()
        await kill_client(parts.client, parts.name)
        for i in range(1, 4):  # while the hub is (re)connecting: some may reach only the log
            await parts.emit("r", task_id=f"t{i}", try_number=1)
        await until(lambda: hub.metrics.resubscribes._value.get() > before and hub.connected.is_set())
        # Nothing published after the re-subscription: what was missed comes from the log read that
        # the re-subscription asked for (live events alone would need no read).
        assert await take(sub, 3) == [2, 3, 4]
        assert reads and reads[0] == 1
    assert hub.listener.failures == 0  # recovered (or redis-py reconnected by itself)


async def test_a_subscriber_never_joins_a_log_read_that_started_before_it_registered(make_hub, monkeypatch):
    """A crowd shares one log read, but a read answered before an event was published must not
    serve a subscriber that registered after that event went by live: it would never see it."""
    parts = await make_hub()
    for i in range(3):
        await parts.emit("r", task_id=f"t{i}", try_number=1)
    gate, first_read_done = asyncio.Event(), asyncio.Event()
    real_xrange, calls = parts.client.xrange, []

    async def slow_first_xrange(*args, **kwargs):
        entries = await real_xrange(*args, **kwargs)
        calls.append(len(entries))
        if len(calls) == 1:  # answered now, returned late: stale by the time it returns
            first_read_done.set()
            await gate.wait()
        return entries

    monkeypatch.setattr(parts.client, "xrange", slow_first_xrange)
    async with parts.runs.subscribe(DAG, "early") as _unused, parts.runs.subscribe(DAG, "r") as early:
        early_seqs = asyncio.create_task(take(early, 4))
        await first_read_done.wait()
        await parts.emit("r", "success")  # seq 4: offered live to the early subscriber only
        await until(lambda: any(item.seq == 4 for item in early.queue))  # (seq 1-3 may come live too)
        async with parts.runs.subscribe(DAG, "r") as late:
            late_seqs = asyncio.create_task(take(late, 4))
            await until(lambda: len(calls) >= 2 or late_seqs.done())
            gate.set()
            assert await late_seqs == [1, 2, 3, 4]
        assert await early_seqs == [1, 2, 3, 4]
    assert calls == [3, 4]


async def test_a_runs_first_event_is_taken_live_without_reading_the_log(make_hub, monkeypatch):
    """Seq 1 of a new epoch after an empty first read is no gap: a crowd waiting on a run that has not
    started does not all re-read the log at its first event (and fall behind while they do)."""
    parts = await make_hub()
    async with parts.runs.subscribe(DAG, "r") as sub:
        assert await sub.backlog() == []
        reads = []
        real_read = parts.runs.read

        async def counted_read(key, after):
            reads.append(after)
            return await real_read(key, after)

        monkeypatch.setattr(parts.runs, "read", counted_read)
        await parts.emit("r")
        await parts.emit("r", task_id="t0", try_number=1)
        assert await take(sub, 2) == [1, 2]
    assert reads == []


async def test_a_new_epoch_is_delivered_not_taken_for_repeats(make_hub):
    """Redis lost the run's state (restarted empty): its events are numbered from 1 again, in a new
    epoch. A subscriber that had seq 1-2 of the old epoch gets the new seq 1-2 as well, in order."""
    parts = await make_hub()
    async with parts.runs.subscribe(DAG, "r") as sub:
        await parts.emit("r", task_id="t0", try_number=1)
        await parts.emit("r", task_id="t1", try_number=1)
        assert await take(sub, 2) == [1, 2]
        old = sub.last
        k = keys.run_keys(parts.publisher.config.namespace, DAG, "r")
        await parts.client.delete(k.seq, k.log, k.ids, k.epoch)  # what a restart without persistence leaves
        await parts.emit("r", task_id="t2", try_number=1)
        await parts.emit("r", "success")
        assert await take(sub, 2) == [1, 2]
        assert sub.last.epoch > old.epoch


async def kill_client(client: aioredis.Redis, name: str) -> None:
    """Cut one named connection (not every pub/sub client: the server is shared)."""
    async with asyncio.timeout(WAIT):
        while True:
            ids = [c["id"] for c in await client.client_list() if c.get("name") == name]
            if ids:
                for client_id in ids:
                    await client.client_kill_filter(_id=client_id)
                return
            await asyncio.sleep(0.01)


# -- a kind of stream the hub has never heard of ----------------------------------------------------


@dataclass
class Stamp:
    ts: float


@dataclass
class Note:
    key: str
    seq: int
    event: Stamp

    @property
    def position(self) -> Position:
        return Position("", self.seq)


class NoteTopic(Topic[str, Note]):
    """Notes kept in memory and published as JSON, routed ``note:<key>``, on a shard channel of their own."""

    def __init__(self, hub: Hub, namespace: str):
        self.live = f"{namespace}:notes"
        super().__init__(hub, "note", [self.live])
        self.namespace = namespace
        self.log: dict[str, list[Note]] = {}

    def route(self, key: str) -> str:
        return f"note:{key}"

    def decode(self, data: bytes) -> Note:
        try:
            raw = json.loads(data)
            return Note(raw["key"], raw["seq"], Stamp(raw["ts"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadEvent("json", str(exc)) from None

    def route_of(self, item: Note) -> str:
        return self.route(item.key)

    async def read(self, key: str, after: Position) -> list[Note]:
        return [n for n in self.log.get(key, []) if n.position > after]

    async def publish(self, client: aioredis.Redis, key: str) -> None:
        notes = self.log.setdefault(key, [])
        notes.append(Note(key, len(notes) + 1, Stamp(time.time())))
        note = json.dumps({"key": key, "seq": len(notes), "ts": notes[-1].event.ts})
        await client.spublish(self.live, keys.live_message(self.route(key), note))


async def test_a_topic_of_any_kind_is_fanned_out_alongside_runs(redis_url, namespace, redis_cleanup, tmp_path):
    client = aioredis.Redis.from_url(redis_url)
    pubsub_client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    hub = Hub(pubsub_client, Metrics())
    runs = RunTopic(hub, client, namespace)
    notes = NoteTopic(hub, namespace)
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))
    await hub.start()
    try:
        await until(hub.connected.is_set)
        async with hub.subscribe(notes, "n1") as note_sub, runs.subscribe(DAG, "r") as run_sub:
            await notes.publish(client, "n1")  # before the first read: in the log and offered
            await notes.publish(client, "n2")  # nobody waits on it here
            await client.spublish(notes.live, keys.live_message(notes.route("n1"), b"not json"))  # dropped and counted
            await notes.publish(client, "n1")
            await asyncio.to_thread(emit, DAG, "r", "running", publisher=publisher)
            assert await take(note_sub, 2) == [1, 2]
            assert await take(run_sub, 1) == [1]
            assert [key for key, _ in hub.silent(notes, longer_than=-1)] == ["n1"]
            assert [key for key, _ in hub.silent(runs, longer_than=-1)] == [(DAG, "r")]
        assert hub.metrics.decode_errors.labels("json")._value.get() == 1
    finally:
        await hub.stop()
        await client.aclose()
        await pubsub_client.aclose()


async def test_a_crowd_arriving_while_a_log_read_is_in_flight_shares_it(make_hub, monkeypatch):
    """Waiters on one run come one request at a time, each reading the log as soon as it registers:
    while nothing went by live on the run since a read started, they all join that read."""
    parts = await make_hub()
    async with parts.runs.subscribe(DAG, "crowd") as witness:
        for i in range(3):
            await parts.emit("crowd", task_id=f"t{i}", try_number=1)
        # Every event has gone by live before the crowd comes (a message still on its way when a
        # read has started rightly makes the next waiter read again: it may hold what the read missed).
        await until(lambda: len(witness.queue) == 3)
        await _crowd_shares_one_read(parts, monkeypatch)


async def _crowd_shares_one_read(parts, monkeypatch) -> None:
    gate, real_xrange, calls = asyncio.Event(), parts.client.xrange, []

    async def gated_xrange(*args, **kwargs):
        calls.append(1)
        await gate.wait()
        return await real_xrange(*args, **kwargs)

    monkeypatch.setattr(parts.client, "xrange", gated_xrange)

    async def waiter() -> list[int]:
        async with parts.runs.subscribe(DAG, "crowd") as sub:
            return [item.seq for item in await sub.backlog()]

    crowd = []
    for _ in range(10_000):  # each in its own turn of the loop, as requests arrive
        crowd.append(asyncio.create_task(waiter()))
        await asyncio.sleep(0)
    gate.set()
    assert all(seqs == [1, 2, 3] for seqs in await asyncio.gather(*crowd))
    assert len(calls) == 1
