"""Backfills: one row per slot of an Airflow backfill, and its progress live over SSE.

Where the slots come from. A backfill's slots are its `backfill_dag_run` rows: their sort_ordinal,
logical_date, the run made for each, and for the slots Airflow skipped (no run) the reason it
recorded, `exception_reason` ("already exists", "in flight", "unknown").
- Airflow 3.4+ lists them: `GET /api/v2/backfills/{id}/dag_runs` (apache/airflow PR #67381; its
  shape is in runbell.service.airflow.api). Where RUNBELL_AIRFLOW_URL's Airflow has that route
  (probed, and probed again every few minutes), it is used, with `GET /api/v2/backfills/{id}`.
- Airflow 3.1 to 3.3 have only the backfill itself (`GET /api/v2/backfills/{id}`), and their dagRuns
  list cannot filter by backfill. There the gateway reads the `backfill`, `backfill_dag_run` and
  `dag_run` tables through SQLAlchemy when RUNBELL_AIRFLOW_DATABASE_URL is set: PostgreSQL sessions
  are opened with default_transaction_read_only, SQLite files with mode=ro; only SELECTs are ever
  sent. The database is also the fallback while the REST API fails.
Both give the same slots. With neither, these endpoints answer 503.

A slot's state is the gateway store's state of its run (what the run's events say), or what
Airflow's dag_run row says where that is further along (a run, or its latest event, the store has not
recorded yet).

GET /v1/backfills/{backfill_id}/events streams `slot` (a slot whose state changed) and `progress`
({done, failed, running, skipped, total}) events, each change followed by its progress; it starts
with a `progress` and ends with `end` (data: the final progress, id "end") once every slot is
terminal. Changes come from the runs' events through the hub (replay, then live), and from
re-reading the slots from Airflow every BACKFILL_POLL_SECONDS (a run whose events are lost still
ends). A reconnect with Last-Event-ID "end" to a finished backfill gets 204.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import anyio
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import START
from runbell.service.airflow.api import AirflowClient, AirflowError, NotFound, RouteMissing
from runbell.service.core.metrics import Metrics
from runbell.service.core.outcome import OutcomeFold
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import BackfillProgress, BackfillSlot, BackfillSlots
from runbell.service.http.errors import ApiError
from runbell.service.http.params import ascii_int, hub_with_room, int_param
from runbell.service.http.sse import EventStream, farewell
from runbell.service.live.hub import Hub, Signal, SubscriptionClosed
from runbell.service.live.topics import RunTopic
from runbell.service.settings import Settings
from runbell.service.store.models import UTCDateTime
from runbell.service.store.store import Store, normalize_database_url

log = logging.getLogger("runbell.backfills")

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
MAX_BACKFILL_ID = 2**31 - 1
MAX_OFFSET = 10**12 - 1  # twelve digits, as before: far beyond any backfill's slots
BACKFILL_POLL_SECONDS = 5.0  # how often a backfill stream re-reads its slots from Airflow
CONNECT_TIMEOUT_SECONDS = 5.0
REPLAY_SECONDS = 5.0  # the longest the stream's start waits for the runs' logs
END_ID = "end"
TERMINAL = ("success", "failed")
API_RETRY_SECONDS = 15.0  # after Airflow's REST API failed a read, the database serves for this long
_RANK = {"unknown": -1, "queued": 0, "running": 1, "success": 2, "failed": 2}


# -- Airflow's tables (the columns read; Airflow 3.x names) ----------------------------------------

_airflow = MetaData()
backfill_table = Table(
    "backfill",
    _airflow,
    Column("id", Integer, primary_key=True),
    Column("dag_id", String(250)),
    Column("completed_at", UTCDateTime()),
)
backfill_dag_run_table = Table(
    "backfill_dag_run",
    _airflow,
    Column("id", Integer, primary_key=True),
    Column("backfill_id", Integer),
    Column("dag_run_id", Integer),
    Column("exception_reason", String(250)),
    Column("logical_date", UTCDateTime()),
    Column("sort_ordinal", Integer),
)
dag_run_table = Table(
    "dag_run",
    _airflow,
    Column("id", Integer, primary_key=True),
    Column("dag_id", String(250)),
    Column("run_id", String(250)),
    Column("state", String(50)),
)


@dataclass(frozen=True)
class Backfill:
    id: int
    dag_id: str


@dataclass(frozen=True)
class Slot:
    sort_ordinal: int
    logical_date: datetime | None
    dag_id: str
    run_id: str | None  # None: Airflow made no run for this slot
    exception_reason: str | None  # why not, as Airflow recorded it
    state: str | None  # the run's state (the store's, else Airflow's); None without a run

    @property
    def terminal(self) -> bool:
        return self.run_id is None or self.state in TERMINAL

    def model(self) -> BackfillSlot:
        return BackfillSlot.model_validate(self, from_attributes=True)


class AirflowMetadata:
    """Reads backfills and their slots from Airflow's metadata database, read only."""

    def __init__(self, url: str):
        self.url = read_only_url(url)
        connect_args: dict[str, Any] = {}
        driver = make_url(self.url).get_driver_name()
        if driver == "asyncpg":
            connect_args = {"timeout": CONNECT_TIMEOUT_SECONDS, "server_settings": {"default_transaction_read_only": "on"}}
        elif driver == "aiosqlite":
            connect_args = {"timeout": CONNECT_TIMEOUT_SECONDS}  # waits while Airflow holds its write lock
        self.engine: AsyncEngine = create_async_engine(self.url, pool_pre_ping=True, connect_args=connect_args, hide_parameters=True)

    async def close(self) -> None:
        await self.engine.dispose()

    async def backfill(self, backfill_id: int) -> Backfill | None:
        query = select(backfill_table.c.id, backfill_table.c.dag_id).where(backfill_table.c.id == backfill_id)
        async with self._connect() as conn:
            row = (await conn.execute(query)).first()
        return Backfill(row.id, row.dag_id) if row else None

    async def slots(self, backfill: Backfill, limit: int | None = None, offset: int = 0) -> tuple[int, list[Slot]]:
        """(total_entries, the slots in sort_ordinal order from offset) with Airflow's run states."""
        bdr, dr = backfill_dag_run_table, dag_run_table
        count = select(func.count()).select_from(bdr).where(bdr.c.backfill_id == backfill.id)
        query = (
            select(bdr.c.sort_ordinal, bdr.c.logical_date, bdr.c.exception_reason, dr.c.dag_id, dr.c.run_id, dr.c.state)
            .select_from(bdr.outerjoin(dr, dr.c.id == bdr.c.dag_run_id))
            .where(bdr.c.backfill_id == backfill.id)
            .order_by(bdr.c.sort_ordinal, bdr.c.id)
            .offset(offset)
            .limit(limit)
        )
        async with self._connect() as conn:
            total = (await conn.execute(count)).scalar_one()
            rows = (await conn.execute(query)).all()
        slots = [Slot(r.sort_ordinal, r.logical_date, r.dag_id or backfill.dag_id, r.run_id, r.exception_reason, r.state) for r in rows]
        return total, slots

    @contextlib.asynccontextmanager
    async def _connect(self):
        try:
            async with self.engine.connect() as conn:
                yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise ApiError(
                503,
                "airflow_database_unavailable",
                f"Airflow's metadata database could not be read ({type(exc).__name__})",
                headers={"Retry-After": "5"},
            ) from None


