"""StoredHistories: runs' stored histories, read for a crowd of runs in a few queries. A caller on a
new run reads a replay log that cannot tell whether it begins the run's history (empty, or a first
epoch unseen here) and must read the store; 10,000 callers on 10,000 new runs cost 10,000 events
queries queued on the store's pool."""

from __future__ import annotations

import asyncio

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import START, Position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.connect import async_client
from runbell.listeners.publisher import Publisher, emit
from runbell.service.core.metrics import Metrics
from runbell.service.live.hub import Hub
from runbell.service.live.topics import RunTopic, StoredHistories
from runbell.service.store.recorder import Recorder

DAG = "etl"
HISTORY = "an envelope"  # what the archive holds of each stored run (the batching does not look inside)


@pytest.fixture
def publisher(redis_url, namespace, tmp_path):
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))


class CountingArchive:
    """An archive that holds events of `stored` runs and counts the questions it is asked."""

    def __init__(self, stored: set[tuple[str, str]], fail: int = 0):
        self.stored, self.fail = stored, fail
        self.batches: list[list[tuple[str, str]]] = []
        self.events_read: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None

    async def histories(self, runs):
        self.batches.append(list(runs))
        found = {run: [HISTORY] for run in runs if run in self.stored}  # read now, answered after the gate
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the store is down")
        return found

    async def events(self, dag_id, run_id, after=START, limit=None):
        self.events_read.append((dag_id, run_id))
        return []


async def test_a_crowd_of_runs_is_asked_about_in_batches_and_each_gets_its_own_answer():
    runs = [(DAG, f"r{i}") for i in range(1200)]
    archive = CountingArchive(stored={runs[7], runs[1100]})
    stored = StoredHistories(archive, batch=500)
    answers = await asyncio.gather(*(stored.history(run) for run in runs))
    assert [len(batch) for batch in archive.batches] == [500, 500, 200]
    assert sorted(run for batch in archive.batches for run in batch) == sorted(runs)  # each asked once
    assert [(run, history) for run, history in zip(runs, answers) if history] == [(runs[7], [HISTORY]), (runs[1100], [HISTORY])]
    assert answers.count([]) == len(runs) - 2
    assert stored.asking is None and not stored.waiting


async def test_a_run_asked_about_twice_at_once_is_asked_once():
    archive = CountingArchive(stored={(DAG, "a")})
    stored = StoredHistories(archive)
    assert await asyncio.gather(*(stored.history((DAG, "a")) for _ in range(50))) == [[HISTORY]] * 50
    assert archive.batches == [[(DAG, "a")]]


async def test_a_question_asked_while_a_query_is_out_waits_for_the_next_one():
    """The query out may have read the store before the question was asked: its answer is not taken."""
    archive = CountingArchive(stored=set())
    archive.gate = asyncio.Event()
    stored = StoredHistories(archive)
    first = asyncio.create_task(stored.history((DAG, "a")))
    await asyncio.sleep(0.01)
    assert archive.batches == [[(DAG, "a")]]
    archive.stored.add((DAG, "a"))  # recorded after the first query read the store
    second = asyncio.create_task(stored.history((DAG, "a")))
    await asyncio.sleep(0.01)
    archive.gate.set()
    assert (await first, await second) == ([], [HISTORY])
    assert archive.batches == [[(DAG, "a")], [(DAG, "a")]]


