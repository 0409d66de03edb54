"""Metaflow runs on the bus: what the ``@runbell`` step decorator publishes, without Metaflow itself.

The decorator (``metaflow_extensions.runbell.plugins.runbell_decorator``, installed with this
distribution, enabled with ``--with runbell``) passes Metaflow's hook arguments here. Everything is
plain data so that it can be tested without Metaflow; every publish is bounded and never raises into
Metaflow (the publisher's contract), and anything else that goes wrong is logged once and dropped.

The mapping:

- flow name → ``dag_id``; Metaflow run id → ``run_id``; step name → ``task_id``;
- Metaflow's retry count (0 for the first attempt) → ``try_number`` = retry count + 1, so a first
  attempt is try 1 as in Airflow, and a failure report reads the same for both;
- the foreach position → ``map_index`` (``foreach_map_index``): -1 outside a foreach, the index in
  one foreach, and for nested foreach the indices outer first, each in an equal share of the 31 bits
  of a non-negative INTEGER (two levels: 15 bits each, ``outer << 15 | inner``; three: 10 bits
  each). The number depends only on the indices, never on how many splits a level had, so it is the
  same in every run of the same data and sorts like the index path. An index past its share (over
  32767 items in one of two levels) cannot be placed: the path is hashed instead (stable, but the
  order is lost and two paths may meet), and that is logged once.
- each event's id is derived from what it reports (run, step, Metaflow task id, retry count,
  state), so a repeated publish of the same report is dropped by the bus (publish.lua keeps ids)
  and never read as a new attempt.

What is published: a run event ``running`` when the runtime starts (``runtime_init``) and
``success``/``failed`` when it ends (``runtime_finished``); per task attempt ``running`` before the
step (``task_pre_step``) and, once the attempt is final (``task_finished``), ``success``,
``up_for_retry`` (failed, with a retry left under ``@retry``: not a failure of the run) or
``failed`` (no retry left). A failure ``@catch`` handled is a ``success`` (``msg`` says so).
The result step's success carries the result artifact's value (capped as Airflow's results are: over
the cap it is a reference to read with Metaflow's client: flow, run, step, map_index).

While an attempt runs (from ``task_pre_step`` to ``task_finished``, or the process's end) a daemon
thread sends the run's heartbeat every ``RUNBELL_METAFLOW_HEARTBEAT_SECONDS`` (default 60), as
Metaflow's own tasks do: the runs listing reads a Metaflow run whose heartbeat is older than its
cutoff (360 s) as failed, so a healthy step longer than that must keep beating, and a task killed
without a word stops. A heartbeat is no event (``Publisher.heartbeat``): it is never spooled, and one
Redis does not take in time is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runbell.bus.schema import HOST_MAX, INT_MAX, ErrorInfo, Event, EventKind, Heartbeat, Result, RunState, Source, TaskState, truncate
from runbell.listeners import partial_output
from runbell.listeners.guard import LogOnce, publish_guarded
from runbell.listeners.publisher import Publisher, make_result

log = logging.getLogger("runbell.metaflow")

RUN_TYPE = "metaflow"  # run_type of every Metaflow run's events (the runs listing tells them apart by it)
END_STEP = "end"  # Metaflow's last step: always named so
EVENT_ID_PREFIX = "mf-"
INDEX_BITS = 31  # map_index is a non-negative INTEGER: 31 bits
_HOST = socket.gethostname()[:HOST_MAX]
_log_once = LogOnce(log)
_published_runs: set[str] = set()  # ids of the run events this process published
_NOT_READ: Any = object()


@dataclass(frozen=True)
class Settings:
    """The decorator's attributes, read once."""

    result_artifact: str | None = None
    result_step: str = END_STEP
    critical: frozenset[str] = frozenset()

    @classmethod
    def from_attributes(cls, attributes: dict[str, Any]) -> Settings:
        """From Metaflow's attributes: ``critical`` is a list, or steps separated by commas or spaces
        (``--with runbell:critical=a,b`` gives the text "a,b")."""
        critical = attributes.get("critical") or ()
        if isinstance(critical, str):
            critical = critical.replace(",", " ").split()
        return cls(
            result_artifact=attributes.get("result_artifact") or None,
            result_step=str(attributes.get("result_step") or END_STEP),
            critical=frozenset(str(step) for step in critical),
        )