def read_only_url(url: str) -> str:
    """The async-driver URL, opened read only where the URL can say so (SQLite: mode=ro)."""
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        if not parsed.database.startswith("file:"):
            parsed = parsed.set(database=f"file:{parsed.database}?mode=ro", query={**parsed.query, "uri": "true"})
            return parsed.render_as_string(hide_password=False)
    return url


class AirflowApiSlots:
    """Reads backfills and their slots through Airflow's REST API (3.4+ for the slots)."""

    def __init__(self, client: AirflowClient):
        self.client = client

    async def backfill(self, backfill_id: int) -> Backfill | None:
        found = await self.client.get_backfill(backfill_id)
        return Backfill(backfill_id, found["dag_id"]) if found is not None else None

    async def slots(self, backfill: Backfill, limit: int | None = None, offset: int = 0) -> tuple[int, list[Slot]]:
        try:
            total, runs = await self.client.backfill_dag_runs(backfill.id, offset=offset, limit=limit)
        except NotFound:
            return 0, []  # gone since it was found: what the database would say of it
        slots = [
            Slot(r.sort_ordinal, r.logical_date, r.dag_id or backfill.dag_id, r.dag_run_id, r.exception_reason, r.dag_run_state)
            for r in runs
        ]
        return total, slots


T = TypeVar("T")


