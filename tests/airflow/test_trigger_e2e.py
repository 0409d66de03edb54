"""Trigger-and-wait through the gateway against a real Airflow: results, early failures,
idempotent retries, a run only the reconciler can settle, and the documented errors.

Prints the trigger-to-outcome time of a trivial DAG through the gateway and through Airflow's own
trigger + /wait (interval=1), both on this Airflow in this run (pytest -s shows them).

Runs on every Airflow of the matrix, except that comparison with /wait (newest_airflow_only: it does
not depend on the version, and the trigger path is covered per version by the other tests)."""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import httpx
import pytest

from runbell.bus.schema import EventKind
from runbell.service.bench import free_port, start_gateway
from runbell.service.client.client import RunbellClient

pytestmark = pytest.mark.airflow

RUN_TIMEOUT = 90.0
DAGS = ["rb_trivial", "rb_critical_teardown", "rb_sigkill_silent", "rb_long"]


@pytest.fixture(scope="module")
def gateway(airflow: Any) -> Iterator[str]:
    """`runbell serve` connected to this Airflow, reconciling runs silent for 3 s."""
    port = free_port()
    env = {**airflow.gateway_env(), "RUNBELL_RECONCILE_AFTER": "3", "RUNBELL_CANCEL_GRACE": "1"}
    process = start_gateway(airflow.redis_url, airflow.namespace, port, Path(tempfile.mkdtemp()), extra_env=env)
    for dag_id in DAGS:
        airflow.unpause(dag_id)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(20)


def trigger_and_wait(gateway: str, dag_id: str, body: dict, headers: dict | None = None) -> tuple[int, dict, float]:
    """POST with wait, then long-poll on a 202: (status, outcome, seconds from POST to outcome)."""
    started = time.monotonic()
    response = httpx.post(f"{gateway}/v1/dags/{dag_id}/runs", params={"wait": 60}, json=body, headers=headers, timeout=70)
    if response.status_code == 202:
        with RunbellClient(gateway) as client:
            outcome = client.wait(dag_id, response.json()["run_id"], timeout=RUN_TIMEOUT)
        return 200, outcome.body, time.monotonic() - started
    return response.status_code, response.json(), time.monotonic() - started


def airflow_trigger_and_wait(airflow: Any, dag_id: str, result: list[str] | None) -> tuple[dict, float]:
    started = time.monotonic()
    run_id = airflow.trigger(dag_id)
    lines = airflow.wait_endpoint(dag_id, run_id, 1, result, RUN_TIMEOUT)
    return lines[-1].data, time.monotonic() - started


@pytest.mark.newest_airflow_only  # a comparison with Airflow's /wait; the trigger path itself is tested per version below
def test_trigger_and_wait_returns_the_result_sooner_than_trigger_plus_wait(airflow: Any, gateway: str) -> None:
    ours, theirs = [], []
    for _ in range(3):  # alternating, so both sides see the same warm Airflow
        status, outcome, seconds = trigger_and_wait(gateway, "rb_trivial", {})
        assert status == 200 and outcome["status"] == "success" and outcome["result"] == "pong", outcome
        assert outcome["decided_by"] == "result_task" and outcome["token"]
        ours.append(seconds)
        final, seconds = airflow_trigger_and_wait(airflow, "rb_trivial", ["answer"])
        assert final == {"state": "success", "results": {"answer": "pong"}}
        theirs.append(seconds)
    print(f"\n[trigger-to-outcome] rb_trivial through the gateway: {_fmt(ours)}; Airflow trigger + /wait (interval=1): {_fmt(theirs)}")


def test_a_failing_dag_answers_the_critical_failure_before_wait_says_failed(airflow: Any, gateway: str) -> None:
    run_id = f"e2e_fail_{uuid.uuid4().hex[:8]}"
    waited: dict[str, Any] = {}

    def airflow_wait() -> None:  # Airflow's /wait on the same run, from its start
        deadline = time.monotonic() + 30
        while "lines" not in waited and time.monotonic() < deadline:
            try:
                waited["lines"] = airflow.wait_endpoint("rb_critical_teardown", run_id, 1, None, RUN_TIMEOUT)
            except HTTPError:  # 404 until the gateway's trigger lands
                time.sleep(0.2)

    watcher = threading.Thread(target=airflow_wait)
    watcher.start()
    status, outcome, _ = trigger_and_wait(gateway, "rb_critical_teardown", {"run_id": run_id})
    known_at = time.time()
    watcher.join(RUN_TIMEOUT)
    assert status == 200 and outcome["run_id"] == run_id
    assert (outcome["status"], outcome["decided_by"], outcome["failure"]["task_id"]) == ("failed", "critical_task", "transform")
    final = waited["lines"][-1]
    assert final.says_failed, final.data
    print(f"\n[lead] trigger-and-wait knew the critical failure {final.at - known_at:.2f} s before /wait")
    assert final.at - known_at >= 5.0


