"""A real Airflow 3.3.2 backfill through the gateway: `airflow backfill create` over five days of
rb_backfill, two of which already have a run (one finished: "already exists"; one still running:
"in flight"), so Airflow skips those slots. The gateway is given both Airflow's REST API and its
metadata database: it probes the API for GET /api/v2/backfills/{id}/dag_runs (Airflow 3.4+), finds
it missing on this Airflow, and so reads the slots from the database (read only), joins them with the
runs its recorder stored from the hook's events, and streams the backfill's progress until every
slot has ended."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runbell.service.airflow.api import AirflowClient, AirflowSettings
from runbell.service.bench import free_port, start_gateway
from runbell.service.client.client import SseParser

pytestmark = pytest.mark.airflow

DAG_ID = "rb_backfill"
DAYS = [f"2025-01-0{d}" for d in range(1, 6)]
RUN_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def gateway(airflow: Any) -> Iterator[str]:
    """`runbell serve` on the hook's Redis namespace, with Airflow's REST API and its metadata database."""
    port = free_port()
    env = {"RUNBELL_AIRFLOW_DATABASE_URL": airflow.database_url, **airflow.gateway_env()}
    process = start_gateway(airflow.redis_url, airflow.namespace, port, Path(tempfile.mkdtemp()), extra_env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def airflow_cli(airflow: Any, *args: str) -> subprocess.CompletedProcess:
    """The `airflow` command of the harness's virtualenv, on the harness's AIRFLOW_HOME and the
    running standalone's metadata database."""
    venv = airflow.venv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "RUNBELL", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        AIRFLOW_HOME=str(airflow.home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(airflow.home / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(airflow.home / "plugins"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=airflow.database_url,
    )
    return subprocess.run([str(venv / "bin" / "airflow"), *args], env=env, capture_output=True, text=True, timeout=180)


def lists_backfill_slots(airflow: Any) -> bool:
    """The gateway's probe of this Airflow for GET /api/v2/backfills/{id}/dag_runs."""

    async def probe() -> bool:
        login = airflow.gateway_env()
        settings = AirflowSettings(airflow.base_url, username=login["RUNBELL_AIRFLOW_USERNAME"], password=login["RUNBELL_AIRFLOW_PASSWORD"])
        async with AirflowClient(settings) as client:
            return await client.has_backfill_dag_runs()

    return asyncio.run(probe())


def backfill_reads(gateway: str) -> dict[str, float]:
    """runbell_backfill_reads_total by `via`, from the gateway's /metrics."""
    found = {}
    for line in httpx.get(f"{gateway}/metrics", timeout=10).text.splitlines():
        if line.startswith("runbell_backfill_reads_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('via="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def run_state(airflow: Any, run_id: str) -> str:
    return airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]


def until(predicate, timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not within {timeout} s")


def existing_run(airflow: Any, day: str, sleep: float) -> str:
    run_id = f"e2e_existing_{day}"
    body = {"dag_run_id": run_id, "logical_date": f"{day}T00:00:00+00:00", "conf": {"sleep": sleep}}
    airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body)
    return run_id


def read_stream(gateway: str, backfill_id: int) -> list[tuple[str, str, dict]]:
    """(event, id, data) of the backfill's stream until it ends (bounded)."""
    seen: list[tuple[str, str, dict]] = []
    parser = SseParser()
    deadline = time.monotonic() + RUN_TIMEOUT
    with httpx.Client(base_url=gateway, timeout=httpx.Timeout(10, read=30)) as client:
        with client.stream("GET", f"/v1/backfills/{backfill_id}/events") as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None and event.event:
                    seen.append((event.event, event.id, json.loads(event.data)))
                    if event.event == "end":
                        return seen
                assert time.monotonic() < deadline, f"the backfill's stream did not end: {seen}"
    raise AssertionError(f"the stream closed before its end: {seen}")


def test_a_real_backfill_with_skipped_slots_listed_and_streamed_to_its_end(airflow: Any, gateway: str) -> None:
    airflow.unpause(DAG_ID)
    done_before = existing_run(airflow, DAYS[1], sleep=0)
    until(lambda: run_state(airflow, done_before) == "success", RUN_TIMEOUT, f"{done_before} success")
    in_flight = existing_run(airflow, DAYS[3], sleep=30)  # still running when the backfill is made

    created = None
    for _ in range(3):  # Airflow on SQLite may find its database locked by the scheduler
        created = airflow_cli(
            airflow,
            "backfill",
            "create",
            "--dag-id",
            DAG_ID,
            "--from-date",
            DAYS[0],
            "--to-date",
            DAYS[-1],
            "--max-active-runs",
            "1",
            "--dag-run-conf",
            '{"sleep": 2}',
        )
        backfills = airflow.request("GET", f"/api/v2/backfills?dag_id={DAG_ID}")["backfills"]
        if created.returncode == 0 or backfills:
            break
        time.sleep(2)  # it failed before committing anything: a retry is safe
    assert created is not None and backfills, created.stderr[-3000:]
    assert len(backfills) == 1, backfills
    backfill_id = backfills[0]["id"]
    print(f"\n[backfill] {backfill_id} created by the CLI; in flight: {run_state(airflow, in_flight)}")

    with httpx.Client(base_url=gateway, timeout=30) as client:
        listed = client.get(f"/v1/backfills/{backfill_id}/runs")
        assert listed.status_code == 200, listed.text
        body = listed.json()
        # Airflow commits the backfill, then its runs: a CLI that failed in between (a lock held past
        # the busy timeout) left a backfill without all its runs, which no retry can complete.
        failed = "" if created.returncode == 0 else f"; the CLI failed: {created.stderr[-3000:]}"
        assert (body["backfill_id"], body["dag_id"], body["total_entries"]) == (str(backfill_id), DAG_ID, 5), failed
        slots = body["slots"]
        assert [s["sort_ordinal"] for s in slots] == [1, 2, 3, 4, 5]
        assert [s["logical_date"][:10] for s in slots] == DAYS
        assert [s["exception_reason"] for s in slots] == [None, "already exists", None, "in flight", None]
        assert [s["run_id"] is None for s in slots] == [False, True, False, True, False]
        assert all(s["state"] in ("queued", "running", "success") for s in slots if s["run_id"])
        backfill_runs = {s["run_id"] for s in slots if s["run_id"]}
        assert all(r.startswith("backfill__") for r in backfill_runs), backfill_runs
        # This Airflow (3.1 to 3.3) has no route listing a backfill's slots: the probe says so, and
        # the gateway read them from the database.
        assert not lists_backfill_slots(airflow)
        assert backfill_reads(gateway) == {"airflow_database": 2.0}

        stream = read_stream(gateway, backfill_id)
        names = [name for name, _, _ in stream]
        assert names[0] == "progress" and names[-1] == "end" and stream[-1][1] == "end"
        final = {"done": 3, "failed": 0, "running": 0, "skipped": 2, "total": 5}
        assert stream[-1][2] == final and (stream[-2][0], stream[-2][2]) == ("progress", final)
        changed = [(data["sort_ordinal"], data["state"]) for name, _, data in stream if name == "slot"]
        assert {o for o, state in changed if state == "success"} <= {1, 3, 5}
        assert changed, "one run at a time, two seconds each: the stream saw slots change"
        done = [data["done"] for name, _, data in stream if name == "progress"]
        assert done == sorted(done) and done[-1] == 3
        print(f"[backfill] stream: {len(stream)} events; slot changes {changed}")

        after = client.get(f"/v1/backfills/{backfill_id}/runs", params={"limit": 2, "offset": 2}).json()
        assert [(s["sort_ordinal"], s["state"]) for s in after["slots"]] == [(3, "success"), (4, None)]

        # The hook's events, stored by the recorder, make the runs listable by backfill.
        def listed_done() -> list[dict] | None:
            params = {"backfill_id": str(backfill_id), "run_type": "backfill", "status": "success"}
            rows = client.get("/v1/runs", params=params).json()["runs"]
            return rows if len(rows) == 3 else None

        by_backfill = until(listed_done, 30, "the backfill's three runs in the listing, succeeded")
        assert {r["run_id"] for r in by_backfill} == backfill_runs
        assert [r["logical_date"][:10] for r in by_backfill] == [DAYS[4], DAYS[2], DAYS[0]]  # newest first
        assert all(r["outcome"] == "success" and not r["stale"] for r in by_backfill)
        assert all(r["result_task"]["task_id"] == "day" for r in by_backfill)
        # Reconnecting after the end (EventSource sends Last-Event-ID: end) is told to stop.
        assert client.get(f"/v1/backfills/{backfill_id}/events", headers={"Last-Event-ID": "end"}).status_code == 204
