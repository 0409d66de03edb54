"""runbell.listeners.hook with fake task instances and dag runs (no Airflow), publishing to the real Redis.

Two kinds of fake task instance, as the hook meets them: the worker's RuntimeTaskInstance (a plain
object whose task carries the parsed DAG) and the ORM TaskInstance of the scheduler / api-server
(a class with a ``__table__``, conf on ``dag_run``, a task from the serialized DAG or none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from runbell.bus.keys import run_keys
from runbell.bus.schema import Event, EventKind, RunState, TaskState, decode_envelope
from runbell.listeners import hook
from runbell.listeners import publisher as publisher_module
from runbell.listeners.config import PublisherConfig
from runbell.listeners.marks import (
    CRITICAL_ATTR,
    CRITICAL_TASKS_CONF_KEY,
    RESULT_TASK_CONF_KEY,
)
from runbell.listeners.publisher import Publisher
from tests.test_propagation import FakeTask as GraphTask
from tests.test_propagation import dag as graph

DAG_ID = "etl"
RUN_ID = "manual__2026-01-01T00:00:00+00:00"
MAX_BYTES = 64


class State(str, Enum):  # what Airflow's TaskInstanceState / DagRunType look like
    RUNNING = "running"
    FAILED = "failed"
    UP_FOR_RETRY = "up_for_retry"
    MANUAL = "manual"


@dataclass(eq=False)
class FakeTask(GraphTask):
    """A task as the worker sees it: its graph node plus the DAG it belongs to."""

    dag: Any = None


def make_dag(*chains: str, result: str | None = None) -> dict[str, FakeTask]:
    """extract>transform>load style chains; the named task is the DAG's result task."""
    tasks = graph(*chains, task_class=FakeTask)
    dag = SimpleNamespace(task_dict=tasks)
    for task in tasks.values():
        task.dag = dag
    if result:
        tasks[result].returns_dag_result = True
    return tasks


class WorkerTI:
    """Like the worker's RuntimeTaskInstance: conf through the template context, XCom via the API."""

    def __init__(
        self,
        task: FakeTask | None,
        *,
        state: Any = State.RUNNING,
        map_index: int = -1,
        try_number: int = 1,
        conf: dict | None = None,
        xcom: Any = None,
        task_id: str | None = None,
    ):
        self.dag_id, self.run_id = DAG_ID, RUN_ID
        self.task = task
        self.task_id = task_id or task.task_id
        self.state, self.map_index, self.try_number = state, map_index, try_number
        self.conf = conf or {}
        self.xcom = xcom
        self.pulls: list[dict[str, Any]] = []

    def get_template_context(self) -> dict[str, Any]:
        return {"dag_run": SimpleNamespace(conf=self.conf)}

    def xcom_pull(self, **kwargs: Any) -> Any:
        self.pulls.append(kwargs)
        if isinstance(self.xcom, Exception):
            raise self.xcom
        return self.xcom


class OrmTI(WorkerTI):
    """Like the ORM TaskInstance: a SQLAlchemy model (it has a __table__); conf on its dag_run."""

    __table__ = object()

    @property
    def dag_run(self) -> Any:
        return SimpleNamespace(conf=self.conf)

    def get_template_context(self) -> dict[str, Any]:
        raise AssertionError("the ORM side must not build a template context (database queries)")


@pytest.fixture
def bus(redis_url: str, namespace: str, tmp_path, monkeypatch) -> Iterator[Publisher]:
    """The hook's default publisher, pointed at this test's namespace."""
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "spool", result_max_bytes=MAX_BYTES)
    publisher = Publisher(config)
    monkeypatch.setattr(publisher_module, "_default_publisher", publisher)
    monkeypatch.setattr(hook._log_once, "seen", set())
    yield publisher
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.delete(key)
    client.close()


def published(bus: Publisher) -> list[Event]:
    client = redis.Redis.from_url(bus.config.redis_url)
    try:
        entries = client.xrange(run_keys(bus.config.namespace, DAG_ID, RUN_ID).log)
    finally:
        client.close()
    return [decode_envelope(fields[b"env"]).event for _, fields in entries]


