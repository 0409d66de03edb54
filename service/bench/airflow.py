"""`runbell bench --airflow`: Runbell against Airflow's own /wait, on a real Airflow 3.3.2.

Both sides in the same run on the same machine: one `airflow standalone` (runbell.service.bench.standalone)
with the hook installed, publishing to the given Redis under a fresh namespace, and one gateway in
its own process on that namespace. Each run of a case is watched by a Runbell long-poll waiter and an
SSE client (both attached before the trigger, as a caller may) and by a reader of Airflow's
`/api/v2/dags/{dag}/dagRuns/{run}/wait?interval=1` (attached right after the trigger: /wait answers
404 for a run that does not exist yet). The runs go one at a time, so that they do not share the CPUs.

Cases (the DAGs ship in service/bench/dags; the end-to-end tests run the same files):
- result: rb_result_then_slow, the result task `answer` followed by a 4 s task;
- critical_failure: rb_critical_teardown, `transform` fails on the way to the result, then an 8 s teardown.

The reference moment, the same for all three callers of a run, is the deciding task's end: the earlier
of two records of it, both on this machine's clock (as are the callers' arrival times, time.time()):
- Airflow's `end_date` of the task instance, from its REST API. For a success the task process stamps
  it the moment the task returns and Airflow stores it as is, before the hook runs: it is the earlier.
- The hook event's `ts` (in the run's replay log in Redis), stamped when on_task_instance_failed /
  _success fires, right after the task returned or raised. For a failure Airflow throws the task
  process's stamp away and stores the time its supervisor reported the failure, after the task
  process exited (seen here: 10 ms, or 5 s, after the hook fired): the hook's `ts` is the earlier.
  The 5 s is Airflow's supervisor noticing the exit only at its next 5 s poll; it delays Airflow's
  FAILED state, the teardown and so /wait. Seen without the hook too (1 run in 10 of a copy of the
  DAG the hook skips), more often with it (4 in 10 in the same standalone): `airflow_end_date` shows
  which runs had it.
The report keeps both, per run, as `airflow_end_date` and `hook_ts` (seconds after the reference).
So each figure is the whole way from the task's end until the caller knows: for Runbell the hook's
publish, Redis and the gateway; for /wait the rest of the run plus its polling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from runbell.bus.keys import run_keys
from runbell.bus.schema import decode_envelope
from runbell.service.bench.measure import (
    await_outcome_long_poll,
    await_outcome_sse,
    free_port,
    percentiles,
    start_gateway,
)
from runbell.service.bench.report import ratio
from runbell.service.bench.standalone import Airflow, standalone
from runbell.service.core import clock

BENCH_DAGS = Path(__file__).resolve().parent / "dags"
WAIT_INTERVAL = 1  # seconds: /wait's `interval`, as the baseline asks
RUN_TIMEOUT = 120.0  # a run takes ~10-20 s; the rest is slack for a busy machine
LONG_POLL_TIMEOUT = 60  # the gateway's maximum; a run is decided well within it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    dag_id: str
    reference_task: str  # the deciding task: its end_date is the reference moment
    reference_state: str
    status: str  # what Runbell must answer
    decided_by: str
    wait_state: str  # what /wait must end with


CASES = {
    "result": Case("rb_result_then_slow", "answer", "success", "success", "result_task", "success"),
    "critical_failure": Case("rb_critical_teardown", "transform", "failed", "failed", "critical_task", "failed"),
}
SAMPLE_KEYS = ("runbell", "runbell_sse", "airflow_wait", "airflow_end_date", "hook_ts")
WAIT_RESULT = ["answer"]  # /wait is asked for the result task's value, as a caller wanting it would


def bench_airflow(redis_url: str, quick: bool) -> dict[str, Any]:
    """Seconds from the deciding task's end until each caller knows, per case; see the module doc."""
    runs = 3 if quick else 10
    with redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5) as client:
        client.ping()  # the hook spools silently without Redis: say so now, not after a minute's wait
    namespace = f"bench-airflow-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="runbell-bench-airflow-"))
    samples: dict[str, dict[str, list[float]]] = {name: {key: [] for key in SAMPLE_KEYS} for name in CASES}
    try:
        with standalone(workdir, [BENCH_DAGS], redis_url, namespace) as started:
            airflow = started.airflow
            log.info("airflow standalone ready in %.1f s", started.ready_seconds)
            version = airflow.request("GET", "/api/v2/version")["version"]
            for case in CASES.values():
                airflow.unpause(case.dag_id)
            port = free_port()
            gateway = start_gateway(redis_url, namespace, port, workdir)
            bus = redis.Redis.from_url(redis_url, socket_timeout=5)
            try:
                for i in range(runs):
                    for name, case in CASES.items():  # interleaved, so that drift hits both cases alike
                        sample = asyncio.run(_one_run(airflow, port, case, bus))
                        log.info("%s run %d/%d: %s", name, i + 1, runs, sample)
                        for caller, seconds in sample.items():
                            samples[name][caller].append(round(seconds, 4))
            finally:
                bus.close()
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(20)
    finally:
        with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
            for key in client.scan_iter(match=f"{namespace}:*", count=1000):
                client.delete(key)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "cases": {name: _summary(CASES[name], by_caller) for name, by_caller in samples.items()},
        "samples": samples,
        "airflow_version": version,
        "wait_interval_seconds": WAIT_INTERVAL,
        "runs_per_case": runs,
        "reference": "the deciding task's end: the earlier of Airflow's end_date for it and the hook event's ts",
    }


