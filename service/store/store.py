"""The gateway's durable store: every event once, each run's state and outcome, each task try.

Redis keeps a run's replay log for a while; the store keeps it for good, so a caller who arrives
after the log expired still gets the outcome. Writes are idempotent by (dag_id, run_id, epoch, seq)
(a run whose Redis state was lost numbers its events from 1 again in a new epoch: new events, not
repeats; see runbell.bus.schema) and safe when several gateway replicas record at once: events are
inserted with ON CONFLICT DO NOTHING, and each run's row is locked (PostgreSQL: SELECT ... FOR
UPDATE; SQLite: BEGIN IMMEDIATE) while its state is re-derived from all of its stored events.
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy import ColumnElement, String, and_, bindparam, func, literal, not_, or_, select, text, tuple_, update
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from runbell.bus.schema import (
    LEGACY_EPOCH,
    START,
    Envelope,
    ErrorInfo,
    Event,
    EventKind,
    Heartbeat,
    Position,
    Result,
    ResultRef,
    RunState,
    Source,
    TaskState,
    envelope_json,
)
from runbell.service.core import clock, metaflow_status, tracing
from runbell.service.core.outcome import Outcome, OutcomeFold, OutcomeStatus, decide
from runbell.service.store.models import EventRow, Run, RunProgress, TaskInstance, UTCDateTime, dialect_insert

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_SECONDS = 5.0
INSERT_CHUNK = 1000  # rows per INSERT: well under SQLite's and asyncpg's bind-parameter limits
NO_TRY = 0  # try_number of a task event that carries none (Airflow counts tries from 1)

RunKey = tuple[str, str]


# -- URLs -----------------------------------------------------------------------------------------


def normalize_database_url(url: str) -> str:
    """The async-driver form of a database URL: postgresql+asyncpg://, sqlite+aiosqlite://. A sync
    driver's name goes (postgresql+psycopg2://, as in Airflow's own sql_alchemy_conn): the gateway
    is async and ships those two drivers only."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    backend = scheme.partition("+")[0]
    if backend in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if backend == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    return url


@dataclass(frozen=True)
class RunRecord:
    """A run as stored. ``outcome`` is ``Outcome.model_dump(mode="json")``: the API body."""

    dag_id: str
    run_id: str
    state: str
    run_type: str | None
    logical_date: datetime | None
    run_after: datetime
    backfill_id: str | None
    started_at: datetime | None
    ended_at: datetime | None
    epoch: str  # the epoch of last_seq
    last_seq: int
    last_event_at: datetime
    outcome_status: str
    outcome: dict[str, Any]
    result_task: dict[str, Any] | None
    first_failure: dict[str, Any] | None
    heartbeat_at: datetime | None = None  # the newest heartbeat (Metaflow's tasks send them); None: none

    @property
    def alive_at(self) -> datetime:
        """When the run was last known alive: its last event or its newest heartbeat."""
        return max(self.last_event_at, self.heartbeat_at) if self.heartbeat_at is not None else self.last_event_at


@dataclass(frozen=True)
class RunChange:
    """What one recording transaction did to a run, for the outbox."""

    run: RunKey
    new: list[Envelope]  # the envelopes stored now, in position order
    history: list[Envelope]  # every stored envelope of the run, in position order
    decided: bool  # the outcome was pending before this transaction and is decided now


@dataclass(frozen=True)
class StoredProgress:
    """A run's latest progress value of one key (None: the chunks without a key), and where it stood."""

    key: str | None
    value: Any
    task_id: str
    map_index: int
    try_number: int | None
    position: Position
    at: datetime


RUN_STATES = ("queued", "running", "success", "failed", "unknown")  # what runs.state holds
KEYSET_ORDER = ("run_after", "dag_id", "run_id")  # the runs listing's order; unique per run