def only(bus: Publisher) -> Event:
    events = published(bus)
    assert len(events) == 1, events
    return events[0]


# -- run events -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fire, state",
    [
        (hook.on_dag_run_running, RunState.RUNNING),
        (hook.on_dag_run_success, RunState.SUCCESS),
        (hook.on_dag_run_failed, RunState.FAILED),
    ],
)
def test_run_events(bus: Publisher, fire, state: RunState) -> None:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, run_type=State.MANUAL, logical_date=None, run_after=when, backfill_id=7)
    fire(dag_run=dag_run, msg="task_failure")
    event = only(bus)
    assert (event.kind, event.state, event.source.value) == (EventKind.RUN, state.value, "hook")
    assert event.run_type == "manual" and event.logical_date is None
    assert event.run_after == "2026-01-01T00:00:00+00:00"
    assert event.backfill_id == "7" and event.msg == "task_failure" and event.host


def test_what_the_hook_builds_is_held_to_the_schema_s_bounds(bus: Publisher) -> None:
    """Airflow's values past the schema's bounds are truncated, never a dropped event (issue 11)."""
    dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, run_type=State.MANUAL, logical_date=None, run_after=None, backfill_id=None)
    hook.on_dag_run_failed(dag_run=dag_run, msg="m\x00" * 5000)
    long_named = type("E" * 400, (Exception,), {})
    tasks = make_dag("extract>answer", result="answer")
    ti = WorkerTI(tasks["extract"], state=State.FAILED)
    hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error=long_named("\x00" * 5000))
    run_event, task_event = published(bus)
    assert len(run_event.msg) == 2000 and run_event.msg.startswith("m\x00")
    assert task_event.error is not None and len(task_event.error.type) == 250 and len(task_event.error.message) == 2000


# -- task events in the worker --------------------------------------------------------------------


def test_running_event_says_whether_a_failure_would_be_critical(bus: Publisher) -> None:
    tasks = make_dag("extract>transform>answer", "extract>audit", result="answer")
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(tasks["transform"]))
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(tasks["audit"]))
    transform, audit = published(bus)
    assert (transform.task_id, transform.state, transform.critical) == ("transform", "running", True)
    assert (audit.task_id, audit.critical, audit.result_task) == ("audit", False, False)
    assert transform.try_number == 1 and transform.map_index == -1 and transform.error is None


def test_result_task_success_carries_the_value(bus: Publisher) -> None:
    tasks = make_dag("extract>answer", result="answer")
    ti = WorkerTI(tasks["answer"], xcom={"rows": 3})
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=ti)
    event = only(bus)
    assert event.state == TaskState.SUCCESS.value and event.result_task and event.critical
    assert event.result is not None and event.result.value == {"rows": 3} and not event.result.is_ref
    assert ti.pulls == [{"task_ids": "answer", "key": "return_value"}]


def test_mapped_result_reads_its_own_map_index(bus: Publisher) -> None:
    tasks = make_dag("answer", result="answer")
    ti = WorkerTI(tasks["answer"], map_index=2, xcom="two")
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=ti)
    event = only(bus)
    assert ti.pulls == [{"task_ids": "answer", "key": "return_value", "map_indexes": 2}]
    assert event.map_index == 2 and event.result is not None and event.result.value == "two"


def test_big_result_is_published_as_a_reference(bus: Publisher) -> None:
    tasks = make_dag("answer", result="answer")
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=WorkerTI(tasks["answer"], xcom="x" * 500))
    result = only(bus).result
    assert result is not None and result.is_ref and result.value is None and result.size == 502
    assert (result.ref.dag_id, result.ref.run_id, result.ref.task_id) == (DAG_ID, RUN_ID, "answer")


def test_unreadable_result_still_publishes_the_success_with_a_reference(bus: Publisher) -> None:
    tasks = make_dag("answer", result="answer")
    ti = WorkerTI(tasks["answer"], xcom=ConnectionError("api down"))
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=ti)
    event = only(bus)
    assert event.state == "success" and event.result is not None and event.result.is_ref


