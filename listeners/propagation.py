"""Whether a terminal task failure is critical, decided from the DAG's structure alone.

A failure is critical when it decides the run's answer: the failed task is the result task, or the
failure reaches the result task through the trigger rules downstream (the result task then ends
``upstream_failed``), or the task is explicitly marked critical. Without a result task every terminal
failure is critical.

Everything here works on a minimal protocol (``TaskNode``) so that tests can use tiny fake objects;
both the task SDK's operators (worker) and the serialized operators (scheduler, api-server) fit it.
The rules mirror ``airflow/ti_deps/deps/trigger_rule_dep.py`` of Airflow 3.3.2.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from enum import Enum
from typing import Any, Protocol

from runbell.listeners.marks import (
    CRITICAL_ATTR,
    CRITICAL_TASKS_CONF_KEY,
    RESULT_ATTR,
    RESULT_TASK_CONF_KEY,
)


class TaskNode(Protocol):
    @property
    def task_id(self) -> str: ...

    @property
    def upstream_task_ids(self) -> AbstractSet[str]: ...

    @property
    def downstream_task_ids(self) -> AbstractSet[str]: ...

    @property
    def trigger_rule(self) -> Any: ...  # a TriggerRule (a str Enum) or its plain string value

    @property
    def is_setup(self) -> bool: ...

    @property
    def is_teardown(self) -> bool: ...


class Propagation(str, Enum):
    """What a failed (or upstream_failed) upstream does to a downstream task, by its trigger rule."""

    ANY_UPSTREAM = "any_upstream"  # one failed upstream is enough: the downstream is upstream_failed
    ALL_UPSTREAMS = "all_upstreams"  # upstream_failed only when no upstream can succeed any more
    ALL_SETUP_UPSTREAMS = "all_setup_upstreams"  # upstream_failed only when every setup upstream failed
    NONE = "none"  # the downstream runs or is skipped: the failure stops here


# Trigger rule -> Propagation, read off TriggerRuleDep._evaluate_direct_relatives (flag_upstream_failed).
# ALL_UPSTREAMS rules set upstream_failed once all upstreams are done with no success; statically that
# is certain only when every upstream is doomed by this same failure (e.g. it is the only upstream).
# all_done_setup_success (the teardown default) is NOT inert: it sets upstream_failed when the task
# has setup upstreams and none succeeded. `always` never waits on upstreams at all.
TRIGGER_RULE_PROPAGATION: Mapping[str, Propagation] = {
    "all_success": Propagation.ANY_UPSTREAM,
    "none_failed": Propagation.ANY_UPSTREAM,
    "none_failed_min_one_success": Propagation.ANY_UPSTREAM,
    "one_success": Propagation.ALL_UPSTREAMS,
    "all_done_min_one_success": Propagation.ALL_UPSTREAMS,
    "all_done_setup_success": Propagation.ALL_SETUP_UPSTREAMS,
    "all_done": Propagation.NONE,
    "always": Propagation.NONE,
    "one_failed": Propagation.NONE,
    "all_failed": Propagation.NONE,
    "one_done": Propagation.NONE,
    "none_skipped": Propagation.NONE,
    "all_skipped": Propagation.NONE,
}


def rule_propagation(trigger_rule: Any) -> Propagation:
    """The table's entry; a rule this version does not know is treated as stopping the failure."""
    value = getattr(trigger_rule, "value", trigger_rule)
    return TRIGGER_RULE_PROPAGATION.get(str(value), Propagation.NONE)


def doomed_task_ids(tasks: Mapping[str, TaskNode], failed_task_id: str, *, map_index: int = -1) -> set[str]:
    """The failed task and every task its terminal failure makes upstream_failed.

    A failed mapped instance (map_index >= 0) fails only part of its task, so ALL_UPSTREAMS and
    ALL_SETUP_UPSTREAMS rules, which other instances could still satisfy, are not counted: erring
    towards "not critical" only delays the answer, erring the other way would give a wrong one.
    """
    whole = map_index < 0
    doomed = {failed_task_id}
    setup_scopes: list[set[str]] = []  # per doomed setup: the tasks its setup constraint fails
    if _is_setup(tasks, failed_task_id):
        setup_scopes.append(_setup_scope(tasks, failed_task_id))
    for task_id in _descendants_in_order(tasks, failed_task_id):
        task = tasks[task_id]
        if _direct_rule_dooms(task, tasks, doomed, whole) or any(task_id in s for s in setup_scopes):
            doomed.add(task_id)
            if task.is_setup:
                setup_scopes.append(_setup_scope(tasks, task_id))
    return doomed


