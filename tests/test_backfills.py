"""Backfill slots and their live progress, against a stand-in of Airflow's metadata database
(its backfill, backfill_dag_run and dag_run tables, on PostgreSQL and on SQLite) and the real Redis."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runbell.bus.schema import Envelope, Event, EventKind
from runbell.listeners.publisher import emit
from runbell.service.client.client import parse_sse
from runbell.service.http import backfills
from runbell.service.http.auth import issue_run_token
from runbell.service.http.backfills import (
    AirflowMetadata,
    _airflow,
    backfill_dag_run_table,
    backfill_table,
    dag_run_table,
)
from runbell.service.store.store import normalize_database_url
from tests.conftest import READ_TOKEN

DAG = "rb_backfill"
DAY = datetime(2026, 1, 1, tzinfo=timezone.utc)
SECRET = "a-token-secret-of-at-least-32-bytes!!"


@dataclass
class StandInAirflowDB:
    """Airflow's metadata tables for backfills, written as Airflow writes them."""

    url: str
    engine: AsyncEngine
    next_run: int = 1

    async def backfill(self, dag_id: str = DAG) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(insert(backfill_table).values(dag_id=dag_id).returning(backfill_table.c.id))
            return result.scalar_one()

    async def slot(
        self,
        backfill_id: int,
        ordinal: int,
        *,
        run_id: str | None = None,
        state: str = "queued",
        reason: str | None = None,
        dag_id: str = DAG,
    ) -> int | None:
        async with self.engine.begin() as conn:
            run_pk = None
            if run_id is not None:
                run_pk = self.next_run
                self.next_run += 1
                await conn.execute(insert(dag_run_table).values(id=run_pk, dag_id=dag_id, run_id=run_id, state=state))
            await conn.execute(
                insert(backfill_dag_run_table).values(
                    backfill_id=backfill_id,
                    dag_run_id=run_pk,
                    exception_reason=reason,
                    sort_ordinal=ordinal,
                    logical_date=DAY + timedelta(days=ordinal - 1),
                )
            )
        return run_pk

    async def set_state(self, run_id: str, state: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(dag_run_table).where(dag_run_table.c.run_id == run_id).values(state=state))


@pytest.fixture
async def airflow_db(database_url, tmp_path):
    """On PostgreSQL: the test's own database (beside the store's tables); on SQLite: a file of its own."""
    url = database_url if database_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'airflow.db'}"
    engine = create_async_engine(normalize_database_url(url))
    async with engine.begin() as conn:
        await conn.run_sync(_airflow.create_all)
    yield StandInAirflowDB(url, engine)
    await engine.dispose()


@pytest.fixture
async def gateway(database_url, airflow_db, gateway_factory):  # stopped before its databases go
    return await gateway_factory(database_url=database_url, airflow_database_url=airflow_db.url, token_secret=SECRET)


def run_events(run_id: str, *states: str, backfill_id: int) -> list[Envelope]:
    events = [
        Event(
            kind=EventKind.RUN,
            dag_id=DAG,
            run_id=run_id,
            state=s,
            run_type="backfill",
            backfill_id=str(backfill_id),
            run_after=DAY.isoformat(),
        )
        for s in states
    ]
    return [Envelope(seq=i, event=e) for i, e in enumerate(events, start=1)]


async def publish(gateway, run_id: str, state: str, **kw) -> None:
    seq = await asyncio.to_thread(emit, DAG, run_id, state, publisher=gateway.publisher(), **kw)
    assert seq is not None


async def read_events(
    client, path: str, headers=None, params=None, stop_after: str | None = "end", started: asyncio.Event | None = None
) -> tuple[int, list[Any]]:
    events: list[Any] = []
    async with client.stream("GET", path, headers=headers or {}, params=params) as response:
        if response.status_code != 200:
            return response.status_code, events
        buffer: list[str] = []
        async for line in response.aiter_lines():
            buffer.append(line)
            if line == "":
                events.extend(parse_sse(iter(buffer)))
                buffer = []
                if started is not None and events:
                    started.set()
                if stop_after and events and events[-1].event == stop_after:
                    break
    return response.status_code, events


