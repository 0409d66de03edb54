"""Backfill slots through Airflow's REST API where it lists them (GET /api/v2/backfills/{id}/dag_runs,
apache/airflow PR #67381, Airflow 3.4) and through its metadata database otherwise: the probe's
choice, the same slots both ways, paging, an Airflow that gains or loses the route while the gateway
runs, and failures. Airflow 3.4 cannot be installed here: the stand-in answers in that PR's shape,
from the same tables the database path reads (tests/stand_in_airflow.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from runbell.service.airflow import api
from runbell.service.airflow.api import AirflowClient, AirflowError, AirflowSettings
from runbell.service.http import backfills
from tests.conftest import free_port
from tests.stand_in_airflow import StandInAirflow, serve_stand_in
from tests.test_backfills import (  # noqa: F401  (airflow_db: a fixture)
    SECRET,
    a_run_without_events_ends_by_airflows_own_state,
    airflow_db,
    read_events,
    six_slots,
)

PROBE = "/api/v2/backfills/0/dag_runs?limit=1"


@pytest.fixture
async def stand_in(airflow_db):
    async with serve_stand_in(StandInAirflow(backfill_db=airflow_db.engine)) as stand_in:
        yield stand_in


def reads(gateway) -> dict[str, float]:
    """runbell_backfill_reads_total by `via`, the ones counted so far."""
    registry = gateway.app.state.metrics.registry
    found = {via: registry.get_sample_value("runbell_backfill_reads_total", {"via": via}) for via in ("airflow_api", "airflow_database")}
    return {via: n for via, n in found.items() if n}


def listings(stand_in: StandInAirflow) -> list[str]:
    """The dag_runs requests the stand-in got, the probe's left out."""
    return [r for r in stand_in.backfill_requests if "/dag_runs" in r and r != PROBE]


QUERIES = [{}, {"limit": 2, "offset": 2}, {"limit": 3, "offset": 3}, {"limit": 1}, {"offset": 10}, {"limit": 500}]


# -- the same slots both ways --------------------------------------------------------------------


async def test_the_api_gives_the_slots_the_database_gives(gateway_factory, database_url, airflow_db, stand_in):
    stand_in.backfill_dag_runs = True
    stand_in.page_cap = 4  # and across pages
    # One store for both: the same run states join the slots.
    by_database = await gateway_factory(database_url=database_url, airflow_database_url=airflow_db.url, token_secret=SECRET)
    by_api = await gateway_factory(database_url=database_url, airflow_url=stand_in.url, token_secret=SECRET)
    backfill_id = await six_slots(airflow_db, by_database.app.state.store)
    async with by_database.client() as from_database, by_api.client() as from_api:
        for params in QUERIES:
            expected = await from_database.get(f"/v1/backfills/{backfill_id}/runs", params=params)
            got = await from_api.get(f"/v1/backfills/{backfill_id}/runs", params=params)
            assert expected.status_code == got.status_code == 200, (params, got.text)
            assert got.json() == expected.json(), params
        whole = (await from_api.get(f"/v1/backfills/{backfill_id}/runs")).json()
        assert [s["sort_ordinal"] for s in whole["slots"]] == [1, 2, 3, 4, 5, 6]
        assert [s["state"] for s in whole["slots"]] == ["success", "success", None, None, "running", None]
        assert whole["slots"][0]["logical_date"] == "2026-01-01T00:00:00+00:00"  # Airflow's "…Z", as the database gives it
        for unknown in ("999999", "abc", "-1", "1" * 30):
            response = await from_api.get(f"/v1/backfills/{unknown}/runs")
            assert response.status_code == 404 and response.json()["error"] == "backfill_not_found", unknown
    assert set(reads(by_api)) == {"airflow_api"} and set(reads(by_database)) == {"airflow_database"}
    assert stand_in.backfill_requests.count(PROBE) == 1  # probed once, on first use


async def test_a_finished_backfill_streams_the_same_both_ways(gateway_factory, database_url, airflow_db, stand_in):
    stand_in.backfill_dag_runs = True
    by_database = await gateway_factory(database_url=database_url, airflow_database_url=airflow_db.url, token_secret=SECRET)
    by_api = await gateway_factory(database_url=database_url, airflow_url=stand_in.url, token_secret=SECRET)
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="bf_1", state="success")
    await airflow_db.slot(backfill_id, 2, run_id="bf_2", state="failed")
    await airflow_db.slot(backfill_id, 3, reason="already exists")
    streams = []
    for gateway in (by_database, by_api):
        async with gateway.client() as client:
            status, events = await read_events(client, f"/v1/backfills/{backfill_id}/events")
        assert status == 200
        streams.append([(e.event, e.id, e.data) for e in events if e.event])
    assert streams[0] == streams[1]
    assert json.loads(streams[1][-1][2]) == {"done": 1, "failed": 1, "running": 0, "skipped": 1, "total": 3}


