"""A trigger's `callback` (a webhook for one run), against a real gateway, Redis and receiver with a
stand-in Airflow: delivered once the run is decided, signed as a subscription's, with the caller's
headers; only that run's events; the same target guard, delivery log and bounds."""

from __future__ import annotations

import asyncio

import pytest

from runbell.listeners.partial_output import emit_progress
from runbell.listeners.publisher import emit
from tests.conftest import ADMIN_TOKEN, TRIGGER_TOKEN
from tests.test_gateway import until
from tests.test_webhook_delivery import receiver  # noqa: F401  # the fixture: a real HTTP receiver

TRIGGER = "/v1/dags/etl/runs"


@pytest.fixture
async def gateway(gateway_factory, stand_in_airflow):
    return await gateway_factory(
        airflow_url=stand_in_airflow.url,
        token_secret="test-secret-of-at-least-32-bytes!!",
        webhook_allowed_hosts="127.0.0.1",
        reconcile_after=3600,
    )


async def publish(gateway, run_id: str, state: str, **kw) -> None:
    assert await asyncio.to_thread(emit, "etl", run_id, state, publisher=gateway.publisher(), **kw) is not None


async def test_the_outcome_is_posted_to_the_callback_signed_with_its_headers(gateway, stand_in_airflow, receiver) -> None:  # noqa: F811
    callback = {"url": receiver.at("/done"), "headers": {"Authorization": "Bearer caller-secret", "X-Request": "r-17"}}
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={"conf": {}, "callback": callback})
    assert response.status_code == 202, response.text
    body = response.json()
    run_id, created = body["run_id"], body["callback"]
    assert created["id"].startswith("ep_") and created["secret"].startswith("whsec_") and created["kinds"] == ["outcome"]
    await publish(gateway, "another-run", "success", task_id="answer", result_task=True, result=1)  # not this run's
    await publish(gateway, run_id, "running", task_id="answer", result_task=True)
    await publish(gateway, run_id, "success", task_id="answer", result_task=True, result={"a": 42})
    await until(lambda: receiver.hits_at("/done"), timeout=30)
    await asyncio.sleep(0.5)  # nothing else may follow
    (hit,) = receiver.hits_at("/done")
    payload = hit.verify(created["secret"])
    assert payload["type"] == "run.outcome"
    assert (payload["data"]["run_id"], payload["data"]["status"], payload["data"]["result"]) == (run_id, "success", {"a": 42})
    assert hit.headers["authorization"] == "Bearer caller-secret" and hit.headers["x-request"] == "r-17"

    async with gateway.client(ADMIN_TOKEN) as admin:  # the same delivery log as a subscription's
        messages = (await admin.get(f"/v1/webhooks/{created['id']}/messages")).json()["messages"]
        assert [(m["run_id"], m["kind"], m["status"]) for m in messages] == [(run_id, "outcome", "delivered")]
        shown = (await admin.get(f"/v1/webhooks/{created['id']}")).json()
        assert shown["run_id"] == run_id and shown["expires_at"] is not None
        assert "caller-secret" not in (await admin.get("/v1/webhooks")).text  # its headers are never shown


async def test_a_callback_can_ask_for_progress_and_task_events_too(gateway, stand_in_airflow, receiver) -> None:  # noqa: F811
    callback = {"url": receiver.at("/all"), "kinds": ["progress", "outcome"]}
    async with gateway.client(TRIGGER_TOKEN) as client:
        body = (await client.post(TRIGGER, json={"callback": callback})).json()
    run_id = body["run_id"]
    await asyncio.to_thread(emit_progress, "etl", run_id, "answer", "Hel", publisher=gateway.publisher())
    await asyncio.to_thread(emit_progress, "etl", run_id, "answer", "lo", publisher=gateway.publisher())
    await publish(gateway, run_id, "success", task_id="answer", result_task=True, result="Hello")
    await until(lambda: len(receiver.hits_at("/all")) >= 3, timeout=30)
    payloads = sorted((hit.verify(body["callback"]["secret"]) for hit in receiver.hits_at("/all")), key=lambda p: p["data"]["seq"])
    assert [p["type"] for p in payloads] == ["task.progress", "task.progress", "run.outcome"]
    assert [p["data"]["progress"]["items"][0]["value"] for p in payloads[:2]] == ["Hel", "lo"]