def data(events, name: str) -> list[dict]:
    return [json.loads(e.data) for e in events if e.event == name]


# -- the slots ------------------------------------------------------------------------------------


async def six_slots(airflow_db: StandInAirflowDB, store) -> int:
    """A backfill of six slots beside another DAG's, and what the store knows of their runs."""
    backfill_id = await airflow_db.backfill()
    other = await airflow_db.backfill("another_dag")
    await airflow_db.slot(other, 1, run_id="elsewhere", dag_id="another_dag")
    # Written out of order, as nothing promises the rows' order.
    await airflow_db.slot(backfill_id, 4, reason="in flight")
    await airflow_db.slot(backfill_id, 2, run_id="backfill__2", state="success")
    await airflow_db.slot(backfill_id, 1, run_id="backfill__1", state="running")
    await airflow_db.slot(backfill_id, 5, run_id="backfill__5", state="queued")
    await airflow_db.slot(backfill_id, 3, reason="already exists")
    await airflow_db.slot(backfill_id, 6, reason="unknown")
    # The store has the first run's end (its events), which Airflow's row does not show yet; the
    # fifth's start. Airflow's row of the second is further along than the store (its recorder lags).
    await store.record(run_events("backfill__1", "running", "success", backfill_id=backfill_id))
    await store.record(run_events("backfill__5", "running", backfill_id=backfill_id))
    await store.record(run_events("backfill__2", "running", backfill_id=backfill_id))
    return backfill_id


async def test_slots_in_order_joined_with_the_store_with_skip_reasons_and_paging(gateway, airflow_db):
    backfill_id = await six_slots(airflow_db, gateway.app.state.store)
    async with gateway.client() as client:
        response = await client.get(f"/v1/backfills/{backfill_id}/runs")
        assert response.status_code == 200, response.text
        body = response.json()
        day = lambda n: (DAY + timedelta(days=n - 1)).isoformat()  # noqa: E731
        assert body == {
            "backfill_id": str(backfill_id),
            "dag_id": DAG,
            "total_entries": 6,
            "slots": [
                {"sort_ordinal": 1, "logical_date": day(1), "run_id": "backfill__1", "state": "success", "exception_reason": None},
                {"sort_ordinal": 2, "logical_date": day(2), "run_id": "backfill__2", "state": "success", "exception_reason": None},
                {"sort_ordinal": 3, "logical_date": day(3), "run_id": None, "state": None, "exception_reason": "already exists"},
                {"sort_ordinal": 4, "logical_date": day(4), "run_id": None, "state": None, "exception_reason": "in flight"},
                {"sort_ordinal": 5, "logical_date": day(5), "run_id": "backfill__5", "state": "running", "exception_reason": None},
                {"sort_ordinal": 6, "logical_date": day(6), "run_id": None, "state": None, "exception_reason": "unknown"},
            ],
        }
        page = (await client.get(f"/v1/backfills/{backfill_id}/runs", params={"limit": 2, "offset": 2})).json()
        assert page["total_entries"] == 6 and [s["sort_ordinal"] for s in page["slots"]] == [3, 4]
        past = (await client.get(f"/v1/backfills/{backfill_id}/runs", params={"offset": 10})).json()
        assert past["total_entries"] == 6 and past["slots"] == []
        for bad in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"offset": -1}, {"offset": "1.5"}):
            response = await client.get(f"/v1/backfills/{backfill_id}/runs", params=bad)
            assert response.status_code == 400, bad
        for unknown in ("999999", "abc", "-1", "1" * 30):
            response = await client.get(f"/v1/backfills/{unknown}/runs")
            assert response.status_code == 404, unknown
            assert response.json()["error"] == "backfill_not_found"
        assert (await client.get(f"/v1/backfills/{backfill_id}/runs", headers={"Authorization": ""})).status_code == 401


