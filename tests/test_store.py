"""The store against real PostgreSQL and SQLite: idempotency, concurrency, ordering, outcomes."""

from __future__ import annotations

import asyncio
import random
import sys
from asyncio.subprocess import PIPE
from datetime import datetime, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from runbell.bus.schema import START, Envelope, ErrorInfo, Event, EventKind, Position, Result
from runbell.service.core.outcome import decide
from runbell.service.store.models import Base, EventRow, Run, TaskInstance
from runbell.service.store.store import Store, alembic_config, normalize_database_url

DAG, RUN = "etl", "manual__1"
T0 = 1_700_000_000.0


def run_event(state: str, *, run_id: str = RUN, ts: float = T0, **kw) -> Event:
    return Event(kind=EventKind.RUN, dag_id=DAG, run_id=run_id, state=state, ts=ts, **kw)


def task_event(task_id: str, state: str, *, run_id: str = RUN, ts: float = T0, try_number: int = 1, **kw):
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=run_id, task_id=task_id, state=state, ts=ts, try_number=try_number, **kw)


def numbered(*events: Event, start: int = 1, epoch: str = "") -> list[Envelope]:
    return [Envelope(epoch=epoch, seq=i, event=e) for i, e in enumerate(events, start=start)]


def a_run(run_id: str = RUN, length: int = 6) -> list[Envelope]:
    """A run whose result task succeeds last: running, tasks, success."""
    events = [run_event("running", run_id=run_id, ts=T0)]
    for i in range(length - 2):
        state = "running" if i % 2 == 0 else "success"
        events.append(task_event(f"t{i}", state, run_id=run_id, ts=T0 + i + 1))
    events.append(
        task_event(
            "answer", "success", run_id=run_id, ts=T0 + length, result_task=True, critical=True, result=Result(value={"rows": 3}, size=10)
        )
    )
    return numbered(*events)