def test_other_tasks_success_reads_no_xcom(bus: Publisher) -> None:
    tasks = make_dag("extract>answer", result="answer")
    ti = WorkerTI(tasks["extract"], xcom="ignored")
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=ti)
    assert only(bus).result is None and ti.pulls == []


def test_failure_that_will_be_retried_is_up_for_retry(bus: Publisher) -> None:
    tasks = make_dag("extract>answer", result="answer")
    ti = WorkerTI(tasks["extract"], state=State.UP_FOR_RETRY)
    hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error=ValueError("flaky"))
    event = only(bus)
    assert event.state == TaskState.UP_FOR_RETRY.value and not event.task_state.terminal
    assert event.error is not None and (event.error.type, event.error.message) == ("ValueError", "flaky")


def test_terminal_failure_is_failed_with_the_error(bus: Publisher) -> None:
    tasks = make_dag("extract>answer", result="answer")
    ti = WorkerTI(tasks["extract"], state=State.FAILED, try_number=3)
    hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error=KeyError("x" * 5000))
    event = only(bus)
    assert (event.state, event.critical, event.try_number) == ("failed", True, 3)
    assert event.error is not None and event.error.type == "KeyError"
    assert len(event.error.message) == 2000  # truncated


def test_failure_off_the_result_path_is_not_critical(bus: Publisher) -> None:
    tasks = make_dag("extract>answer", "load", result="answer")
    ti = WorkerTI(tasks["load"], state=State.FAILED)
    hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error=None)
    event = only(bus)
    assert event.state == "failed" and not event.critical
    assert event.error is not None and event.error.type == "unknown"


def test_marker_and_conf_make_a_task_critical(bus: Publisher) -> None:
    tasks = make_dag("a>answer", "b", "c", result="answer")
    setattr(tasks["b"], CRITICAL_ATTR, True)
    conf = {CRITICAL_TASKS_CONF_KEY: ["c"]}
    for tid in ("b", "c"):
        ti = WorkerTI(tasks[tid], state=State.FAILED, conf=conf)
        hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error="boom")
    b, c = published(bus)
    assert b.critical and c.critical
    assert c.error is not None and (c.error.type, c.error.message) == ("error", "boom")


def test_conf_names_the_result_task_of_a_dag_without_one(bus: Publisher) -> None:
    tasks = make_dag("a>b", "c")
    conf = {RESULT_TASK_CONF_KEY: "b"}
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(tasks["c"], conf=conf))
    hook.on_task_instance_success(previous_state=State.RUNNING, task_instance=WorkerTI(tasks["b"], conf=conf, xcom=[1, 2]))
    c, b = published(bus)
    assert not c.critical and not c.result_task
    assert b.result_task and b.result is not None and b.result.value == [1, 2]


def test_without_a_result_task_every_failure_is_critical(bus: Publisher) -> None:
    tasks = make_dag("a>b")
    tasks["b"].trigger_rule = "all_done"
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(tasks["a"]))
    assert only(bus).critical


def test_skipped_event(bus: Publisher) -> None:
    tasks = make_dag("a>answer", result="answer")
    hook.on_task_instance_skipped(previous_state=State.RUNNING, task_instance=WorkerTI(tasks["a"]))
    event = only(bus)
    assert event.state == TaskState.SKIPPED.value and event.error is None


# -- task events from the scheduler / api-server (ORM) --------------------------------------------


def test_orm_failure_without_conf_cannot_claim_critical(bus: Publisher) -> None:
    # The serialized DAG drops returns_dag_result and markers: "no result task" cannot be concluded.
    tasks = make_dag("a>answer")
    setattr(tasks["a"], CRITICAL_ATTR, True)
    ti = OrmTI(tasks["a"], state=State.FAILED)
    hook.on_task_instance_failed(previous_state=None, task_instance=ti, error="set to failed by hand")
    event = only(bus)
    assert event.state == "failed" and not event.critical and not event.result_task


