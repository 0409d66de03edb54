"""runbell.listeners.propagation on tiny fake DAGs: the trigger-rule table, paths, setups/teardowns, flags.

tests/airflow/test_e2e.py checks the same predictions against a real Airflow scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import pytest

from runbell.listeners.marks import (
    CRITICAL_ATTR,
    CRITICAL_TASKS_CONF_KEY,
    RESULT_TASK_CONF_KEY,
)
from runbell.listeners.propagation import (
    TRIGGER_RULE_PROPAGATION,
    Propagation,
    conf_critical_ids,
    doomed_task_ids,
    is_critical,
    is_marked_critical,
    result_task_ids,
    rule_propagation,
)

# Every TriggerRule of Airflow 3.3.2 (airflow/task/trigger_rule.py).
ALL_RULES = [
    "all_success",
    "all_failed",
    "all_done",
    "all_done_min_one_success",
    "all_done_setup_success",
    "one_success",
    "one_failed",
    "one_done",
    "none_failed",
    "none_skipped",
    "always",
    "none_failed_min_one_success",
    "all_skipped",
]
# Written out independently of the module's table: is a downstream upstream_failed when...
DOOMED_WHEN_ONLY_UPSTREAM_FAILED = {
    "all_success": True,
    "none_failed": True,
    "none_failed_min_one_success": True,
    "one_success": True,
    "all_done_min_one_success": True,
    "all_done_setup_success": False,  # the failed upstream is no setup
    "all_done": False,
    "always": False,
    "one_failed": False,
    "all_failed": False,
    "one_done": False,
    "none_skipped": False,
    "all_skipped": False,
}
DOOMED_WHEN_ONE_OF_TWO_UPSTREAMS_FAILED = {
    rule: rule in ("all_success", "none_failed", "none_failed_min_one_success") for rule in ALL_RULES
}


@dataclass
class FakeTask:
    task_id: str
    trigger_rule: object = "all_success"
    upstream_task_ids: set[str] = field(default_factory=set)
    downstream_task_ids: set[str] = field(default_factory=set)
    is_setup: bool = False
    is_teardown: bool = False
    returns_dag_result: bool = False


def dag(
    *chains: str,
    rules: dict[str, object] | None = None,
    setups: str = "",
    teardowns: str = "",
    task_class: type = FakeTask,
) -> dict[str, FakeTask]:
    """Tasks from chains like "f>a>r" (edges left to right), with trigger rules by task id."""
    tasks: dict[str, FakeTask] = {}
    for chain in chains:
        ids = chain.split(">")
        for tid in ids:
            tasks.setdefault(tid, task_class(tid))
        for up, down in zip(ids, ids[1:]):
            tasks[up].downstream_task_ids.add(down)
            tasks[down].upstream_task_ids.add(up)
    for tid, rule in (rules or {}).items():
        tasks[tid].trigger_rule = rule
    for tid in setups.split():
        tasks[tid].is_setup = True
    for tid in teardowns.split():
        tasks[tid].is_teardown = True
        tasks[tid].trigger_rule = "all_done_setup_success"
    return tasks


# -- the table ------------------------------------------------------------------------------------


def test_table_covers_every_trigger_rule_of_airflow() -> None:
    assert set(TRIGGER_RULE_PROPAGATION) == set(ALL_RULES)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_failed_only_upstream(rule: str) -> None:
    tasks = dag("f>d", rules={"d": rule})
    assert ("d" in doomed_task_ids(tasks, "f")) is DOOMED_WHEN_ONLY_UPSTREAM_FAILED[rule]


@pytest.mark.parametrize("rule", ALL_RULES)
def test_failed_upstream_next_to_another(rule: str) -> None:
    tasks = dag("f>d", "ok>d", rules={"d": rule})
    assert ("d" in doomed_task_ids(tasks, "f")) is DOOMED_WHEN_ONE_OF_TWO_UPSTREAMS_FAILED[rule]


def test_rule_given_as_a_str_enum_or_unknown() -> None:
    class TriggerRule(str, Enum):
        ONE_SUCCESS = "one_success"

    assert rule_propagation(TriggerRule.ONE_SUCCESS) is Propagation.ALL_UPSTREAMS
    # A rule a later Airflow may add: assume the failure stops there (never claim critical wrongly).
    assert rule_propagation("some_future_rule") is Propagation.NONE
    assert "d" not in doomed_task_ids(dag("f>d", rules={"d": "some_future_rule"}), "f")


# -- paths ----------------------------------------------------------------------------------------


def test_chain_propagates_until_a_rule_stops_it() -> None:
    tasks = dag("f>a>b>c>r", rules={"c": "all_done"})
    assert doomed_task_ids(tasks, "f") == {"f", "a", "b"}


def test_nothing_upstream_or_beside_is_doomed() -> None:
    tasks = dag("x>f>a", "x>y")
    assert doomed_task_ids(tasks, "f") == {"f", "a"}


def test_diamond_with_one_success_join_fails_when_both_branches_fail() -> None:
    tasks = dag("f>a>r", "f>b>r", rules={"r": "one_success"})
    assert doomed_task_ids(tasks, "f") == {"f", "a", "b", "r"}


def test_diamond_with_one_success_join_survives_a_branch_that_runs() -> None:
    tasks = dag("f>a>r", "f>b>r", rules={"b": "all_done", "r": "one_success"})
    assert doomed_task_ids(tasks, "f") == {"f", "a"}


def test_diamond_with_all_success_join_fails_through_either_branch() -> None:
    tasks = dag("f>a>r", "f>b>r", rules={"b": "all_done"})
    assert doomed_task_ids(tasks, "f") == {"f", "a", "r"}


def test_join_waits_for_every_upstream_reached_through_a_longer_path() -> None:
    # r sees a early and b late: it is doomed once both are, whatever the order they are visited in.
    tasks = dag("f>a>r", "f>x>y>b>r", rules={"r": "all_done_min_one_success"})
    assert doomed_task_ids(tasks, "f") == {"f", "a", "x", "y", "b", "r"}


def test_mapped_instance_does_not_doom_rules_other_instances_can_satisfy() -> None:
    chain = dag("f>d>r", rules={"r": "one_success"})
    assert doomed_task_ids(chain, "f", map_index=3) == {"f", "d"}
    assert doomed_task_ids(chain, "f", map_index=-1) == {"f", "d", "r"}


def test_unknown_task_ids_are_ignored() -> None:
    tasks = dag("f>a")
    tasks["a"].downstream_task_ids.add("gone")
    tasks["a"].upstream_task_ids.add("also_gone")
    assert doomed_task_ids(tasks, "f") == {"f", "a"}
    assert doomed_task_ids(tasks, "not_in_dag") == {"not_in_dag"}


# -- setups and teardowns -------------------------------------------------------------------------


def test_teardown_after_its_only_setup_failed_is_upstream_failed() -> None:
    tasks = dag("s>t", setups="s", teardowns="t")
    assert doomed_task_ids(tasks, "s") == {"s", "t"}


def test_teardown_runs_when_another_setup_succeeded() -> None:
    tasks = dag("s1>t", "s2>t", setups="s1 s2", teardowns="t")
    assert doomed_task_ids(tasks, "s1") == {"s1"}


def test_teardown_runs_after_a_failed_work_task() -> None:
    tasks = dag("s>w>t", "s>t", setups="s", teardowns="t")
    assert doomed_task_ids(tasks, "w") == {"w"}


def test_failed_indirect_setup_dooms_tasks_whatever_their_rule() -> None:
    tasks = dag("s>w>x", "w>y", rules={"x": "all_done", "y": "always"}, setups="s")
    # x would run after w under all_done, but Airflow's setup constraint fails it; `always` skips it.
    assert doomed_task_ids(tasks, "s") == {"s", "w", "x"}


def test_setup_counts_only_where_its_teardown_lies_below() -> None:
    below = dag("s>w>x>t", "s>t", rules={"x": "all_done"}, setups="s", teardowns="t")
    beside = dag("s>w>x", "w>t", "s>t", rules={"x": "all_done"}, setups="s", teardowns="t")
    assert doomed_task_ids(below, "s") == {"s", "w", "x", "t"}
    assert doomed_task_ids(beside, "s") == {"s", "w", "t"}


def test_upstream_failed_setup_dooms_below_it_too() -> None:
    tasks = dag("f>s>w>x", rules={"x": "all_done"}, setups="s")
    assert doomed_task_ids(tasks, "f") == {"f", "s", "w", "x"}


# -- criticality ----------------------------------------------------------------------------------


def test_result_task_itself_is_critical() -> None:
    tasks = dag("a>r")
    assert is_critical(tasks, "r", result_ids={"r"})


def test_failure_reaching_the_result_is_critical() -> None:
    tasks = dag("a>b>r", "a>c")
    assert is_critical(tasks, "a", result_ids={"r"})
    assert not is_critical(tasks, "c", result_ids={"r"})


def test_failure_stopped_by_a_trigger_rule_is_not_critical() -> None:
    tasks = dag("a>b>r", rules={"r": "all_done"})
    assert not is_critical(tasks, "a", result_ids={"r"})


def test_any_of_several_result_tasks_counts() -> None:
    tasks = dag("a>r1", "b>r2")
    assert is_critical(tasks, "b", result_ids={"r1", "r2"})


def test_without_a_result_task_every_failure_is_critical() -> None:
    tasks = dag("a>b", rules={"b": "all_done"})
    assert is_critical(tasks, "a", result_ids=set())


def test_marked_or_conf_listed_task_is_critical_off_the_result_path() -> None:
    tasks = dag("a>r", "x>y")
    assert is_critical(tasks, "x", result_ids={"r"}, marked=True)
    assert is_critical(tasks, "x", result_ids={"r"}, conf_critical={"x"})
    assert not is_critical(tasks, "x", result_ids={"r"}, conf_critical={"a"})


def test_mapped_instance_critical_only_through_any_upstream_rules() -> None:
    tasks = dag("m>r", rules={"r": "one_success"})
    assert not is_critical(tasks, "m", result_ids={"r"}, map_index=0)
    assert is_critical(dag("m>r"), "m", result_ids={"r"}, map_index=0)


# -- reading the DAG and the conf -----------------------------------------------------------------


def test_result_task_ids_from_the_dag_and_the_conf() -> None:
    tasks = dag("a>r", "b")
    tasks["r"].returns_dag_result = True
    assert result_task_ids(tasks.values(), None) == {"r"}
    assert result_task_ids(tasks.values(), {RESULT_TASK_CONF_KEY: "b"}) == {"r", "b"}
    assert result_task_ids([], {RESULT_TASK_CONF_KEY: "b"}) == {"b"}
    assert result_task_ids([], {RESULT_TASK_CONF_KEY: ["b"]}) == set()  # must name one task
    assert result_task_ids([], {RESULT_TASK_CONF_KEY: ""}) == set()


def test_conf_critical_ids() -> None:
    assert conf_critical_ids({CRITICAL_TASKS_CONF_KEY: ["a", "b", 3]}) == {"a", "b"}
    assert conf_critical_ids({CRITICAL_TASKS_CONF_KEY: "a"}) == {"a"}
    assert conf_critical_ids({CRITICAL_TASKS_CONF_KEY: {"a": 1}}) == set()
    assert conf_critical_ids(None) == set()


def test_marker_attribute() -> None:
    task = FakeTask("a")
    assert not is_marked_critical(task)
    setattr(task, CRITICAL_ATTR, True)
    assert is_marked_critical(task)
    assert not is_marked_critical(None)
