"""Trigger-and-wait, Idempotency-Key, run-scoped tokens and the reconciler, against a real gateway
and Redis with a stand-in Airflow (the real-Airflow path is in tests/airflow)."""

from __future__ import annotations

import asyncio
import re

import pytest

from runbell.bus import keys
from runbell.bus.schema import decode_envelope
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from tests.conftest import READ_TOKEN, TRIGGER_TOKEN
from tests.test_gateway import until

TRIGGER = "/v1/dags/etl/runs"
RUN_ID_SHAPE = re.compile(r"^manual__\d{4}-\d\d-\d\dT[\d:.]+\+00:00_[A-Za-z0-9]{8}$")


@pytest.fixture
def airflow(stand_in_airflow):
    return stand_in_airflow


@pytest.fixture
async def gateway(gateway_factory, airflow):
    return await gateway_factory(airflow_url=airflow.url, reconcile_after=0.5, token_secret="test-secret-of-at-least-32-bytes!!")


async def publish(gateway, run_id: str, state: str, **kw) -> None:
    assert await asyncio.to_thread(emit, "etl", run_id, state, publisher=gateway.publisher(), **kw) is not None


async def test_trigger_and_wait_returns_the_result_and_a_scoped_token(gateway, airflow):
    async with gateway.client(TRIGGER_TOKEN) as client:
        call = asyncio.create_task(client.post(TRIGGER, params={"wait": 20}, json={"conf": {"q": 1}}))
        await until(lambda: airflow.runs)
        ((_, run_id),) = airflow.runs
        await publish(gateway, run_id, "success", task_id="answer", result_task=True, result={"a": 42})
        response = await call
    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["result"], body["run_id"]) == ("success", {"a": 42}, run_id)
    assert RUN_ID_SHAPE.match(run_id), run_id
    assert airflow.posts == [{"dag_run_id": run_id, "logical_date": None, "conf": {"q": 1}, "note": None}]
    assert response.headers["location"] == f"/v1/dags/etl/runs/{run_id.replace(':', '%3A').replace('+', '%2B')}/result"
    async with gateway.client(token=None) as browser:
        scoped = {"access_token": body["token"]}
        assert (await browser.get(f"/v1/dags/etl/runs/{run_id}/result", params={**scoped, "timeout": 0})).status_code == 200
        other = await browser.get("/v1/dags/etl/runs/another/result", params={**scoped, "timeout": 0})
        assert other.status_code == 403 and other.json()["error"] == "token_scope"
        publish_with_it = await browser.post("/v1/events", headers={"Authorization": f"Bearer {body['token']}"}, json={})
        assert publish_with_it.status_code == 403  # a scoped token is nothing outside its run's endpoints
        assert publish_with_it.json()["error"] == "token_scope"


async def test_no_wait_answers_202_with_location_and_the_queued_state(gateway, airflow):
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={})
        preferred = await client.post(TRIGGER, json={}, headers={"Prefer": "respond-async, wait=0.3"})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "pending" and body["run_state"] == "queued" and body["seq"] == 1
    assert response.headers["retry-after"] == "1" and "/result" in response.headers["location"]
    assert preferred.status_code == 202 and preferred.headers["preference-applied"] == "wait=0.3"
    log = gateway.publisher()._redis().xrange(keys.run_keys(gateway.namespace, "etl", body["run_id"]).log)
    queued = decode_envelope(log[0][1][b"env"]).event
    assert (queued.state, queued.source.value) == ("queued", "gateway")


async def test_idempotency_key_gives_one_run(gateway, airflow):
    headers = {"Idempotency-Key": "order-17"}
    async with gateway.client(TRIGGER_TOKEN) as client:
        first = await client.post(TRIGGER, json={"conf": {"n": 1}}, headers=headers)
        again = await client.post(TRIGGER, json={"conf": {"n": 1}}, headers=headers)
        changed = await client.post(TRIGGER, json={"conf": {"n": 2}}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["run_id"] == again.json()["run_id"]
    assert len(airflow.posts) == 1
    assert changed.status_code == 422 and changed.json()["error"] == "idempotency_key_reused"


async def test_idempotency_key_while_the_first_call_is_triggering_is_409(gateway, airflow):
    airflow.post_delay = 1.0
    headers = {"Idempotency-Key": "slow"}
    async with gateway.client(TRIGGER_TOKEN) as client:
        first = asyncio.create_task(client.post(TRIGGER, json={}, headers=headers))
        await until(lambda: airflow.posts)
        second = await client.post(TRIGGER, json={}, headers=headers)
        assert (await first).status_code == 202
    assert second.status_code == 409 and second.json()["error"] == "idempotency_in_progress"


async def test_a_clash_on_a_drawn_run_id_draws_again_but_a_given_one_is_409(gateway, airflow):
    airflow.conflicts = 2
    async with gateway.client(TRIGGER_TOKEN) as client:
        drawn = await client.post(TRIGGER, json={})
        assert drawn.status_code == 202
        assert len({p["dag_run_id"] for p in airflow.posts}) == 3
        given = await client.post(TRIGGER, json={"run_id": drawn.json()["run_id"]})
    assert given.status_code == 409 and given.json()["error"] == "run_exists"


async def test_a_caller_who_hangs_up_does_not_cancel_the_run(gateway, airflow):
    import httpx

    airflow.post_delay = 0.5
    async with gateway.client(TRIGGER_TOKEN, timeout=0.1) as impatient:
        with pytest.raises(httpx.TimeoutException):
            await impatient.post(TRIGGER, params={"wait": 10}, json={"run_id": "hung-up"})
    await until(lambda: ("etl", "hung-up") in airflow.runs)
    log = keys.run_keys(gateway.namespace, "etl", "hung-up").log
    await until(lambda: gateway.publisher()._redis().xlen(log) == 1)  # and the gateway said it is queued


async def test_an_error_answer_is_retried_with_the_same_run_id(gateway, airflow):
    airflow.errors_after_create = 1
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={"run_id": "mine"})
    assert response.status_code == 202 and response.json()["run_id"] == "mine"
    assert [p["dag_run_id"] for p in airflow.posts] == ["mine", "mine"] and len(airflow.runs) == 1