@dataclass(frozen=True)
class RunQuery:
    """A page of the runs listing: filters (each applied in SQL), order and keyset position."""

    dag_id: str | None = None
    dag_patterns: tuple[str, ...] = ()  # any of these DAG id patterns ('*' any characters; roles.DagScope)
    run_types: tuple[str, ...] = ()  # any of these
    backfill_id: str | None = None
    run_after_gte: datetime | None = None
    run_after_lte: datetime | None = None
    states: tuple[str, ...] = ()  # any of these
    descending: bool = True  # newest run_after first
    after: tuple[datetime, str, str] | None = None  # (run_after, dag_id, run_id) of the last row seen
    limit: int = 50
    # A Metaflow run still stored as running whose last event and heartbeat are older than this is failed
    # (runbell.service.core.metaflow_status, branch 5); None: as stored.
    heartbeat_cutoff: datetime | None = None


@dataclass(frozen=True)
class TaskInstanceRecord:
    task_id: str
    map_index: int
    try_number: int
    state: str
    started_at: datetime | None
    ended_at: datetime | None


class Outbox(Protocol):
    """Called inside each recording transaction (runbell.service.webhooks.outbox.WebhookOutbox)."""

    async def enqueue(self, conn: AsyncConnection, changes: Sequence[RunChange]) -> int: ...

    def committed(self, count: int) -> None: ...


# -- migrations -----------------------------------------------------------------------------------


