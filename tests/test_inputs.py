"""Every bad input is a 4xx, never a 500: integers spelled with Unicode digits, dates that overflow,
ids that cannot go into a header as they are, ids holding an encoded '/' or a control character.

Against a gateway served by uvicorn on a real socket (on SQLite and on PostgreSQL), with Airflow's
metadata database (backfills) and its REST API (trigger) stood in.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from runbell.bus.schema import Event, EventKind
from runbell.service.http.backfills import _airflow
from runbell.service.store.store import RunQuery, normalize_database_url
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, TRIGGER_TOKEN
from tests.test_backfills import StandInAirflowDB

# Spelled with digits that str.isdigit() or int() or float() take, yet no client means as a number:
# superscripts (isdigit() is true, int() raises), Arabic-Indic and fullwidth digits (int() reads
# them), Python's digit separator, signs and spaces.
UNICODE_NUMBERS = ["²", "¹²", "١", "٣", "５", "1_0", " 1", "1 ", "+1", "0x1", "１０", "-1", "nan", "inf", "1e400", "9" * 40]
# The same in a header: a header is latin-1, so the superscripts are its non-ASCII digits.
LATIN1_DIGITS = [b"\xb2", b"\xb9\xb2", b"\xb3"]
NASTY_DAG_IDS = ["é", "dé 🎉", "a b", 'quo"te', "com,ma", "semi;colon", "gt>lt<", "crlf\r\nInjected: 1", "tab\there"]


@pytest.fixture
async def served(database_url, gateway_factory, stand_in_airflow, tmp_path):
    """A gateway with everything configured: the store, Airflow's REST API and metadata database."""
    airflow_url = f"sqlite:///{tmp_path / 'airflow.db'}"
    engine = create_async_engine(normalize_database_url(airflow_url))
    async with engine.begin() as conn:
        await conn.run_sync(_airflow.create_all)
    airflow_db = StandInAirflowDB(airflow_url, engine)
    gateway = await gateway_factory(
        database_url=database_url,
        airflow_database_url=airflow_url,
        airflow_url=stand_in_airflow.url,
        airflow_token="stand-in",
        webhooks=False,
        token_secret="inputs-token-secret-of-at-least-32-bytes",
    )
    gateway.backfill_id = await airflow_db.backfill()
    endpoint = await gateway.app.state.webhooks.create_endpoint(url="https://hooks.example.org/in")
    gateway.endpoint_id = endpoint.id
    yield gateway
    await engine.dispose()


def integer_parameters(gateway) -> list[tuple[str, str, str]]:
    """(path, integer query parameter, its error code) for every such parameter of the API."""
    hook = f"/v1/webhooks/{gateway.endpoint_id}"
    backfill = f"/v1/backfills/{gateway.backfill_id}"
    return [
        ("/v1/runs", "limit", "bad_limit"),
        ("/v1/dags/d/runs", "limit", "bad_limit"),
        (f"{backfill}/runs", "limit", "bad_limit"),
        (f"{backfill}/runs", "offset", "bad_offset"),
        (f"{hook}/attempts", "limit", "bad_limit"),
        (f"{hook}/messages", "limit", "bad_limit"),
        ("/v1/dags/d/runs/r/events", "last_event_id", "bad_last_event_id"),
        ("/v1/assets/a/events", "last_event_id", "bad_last_event_id"),
        ("/v1/assets/a/next", "after", "bad_after"),
        ("/v1/dags/d/runs/r/result", "timeout", "bad_timeout"),
        ("/v1/dags/d/runs/r/result", "after", "bad_after"),
        ("/v1/assets/a/next", "timeout", "bad_timeout"),
    ]


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.request.url, response.status_code, response.text)
    body = response.json()
    assert body["error"] == code and body["message"], body


async def test_unicode_digits_in_every_integer_parameter_are_400_saying_what_is_accepted(served):
    tried = 0
    async with served.client(ADMIN_TOKEN, timeout=10) as client:
        for path, name, code in integer_parameters(served):
            for value in UNICODE_NUMBERS:
                response = await client.get(path, params={name: value})
                assert_refused(response, 400, code)
                assert response.json()["accepted"] is not None
                tried += 1
        for path in ("/v1/dags/d/runs/r/events", "/v1/assets/a/events"):
            for raw in LATIN1_DIGITS:
                response = await client.get(path, headers={"Last-Event-ID": raw})
                assert_refused(response, 400, "bad_last_event_id")
                tried += 1
        # The trigger's ?wait= is a number of seconds like timeout.
        for value in UNICODE_NUMBERS:
            async with served.client(TRIGGER_TOKEN) as publisher:
                response = await publisher.post("/v1/dags/etl/runs", params={"wait": value}, json={})
            assert_refused(response, 400, "bad_wait")
            tried += 1
    assert tried == len(integer_parameters(served)) * len(UNICODE_NUMBERS) + 2 * len(LATIN1_DIGITS) + len(UNICODE_NUMBERS)


