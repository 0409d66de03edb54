"""The outcome rules, rule by rule, plus properties that must hold for any order of delivery."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbell.bus.schema import Envelope, ErrorInfo, Event, EventKind, InputRequest, Progress, ProgressItem, Result, ResultRef
from runbell.service.core.outcome import DecidedBy, OutcomeFold, OutcomeStatus, decide

DAG, RUN = "dag", "run"


def run_event(state: str, **kw) -> Event:
    return Event(kind=EventKind.RUN, dag_id=DAG, run_id=RUN, state=state, **kw)


def task_event(task_id: str, state: str, *, try_number: int = 1, **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=RUN, task_id=task_id, state=state, try_number=try_number, **kw)


def result_success(task_id: str = "answer", value=42, **kw) -> Event:
    return task_event(task_id, "success", result_task=True, critical=True, result=Result(value=value, size=2), **kw)


def failure(task_id: str, *, critical: bool, try_number: int = 1, **kw) -> Event:
    error = ErrorInfo(type="ValueError", message=f"{task_id} broke")
    return task_event(task_id, "failed", critical=critical, error=error, try_number=try_number, **kw)


def envelopes(*events: Event) -> list[Envelope]:
    return [Envelope(seq=i, event=e) for i, e in enumerate(events, start=1)]


def test_no_events_is_pending_and_unknown():
    outcome = decide([], DAG, RUN)
    assert outcome.status is OutcomeStatus.PENDING
    assert outcome.run_state == "unknown"
    assert outcome.seq == 0 and outcome.decided_by is None


def test_running_run_is_pending():
    outcome = decide(envelopes(run_event("queued"), run_event("running"), task_event("a", "running")))
    assert outcome.status is OutcomeStatus.PENDING
    assert outcome.run_state == "running"
    assert outcome.seq == 3


def test_queued_run_reports_queued():
    assert decide(envelopes(run_event("queued"))).run_state == "queued"


def test_task_event_before_any_run_event_means_running():
    assert decide(envelopes(task_event("a", "running"))).run_state == "running"


def test_result_task_success_decides_at_once_while_run_still_runs():
    outcome = decide(envelopes(run_event("running"), result_success(value={"answer": 42}), task_event("cleanup", "running")))
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.decided_by is DecidedBy.RESULT_TASK
    assert outcome.result == {"answer": 42}
    assert outcome.result_task.task_id == "answer"
    assert outcome.decided_seq == 2
    assert outcome.run_state == "running"
    assert outcome.seq == 3


def test_result_task_null_value_is_a_result():
    outcome = decide(envelopes(result_success(value=None)))
    assert outcome.status is OutcomeStatus.SUCCESS and outcome.result is None


def test_result_reference_is_reported_as_reference():
    ref = ResultRef(dag_id=DAG, run_id=RUN, task_id="answer")
    event = task_event("answer", "success", result_task=True, result=Result(ref=ref, size=10_000_000))
    outcome = decide(envelopes(event))
    assert outcome.result_task.is_ref is True
    assert outcome.result_task.size == 10_000_000
    assert outcome.result == ref.model_dump()


def test_critical_failure_decides_at_once():
    outcome = decide(envelopes(run_event("running"), failure("extract", critical=True), task_event("teardown", "running")))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.decided_by is DecidedBy.CRITICAL_TASK
    assert outcome.failure.task_id == "extract"
    assert outcome.failure.try_number == 1
    assert outcome.failure.error == {"type": "ValueError", "message": "extract broke"}
    assert outcome.decided_seq == 2


def test_non_critical_failure_does_not_decide():
    outcome = decide(envelopes(run_event("running"), failure("side", critical=False)))
    assert outcome.status is OutcomeStatus.PENDING


def test_up_for_retry_is_not_a_failure():
    events = envelopes(
        task_event("answer", "running", result_task=True, critical=True),
        task_event("answer", "up_for_retry", result_task=True, critical=True, try_number=1, error=ErrorInfo(type="E", message="flaky")),
        result_success(try_number=2),
    )
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.result_task.try_number == 2


def test_failure_of_a_task_flagged_critical_earlier_is_critical():
    # The scheduler reports a failure with no DAG structure; the worker's running event had the flag.
    events = envelopes(task_event("load", "running", critical=True), failure("load", critical=False))
    assert decide(events).decided_by is DecidedBy.CRITICAL_TASK


def test_failure_of_a_task_flagged_result_task_earlier_is_critical():
    events = envelopes(task_event("answer", "running", result_task=True), failure("answer", critical=False))
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.FAILED and outcome.failure.task_id == "answer"


def test_run_success_without_result_task_is_success_with_null():
    outcome = decide(envelopes(run_event("running"), task_event("a", "success"), run_event("success")))
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.decided_by is DecidedBy.RUN
    assert outcome.result is None and outcome.result_task is None
    assert outcome.run_state == "success"


def test_run_success_carrying_a_result_uses_it():
    outcome = decide(envelopes(run_event("success", result=Result(value=[1, 2], size=5))))
    assert outcome.result == [1, 2]


def test_run_failed_names_first_failed_task():
    events = envelopes(
        run_event("running"),
        failure("first", critical=False),
        failure("second", critical=False),
        run_event("failed", msg="task_failure"),
    )
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.decided_by is DecidedBy.RUN
    assert outcome.failure.task_id == "first"


def test_run_failed_without_task_failure_gives_run_reason():
    # A task killed by SIGKILL fires no task hook: only the run event arrives.
    outcome = decide(envelopes(run_event("running"), run_event("failed", msg="task_failure")))
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.failure.task_id is None
    assert outcome.failure.error == {"type": "run_failed", "message": "task_failure"}


def test_all_done_leaf_run_success_after_critical_failure_stays_failed():
    events = envelopes(run_event("running"), failure("extract", critical=True), task_event("leaf", "success"), run_event("success"))
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.decided_by is DecidedBy.CRITICAL_TASK
    assert outcome.run_state == "success"  # authoritative for run_state, but the outcome never flips


def test_outcome_never_flips_after_success():
    events = envelopes(result_success(), failure("later", critical=True), run_event("failed"))
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.run_state == "failed"
    assert outcome.decided_seq == 1


def test_later_terminal_run_event_updates_run_state_only():
    outcome = decide(envelopes(run_event("success"), run_event("failed")))
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.run_state == "failed"


def test_late_running_event_does_not_reopen_run():
    outcome = decide(envelopes(run_event("success"), run_event("running")))
    assert outcome.run_state == "success"


def test_first_terminal_event_per_try_wins():
    # After the run was failed through REST, a still-running worker reported success (airflow-notes 6).
    events = envelopes(
        task_event("answer", "running", result_task=True, critical=True),
        failure("answer", critical=True),
        result_success(),
    )
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.FAILED


def test_first_terminal_per_try_ignores_contradicting_success_of_same_try_before_decision():
    events = envelopes(task_event("a", "success"), failure("a", critical=False), run_event("failed"))
    outcome = decide(events)
    assert outcome.failure.error["type"] == "run_failed"  # task a's failure was ignored: it succeeded first


def test_mapped_result_task_waits_for_run_and_orders_by_map_index():
    events = envelopes(
        result_success(value="c", map_index=2),
        result_success(value="a", map_index=0),
        result_success(value="b", map_index=1),
    )
    assert decide(events).status is OutcomeStatus.PENDING
    outcome = decide(events + [Envelope(seq=4, event=run_event("success"))])
    assert outcome.status is OutcomeStatus.SUCCESS
    assert outcome.result == ["a", "b", "c"]
    assert outcome.result_task.task_id == "answer" and outcome.result_task.map_index == -1


def test_mapped_result_duplicate_index_keeps_first_value():
    events = envelopes(
        result_success(value="first", map_index=0),
        result_success(value="second", map_index=0, try_number=2),
        run_event("success"),
    )
    assert decide(events).result == ["first"]


def test_mapped_result_task_failure_is_critical():
    events = envelopes(result_success(value="a", map_index=0), failure("answer", critical=True, map_index=1))
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.FAILED and outcome.failure.map_index == 1


def test_skipped_result_task_then_run_success_is_success_with_null():
    events = envelopes(task_event("answer", "skipped", result_task=True), run_event("success"))
    outcome = decide(events)
    assert outcome.status is OutcomeStatus.SUCCESS and outcome.result is None


def test_duplicate_envelopes_change_nothing():
    evs = envelopes(run_event("running"), failure("x", critical=False), result_success(), run_event("success"))
    assert decide(evs + evs) == decide(evs)


def test_fold_reports_the_deciding_envelope_once():
    fold = OutcomeFold(DAG, RUN)
    evs = envelopes(run_event("running"), result_success(), run_event("success"))
    assert [fold.apply(e) for e in evs] == [False, True, False]
    assert fold.apply(evs[1]) is False  # replayed


def test_fold_skips_envelopes_older_than_last_applied():
    fold = OutcomeFold(DAG, RUN)
    evs = envelopes(run_event("running"), result_success())
    fold.apply(evs[1])
    fold.apply(evs[0])
    assert fold.outcome.run_state == "running" and fold.outcome.seq == 2


SCENARIO = [
    run_event("running"),
    task_event("answer", "running", result_task=True, critical=True),
    failure("side", critical=False),
    task_event("answer", "up_for_retry", result_task=True, critical=True),
    result_success(try_number=2),
    failure("late", critical=True),
    run_event("failed"),
]


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(len(SCENARIO)))), st.lists(st.integers(0, len(SCENARIO) - 1), max_size=5))
def test_delivery_order_and_replays_do_not_matter(order, replays):
    """Envelopes are sorted by seq, so any arrival order plus replays gives the same outcome."""
    evs = envelopes(*SCENARIO)
    delivered = [evs[i] for i in order] + [evs[i] for i in replays]
    assert decide(delivered) == decide(evs)
    assert decide(evs).status is OutcomeStatus.SUCCESS


@pytest.mark.parametrize("cut", range(len(SCENARIO) + 1))
def test_once_decided_every_later_prefix_agrees(cut):
    evs = envelopes(*SCENARIO)
    prefix = decide(evs[:cut])
    full = decide(evs)
    if prefix.decided:
        assert (prefix.status, prefix.result, prefix.decided_seq) == (full.status, full.result, full.decided_seq)


@pytest.mark.parametrize("run_state", ["success", "failed"])
@pytest.mark.parametrize("task_state", ["running", "success", "failed", "up_for_retry", "skipped"])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=2)))
def test_every_single_task_state_then_run_end_is_decided(run_state, task_state, flags):
    """Exhaustive over one task's state x its flags x the run's end: the run's end always decides."""
    result_task, critical = flags
    kw = {"error": ErrorInfo(type="E", message="m")} if task_state in ("failed", "up_for_retry") else {}
    if task_state == "success" and result_task:
        kw["result"] = Result(value=1, size=1)
    task = task_event("t", task_state, result_task=result_task, critical=critical, **kw)
    outcome = decide(envelopes(task, run_event(run_state)))
    assert outcome.decided
    if task_state == "success" and result_task:
        assert (outcome.status, outcome.decided_by, outcome.result) == (OutcomeStatus.SUCCESS, DecidedBy.RESULT_TASK, 1)
    elif task_state == "failed" and (critical or result_task):
        assert (outcome.status, outcome.decided_by) == (OutcomeStatus.FAILED, DecidedBy.CRITICAL_TASK)
    elif run_state == "success":
        assert (outcome.status, outcome.decided_by) == (OutcomeStatus.SUCCESS, DecidedBy.RUN)
    else:
        assert (outcome.status, outcome.decided_by) == (OutcomeStatus.FAILED, DecidedBy.RUN)
        assert outcome.failure.task_id == ("t" if task_state == "failed" else None)