async def test_without_the_airflow_database_setting_the_backfill_routes_say_so(gateway_factory):
    gateway = await gateway_factory()
    async with gateway.client() as client:
        for path in ("/v1/backfills/1/runs", "/v1/backfills/1/events"):
            response = await client.get(path)
            assert response.status_code == 503
            assert response.json()["error"] == "airflow_database_not_configured"
            assert "RUNBELL_AIRFLOW_DATABASE_URL" in response.json()["message"]


async def test_airflow_database_is_opened_read_only(airflow_db):
    backfill_id = await airflow_db.backfill()
    source = AirflowMetadata(airflow_db.url)
    try:
        assert (await source.backfill(backfill_id)).dag_id == DAG
        with pytest.raises(Exception, match="(?i)read.?only"):
            async with source.engine.begin() as conn:
                await conn.execute(text("DELETE FROM backfill"))
        assert (await source.backfill(backfill_id)) is not None
    finally:
        await source.close()


async def test_an_unreachable_airflow_database_is_503(gateway_factory, tmp_path):
    gateway = await gateway_factory(airflow_database_url=f"sqlite:///{tmp_path / 'missing' / 'airflow.db'}")
    async with gateway.client() as client:
        response = await client.get("/v1/backfills/1/runs")
    assert response.status_code == 503 and response.json()["error"] == "airflow_database_unavailable"


# -- live progress --------------------------------------------------------------------------------


async def test_events_per_slot_and_progress_until_every_slot_ends(gateway, airflow_db):
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="bf_1", state="queued")
    await airflow_db.slot(backfill_id, 2, run_id="bf_2", state="queued")
    await airflow_db.slot(backfill_id, 3, reason="already exists")
    await airflow_db.slot(backfill_id, 4, run_id="bf_4", state="success")
    await gateway.app.state.store.record(run_events("bf_4", "running", "success", backfill_id=backfill_id))
    path = f"/v1/backfills/{backfill_id}/events"
    async with gateway.client() as client:
        started = asyncio.Event()
        reader = asyncio.create_task(read_events(client, path, started=started))
        await asyncio.wait_for(started.wait(), 10)
        await publish(gateway, "bf_1", "running")
        await publish(gateway, "bf_2", "running")
        await publish(gateway, "bf_1", "success")
        await publish(gateway, "bf_2", "failed", msg="boom")
        status, events = await asyncio.wait_for(reader, 20)
        assert status == 200
        assert [e.event for e in events if e.event in ("slot", "progress", "end")][0] == "progress"
        progress = data(events, "progress")
        assert progress[0] == {"done": 1, "failed": 0, "running": 0, "skipped": 1, "total": 4}
        assert progress[-1] == {"done": 2, "failed": 1, "running": 0, "skipped": 1, "total": 4}
        slots = [(s["sort_ordinal"], s["state"]) for s in data(events, "slot")]
        assert [st for o, st in slots if o == 1] == ["running", "success"]  # in order per slot
        assert [st for o, st in slots if o == 2] == ["running", "failed"]
        named = [e.event for e in events if e.event in ("slot", "progress", "end")]
        assert all(named[i + 1] == "progress" for i, name in enumerate(named) if name == "slot")
        assert data(events, "slot")[0] == {
            "sort_ordinal": 1,
            "logical_date": DAY.isoformat(),
            "run_id": "bf_1",
            "state": "running",
            "exception_reason": None,
        }
        end = [e for e in events if e.event == "end"]
        assert len(end) == 1 and end[0].id == "end" and json.loads(end[0].data) == progress[-1]
        # A finished backfill: a new client gets the summary and end; EventSource's reconnect gets 204.
        status, again = await read_events(client, path)
        assert status == 200 and [e.event for e in again if e.event] == ["progress", "end"]
        assert data(again, "progress")[0] == progress[-1]
        status, _ = await read_events(client, path, headers={"Last-Event-ID": "end"})
        assert status == 204
        assert gateway.app.state.hub.count == 0