class SlotSource:
    """Airflow's REST API where it lists a backfill's slots (probed), else the metadata database.

    Every read asks the client whether the route is there (it answers from its cached probe). A read
    through the API that fails (unreachable, 5xx, refused) falls back to the database where one is
    configured, which then serves alone for API_RETRY_SECONDS, so a down Airflow API does not make
    each read wait for its timeout; without a database the error is the answer."""

    def __init__(self, api: AirflowClient | None, database: AirflowMetadata | None, metrics: Metrics | None = None):
        self.api = AirflowApiSlots(api) if api is not None else None
        self.database = database
        self.metrics = metrics
        self._api_failed_at: float | None = None  # time.monotonic() of the last failure while it lasts

    async def close(self) -> None:
        if self.database is not None:
            await self.database.close()  # the API client belongs to the app

    async def backfill(self, backfill_id: int) -> Backfill | None:
        return await self._read(lambda source: source.backfill(backfill_id))

    async def slots(self, backfill: Backfill, limit: int | None = None, offset: int = 0) -> tuple[int, list[Slot]]:
        return await self._read(lambda source: source.slots(backfill, limit, offset))

    async def _read(self, read: Callable[[Any], Awaitable[T]]) -> T:
        if await self._api_lists_slots():
            assert self.api is not None
            try:
                result = await read(self.api)
            except RouteMissing:
                if self.database is None:
                    raise self._not_configured() from None
            except AirflowError as exc:
                if self.database is None:
                    raise
                self._api_failed(exc)
            else:
                self._api_answered()
                self._count("airflow_api")
                return result
        if self.database is None:
            raise self._not_configured()
        result = await read(self.database)
        self._count("airflow_database")
        return result

    async def _api_lists_slots(self) -> bool:
        if self.api is None:
            return False
        if self.database is not None and self._api_failed_at is not None and time.monotonic() - self._api_failed_at < API_RETRY_SECONDS:
            return False
        try:
            return await self.api.client.has_backfill_dag_runs()
        except AirflowError as exc:
            if self.database is None:
                raise
            self._api_failed(exc)
            return False

    def _api_failed(self, exc: AirflowError) -> None:
        if self._api_failed_at is None:
            log.warning(
                "backfill slots: Airflow's REST API failed (%s); reading Airflow's database for %g s", exc.message, API_RETRY_SECONDS
            )
        self._api_failed_at = time.monotonic()

    def _api_answered(self) -> None:
        if self._api_failed_at is not None:
            log.info("backfill slots: Airflow's REST API answers again")
        self._api_failed_at = None

    def _count(self, via: str) -> None:
        if self.metrics is not None:
            self.metrics.backfill_reads.labels(via).inc()

    def _not_configured(self) -> ApiError:
        where = (
            f"the Airflow at {self.api.client.where} has no GET /api/v2/backfills/{{id}}/dag_runs (Airflow 3.4+)"
            if self.api is not None
            else "RUNBELL_AIRFLOW_URL is not set (an Airflow 3.4+ lists a backfill's slots through its REST API)"
        )
        return not_configured(f"{where}: set RUNBELL_AIRFLOW_DATABASE_URL to read them from Airflow's metadata database")


def not_configured(message: str) -> ApiError:
    return ApiError(503, "airflow_database_not_configured", message)


def source_from(settings: Settings, api: AirflowClient | None, metrics: Metrics | None = None) -> SlotSource | None:
    database = AirflowMetadata(settings.airflow_database_url.get_secret_value()) if settings.airflow_database_url is not None else None
    if api is None and database is None:
        return None
    return SlotSource(api, database, metrics)


# -- joining with the store ------------------------------------------------------------------------


async def with_store_states(store: Store, slots: list[Slot]) -> list[Slot]:
    """Each slot's state from the store's record of its run (its events), unless Airflow's row is
    further along (the recorder may not have stored the latest event yet): queued, running, then
    terminal; where both are terminal the events decide."""
    stored = await store.get_runs((s.dag_id, s.run_id) for s in slots if s.run_id is not None)
    joined = []
    for slot in slots:
        run = stored.get((slot.dag_id, slot.run_id)) if slot.run_id is not None else None
        if run is not None and _RANK.get(run.state, -1) >= _RANK.get(slot.state or "unknown", -1):
            slot = replace(slot, state=run.state)
        joined.append(slot)
    return joined


# -- endpoints ------------------------------------------------------------------------------------