def test_orm_failure_with_conf_uses_the_serialized_structure(bus: Publisher) -> None:
    tasks = make_dag("a>answer", "x")
    conf = {RESULT_TASK_CONF_KEY: "answer", CRITICAL_TASKS_CONF_KEY: ["x"]}
    for tid in ("a", "x"):
        ti = OrmTI(tasks[tid], state=State.UP_FOR_RETRY, conf=conf)
        hook.on_task_instance_failed(previous_state=State.RUNNING, task_instance=ti, error=None)
    a, x = published(bus)
    assert a.state == "up_for_retry" and a.critical and x.critical


def test_orm_instance_without_a_task_degrades(bus: Publisher) -> None:
    conf = {RESULT_TASK_CONF_KEY: "answer"}
    hook.on_task_instance_failed(previous_state=None, task_instance=OrmTI(None, task_id="answer", conf=conf), error=None)
    hook.on_task_instance_failed(previous_state=None, task_instance=OrmTI(None, task_id="other", conf=conf), error=None)
    answer, other = published(bus)
    assert answer.critical and answer.result_task and not other.critical


def test_orm_success_of_the_result_task_reads_no_value(bus: Publisher) -> None:
    conf = {RESULT_TASK_CONF_KEY: "answer"}
    ti = OrmTI(make_dag("answer")["answer"], conf=conf, xcom="not read")
    hook.on_task_instance_success(previous_state=None, task_instance=ti)
    event = only(bus)
    assert event.result_task and event.result is None and ti.pulls == []


def test_orm_instance_whose_dag_run_cannot_load_still_publishes(bus: Publisher) -> None:
    class Detached(OrmTI):
        @property
        def dag_run(self) -> Any:
            raise RuntimeError("DetachedInstanceError")

    hook.on_task_instance_running(previous_state=None, task_instance=Detached(make_dag("a")["a"]))
    assert only(bus).task_id == "a"


# -- never into Airflow -----------------------------------------------------------------------------


def test_errors_inside_the_hook_are_swallowed_and_logged_once(bus: Publisher, caplog) -> None:
    class Broken:
        task = None

        @property
        def task_id(self) -> str:
            raise RuntimeError("attribute exploded")

    caplog.set_level(logging.WARNING, logger="runbell.hook")
    for _ in range(3):
        assert hook.on_task_instance_running(previous_state=None, task_instance=Broken()) is None
    assert hook.on_dag_run_running(dag_run=object(), msg="x") is None
    assert published(bus) == []
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "on_task_instance_running" in m]) == 1
    assert len([m for m in messages if "on_dag_run_running" in m]) == 1


def test_disabled_hook_publishes_nothing(redis_url: str, namespace: str, tmp_path, monkeypatch) -> None:
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, enabled=False)
    publisher = Publisher(config)
    monkeypatch.setattr(publisher_module, "_default_publisher", publisher)
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(make_dag("a")["a"]))
    assert published(publisher) == []


def test_unreachable_redis_costs_well_under_a_second(tmp_path, monkeypatch) -> None:
    config = PublisherConfig(redis_url="redis://10.255.255.1:6379/0", spool_dir=tmp_path / "spool")
    monkeypatch.setattr(publisher_module, "_default_publisher", Publisher(config))
    started = time.monotonic()
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(make_dag("a")["a"]))
    hook.on_task_instance_success(previous_state=None, task_instance=WorkerTI(make_dag("a")["a"]))
    assert time.monotonic() - started < 1.0
    assert len(publisher_module.default_publisher().spool.pending()) == 2  # spooled, to be sent later


def test_spooled_events_go_out_by_themselves_once_redis_answers(bus: Publisher, monkeypatch) -> None:
    """A run's last events, spooled while Redis was away, must not wait for a next publish that may never come."""
    monkeypatch.setattr(publisher_module, "RETRY_SPOOL_SECONDS", 0.05)
    bus._broken_until = time.monotonic() + 0.2  # a publish has just failed: the next ones spool
    assert publisher_module.emit(DAG_ID, RUN_ID, "running", publisher=bus) is None
    assert publisher_module.emit(DAG_ID, RUN_ID, "success", publisher=bus) is None
    deadline = time.monotonic() + 10
    while bus.spool.pending():  # nothing else is published: the spool's own thread sends it
        assert time.monotonic() < deadline, "the spool was not flushed"
        time.sleep(0.02)
    assert [event.state for event in published(bus)] == ["running", "success"]


