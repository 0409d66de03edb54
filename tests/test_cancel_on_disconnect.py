"""Cancel on disconnect (opt-in), against a real gateway and Redis with a stand-in Airflow: a caller
that goes away before its answer has its run failed in Airflow after the grace, with the reason on the
bus, unless the outcome is decided, another caller waits, a callback is registered, or it came back.
The real-Airflow path is in tests/airflow/test_trigger_e2e.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from runbell.listeners.publisher import emit
from runbell.service.airflow.cancels import REASON
from tests.conftest import TRIGGER_TOKEN
from tests.test_gateway import until

TRIGGER = "/v1/dags/etl/runs"
GRACE = 0.5


@pytest.fixture
async def gateway(gateway_factory, stand_in_airflow):
    return await gateway_factory(
        airflow_url=stand_in_airflow.url,
        cancel_grace=GRACE,
        reconcile_after=3600,
        token_secret="test-secret-of-at-least-32-bytes!!",
        webhook_allowed_hosts="127.0.0.1",
    )


async def leave_early(gateway, airflow, body: dict) -> str:
    """POST the trigger with a long wait and hang up after 0.5 s; the run's id, from Airflow's side."""
    async with gateway.client(TRIGGER_TOKEN, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(TRIGGER, params={"wait": 30}, json=body)
    return list(airflow.runs)[-1][1]


async def test_a_caller_that_goes_away_has_its_run_failed_with_the_reason(gateway, stand_in_airflow) -> None:
    run_id = await leave_early(gateway, stand_in_airflow, {"cancel_on_disconnect": True})
    await until(lambda: stand_in_airflow.run_patches, timeout=10)
    ((dag_id, patched, body),) = stand_in_airflow.run_patches
    assert (dag_id, patched, body["state"]) == ("etl", run_id, "failed") and "cancel_on_disconnect" in body["note"]
    async with gateway.client() as client:
        outcome = (await client.get(f"/v1/dags/etl/runs/{run_id}/result", params={"timeout": 5})).json()
    assert outcome["status"] == "failed" and outcome["decided_by"] == "run"
    assert outcome["failure"]["error"]["message"] == REASON
    assert gateway.app.state.cancels.cancelled == 1


async def test_without_the_option_a_caller_that_goes_away_changes_nothing(gateway, stand_in_airflow) -> None:
    async with gateway.client(TRIGGER_TOKEN, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(TRIGGER, params={"wait": 30}, json={})
    await asyncio.sleep(GRACE + 1.0)
    assert stand_in_airflow.runs and not stand_in_airflow.run_patches


async def test_another_waiter_keeps_the_run(gateway, stand_in_airflow) -> None:
    async with gateway.client(TRIGGER_TOKEN, timeout=0.5) as trigger, gateway.client() as other:
        call = asyncio.create_task(trigger.post(TRIGGER, params={"wait": 30}, json={"cancel_on_disconnect": True}))
        await until(lambda: stand_in_airflow.runs)
        ((_, run_id),) = stand_in_airflow.runs
        waiter = asyncio.create_task(other.get(f"/v1/dags/etl/runs/{run_id}/result", params={"timeout": 5}))
        with pytest.raises(httpx.ReadTimeout):
            await call
        await asyncio.sleep(GRACE + 1.0)
        assert not stand_in_airflow.run_patches  # the other caller still waits
        assert (await waiter).status_code == 202


async def test_a_caller_back_within_the_grace_keeps_the_run(gateway, stand_in_airflow) -> None:
    run_id = await leave_early(gateway, stand_in_airflow, {"cancel_on_disconnect": True})
    async with gateway.client() as client:  # back at once, waiting on the result
        response = await client.get(f"/v1/dags/etl/runs/{run_id}/result", params={"timeout": GRACE + 1.0})
    assert response.status_code == 202 and not stand_in_airflow.run_patches


async def test_a_decided_run_or_one_with_a_callback_is_never_cancelled(gateway, stand_in_airflow) -> None:
    decided = await leave_early(gateway, stand_in_airflow, {"cancel_on_disconnect": True})
    publisher = gateway.publisher()
    await asyncio.to_thread(emit, "etl", decided, "success", task_id="answer", result_task=True, result=1, publisher=publisher)
    callback = {"cancel_on_disconnect": True, "callback": {"url": "http://127.0.0.1:9/hook"}}
    async with gateway.client(TRIGGER_TOKEN, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(TRIGGER, params={"wait": 30}, json=callback)
    await asyncio.sleep(GRACE + 1.0)
    assert len(stand_in_airflow.runs) == 2 and not stand_in_airflow.run_patches


async def test_a_run_airflow_has_ended_meanwhile_is_never_failed(gateway, stand_in_airflow) -> None:
    run_id = await leave_early(gateway, stand_in_airflow, {"cancel_on_disconnect": True})
    stand_in_airflow.runs[("etl", run_id)]["state"] = "success"  # its events have not come yet
    await asyncio.sleep(GRACE + 1.0)
    assert not stand_in_airflow.run_patches


async def test_cancel_on_disconnect_needs_a_wait(gateway, stand_in_airflow) -> None:
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={"cancel_on_disconnect": True})
    assert response.status_code == 400 and response.json()["error"] == "bad_wait"
    assert not stand_in_airflow.runs
