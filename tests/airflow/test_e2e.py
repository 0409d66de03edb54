"""End to end against a real Airflow: what the hook publishes, what the gateway answers, and how
much earlier than Airflow's own /wait.

All six DAGs run at once (module fixture). Each run is watched from before its trigger by a
long-poll waiter and an SSE client of a real `runbell serve`, by a Redis poller, and by a reader of
Airflow's /wait stream (interval=1); the tests then only inspect what was recorded. Lead times are
printed (pytest -s): the only timing asserted is what the issue requires.

Runs on every Airflow of the matrix (tests/airflow/conftest.py): these are the core outcome tests.
Each version's answer latency after the deciding task's end (the result task's success, a critical
failure) is printed as `[latency airflow-V]` lines, measured as the bench does (from the earlier of
Airflow's end_date for the task and the hook event's ts), never asserted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runbell.bus.schema import EventKind, RunState, TaskState, parse_position
from runbell.listeners.propagation import doomed_task_ids
from runbell.service.client.client import RunbellClient, RunPending
from runbell.service.core import clock

pytestmark = pytest.mark.airflow

RUN_TIMEOUT = 90.0  # the slowest DAG (8 s teardown) ends in ~20 s

# dag_id -> the result task ids to ask /wait for
DAGS: dict[str, list[str] | None] = {
    "rb_result_then_slow": ["answer"],
    "rb_critical_teardown": ["answer"],
    "rb_retry_once": ["flaky"],
    "rb_sigkill": ["answer"],
    "rb_all_done_leaf": ["answer"],
    "rb_skip": ["answer"],
}
# Run alone after the others: its ~40 task processes would take the worker slots and skew the timings.
TRIGGER_RULES_DAG = "rb_trigger_rules"
TRIGGER_RULES_SPEC = Path(__file__).parent / "dags" / "rb_trigger_rules.json"


@dataclass
class Arrival:
    at: float  # time.time() when the caller had it
    status: int
    body: dict[str, Any]


@dataclass
class Run:
    dag_id: str
    run_id: str
    log: Any  # conftest.LogWatcher
    wait: Future  # -> list[conftest.WaitLine]: Airflow's /wait stream
    long_poll: Future  # -> Arrival: the gateway's result endpoint
    sse: Future  # -> (Arrival of the outcome event, [(event, id)] of the whole stream)

    def gateway_outcome(self) -> Arrival:
        return self.long_poll.result(timeout=RUN_TIMEOUT)

    def sse_outcome(self) -> tuple[Arrival, list[tuple[str, str]]]:
        return self.sse.result(timeout=RUN_TIMEOUT)

    def wait_lines(self) -> list[Any]:
        return self.wait.result(timeout=RUN_TIMEOUT)

    def run_event(self, state: RunState) -> float:
        at, _ = self.log.first(timeout=RUN_TIMEOUT, kind=EventKind.RUN, state=state.value)
        return at

    def task_states(self, task_id: str) -> list[str]:
        return [env.event.state for _, env in self.log.seen if env.event.task_id == task_id]


@pytest.fixture(scope="module")
def runs(airflow: Any, gateway: str) -> Iterator[dict[str, Run]]:
    for dag_id in [*DAGS, TRIGGER_RULES_DAG]:
        airflow.unpause(dag_id)
    pool = ThreadPoolExecutor(4 * len(DAGS))
    started: dict[str, Run] = {}
    try:
        for dag_id, result in DAGS.items():
            started[dag_id] = _start(airflow, gateway, pool, dag_id, result)
        yield started
    finally:
        for run in started.values():
            run.log.stop()
        pool.shutdown(wait=False, cancel_futures=True)


def _start(airflow: Any, gateway: str, pool: ThreadPoolExecutor, dag_id: str, result: list[str] | None) -> Run:
    # Callers may wait before the run exists: attach the gateway's callers first, then trigger.
    run_id = f"e2e__{uuid.uuid4().hex[:12]}"
    long_poll = pool.submit(_long_poll, gateway, dag_id, run_id)
    sse = pool.submit(_follow, gateway, dag_id, run_id)
    time.sleep(0.2)
    airflow.trigger(dag_id, run_id=run_id)
    wait = pool.submit(airflow.wait_endpoint, dag_id, run_id, 1, result, RUN_TIMEOUT)
    return Run(dag_id, run_id, airflow.watch(dag_id, run_id), wait, long_poll, sse)


def _long_poll(gateway: str, dag_id: str, run_id: str) -> Arrival:
    with RunbellClient(gateway) as client:
        try:
            outcome = client.wait(dag_id, run_id, timeout=RUN_TIMEOUT)
        except RunPending as pending:
            return Arrival(time.time(), 202, pending.body)
    return Arrival(time.time(), 200, outcome.body)


def _follow(gateway: str, dag_id: str, run_id: str) -> tuple[Arrival, list[tuple[str, str]]]:
    outcome: Arrival | None = None
    stream: list[tuple[str, str]] = []
    with RunbellClient(gateway) as client:
        for event in client.events(dag_id, run_id):
            stream.append((event.event, event.id or ""))
            if event.event == "outcome":
                outcome = Arrival(time.time(), 200, event.json())
    assert outcome is not None, stream
    return outcome, stream


def _check_gateway(run: Run, final_wait_at: float, status: str, decided_by: str, name: str) -> dict[str, Any]:
    """Long-poll and SSE agree on the outcome; the stream is gap-free and ends; lead times printed."""
    polled = run.gateway_outcome()
    streamed, stream = run.sse_outcome()
    assert polled.status == 200, polled.body
    assert (polled.body["status"], polled.body["decided_by"]) == (status, decided_by)
    assert streamed.body == polled.body
    positions = [parse_position(i) for kind, i in stream if kind in ("task", "run")]
    assert all(p is not None for p in positions), stream
    assert len({p.epoch for p in positions if p}) == 1, stream  # SSE ids are EPOCH-SEQ: one epoch (Redis kept its state)
    assert [p.seq for p in positions if p] == list(range(1, len(positions) + 1)), stream  # every event once, in order
    assert stream[-1][0] == "end"
    _report(f"{name} via long-poll", final_wait_at - polled.at)
    _report(f"{name} via SSE", final_wait_at - streamed.at)
    return polled.body


def _report(name: str, seconds: float) -> None:
    print(f"\n[lead] {name}: {seconds:.2f} s before Airflow's /wait (interval=1)")


def _report_latency(airflow: Any, run: Run, task_id: str, hook_ts: float, name: str) -> None:
    """Seconds from the deciding task's end until each Runbell caller had the answer (printed only)."""
    end_date = clock.parse(airflow.task_instance(run.dag_id, run.run_id, task_id)["end_date"]).timestamp()
    reference = min(end_date, hook_ts)
    polled, streamed = run.gateway_outcome().at - reference, run.sse_outcome()[0].at - reference
    print(f"\n[latency airflow-{airflow.version}] {name}: long-poll {polled:.3f} s, SSE {streamed:.3f} s after {task_id} ended")


