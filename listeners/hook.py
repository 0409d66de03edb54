"""The Airflow listener: one bus event per dag-run and task-instance state change.

Registered through ``runbell.listeners.plugin.RunbellPlugin``. The same hooks fire in different processes
with different objects (seen with Airflow 3.3.2):

- the task's own worker process: a ``RuntimeTaskInstance`` whose ``task`` is the operator parsed
  from the DAG file (markers, ``returns_dag_result`` or Runbell's stand-in for it before 3.3), no
  metadata-DB access; the result value is read through the Execution API with ``xcom_pull``;
- the scheduler and the api-server: ORM ``DagRun`` / ``TaskInstance``; a task instance's ``task``
  comes from the serialized DAG (which drops ``returns_dag_result`` and markers) or, when a state is
  set through the REST API, is missing altogether.

Asset hooks (Airflow 3.2+) fire where an asset change is registered: the api-server (a task's
outlets, reported through the Execution API, or POST /assets/events), the scheduler and the
triggerer, with a ``SerializedAsset`` and a listener ``AssetEvent``. Airflow calls on_asset_changed and
then on_asset_event_emitted for the same change; only the second knows the extra and the source, so
it is the one published, and on_asset_changed publishes only on an Airflow without it (3.0, 3.1).

Every hook is bounded (publishes time out in well under a second, else spool) and never raises into
Airflow: any error is logged once per kind and the event is dropped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import pluggy

from runbell.bus.schema import (
    ALIASES_MAX,
    HOST_MAX,
    MSG_MAX,
    AssetEvent,
    AssetInfo,
    ErrorInfo,
    Event,
    EventKind,
    InputRequest,
    Result,
    ResultRef,
    RunState,
    Source,
    TaskState,
    truncate,
)
from runbell.listeners import hitl, partial_output, propagation, tracing
from runbell.listeners.guard import LogOnce, publish_guarded
from runbell.listeners.marks import RETURN_KEY
from runbell.listeners.publisher import (
    Publisher,
    default_publisher,
    extra_fields,
    make_result,
)

hookimpl = pluggy.HookimplMarker("airflow")
log = logging.getLogger("runbell.hook")

_HOST = socket.gethostname()[:HOST_MAX]
_RETURN_KEY = RETURN_KEY
_log_once = LogOnce(log)
_emitted_hook: bool | None = None  # whether this Airflow has on_asset_event_emitted (3.2+)


# -- hooks ----------------------------------------------------------------------------------------


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    _guard("on_dag_run_running", lambda p: _run_event(dag_run, RunState.RUNNING, msg))


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _guard("on_dag_run_success", lambda p: _run_event(dag_run, RunState.SUCCESS, msg))


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _guard("on_dag_run_failed", lambda p: _run_event(dag_run, RunState.FAILED, msg))


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    _guard("on_task_instance_running", lambda p: _task_event(task_instance, TaskState.RUNNING, p))
    if _is_worker_instance(task_instance):
        # No listener hook fires when a HITL task then waits (defers, or parks in awaiting_input):
        # its notifiers are called instead, so Runbell's joins them (runbell.listeners.hitl).
        # Turned off (or for a skipped DAG) the hook changes nothing of the user's task.
        try:
            config = default_publisher().config
            if config.enabled and task_instance.dag_id not in config.skip_dags:
                hitl.attach(task_instance, _awaiting_input)
        except Exception as exc:
            _log_once(f"hitl:{type(exc).__name__}", "runbell: HITL notifier not attached: %r", exc)


def _awaiting_input(task_instance: Any, request: InputRequest) -> None:
    """The notifier's publish: the task waits for a person (Airflow has stored the request)."""
    _guard("hitl_notifier", lambda p: _task_event(task_instance, TaskState.AWAITING_INPUT, p, input_request=request))


@hookimpl
def on_task_instance_success(previous_state: Any, task_instance: Any) -> None:
    _finish_progress(task_instance)
    _guard("on_task_instance_success", lambda p: _task_event(task_instance, TaskState.SUCCESS, p))


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    _finish_progress(task_instance)
    _guard(
        "on_task_instance_failed",
        lambda p: _task_event(task_instance, _failure_state(task_instance), p, error=error),
    )