@dataclass
class Attempt:
    """One task attempt, as task_pre_step saw it (task_finished is told less)."""

    flow: str
    run_id: str
    step: str
    task_id: str  # Metaflow's task id: unique in its run
    retry_count: int
    max_user_code_retries: int
    map_index: int
    exception: BaseException | None = field(default=None)  # what task_exception saw, if anything
    # The result artifact as the step left it (task_post_step): by task_finished, Metaflow has moved
    # the step's own artifacts to its datastore and the flow object reads its inputs again.
    result: Any = field(default=_NOT_READ)
    beating: Beating | None = field(default=None)  # the attempt's heartbeat thread, while it runs


def foreach_map_index(stack: Sequence[tuple[int, int, Any]] | None) -> int:
    """The map_index of a task from Metaflow's ``foreach_stack()`` ((index, splits, value) per level, outer first)."""
    indices = [int(frame[0]) for frame in stack or ()]
    if not indices:
        return -1
    if len(indices) == 1 and 0 <= indices[0] <= INT_MAX:
        return indices[0]
    bits = INDEX_BITS // len(indices)
    if bits and all(0 <= i < 1 << bits for i in indices):
        value = 0
        for i in indices:
            value = value << bits | i
        return value
    _log_once("map-index", "runbell: foreach path %s does not fit map_index; publishing its hash", indices)
    return zlib.crc32(json.dumps(indices).encode()) & INT_MAX


def event_id(*parts: object) -> str:
    """The id of the event reporting these parts: the same report always gets the same id."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()
    return EVENT_ID_PREFIX + digest[:40]


# -- events ---------------------------------------------------------------------------------------


def run_event(flow: str, run_id: str, state: RunState, msg: str | None = None) -> Event:
    return Event(
        id=event_id(flow, run_id, EventKind.RUN.value, state.value),
        kind=EventKind.RUN,
        dag_id=flow,
        run_id=run_id,
        state=state.value,
        source=Source.HOOK,
        host=_HOST,
        run_type=RUN_TYPE,
        msg=truncate(msg) if msg else None,
    )


def attempt_state(attempt: Attempt, is_task_ok: bool) -> TaskState:
    """How an attempt ended: ok (also when @catch handled its exception), else failed with a retry
    left (up_for_retry: not a failure of the run), else failed."""
    if is_task_ok:
        return TaskState.SUCCESS
    if attempt.retry_count < attempt.max_user_code_retries:
        return TaskState.UP_FOR_RETRY
    return TaskState.FAILED


def task_event(
    attempt: Attempt,
    state: TaskState,
    settings: Settings,
    *,
    result: Result | None = None,
) -> Event:
    failed = state in (TaskState.FAILED, TaskState.UP_FOR_RETRY)
    caught = state is TaskState.SUCCESS and attempt.exception is not None
    is_result_step = attempt.step == settings.result_step
    return Event(
        id=event_id(attempt.flow, attempt.run_id, attempt.step, attempt.task_id, attempt.retry_count, state.value),
        kind=EventKind.TASK,
        dag_id=attempt.flow,
        run_id=attempt.run_id,
        state=state.value,
        source=Source.HOOK,
        host=_HOST,
        task_id=attempt.step,
        map_index=attempt.map_index,
        try_number=attempt.retry_count + 1,
        result_task=is_result_step,
        critical=is_result_step or attempt.step in settings.critical,
        result=result,
        error=ErrorInfo.from_exception(attempt.exception) if failed else None,
        msg=f"@catch handled {type(attempt.exception).__name__}" if caught else None,
    )


def keep_result(attempt: Attempt, settings: Settings, flow: Any) -> None:
    """After the step function returned (task_post_step): read the result artifact while it is the step's."""
    if attempt.step == settings.result_step and settings.result_artifact:
        try:
            attempt.result = getattr(flow, settings.result_artifact, None)
        except Exception as exc:  # an artifact that cannot be loaded must not fail the task
            _log_once(f"result:{type(exc).__name__}", "runbell: result artifact not read: %r", exc)


def result_of(attempt: Attempt, settings: Settings, flow: Any, publisher: Publisher) -> Result | None:
    """The result artifact's value as the result step left it (None when it has none). Without a
    value kept by task_post_step (@catch handled the step's exception) the flow's view is read."""
    if attempt.step != settings.result_step:
        return None
    value = attempt.result
    if value is _NOT_READ:
        value = getattr(flow, settings.result_artifact, None) if settings.result_artifact else None
    return make_result(
        value,
        dag_id=attempt.flow,
        run_id=attempt.run_id,
        task_id=attempt.step,
        map_index=attempt.map_index,
        max_bytes=publisher.config.result_max_bytes,
    )