def test_result_is_published_well_before_wait_reports_it(runs: dict[str, Run], airflow: Any) -> None:
    run = runs["rb_result_then_slow"]
    landed, env = run.log.first(timeout=RUN_TIMEOUT, task_id="answer", state=TaskState.SUCCESS.value)
    event = env.event
    assert event.result_task and event.critical
    assert event.result is not None and not event.result.is_ref
    assert event.result.value == {"answer": 42, "items": [1, 2, 3]}
    assert event.try_number == 1 and event.map_index == -1 and event.host

    final = run.wait_lines()[-1]
    assert final.data == {"state": "success", "results": {"answer": {"answer": 42, "items": [1, 2, 3]}}}
    _report("result (a) published", final.at - landed)
    assert final.at - landed >= 2.0
    run.run_event(RunState.SUCCESS)
    outcome = _check_gateway(run, final.at, "success", "result_task", "result (a)")
    assert outcome["result"] == {"answer": 42, "items": [1, 2, 3]}
    assert final.at - run.gateway_outcome().at >= 2.0
    assert final.at - run.sse_outcome()[0].at >= 2.0
    _report_latency(airflow, run, "answer", event.ts, "result")


def test_critical_failure_is_published_well_before_wait_says_failed(runs: dict[str, Run], airflow: Any) -> None:
    run = runs["rb_critical_teardown"]
    landed, env = run.log.first(timeout=RUN_TIMEOUT, task_id="transform", state=TaskState.FAILED.value)
    event = env.event
    assert event.critical and not event.result_task
    assert event.error is not None and event.error.type == "ValueError"
    assert "bad row 17" in event.error.message

    final = run.wait_lines()[-1]
    assert final.says_failed, final.data
    _report("critical failure (b) published", final.at - landed)
    assert final.at - landed >= 5.0
    run.run_event(RunState.FAILED)
    outcome = _check_gateway(run, final.at, "failed", "critical_task", "critical failure (b)")
    assert outcome["failure"]["task_id"] == "transform"
    assert outcome["failure"]["error"]["type"] == "ValueError"
    assert final.at - run.gateway_outcome().at >= 5.0
    assert final.at - run.sse_outcome()[0].at >= 5.0
    _report_latency(airflow, run, "transform", event.ts, "critical failure")
    # Running events carry the flag too: the gateway knows before any failure is reported.
    assert run.log.first(task_id="transform", state=TaskState.RUNNING.value)[1].event.critical
    assert not run.log.first(task_id="cleanup", state=TaskState.SUCCESS.value)[1].event.critical