def test_normalize_database_url():
    assert normalize_database_url("postgresql://u@h:5432/db") == "postgresql+asyncpg://u@h:5432/db"
    assert normalize_database_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_database_url("sqlite:///runbell.db") == "sqlite+aiosqlite:///runbell.db"
    assert normalize_database_url("sqlite:////abs/x.db") == "sqlite+aiosqlite:////abs/x.db"
    assert normalize_database_url("postgresql+asyncpg://h/db") == "postgresql+asyncpg://h/db"
    assert normalize_database_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    # Airflow's sql_alchemy_conn names sync drivers: the same database through the async one.
    assert normalize_database_url("postgresql+psycopg2://u:p@h/airflow") == "postgresql+asyncpg://u:p@h/airflow"
    assert normalize_database_url("postgresql+psycopg://h/db") == "postgresql+asyncpg://h/db"
    assert normalize_database_url("sqlite+pysqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert normalize_database_url("mysql+aiomysql://h/db") == "mysql+aiomysql://h/db"  # not ours to rewrite
    with pytest.raises(ValueError):
        normalize_database_url("runbell.db")


async def test_record_is_idempotent(store):
    envelopes = a_run()
    assert await store.record(envelopes[:4] + envelopes[:2]) == envelopes[:4]
    assert await store.record(envelopes[:4]) == []
    assert await store.record(envelopes) == envelopes[4:]
    assert await store.events(DAG, RUN) == envelopes


async def test_events_in_seq_order_with_after_seq_and_limit(store):
    envelopes = a_run(length=5)
    shuffled = [envelopes[i] for i in (2, 0, 4, 1, 3)]
    for envelope in shuffled:
        await store.record([envelope])
    assert await store.events(DAG, RUN) == envelopes
    assert [e.seq for e in await store.events(DAG, RUN, after=Position("", 2))] == [3, 4, 5]
    assert [e.seq for e in await store.events(DAG, RUN, after=Position("", 2), limit=2)] == [3, 4]
    assert await store.events(DAG, RUN, after=Position("", 5)) == []
    assert await store.last_position(DAG, RUN) == Position("", 5)


async def test_a_new_epoch_numbered_from_1_again_is_stored_not_dropped(store):
    """Redis lost the run's state and numbered its events from 1 again in a new epoch: those are new
    events, and the outcome they decide is kept (keyed by seq alone, they were taken for repeats)."""
    before = numbered(run_event("running"), task_event("extract", "running", ts=T0 + 1), epoch="6b0000000000a")
    after = numbered(
        task_event("extract", "success", ts=T0 + 2),
        task_event("answer", "success", ts=T0 + 3, result_task=True, result=Result(value=7, size=1)),
        run_event("success", ts=T0 + 4),
        epoch="6b0000000000b",
    )
    assert await store.record(before) == before
    assert await store.record(after + before) == after
    assert await store.events(DAG, RUN) == before + after
    assert await store.events(DAG, RUN, after=Position("6b0000000000a", 2)) == after
    assert await store.last_position(DAG, RUN) == Position("6b0000000000b", 3)
    run = await store.get_run(DAG, RUN)
    assert (run.outcome_status, run.outcome["result"], run.outcome["decided_epoch"], run.outcome["decided_seq"]) == (
        "success",
        7,
        "6b0000000000b",
        2,
    )
    assert (run.state, run.epoch, run.last_seq) == ("success", "6b0000000000b", 3)


async def test_unknown_run(store):
    assert await store.events(DAG, "nope") == []
    assert await store.last_position(DAG, "nope") == START
    assert await store.get_run(DAG, "nope") is None
    assert await store.last_positions([]) == {}


async def test_runs_are_kept_apart(store):
    first, second = a_run("r1", length=3), a_run("r2", length=5)
    assert len(await store.record(first + second)) == 8
    assert await store.last_positions([(DAG, "r1"), (DAG, "r2"), (DAG, "r3")]) == {
        (DAG, "r1"): Position("", 3),
        (DAG, "r2"): Position("", 5),
    }
    assert await store.events(DAG, "r1") == first


async def test_outcome_kept_in_runs_row_whatever_the_arrival_order(store):
    envelopes = a_run()
    await store.record(envelopes[-1:])  # the deciding event first, as after a gap
    run = await store.get_run(DAG, RUN)
    assert run.outcome_status == "success"
    assert run.outcome == decide(envelopes[-1:], DAG, RUN).model_dump(mode="json")
    await store.record(envelopes[:-1])
    run = await store.get_run(DAG, RUN)
    expected = decide(envelopes, DAG, RUN)
    assert run.outcome == expected.model_dump(mode="json")
    assert run.outcome["result"] == {"rows": 3}
    assert run.result_task == expected.result_task.model_dump(mode="json")
    assert run.result_task["task_id"] == "answer"
    assert run.first_failure is None
    assert run.last_seq == len(envelopes)


async def test_first_failure_and_run_fields(store):
    error = ErrorInfo(type="KeyError", message="'id'")
    envelopes = numbered(
        run_event(
            "queued", ts=T0, run_type="manual", logical_date="2024-05-01T00:00:00+00:00", run_after="2024-05-01T00:05:00Z", backfill_id="7"
        ),
        run_event("running", ts=T0 + 1),
        task_event("load", "running", ts=T0 + 2, critical=True),
        task_event("load", "failed", ts=T0 + 3, critical=True, error=error),
        run_event("failed", ts=T0 + 4, msg="task failed"),
    )
    await store.record(envelopes)
    run = await store.get_run(DAG, RUN)
    assert run.state == "failed"
    assert run.outcome_status == "failed"
    assert run.first_failure == {"task_id": "load", "map_index": -1, "try_number": 1, "error": {"type": "KeyError", "message": "'id'"}}
    assert run.run_type == "manual"
    assert run.backfill_id == "7"
    assert run.logical_date == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert run.run_after == datetime(2024, 5, 1, 0, 5, tzinfo=timezone.utc)
    assert run.started_at == datetime.fromtimestamp(T0 + 1, tz=timezone.utc)
    assert run.ended_at == datetime.fromtimestamp(T0 + 4, tz=timezone.utc)
    assert run.last_event_at == datetime.fromtimestamp(T0 + 4, tz=timezone.utc)


async def test_run_after_defaults_to_first_event(store):
    await store.record(numbered(task_event("t", "running", ts=T0 + 5), task_event("t", "success", ts=T0 + 9)))
    run = await store.get_run(DAG, RUN)
    assert run.run_after == datetime.fromtimestamp(T0 + 5, tz=timezone.utc)
    assert run.state == "running"
    assert run.logical_date is None


async def test_task_instances_one_row_per_try(store):
    envelopes = numbered(
        task_event("extract", "running", ts=T0, try_number=1),
        task_event("extract", "up_for_retry", ts=T0 + 1, try_number=1),
        task_event("extract", "running", ts=T0 + 2, try_number=2),
        task_event("fan", "success", ts=T0 + 3, map_index=0),
        task_event("fan", "success", ts=T0 + 4, map_index=1),
    )
    await store.record(envelopes[:3] + envelopes[3:])
    # The try's first end wins; a late contradicting event does not change it.
    await store.record(
        numbered(
            task_event("extract", "success", ts=T0 + 5, try_number=2), task_event("extract", "failed", ts=T0 + 6, try_number=2), start=6
        )
    )
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(select(TaskInstance).order_by(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.try_number))
        ).all()
    summary = [(r.task_id, r.map_index, r.try_number, r.state) for r in rows]
    assert summary == [
        ("extract", -1, 1, "up_for_retry"),
        ("extract", -1, 2, "success"),
        ("fan", 0, 1, "success"),
        ("fan", 1, 1, "success"),
    ]
    second_try = rows[1]
    assert second_try.started_at == datetime.fromtimestamp(T0 + 2, tz=timezone.utc)
    assert second_try.ended_at == datetime.fromtimestamp(T0 + 5, tz=timezone.utc)