async def test_a_backfill_id_in_unicode_digits_is_not_a_backfill(served):
    async with served.client(timeout=10) as client:
        for value in ["²", "١", "５", "1_0"]:
            for tail in ("runs", "events"):
                assert_refused(await client.get(f"/v1/backfills/{quote(value)}/{tail}"), 404, "backfill_not_found")
        for too_large in ("2147483648", "99999999999999999"):  # Airflow's backfill.id is 32 bits on PostgreSQL
            assert_refused(await client.get(f"/v1/backfills/{too_large}/runs"), 404, "backfill_not_found")
        assert (await client.get(f"/v1/backfills/{served.backfill_id}/runs")).status_code == 200


async def test_ascii_numbers_are_still_read(served):
    async with served.client(ADMIN_TOKEN, timeout=10) as client:
        assert (await client.get("/v1/runs", params={"limit": "007"})).status_code == 200
        assert (await client.get("/v1/runs", params={"limit": ""})).status_code == 200  # empty: the default
        assert (await client.get(f"/v1/webhooks/{served.endpoint_id}/attempts", params={"limit": "1000"})).status_code == 200
        response = await client.get(f"/v1/backfills/{served.backfill_id}/runs", params={"limit": "1", "offset": "0"})
        assert response.status_code == 200
        for timeout in ("0", "0.0", "0.05", ".05", "5e-2"):
            assert (await client.get("/v1/dags/d/runs/r/result", params={"timeout": timeout})).status_code == 202, timeout


OVERFLOWING_DATES = [
    "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
    "0001-01-01T00:00:00+01:00",  # year 0 in UTC
    "10000-01-01",
    "9999-12-31T23:59:59.999999-23:59",
    "2026-01-01T00:00:00+99:00",
    "99999999999999999999",
    "1e400",
    "²⁰²⁶-01-01",
]


async def test_dates_that_overflow_are_4xx_everywhere_a_date_is_read(served):
    async with served.client(ADMIN_TOKEN, timeout=10) as client:
        for value in OVERFLOWING_DATES:
            for name in ("run_after_gte", "run_after_lte"):
                assert_refused(await client.get("/v1/runs", params={name: value}), 400, f"bad_{name}")
            messages = f"/v1/webhooks/{served.endpoint_id}/messages"
            assert_refused(await client.get(messages, params={"since": value}), 400, "bad_since")
            recover = f"/v1/webhooks/{served.endpoint_id}/recover"
            assert_refused(await client.post(recover, json={"since": value}), 422, "bad_body")
            async with served.client(TRIGGER_TOKEN) as publisher:
                trigger = await publisher.post("/v1/dags/etl/runs", json={"logical_date": value})
            assert_refused(trigger, 422, "bad_body")


async def publish_runs(gateway, dag_id: str, count: int) -> None:
    async with gateway.client(PUBLISH_TOKEN) as client:
        for n in range(count):
            event = Event(kind=EventKind.RUN, dag_id=dag_id, run_id=f"r{n}", state="running", run_after=f"2026-01-0{n + 1}T00:00:00Z")
            response = await client.post("/v1/events", content=event.to_json())
            assert response.status_code == 201, response.text


def ascii_header_values(response: httpx.Response) -> None:
    for name, value in response.headers.raw:
        assert all(0x20 <= byte < 0x7F for byte in value), (name, value)  # no CR, LF, or anything beyond ASCII


async def recorded(store, dag_id: str, count: int) -> None:
    """Wait until the recorder (which reads the bus on its own) has stored the DAG's runs."""
    async with asyncio.timeout(20):
        while len(await store.list_runs(RunQuery(dag_id=dag_id, limit=count + 1))) < count:
            await asyncio.sleep(0.05)


async def test_the_link_header_of_a_listing_is_ascii_whatever_the_dag_id(served):
    async with served.client(timeout=10) as client:
        for dag_id in NASTY_DAG_IDS:
            path = f"/v1/dags/{quote(dag_id, safe='')}/runs"
            if any(ord(c) < 0x20 for c in dag_id):  # a control character is no id: refused before any header
                event = {"kind": "run", "dag_id": dag_id, "run_id": "r0", "state": "running"}
                async with served.client(PUBLISH_TOKEN) as publisher:
                    assert_refused(await publisher.post("/v1/events", json=event), 422, "bad_event")
                assert_refused(await client.get(path, params={"limit": 1}), 400, "bad_dag_id")
                continue
            await publish_runs(served, dag_id, 3)
            await recorded(served.app.state.store, dag_id, 3)
            for url, params in ((path, {"limit": 1}), ("/v1/runs", {"limit": 1, "dag_id": dag_id})):
                seen: list[str] = []
                for _ in range(10):  # follow the Link header to the last page (3 runs, one a page)
                    response = await client.get(url, params=params)
                    assert response.status_code == 200, (dag_id, response.text)
                    ascii_header_values(response)
                    seen += [row["run_id"] for row in response.json()["runs"]]
                    assert {row["dag_id"] for row in response.json()["runs"]} == {dag_id}
                    link = response.headers.get("link")
                    if link is None:
                        break
                    assert link.startswith("</") and link.endswith('>; rel="next"'), link
                    url, params = link[1 : link.index(">")], None
                assert seen == ["r2", "r1", "r0"], (dag_id, seen)


