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
   and once decided the outcome never flips;
5. a progress event (a task's partial output) changes nothing but the position applied.

Beside the outcome, the fold keeps the run's open input requests (`needs_input`: tasks of Airflow's
human-in-the-loop operators waiting for a person). They never decide anything. A request opens with
a task's awaiting_input event, once per (task, map_index, try): a duplicate, or a late copy after it
was answered, opens nothing. It closes with the gateway's input_received (an answer it passed on),
with any later event of the same task instance from the same try or a newer one (running when it
resumes: answered in Airflow's UI, or the deadline's defaults taken), or with the run's end.

Envelopes are taken in position order (epoch, then seq: runbell.bus.schema), so the events of a new
epoch (Redis lost the run's state and its seq started again at 1) come after the old epoch's and are
applied, not skipped as replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from runbell.bus.schema import LEGACY_EPOCH, Envelope, Event, EventKind, InputRequest, Position, Result, RunState, TaskState

UNKNOWN_RUN_STATE = "unknown"


NEEDS_INPUT_LISTED = 20  # open input requests an outcome lists, the newest (each is at most ~48 KiB)


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


class InputNeeded(InputRequest):
    """An open input request: which task instance asks, at which position (EPOCH-SEQ), and what."""

    task_id: str
    map_index: int = -1
    try_number: int | None = None
    position: str  # the awaiting_input event's position (an SSE id; pass it as after=)

    @property
    def key(self) -> tuple[str, int]:
        return self.task_id, self.map_index


def respond_path(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The gateway's path that answers a task instance's request (POST, role respond)."""
    path = f"/v1/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id, safe='')}/input"
    return path if map_index < 0 else f"{path}?map_index={map_index}"


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
    needs_input: list[InputNeeded] = []  # the newest NEEDS_INPUT_LISTED open input requests, oldest first; they never decide the run

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
        # Dicts as sets (the values unused): an empty dict is 64 bytes, an empty set 216, and a gateway
        # holds a fold per connected caller.
        self._result_tasks: dict[str, None] = {}  # ids flagged as the result task by any event
        self._critical_tasks: dict[str, None] = {}  # ids flagged critical by any event (e.g. running)
        self._mapped_values: dict[int, Any] = {}
        self._mapped_task: ResultTask | None = None
        self._first_failed: Event | None = None
        self._run_terminal = False
        self._asked: dict[tuple[str, int, int | None], None] = {}  # (task, map_index, try) that asked once
        self._newest_try: dict[tuple[str, int], int] = {}  # per task instance, the newest try seen
        # The open requests by task instance (at most one each), in the order they were asked: a run
        # with a thousand mapped HITL tasks would otherwise scan every open request on every event.
        self._open: dict[tuple[str, int], InputNeeded] = {}
        self.opened: InputNeeded | None = None  # the request the last envelope applied opened
        self.closed: Sequence[InputNeeded] = ()  # the requests it closed

    @property
    def position(self) -> Position:
        """The last position applied."""
        return Position(self.outcome.epoch, self.outcome.seq)

    def apply(self, envelope: Envelope) -> bool:
        """Apply one envelope. True when this envelope decided the outcome."""
        self.opened, self.closed = None, ()  # no new list per envelope: this runs per caller per event
        if envelope.position <= self.position:
            return False  # a replay or duplicate
        self.outcome.epoch, self.outcome.seq = envelope.position
        event = envelope.event
        if not self.outcome.dag_id:
            self.outcome.dag_id, self.outcome.run_id = event.dag_id, event.run_id
        if event.kind is EventKind.PROGRESS:
            return False  # a task's partial output: it decides, opens and closes nothing
        was_decided = self.outcome.decided
        if event.kind is EventKind.RUN:
            self._apply_run(event)
        else:
            self._apply_task(event)
            self._track_input(envelope)
        if self.outcome.decided and not was_decided:
            self.outcome.decided_epoch, self.outcome.decided_seq = envelope.position
            return True
        return False

    # -- task events ----------------------------------------------------------------------------

    def _apply_task(self, event: Event) -> None:
        task_id = event.task_id or ""
        if event.result_task:
            self._result_tasks[task_id] = None
        if event.critical:
            self._critical_tasks[task_id] = None
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

    def _track_input(self, envelope: Envelope) -> None:
        event = envelope.event
        key = (event.task_id or "", event.map_index)
        newest = self._newest_try.get(key)
        if event.try_number is not None and (newest is None or event.try_number > newest):
            self._newest_try[key] = event.try_number
        if event.state == TaskState.AWAITING_INPUT.value and event.input_request is not None:
            asked = (*key, event.try_number)
            # After the run's end nobody can answer: a late copy (a worker's spool flushed) opens nothing.
            if (
                self._run_terminal
                or asked in self._asked
                or (event.try_number is not None and newest is not None and event.try_number < newest)
            ):
                return  # a duplicate, a late copy of a request already answered, or an older try's
            self._asked[asked] = None
            self._close(key, event.try_number)  # an older try's request, never answered
            self.opened = InputNeeded(
                **event.input_request.model_dump(),
                task_id=key[0],
                map_index=key[1],
                try_number=event.try_number,
                position=str(envelope.position),
            )
            self._open[key] = self.opened
            self.outcome.needs_input = self._listed()
            return
        self._close(key, event.try_number)

    def _close(self, key: tuple[str, int], try_number: int | None) -> None:
        """Close the task instance's open request, unless the event is of an older try than the request's."""
        request = self._open.get(key)
        if request is not None and (try_number is None or request.try_number is None or try_number >= request.try_number):
            self.closed = [*self.closed, self._open.pop(key)]
            self.outcome.needs_input = self._listed()

    def _listed(self) -> list[InputNeeded]:
        """What an answer lists of the open requests: the newest NEEDS_INPUT_LISTED, so that a run with
        thousands of mapped tasks waiting for a person keeps its answers bounded (each request went out
        as its own SSE event and webhook; an answer to any open one is taken, see open_request)."""
        return list(self._open.values())[-NEEDS_INPUT_LISTED:]

    def open_request(self, task_id: str, map_index: int) -> InputNeeded | None:
        """The task instance's open request, listed or not."""
        return self._open.get((task_id, map_index))

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
            self.closed, self.outcome.needs_input = self.outcome.needs_input, []  # nobody can answer now
            self._open.clear()
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