def alembic_config(**attributes: Any) -> Config:
    """Alembic's configuration without an alembic.ini. env.py reads ``connection`` (a sync
    Connection, as AsyncConnection.run_sync hands out) or ``engine`` (an AsyncEngine, when no event
    loop is running) from the attributes."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes.update(attributes)
    return config


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(alembic_config(connection=connection), "head")


# Alembic's `context` is process-global, so stores of one process migrate one at a time (across
# processes, env.py's advisory lock or SQLite's BEGIN IMMEDIATE does it). One lock per event loop.
_migration_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _migration_lock() -> asyncio.Lock:
    return _migration_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


# -- the store ------------------------------------------------------------------------------------


class Store:
    def __init__(self, url: str, outbox: Outbox | None = None):
        self.url = normalize_database_url(url)
        self.outbox = outbox  # writes webhook messages in the transaction that records their events
        self._engine: AsyncEngine | None = None
        # SQLite has one writer at a time: this process's writers queue here, in order, rather than in
        # SQLite's busy handler (which sleeps and retries, unfairly: a writer could wait past the busy
        # timeout and fail with "database is locked" while others got in). Off on PostgreSQL. One lock
        # per event loop (a lock belongs to one).
        self._single_writer = False
        self._writers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the store is not started")
        return self._engine

    async def start(self) -> None:
        """Connect and bring the schema to the newest migration (concurrent starts are serialised)."""
        # asyncpg waits 60 s for a connection by default: too long for a health check or a retry.
        asyncpg = make_url(self.url).get_driver_name() == "asyncpg"
        connect_args = {"timeout": PG_CONNECT_TIMEOUT_SECONDS} if asyncpg else {}
        # hide_parameters: an error's message would quote its statement's values (a webhook's URL and
        # secret among them), and errors are logged.
        sqlite = make_url(self.url).get_backend_name() == "sqlite"
        # A ping before each checkout finds a server connection that died; a SQLite file has none (and
        # the ping would be one more statement, and thread hop, per transaction).
        engine = create_async_engine(self.url, pool_pre_ping=not sqlite, connect_args=connect_args, hide_parameters=True)
        if sqlite:
            _configure_sqlite(engine)
            self._single_writer = True
        self._engine = engine
        try:
            async with _migration_lock(), self._transaction(write=True) as conn:
                await conn.run_sync(_upgrade_to_head)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def ping(self) -> None:
        """Raises when the database cannot be reached."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def record(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Store envelopes not stored yet and update their runs, in one transaction.

        Returns the newly stored envelopes, in the order given (repeats within the call count once).
        The outbox, if any, enqueues their webhook messages in the same transaction. The statements
        are per batch, not per run or event (executemany), so a batch of many runs costs a few round
        trips. A progress envelope is no event of the store: only each key's latest value is kept
        (run_progress), and it moves its run's last position on (returned as stored when it does).
        """
        unique: dict[tuple[str, str, str, int], Envelope] = {}
        for envelope in envelopes:
            unique.setdefault(_event_key(envelope), envelope)
        by_run: dict[RunKey, list[Envelope]] = defaultdict(list)
        progress: dict[RunKey, list[Envelope]] = defaultdict(list)
        for envelope in unique.values():
            (progress if envelope.event.kind is EventKind.PROGRESS else by_run)[_run_key(envelope.event)].append(envelope)
        enqueued = 0
        async with self._transaction(write=True) as conn:
            first_ts = {run: batch[0].event.ts for run, batch in (progress | by_run).items()}
            status_before = (
                await _lock_runs(conn, sorted(first_ts.items())) if first_ts else {}
            )  # every run of the batch, in one lock order
            changes = await _record_runs(conn, by_run, status_before)
            changes += await _record_progress(conn, progress)
            if self.outbox is not None and changes:
                enqueued = await self.outbox.enqueue(conn, changes)
        if enqueued and self.outbox is not None:
            self.outbox.committed(enqueued)
        for change in changes:
            if change.decided:
                trace_decision(change)
        stored = {(*change.run, *envelope.position) for change in changes for envelope in change.new}
        return [envelope for key, envelope in unique.items() if key in stored]

    async def progress(self, dag_id: str, run_id: str) -> list[StoredProgress]:
        """The run's latest progress value per key, oldest first."""
        query = (
            select(RunProgress)
            .where(RunProgress.dag_id == dag_id, RunProgress.run_id == run_id)
            .order_by(RunProgress.epoch, RunProgress.seq)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            StoredProgress(
                key=row.key or None,
                value=row.value,
                task_id=row.task_id,
                map_index=row.map_index,
                try_number=row.try_number,
                position=Position(row.epoch, row.seq),
                at=row.ts,
            )
            for row in rows
        ]

    async def record_heartbeats(self, beats: Sequence[Heartbeat]) -> int:
        """Move each run's heartbeat time forward to its newest heartbeat here, in one transaction.
        Never back (late or repeated heartbeats change nothing), and a run not stored is left alone
        (its events come first on its stream). Returns how many runs moved."""
        newest: dict[RunKey, float] = {}
        for beat in beats:
            run = (beat.dag_id, beat.run_id)
            newest[run] = max(beat.ts, newest.get(run, beat.ts))
        if not newest:
            return 0
        moved = 0
        async with self._transaction(write=True) as conn:
            for (dag_id, run_id), ts in sorted(newest.items()):  # one lock order for every writer
                at = clock.from_epoch(ts)
                statement = (
                    update(Run)
                    .where(Run.dag_id == dag_id, Run.run_id == run_id, or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < at))
                    .values(heartbeat_at=at)
                )
                moved += (await conn.execute(statement)).rowcount
        return moved

    async def events(self, dag_id: str, run_id: str, after: Position = START, limit: int | None = None) -> list[Envelope]:
        """The run's stored envelopes after a position, in position order (epoch, then seq)."""
        query = (
            select(EventRow.envelope)
            .where(EventRow.dag_id == dag_id, EventRow.run_id == run_id, tuple_(EventRow.epoch, EventRow.seq) > tuple_(*after))
            .order_by(EventRow.epoch, EventRow.seq)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).scalars().all()
        return [stored_envelope(row) for row in rows]

    async def histories(self, runs: Iterable[RunKey]) -> dict[RunKey, list[Envelope]]:
        """Every stored envelope of each of these runs, in position order: events(run) of each, in one
        query per INSERT_CHUNK runs (an empty list for a run with none)."""
        async with self.engine.connect() as conn:
            return await _histories(conn, sorted(set(runs)))

    async def last_position(self, dag_id: str, run_id: str) -> Position:
        """The last stored position of the run; START when none is stored."""
        return (await self.last_positions([(dag_id, run_id)])).get((dag_id, run_id), START)

    async def last_positions(self, runs: Iterable[RunKey]) -> dict[RunKey, Position]:
        """The last stored position of each of these runs that has any."""
        wanted = sorted(set(runs))
        if not wanted:
            return {}
        query = select(Run.dag_id, Run.run_id, Run.epoch, Run.last_seq).where(tuple_(Run.dag_id, Run.run_id).in_(wanted))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(row.dag_id, row.run_id): Position(row.epoch, row.last_seq) for row in rows if row.last_seq > 0}

    async def get_run(self, dag_id: str, run_id: str) -> RunRecord | None:
        query = select(Run).where(Run.dag_id == dag_id, Run.run_id == run_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return RunRecord(**{column.key: getattr(row, column.key) for column in Run.__table__.columns})

    async def get_runs(self, runs: Iterable[RunKey]) -> dict[RunKey, RunRecord]:
        """The stored runs among these (the ones not stored are left out)."""
        wanted = sorted(set(runs))
        found: dict[RunKey, RunRecord] = {}
        async with self.engine.connect() as conn:
            for start in range(0, len(wanted), INSERT_CHUNK):
                query = select(Run).where(tuple_(Run.dag_id, Run.run_id).in_(wanted[start : start + INSERT_CHUNK]))
                for row in (await conn.execute(query)).all():
                    found[(row.dag_id, row.run_id)] = _run_record(row)
        return found

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """One page of runs in keyset order (run_after, dag_id, run_id), every filter in the WHERE.

        Paging resumes strictly after ``query.after``, so runs inserted meanwhile never shift a page:
        no row is repeated or skipped (a new run shows up if its place is still ahead)."""
        columns = [Run.run_after, Run.dag_id, Run.run_id]
        statement = select(Run)
        if query.dag_id is not None:
            statement = statement.where(Run.dag_id == query.dag_id)
        if query.dag_patterns:
            statement = statement.where(or_(*(self._dag_id_matches(p) for p in query.dag_patterns)))
        if query.run_types:
            statement = statement.where(Run.run_type.in_(query.run_types))
        if query.backfill_id is not None:
            statement = statement.where(Run.backfill_id == query.backfill_id)
        if query.run_after_gte is not None:
            statement = statement.where(Run.run_after >= query.run_after_gte)
        if query.run_after_lte is not None:
            statement = statement.where(Run.run_after <= query.run_after_lte)
        if query.states:
            statement = statement.where(self._state_matches(query.states, query.heartbeat_cutoff))
        if query.after is not None:
            statement = statement.where(_keyset_predicate(query.after, query.dag_id, query.descending))
        order = [c.desc() for c in columns] if query.descending else [c.asc() for c in columns]
        statement = statement.order_by(*order).limit(query.limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(statement)).all()
        return [_run_record(row) for row in rows]

    def _state_matches(self, states: tuple[str, ...], heartbeat_cutoff: datetime | None) -> ColumnElement[bool]:
        """The listed state (metaflow_status.listed_state) is one of these, in SQL. Written as the
        stored state plus or minus the silent Metaflow runs, so the state index still serves it."""
        matches: ColumnElement[bool] = Run.state.in_(states)
        if heartbeat_cutoff is None:
            return matches
        silent = and_(
            func.coalesce(Run.run_type, "") == metaflow_status.RUN_TYPE,
            Run.state == metaflow_status.RUNNING,
            Run.last_event_at < heartbeat_cutoff,
            or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < heartbeat_cutoff),
        )
        if metaflow_status.RUNNING in states:
            matches = and_(matches, not_(silent))
        if metaflow_status.FAILED in states:
            matches = or_(matches, silent)
        return matches

    def _dag_id_matches(self, pattern: str) -> ColumnElement[bool]:
        """dag_id matches the pattern ('*' any characters, the rest itself, case-sensitively), in SQL:
        GLOB on SQLite (its LIKE ignores case), LIKE elsewhere; the other wildcards are escaped."""
        parts = pattern.split("*")
        if self.engine.dialect.name == "sqlite":
            glob = "*".join(re.sub(r"([\[?])", r"[\1]", part) for part in parts)
            return Run.dag_id.op("GLOB", is_comparison=True)(glob)
        like = "%".join(re.sub(r"([\\%_])", r"\\\1", part) for part in parts)
        return Run.dag_id.like(like, escape="\\")

    async def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstanceRecord]:
        """The run's task tries: by start (not started last), then task_id, map_index, try_number."""
        query = (
            select(TaskInstance)
            .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .order_by(
                TaskInstance.started_at.is_(None),
                TaskInstance.started_at,
                TaskInstance.task_id,
                TaskInstance.map_index,
                TaskInstance.try_number,
            )
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [TaskInstanceRecord(r.task_id, r.map_index, r.try_number, r.state, r.started_at, r.ended_at) for r in rows]

    @asynccontextmanager
    async def _transaction(self, write: bool) -> AsyncIterator[AsyncConnection]:
        if write and self._single_writer:
            async with self._writers.setdefault(asyncio.get_running_loop(), asyncio.Lock()):
                async with self._begin(write) as conn:
                    yield conn
        else:
            async with self._begin(write) as conn:
                yield conn

    @asynccontextmanager
    async def _begin(self, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if write:
                await conn.execution_options(runbell_write=True)
            async with conn.begin():
                yield conn


def _run_record(row: Any) -> RunRecord:
    return RunRecord(**{column.key: getattr(row, column.key) for column in Run.__table__.columns})


def _keyset_predicate(after: tuple[datetime, str, str], dag_id: str | None, descending: bool) -> Any:
    """Rows strictly past ``after`` in the listing's order: a row-value comparison, which both
    PostgreSQL and SQLite answer from the keyset indexes. With one DAG (the cursor's own), the
    comparison leaves dag_id out so that ix_runs_dag_keyset serves it."""
    run_after, after_dag, after_run = after
    at = bindparam("keyset_run_after", run_after, type_=UTCDateTime())
    if dag_id is not None and dag_id == after_dag:
        left, right = tuple_(Run.run_after, Run.run_id), tuple_(at, literal(after_run, String()))
    else:
        left = tuple_(Run.run_after, Run.dag_id, Run.run_id)
        right = tuple_(at, literal(after_dag, String()), literal(after_run, String()))
    return left < right if descending else left > right


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE for writers.

    A deferred transaction that reads and then writes fails at once with SQLITE_BUSY when another
    writer got in between; taking the write lock at BEGIN makes writers queue (busy timeout) instead.
    sqlite3's own BEGIN handling is turned off so that SQLAlchemy's begin event decides.
    """

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("runbell_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# -- recording a batch of runs --------------------------------------------------------------------


def trace_decision(change: RunChange) -> None:
    """The span of a run's outcome decided (once, by the recorder that stored the deciding event), a
    child of the deciding event's span: for a run with a trace context only."""
    fold = OutcomeFold(*change.run)
    for envelope in change.history:
        if fold.apply(envelope):
            if envelope.event.trace is not None:
                outcome = fold.outcome
                attributes = {
                    "runbell.dag_id": outcome.dag_id,
                    "runbell.run_id": outcome.run_id,
                    "runbell.status": outcome.status.value,
                    "runbell.decided_by": outcome.decided_by.value if outcome.decided_by else "",
                    "runbell.seq": envelope.seq,
                }
                with tracing.span("runbell.outcome.decided", envelope.event.trace, attributes=attributes):
                    pass
            return


async def _record_runs(conn: AsyncConnection, by_run: dict[RunKey, list[Envelope]], status_before: dict[RunKey, str]) -> list[RunChange]:
    """Insert the runs' new events and re-derive each touched run's row from all its events, a few
    statements for the whole batch (the runs locked already: _lock_runs). Returns what changed, per
    run with new events, in run order."""
    if not by_run:
        return []
    runs = sorted(by_run)
    rows = [_event_row(envelope) for run in runs for envelope in sorted(by_run[run], key=lambda e: e.position)]
    new: dict[RunKey, set[Position]] = defaultdict(set)
    inserted = await conn.execute(
        dialect_insert(conn, EventRow).on_conflict_do_nothing().returning(EventRow.dag_id, EventRow.run_id, EventRow.epoch, EventRow.seq),
        rows,
    )
    for dag_id, run_id, epoch, seq in inserted:
        new[(dag_id, run_id)].add(Position(epoch, seq))
    if not new:
        return []
    touched = sorted(new)
    histories = await _histories(conn, touched)
    changes: list[RunChange] = []
    run_rows: list[dict[str, Any]] = []
    task_rows: list[dict[str, Any]] = []
    pending = OutcomeStatus.PENDING.value
    for run in touched:
        history, positions = histories[run], new[run]
        values = _run_values(run, history)
        run_rows.append({"b_dag_id": run[0], "b_run_id": run[1], **values})
        decided = status_before.get(run) == pending and values["outcome_status"] != pending
        changes.append(RunChange(run, [e for e in history if e.position in positions], history, decided))
        tries = {_try_key(e.event) for e in by_run[run] if e.position in positions and e.event.kind is EventKind.TASK}
        task_rows.extend(_task_instance_rows(run, history, tries))
    await conn.execute(_RUN_UPDATE, run_rows)
    if task_rows:
        insert = dialect_insert(conn, TaskInstance)
        upsert = insert.on_conflict_do_update(
            index_elements=list(TaskInstance.__table__.primary_key.columns),  # type: ignore[attr-defined]  # __table__ is typed FromClause; it is a Table
            set_={name: insert.excluded[name] for name in ("state", "started_at", "ended_at")},
        )
        await conn.execute(upsert, task_rows)
    return changes


async def _record_progress(conn: AsyncConnection, by_run: dict[RunKey, list[Envelope]]) -> list[RunChange]:
    """Keep each key's latest progress value (newer positions only) and move each run's last position
    on to its newest progress (the recorder reads a seq past it as a gap). The runs are locked already.
    Every progress envelope given is passed on as new: the outbox's messages are unique per position,
    so one recorded twice is enqueued once."""
    if not by_run:
        return []
    latest: dict[tuple[str, str, str], tuple[Envelope, Any]] = {}
    for run in sorted(by_run):
        for envelope in sorted(by_run[run], key=lambda e: e.position):
            for item in envelope.event.progress.items if envelope.event.progress else ():
                latest[(run[0], run[1], item.key or "")] = (envelope, item.value)
    rows = [
        dict(
            dag_id=dag_id,
            run_id=run_id,
            key=key,
            task_id=envelope.event.task_id or "",
            map_index=envelope.event.map_index,
            try_number=envelope.event.try_number,
            epoch=envelope.epoch,
            seq=envelope.seq,
            value=value,
            ts=clock.from_epoch(envelope.event.ts),
        )
        for (dag_id, run_id, key), (envelope, value) in sorted(latest.items())
    ]
    insert = dialect_insert(conn, RunProgress)
    columns = ("task_id", "map_index", "try_number", "epoch", "seq", "value", "ts")
    newer = tuple_(RunProgress.epoch, RunProgress.seq) < tuple_(insert.excluded.epoch, insert.excluded.seq)
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=[RunProgress.dag_id, RunProgress.run_id, RunProgress.key],
            set_={name: insert.excluded[name] for name in columns},
            where=newer,
        ),
        rows,
    )
    newest = [
        {"b_dag_id": run[0], "b_run_id": run[1], "b_epoch": position.epoch, "b_seq": position.seq}
        for run in sorted(by_run)
        for position in [max(envelope.position for envelope in by_run[run])]
    ]
    await conn.execute(_PROGRESS_POSITION, newest)
    return [RunChange(run, sorted(by_run[run], key=lambda e: e.position), [], False) for run in sorted(by_run)]