def _summary(case: Case, by_caller: dict[str, list[float]]) -> dict[str, Any]:
    runbell, sse, wait = percentiles(by_caller["runbell"]), percentiles(by_caller["runbell_sse"]), percentiles(by_caller["airflow_wait"])
    return {
        "dag_id": case.dag_id,
        "reference_task": case.reference_task,
        "runbell_long_poll": runbell,
        "runbell_sse": sse,
        "airflow_wait": wait,
        "ratio_p50": ratio(wait.get("p50_ms"), runbell.get("p50_ms")),  # None where a side has no samples
        "ratio_p50_sse": ratio(wait.get("p50_ms"), sse.get("p50_ms")),
        # per run: how much earlier the Runbell caller knew than the /wait caller
        "lead_seconds_p50": _median_lead(by_caller["airflow_wait"], by_caller["runbell"]),
        "lead_seconds_p50_sse": _median_lead(by_caller["airflow_wait"], by_caller["runbell_sse"]),
    }


def _median_lead(later: list[float], earlier: list[float]) -> float:
    return round(statistics.median(w - r for w, r in zip(later, earlier)), 3)


async def _one_run(airflow: Airflow, port: int, case: Case, bus: redis.Redis) -> dict[str, float]:
    """One triggered run, its three callers; seconds from the reference moment to each one knowing."""
    run_id = f"bench__{uuid.uuid4().hex[:12]}"
    long_poll = asyncio.create_task(_arrival(await_outcome_long_poll("127.0.0.1", port, run_id, case.dag_id, LONG_POLL_TIMEOUT)))
    sse = asyncio.create_task(_arrival(await_outcome_sse("127.0.0.1", port, run_id, case.dag_id)))
    try:
        await asyncio.sleep(0.2)  # both are waiting on the gateway before the run exists
        await asyncio.to_thread(airflow.trigger, case.dag_id, None, run_id)
        lines = await asyncio.to_thread(airflow.wait_endpoint, case.dag_id, run_id, WAIT_INTERVAL, WAIT_RESULT, RUN_TIMEOUT)
        (polled_at, polled), (streamed_at, streamed) = await asyncio.wait_for(asyncio.gather(long_poll, sse), RUN_TIMEOUT)
    finally:
        for task in (long_poll, sse):
            task.cancel()
    ti = await asyncio.to_thread(airflow.task_instance, case.dag_id, run_id, case.reference_task)
    _check(case, run_id, ti, json.loads(polled), json.loads(streamed), lines[-1].data)
    end_date, hook_ts = clock.parse(ti["end_date"]).timestamp(), _hook_ts(bus, airflow.namespace, case, run_id)
    reference = min(end_date, hook_ts)
    return {
        "runbell": polled_at - reference,
        "runbell_sse": streamed_at - reference,
        "airflow_wait": lines[-1].at - reference,
        "airflow_end_date": end_date - reference,
        "hook_ts": hook_ts - reference,
    }


def _hook_ts(bus: redis.Redis, namespace: str, case: Case, run_id: str) -> float:
    """The `ts` of the hook's event for the deciding task's end, from the run's replay log."""
    for _, fields in bus.xrange(run_keys(namespace, case.dag_id, run_id).log):  # type: ignore[union-attr]  # xrange returns a list of (id, fields)
        event = decode_envelope(fields[b"env"]).event  # type: ignore[index]
        if event.task_id == case.reference_task and event.state == case.reference_state:
            return event.ts
    raise RuntimeError(f"{case.dag_id}/{run_id}: no hook event {case.reference_task} {case.reference_state}")


async def _arrival(receive: Awaitable[bytes]) -> tuple[float, bytes]:
    body = await receive
    return time.time(), body


def _check(case: Case, run_id: str, ti: dict[str, Any], polled: Any, streamed: Any, waited: Any) -> None:
    """Every side must have told the right thing, else its time means nothing."""
    expected = {
        "reference task state": case.reference_state,
        "runbell": (case.status, case.decided_by),
        "runbell_sse": (case.status, case.decided_by),
        "airflow_wait": case.wait_state,
    }
    seen = {
        "reference task state": ti["state"],
        "runbell": (polled["status"], polled["decided_by"]),
        "runbell_sse": (streamed["status"], streamed["decided_by"]),
        "airflow_wait": waited.get("state"),
    }
    if seen != expected:
        raise RuntimeError(f"{case.dag_id}/{run_id}: expected {expected}, saw {seen} (/wait said {waited})")