async def backfill_runs(request: Request) -> Response:
    """GET /v1/backfills/{backfill_id}/runs?limit=&offset= (role read, on the backfill's DAG)."""
    principal = authorize(request, Role.READ, per_dag=True)
    source, backfill = await find_backfill(request)
    principal.check_dag(backfill.dag_id)
    limit, offset = parse_paging(request)
    total, slots = await source.slots(backfill, limit, offset)
    slots = await with_store_states(request.app.state.store, slots)
    page = BackfillSlots(backfill_id=str(backfill.id), dag_id=backfill.dag_id, total_entries=total, slots=[s.model() for s in slots])
    return JSONResponse(page.model_dump(mode="json"))


async def backfill_events(request: Request) -> Response:
    """GET /v1/backfills/{backfill_id}/events (role read; ?access_token= accepted): SSE."""
    principal = authorize(request, Role.READ, per_dag=True, query_token=True)  # EventSource sends no headers
    source, backfill = await find_backfill(request)
    principal.check_dag(backfill.dag_id)
    hub = hub_with_room(request)
    _, slots = await source.slots(backfill)
    tracker = Progress(await with_store_states(request.app.state.store, slots))
    if request.headers.get("last-event-id") == END_ID:
        if not tracker.finished:  # the store may lag behind the runs' events: ask their logs
            await refresh_from_logs(request.app.state.runs, tracker)
        if tracker.finished:
            return Response(status_code=204)  # it already ended for this client: EventSource stops
    if hub.count + len(tracker.live()) > hub.max_subscribers:
        raise ApiError(503, "unavailable", "too many waiters and streams on this process", headers={"Retry-After": "1"})
    return EventStream(request, backfill_stream(request, hub, source, backfill, tracker))


async def find_backfill(request: Request) -> tuple[SlotSource, Backfill]:
    source: SlotSource | None = getattr(request.app.state, "backfills", None)
    if source is None:
        raise not_configured(
            "backfill slots are read from Airflow's REST API where it lists them (Airflow 3.4+: set RUNBELL_AIRFLOW_URL), "
            "else from Airflow's metadata database: set RUNBELL_AIRFLOW_DATABASE_URL"
        )
    raw = request.path_params["backfill_id"]
    number = ascii_int(raw)
    # Airflow's backfill.id is an INTEGER (32 bits on PostgreSQL): a larger one is none, not a query error.
    backfill = await source.backfill(number) if number is not None and number <= MAX_BACKFILL_ID else None
    if backfill is None:
        raise ApiError(404, "backfill_not_found", f"Airflow has no backfill {raw!r}")
    return source, backfill


def parse_paging(request: Request) -> tuple[int, int]:
    limit = int_param(request, "limit", minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT)
    return limit, int_param(request, "offset", minimum=0, maximum=MAX_OFFSET, default=0)


# -- progress -------------------------------------------------------------------------------------


class Progress:
    """The slots of one backfill and their states; a slot only moves forward (queued, running,
    terminal), except that the run's own events may correct one terminal state to the other."""

    def __init__(self, slots: list[Slot]):
        self.slots = {s.sort_ordinal: s for s in slots}
        self.by_run = {(s.dag_id, s.run_id): s.sort_ordinal for s in slots if s.run_id is not None}

    def live(self) -> list[Slot]:
        return [s for s in self.slots.values() if not s.terminal]

    @property
    def finished(self) -> bool:
        return all(s.terminal for s in self.slots.values())

    def summary(self) -> dict[str, int]:
        states = [s.state for s in self.slots.values() if s.run_id is not None]
        progress = BackfillProgress(
            done=states.count("success"),
            failed=states.count("failed"),
            running=states.count("running"),
            skipped=sum(1 for s in self.slots.values() if s.run_id is None),
            total=len(self.slots),
        )
        return progress.model_dump(mode="json")

    def update(self, ordinal: int, state: str, authoritative: bool) -> Slot | None:
        """Apply a state seen for a slot's run; the slot if it changed."""
        slot = self.slots.get(ordinal)
        if slot is None or slot.run_id is None or state == slot.state or state not in _RANK:
            return None
        current = _RANK.get(slot.state or "unknown", -1)
        new = _RANK[state]
        if new < current or (new == current and not (authoritative and new == _RANK["success"])):
            return None
        slot = replace(slot, state=state)
        self.slots[ordinal] = slot
        return slot


def progress_event(tracker: Progress) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(tracker.summary()), event="progress")