def _direct_rule_dooms(task: TaskNode, tasks: Mapping[str, TaskNode], doomed: set[str], whole: bool) -> bool:
    upstream = set(task.upstream_task_ids)
    propagation = rule_propagation(task.trigger_rule)
    if propagation is Propagation.ANY_UPSTREAM:
        return bool(upstream & doomed)
    if not whole:
        return False
    if propagation is Propagation.ALL_UPSTREAMS:
        return bool(upstream) and upstream <= doomed
    if propagation is Propagation.ALL_SETUP_UPSTREAMS:
        setups = {u for u in upstream if _is_setup(tasks, u)}
        return bool(setups) and setups <= doomed
    return False


def _setup_scope(tasks: Mapping[str, TaskNode], setup_id: str) -> set[str]:
    """The tasks a failed (or upstream_failed) setup makes upstream_failed by Airflow's setup
    constraint, whatever their trigger rule: the non-teardown tasks below it that it is an *indirect*
    and relevant setup of (get_upstreams_only_setups: it has no teardown, or one of its teardowns
    lies below the task). `always` tasks skip every dependency check."""
    setup = tasks[setup_id]
    direct = set(setup.downstream_task_ids)
    scope = _relatives(tasks, setup_id, downstream=True) - direct
    teardowns = {t for t in direct if t in tasks and tasks[t].is_teardown}
    if teardowns:
        scope &= set().union(*(_relatives(tasks, t, downstream=False) for t in teardowns))
    return {t for t in scope if not tasks[t].is_teardown and not _is_always(tasks[t])}


def _is_setup(tasks: Mapping[str, TaskNode], task_id: str) -> bool:
    return task_id in tasks and tasks[task_id].is_setup


def _is_always(task: TaskNode) -> bool:
    return str(getattr(task.trigger_rule, "value", task.trigger_rule)) == "always"


def _relatives(tasks: Mapping[str, TaskNode], task_id: str, *, downstream: bool) -> set[str]:
    """All tasks below (or above) the task, itself excluded; ids missing from the DAG are ignored."""

    def step(t: str) -> AbstractSet[str]:
        return tasks[t].downstream_task_ids if downstream else tasks[t].upstream_task_ids

    seen: set[str] = set()
    todo = deque(step(task_id) if task_id in tasks else ())
    while todo:
        current = todo.popleft()
        if current in seen or current not in tasks:
            continue
        seen.add(current)
        todo.extend(step(current))
    return seen


def _descendants_in_order(tasks: Mapping[str, TaskNode], task_id: str) -> list[str]:
    """The task's descendants, each after all of its upstreams that are descendants too (Kahn)."""
    below = _relatives(tasks, task_id, downstream=True)
    waiting = {t: len(set(tasks[t].upstream_task_ids) & below) for t in below}
    ready = deque(sorted(t for t, n in waiting.items() if n == 0))
    order: list[str] = []
    while ready:
        current = ready.popleft()
        order.append(current)
        for child in sorted(tasks[current].downstream_task_ids):
            if child in waiting:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.append(child)
    return order


# -- what the run says is the result, and what is marked critical -----------------------------------


def result_task_ids(tasks: Iterable[Any], conf: Mapping[str, Any] | None) -> set[str]:
    """Tasks marked as the DAG's result (Airflow's @result / dag.add_result, or Runbell's stand-in
    for them on older versions) plus the one the run conf names."""
    ids = {t.task_id for t in tasks if getattr(t, "returns_dag_result", False) or getattr(t, RESULT_ATTR, False) is True}
    named = (conf or {}).get(RESULT_TASK_CONF_KEY)
    if isinstance(named, str) and named:
        ids.add(named)
    return ids


def conf_critical_ids(conf: Mapping[str, Any] | None) -> set[str]:
    """Task ids the run conf lists as critical (a single id is accepted too)."""
    listed = (conf or {}).get(CRITICAL_TASKS_CONF_KEY)
    if isinstance(listed, str):
        return {listed}
    if isinstance(listed, (list, tuple, set)):
        return {t for t in listed if isinstance(t, str)}
    return set()


def is_marked_critical(task: Any) -> bool:
    return getattr(task, CRITICAL_ATTR, False) is True


def is_critical(
    tasks: Mapping[str, TaskNode],
    task_id: str,
    *,
    result_ids: AbstractSet[str],
    map_index: int = -1,
    marked: bool = False,
    conf_critical: AbstractSet[str] = frozenset(),
) -> bool:
    """Whether a terminal failure of this task (instance) decides the run as failed."""
    if marked or task_id in conf_critical or not result_ids or task_id in result_ids:
        return True
    return bool(doomed_task_ids(tasks, task_id, map_index=map_index) & result_ids)
