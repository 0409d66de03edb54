"""The reconciler on its own: Airflow's REST view turned into bus events, which runs it asks about and
when, and how it lives through Airflow's errors. Airflow and the publisher are fakes; the runs topic
is the real one, on a hub without Redis (only its in-memory bookkeeping is used)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from runbell.bus.schema import EventKind, Source
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.airflow.api import AirflowBadRequest, AirflowUnavailable
from runbell.service.airflow.reconciler import Reconciler, events_from_airflow
from runbell.service.core.loops import Backoff, LoopState
from runbell.service.core.metrics import Metrics
from runbell.service.live.hub import Hub, Signal
from runbell.service.live.topics import RunTopic

AFTER = 30.0
WAIT = 20.0  # upper bound for what should happen at once; never reached when it works


def ti(task_id: str, state: str | None, end: str | None = None, try_number: int = 1, map_index: int = -1) -> dict[str, Any]:
    return {"task_id": task_id, "state": state, "end_date": end, "try_number": try_number, "map_index": map_index}


# -- events_from_airflow ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_state, tis, expected",
    [
        ("running", [], [(None, "running")]),
        ("queued", [], [(None, "queued")]),
        ("success", [ti("a", "success", "2026-01-01T00:00:01Z")], [("a", "success"), (None, "success")]),
        # Tasks in the order they ended (ties by task id), the unfinished last; the run after them.
        (
            "failed",
            [ti("b", "failed", "2026-01-01T00:00:02Z"), ti("c", "running"), ti("a", "success", "2026-01-01T00:00:02Z")],
            [("a", "success"), ("b", "failed"), ("c", "running"), (None, "failed")],
        ),
        # States that are not events on the bus: the task did not run, or has not yet.
        (
            "running",
            [ti(t, s) for t, s in [("q", "queued"), ("s", "scheduled"), ("u", "upstream_failed"), ("d", "deferred"), ("n", None)]],
            [(None, "running")],
        ),
        (
            "running",
            [ti("r", "up_for_retry", "2026-01-01T00:00:01Z"), ti("k", "skipped", "2026-01-01T00:00:02Z")],
            [
                ("r", "up_for_retry"),
                ("k", "skipped"),
                (None, "running"),
            ],
        ),
        ("no_such_state", [ti("a", "success", "2026-01-01T00:00:01Z")], [("a", "success")]),
        (None, [], []),
    ],
)
def test_events_from_airflow(run_state, tis, expected):
    events = events_from_airflow("etl", "r1", {"state": run_state, "run_type": "manual"}, tis)
    assert [(e.task_id, e.state) for e in events] == expected
    assert all(e.source is Source.RECONCILER and (e.dag_id, e.run_id) == ("etl", "r1") for e in events)
    assert [e.kind for e in events if e.task_id is None] == [EventKind.RUN] * sum(1 for t, _ in expected if t is None)


def test_failed_tasks_carry_an_error_and_others_none():
    events = events_from_airflow(
        "etl", "r1", {"state": "running"}, [ti("f", "failed", "1"), ti("r", "up_for_retry", "2"), ti("s", "success", "3")]
    )
    assert [(e.task_id, e.error is not None) for e in events if e.task_id] == [("f", True), ("r", True), ("s", False)]


def test_event_ids_come_from_the_content_so_asking_again_publishes_nothing_new():
    run, tis = {"state": "failed"}, [ti("a", "failed", "1", try_number=1)]
    first = [e.id for e in events_from_airflow("etl", "r1", run, tis)]
    assert first == [e.id for e in events_from_airflow("etl", "r1", run, tis)]
    retried = [e.id for e in events_from_airflow("etl", "r1", run, [ti("a", "failed", "1", try_number=2)])]
    assert retried[0] != first[0] and retried[1] == first[1]  # another try is another event; the run's is the same
    assert len(set(first)) == len(first)
    other_run = [e.id for e in events_from_airflow("etl", "r2", run, tis)]
    assert not set(other_run) & set(first)


# -- fakes ---------------------------------------------------------------------------------------------


class FakeAirflow:
    """Answers from dicts; raises what `failing` holds (one exception or a list, taken in turn)."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str], dict[str, Any]] = {}
        self.tis: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.failing: list[Exception] = []
        self.asked: list[tuple[str, str]] = []

    async def get_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        self.asked.append((dag_id, run_id))
        if self.failing:
            raise self.failing[0] if len(self.failing) == 1 else self.failing.pop(0)
        return self.runs.get((dag_id, run_id))

    async def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.tis.get((dag_id, run_id), [])


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> int:
        self.events.append(event)
        return len(self.events)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def runs(redis_url, namespace, redis_cleanup) -> AsyncIterator[RunTopic]:
    client = aioredis.Redis.from_url(redis_url)  # the bus, asked whether it knows a run Airflow does not
    yield RunTopic(Hub(None, Metrics()), client, namespace)  # no listener: the reconciler uses the bookkeeping
    await client.aclose()


@contextlib.asynccontextmanager
async def waited_on(runs: RunTopic, run_id: str, silent_for: float) -> AsyncIterator[Any]:
    """Someone waits on the run here, and has heard nothing of it for `silent_for` seconds."""
    async with runs.subscribe("etl", run_id) as sub:
        runs.hub.heard[runs.route(("etl", run_id))] = time.monotonic() - silent_for
        yield sub