_PROGRESS_POSITION = (
    update(Run)
    .where(
        Run.dag_id == bindparam("b_dag_id"),
        Run.run_id == bindparam("b_run_id"),
        tuple_(Run.epoch, Run.last_seq) < tuple_(bindparam("b_epoch"), bindparam("b_seq")),
    )
    .values(epoch=bindparam("b_epoch"), last_seq=bindparam("b_seq"))
)


# Every column _run_values derives, set by primary key: one executemany for a batch's runs.
_RUN_COLUMNS = (
    "state",
    "run_type",
    "logical_date",
    "run_after",
    "backfill_id",
    "started_at",
    "ended_at",
    "epoch",
    "last_seq",
    "last_event_at",
    "outcome_status",
    "outcome",
    "result_task",
    "first_failure",
)
_RUN_UPDATE = (
    update(Run)
    .where(Run.dag_id == bindparam("b_dag_id"), Run.run_id == bindparam("b_run_id"))
    .values({name: bindparam(name) for name in _RUN_COLUMNS})
)


async def _lock_runs(conn: AsyncConnection, runs: list[tuple[RunKey, float]]) -> dict[RunKey, str]:
    """Make sure each run's row exists and hold its lock until commit, so that concurrent writers of
    one run take turns and each folds over every event committed before it. ``runs`` in key order
    (the order rows are inserted and locked in, the same for every writer). Returns each run's
    outcome status as it stands before this transaction."""
    placeholders = []
    for (dag_id, run_id), ts in runs:
        at = clock.from_epoch(ts)
        placeholders.append(
            dict(
                dag_id=dag_id,
                run_id=run_id,
                state="unknown",
                run_after=at,
                last_seq=0,
                last_event_at=at,
                outcome_status="pending",
                outcome={},
            )
        )
    await conn.execute(dialect_insert(conn, Run).on_conflict_do_nothing(), placeholders)
    found: dict[RunKey, str] = {}
    keys = [run for run, _ in runs]
    # PostgreSQL locks the rows in the ORDER BY's order: code points, as `runs` is sorted, so that chunk
    # after chunk every writer locks in one order (a locale's collation puts "a" before "B").
    order = [Run.dag_id, Run.run_id] if conn.dialect.name != "postgresql" else [Run.dag_id.collate("C"), Run.run_id.collate("C")]
    for start in range(0, len(keys), INSERT_CHUNK):
        query = (
            select(Run.dag_id, Run.run_id, Run.outcome_status)
            .where(tuple_(Run.dag_id, Run.run_id).in_(keys[start : start + INSERT_CHUNK]))
            .order_by(*order)
            .with_for_update()
        )
        for dag_id, run_id, status in await conn.execute(query):
            found[(dag_id, run_id)] = status
    return found