# -- open input requests (human in the loop) ----------------------------------------------------------


def asks(task_id: str = "approve", *, try_number: int = 1, map_index: int = -1, subject: str = "Ship it?", **kw) -> Event:
    request = InputRequest(kind="approval", subject=subject, options=["Approve", "Reject"], deadline="2026-01-01T00:00:00+00:00", **kw)
    return task_event(task_id, "awaiting_input", try_number=try_number, map_index=map_index, input_request=request)


def open_requests(*events: Event) -> list[tuple[str, int, int | None, str]]:
    return [(r.task_id, r.map_index, r.try_number, r.position) for r in decide(envelopes(*events)).needs_input]


# (events, the open requests after them as (task, map_index, try, position))
INPUT_TABLE = [
    pytest.param([], [], id="nothing-asked"),
    pytest.param([task_event("approve", "running"), asks()], [("approve", -1, 1, "2")], id="asked"),
    pytest.param([asks(), task_event("approve", "input_received")], [], id="cleared-by-input-received"),
    pytest.param([asks(), task_event("approve", "running")], [], id="cleared-by-running-on-resume"),
    pytest.param([asks(), task_event("approve", "success")], [], id="cleared-by-success"),
    pytest.param([asks(), failure("approve", critical=False)], [], id="cleared-by-failure"),
    pytest.param([asks(), task_event("approve", "skipped")], [], id="cleared-by-skipped"),
    pytest.param([asks(), task_event("other", "running")], [("approve", -1, 1, "1")], id="another-task-clears-nothing"),
    pytest.param([asks(), asks()], [("approve", -1, 1, "1")], id="duplicate-keeps-the-first"),
    pytest.param([asks(), task_event("approve", "input_received"), asks()], [], id="late-copy-after-the-answer-opens-nothing"),
    pytest.param(
        [asks(map_index=0), asks(map_index=1), task_event("approve", "input_received", map_index=0)],
        [("approve", 1, 1, "2")],
        id="mapped-each-its-own",
    ),
    pytest.param([asks(map_index=0), task_event("approve", "running")], [("approve", 0, 1, "1")], id="unmapped-event-leaves-mapped"),
    pytest.param(
        [asks(try_number=1), task_event("approve", "up_for_retry", try_number=1), asks(try_number=2)],
        [("approve", -1, 2, "3")],
        id="retry-asks-again",
    ),
    pytest.param([asks(try_number=1), asks(try_number=2)], [("approve", -1, 2, "2")], id="newer-try-replaces"),
    pytest.param(
        [asks(try_number=2), task_event("approve", "running", try_number=1)], [("approve", -1, 2, "1")], id="older-try-event-clears-nothing"
    ),
    pytest.param([task_event("approve", "running", try_number=2), asks(try_number=1)], [], id="older-try-ask-opens-nothing"),
    pytest.param([asks(), run_event("failed")], [], id="run-end-clears"),
    pytest.param([run_event("success"), asks()], [], id="late-ask-after-the-run-ended-opens-nothing"),
    pytest.param([asks("a"), run_event("failed"), asks("b")], [], id="nobody-can-answer-once-the-run-ended"),
    pytest.param([asks("a"), asks("b")], [("a", -1, 1, "1"), ("b", -1, 1, "2")], id="two-tasks-oldest-first"),
]


