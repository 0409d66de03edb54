"""Markers DAG authors put on tasks. Read in the task's own process, where the DAG file is parsed."""

from __future__ import annotations

from typing import TypeVar

CRITICAL_ATTR = "runbell_critical"
RESULT_TASK_CONF_KEY = "runbell_result_task"  # run conf: names the result task of a DAG without one
CRITICAL_TASKS_CONF_KEY = "runbell_critical_tasks"  # run conf: extra task ids to treat as critical

T = TypeVar("T")


def critical(task: T) -> T:
    """Mark a task (an operator, or the output of a @task call) as critical.

    A terminal failure of a critical task decides the run as failed at once, even when it does not
    lie on the way to the result task::

        load = critical(load_table())
    """
    operator = getattr(task, "operator", task)  # an XComArg wraps its operator
    setattr(operator, CRITICAL_ATTR, True)
    return task