def test_the_same_idempotency_key_gives_the_same_run(airflow: Any, gateway: str) -> None:
    headers = {"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"}
    first = httpx.post(f"{gateway}/v1/dags/rb_trivial/runs", json={"conf": {"k": 1}}, headers=headers, timeout=30)
    again = httpx.post(f"{gateway}/v1/dags/rb_trivial/runs", json={"conf": {"k": 1}}, headers=headers, timeout=30)
    assert first.status_code in (200, 202) and again.status_code in (200, 202)
    run_id = first.json()["run_id"]
    assert again.json()["run_id"] == run_id
    runs = airflow.request("GET", "/api/v2/dags/rb_trivial/dagRuns?limit=100")["dag_runs"]
    assert [r["dag_run_id"] for r in runs].count(run_id) == 1
    assert sum(1 for r in runs if r.get("conf") == {"k": 1}) == 1


def test_a_silent_sigkilled_run_is_settled_by_the_reconciler(airflow: Any, gateway: str) -> None:
    status, outcome, seconds = trigger_and_wait(gateway, "rb_sigkill_silent", {})
    assert status == 200, outcome
    assert (outcome["status"], outcome["decided_by"], outcome["run_state"]) == ("failed", "run", "failed")
    print(f"\n[reconciler] the silent SIGKILL run was settled {seconds:.1f} s after the trigger")


def test_unknown_and_paused_dags_give_the_documented_errors(airflow: Any, gateway: str) -> None:
    deadline = time.monotonic() + 60
    while True:  # rb_paused exists once the dag-processor has parsed it
        try:
            airflow.request("GET", "/api/v2/dags/rb_paused")
            break
        except HTTPError:
            assert time.monotonic() < deadline, "rb_paused was never parsed"
            time.sleep(0.5)
    unknown = httpx.post(f"{gateway}/v1/dags/rb_no_such_dag/runs", json={}, timeout=30)
    paused = httpx.post(f"{gateway}/v1/dags/rb_paused/runs", json={}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_dag"
    assert paused.status_code == 409 and paused.json()["error"] == "dag_paused"


def _fmt(samples: list[float]) -> str:
    return f"median {statistics.median(samples):.2f} s (" + ", ".join(f"{s:.2f}" for s in samples) + ")"


def test_a_caller_that_goes_away_has_its_run_failed_in_airflow(airflow: Any, gateway: str) -> None:
    """cancel_on_disconnect: the caller hangs up while the run's task runs; after the grace (1 s here)
    the gateway fails the run through Airflow's API, which stops the task, and the reason is the outcome."""
    run_id = f"e2e__{uuid.uuid4().hex[:12]}"
    body = json.dumps({"run_id": run_id, "cancel_on_disconnect": True}).encode()
    host, port = gateway.removeprefix("http://").split(":")
    caller = socket.create_connection((host, int(port)), timeout=10)
    caller.sendall(
        f"POST /v1/dags/rb_long/runs?wait=60 HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    while _task_state(airflow, run_id) != "running":  # the task runs: then the caller goes
        assert time.monotonic() < deadline, "the task never ran"
        time.sleep(0.5)
    caller.close()
    # Watched through Airflow, not the gateway: a caller waiting there would keep the run.
    while (run := airflow.request("GET", f"/api/v2/dags/rb_long/dagRuns/{run_id}"))["state"] != "failed":
        assert time.monotonic() < deadline, f"the run was not cancelled: {run}"
        time.sleep(0.5)
    assert "cancel_on_disconnect" in (run.get("note") or ""), run
    with RunbellClient(gateway) as client:
        outcome = client.wait("rb_long", run_id, timeout=RUN_TIMEOUT).body
    # Airflow fails the running task first (its own message decides: the result task failed), and the
    # run's failure on the bus says why: the gateway's, published once Airflow took the change.
    assert outcome["status"] == "failed", outcome
    said = [e.event.msg for e in airflow.log("rb_long", run_id) if e.event.kind is EventKind.RUN and e.event.source.value == "gateway"]
    assert any("cancel_on_disconnect" in (msg or "") for msg in said), said
    while _task_state(airflow, run_id) == "running":  # Airflow stops the task
        assert time.monotonic() < deadline, "the task still runs"
        time.sleep(0.5)
    print(f"\n[cancel on disconnect airflow-{airflow.version}] run failed, its task {_task_state(airflow, run_id)}")


def _task_state(airflow: Any, run_id: str) -> str | None:
    """rb_long's task's state; None while Airflow has not made the run yet (a 404)."""
    try:
        return airflow.task_states("rb_long", run_id).get("answer")
    except HTTPError as exc:
        if exc.code != 404:
            raise
        return None


def test_a_callers_trace_reaches_the_hooks_events(airflow: Any, gateway: str) -> None:
    """The caller's traceparent goes into the run's conf; every event the hook publishes carries a context
    of that trace (Airflow's process has OpenTelemetry; without a provider its spans keep the parent's)."""
    trace_id = uuid.uuid4().hex
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    status, outcome, _ = trigger_and_wait(gateway, "rb_trivial", {}, headers=headers)
    assert status == 200 and outcome["status"] == "success", outcome
    run_id = outcome["run_id"]
    run = airflow.request("GET", f"/api/v2/dags/rb_trivial/dagRuns/{run_id}")
    assert trace_id in run["conf"]["runbell_traceparent"]
    hooked = [e.event for e in airflow.log("rb_trivial", run_id) if e.event.source.value == "hook"]
    assert hooked and all(e.trace is not None and trace_id in e.trace.traceparent for e in hooked), [(e.state, e.trace) for e in hooked]