async def test_concurrent_record_from_two_stores(database_url):
    """Two replicas on one database, recording overlapping batches at once: every event once."""
    stores = [Store(database_url), Store(database_url)]
    await asyncio.gather(*(s.start() for s in stores))  # concurrent migrations are serialised
    try:
        runs = {f"r{i}": a_run(f"r{i}", length=12) for i in range(4)}
        every = [e for envelopes in runs.values() for e in envelopes]
        rng = random.Random(7)

        async def replica(store: Store) -> list[Envelope]:
            order = every[:]
            rng.shuffle(order)
            stored = []
            for start in range(0, len(order), 7):
                stored += await store.record(order[start : start + 7])
            return stored

        first, second = await asyncio.gather(replica(stores[0]), replica(stores[1]))
        keys = lambda batch: {(e.event.run_id, e.seq) for e in batch}  # noqa: E731
        assert len(first) + len(second) == len(every)
        assert keys(first) | keys(second) == keys(every)
        for run_id, envelopes in runs.items():
            assert await stores[0].events(DAG, run_id) == envelopes
            run = await stores[1].get_run(DAG, run_id)
            assert run.outcome == decide(envelopes, DAG, run_id).model_dump(mode="json")
            assert run.last_seq == 12
        async with stores[0].engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(EventRow))).scalar() == len(every)
            assert (await conn.execute(select(func.count()).select_from(Run))).scalar() == len(runs)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_restart_keeps_data_and_schema(database_url):
    envelopes = a_run()
    store = Store(database_url)
    await store.start()
    await store.record(envelopes)
    await store.close()
    store = Store(database_url)
    await store.start()
    try:
        assert await store.events(DAG, RUN) == envelopes
    finally:
        await store.close()


async def test_processes_starting_together_migrate_once(database_url):
    """Replicas in separate processes start at the same moment on an empty database."""
    script = (
        "import asyncio, sys\n"
        "from runbell.service.store.store import Store\n"
        "async def main():\n"
        "    store = Store(sys.argv[1])\n"
        "    await store.start()\n"
        "    await store.ping()\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
    )
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", script, database_url, stderr=PIPE) for _ in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout=60)
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr.decode()[-2000:]


async def test_migrations_match_models(store):
    def diff(connection):
        context = MigrationContext.configure(connection, opts={"version_table": "runbell_alembic_version"})
        return compare_metadata(context, Base.metadata)

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"runs", "task_instances", "events", "runbell_alembic_version"} <= tables


def test_migrations_with_an_engine_outside_an_event_loop(database_url):
    """env.py's other entry: an AsyncEngine in the config attributes, no running loop."""
    engine = create_async_engine(normalize_database_url(database_url))
    command.upgrade(alembic_config(engine=engine), "head")

    async def version() -> str:
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM runbell_alembic_version"))).scalar()

    try:
        assert asyncio.run(version()) == ScriptDirectory.from_config(alembic_config()).get_current_head()
    finally:
        asyncio.run(engine.dispose())


async def test_ping(store, database_url):
    await store.ping()
    if not database_url.startswith("postgresql"):
        return
    name = database_url.rsplit("/", 1)[1]
    admin = create_async_engine(database_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()
    with pytest.raises(Exception):  # noqa: B017 (the driver's error for a dropped database varies by version)
        await asyncio.wait_for(store.ping(), timeout=10)


async def test_ping_before_start_raises():
    with pytest.raises(RuntimeError):
        await Store("sqlite:///never.db").ping()