@hookimpl
def on_task_instance_skipped(previous_state: Any, task_instance: Any) -> None:
    _finish_progress(task_instance)
    _guard("on_task_instance_skipped", lambda p: _task_event(task_instance, TaskState.SKIPPED, p))


@hookimpl
def on_asset_changed(asset: Any) -> None:
    if not _has_emitted_hook():  # else on_asset_event_emitted follows, with the extra and the source
        _guard("on_asset_changed", lambda p: _asset_event(asset, p))


@hookimpl
def on_asset_event_emitted(asset_event: Any) -> None:
    _guard("on_asset_event_emitted", lambda p: _asset_event(asset_event.asset, p, asset_event))


def _finish_progress(task_instance: Any) -> None:
    """In the task's own process, what it offered with progress() goes out before its end."""
    try:
        if _is_worker_instance(task_instance):
            partial_output.finish(partial_output.task_ref_of(task_instance))
    except Exception as exc:
        _log_once(f"progress:{type(exc).__name__}", "runbell: waiting progress not sent: %r", exc)


def _guard(hook: str, build: Callable[[Publisher], Event | AssetEvent]) -> None:
    """Build and publish one event; nothing may escape into Airflow."""
    publish_guarded(hook, lambda publisher: [build(publisher)], _log_once)


# -- run events -----------------------------------------------------------------------------------


def _run_event(dag_run: Any, state: RunState, msg: str | None) -> Event:
    conf = getattr(dag_run, "conf", None)
    attributes = {"runbell.dag_id": dag_run.dag_id, "runbell.run_id": dag_run.run_id, "runbell.state": state.value}
    with tracing.publish_span(tracing.trace_of_conf(conf if isinstance(conf, Mapping) else {}), attributes) as carried:
        return Event(
            kind=EventKind.RUN,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            state=state.value,
            source=Source.HOOK,
            host=_HOST,
            run_type=_text(getattr(dag_run, "run_type", None)),
            logical_date=_iso(getattr(dag_run, "logical_date", None)),
            run_after=_iso(getattr(dag_run, "run_after", None)),
            backfill_id=_text(getattr(dag_run, "backfill_id", None)),
            msg=truncate(str(msg), MSG_MAX) if msg else None,  # bounded like an error message
            trace=carried,
        )


# -- asset events ---------------------------------------------------------------------------------


def _has_emitted_hook() -> bool:
    global _emitted_hook
    if _emitted_hook is None:
        try:
            from airflow.listeners.spec import asset as spec

            _emitted_hook = hasattr(spec, "on_asset_event_emitted")
        except Exception:  # no Airflow here (or not its listener specs): nothing else will fire
            _emitted_hook = False
    return _emitted_hook


def _asset_event(asset: Any, publisher: Publisher, emitted: Any = None) -> AssetEvent:
    """The asset event: from the listener AssetEvent when there is one, else from the asset alone."""
    info = AssetInfo(name=asset.name, uri=_text(getattr(asset, "uri", None)), group=_text(getattr(asset, "group", None)))
    if emitted is None:
        return AssetEvent(asset=info, source=Source.HOOK, host=_HOST)
    map_index = getattr(emitted, "source_map_index", None)
    aliases = [_text(getattr(a, "name", a)) for a in (getattr(emitted, "source_aliases", None) or [])[:ALIASES_MAX]]
    return AssetEvent(
        asset=info,
        source_dag_id=_text(getattr(emitted, "source_dag_id", None)),
        source_run_id=_text(getattr(emitted, "source_run_id", None)),
        source_task_id=_text(getattr(emitted, "source_task_id", None)),
        source_map_index=map_index if isinstance(map_index, int) else None,
        partition_key=_text(getattr(emitted, "partition_key", None)),
        aliases=[a for a in aliases if a],
        source=Source.HOOK,
        host=_HOST,
        **extra_fields(getattr(emitted, "extra", None), publisher.config.result_max_bytes),
    )


# -- task events ----------------------------------------------------------------------------------


def _failure_state(task_instance: Any) -> TaskState:
    """on_task_instance_failed fires for a failure that will be retried too. Airflow sets the state
    before calling the hook (worker: run() then finalize(); ORM: fetch_handle_failure_context), and
    only FAILED is terminal."""
    if _text(getattr(task_instance, "state", None)) == TaskState.UP_FOR_RETRY.value:
        return TaskState.UP_FOR_RETRY
    return TaskState.FAILED


