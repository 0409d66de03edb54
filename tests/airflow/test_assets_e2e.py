"""Asset events end to end against each real Airflow of the matrix: a DAG whose task has an outlet Asset
runs once; the hook (in the api-server, where Airflow registers the outlet's change) publishes one
asset event, which a long-poll on /v1/assets/{name}/next and an SSE client of /v1/assets/{name}/events
of a real `runbell serve`, both attached before the trigger, receive. On an Airflow without
on_asset_event_emitted (3.1) the hook's fallback, on_asset_changed, publishes it: the asset alone, with
no extra and no source run."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import decode_asset_envelope, parse_position
from runbell.service.client.client import SseParser

pytestmark = pytest.mark.airflow

DAG_ID = "rb_asset_producer"
ASSET = "runbell-e2e:orders/daily"  # as tests/airflow/dags/rb_asset_producer.py names it
URI = "file:///tmp/runbell-e2e/orders.parquet"
RUN_TIMEOUT = 90.0


def _next(gateway: str, **params: Any) -> httpx.Response:
    with httpx.Client(base_url=gateway, timeout=RUN_TIMEOUT + 10) as client:
        return client.get(f"/v1/assets/{quote(ASSET, safe='')}/next", params=params)


def _first_asset_event(gateway: str) -> list[tuple[str, str, dict]]:
    """(event, id, data) of the stream until its first `asset` event; the path is sent unencoded."""
    seen: list[tuple[str, str, dict]] = []
    parser = SseParser()
    with httpx.Client(base_url=gateway, timeout=httpx.Timeout(10, read=RUN_TIMEOUT)) as client:
        with client.stream("GET", f"/v1/assets/{ASSET}/events") as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    seen.append((event.event, event.id or "", json.loads(event.data or "null")))
                    if event.event == "asset":
                        return seen
    return seen


def _waiters(gateway: str) -> float:
    metrics = httpx.get(f"{gateway}/metrics", timeout=10).text
    line = next(entry for entry in metrics.splitlines() if entry.startswith("runbell_waiters "))
    return float(line.split()[1])


def _sse_clients(gateway: str) -> float:
    metrics = httpx.get(f"{gateway}/metrics", timeout=10).text
    line = next(entry for entry in metrics.splitlines() if entry.startswith("runbell_sse_clients "))
    return float(line.split()[1])


def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


def test_an_outlet_asset_event_reaches_long_poll_and_sse_attached_before_the_trigger(airflow: Any, gateway: str) -> None:
    airflow.unpause(DAG_ID)
    pool = ThreadPoolExecutor(2)
    try:
        long_poll = pool.submit(_next, gateway, timeout=60)  # no `after`: the next event from now
        sse = pool.submit(_first_asset_event, gateway)
        _until(lambda: _waiters(gateway) >= 1 and _sse_clients(gateway) >= 1)
        time.sleep(0.3)  # the SSE client has read the asset's current seq and subscribed
        run_id = f"e2e__{uuid.uuid4().hex[:12]}"
        triggered = time.time()
        airflow.trigger(DAG_ID, run_id=run_id)

        response = long_poll.result(timeout=RUN_TIMEOUT)
        arrived = time.time()
        stream = sse.result(timeout=RUN_TIMEOUT)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    print(f"\n[assets] asset event at the long-poll {arrived - triggered:.2f} s after the trigger")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seq"] == 1 and body["kind"] == "asset" and body["source"] == "hook"
    assert body["asset"] == {"name": ASSET, "uri": URI, "group": "runbell-e2e"}
    if airflow.has_listener_hook("on_asset_event_emitted"):
        assert body["extra"] == {"rows": 42, "run_id": run_id}
        assert (body["source_dag_id"], body["source_run_id"], body["source_task_id"]) == (DAG_ID, run_id, "write")
        assert body["source_map_index"] == -1
    else:  # the fallback knows only the asset
        assert "extra" not in body, body
        assert [body.get(k) for k in ("source_dag_id", "source_run_id", "source_task_id", "source_map_index")] == [None] * 4
    assert triggered <= body["ts"] <= arrived

    assert [name for name, _, _ in stream] == ["ready", "asset"]
    asset_position = parse_position(stream[1][1])  # SSE ids are EPOCH-SEQ
    assert asset_position is not None and asset_position.epoch and asset_position.seq == 1, stream
    assert stream[-1][2] == body  # the same event, as SSE data

    # One change, one event (on_asset_changed does not add a second), in the asset's replay log and
    # its global stream; nothing of it in the run events' global stream.
    ran = airflow.watch(DAG_ID, run_id)
    try:
        ran.first(timeout=RUN_TIMEOUT, kind="run", state="success")
    finally:
        ran.stop()
    client = redis.Redis.from_url(airflow.redis_url)
    try:
        entries = client.xrange(keys.asset_keys(airflow.namespace, ASSET).log)
        assert [decode_asset_envelope(f[b"env"]).seq for _, f in entries] == [1]
        assert client.xlen(keys.asset_keys(airflow.namespace, ASSET).stream) == 1
    finally:
        client.close()
    pending = _next(gateway, after=1, timeout=0.5)
    assert pending.status_code == 202 and pending.json() == {"status": "pending", "asset": ASSET, "seq": 1}
