"""Markers DAG authors put on tasks. Read in the task's own process, where the DAG file is parsed.

`result` / `add_result` are Airflow's own result marker where Airflow has one (3.3+: ``@result``,
``dag.add_result``), and Runbell's stand-in on older versions, so that one DAG file works on every
Airflow 3: feature detection, not version numbers. The stand-in marks the operator with RESULT_ATTR,
which the hook reads in the worker (the serialized DAG of the scheduler and api-server drops it, as
it drops Airflow's own ``returns_dag_result``).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar, cast

CRITICAL_ATTR = "runbell_critical"
RESULT_ATTR = "runbell_result"  # Runbell's result mark, on an Airflow without @result
RESULT_TASK_CONF_KEY = "runbell_result_task"  # run conf: names the result task of a DAG without one
CRITICAL_TASKS_CONF_KEY = "runbell_critical_tasks"  # run conf: extra task ids to treat as critical
RETURN_KEY = "return_value"  # the XCom key of a task's return value (Airflow's XCOM_RETURN_KEY)
_MAPPED_REFUSED = (
    "a mapped result task needs Airflow's own @result (Airflow 3.3+); on this Airflow, name the "
    f"task in the run conf instead ({RESULT_TASK_CONF_KEY!r})"
)

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


def result(task: T) -> T:
    """Mark a ``@task``-decorated function as returning the DAG's result, on top of ``@task``::

        @result
        @task
        def answer() -> dict: ...

    Airflow's own ``airflow.sdk.result`` where it exists (3.3+); before, every call of the task marks
    the operator it creates. A mapped result task (``.expand``) needs Airflow's own marker."""
    native = _native_result_marker()
    if native is not None:
        return cast(T, native(task))
    if not callable(task) or not hasattr(task, "function"):
        raise TypeError("@result must be used on top of a @task-decorated function")
    return _ResultTask(task)  # type: ignore[return-value]  # stands in for the decorated task


def add_result(dag: Any, xcom_arg: T) -> T:
    """Mark the task behind ``xcom_arg`` (what calling a ``@task`` returns) as the DAG's result:
    ``dag.add_result(xcom_arg)`` where Airflow has it (3.3+), else Runbell's mark on its operator."""
    native = getattr(dag, "add_result", None)
    if callable(native):
        return cast(T, native(xcom_arg))
    operator = getattr(xcom_arg, "operator", None)
    if operator is None:
        raise TypeError("add_result takes what calling a @task returns (an XComArg)")
    # What Airflow's own refuses is refused here too, so a DAG file parses alike on every version.
    if getattr(xcom_arg, "key", RETURN_KEY) != RETURN_KEY:
        raise ValueError("Only plain return value can be used as dag result")
    if getattr(operator, "is_mapped", False) is True:
        raise TypeError(_MAPPED_REFUSED)
    setattr(operator, RESULT_ATTR, True)
    return xcom_arg


def _native_result_marker() -> Any:
    try:
        import airflow.sdk as sdk
    except ImportError:  # no Airflow task SDK here: only Runbell's mark
        return None
    return getattr(sdk, "result", None)


class _ResultTask:
    """A ``@task``-decorated function whose calls mark their operator as the result (Airflow < 3.3)."""

    def __init__(self, decorated: Any) -> None:
        self._decorated = decorated
        functools.update_wrapper(self, decorated.function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        xcom_arg = self._decorated(*args, **kwargs)
        setattr(xcom_arg.operator, RESULT_ATTR, True)
        return xcom_arg

    def override(self, **kwargs: Any) -> _ResultTask:
        return _ResultTask(self._decorated.override(**kwargs))

    def _mapped(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_MAPPED_REFUSED)

    expand = expand_kwargs = partial = _mapped

    def __getattr__(self, name: str) -> Any:
        if name == "_decorated":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._decorated, name)