async def test_a_run_without_events_ends_by_the_states_the_api_gives(gateway_factory, airflow_db, stand_in, monkeypatch):
    monkeypatch.setattr(backfills, "BACKFILL_POLL_SECONDS", 0.2)
    stand_in.backfill_dag_runs = True
    gateway = await gateway_factory(airflow_url=stand_in.url)  # no database: the stream's re-reads go through the API
    await a_run_without_events_ends_by_airflows_own_state(gateway, airflow_db)
    assert set(reads(gateway)) == {"airflow_api"}


# -- paging ---------------------------------------------------------------------------------------


async def test_every_page_is_read_within_airflows_page_cap(gateway_factory, airflow_db, stand_in):
    stand_in.backfill_dag_runs = True
    stand_in.page_cap = 2
    gateway = await gateway_factory(airflow_url=stand_in.url)
    backfill_id = await airflow_db.backfill()
    for ordinal in range(1, 8):
        await airflow_db.slot(backfill_id, ordinal, run_id=f"bf_{ordinal}", state="success")
    path = f"/api/v2/backfills/{backfill_id}/dag_runs"
    async with gateway.client() as client:
        body = (await client.get(f"/v1/backfills/{backfill_id}/runs", params={"limit": 500})).json()
        assert body["total_entries"] == 7 and [s["sort_ordinal"] for s in body["slots"]] == [1, 2, 3, 4, 5, 6, 7]
        assert listings(stand_in) == [f"{path}?limit=100&offset={n}&order_by=sort_ordinal" for n in (0, 2, 4, 6)]
        stand_in.backfill_requests.clear()
        body = (await client.get(f"/v1/backfills/{backfill_id}/runs", params={"limit": 3, "offset": 1})).json()
        assert body["total_entries"] == 7 and [s["sort_ordinal"] for s in body["slots"]] == [2, 3, 4]
        assert listings(stand_in) == [f"{path}?limit=3&offset=1&order_by=sort_ordinal", f"{path}?limit=1&offset=3&order_by=sort_ordinal"]


# -- the probe ------------------------------------------------------------------------------------


def answering(*responses: httpx.Response) -> tuple[AirflowClient, list[str]]:
    """A client whose Airflow gives these answers in turn (the last one from then on)."""
    asked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.path}?{request.url.query.decode()}")
        return responses[min(len(asked), len(responses)) - 1]

    return AirflowClient(AirflowSettings("http://airflow.test"), transport=httpx.MockTransport(handle)), asked


@pytest.mark.parametrize(
    "answer, present",
    [
        (httpx.Response(404, json={"error": "API route not found"}), False),  # Airflow 3.1 to 3.3
        (httpx.Response(404, json={"detail": "Not Found"}), False),  # FastAPI without the route
        (httpx.Response(404, text="<html>not found</html>"), False),  # a proxy
        (httpx.Response(200, text="<!doctype html><html>the UI</html>"), False),  # an SPA page for any path
        (httpx.Response(405, json={"detail": "Method Not Allowed"}), False),
        (httpx.Response(404, json={"detail": "Backfill with id 0 not found"}), True),  # Airflow 3.4
        (httpx.Response(200, json={"backfill_dag_runs": [], "total_entries": 0}), True),
    ],
)
async def test_the_probe_tells_the_route_from_its_absence_and_asks_once(answer, present):
    client, asked = answering(answer)
    async with client:
        assert await asyncio.gather(*(client.has_backfill_dag_runs() for _ in range(5))) == [present] * 5
        assert await client.has_backfill_dag_runs() is present
    assert asked == [PROBE]


@pytest.mark.parametrize(
    "answer, status, code",
    [
        (httpx.Response(500, json={"detail": "Internal Server Error"}), 502, "airflow_error"),
        (httpx.Response(503, text="overloaded"), 502, "airflow_error"),
        (httpx.Response(403, json={"detail": "Forbidden"}), 502, "airflow_auth_failed"),
    ],
)
async def test_a_probe_without_an_answer_raises_and_is_not_remembered(answer, status, code):
    client, asked = answering(answer, httpx.Response(404, json={"detail": "Backfill with id 0 not found"}))
    async with client:
        with pytest.raises(AirflowError) as raised:
            await client.has_backfill_dag_runs()
        assert (raised.value.status, raised.value.code) == (status, code)
        assert await client.has_backfill_dag_runs() is True
    assert asked == [PROBE, PROBE]


async def test_a_malformed_page_is_a_clear_error():
    page = {"backfill_dag_runs": [{"sort_ordinal": "first"}], "total_entries": 1}
    client, _ = answering(httpx.Response(200, json=page))
    async with client:
        with pytest.raises(AirflowError, match="not of the expected shape") as raised:
            await client.backfill_dag_runs(1)
    assert (raised.value.status, raised.value.code) == (502, "airflow_error")