async def test_a_store_error_reaches_each_asker_of_its_batch_and_the_next_question_is_answered():
    archive = CountingArchive(stored={(DAG, "a")}, fail=1)
    stored = StoredHistories(archive)
    results = await asyncio.gather(*(stored.history((DAG, r)) for r in ("a", "b")), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    assert await stored.history((DAG, "a")) == [HISTORY]


async def test_an_asker_that_left_does_not_stop_the_others_and_shutdown_leaves_none_waiting():
    archive = CountingArchive(stored={(DAG, "b")})
    archive.gate = asyncio.Event()
    stored = StoredHistories(archive)
    gone = asyncio.create_task(stored.history((DAG, "a")))
    staying = asyncio.create_task(stored.history((DAG, "b")))
    await asyncio.sleep(0.01)
    gone.cancel()
    archive.gate.set()
    assert await staying == [HISTORY]
    assert gone.cancelled()

    archive.gate.clear()
    first = asyncio.create_task(stored.history((DAG, "c")))
    await asyncio.sleep(0.01)
    later = asyncio.create_task(stored.history((DAG, "d")))  # waiting for the next query
    await asyncio.sleep(0.01)
    assert stored.asking is not None
    stored.asking.cancel()  # the loop shuts down
    await asyncio.gather(first, later, return_exceptions=True)
    assert first.cancelled() and later.cancelled()
    assert not stored.waiting


async def test_reads_from_the_start_share_queries_and_a_read_after_a_position_has_its_own(
    redis_url, namespace, store, publisher, redis_cleanup
):
    """On the real store (SQLite and PostgreSQL): 300 reads of runs nobody published and one of a run
    whose Redis state is gone but whose events the store recorded, all from the start and at once,
    read the store in one query for the first and one for the rest, never one each, and each has
    what it must; a read after a position asks the store for that run alone, as before."""
    aclient = async_client(redis_url, max_connections=50)  # as the gateway's: commands queue for a connection
    sync = redis.Redis.from_url(redis_url)
    runs = RunTopic(Hub(aclient, Metrics()), aclient, namespace, archive=store)
    asked: list[int] = []
    events_of: list[tuple[str, str]] = []
    histories, events = store.histories, store.events

    async def counted_histories(runs_asked):
        asked.append(len(runs_asked))
        while len(asked) == 1 and len(runs.histories.waiting) < 300:  # the first query is out until the rest have asked
            await asyncio.sleep(0.005)
        return await histories(runs_asked)

    async def counted_events(dag_id, run_id, **kw):
        events_of.append((dag_id, run_id))
        return await events(dag_id, run_id, **kw)

    try:
        for state in ("running", "success"):
            await asyncio.to_thread(emit, DAG, "lost", state, publisher=publisher)
        rec = Recorder(aclient, store, namespace, "reader-test", block_ms=100)
        while await rec.step():
            pass
        lost = keys.run_keys(namespace, DAG, "lost")
        sync.delete(lost.seq, lost.log, lost.ids, lost.epoch, lost.writer)  # Redis lost the run; the store keeps it
        store.histories, store.events = counted_histories, counted_events
        new = [(DAG, f"new-{i}") for i in range(300)]
        reads = await asyncio.gather(*(runs.read(key, START) for key in [*new, (DAG, "lost")]))
        assert reads[:-1] == [[]] * len(new)
        assert [e.event.state for e in reads[-1]] == ["running", "success"]
        assert asked == [1, 300]  # the first alone, then every one asked while it was out
        assert events_of == []

        first = reads[-1][0].position
        assert [e.event.state for e in await runs.read((DAG, "lost"), first)] == ["success"]
        assert events_of == [(DAG, "lost")] and asked == [1, 300]
    finally:
        store.histories, store.events = histories, events
        await aclient.aclose()
        sync.close()


async def test_the_stores_histories_are_each_runs_events_from_the_start(store):
    """Store.histories (SQLite and PostgreSQL) answers what events(run) answers, per run, in one call."""
    from runbell.bus.schema import Event, EventKind

    def envelope(run_id: str, seq: int, epoch: str):
        from runbell.bus.schema import Envelope

        state = "running" if seq == 1 else "success"
        return Envelope(seq=seq, epoch=epoch, event=Event(kind=EventKind.RUN, dag_id=DAG, run_id=run_id, state=state))

    await store.record([envelope("a", 1, "e1"), envelope("a", 2, "e1"), envelope("b", 1, "e2"), envelope("a", 1, "e3")])
    found = await store.histories([(DAG, "a"), (DAG, "b"), (DAG, "none"), (DAG, "a")])
    assert set(found) == {(DAG, "a"), (DAG, "b"), (DAG, "none")}
    for run in found:
        assert found[run] == await store.events(*run)
    assert [e.position for e in found[(DAG, "a")]] == [Position("e1", 1), Position("e1", 2), Position("e3", 1)]
    assert found[(DAG, "none")] == []