async def _histories(conn: AsyncConnection, runs: list[RunKey]) -> dict[RunKey, list[Envelope]]:
    """Every stored envelope of each run, in position order."""
    found: dict[RunKey, list[Envelope]] = {run: [] for run in runs}
    for start in range(0, len(runs), INSERT_CHUNK):
        query = (
            select(EventRow.dag_id, EventRow.run_id, EventRow.envelope)
            .where(tuple_(EventRow.dag_id, EventRow.run_id).in_(runs[start : start + INSERT_CHUNK]))
            .order_by(EventRow.dag_id, EventRow.run_id, EventRow.epoch, EventRow.seq)
        )
        for dag_id, run_id, raw in await conn.execute(query):
            found[(dag_id, run_id)].append(stored_envelope(raw))
    return found


def _event_row(envelope: Envelope) -> dict[str, Any]:
    event = envelope.event
    return dict(
        dag_id=event.dag_id,
        run_id=event.run_id,
        epoch=envelope.epoch,
        seq=envelope.seq,
        kind=event.kind.value,
        state=event.state,
        task_id=event.task_id,
        ts=clock.from_epoch(event.ts),
        envelope=envelope_json(envelope.seq, event.to_json(), envelope.epoch),
    )


def _run_values(run: RunKey, history: list[Envelope]) -> dict[str, Any]:
    """The runs row from all of the run's events (in position order) and their outcome."""
    outcome: Outcome = decide(history, *run)
    events = [envelope.event for envelope in history]
    run_events = [e for e in events if e.kind is EventKind.RUN]
    # Airflow's run fields: the newest value any run event carried.
    latest = {
        name: next((getattr(e, name) for e in reversed(run_events) if getattr(e, name)), None)
        for name in ("run_type", "logical_date", "run_after", "backfill_id")
    }
    # A task event means the run is running, as the outcome rules also assume.
    running = [e.ts for e in events if e.kind is EventKind.TASK or e.state == RunState.RUNNING.value]
    ended = [e.ts for e in run_events if e.run_state.terminal]
    last_event_at = max(e.ts for e in events)
    state = outcome.run_state
    if latest["run_type"] == metaflow_status.RUN_TYPE:  # Metaflow's own rules (branch 5 is the listing's)
        state = metaflow_status.metaflow_status(metaflow_status.end_attempts(events), last_event_at, now=last_event_at, cutoff=0)
    return dict(
        state=state,
        run_type=latest["run_type"],
        logical_date=_parse_time(latest["logical_date"]),
        # Runs without Airflow's run_after (emit) are listed by when they were first seen.
        run_after=_parse_time(latest["run_after"]) or clock.from_epoch(min(e.ts for e in events)),
        backfill_id=latest["backfill_id"],
        started_at=clock.from_epoch(min(running)) if running else None,
        ended_at=clock.from_epoch(ended[-1]) if ended else None,
        epoch=history[-1].epoch,
        last_seq=history[-1].seq,
        last_event_at=clock.from_epoch(last_event_at),
        outcome_status=outcome.status.value,
        outcome=outcome.model_dump(mode="json"),
        result_task=outcome.result_task.model_dump(mode="json") if outcome.result_task else None,
        first_failure=outcome.failure.model_dump(mode="json") if outcome.failure else None,
    )