@pytest.mark.parametrize(
    "callback,says",
    [
        ({"url": "ftp://127.0.0.1/x"}, "callback.url"),
        ({"url": "http://127.0.0.1:9/x", "kinds": ["everything"]}, "callback.kinds.0"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"Host": "evil"}}, "host: set by the delivery itself"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"webhook-signature": "v1,forged"}}, "webhook-signature"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"X-A": "1", "x-a": "2"}}, "given twice"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"X-A": "line\r\nInjected: 1"}}, "callback.headers.X-A"),
        ({"url": "http://127.0.0.1:9/x", "headers": {f"X-{i}": "v" for i in range(21)}}, "callback.headers"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"bad name": "v"}}, "callback.headers"),
        ({"url": "http://127.0.0.1:9/x", "extra": 1}, "callback.extra"),
        ({"url": "http://127.0.0.1:9/x", "headers": {"X-Note": "caf\u00e9"}}, "callback.headers.X-Note"),  # HTTP sends ASCII
        ({"url": "http://127.0.0.1:9/x", "headers": {"Traceparent": "00-x"}}, "traceparent: set by the delivery itself"),
    ],
)
async def test_a_bad_callback_is_refused_before_anything_is_triggered(gateway, stand_in_airflow, callback, says) -> None:
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={"callback": callback})
    assert response.status_code == 422, response.text
    assert says in response.text
    assert not stand_in_airflow.runs


async def test_a_callback_to_a_private_address_is_refused_by_the_target_guard(gateway_factory, stand_in_airflow) -> None:
    gateway = await gateway_factory(airflow_url=stand_in_airflow.url)  # no allowed hosts: loopback is private
    async with gateway.client(TRIGGER_TOKEN) as client:
        response = await client.post(TRIGGER, json={"callback": {"url": "http://127.0.0.1:9/x"}})
    assert response.status_code == 422 and response.json()["error"] == "target_refused"
    assert not stand_in_airflow.runs


async def test_a_retried_trigger_registers_no_second_callback(gateway, stand_in_airflow, receiver) -> None:  # noqa: F811
    request = {"callback": {"url": receiver.at("/once")}}
    headers = {"Idempotency-Key": "order-18"}
    async with gateway.client(TRIGGER_TOKEN) as client:
        first = (await client.post(TRIGGER, json=request, headers=headers)).json()
        again = (await client.post(TRIGGER, json=request, headers=headers)).json()
    assert first["run_id"] == again["run_id"] and first["callback"] is not None
    assert again["callback"] == first["callback"]  # the same callback, told again: none registered twice
    await publish(gateway, first["run_id"], "failed", task_id="answer", critical=True, error="boom")
    await until(lambda: receiver.hits_at("/once"), timeout=30)
    await asyncio.sleep(0.5)
    assert len(receiver.hits_at("/once")) == 1


async def test_callbacks_are_not_listed_and_expired_ones_are_swept_once_delivered(gateway, stand_in_airflow, receiver) -> None:  # noqa: F811
    from datetime import timedelta

    from runbell.service.core import clock

    async with gateway.client(TRIGGER_TOKEN) as client:
        body = (await client.post(TRIGGER, json={"callback": {"url": receiver.at("/swept")}})).json()
    endpoint_id = body["callback"]["id"]
    webhooks = gateway.app.state.webhooks
    async with gateway.client(ADMIN_TOKEN) as admin:
        assert (await admin.get("/v1/webhooks")).json()["webhooks"] == []  # subscriptions only
        assert (await admin.get(f"/v1/webhooks/{endpoint_id}")).status_code == 200
    later = clock.now() + timedelta(days=30)  # past its expiry
    await publish(gateway, body["run_id"], "failed", task_id="answer", critical=True, error="boom")
    await until(lambda: receiver.hits_at("/swept"), timeout=30)
    for _ in range(100):  # until its one message is marked delivered
        messages = await webhooks.messages(endpoint_id)
        if messages and messages[0].status == "delivered":
            break
        await asyncio.sleep(0.05)
    assert await webhooks.purge_expired_callbacks(clock.now()) == 0  # not expired yet
    assert await webhooks.purge_expired_callbacks(later) == 1
    assert await webhooks.get_endpoint(endpoint_id) is None
    assert [m.status for m in await webhooks.messages(endpoint_id)] == ["delivered"]  # its log is kept
