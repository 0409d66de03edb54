"""Over HTTP, on PostgreSQL and SQLite: POST /v1/events refuses what the store cannot hold with a
422, keeps NUL characters exactly (through the store too), and the recorder's dead letters are listed
and re-driven by an admin (the API and `runbell dead-letters`)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import envelope_json
from runbell.service.client.cli import main as cli
from runbell.service.client.exits import EXIT_FAILED, EXIT_SUCCESS
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN
from tests.test_gateway import result_path
from tests.test_poison import DATA_ERROR, event, failing_for

DAG = "etl"
WAIT = 30.0


def body(run: str, **fields) -> dict:
    base = {"kind": "task", "dag_id": DAG, "run_id": run, "task_id": "t", "state": "success", "ts": 1_700_000_000.0}
    return {key: value for key, value in {**base, **fields}.items() if value is not None}


# The values (and the other bounds of the schema), each refused at ingress.
REFUSED = {
    "ts_1e20": {"ts": 1e20},
    "ts_minus_1e20": {"ts": -1e20},
    "try_number_2_63": {"try_number": 2**63},
    "try_number_2_31": {"try_number": 2**31},
    "map_index_2_31": {"map_index": 2**31},
    "map_index_minus_2": {"map_index": -2},
    "year_10000": {"kind": "run", "state": "running", "task_id": None, "logical_date": "9999-12-31T23:30:00-01:00"},
    "year_0": {"kind": "run", "state": "running", "task_id": None, "run_after": "0001-01-01T00:00:00+01:00"},
    "not_a_date": {"kind": "run", "state": "running", "task_id": None, "run_after": "yesterday"},
    "nul_dag_id": {"dag_id": "etl\x00"},
    "newline_run_id": {"run_id": "a\nb"},
    "nul_task_id": {"task_id": "t\x00"},
    "long_host": {"host": "h" * 256},
    "long_msg": {"msg": "m" * 2001},
    "long_error": {"state": "failed", "error": {"type": "E", "message": "m" * 2001}},
    "long_run_type": {"kind": "run", "state": "running", "task_id": None, "run_type": "r" * 65},
    "long_backfill_id": {"kind": "run", "state": "running", "task_id": None, "backfill_id": "b" * 251},
    "long_state": {"state": "s" * 17},
    "huge_size": {"result": {"value": 1, "size": 2**53}},
}


async def last_seq(store, dag_id: str, run_id: str) -> int:
    return (await store.last_position(dag_id, run_id)).seq


async def wait_for(predicate, timeout: float = WAIT):
    async with asyncio.timeout(timeout):
        while not (found := await predicate()):
            await asyncio.sleep(0.05)
    return found


async def test_publish_refuses_what_the_store_cannot_hold_and_keeps_nul_exactly(gateway_factory, database_url):
    gateway = await gateway_factory(database_url=database_url, webhooks=False)
    store = gateway.app.state.store
    async with gateway.client(PUBLISH_TOKEN) as http:
        for name, fields in REFUSED.items():
            response = await http.post("/v1/events", json=body(f"refused-{name}", **fields))
            assert response.status_code == 422, (name, response.text)
            assert response.json()["error"] == "bad_event" and response.json()["message"], name
        value = {"text": "a\x00b", "k\x00": ["\U0001f600\x00", "\\u0000"], "n": 2**70}
        sent = [
            body("nul", result_task=True, result={"value": value, "size": 1}),
            body("nul-error", state="failed", critical=True, error={"type": "E\x00", "message": "x\x00y"}, msg="\x00"),
        ]
        for event_body in sent:
            response = await http.post("/v1/events", json=event_body)
            assert response.status_code == 201, response.text
        # A valid event after all of them is recorded.
        response = await http.post("/v1/events", json=body("after", state="success"))
        assert response.status_code == 201
    for run_id in ("nul", "nul-error", "after"):
        await wait_for(lambda run_id=run_id: last_seq(store, DAG, run_id))
    for name in REFUSED:
        assert await last_seq(store, DAG, f"refused-{name}") == 0
    # The store's copy is what callers get once Redis no longer has the run.
    client = aioredis.Redis.from_url(gateway.redis_url)
    for run_id in ("nul", "nul-error"):
        k = keys.run_keys(gateway.namespace, DAG, run_id)
        await client.delete(k.seq, k.log, k.ids)
    await client.aclose()
    async with gateway.client() as http:
        got = (await http.get(result_path("nul"), params={"timeout": 1})).json()
        failed = (await http.get(result_path("nul-error"), params={"timeout": 1})).json()
    assert got["status"] == "success" and got["result"] == value
    assert failed["status"] == "failed" and failed["failure"]["error"] == {"type": "E\x00", "message": "x\x00y"}
    [stored] = await store.events(DAG, "nul-error")
    assert stored.event.msg == "\x00"


async def _letters(http, count: int):
    page = (await http.get("/v1/dead-letters")).json()
    return page if len(page["dead_letters"]) == count else None


async def test_dead_letters_are_listed_and_re_driven_by_an_admin(gateway_factory, database_url, monkeypatch):
    gateway = await gateway_factory(database_url=database_url, webhooks=False)
    store = gateway.app.state.store
    redis = aioredis.Redis.from_url(gateway.redis_url)
    try:
        # One entry no store can hold (seq 2**63), and one this store refuses until the fault is gone.
        await redis.xadd(keys.global_stream(gateway.namespace), {"env": envelope_json(2**63, json.dumps(event("huge-seq")))})
        async with gateway.client(ADMIN_TOKEN) as http:  # dead-lettered first (the recorder may read all three at once)
            await wait_for(lambda: _letters(http, 1))
        monkeypatch.setattr(store, "record", failing_for(store, "flaky", DATA_ERROR))
        await redis.xadd(keys.global_stream(gateway.namespace), {"env": envelope_json(1, json.dumps(event("flaky-run", id="flaky")))})
        await redis.xadd(keys.global_stream(gateway.namespace), {"env": envelope_json(1, json.dumps(event("good")))})
    finally:
        await redis.aclose()

    async with gateway.client(ADMIN_TOKEN) as http:
        page = await wait_for(lambda: _letters(http, 2))
        assert await wait_for(lambda: last_seq(store, DAG, "good")) == 1  # recorded beside them
        huge, flaky = page["dead_letters"]  # huge: no event (the envelope schema bounds seq)
        assert (huge["reason"], huge["run_id"], huge["envelope"]["seq"], huge["attempts"]) == ("schema", None, 2**63, 1)
        assert (flaky["event_id"], flaky["stream_id"] is not None) == ("flaky", True)
        assert "value out of int32 range" in flaky["error"]
        assert page["next_after"] is None
        one = (await http.get("/v1/dead-letters", params={"limit": 1})).json()
        assert [d["id"] for d in one["dead_letters"]] == [huge["id"]] and one["next_after"] == huge["id"]
        rest = (await http.get("/v1/dead-letters", params={"after": huge["id"]})).json()
        assert [d["id"] for d in rest["dead_letters"]] == [flaky["id"]]
        metrics = (await http.get("/metrics")).text
        assert "runbell_recorder_dead_letters_total 2.0" in metrics

        for path, status in (
            ("/v1/dead-letters/x/redrive", 400),
            ("/v1/dead-letters/%C2%B2/redrive", 400),
            ("/v1/dead-letters/99999/redrive", 404),
            ("/v1/dead-letters/28115713436940/redrive", 404),  # past the id column (an int32 on PostgreSQL): no row's
            ("/v1/dead-letters/1234567890123456789/redrive", 400),
        ):
            response = await http.post(path)
            assert response.status_code == status and response.json()["error"], (path, response.text)
        for params in ({"limit": 0}, {"limit": 501}, {"after": -1}, {"limit": "²"}, {"after": 2**31}):
            response = await http.get("/v1/dead-letters", params=params)
            assert response.status_code == 400, (params, response.text)
        again = await http.post(f"/v1/dead-letters/{huge['id']}/redrive")
        assert again.status_code == 409 and again.json()["error"] == "still_malformed", again.text

    async with gateway.client() as http:  # the read role may not
        assert (await http.get("/v1/dead-letters")).status_code == 403
    async with gateway.client(PUBLISH_TOKEN) as http:
        assert (await http.post(f"/v1/dead-letters/{huge['id']}/redrive")).status_code == 403

    monkeypatch.undo()  # the store takes "flaky" now
    admin = ["--url", gateway.url, "--token", ADMIN_TOKEN]
    code = await asyncio.to_thread(cli, ["dead-letters", "redrive", "--all", *admin])
    assert code == EXIT_FAILED  # huge-seq is refused again
    assert await last_seq(store, DAG, "flaky-run") == 1
    code = await asyncio.to_thread(cli, ["dead-letters", "list", *admin])
    assert code == EXIT_SUCCESS
    async with gateway.client(ADMIN_TOKEN) as http:
        left = (await http.get("/v1/dead-letters")).json()["dead_letters"]
    assert [(d["stream_id"], d["attempts"]) for d in left] == [(huge["stream_id"], 3)]


def test_cli_dead_letters_needs_an_id_or_all():
    with pytest.raises(SystemExit):
        cli(["dead-letters", "redrive"])