# A try ends with its first one of these; later contradicting events do not change it.
_TRY_ENDS = {TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED, TaskState.UP_FOR_RETRY}


def _task_instance_rows(run: RunKey, history: list[Envelope], touched: set[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """task_instances rows for the touched tries, each derived from all of that try's events."""
    tries: dict[tuple[str, int, int], list[Event]] = defaultdict(list)
    for envelope in history:
        event = envelope.event
        if event.kind is EventKind.TASK and _try_key(event) in touched:
            tries[_try_key(event)].append(event)
    rows = []
    for (task_id, map_index, try_number), events in sorted(tries.items()):
        end = next((e for e in events if e.task_state in _TRY_ENDS), None)
        started = [e.ts for e in events if e.task_state is TaskState.RUNNING]
        rows.append(
            dict(
                dag_id=run[0],
                run_id=run[1],
                task_id=task_id,
                map_index=map_index,
                try_number=try_number,
                state=(end or events[-1]).state,
                started_at=clock.from_epoch(min(started)) if started else None,
                ended_at=clock.from_epoch(end.ts) if end else None,
            )
        )
    return rows


def _event_key(envelope: Envelope) -> tuple[str, str, str, int]:
    return envelope.event.dag_id, envelope.event.run_id, envelope.epoch, envelope.seq


def _run_key(event: Event) -> RunKey:
    return event.dag_id, event.run_id


def _try_key(event: Event) -> tuple[str, int, int]:
    try_number = event.try_number if event.try_number is not None else NO_TRY
    return event.task_id or "", event.map_index, try_number


def _parse_time(value: str | None) -> datetime | None:
    """A time the hook sent as text; None when absent or unreadable (it must not stop the recording)."""
    if not value:
        return None
    try:
        return clock.parse(value)
    except ValueError:
        return None


def stored_envelope(raw: str | bytes) -> Envelope:
    """An envelope as the store kept it. Validated; but one recorded under an older, looser schema
    (a msg longer than today's bound, say) is taken as it was stored: the store's history must stay
    readable, and a run's new events must not be refused for what an old one holds."""
    try:
        return Envelope.model_validate_json(raw)
    except ValidationError:
        data = json.loads(raw)
        return Envelope.model_construct(epoch=data.get("epoch", LEGACY_EPOCH), seq=data["seq"], event=_stored_event(data["event"]))


def _stored_event(data: dict[str, Any]) -> Event:
    fields = {**data, "kind": EventKind(data["kind"]), "source": Source(data.get("source", Source.HOOK.value))}
    if isinstance(result := data.get("result"), dict):
        ref = result.get("ref")
        fields["result"] = Result.model_construct(**{**result, "ref": ResultRef.model_construct(**ref) if isinstance(ref, dict) else None})
    if isinstance(error := data.get("error"), dict):
        fields["error"] = ErrorInfo.model_construct(**error)
    return Event.model_construct(**fields)
