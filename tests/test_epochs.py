"""Epochs: a run's events are numbered (epoch, seq), and the epoch changes when Redis lost the run's
state, so a sequence that starts again at 1 is never taken for the one before. The publish script
against real Redis, the envelope and SSE id formats, the outcome fold and the recorder across epochs
(the hub, the store and the HTTP streams in test_hub.py, test_store.py, test_gateway.py; a real
redis-server restarted empty in tests/chaos/test_redis_data_loss.py)."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import (
    LEGACY_EPOCH,
    START,
    Envelope,
    Event,
    EventKind,
    Position,
    Result,
    decode_envelope,
    envelope_json,
    parse_position,
)
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit, emit_asset
from runbell.service.core.metrics import Metrics
from runbell.service.core.outcome import OutcomeFold, decide
from runbell.service.live.hub import Hub
from runbell.service.live.topics import RunTopic
from runbell.service.store.recorder import Recorder

DAG = "etl"


def run_event(state: str, run_id: str = "r", **kw) -> Event:
    kind = EventKind.TASK if kw.get("task_id") else EventKind.RUN
    return Event(kind=kind, dag_id=DAG, run_id=run_id, state=state, **kw)


# -- the wire format ----------------------------------------------------------------------------------


def test_an_envelope_without_epoch_is_read_with_the_legacy_epoch():
    event = run_event("running")
    legacy = decode_envelope('{"seq":3,"event":' + event.to_json() + "}")
    assert (legacy.epoch, legacy.seq, legacy.position) == (LEGACY_EPOCH, 3, Position("", 3))
    assert envelope_json(3, event.to_json()) == '{"seq":3,"event":' + event.to_json() + "}"  # what older readers read
    current = decode_envelope(envelope_json(3, event.to_json(), "6b1115ed4f992"))
    assert current.position == Position("6b1115ed4f992", 3) and current.event == event
    assert Position("", 99) < Position("6b1115ed4f992", 1) < Position("6b1115ed4f992", 2) < Position("6b1115ed4f993", 1)


@pytest.mark.parametrize(
    ("text", "position"),
    [("7", Position("", 7)), ("0", START), ("6b1115ed4f992-12", Position("6b1115ed4f992", 12)), ("a-0", Position("a", 0))],
)
def test_sse_ids_are_positions(text, position):
    assert parse_position(text) == position
    assert parse_position(str(position)) == position


@pytest.mark.parametrize(
    "text", ["", "-", "-1", "a-", "x-y", "A-1", "a-b-1", "1.5", "²", "1²", "a²-1", "٣", "a-٣", "9" * 19, "a" * 33 + "-1", " 1", "1 "]
)
def test_malformed_ids_are_refused(text):
    assert parse_position(text) is None


# -- the publish script ------------------------------------------------------------------------------


@pytest.fixture
def client(redis_url, redis_cleanup):
    with redis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
def publisher(redis_url, namespace, tmp_path):
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))


def logged(client: redis.Redis, namespace: str, run_id: str = "r") -> list[Envelope]:
    return [decode_envelope(fields[b"env"]) for _, fields in client.xrange(keys.run_keys(namespace, DAG, run_id).log)]


def test_a_run_keeps_its_epoch_until_redis_loses_its_state(client, publisher, namespace):
    k = keys.run_keys(namespace, DAG, "r")
    first = run_event("running")
    assert [publisher.publish(e) for e in (first, run_event("running", task_id="t"))] == [1, 2]
    epoch = client.get(k.epoch).decode()
    assert [e.position for e in logged(client, namespace)] == [Position(epoch, 1), Position(epoch, 2)]
    assert client.ttl(k.epoch) > 0  # it expires with the run's other keys
    assert publisher.publish(first) == 1  # a re-send: its seq, in the same epoch
    other = run_event("running", run_id="other")
    publisher.publish(other)
    assert client.get(keys.run_keys(namespace, DAG, "other").epoch) is not None  # one epoch per run

    client.delete(k.seq, k.log, k.ids, k.epoch)  # what a restart without persistence leaves
    assert publisher.publish(first) == 1  # forgotten: numbered again, from 1
    assert publisher.publish(run_event("success")) == 2
    new = client.get(k.epoch).decode()
    assert new > epoch
    assert [e.position for e in logged(client, namespace)] == [Position(new, 1), Position(new, 2)]
    # The partition stream carries the epoch too (the recorder reads it there).
    on_stream = [decode_envelope(f[b"env"]) for _, f in client.xrange(k.stream) if b"other" not in f[b"env"]]
    assert [e.position for e in on_stream] == [  # the re-send is not on it: it was logged already
        Position(epoch, 1),
        Position(epoch, 2),
        Position(new, 1),
        Position(new, 2),
    ]


def test_a_sequence_starting_again_under_an_old_epoch_gets_a_new_one(client, publisher, namespace):
    """Only the seq counter lost (evicted, or state written by a publisher before epochs): seq 1 again
    must not reuse the epoch of the events that had it."""
    k = keys.run_keys(namespace, DAG, "r")
    publisher.publish(run_event("running"))
    publisher.publish(run_event("running", task_id="t"))
    epoch = client.get(k.epoch).decode()
    client.delete(k.seq)
    assert publisher.publish(run_event("success", task_id="t")) == 1
    again = client.get(k.epoch).decode()
    assert again > epoch
    assert [e.position for e in logged(client, namespace)] == [Position(again, 1)]  # the dead epoch's log is dropped
    client.delete(k.epoch)  # an epoch lost with its seq kept: the next event starts an epoch, seq goes on
    assert publisher.publish(run_event("success")) == 2
    last = client.get(k.epoch).decode()
    assert last > again and [e.position for e in logged(client, namespace)] == [Position(again, 1), Position(last, 2)]


def test_another_redis_server_writing_a_run_makes_a_new_epoch_and_the_seq_goes_on(client, publisher, namespace):
    """A restart from a stale snapshot or a promoted replica keeps the epoch but may have lost the last
    seqs: the next events would repeat positions readers saw. Another server's run_id in the writer
    key (what such a server finds) makes a new epoch; the seq is not reset."""
    k = keys.run_keys(namespace, DAG, "r")
    for event in (run_event("running"), run_event("running", task_id="t"), run_event("success", task_id="t")):
        publisher.publish(event)
    epoch = client.get(k.epoch).decode()
    this_server = client.info("server")["run_id"]
    assert client.get(k.writer).decode() == this_server and 0 < client.ttl(k.writer)  # it expires with the run
    publisher.publish(run_event("running", task_id="u"))
    assert client.get(k.epoch).decode() == epoch  # the same server: the same epoch

    kept = client.xrange(k.log, max="0-2")  # the state another server was left with: seq 3 and 4 lost
    client.delete(k.log)
    for entry_id, fields in kept:
        client.xadd(k.log, fields, id=entry_id)
    client.set(k.seq, 2)
    client.set(k.writer, "0" * 40)
    assert publisher.publish(run_event("success", task_id="answer", result_task=True, result=Result(value=1, size=1))) == 3
    assert publisher.publish(run_event("success")) == 4
    new = client.get(k.epoch).decode()
    assert new > epoch and client.get(k.writer).decode() == this_server
    assert [e.position for e in logged(client, namespace)] == [
        *(Position(epoch, seq) for seq in (1, 2)),
        Position(new, 3),
        Position(new, 4),
    ]


def test_state_from_before_writers_adopts_the_writer_and_keeps_its_epoch(client, publisher, namespace):
    k = keys.run_keys(namespace, DAG, "r")
    publisher.publish(run_event("running"))
    epoch = client.get(k.epoch).decode()
    client.delete(k.writer)  # written by a publisher from before writers were kept
    assert publisher.publish(run_event("running", task_id="t")) == 2
    assert client.get(k.epoch).decode() == epoch and client.get(k.writer) is not None
    assert [e.position for e in logged(client, namespace)] == [Position(epoch, 1), Position(epoch, 2)]


def test_a_new_epoch_follows_the_one_it_replaces_when_the_clock_is_behind(client, publisher, namespace):
    k = keys.run_keys(namespace, DAG, "r")
    publisher.publish(run_event("running"))
    client.set(k.epoch, "7fffffffffff0")  # made by a server whose clock was far ahead of this one's
    client.set(k.writer, "0" * 40)
    publisher.publish(run_event("running", task_id="t"))
    assert client.get(k.epoch).decode() == "7fffffffffff1"


def test_an_assets_writer_never_expires_and_a_new_one_makes_a_new_epoch(client, publisher, namespace):
    emit_asset("s3://lake/orders", publisher=publisher)
    k = keys.asset_keys(namespace, "s3://lake/orders")
    epoch = client.get(k.epoch).decode()
    assert client.get(k.writer) is not None and client.ttl(k.writer) == -1
    client.set(k.writer, "0" * 40)
    assert emit_asset("s3://lake/orders", publisher=publisher) == 2
    assert client.get(k.epoch).decode() > epoch


def test_without_info_the_writer_is_empty_and_epochs_are_as_before(namespace, tmp_path):
    """fakeredis (the development broker) has no INFO in Lua: no writer is kept, nothing changes."""
    fake = fakeredis.FakeRedis()
    k = keys.run_keys(namespace, DAG, "r")
    pub = Publisher(PublisherConfig(redis_url="redis://fake", namespace=namespace, spool_dir=tmp_path, timeout_seconds=5), client=fake)
    assert [pub.publish(e) for e in (run_event("running"), run_event("running", task_id="t"))] == [1, 2]
    epoch = fake.get(k.epoch).decode()
    assert fake.get(k.writer) is None
    assert [e.position for e in logged(fake, namespace)] == [Position(epoch, 1), Position(epoch, 2)]


def test_an_assets_epoch_never_expires(client, publisher, namespace):
    emit_asset("s3://lake/orders", publisher=publisher)
    k = keys.asset_keys(namespace, "s3://lake/orders")
    assert client.get(k.epoch) is not None and client.ttl(k.epoch) == -1


# -- the outcome across epochs -----------------------------------------------------------------------


def test_the_outcome_fold_takes_a_new_epochs_events_and_never_flips():
    old = [Envelope(epoch="a", seq=1, event=run_event("running")), Envelope(epoch="a", seq=2, event=run_event("running", task_id="t"))]
    new = [
        Envelope(epoch="b", seq=1, event=run_event("success", task_id="answer", result_task=True, result=Result(value=5, size=1))),
        Envelope(epoch="b", seq=2, event=run_event("failed")),
    ]
    fold = OutcomeFold(DAG, "r")
    assert [fold.apply(e) for e in old + new] == [False, False, True, False]
    assert (fold.outcome.status.value, fold.outcome.result, fold.outcome.decided_epoch, fold.outcome.decided_seq) == ("success", 5, "b", 1)
    assert (fold.outcome.epoch, fold.outcome.seq) == ("b", 2)
    assert not fold.apply(old[1])  # an older epoch's event: a replay
    assert decide(new[::-1] + old, DAG, "r") == fold.outcome  # any arrival order


# -- the recorder across epochs ----------------------------------------------------------------------


async def test_the_recorder_stores_a_new_epoch_and_fills_its_gaps_from_its_own_log(redis_url, namespace, store, publisher, redis_cleanup):
    aclient = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    sync = redis.Redis.from_url(redis_url)
    rec = Recorder(aclient, store, namespace, "replica-1", block_ms=100)
    k = keys.run_keys(namespace, DAG, "r")
    try:
        for event in (run_event("running"), run_event("running", task_id="t")):
            await asyncio.to_thread(publisher.publish, event)
        await rec.step()
        sync.delete(k.seq, k.log, k.ids, k.epoch)  # Redis lost the run (its recorded events stay stored)
        await asyncio.to_thread(emit, DAG, "r", "success", task_id="t", publisher=publisher)
        await asyncio.to_thread(emit, DAG, "r", "success", task_id="answer", result_task=True, result=9, publisher=publisher)
        await asyncio.to_thread(emit, DAG, "r", "success", publisher=publisher)
        stream = k.stream
        new_epoch = sync.get(k.epoch).decode()
        for entry_id, fields in sync.xrange(stream):  # the new epoch's seq 1-2 reach its log only
            if decode_envelope(fields[b"env"]).position in (Position(new_epoch, 1), Position(new_epoch, 2)):
                sync.xdel(stream, entry_id)
        while await rec.step():
            pass
        stored = [e.position for e in await store.events(DAG, "r")]
        old_epoch = stored[0].epoch
        assert stored == [Position(old_epoch, 1), Position(old_epoch, 2), *(Position(new_epoch, s) for s in (1, 2, 3))]
        run = await store.get_run(DAG, "r")
        assert (run.outcome_status, run.outcome["result"], run.outcome["decided_epoch"]) == ("success", 9, new_epoch)
    finally:
        await aclient.aclose()
        sync.close()


# -- the hub's reads across a server that kept part of a run ------------------------------------------


async def test_a_read_takes_what_the_store_has_beyond_a_log_that_went_back(redis_url, namespace, store, publisher, redis_cleanup):
    """Redis came back with seq 1-2 of a run whose seq 3 the store recorded (a stale snapshot, a
    promoted replica): a read from the start has seq 3 from the store, before and after the run goes on
    in a new epoch, and a read after seq 2 has seq 3 too."""
    aclient = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    sync = redis.Redis.from_url(redis_url)
    rec = Recorder(aclient, store, namespace, "replica-1", block_ms=100)
    runs = RunTopic(Hub(aclient, Metrics()), aclient, namespace, archive=store)
    k = keys.run_keys(namespace, DAG, "r")
    try:
        for event in (run_event("running"), run_event("running", task_id="t"), run_event("success", task_id="t")):
            await asyncio.to_thread(publisher.publish, event)
        while await rec.step():
            pass
        old = sync.get(k.epoch).decode()
        kept = sync.xrange(k.log, max="0-2")  # what the other server holds: seq 1-2
        sync.delete(k.log)
        for entry_id, fields in kept:
            sync.xadd(k.log, fields, id=entry_id)
        sync.set(k.seq, 2)
        sync.set(k.writer, "0" * 40)
        everything = [Position(old, 1), Position(old, 2), Position(old, 3)]
        for _ in range(2):  # the first read must not decide the log alone holds the run's history
            assert [e.position for e in await runs.read((DAG, "r"), START)] == everything

        await asyncio.to_thread(emit, DAG, "r", "success", task_id="answer", result_task=True, result=9, publisher=publisher)
        new = sync.get(k.epoch).decode()
        assert [e.position for e in await runs.read((DAG, "r"), START)] == [*everything, Position(new, 3)]
        assert [e.position for e in await runs.read((DAG, "r"), Position(old, 2))] == [Position(old, 3), Position(new, 3)]
        assert [e.position for e in await runs.read((DAG, "r"), Position(old, 3))] == [Position(new, 3)]
    finally:
        await aclient.aclose()
        sync.close()
