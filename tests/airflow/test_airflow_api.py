"""runbell.service.airflow.api against each real Airflow of tests/airflow/conftest.py (all-admins: POST
/auth/token issues real admin JWTs whatever the credentials, and a bearer token that is sent is
verified; from 3.2 the API lets a tokenless request in too, 3.1 answers it 401, so the client logs in).

Every wait is bounded, and sized for a busy 2-core machine (a 10 s request timeout once failed
there): each request by HTTP_TIMEOUT, parsing by PARSE_TIMEOUT, runs are polled with short sleeps up
to RUN_TIMEOUT. A bound that is reached fails the test saying what it waited for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import textwrap
import time
import uuid
from typing import Any

import httpx
import pytest

from runbell.service.airflow import api as airflow_api
from runbell.service.airflow.api import (
    AirflowAuthFailed,
    AirflowClient,
    AirflowSettings,
    DagNotFound,
    NotFound,
    RunExists,
)
from runbell.service.bench.standalone import HTTP_TIMEOUT, PARSE_TIMEOUT

pytestmark = pytest.mark.airflow

RUN_TIMEOUT = 240.0  # rb_result_then_slow ends in ~10 s idle; the rest is slack for a loaded machine
MAPPED_DAG = "rb_api_mapped"
MAPPED_SOURCE = textwrap.dedent(
    f'''
    """Written by tests/airflow/test_airflow_api.py: a mapped task, and results of several types."""
    from airflow.sdk import dag, task


    @dag(schedule=None, catchup=False, tags=["runbell-e2e"])
    def {MAPPED_DAG}():
        @task
        def items() -> list:
            return [1, 2, 3]

        @task
        def double(x: int) -> dict:
            return {{"x": x, "double": 2 * x}}

        @task
        def s42() -> str:
            return "42"

        @task
        def pair() -> tuple:
            return (1, "x")

        double.expand(x=items())
        s42()
        pair()


    {MAPPED_DAG}()
    '''
)


def claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def until_parsed(client: AirflowClient, dag_id: str) -> dict:
    deadline = time.monotonic() + PARSE_TIMEOUT
    while True:
        try:
            return await client.get_dag(dag_id)
        except DagNotFound as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the dag-processor had not parsed {dag_id} after {PARSE_TIMEOUT:g} s") from exc
        await asyncio.sleep(0.5)


async def until_finished(client: AirflowClient, dag_id: str, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        run = await client.get_run(dag_id, run_id)
        assert run is not None
        if run["state"] in ("success", "failed"):
            return run
        assert time.monotonic() < deadline, f"{dag_id}/{run_id} still {run['state']} after {RUN_TIMEOUT:g} s"
        await asyncio.sleep(0.5)


@pytest.fixture
async def client(airflow):
    settings = AirflowSettings(airflow.base_url, username="u", password="p", timeout=HTTP_TIMEOUT)
    async with AirflowClient(settings) as c:
        yield c


async def test_token_endpoint_issues_jwts_that_the_client_uses(airflow):
    # The contract as read from the source: POST /auth/token, JSON body, 201, {"access_token"}.
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        resp = await http.post(f"{airflow.base_url}/auth/token", json={"username": "u", "password": "p"})
    assert resp.status_code == 201, resp.text
    jwt = resp.json()["access_token"]
    times = claims(jwt)
    assert times["exp"] - times["iat"] == 86400  # [api_auth] jwt_expiration_time, default

    settings = AirflowSettings(airflow.base_url, username="u", password="p", timeout=HTTP_TIMEOUT)
    async with AirflowClient(settings) as login:
        assert (await until_parsed(login, "rb_result_then_slow"))["dag_id"] == "rb_result_then_slow"
        issued = login._jwt
        assert issued and claims(issued)["exp"] - claims(issued)["iat"] == 86400
        # A token Airflow can no longer verify (as after a jwt_secret change) is answered 403
        # "Invalid JWT token": the client fetches a new one once and retries.
        login._jwt = forged = issued.rsplit(".", 1)[0] + ".AAAA"
        assert (await login.get_dag("rb_result_then_slow"))["dag_id"] == "rb_result_then_slow"
        assert login._jwt and login._jwt != forged and claims(login._jwt)["jti"] != claims(issued)["jti"]

    async with AirflowClient(AirflowSettings(airflow.base_url, token="not-a-jwt", timeout=HTTP_TIMEOUT)) as fixed:
        with pytest.raises(AirflowAuthFailed) as info:
            await fixed.get_dag("rb_result_then_slow")
    assert "403" in str(info.value) and "not-a-jwt" not in str(info.value)


async def test_dag_trigger_run_task_instances_and_result(airflow, client):
    dag_id = "rb_result_then_slow"
    dag = await until_parsed(client, dag_id)
    assert dag["dag_id"] == dag_id
    with pytest.raises(DagNotFound) as info:
        await client.get_dag("rb_no_such_dag")
    assert (info.value.status, info.value.code) == (404, "unknown_dag")

    await client.unpause(dag_id)
    assert (await client.get_dag(dag_id))["is_paused"] is False

    run_id = f"api-{uuid.uuid4().hex[:8]}"
    assert await client.get_run(dag_id, run_id) is None
    run = await client.trigger_run(dag_id, run_id=run_id, conf={"who": "test"}, logical_date=None, note="from the test")
    assert (run["dag_run_id"], run["conf"], run["logical_date"]) == (run_id, {"who": "test"}, None)
    with pytest.raises(RunExists) as info:
        await client.trigger_run(dag_id, run_id=run_id, conf={})
    assert (info.value.status, info.value.code) == (409, "run_exists")

    fetched = await client.get_run(dag_id, run_id)
    assert fetched is not None and fetched["dag_run_id"] == run_id and fetched["note"] == "from the test"
    assert (await until_finished(client, dag_id, run_id))["state"] == "success"

    tis = await client.task_instances(dag_id, run_id)
    assert sorted((ti["task_id"], ti["map_index"], ti["try_number"], ti["state"]) for ti in tis) == [
        ("answer", -1, 1, "success"),
        ("slow_cleanup", -1, 1, "success"),
    ]
    assert await client.xcom_value(dag_id, run_id, "answer") == {"answer": 42, "items": [1, 2, 3]}

    with pytest.raises(NotFound) as info:
        await client.xcom_value(dag_id, run_id, "slow_cleanup")  # returned None: no XCom pushed
    assert info.value.code == "no_xcom"
    with pytest.raises(NotFound) as info:
        await client.task_instances(dag_id, "no-such-run")
    assert info.value.code == "unknown_run"


async def test_mapped_task_instances_across_pages(airflow, client, monkeypatch):
    (airflow.home / "dags" / f"{MAPPED_DAG}.py").write_text(MAPPED_SOURCE)
    await until_parsed(client, MAPPED_DAG)
    await client.unpause(MAPPED_DAG)
    run_id = f"api-mapped-{uuid.uuid4().hex[:8]}"
    await client.trigger_run(MAPPED_DAG, run_id=run_id, conf={})
    assert (await until_finished(client, MAPPED_DAG, run_id))["state"] == "success"

    calls: list[dict[str, Any]] = []
    send = client._send

    async def counting_send(method: str, path: str, **kwargs: Any) -> httpx.Response:
        calls.append(kwargs.get("params") or {})
        return await send(method, path, **kwargs)

    monkeypatch.setattr(airflow_api, "PAGE_LIMIT", 2)  # 6 instances: real cursor paging, 3+ pages
    monkeypatch.setattr(client, "_send", counting_send)
    tis = await client.task_instances(MAPPED_DAG, run_id)
    assert sorted((ti["task_id"], ti["map_index"], ti["try_number"]) for ti in tis) == [
        ("double", 0, 1),
        ("double", 1, 1),
        ("double", 2, 1),
        ("items", -1, 1),
        ("pair", -1, 1),
        ("s42", -1, 1),
    ]
    # Keyset cursor paging from 3.2; an Airflow without it answers the first request in offset mode.
    by_cursor = all(c.get("cursor") for c in calls[1:])
    assert len(calls) >= 3 and calls[0]["cursor"] == "", calls
    assert by_cursor if airflow.version_tuple >= (3, 2) else all("offset" in c for c in calls[1:]), calls

    assert await client.xcom_value(MAPPED_DAG, run_id, "double", map_index=1) == {"x": 2, "double": 4}
    assert await client.xcom_value(MAPPED_DAG, run_id, "items") == [1, 2, 3]
    assert await client.xcom_value(MAPPED_DAG, run_id, "s42") == "42"
    assert await client.xcom_value(MAPPED_DAG, run_id, "pair") == [1, "x"]  # as json.dumps in the hook

    # Why not deserialize=true: it is Airflow's display form, not the data.
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers=airflow.headers()) as http:
        base = f"{airflow.base_url}/api/v2/dags/{MAPPED_DAG}/dagRuns/{run_id}/taskInstances"
        shown = {t: (await http.get(f"{base}/{t}/xcomEntries/return_value?deserialize=true")).json()["value"] for t in ("s42", "pair")}
    assert shown == {"s42": 42, "pair": "(1,x)"}