def _task_event(ti: Any, state: TaskState, publisher: Publisher, *, error: Any = None, input_request: InputRequest | None = None) -> Event:
    in_worker = _is_worker_instance(ti)
    task = getattr(ti, "task", None)
    conf = _run_conf(ti, in_worker)
    map_index = _map_index(ti)
    result_task = ti.task_id in propagation.result_task_ids([task] if task else [], conf)
    failed = state in (TaskState.FAILED, TaskState.UP_FOR_RETRY)
    attributes = {"runbell.dag_id": ti.dag_id, "runbell.run_id": ti.run_id, "runbell.task_id": ti.task_id, "runbell.state": state.value}
    with tracing.publish_span(tracing.trace_of_conf(conf), attributes) as carried:
        result = None
        if state is TaskState.SUCCESS and result_task and in_worker:
            result = _read_result(ti, map_index, publisher.config.result_max_bytes)
        return Event(
            kind=EventKind.TASK,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            state=state.value,
            source=Source.HOOK,
            host=_HOST,
            task_id=ti.task_id,
            map_index=map_index,
            try_number=getattr(ti, "try_number", None),
            result_task=result_task,
            critical=_task_critical(ti, task, conf, in_worker, map_index),
            result=result,
            error=ErrorInfo.from_exception(error) if failed else None,
            input_request=input_request,
            trace=carried,
        )


def _is_worker_instance(ti: Any) -> bool:
    """The worker's RuntimeTaskInstance is a pydantic model; the ORM TaskInstance of the scheduler
    and api-server is a SQLAlchemy model (it has a __table__)."""
    return not hasattr(type(ti), "__table__")


def _task_critical(ti: Any, task: Any, conf: Mapping[str, Any], in_worker: bool, map_index: int) -> bool:
    """Whether a terminal failure of this task instance decides the run (on every event, so the
    gateway knows it even when the failure is later reported by a process without the DAG file)."""
    conf_critical = propagation.conf_critical_ids(conf)
    tasks = getattr(getattr(task, "dag", None), "task_dict", None) or {}
    if in_worker:
        result_ids = propagation.result_task_ids(list(tasks.values()) or [task], conf)
        marked = propagation.is_marked_critical(task)
    else:
        # The serialized DAG knows neither the result task nor markers: only the conf can tell, and
        # "no result task" cannot be concluded here (it would make every failure critical).
        result_ids = propagation.result_task_ids([], conf)
        if not result_ids:
            return ti.task_id in conf_critical
        marked = False
    return propagation.is_critical(
        tasks,
        ti.task_id,
        result_ids=result_ids,
        map_index=map_index,
        marked=marked,
        conf_critical=conf_critical,
    )


def _run_conf(ti: Any, in_worker: bool) -> Mapping[str, Any]:
    """The run's conf; empty when it cannot be had (e.g. an ORM instance detached from its session)."""
    try:
        if in_worker:
            dag_run = ti.get_template_context().get("dag_run")
        else:
            dag_run = getattr(ti, "dag_run", None)
        conf = getattr(dag_run, "conf", None)
    except Exception as exc:
        _log_once(f"conf:{type(exc).__name__}", "runbell: run conf not readable: %r", exc)
        return {}
    return conf if isinstance(conf, Mapping) else {}


def _read_result(ti: Any, map_index: int, max_bytes: int) -> Result:
    """The return value, stored before the success hook fires. If it cannot be read, a reference to
    Airflow's XCom endpoint still tells the gateway where the value is."""
    where = dict(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=map_index)
    try:
        if map_index >= 0:
            value = ti.xcom_pull(task_ids=ti.task_id, key=_RETURN_KEY, map_indexes=map_index)
        else:
            value = ti.xcom_pull(task_ids=ti.task_id, key=_RETURN_KEY)
        return make_result(value, max_bytes=max_bytes, **where)
    except Exception as exc:
        _log_once(f"xcom:{type(exc).__name__}", "runbell: result not read, publishing a ref: %r", exc)
        return Result(ref=ResultRef(**where))


def _map_index(ti: Any) -> int:
    value = getattr(ti, "map_index", None)
    return value if isinstance(value, int) else -1


def _text(value: Any) -> str | None:
    """A str Enum's value, or the value as text; None stays None."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else _text(value)