def test_a_forked_process_publishes_although_a_thread_of_its_parent_held_the_lock(bus: Publisher) -> None:
    """Airflow forks workers and tasks from processes that publish; the spool's thread may hold the
    publisher's lock at that moment, and a child must not wait on it for ever."""
    with bus._lock:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 when its publish went through
            os._exit(0 if publisher_module.emit(DAG_ID, RUN_ID, "running", publisher=bus) == 1 else 1)
    deadline = time.monotonic() + 20
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked process hung on its parent's lock")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status[1]) == 0
    assert [event.state for event in published(bus)] == ["running"]


# -- human in the loop: Runbell's notifier on a HITL operator --------------------------------------


class FakeHITL:
    """Like HITLOperator: the request's fields, and execute calling each notifier once the request is stored."""

    def __init__(self, task_id: str = "approve", **fields: Any):
        self.task_id, self.dag = task_id, SimpleNamespace(task_dict={})
        self.subject, self.body, self.options, self.defaults, self.multiple = "Ship it?", "notes", ["yes", "no"], ["no"], False
        self.assigned_users: list[dict] = [{"id": "1", "name": "ann"}]
        self.serialized_params = {"reason": {"value": None, "schema": {"type": "string"}, "description": None}}
        self.hitl_summary_extra = {"timeout_datetime": "2030-01-01T00:00:00+00:00"}
        self.notifiers: list[Any] = []
        self.__dict__.update(fields)

    def execute(self, ti: Any) -> None:
        for notifier in self.notifiers:
            notifier({"ti": ti, "task": self})


class FakeApproval(FakeHITL):
    pass


@pytest.fixture
def hitl_operators(monkeypatch):
    from runbell.listeners import hitl

    monkeypatch.setattr(hitl, "_classes", {"HITLOperator": FakeHITL, "ApprovalOperator": FakeApproval})


def test_a_hitl_task_publishes_awaiting_input_with_its_request_once_airflow_stored_it(bus: Publisher, hitl_operators) -> None:
    task = FakeApproval()
    theirs = lambda context: None  # noqa: E731  # the author's own notifier stays
    task.notifiers = [theirs]
    ti = WorkerTI(task, try_number=2)
    hook.on_task_instance_running(previous_state=None, task_instance=ti)
    hook.on_task_instance_running(previous_state=None, task_instance=ti)  # attached once
    assert len(task.notifiers) == 2 and task.notifiers[0] is theirs
    task.execute(ti)
    *_, asked = published(bus)
    assert (asked.state, asked.task_id, asked.try_number, asked.map_index) == ("awaiting_input", "approve", 2, -1)
    request = asked.input_request
    assert request is not None and request.kind.value == "approval"
    assert (request.subject, request.body, request.options, request.defaults, request.multiple) == (
        "Ship it?",
        "notes",
        ["yes", "no"],
        ["no"],
        False,
    )
    assert request.params == {"reason": {"value": None, "schema": {"type": "string"}, "description": None}}
    assert request.deadline == "2030-01-01T00:00:00+00:00" and request.assigned_users[0].name == "ann" and not request.truncated


def test_the_notifier_goes_on_this_task_only_never_into_a_list_it_shares(bus: Publisher, hitl_operators) -> None:
    """prepare_for_execution copies the task shallowly, and a mapped task's or a class's default list may
    be shared: appending to it would give Runbell's notifier to every task holding it, once per run."""
    shared: list[Any] = []
    task, other = FakeHITL(notifiers=shared), FakeHITL("other", notifiers=shared)
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(task))
    assert shared == [] and other.notifiers == [] and len(task.notifiers) == 1


