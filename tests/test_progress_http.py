"""Progress over HTTP, against the real Redis: the SSE `progress` events in order with the run's others,
the long-poll of the next progress after a position, the run view's latest values, bad input."""

from __future__ import annotations

import asyncio

from runbell.listeners.partial_output import ProgressSender, TaskRef, emit_progress
from runbell.listeners.publisher import emit
from tests.conftest import PUBLISH_TOKEN
from tests.test_gateway import read_sse, until, waiting

DAG = "chat"


def path(run_id: str, tail: str) -> str:
    return f"/v1/dags/{DAG}/runs/{run_id}/{tail}"


async def publish(gateway, run_id: str, state: str, **kw) -> int:
    seq = await asyncio.to_thread(emit, DAG, run_id, state, publisher=gateway.publisher(), **kw)
    assert seq is not None
    return seq


async def progress(gateway, run_id: str, value, key: str | None = None, task_id: str = "answer") -> int:
    seq = await asyncio.to_thread(emit_progress, DAG, run_id, task_id, value, key=key, publisher=gateway.publisher())
    assert seq is not None
    return seq


async def test_an_sse_client_gets_every_chunk_in_order_then_the_result(gateway):
    """A task streams 200 chunks through the hook's sender (coalesced at its rate): the client gets all
    of them, in order, as `progress` events, then the outcome and the end."""
    run_id = "sse"
    await publish(gateway, run_id, "running")
    await publish(gateway, run_id, "running", task_id="answer", result_task=True)
    publisher = gateway.publisher()
    sender = ProgressSender(20, publisher=lambda: publisher)
    ref = TaskRef(DAG, run_id, "answer", -1, None)

    async def task() -> None:
        await until(waiting(gateway))
        for i in range(200):
            sender.offer(ref, None, f"{i} ")
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(sender.finish, ref)
        await publish(gateway, run_id, "success", task_id="answer", result_task=True, result="".join(f"{i} " for i in range(200)))
        await publish(gateway, run_id, "success")

    async with gateway.client() as client:
        producer = asyncio.create_task(task())
        status, _, events = await read_sse(client, path(run_id, "events"))
        await producer
    assert status == 200
    names = [e.event for e in events]
    chunks = [item["value"] for e in events if e.event == "progress" for item in e.json()["progress"]["items"]]
    assert chunks == [f"{i} " for i in range(200)]
    assert names.index("outcome") > max(i for i, name in enumerate(names) if name == "progress")
    outcome = next(e.json() for e in events if e.event == "outcome")
    assert outcome["status"] == "success" and outcome["result"].startswith("0 1 2 ")
    ids = [e.id for e in events if e.event in ("task", "run", "progress")]
    assert ids == sorted(ids, key=lambda i: int(i.rpartition("-")[2])) and len(set(ids)) == len(ids)


async def test_the_long_poll_answers_the_next_progress_after_a_position(gateway):
    run_id = "lp"
    await publish(gateway, run_id, "running")
    first = await progress(gateway, run_id, 10, key="percent")
    await publish(gateway, run_id, "running", task_id="other")
    second = await progress(gateway, run_id, "Hel")
    async with gateway.client() as client:
        response = await client.get(path(run_id, "progress"), params={"timeout": 5})
        assert response.status_code == 200
        body = response.json()
        assert [e["seq"] for e in body["events"]] == [first, second]
        assert body["events"][0]["progress"]["items"] == [{"key": "percent", "value": 10}]
        assert body["ended"] is False
        after = body["after"]
        assert after.endswith(f"-{second}")

        waiter = asyncio.create_task(client.get(path(run_id, "progress"), params={"timeout": 20, "after": after}))
        await until(waiting(gateway))
        await publish(gateway, run_id, "success", task_id="other")  # not progress: the wait goes on
        third = await progress(gateway, run_id, "lo")
        response = await waiter
        assert response.status_code == 200
        assert [(e["seq"], e["progress"]["items"][0]["value"]) for e in response.json()["events"]] == [(third, "lo")]
        after = response.json()["after"]

        quiet = await client.get(path(run_id, "progress"), params={"timeout": 0.2, "after": after})
        assert quiet.status_code == 202 and quiet.headers["retry-after"] == "1"
        assert quiet.json()["events"] == [] and quiet.json()["after"] == after

        await publish(gateway, run_id, "success")
        done = await client.get(path(run_id, "progress"), params={"timeout": 5, "after": after})
        assert done.status_code == 200 and done.json()["events"] == [] and done.json()["ended"] is True


async def test_a_long_poll_answer_is_bounded_and_the_rest_comes_next(gateway):
    run_id = "many"
    for i in range(130):
        await progress(gateway, run_id, i)
    await publish(gateway, run_id, "success")
    async with gateway.client() as client:
        first = (await client.get(path(run_id, "progress"), params={"timeout": 5})).json()
        assert [e["progress"]["items"][0]["value"] for e in first["events"]] == list(range(100))
        assert first["ended"] is False
        rest = (await client.get(path(run_id, "progress"), params={"timeout": 5, "after": first["after"]})).json()
        assert [e["progress"]["items"][0]["value"] for e in rest["events"]] == list(range(100, 130))
        assert rest["ended"] is True


async def test_the_run_view_shows_the_latest_value_of_each_key(gateway):
    run_id = "view"
    await publish(gateway, run_id, "running")
    await progress(gateway, run_id, 10, key="percent")
    await progress(gateway, run_id, "chunk 1")
    last = await progress(gateway, run_id, 90, key="percent")
    async with gateway.client() as client:
        for _ in range(200):  # the recorder copies the stream into the store
            response = await client.get(f"/v1/dags/{DAG}/runs/{run_id}")
            if response.status_code == 200 and len(response.json()["progress"]) == 2:
                break
            await asyncio.sleep(0.05)
        latest = {p["key"]: (p["value"], p["position"]) for p in response.json()["progress"]}
    assert latest["percent"][0] == 90 and latest["percent"][1].endswith(f"-{last}")
    assert latest[None][0] == "chunk 1"


async def test_bad_progress_input_is_a_clear_4xx(gateway):
    async with gateway.client() as client:
        bad_after = await client.get(path("x", "progress"), params={"after": "nope", "timeout": 0})
        assert bad_after.status_code == 400 and bad_after.json()["error"] == "bad_after"
        bad_timeout = await client.get(path("x", "progress"), params={"timeout": "forever"})
        assert bad_timeout.status_code == 400
    async with gateway.client(token=PUBLISH_TOKEN) as client:
        event = {"kind": "progress", "dag_id": DAG, "run_id": "x", "task_id": "t", "state": "running", "progress": {"items": []}}
        refused = await client.post("/v1/events", json=event)
        assert refused.status_code == 422 and refused.json()["error"] == "bad_event"
        event["progress"] = {"items": [{"key": "percent", "value": 5}]}
        accepted = await client.post("/v1/events", json=event)
        assert accepted.status_code == 201
