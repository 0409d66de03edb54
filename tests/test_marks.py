"""runbell.listeners.result / add_result: Airflow's own result marker where Airflow has one (3.3+),
Runbell's stand-in before, so one DAG file marks its result task on every Airflow 3. Fakes stand in
for the task SDK's decorated task and XComArg here; tests/airflow/test_readme.py loads a real DAG with
the marker on each Airflow of the matrix, and the end-to-end suite runs DAGs that use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from runbell.listeners import add_result, marks, result
from runbell.listeners.propagation import result_task_ids


@dataclass
class FakeOperator:
    task_id: str


@dataclass
class FakeXComArg:
    operator: FakeOperator


@dataclass
class FakeDecorated:
    """What @task returns: called, it creates an operator and gives its XComArg."""

    function: Any
    task_id: str = ""
    created: list[FakeOperator] = field(default_factory=list)

    def __call__(self, *args: Any, **kwargs: Any) -> FakeXComArg:
        operator = FakeOperator(self.task_id or self.function.__name__)
        self.created.append(operator)
        return FakeXComArg(operator)

    def override(self, **kwargs: Any) -> FakeDecorated:
        return FakeDecorated(self.function, kwargs.get("task_id", self.task_id), self.created)

    def expand(self, **kwargs: Any) -> FakeXComArg:
        return self()


def answer() -> int:
    """The answer."""
    return 42


@pytest.fixture
def without_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Airflow before 3.3: no airflow.sdk.result."""
    monkeypatch.setattr(marks, "_native_result_marker", lambda: None)


def test_without_airflows_marker_each_call_marks_its_operator_as_the_result(without_native: None) -> None:
    decorated = FakeDecorated(answer)
    marked = result(decorated)
    assert marked.__name__ == "answer" and marked.__doc__ == "The answer."  # still looks like the function
    first = marked()
    marked.override(task_id="answer_again")()
    assert isinstance(first, FakeXComArg) and first.operator.task_id == "answer"
    assert result_task_ids([*decorated.created, FakeOperator("other")], None) == {"answer", "answer_again"}


def test_without_airflows_marker_a_mapped_result_task_is_refused_saying_what_to_do(without_native: None) -> None:
    with pytest.raises(TypeError, match="Airflow 3.3.*runbell_result_task"):
        result(FakeDecorated(answer)).expand(x=[1, 2])


def test_result_only_goes_on_top_of_a_task_decorated_function(without_native: None) -> None:
    with pytest.raises(TypeError, match="on top of a @task"):
        result(answer)


def test_with_airflows_marker_result_is_airflows(monkeypatch: pytest.MonkeyPatch) -> None:
    def native(task: Any) -> Any:
        task.returns_dag_result = True
        return task

    monkeypatch.setattr(marks, "_native_result_marker", lambda: native)
    decorated = FakeDecorated(answer)
    assert result(decorated) is decorated and decorated.returns_dag_result is True  # type: ignore[attr-defined]


def test_add_result_is_the_dags_own_where_it_has_one_else_marks_the_operator() -> None:
    class DagWithAddResult:
        def add_result(self, xcom_arg: FakeXComArg) -> FakeXComArg:
            xcom_arg.operator.returns_dag_result = True  # type: ignore[attr-defined]
            return xcom_arg

    native, stand_in = FakeXComArg(FakeOperator("a")), FakeXComArg(FakeOperator("b"))
    assert add_result(DagWithAddResult(), native) is native
    assert add_result(object(), stand_in) is stand_in
    assert not hasattr(native.operator, marks.RESULT_ATTR)
    assert result_task_ids([native.operator, stand_in.operator], None) == {"a", "b"}
    with pytest.raises(TypeError, match="XComArg"):
        add_result(object(), answer)


def test_only_a_true_mark_counts() -> None:
    operator = FakeOperator("x")
    setattr(operator, marks.RESULT_ATTR, "yes")
    assert result_task_ids([operator], None) == set()


@dataclass
class FakeKeyedXComArg:
    operator: Any
    key: str


@dataclass
class FakeMappedOperator:
    task_id: str
    is_mapped: bool = True


def test_without_airflows_add_result_the_stand_in_refuses_what_airflows_refuses() -> None:
    # Airflow 3.3's dag.add_result takes only a plain return value (ValueError otherwise); the stand-in
    # must refuse the same DAG file at parse time, not mark the task and publish its return_value.
    with pytest.raises(ValueError, match="plain return value"):
        add_result(object(), FakeKeyedXComArg(FakeOperator("answer"), key="total"))
    # ... and a mapped task, which the stand-in cannot serve (as @result before 3.3 refuses it).
    mapped = FakeMappedOperator("answer")
    with pytest.raises(TypeError, match="run conf"):
        add_result(object(), FakeKeyedXComArg(mapped, key="return_value"))
    assert not hasattr(mapped, marks.RESULT_ATTR)
    plain = FakeKeyedXComArg(FakeOperator("answer"), key="return_value")
    assert add_result(object(), plain) is plain and getattr(plain.operator, marks.RESULT_ATTR) is True