async def backfill_stream(
    request: Request, hub: Hub, source: SlotSource, backfill: Backfill, tracker: Progress
) -> AsyncGenerator[ServerSentEvent | bytes, None]:
    settings = request.app.state.settings
    metrics = request.app.state.metrics
    yield ServerSentEvent(comment="runbell", retry=settings.sse_retry_ms)
    changes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    metrics.sse_clients.inc()
    tasks: list[asyncio.Task] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Subscribe first, then read what each run's log already holds, so that the first
            # progress is as fresh as the events (the store may lag behind them) and nothing is missed.
            followed = []
            for slot in tracker.live():
                subscription = await stack.enter_async_context(request.app.state.runs.subscribe(slot.dag_id, slot.run_id))  # type: ignore[arg-type]  # live(): slots with a run
                followed.append((slot.sort_ordinal, subscription, OutcomeFold(slot.dag_id, slot.run_id)))  # type: ignore[arg-type]  # live(): slots with a run
            await asyncio.gather(*(replay(subscription, fold) for _, subscription, fold in followed))
            for ordinal, _, fold in followed:
                tracker.update(ordinal, fold.outcome.run_state, authoritative=True)
            yield progress_event(tracker)
            if tracker.finished:
                yield end_event(tracker)
                return
            tasks = [
                asyncio.create_task(follow_run(o, sub, fold, changes))
                for o, sub, fold in followed
                if fold.outcome.run_state not in TERMINAL
            ]
            tasks.append(asyncio.create_task(poll_airflow(source, backfill, changes)))
            while True:
                kind, item = await changes.get()
                if kind == "closed":
                    if item is Signal.NOT_FOUND:
                        continue  # Airflow has no such run any more: its slot keeps its last state
                    yield farewell(item, settings.sse_retry_ms)
                    return
                updates = (
                    [(item[0], item[1], True)] if kind == "run" else [(s.sort_ordinal, s.state, False) for s in item if s.state is not None]
                )
                changed = [c for c in (tracker.update(*u) for u in updates) if c is not None]
                for slot in changed:
                    yield ServerSentEvent(data=json.dumps(slot.model().model_dump(mode="json")), event="slot")
                if changed:
                    yield progress_event(tracker)
                if tracker.finished:
                    yield end_event(tracker)
                    return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        metrics.sse_clients.dec()


async def refresh_from_logs(runs: RunTopic, tracker: Progress) -> None:
    async def one(slot: Slot) -> None:
        fold = OutcomeFold(slot.dag_id, slot.run_id or "")
        with contextlib.suppress(Exception):  # unreadable now: the stream will tell
            with anyio.fail_after(REPLAY_SECONDS):  # anyio: asyncio.timeout is Python 3.11+
                for envelope in await runs.read((slot.dag_id, slot.run_id or ""), START):
                    fold.apply(envelope)
        tracker.update(slot.sort_ordinal, fold.outcome.run_state, authoritative=True)

    await asyncio.gather(*(one(slot) for slot in tracker.live()))


def end_event(tracker: Progress) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(tracker.summary()), event="end", id=END_ID)


async def replay(subscription: Any, fold: OutcomeFold) -> None:
    """What the run's log holds now (bounded: a Redis outage must not hold the stream's start)."""
    with contextlib.suppress(TimeoutError, SubscriptionClosed):
        with anyio.fail_after(REPLAY_SECONDS):  # anyio: asyncio.timeout is Python 3.11+
            for envelope in await subscription.backlog():
                fold.apply(envelope)


async def follow_run(ordinal: int, subscription: Any, fold: OutcomeFold, changes: asyncio.Queue) -> None:
    """The run's state as its events say (the store's fold), at each change, until it ends."""
    state = fold.outcome.run_state
    try:
        while state not in TERMINAL:
            fold.apply(await subscription.__anext__())
            if fold.outcome.run_state != state:
                state = fold.outcome.run_state
                changes.put_nowait(("run", (ordinal, state)))
    except SubscriptionClosed as closed:
        changes.put_nowait(("closed", closed.reason))


async def poll_airflow(source: SlotSource, backfill: Backfill, changes: asyncio.Queue) -> None:
    """Airflow's own view of the slots, now and then: a run whose events are lost still ends."""
    warned = False
    while True:
        await asyncio.sleep(BACKFILL_POLL_SECONDS)
        try:
            _, slots = await source.slots(backfill)
        except (ApiError, AirflowError) as exc:
            if not warned:
                log.warning("backfill %s: %s; retrying", backfill.id, exc.message)
                warned = True
            continue
        changes.put_nowait(("airflow", slots))