@pytest.mark.parametrize("events,expected", INPUT_TABLE)
def test_open_input_requests(events, expected):
    assert open_requests(*events) == expected


def test_an_input_request_never_decides():
    outcome = decide(envelopes(run_event("running"), asks(), asks("b", try_number=3)))
    assert outcome.status is OutcomeStatus.PENDING and outcome.run_state == "running"
    (first, _) = outcome.needs_input
    assert (first.subject, first.options, first.kind.value, first.deadline) == (
        "Ship it?",
        ["Approve", "Reject"],
        "approval",
        "2026-01-01T00:00:00+00:00",
    )


def test_a_decided_outcome_wins_over_an_open_request():
    outcome = decide(envelopes(asks("side"), result_success()))
    assert outcome.status is OutcomeStatus.SUCCESS and outcome.decided_by is DecidedBy.RESULT_TASK
    assert [r.task_id for r in outcome.needs_input] == ["side"]  # still open, but the run is decided


def test_the_fold_says_what_each_envelope_opened_and_closed():
    fold = OutcomeFold(DAG, RUN)
    first, answered = envelopes(asks(), task_event("approve", "input_received"))
    fold.apply(first)
    assert fold.opened is not None and fold.opened.position == "1" and list(fold.closed) == []
    fold.apply(first)  # a replay
    assert fold.opened is None and list(fold.closed) == []
    fold.apply(answered)
    assert fold.opened is None and [r.position for r in fold.closed] == ["1"]
    assert fold.outcome.needs_input == []


