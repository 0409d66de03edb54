"""Runs that wait for a person, through the gateway: long-poll (202 needs_input, after=), SSE
(needs_input, input_received), trigger-and-wait, and the answer endpoint passing the answer to a
stand-in Airflow's HITL endpoint (tests/stand_in_airflow.py); the real Airflow is in
tests/airflow/test_hitl_e2e.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from runbell.bus.schema import Event, EventKind, InputRequest
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, TOKENS, TRIGGER_TOKEN
from tests.test_gateway import until

RESPOND_TOKEN, OTHER_DAGS_RESPOND_TOKEN = "test-respond-token", "test-respond-elsewhere"
RUN = "/v1/dags/etl/runs/r1"
ASK = dict(kind="approval", subject="Ship release 7?", body="Notes", options=["Approve", "Reject"], deadline="2030-01-01T00:00:00+00:00")


@pytest.fixture
async def gateway(gateway_factory, stand_in_airflow):
    tokens = f"{TOKENS},{RESPOND_TOKEN}:respond@etl,{OTHER_DAGS_RESPOND_TOKEN}:respond@billing"
    return await gateway_factory(airflow_url=stand_in_airflow.url, tokens=tokens, reconcile_after=3600)


def task(state: str, task_id: str = "approve", run_id: str = "r1", **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id="etl", run_id=run_id, task_id=task_id, state=state, try_number=1, **kw)


def asks(task_id: str = "approve", run_id: str = "r1", map_index: int = -1, **change) -> Event:
    return task("awaiting_input", task_id, run_id, map_index=map_index, input_request=InputRequest(**{**ASK, **change}))


async def publish(gateway, *events: Event) -> None:
    publisher = gateway.publisher()
    for event in events:
        assert await asyncio.to_thread(publisher.publish, event) is not None


async def test_long_poll_is_told_at_once_then_waits_past_after_until_the_outcome(gateway, stand_in_airflow):
    await publish(gateway, Event(kind=EventKind.RUN, dag_id="etl", run_id="r1", state="running"), asks())
    async with gateway.client() as client:
        told = await client.get(f"{RUN}/result", params={"timeout": 20})
        body = told.json()
        assert told.status_code == 202 and body["status"] == "needs_input", body
        (request,) = body["needs_input"]
        assert (request["subject"], request["options"], request["deadline"]) == (ASK["subject"], ["Approve", "Reject"], ASK["deadline"])
        assert (request["task_id"], request["map_index"], request["kind"]) == ("approve", -1, "approval")
        assert request["respond"] == "/v1/dags/etl/runs/r1/tasks/approve/input" and body["after"] == request["position"]
        # Told of it: with after= the wait is held until the outcome.
        waiting = asyncio.create_task(client.get(f"{RUN}/result", params={"timeout": 20, "after": body["after"]}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await publish(gateway, task("running"), task("success", "result", result_task=True, result={"value": 7, "size": 1}))
        done = await waiting
        assert done.status_code == 200 and done.json()["result"] == 7
        quick = await client.get(f"{RUN}/result", params={"timeout": 0, "after": body["after"]})
        assert quick.status_code == 200  # a decided outcome wins


async def test_a_newer_request_ends_a_wait_past_an_older_one(gateway):
    await publish(gateway, asks("first"))
    async with gateway.client() as client:
        first = (await client.get(f"{RUN}/result", params={"timeout": 5})).json()
        waiting = asyncio.create_task(client.get(f"{RUN}/result", params={"timeout": 20, "after": first["after"]}))
        await asyncio.sleep(0.2)
        await publish(gateway, asks("second", map_index=3))
        second = (await waiting).json()
        pending = await client.get(f"{RUN}/result", params={"timeout": 0.2, "after": second["after"]})
    assert second["status"] == "needs_input" and [r["task_id"] for r in second["needs_input"]] == ["first", "second"]
    assert second["needs_input"][1]["respond"].endswith("/tasks/second/input?map_index=3")
    assert pending.status_code == 202 and pending.json()["status"] == "pending" and len(pending.json()["needs_input"]) == 2


async def test_sse_sends_needs_input_then_input_received(gateway, stand_in_airflow):
    await publish(gateway, asks())
    stand_in_airflow.ask("etl", "r1", "approve", options=ASK["options"])
    frames: list[tuple[str, dict]] = []
    async with gateway.client() as reader, gateway.client(RESPOND_TOKEN) as responder:
        async with reader.stream("GET", f"{RUN}/events") as stream:
            lines = stream.aiter_lines()
            event = None
            async for line in lines:
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("needs_input", "input_received"):
                    frames.append((event, json.loads(line[6:])))
                    if event == "needs_input":
                        answered = await responder.post(f"{RUN}/tasks/approve/input", json={"chosen_options": ["Approve"]})
                        assert answered.status_code == 200, answered.text
                    else:
                        break
    (asked, data), (closed, closing) = frames
    assert (asked, data["subject"], data["position"].rpartition("-")[2]) == ("needs_input", ASK["subject"], "1")
    assert (closed, closing["position"], closing["closed_by"]) == ("input_received", data["position"], "input_received")


async def test_trigger_and_wait_answers_needs_input(gateway, stand_in_airflow):
    async with gateway.client(TRIGGER_TOKEN) as client:
        call = asyncio.create_task(client.post("/v1/dags/etl/runs", params={"wait": 20}, json={}))
        await until(lambda: stand_in_airflow.runs)
        ((_, run_id),) = stand_in_airflow.runs
        await publish(gateway, asks(run_id=run_id))
        response = await call
    body = response.json()
    assert response.status_code == 202 and body["status"] == "needs_input" and body["token"], body
    assert body["needs_input"][0]["respond"] == f"/v1/dags/etl/runs/{run_id.replace(':', '%3A').replace('+', '%2B')}/tasks/approve/input"


async def test_answer_goes_to_airflow_and_closes_the_request(gateway, stand_in_airflow):
    await publish(
        gateway, asks(options=["a", "b", "c"], multiple=True, params={"reason": {"value": None, "schema": {}, "description": None}})
    )
    stand_in_airflow.ask("etl", "r1", "approve", options=["a", "b", "c"], multiple=True)
    async with gateway.client(RESPOND_TOKEN) as client:
        answer = {"chosen_options": ["a", "c"], "params_input": {"reason": "ok"}}
        response = await client.post(f"{RUN}/tasks/approve/input", json=answer)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "accepted",
            "dag_id": "etl",
            "run_id": "r1",
            "task_id": "approve",
            "map_index": -1,
            **answer,
            "responded_at": "2026-01-01T00:00:00Z",
        }
        again = await client.post(f"{RUN}/tasks/approve/input", json=answer)
        closed = await client.get(f"{RUN}/result", params={"timeout": 0})
    assert stand_in_airflow.hitl_patches == [{"key": ("etl", "r1", "approve", -1), **answer}] * 2  # closed: Airflow judges
    assert again.status_code == 409 and again.json()["error"] == "already_answered"
    assert closed.status_code == 202 and closed.json()["status"] == "pending" and "needs_input" not in closed.json()


async def test_the_gateway_checks_options_it_knows_as_airflow_3_1_does_not(gateway, stand_in_airflow):
    stand_in_airflow.hitl_validates = False  # 3.1 / 3.2: any option is taken, and the task fails on resume
    await publish(gateway, asks(), asks("entry", options=["OK"], params={"n": {"value": 1, "schema": {}, "description": None}}))
    stand_in_airflow.ask("etl", "r1", "approve", options=ASK["options"])
    stand_in_airflow.ask("etl", "r1", "entry", options=["OK"])
    async with gateway.client(RESPOND_TOKEN) as client:
        for body, code in [
            ({"chosen_options": ["Maybe"]}, "bad_options"),
            ({"chosen_options": ["Approve", "Reject"]}, "bad_options"),
            ({}, "bad_options"),
        ]:
            refused = await client.post(f"{RUN}/tasks/approve/input", json=body)
            assert refused.status_code == 400 and refused.json()["error"] == code, refused.text
            assert refused.json()["accepted"] == {"options": ["Approve", "Reject"], "multiple": False}
        wrong_form = await client.post(f"{RUN}/tasks/entry/input", json={"params_input": {"m": 2}})
        assert wrong_form.status_code == 400 and wrong_form.json()["accepted"] == {"params": ["n"]}
        entered = await client.post(f"{RUN}/tasks/entry/input", json={"params_input": {"n": 2}})  # the only option, implied
        assert entered.status_code == 200 and entered.json()["chosen_options"] == ["OK"]
    assert [p["key"][2] for p in stand_in_airflow.hitl_patches] == ["entry"]


async def test_a_request_cut_to_the_bus_bounds_is_judged_by_airflow_for_what_the_gateway_does_not_know(gateway, stand_in_airflow):
    from runbell.bus.schema import OPTIONS_MAX

    stand_in_airflow.hitl_validates = False  # 3.1 / 3.2: any option is taken, and the task fails on resume
    many = [f"o{i}" for i in range(OPTIONS_MAX + 20)]
    # The hook's request as cut to the bounds: the first OPTIONS_MAX options; none fitting: its "?" placeholder.
    await publish(gateway, asks("many", options=many[:OPTIONS_MAX], truncated=True), asks("long", options=["?"], truncated=True))
    stand_in_airflow.ask("etl", "r1", "many", options=many)
    stand_in_airflow.ask("etl", "r1", "long", options=["x" * 200])
    async with gateway.client(RESPOND_TOKEN) as client:
        placeholder = await client.post(f"{RUN}/tasks/long/input", json={})  # never "?" sent as if it were the only option
        named = await client.post(f"{RUN}/tasks/long/input", json={"chosen_options": ["?"]})  # the dashboard's "?" button
        past_the_cut = await client.post(f"{RUN}/tasks/many/input", json={"chosen_options": [many[-1]]})
    assert placeholder.status_code == 400 and placeholder.json()["error"] == "bad_options", placeholder.text
    assert named.status_code == 400 and "Airflow's UI" in named.json()["message"], named.text
    assert past_the_cut.status_code == 200, past_the_cut.text
    assert [(p["key"][2], p["chosen_options"]) for p in stand_in_airflow.hitl_patches] == [("many", [many[-1]])]


async def test_an_unknown_request_is_passed_to_airflow_which_judges(gateway, stand_in_airflow):
    stand_in_airflow.ask("etl", "r1", "quiet", 2, options=["x"])  # the hook's event never came
    async with gateway.client(RESPOND_TOKEN) as client:
        missing = await client.post(f"{RUN}/tasks/nothing/input", json={"chosen_options": ["x"]})
        nothing_to_send = await client.post(f"{RUN}/tasks/nothing/input", json={})
        refused = await client.post(f"{RUN}/tasks/quiet/input", params={"map_index": 2}, json={"chosen_options": ["y"]})
        taken = await client.post(f"{RUN}/tasks/quiet/input", params={"map_index": 2}, json={"chosen_options": ["x"]})
    assert missing.status_code == 404 and missing.json()["error"] == "no_open_request"
    assert nothing_to_send.status_code == 404 and nothing_to_send.json()["accepted"]
    assert refused.status_code == 400 and refused.json()["error"] == "answer_refused" and "allowed options" in refused.json()["message"]
    assert taken.status_code == 200 and taken.json()["map_index"] == 2


async def test_roles_and_scopes_of_the_answer(gateway, stand_in_airflow):
    stand_in_airflow.ask("etl", "r1", "approve", options=["Approve"])
    body = {"chosen_options": ["Approve"]}
    statuses = {}
    for token in (READ_TOKEN, PUBLISH_TOKEN, OTHER_DAGS_RESPOND_TOKEN, None):
        async with gateway.client(token) as client:
            response = await client.post(f"{RUN}/tasks/approve/input", json=body)
            statuses[token] = (response.status_code, response.json()["error"])
    assert statuses == {
        READ_TOKEN: (403, "forbidden"),
        PUBLISH_TOKEN: (403, "forbidden"),
        OTHER_DAGS_RESPOND_TOKEN: (403, "token_scope"),
        None: (401, "missing_token"),
    }
    async with gateway.client(None) as client:  # ?access_token= is for reading (EventSource), never for answering
        in_query = await client.post(f"{RUN}/tasks/approve/input", params={"access_token": RESPOND_TOKEN}, json=body)
        assert (in_query.status_code, in_query.json()["error"]) == (401, "missing_token")
    for token in (TRIGGER_TOKEN, ADMIN_TOKEN):  # trigger and admin include respond
        stand_in_airflow.hitl[("etl", "r1", "approve", -1)]["response_received"] = False
        async with gateway.client(token) as client:
            assert (await client.post(f"{RUN}/tasks/approve/input", json=body)).status_code == 200


async def test_every_bad_answer_is_a_4xx_saying_what_is_accepted(gateway):
    async with gateway.client(RESPOND_TOKEN) as client:
        cases = [
            ({"map_index": "²"}, {"chosen_options": ["a"]}, 400, "bad_map_index"),
            ({"map_index": "-2"}, {"chosen_options": ["a"]}, 400, "bad_map_index"),
            ({}, {"chosen_options": []}, 422, "bad_body"),
            ({}, {"chosen_options": ["x" * 101]}, 422, "bad_body"),
            ({}, {"chosen_options": [str(i) for i in range(101)]}, 422, "bad_body"),
            ({}, {"chosen_options": ["a"], "params_input": {"p": "v" * 17000}}, 422, "bad_body"),
            ({}, {"chosen_options": ["a"], "extra": 1}, 422, "bad_body"),
            ({}, {"chosen_options": "a"}, 422, "bad_body"),
            ({}, [], 422, "bad_body"),
        ]
        for params, body, status, code in cases:
            response = await client.post(f"{RUN}/tasks/approve/input", params=params, json=body)
            assert response.status_code == status and response.json()["error"] == code, (params, body, response.text)
            assert response.json()["message"]
        not_json = await client.post(f"{RUN}/tasks/approve/input", content=b"{", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 422


async def test_without_airflow_an_answer_is_503_with_retry_after(gateway_factory):
    gateway = await gateway_factory(tokens=f"{TOKENS},{RESPOND_TOKEN}:respond")
    async with gateway.client(RESPOND_TOKEN) as client:
        response = await client.post(f"{RUN}/tasks/approve/input", json={"chosen_options": ["a"]})
    assert response.status_code == 503 and response.json()["error"] == "airflow_not_configured" and response.headers["retry-after"]


async def test_airflow_unreachable_is_503_with_retry_after(gateway_factory):
    from tests.conftest import free_port

    gateway = await gateway_factory(airflow_url=f"http://127.0.0.1:{free_port()}", tokens=f"{TOKENS},{RESPOND_TOKEN}:respond")
    async with gateway.client(RESPOND_TOKEN) as client:
        response = await client.post(f"{RUN}/tasks/approve/input", json={"chosen_options": ["a"]})
    assert response.status_code == 503 and response.json()["error"] == "airflow_unreachable" and response.headers["retry-after"]


async def test_an_answer_waits_until_the_task_has_parked(gateway, stand_in_airflow):
    """Airflow 3.3 on SQLite strands a task answered between storing its request and parking."""
    await publish(gateway, asks())
    stand_in_airflow.ask("etl", "r1", "approve", options=ASK["options"])
    stand_in_airflow.parks_after = 3
    async with gateway.client(RESPOND_TOKEN) as client:
        response = await client.post(f"{RUN}/tasks/approve/input", json={"chosen_options": ["Reject"]})
    assert response.status_code == 200
    assert len(stand_in_airflow.hitl_state_reads) == 4 and len(stand_in_airflow.hitl_patches) == 1


async def test_the_python_client_waits_past_a_request_for_the_outcome(gateway):
    from runbell.service.client.client import AsyncRunbellClient

    await publish(gateway, asks())
    async with gateway.client() as raw:
        assert (await raw.get(f"{RUN}/result", params={"timeout": 0})).json()["status"] == "needs_input"
    import httpx

    calls: list[str] = []

    class Counting(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            calls.append(str(request.url))
            return await super().handle_async_request(request)

    async with AsyncRunbellClient(gateway.url, token=READ_TOKEN, transport=Counting()) as client:
        waiting = asyncio.create_task(client.wait("etl", "r1", timeout=20))
        await asyncio.sleep(2.5)
        assert not waiting.done()
        await publish(gateway, task("success", "result", result_task=True, result={"value": 3, "size": 1}))
        assert (await waiting).result == 3
    # Told once, then held past the request (not asked again every Retry-After).
    assert len(calls) == 2 and "after=" in calls[1], calls
