"""The outcome rules: what a run's events mean for whoever waits on it.

`decide` is one pure function over a run's envelopes. `OutcomeFold` is the same rules applied one
envelope at a time, for callers that follow a live stream; `decide` is a loop over it.

The rules, in order of precedence:
1. success as soon as the (unmapped) result task succeeds, even while other tasks still run;
2. failed as soon as a critical task fails terminally (state failed; up_for_retry is not a failure);
3. otherwise the run's terminal event decides: run success gives success, with the mapped result
   task's values ordered by map_index, or the run event's result, or null; run failed gives failed,
   naming the first terminally failed task seen, else the run's own reason;
4. the first terminal event per (task, map_index, try) wins, duplicates and replays change nothing,
   and once decided the outcome never flips.

Envelopes are taken in position order (epoch, then seq: runbell.bus.schema), so the events of a new
epoch (Redis lost the run's state and its seq started again at 1) come after the old epoch's and are
applied, not skipped as replays.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from pydantic import BaseModel

from runbell.bus.schema import LEGACY_EPOCH, Envelope, Event, EventKind, Position, Result, RunState, TaskState

UNKNOWN_RUN_STATE = "unknown"


class OutcomeStatus(str, Enum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


class DecidedBy(str, Enum):
    RESULT_TASK = "result_task"
    CRITICAL_TASK = "critical_task"
    RUN = "run"


class Failure(BaseModel):
    task_id: str | None = None
    map_index: int = -1
    try_number: int | None = None
    error: dict[str, str]


class ResultTask(BaseModel):
    task_id: str
    map_index: int = -1
    try_number: int | None = None
    is_ref: bool = False  # the value is too large for the bus: `result` holds a reference
    size: int = 0


class Outcome(BaseModel):
    dag_id: str
    run_id: str
    status: OutcomeStatus = OutcomeStatus.PENDING
    run_state: str = UNKNOWN_RUN_STATE
    epoch: str = LEGACY_EPOCH  # the epoch of seq
    seq: int = 0  # the last sequence number applied
    decided_epoch: str | None = None  # the epoch of decided_seq
    decided_seq: int | None = None  # the event that decided the outcome
    decided_by: DecidedBy | None = None
    result: Any = None
    result_task: ResultTask | None = None
    failure: Failure | None = None

    @property
    def decided(self) -> bool:
        return self.status is not OutcomeStatus.PENDING


def decide(envelopes: Iterable[Envelope], dag_id: str = "", run_id: str = "") -> Outcome:
    """The outcome of a run from its envelopes (in any order; duplicates are ignored)."""
    fold = OutcomeFold(dag_id, run_id)
    for envelope in sorted(envelopes, key=lambda e: e.position):
        fold.apply(envelope)
    return fold.outcome


class OutcomeFold:
    """The rules applied incrementally. Feed envelopes in position order; older or repeated ones are skipped."""

    def __init__(self, dag_id: str = "", run_id: str = ""):
        self.outcome = Outcome(dag_id=dag_id, run_id=run_id)
        self._terminal: dict[tuple[str, int, int | None], TaskState] = {}
        self._result_tasks: set[str] = set()  # ids flagged as the result task by any event
        self._critical_tasks: set[str] = set()  # ids flagged critical by any event (e.g. running)
        self._mapped_values: dict[int, Any] = {}
        self._mapped_task: ResultTask | None = None
        self._first_failed: Event | None = None
        self._run_terminal = False

    @property
    def position(self) -> Position:
        """The last position applied."""
        return Position(self.outcome.epoch, self.outcome.seq)

    def apply(self, envelope: Envelope) -> bool:
        """Apply one envelope. True when this envelope decided the outcome."""
        if envelope.position <= self.position:
            return False  # a replay or duplicate
        self.outcome.epoch, self.outcome.seq = envelope.position
        event = envelope.event
        if not self.outcome.dag_id:
            self.outcome.dag_id, self.outcome.run_id = event.dag_id, event.run_id
        was_decided = self.outcome.decided
        if event.kind is EventKind.RUN:
            self._apply_run(event)
        else:
            self._apply_task(event)
        if self.outcome.decided and not was_decided:
            self.outcome.decided_epoch, self.outcome.decided_seq = envelope.position
            return True
        return False

    # -- task events ----------------------------------------------------------------------------

    def _apply_task(self, event: Event) -> None:
        task_id = event.task_id or ""
        if event.result_task:
            self._result_tasks.add(task_id)
        if event.critical:
            self._critical_tasks.add(task_id)
        if self.outcome.run_state == UNKNOWN_RUN_STATE:
            self.outcome.run_state = RunState.RUNNING.value  # a task runs, so its run does
        state = event.task_state
        if not state.terminal:
            return
        key = (task_id, event.map_index, event.try_number)
        if key in self._terminal:
            return  # the first terminal event of a try wins (workers can contradict the server)
        self._terminal[key] = state
        if state is TaskState.SUCCESS and task_id in self._result_tasks:
            self._result_task_succeeded(event)
        elif state is TaskState.FAILED:
            if self._first_failed is None:
                self._first_failed = event
            if task_id in self._critical_tasks or task_id in self._result_tasks:
                self._decide_failed(event, DecidedBy.CRITICAL_TASK)

    def _result_task_succeeded(self, event: Event) -> None:
        result = event.result or Result()
        info = ResultTask(
            task_id=event.task_id or "",
            map_index=event.map_index,
            try_number=event.try_number,
            is_ref=result.is_ref,
            size=result.size,
        )
        value = result.ref.model_dump() if result.ref is not None else result.value
        if event.map_index >= 0:  # mapped: all values are known only when the run succeeds
            self._mapped_values.setdefault(event.map_index, value)
            # is_ref: any of the values is a reference (each one equal to its XCom's ResultRef).
            any_ref = info.is_ref or (self._mapped_task is not None and self._mapped_task.is_ref)
            self._mapped_task = info.model_copy(update={"map_index": -1, "try_number": None, "is_ref": any_ref})
            return
        if not self.outcome.decided:
            self.outcome.status = OutcomeStatus.SUCCESS
            self.outcome.decided_by = DecidedBy.RESULT_TASK
            self.outcome.result = value
            self.outcome.result_task = info

    # -- run events -----------------------------------------------------------------------------

    def _apply_run(self, event: Event) -> None:
        state = event.run_state
        if state.terminal:
            # The run's own terminal event is authoritative for run_state (a later REST change too).
            self.outcome.run_state = state.value
            first = not self._run_terminal
            self._run_terminal = True
            if first:
                self._run_ended(event)
        elif not self._run_terminal:
            # A late non-terminal event (a spool flushed after the end) does not reopen the run.
            self.outcome.run_state = state.value

    def _run_ended(self, event: Event) -> None:
        if self.outcome.decided:
            return
        if event.run_state is RunState.SUCCESS:
            self.outcome.status = OutcomeStatus.SUCCESS
            self.outcome.decided_by = DecidedBy.RUN
            if self._mapped_task is not None:
                self.outcome.result = [self._mapped_values[i] for i in sorted(self._mapped_values)]
                self.outcome.result_task = self._mapped_task
            elif event.result is not None:
                self.outcome.result = event.result.value
            return
        if self._first_failed is not None:
            self._decide_failed(self._first_failed, DecidedBy.RUN)
        else:
            reason = event.msg or "the run failed"
            self.outcome.status = OutcomeStatus.FAILED
            self.outcome.decided_by = DecidedBy.RUN
            self.outcome.failure = Failure(error={"type": "run_failed", "message": reason})

    def _decide_failed(self, event: Event, by: DecidedBy) -> None:
        if self.outcome.decided:
            return
        error = event.error
        self.outcome.status = OutcomeStatus.FAILED
        self.outcome.decided_by = by
        self.outcome.failure = Failure(
            task_id=event.task_id,
            map_index=event.map_index,
            try_number=event.try_number,
            error={"type": error.type, "message": error.message} if error else {"type": "unknown", "message": ""},
        )