def reconciler(runs: RunTopic, airflow: FakeAirflow, publisher: FakePublisher, clock: Clock) -> Reconciler:
    return Reconciler(runs, airflow, publisher, AFTER, clock=clock)  # type: ignore[arg-type]


# -- which runs, when ----------------------------------------------------------------------------------


async def test_a_run_is_asked_about_once_silent_for_reconcile_after_then_at_a_doubling_interval(runs):
    airflow, publisher, clock = FakeAirflow(), FakePublisher(), Clock()
    airflow.runs[("etl", "quiet")] = {"state": "running"}
    rec = reconciler(runs, airflow, publisher, clock)
    async with waited_on(runs, "fresh", silent_for=AFTER / 2), waited_on(runs, "quiet", silent_for=AFTER * 2):
        assert await rec.step() == 1
        assert airflow.asked == [("etl", "quiet")]  # the fresh one is not silent long enough
        assert [(e.run_id, e.state) for e in publisher.events] == [("quiet", "running")]
        asked_at = []
        for _ in range(int(AFTER * 7)):  # one simulated second at a time
            clock.now += 1
            if await rec.step():
                asked_at.append(clock.now - 1000.0)
        assert asked_at == [2 * AFTER, 6 * AFTER]  # 2x, then 4x later: backing off while it stays silent


async def test_a_run_heard_from_again_is_forgotten(runs):
    airflow, clock = FakeAirflow(), Clock()
    airflow.runs[("etl", "r")] = {"state": "running"}
    rec = reconciler(runs, airflow, FakePublisher(), clock)
    async with waited_on(runs, "r", silent_for=AFTER * 2):
        assert await rec.step() == 1
        runs.hub.heard[runs.route(("etl", "r"))] = time.monotonic()  # an event came
        assert await rec.step() == 0
        assert rec._next == {}
    assert await rec.step() == 0  # nobody waits any more


async def test_a_run_airflow_does_not_have_closes_its_waiters_with_not_found(runs):
    airflow = FakeAirflow()
    rec = reconciler(runs, airflow, FakePublisher(), Clock())
    async with waited_on(runs, "ghost", silent_for=AFTER * 2) as sub:
        assert await rec.step() == 1
        assert list(sub.queue) == [Signal.NOT_FOUND]
    assert runs.is_missing("etl", "ghost")


async def test_a_run_the_bus_knows_but_airflow_does_not_is_not_closed(runs, redis_url, tmp_path, caplog):
    """A Metaflow run, or one published with `runbell emit`, is not Airflow's: Airflow's 404 does not
    end its waits (a long silent step would otherwise answer 404 to every waiter)."""
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=runs.namespace, spool_dir=tmp_path, timeout_seconds=5))
    assert await asyncio.to_thread(emit, "etl", "flow-run", "running", publisher=publisher) is not None
    rec = reconciler(runs, FakeAirflow(), FakePublisher(), Clock())
    with caplog.at_level(logging.INFO, logger="runbell.reconciler"):
        async with waited_on(runs, "flow-run", silent_for=AFTER * 2) as sub:
            assert await rec.step() == 1
            assert list(sub.queue) == []
    assert not runs.is_missing("etl", "flow-run")
    assert "not Airflow's" in caplog.text


# -- Airflow's errors ----------------------------------------------------------------------------------


async def test_an_unreachable_airflow_backs_the_loop_off_is_logged_once_and_its_end_too(runs, caplog):
    airflow, publisher = FakeAirflow(), FakePublisher()
    airflow.runs[("etl", "r")] = {"state": "success"}
    airflow.failing = [AirflowUnavailable("Airflow at http://af did not answer")]
    rec = reconciler(runs, airflow, publisher, Clock())
    rec.loop.backoff = Backoff(first=0.0001, cap=0.001)
    rec.loop.pause = 0.0001
    with caplog.at_level(logging.DEBUG, logger="runbell.reconciler"):
        async with waited_on(runs, "r", silent_for=AFTER * 2):
            rec.loop.start()
            async with asyncio.timeout(WAIT):
                while len(airflow.asked) < 10:
                    await asyncio.sleep(0.001)
            assert rec.loop.state is LoopState.FAILING and rec.loop.backoff.attempt >= 9
            airflow.failing = []
            async with asyncio.timeout(WAIT):
                while rec.loop.state is not LoopState.RUNNING:  # the step that published has returned
                    await asyncio.sleep(0.001)
            await rec.loop.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AirflowUnavailable" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "recovered after" in infos[0]
    assert [e.state for e in publisher.events] == ["success"]


async def test_an_error_about_one_run_is_logged_once_per_code_and_the_others_go_on(runs, caplog):
    airflow, publisher, clock = FakeAirflow(), FakePublisher(), Clock()
    rejected = AirflowBadRequest("Airflow rejected the request")
    rec = reconciler(runs, airflow, publisher, clock)
    with caplog.at_level(logging.WARNING, logger="runbell.reconciler"):
        async with waited_on(runs, "bad1", silent_for=AFTER * 2), waited_on(runs, "bad2", silent_for=AFTER * 2):
            for _ in range(3):
                airflow.failing = [rejected, rejected]  # one each
                await rec.step()
                clock.now += MAX_WAIT
    assert len(airflow.asked) == 6  # every round asked both: an error about a run does not stop the loop
    assert len([r for r in caplog.records if "cannot reconcile" in r.getMessage()]) == 1


MAX_WAIT = 10_000.0  # beyond any interval of the reconciler