# -- heartbeats -----------------------------------------------------------------------------------


class Beating:
    """A daemon thread calling ``beat`` every ``interval`` seconds until stopped (or the process ends).
    Nothing it calls may end it: a failure is logged once and the next beat tried."""

    def __init__(self, beat: Callable[[], object], interval: float):
        self.beat, self.interval = beat, interval
        self.beats = 0  # beats sent (tried), for tests and logs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runbell-heartbeat", daemon=True)

    def start(self) -> Beating:
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Stop beating; wait up to timeout for a beat under way (each is bounded by the publisher's timeouts)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                self.beats += 1
            except Exception as exc:  # a beat must never end the thread, nor reach Metaflow
                _log_once(f"heartbeat:{type(exc).__name__}", "runbell: heartbeat failed: %r", exc)


def heartbeat_of(attempt: Attempt) -> Heartbeat:
    return Heartbeat(
        dag_id=attempt.flow,
        run_id=attempt.run_id,
        task_id=attempt.step,
        map_index=attempt.map_index,
        try_number=attempt.retry_count + 1,
        ts=time.time(),
    )


def start_heartbeat(attempt: Attempt, publisher: Publisher) -> None:
    """Beat for the attempt every RUNBELL_METAFLOW_HEARTBEAT_SECONDS (none when 0 or the hook is off)."""
    interval = publisher.config.metaflow_heartbeat_seconds
    if attempt.beating is None and publisher.config.enabled and interval > 0 and attempt.flow not in publisher.config.skip_dags:
        attempt.beating = Beating(lambda: publisher.heartbeat(heartbeat_of(attempt)), interval).start()


def stop_heartbeat(attempt: Attempt, publisher: Publisher) -> None:
    if attempt.beating is not None:
        # One beat under way takes at most a lock wait and a command: two timeouts, and a margin.
        attempt.beating.stop(timeout=3 * publisher.config.timeout_seconds + 0.1)


# -- what the decorator calls ---------------------------------------------------------------------


def run_started(flow: str, run_id: str) -> None:
    _publish_run_once(flow, run_id, RunState.RUNNING)


def run_ended(flow: str, run_id: str, exception: BaseException | None) -> None:
    """The runtime ended: without an exception the end step succeeded (Metaflow checks it)."""
    if exception is None:
        _publish_run_once(flow, run_id, RunState.SUCCESS)
    else:
        _publish_run_once(flow, run_id, RunState.FAILED, f"{type(exception).__name__}: {exception}")


def _publish_run_once(flow: str, run_id: str, state: RunState, msg: str | None = None) -> None:
    """Every step's decorator is told of the run: the first publishes (the bus would drop the rest
    anyway, by id, but each would cost a round trip, or a spool file while Redis is down)."""

    def build(publisher: Publisher) -> list[Event]:
        event = run_event(flow, run_id, state, msg)
        if event.id in _published_runs:
            return []
        _published_runs.add(event.id)
        return [event]

    guarded("run", build)


def attempt_ref(attempt: Attempt) -> partial_output.TaskRef:
    """The attempt as progress() names it: the step's calls publish for it (there is no context to ask)."""
    return partial_output.TaskRef(attempt.flow, attempt.run_id, attempt.step, attempt.map_index, attempt.retry_count + 1)


def publish_started(attempt: Attempt, settings: Settings) -> None:
    partial_output.set_current(attempt_ref(attempt))

    def build(publisher: Publisher) -> list[Event]:
        start_heartbeat(attempt, publisher)
        return [task_event(attempt, TaskState.RUNNING, settings)]

    guarded("task_pre_step", build)


def publish_finished(attempt: Attempt, settings: Settings, flow: Any, is_task_ok: bool) -> None:
    def build(publisher: Publisher) -> list[Event]:
        stop_heartbeat(attempt, publisher)
        partial_output.finish(attempt_ref(attempt))  # the step's progress goes before its end
        partial_output.set_current(None)
        state = attempt_state(attempt, is_task_ok)
        result = result_of(attempt, settings, flow, publisher) if state is TaskState.SUCCESS else None
        return [task_event(attempt, state, settings, result=result)]

    guarded("task_finished", build)


def guarded(hook: str, build: Callable[[Publisher], Iterable[Event]]) -> None:
    publish_guarded(hook, build, _log_once)