async def test_the_trigger_location_is_ascii_whatever_the_dag_id(served, stand_in_airflow):
    async with served.client(TRIGGER_TOKEN, timeout=10) as client:
        for dag_id in NASTY_DAG_IDS:
            stand_in_airflow.dags[dag_id] = {"dag_id": dag_id, "is_paused": False}
            response = await client.post(f"/v1/dags/{quote(dag_id, safe='')}/runs", json={})
            if any(ord(c) < 0x20 for c in dag_id):
                assert_refused(response, 400, "bad_dag_id")
                continue
            assert response.status_code == 202, (dag_id, response.text)
            ascii_header_values(response)
            location = response.headers["location"]
            assert location == f"/v1/dags/{quote(dag_id, safe='')}/runs/{quote(response.json()['run_id'], safe='')}/result"
            assert (await client.get(location, params={"timeout": 0})).status_code in (200, 202)


def id_routes(gateway) -> list[tuple[str, str]]:
    """(method, path) of every route that takes an id in its path, the id holding an encoded '/'."""
    hook, message = "/v1/webhooks/a%2Fb", "/v1/webhooks/messages/a%2Fb"
    return [
        ("POST", "/v1/dags/a%2Fb/runs"),
        ("GET", "/v1/dags/a%2Fb/runs"),
        ("GET", "/v1/dags/a%2Fb/runs/r"),
        ("GET", "/v1/dags/d/runs/a%2Fb"),
        ("GET", "/v1/dags/d/runs/a%2Fb/result"),
        ("GET", "/v1/dags/d/runs/a%2fb/events"),
        ("GET", "/v1/dags/d/runs/x%2Fresult"),  # would be run "x"'s result once decoded
        ("GET", "/v1/dags/d/runs/x%2Fevents"),
        ("POST", "/v1/dags/d/runs/r/tasks/a%2Fb/input"),
        ("GET", "/v1/dags/d%2Fruns%2Fr/result"),
        ("GET", "/v1/backfills/1%2F2/runs"),
        ("GET", "/v1/backfills/1%2F2/events"),
        ("GET", hook),
        ("PATCH", hook),
        ("DELETE", hook),
        ("POST", hook + "/rotate-secret"),
        ("GET", hook + "/attempts"),
        ("GET", hook + "/messages"),
        ("POST", hook + "/recover"),
        ("GET", message),
        ("POST", message + "/resend"),
        ("GET", "/ui/a%2Fb"),
    ]


async def test_an_encoded_slash_in_a_path_id_is_400_on_every_route(served):
    async with served.client(ADMIN_TOKEN, timeout=10) as client:
        for method, path in id_routes(served):
            response = await client.request(method, path, json={} if method in ("POST", "PATCH") else None)
            assert_refused(response, 400, "bad_path")
            assert "%2F" in response.json()["message"]
        # Asset names may hold '/', encoded or not (they are often URIs).
        response = await client.get("/v1/assets/s3%3A%2F%2Fb%2Fk/next", params={"timeout": 0})
        assert response.status_code == 202 and response.json()["asset"] == "s3://b/k"


async def test_control_characters_and_nul_in_ids_are_400(served):
    """A NUL in a query on PostgreSQL is an error of the database: refused before it gets there."""
    async with served.client(ADMIN_TOKEN, timeout=10) as client:
        for bad in ("a%00b", "a%0Db", "a%0A", "%7F"):
            for method, path, code in [
                ("GET", f"/v1/dags/{bad}/runs/r", "bad_dag_id"),
                ("GET", f"/v1/dags/d/runs/{bad}", "bad_run_id"),
                ("GET", f"/v1/dags/{bad}/runs", "bad_dag_id"),
                ("GET", f"/v1/dags/{bad}/runs/r/result?timeout=0", "bad_dag_id"),
                ("GET", f"/v1/dags/d/runs/{bad}/events", "bad_run_id"),
                ("POST", f"/v1/dags/{bad}/runs", "bad_dag_id"),
                ("GET", f"/v1/runs?dag_id={bad}", "bad_dag_id"),
                ("GET", f"/v1/runs?backfill_id={bad}", "bad_backfill_id"),
                ("GET", f"/v1/webhooks/{bad}", "bad_endpoint_id"),
                ("GET", f"/v1/webhooks/messages/{bad}", "bad_message_id"),
            ]:
                response = await client.request(method, path, json={} if method == "POST" else None)
                assert_refused(response, 400, code)
                ascii_header_values(response)
        bad_dag_ids = await client.post("/v1/webhooks", json={"url": "https://hooks.example.org/x", "dag_ids": ["a\x00b"]})
        assert bad_dag_ids.status_code == 422, bad_dag_ids.text
    assert json.loads(bad_dag_ids.content)["error"] == "bad_body"