def test_retried_failure_is_up_for_retry_not_failed(runs: dict[str, Run]) -> None:
    run = runs["rb_retry_once"]
    _, retry = run.log.first(timeout=RUN_TIMEOUT, task_id="flaky", state=TaskState.UP_FOR_RETRY.value)
    assert retry.event.try_number == 1
    assert retry.event.error is not None and retry.event.error.type == "RuntimeError"
    _, success = run.log.first(timeout=RUN_TIMEOUT, task_id="flaky", state=TaskState.SUCCESS.value)
    assert success.event.try_number == 2
    assert success.event.result is not None and success.event.result.value == "second try worked"
    run.run_event(RunState.SUCCESS)
    assert TaskState.FAILED.value not in run.task_states("flaky")
    assert run.task_states("flaky") == ["running", "up_for_retry", "running", "success"]
    outcome = _check_gateway(run, run.wait_lines()[-1].at, "success", "result_task", "retried result (c)")
    assert outcome["result"] == "second try worked" and outcome["result_task"]["try_number"] == 2


def test_sigkilled_task_fires_no_task_hook_but_the_run_fails(runs: dict[str, Run]) -> None:
    run = runs["rb_sigkill"]
    run.run_event(RunState.FAILED)
    assert run.wait_lines()[-1].says_failed, run.wait_lines()[-1].data
    # The killed try got as far as running; nothing terminal came from it, and answer never ran.
    assert run.task_states("hog") == [TaskState.RUNNING.value]
    assert run.task_states("answer") == []
    # The run event is the backstop: the gateway still answers failed.
    outcome = _check_gateway(run, run.wait_lines()[-1].at, "failed", "run", "SIGKILL (d)")
    assert outcome["run_state"] == "failed" and outcome["failure"]["error"]["type"] == "run_failed"


def test_marked_critical_failure_is_published_although_the_run_succeeds(runs: dict[str, Run]) -> None:
    run = runs["rb_all_done_leaf"]
    landed, env = run.log.first(timeout=RUN_TIMEOUT, task_id="load_table", state=TaskState.FAILED.value)
    assert env.event.critical and not env.event.result_task
    assert env.event.error is not None and env.event.error.type == "OSError"

    final = run.wait_lines()[-1]
    assert final.data == {"state": "success", "results": {"answer": "fine"}}
    run.run_event(RunState.SUCCESS)
    _report("marked critical failure in a successful run (e) published", final.at - landed)
    outcome = _check_gateway(run, final.at, "failed", "critical_task", "critical failure, run success (e)")
    assert outcome["failure"]["task_id"] == "load_table"
    # The leaf after it is not critical: no result task lies below it and it is not marked.
    assert not run.log.first(task_id="report", state=TaskState.SUCCESS.value)[1].event.critical


def test_a_task_that_skips_itself_publishes_skipped_and_the_result_follows(runs: dict[str, Run]) -> None:
    run = runs["rb_skip"]
    _, skipped = run.log.first(timeout=RUN_TIMEOUT, task_id="nothing_to_do", state=TaskState.SKIPPED.value)
    assert not skipped.event.result_task and skipped.event.error is None
    run.run_event(RunState.SUCCESS)
    outcome = _check_gateway(run, run.wait_lines()[-1].at, "success", "result_task", "after a skip (f)")
    assert outcome["result"] == "done"


@dataclass
class SpecTask:
    """A task of rb_trigger_rules.json, in the shape runbell.listeners.propagation reads."""

    task_id: str
    trigger_rule: str
    upstream_task_ids: set[str]
    downstream_task_ids: set[str] = field(default_factory=set)
    is_setup: bool = False
    is_teardown: bool = False


def test_trigger_rule_table_predicts_what_airflow_marks_upstream_failed(runs: dict[str, Run], airflow: Any, gateway: str) -> None:
    for other in runs.values():
        other.wait_lines()
    with ThreadPoolExecutor(3) as pool:
        run = _start(airflow, gateway, pool, TRIGGER_RULES_DAG, None)
        try:
            assert run.wait_lines()[-1].data["state"] == "failed"
        finally:
            run.log.stop()
    spec = json.loads(TRIGGER_RULES_SPEC.read_text())
    tasks = {
        tid: SpecTask(tid, s["rule"], set(s["up"]), is_setup=s.get("setup", False), is_teardown=s.get("teardown", False))
        for tid, s in spec.items()
    }
    for task in tasks.values():
        for upstream in task.upstream_task_ids:
            tasks[upstream].downstream_task_ids.add(task.task_id)
    failing = {tid for tid, s in spec.items() if s.get("fails")}
    predicted = set().union(*(doomed_task_ids(tasks, tid) for tid in failing)) - failing

    states = airflow.task_states(run.dag_id, run.run_id)
    assert {tid for tid in failing if states[tid] != "failed"} == set()
    assert {tid for tid, state in states.items() if state == "upstream_failed"} == predicted