async def test_unknown_and_paused_dags_and_bad_requests(gateway, airflow):
    airflow.dags["sleepy"] = {"dag_id": "sleepy", "is_paused": True}
    async with gateway.client(TRIGGER_TOKEN) as client, gateway.client(READ_TOKEN) as reader:
        unknown = await client.post("/v1/dags/nope/runs", json={})
        paused = await client.post("/v1/dags/sleepy/runs", json={})
        assert airflow.posts == []
        unpaused = await client.post("/v1/dags/sleepy/runs", params={"unpause": "true"}, json={})
        bad_body = await client.post(TRIGGER, json={"conf": [], "colour": "red"})
        bad_wait = await client.post(TRIGGER, params={"wait": "999"}, json={})
        read_only = await reader.post(TRIGGER, json={})
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_dag"
    assert paused.status_code == 409 and paused.json()["error"] == "dag_paused" and "unpause" in paused.json()["message"]
    assert unpaused.status_code == 202 and airflow.dags["sleepy"]["is_paused"] is False
    assert bad_body.status_code == 422 and bad_body.json()["error"] == "bad_body"
    assert sorted(problem["loc"] for problem in bad_body.json()["accepted"]) == [["colour"], ["conf"]]
    assert bad_wait.status_code == 400 and bad_wait.json()["error"] == "bad_wait"
    assert read_only.status_code == 403


async def test_airflow_unreachable_is_503_at_once(gateway_factory):
    from tests.conftest import free_port

    gateway = await gateway_factory(airflow_url=f"http://127.0.0.1:{free_port()}", airflow_timeout=2)
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={})
    assert response.status_code == 503 and response.json()["error"] == "airflow_unreachable"


async def test_reconciler_settles_a_silent_run_from_airflow(gateway, airflow):
    """The hook sent nothing (SIGKILL, hook off): Airflow's REST view decides the wait."""
    airflow.runs[("etl", "lost")] = {"dag_run_id": "lost", "state": "failed", "run_type": "manual"}
    airflow.task_instances[("etl", "lost")] = [
        {"task_id": "extract", "map_index": -1, "try_number": 1, "state": "success", "end_date": "2026-01-01T00:00:01Z"},
        {"task_id": "load", "map_index": -1, "try_number": 2, "state": "failed", "end_date": "2026-01-01T00:00:02Z"},
        {"task_id": "report", "map_index": -1, "try_number": 0, "state": "upstream_failed", "end_date": None},
    ]
    async with gateway.client() as client:
        response = await client.get("/v1/dags/etl/runs/lost/result", params={"timeout": 20})
        again = await client.get("/v1/dags/etl/runs/lost/result", params={"timeout": 0})
    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["decided_by"], body["failure"]["task_id"]) == ("failed", "run", "load")
    log = gateway.publisher()._redis().xrange(keys.run_keys(gateway.namespace, "etl", "lost").log)
    events = [decode_envelope(fields[b"env"]).event for _, fields in log]
    assert [(e.task_id, e.state, e.source.value) for e in events] == [
        ("extract", "success", "reconciler"),
        ("load", "failed", "reconciler"),
        (None, "failed", "reconciler"),
    ]
    assert again.json()["seq"] == 3  # asking again published nothing twice


async def test_reconciler_ends_the_wait_with_404_for_a_run_airflow_does_not_have(gateway, airflow):
    async with gateway.client() as client:
        response = await client.get("/v1/dags/etl/runs/ghost/result", params={"timeout": 20})
        stream = await client.get("/v1/dags/etl/runs/ghost/events")
    assert response.status_code == 404 and response.json()["error"] == "run_not_found"
    assert stream.status_code == 404  # EventSource stops on it


async def test_without_airflow_a_silent_run_is_simply_waited_on(gateway_factory):
    gateway = await gateway_factory(reconcile_after=0.2)
    async with gateway.client() as client:
        response = await client.get("/v1/dags/etl/runs/ghost/result", params={"timeout": 1})
    assert response.status_code == 202


async def test_a_result_too_large_for_the_bus_is_fetched_from_airflow(gateway, airflow, tmp_path):
    small_cap = Publisher(
        PublisherConfig(redis_url=gateway.redis_url, namespace=gateway.namespace, spool_dir=tmp_path, result_max_bytes=10)
    )
    big = {"rows": list(range(100))}
    airflow.xcoms[("etl", "big", "answer", -1)] = big
    await asyncio.to_thread(emit, "etl", "big", "success", task_id="answer", result_task=True, result=big, publisher=small_cap)
    async with gateway.client() as client:
        body = (await client.get("/v1/dags/etl/runs/big/result", params={"timeout": 5, "resolve": "true"})).json()
    assert body["result"] == big
    assert body["result_task"]["is_ref"] is True
    assert body["result_ref"] == {"dag_id": "etl", "run_id": "big", "task_id": "answer", "map_index": -1}