def test_an_outcome_lists_the_newest_open_requests_only_and_finds_every_one():
    # 25 mapped tasks waiting for a person: each answer body stays bounded (the newest 20 listed);
    # the oldest, unlisted, is still open and can be answered.
    fold = OutcomeFold(DAG, RUN)
    for envelope in envelopes(*(asks(map_index=i) for i in range(25))):
        fold.apply(envelope)
    listed = [r.map_index for r in fold.outcome.needs_input]
    assert listed == list(range(5, 25))
    assert fold.open_request("approve", 0) is not None and fold.open_request("approve", 0).map_index == 0
    assert fold.open_request("approve", 25) is None


# -- progress: a task's partial output never decides, opens or closes anything -------------------


def progress(task_id: str = "answer", *values, key: str | None = None) -> Event:
    items = [ProgressItem(key=key, value=v) for v in (values or ("50%",))]
    return Event(kind=EventKind.PROGRESS, dag_id=DAG, run_id=RUN, task_id=task_id, state="running", progress=Progress(items=items))


@pytest.mark.parametrize("cut", range(len(SCENARIO) + 1))
def test_progress_anywhere_changes_no_outcome(cut):
    """Progress inserted at any point of the scenario: the same outcome, decided by the same event."""
    plain = decide(envelopes(*SCENARIO))
    with_progress = decide(envelopes(*SCENARIO[:cut], progress("answer"), progress("side", key="pct"), *SCENARIO[cut:]))
    assert (with_progress.status, with_progress.result, with_progress.decided_by, with_progress.run_state) == (
        plain.status,
        plain.result,
        plain.decided_by,
        plain.run_state,
    )
    assert with_progress.seq == plain.seq + 2  # its position still moves on: it was applied


def test_progress_alone_is_pending_and_does_not_say_the_run_runs():
    fold = OutcomeFold(DAG, RUN)
    (envelope,) = envelopes(progress("answer", "a", "b"))
    assert fold.apply(envelope) is False
    assert fold.outcome.status is OutcomeStatus.PENDING and fold.outcome.run_state == "unknown" and fold.position.seq == 1


def test_progress_of_a_task_waiting_for_a_person_leaves_its_request_open():
    fold = OutcomeFold(DAG, RUN)
    for envelope in envelopes(asks(), progress("approve")):
        fold.apply(envelope)
    assert fold.opened is None and list(fold.closed) == []
    assert [r.task_id for r in fold.outcome.needs_input] == ["approve"]