@pytest.mark.parametrize("change", [{"enabled": False}, {"skip_dags": frozenset({DAG_ID})}], ids=["disabled", "dag-skipped"])
def test_a_hook_turned_off_gives_no_notifier(bus: Publisher, hitl_operators, monkeypatch, change) -> None:
    """Turned off (RUNBELL_HOOK_ENABLED, RUNBELL_HOOK_SKIP_DAGS) the hook changes nothing of a task's."""
    monkeypatch.setattr(bus, "config", dataclasses.replace(bus.config, **change))
    task = FakeHITL()
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(task))
    assert task.notifiers == []


def test_no_notifier_when_resuming_on_the_server_side_or_for_other_tasks(bus: Publisher, hitl_operators) -> None:
    resuming = WorkerTI(FakeHITL())
    resuming._ti_context_from_server = SimpleNamespace(next_method="execute_complete")  # the answer came
    hook.on_task_instance_running(previous_state=None, task_instance=resuming)
    orm = OrmTI(FakeHITL())
    hook.on_task_instance_running(previous_state=None, task_instance=orm)
    plain = WorkerTI(make_dag("extract")["extract"])
    hook.on_task_instance_running(previous_state=None, task_instance=plain)
    assert resuming.task.notifiers == [] and orm.task.notifiers == [] and not hasattr(plain.task, "notifiers")
    assert [e.state for e in published(bus)] == ["running"] * 3


def test_without_airflow_s_hitl_operators_nothing_is_attached(bus: Publisher, monkeypatch) -> None:
    from runbell.listeners import hitl

    monkeypatch.setattr(hitl, "_classes", None)  # this environment has no Airflow: the import fails
    task = FakeHITL()
    hook.on_task_instance_running(previous_state=None, task_instance=WorkerTI(task))
    assert task.notifiers == [] and hitl.hitl_classes() == {}


def test_the_notifier_never_raises_into_the_task(bus: Publisher, hitl_operators, monkeypatch) -> None:
    class Broken(FakeHITL):
        @property
        def hitl_summary_extra(self) -> dict:
            raise RuntimeError("a broken operator")

        @hitl_summary_extra.setter
        def hitl_summary_extra(self, value: dict) -> None:
            pass

    task = Broken()
    ti = WorkerTI(task)
    hook.on_task_instance_running(previous_state=None, task_instance=ti)
    task.execute(ti)  # nothing raised, nothing asked
    monkeypatch.setattr(bus, "publish", lambda event: (_ for _ in ()).throw(OSError("Redis gone")))
    fine = FakeHITL("other")
    other = WorkerTI(fine)
    hook.on_task_instance_running(previous_state=None, task_instance=other)
    fine.execute(other)  # the publish fails: dropped, logged once, not raised
    assert [e.state for e in published(bus)] == ["running"]


def test_a_request_past_the_bounds_is_cut_to_them_and_says_so(bus: Publisher, hitl_operators) -> None:
    from runbell.bus import schema as S

    task = FakeHITL(
        subject="s" * 5000,
        body="b\x00" * 5000,
        options=[f"o{i}" for i in range(150)] + ["x" * 500, "bad\nline"],
        defaults=["o1", "x" * 500],
        multiple=True,
        serialized_params={"big": {"value": "v" * (S.PARAMS_MAX_BYTES + 1), "schema": {}, "description": None}},
        assigned_users=[{"id": str(i), "name": "n\x00"} for i in range(50)],
    )
    ti = WorkerTI(task)
    hook.on_task_instance_running(previous_state=None, task_instance=ti)
    task.execute(ti)
    request = published(bus)[-1].input_request
    assert request is not None and request.truncated
    assert len(request.subject) == S.SUBJECT_MAX and len(request.body or "") == S.INPUT_BODY_MAX
    assert request.options == [f"o{i}" for i in range(S.OPTIONS_MAX)] and request.defaults == ["o1"]
    assert request.params == {} and len(request.assigned_users) == S.USERS_MAX and request.assigned_users[0].name == "n "