async def test_a_run_without_events_ends_by_airflows_own_state(gateway, airflow_db, monkeypatch):
    monkeypatch.setattr(backfills, "BACKFILL_POLL_SECONDS", 0.2)
    await a_run_without_events_ends_by_airflows_own_state(gateway, airflow_db)


async def a_run_without_events_ends_by_airflows_own_state(gateway, airflow_db: StandInAirflowDB) -> None:
    """Airflow's row moves queued, running, success and no event comes: the stream's re-reads end it."""
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="silent_1", state="queued")
    async with gateway.client() as client:
        started = asyncio.Event()
        reader = asyncio.create_task(read_events(client, f"/v1/backfills/{backfill_id}/events", started=started))
        await asyncio.wait_for(started.wait(), 10)
        await airflow_db.set_state("silent_1", "running")
        await asyncio.sleep(0.6)
        await airflow_db.set_state("silent_1", "success")
        status, events = await asyncio.wait_for(reader, 20)
    assert status == 200
    assert [(s["sort_ordinal"], s["state"]) for s in data(events, "slot")] == [(1, "running"), (1, "success")]
    assert data(events, "end") == [{"done": 1, "failed": 0, "running": 0, "skipped": 0, "total": 1}]


async def test_events_replayed_before_connecting_count_and_states_never_go_back(gateway, airflow_db, monkeypatch):
    monkeypatch.setattr(backfills, "BACKFILL_POLL_SECONDS", 0.2)
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="early", state="queued")
    await airflow_db.slot(backfill_id, 2, run_id="later", state="queued")
    await publish(gateway, "early", "running")  # in the replay log before the stream opens
    async with gateway.client() as client:
        started = asyncio.Event()
        reader = asyncio.create_task(read_events(client, f"/v1/backfills/{backfill_id}/events", started=started))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.5)  # Airflow's rows still say queued: no step back
        await publish(gateway, "early", "success")
        await publish(gateway, "later", "running")
        await publish(gateway, "later", "success")
        status, events = await asyncio.wait_for(reader, 20)
    # The first progress already counts what the log held (the store may not have recorded it yet).
    assert data(events, "progress")[0] == {"done": 0, "failed": 0, "running": 1, "skipped": 0, "total": 2}
    slots = [(s["sort_ordinal"], s["state"]) for s in data(events, "slot")]
    assert [st for o, st in slots if o == 1] == ["success"]
    assert [st for o, st in slots if o == 2] == ["running", "success"]
    assert data(events, "end")[0]["done"] == 2


async def test_the_stream_takes_a_query_token_but_no_run_scoped_token(gateway, airflow_db):
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, reason="already exists")
    path = f"/v1/backfills/{backfill_id}/events"
    async with gateway.client(token=None) as client:
        status, events = await read_events(client, path, params={"access_token": READ_TOKEN})
        assert status == 200 and data(events, "end") == [{"done": 0, "failed": 0, "running": 0, "skipped": 1, "total": 1}]
        assert (await client.get(path)).status_code == 401
        scoped, _ = issue_run_token(SECRET, DAG, "some_run", 60)
        assert (await client.get(path, params={"access_token": scoped})).status_code == 403
        assert (await client.get(f"/v1/backfills/{backfill_id}/runs", params={"access_token": READ_TOKEN})).status_code == 401
        assert (await client.get("/v1/backfills/424242/events", params={"access_token": READ_TOKEN})).status_code == 404


async def test_the_stream_says_shutdown_when_the_gateway_drains(gateway, airflow_db):
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="long", state="running")
    async with gateway.client() as client:
        started = asyncio.Event()
        reader = asyncio.create_task(read_events(client, f"/v1/backfills/{backfill_id}/events", started=started, stop_after="shutdown"))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.2)
        gateway.app.state.hub.drain()
        status, events = await asyncio.wait_for(reader, 10)
    assert status == 200 and events[-1].event == "shutdown" and events[-1].retry