async def test_an_airflow_that_gains_the_route_is_seen_without_a_restart_and_one_that_loses_it_at_once(
    gateway_factory, airflow_db, stand_in, monkeypatch
):
    gateway = await gateway_factory(airflow_url=stand_in.url, airflow_database_url=airflow_db.url)
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="bf_1", state="success")
    await airflow_db.slot(backfill_id, 2, reason="already exists")
    path = f"/v1/backfills/{backfill_id}/runs"
    async with gateway.client() as client:
        before = (await client.get(path)).json()  # Airflow 3.3: the database
        assert reads(gateway) == {"airflow_database": 2} and stand_in.backfill_requests == [PROBE]
        stand_in.backfill_dag_runs = True  # upgraded to 3.4
        assert (await client.get(path)).json() == before
        assert reads(gateway) == {"airflow_database": 4} and stand_in.backfill_requests == [PROBE]  # not probed again yet
        monkeypatch.setattr(api, "ROUTE_RECHECK_SECONDS", 0.0)  # ...until the recheck is due
        assert (await client.get(path)).json() == before
        assert reads(gateway) == {"airflow_database": 4, "airflow_api": 2}
        assert stand_in.backfill_requests.count(PROBE) >= 2 and listings(stand_in)
        monkeypatch.setattr(api, "ROUTE_RECHECK_SECONDS", 300.0)
        stand_in.backfill_dag_runs = False  # rolled back to 3.3: the listing meets the catch-all
        stand_in.backfill_requests.clear()
        assert (await client.get(path)).json() == before
        assert reads(gateway) == {"airflow_database": 5, "airflow_api": 3}  # found through the API, slots from the database
        assert len(listings(stand_in)) == 1
        assert (await client.get(path)).json() == before
        assert reads(gateway) == {"airflow_database": 7, "airflow_api": 3} and len(listings(stand_in)) == 1


# -- failures -------------------------------------------------------------------------------------


async def test_a_failing_api_falls_back_to_the_database_for_a_while(gateway_factory, airflow_db, stand_in, monkeypatch):
    stand_in.backfill_dag_runs = True
    gateway = await gateway_factory(airflow_url=stand_in.url, airflow_database_url=airflow_db.url)
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="bf_1", state="running")
    path = f"/v1/backfills/{backfill_id}/runs"
    async with gateway.client() as client:
        expected = (await client.get(path)).json()
        assert reads(gateway) == {"airflow_api": 2}
        stand_in.backfill_dag_runs_errors = 1
        assert (await client.get(path)).json() == expected  # a 500 from the route: the database answers
        assert reads(gateway) == {"airflow_api": 3, "airflow_database": 1}
        stand_in.backfill_requests.clear()
        assert (await client.get(path)).json() == expected
        assert reads(gateway) == {"airflow_api": 3, "airflow_database": 3} and stand_in.backfill_requests == []  # the API rests
        monkeypatch.setattr(backfills, "API_RETRY_SECONDS", 0.0)
        assert (await client.get(path)).json() == expected
        assert reads(gateway) == {"airflow_api": 5, "airflow_database": 3}


async def test_without_a_database_an_api_failure_is_the_answer(gateway_factory, airflow_db, stand_in):
    stand_in.backfill_dag_runs = True
    gateway = await gateway_factory(airflow_url=stand_in.url)
    backfill_id = await airflow_db.backfill()
    await airflow_db.slot(backfill_id, 1, run_id="bf_1", state="running")
    path = f"/v1/backfills/{backfill_id}/runs"
    async with gateway.client() as client:
        assert (await client.get(path)).status_code == 200  # probed: the route is there
        stand_in.backfill_dag_runs_errors = 1
        response = await client.get(path)
        assert response.status_code == 502, response.text
        body = response.json()
        assert body["error"] == "airflow_error" and f"answered 500 to GET /api/v2/backfills/{backfill_id}/dag_runs" in body["message"]
        assert (await client.get(path)).status_code == 200  # no waiting out a retry: there is nothing else to read


async def test_without_a_database_an_airflow_without_the_route_is_503_saying_what_to_set(gateway_factory, airflow_db, stand_in):
    gateway = await gateway_factory(airflow_url=stand_in.url)
    backfill_id = await airflow_db.backfill()
    async with gateway.client() as client:
        for path in (f"/v1/backfills/{backfill_id}/runs", f"/v1/backfills/{backfill_id}/events"):
            response = await client.get(path)
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error"] == "airflow_database_not_configured"
            assert "/api/v2/backfills/{id}/dag_runs" in body["message"] and "RUNBELL_AIRFLOW_DATABASE_URL" in body["message"]


async def test_without_a_database_an_unreachable_airflow_is_503(gateway_factory):
    gateway = await gateway_factory(airflow_url=f"http://127.0.0.1:{free_port()}", airflow_timeout=2)
    async with gateway.client() as client:
        response = await client.get("/v1/backfills/1/runs")
    assert response.status_code == 503 and response.json()["error"] == "airflow_unreachable"
