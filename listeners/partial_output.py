"""Partial output from inside a task: ``runbell.listeners.progress(value, *, key=None)``.

A running Airflow task, or a Metaflow step under ``@runbell``, publishes intermediate values for its
run: a percent, a status line, a chunk of a model's answer. They travel as ``progress`` events on the
run's stream, ordered with its other events, and never decide the run (runbell.service.core.outcome).

What is kept, and what is bounded:

- a value under a key (``key="percent"``) replaces that key's last one; a value without a key (a
  chunk) is appended to the ones before it;
- a value whose JSON (with its key) is over ``VALUE_MAX_BYTES`` is refused;
- a task attempt sends at most ``RUNBELL_PROGRESS_RATE`` events a second (default 20, with a burst
  of as many). Values offered faster wait and go out together, in the order offered, in the next
  event: of a key only its latest value (the ones it replaced are dropped), every chunk;
- what waits is bounded (``PENDING_MAX_BYTES`` of JSON, ``PROGRESS_ITEMS_MAX`` values): a value that
  does not fit is refused (nothing waiting is dropped for it), and so is one that cannot be encoded
  as JSON. Each event says in ``dropped`` how many values offered since the event before it no event
  carries (replaced or refused), so a reader knows when it has not seen them all;
- a task attempt sends at most ``MAX_EVENTS_PER_ATTEMPT`` progress events (the run's replay log keeps
  every one for its lifetime); later values are refused;
- ``progress`` never publishes itself and never waits on the network: it hands the value to a
  daemon thread of its process (a lock held for microseconds) and returns whether it was taken. The
  thread publishes with the hook's publisher, so with its bounds (timeouts, the spool);
- the task's end, published by the hook from the same process, first sends what still waits
  (``finish``, bounded by ``FINISH_SECONDS``), so a task's progress comes before its end on the stream.

Nothing here raises into the task: a call outside a task, with the hook turned off, or with a bad
key is logged once and answers False.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from runbell.bus.schema import (
    HOST_MAX,
    PROGRESS_ITEMS_MAX,
    PROGRESS_MAX_BYTES,
    Event,
    EventKind,
    Progress,
    ProgressItem,
    Source,
    TaskState,
)
from runbell.listeners.guard import LogOnce
from runbell.listeners.publisher import Publisher, default_publisher

log = logging.getLogger("runbell.progress")

VALUE_MAX_BYTES = 16 * 1024  # one value's JSON, with its key: {"key":...,"value":...}
PENDING_MAX_BYTES = PROGRESS_MAX_BYTES - 1024  # what waits to be sent fits one event, with room for the rest of it
FINISH_SECONDS = 2.0  # the longest the task's end waits for its progress to be sent
MAX_EVENTS_PER_ATTEMPT = 10_000  # progress events one task attempt sends at most (the run's replay log holds them all)
IDLE_EXIT_SECONDS = 30.0  # the sending thread ends after this long with nothing to send
_HOST = socket.gethostname()[:HOST_MAX]
_log_once = LogOnce(log)


class TaskRef(NamedTuple):
    """The task attempt a progress value belongs to."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    try_number: int | None = None


def progress_event(ref: TaskRef, progress: Progress, source: Source = Source.HOOK) -> Event:
    """The bus event carrying a task attempt's progress (its state: running)."""
    return Event(
        kind=EventKind.PROGRESS,
        dag_id=ref.dag_id,
        run_id=ref.run_id,
        state=TaskState.RUNNING.value,
        source=source,
        host=_HOST,
        task_id=ref.task_id,
        map_index=ref.map_index,
        try_number=ref.try_number,
        progress=progress,
    )


@dataclass
class _Waiting:
    """One task attempt's values not sent yet, and its share of the rate."""

    tokens: float
    refilled_at: float
    items: list[tuple[str | None, ProgressItem, int]] = field(default_factory=list)  # (key, item, bytes of its JSON)
    size: int = 0
    dropped: int = 0
    sent: int = 0  # events sent for this attempt

    def add(self, key: str | None, item: ProgressItem, size: int) -> bool:
        """Wait to be sent: of a key only the latest (the one it replaces is dropped); False when it
        does not fit (nothing waiting is dropped for it)."""
        replaced = next((index for index, (waiting_key, _, _) in enumerate(self.items) if key is not None and waiting_key == key), None)
        freed = self.items[replaced][2] if replaced is not None else 0
        count = len(self.items) - (replaced is not None)
        if self.size - freed + size > PENDING_MAX_BYTES or count >= PROGRESS_ITEMS_MAX:
            self.dropped += 1
            return False
        if replaced is not None:
            del self.items[replaced]
            self.size -= freed
            self.dropped += 1
        self.items.append((key, item, size))
        self.size += size
        return True

    def refill(self, now: float, rate: float) -> None:
        self.tokens = min(rate, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now

    def take(self) -> Progress | None:
        """What waits, as one event's progress, and nothing waiting after it (None: nothing to send).
        Each item's JSON was measured when it was taken, so the whole fits the progress bound."""
        if not self.items:
            return None
        items, dropped = [item for _, item, _ in self.items], self.dropped
        self.items, self.size, self.dropped = [], 0, 0
        self.sent += 1
        return Progress(items=items, dropped=dropped)


class ProgressSender:
    """The process's sending side: values wait per task attempt; one daemon thread sends them at the rate."""

    def __init__(self, rate: float, publisher: Callable[[], Publisher] = default_publisher, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.publisher = publisher
        self.clock = clock
        self.sent = 0  # events published (or spooled)
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()  # one batch at a time, so batches go out in the order taken
        self._waiting: dict[TaskRef, _Waiting] = {}
        self._news = False
        self._thread: threading.Thread | None = None

    def offer(self, ref: TaskRef, key: str | None, value: Any) -> bool:
        """Take one value to send (False: refused, counted in the next event's dropped). A value is
        encoded here, as the event will encode it, so one that cannot be is refused now."""
        try:
            item = ProgressItem(key=key, value=value)
            size = len(item.model_dump_json(exclude_none=True).encode("utf-8")) + 1  # and a comma
        except Exception as exc:  # not JSON-encodable (an object, bytes that are no UTF-8), or a bad key
            _log_once(f"encode:{type(exc).__name__}", "runbell: a progress value was dropped: it cannot be encoded as JSON: %r", exc)
            size = None
        with self._cond:
            waiting = self._waiting.get(ref)
            if waiting is None:
                waiting = self._waiting[ref] = _Waiting(tokens=self.rate, refilled_at=self.clock())
            if size is None or size > VALUE_MAX_BYTES:
                waiting.dropped += 1
                if size is not None:
                    _log_once("too-large", "runbell: a progress value of %d bytes of JSON was dropped (at most %d)", size, VALUE_MAX_BYTES)
                return False
            if waiting.sent >= MAX_EVENTS_PER_ATTEMPT:
                waiting.dropped += 1
                _log_once(
                    "too-many", "runbell: a task attempt sent %d progress events, the most it may; later values are dropped", waiting.sent
                )
                return False
            taken = waiting.add(key, item, size)
            self._news = True
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runbell-progress", daemon=True)
                self._thread.start()
        return taken

    def finish(self, ref: TaskRef, timeout: float = FINISH_SECONDS) -> None:
        """Send whatever the attempt has waiting now, past the rate (its end is about to be published)."""
        if not self._send_lock.acquire(timeout=timeout):
            _log_once("finish", "runbell: progress still being sent after %.1f s; the task's end goes first", timeout)
            return
        try:
            with self._cond:
                waiting = self._waiting.pop(ref, None)
                progress = waiting.take() if waiting is not None else None
            if progress is not None:
                self._publish(ref, progress)
        finally:
            self._send_lock.release()

    def finish_all(self, timeout: float = FINISH_SECONDS) -> None:
        with self._cond:
            refs = list(self._waiting)
        for ref in refs:
            self.finish(ref, timeout)

    def _run(self) -> None:
        try:
            self._send_until_idle()
        finally:  # however it ends, the next value starts a new thread
            with self._cond:
                self._thread = None

    def _send_until_idle(self) -> None:
        idle_since = self.clock()
        while True:
            ready: list[tuple[TaskRef, Progress]] = []
            pause = 1.0
            try:
                with self._send_lock:
                    with self._cond:
                        ready, pause = self._take_ready()
                    for ref, progress in ready:
                        self._publish(ref, progress)
            except Exception as exc:  # one bad batch never stops the thread: it is dropped, logged once
                _log_once(f"send:{type(exc).__name__}", "runbell: progress could not be sent: %r", exc)
            now = self.clock()
            if ready:
                idle_since = now
            with self._cond:
                if not self._news and not any(w.items for w in self._waiting.values()) and now - idle_since > IDLE_EXIT_SECONDS:
                    return
                if not self._news:
                    self._cond.wait(pause)
                self._news = False

    def _take_ready(self) -> tuple[list[tuple[TaskRef, Progress]], float]:
        """Each attempt's waiting values that its rate lets go now; and how long until the next may."""
        now, ready, pause = self.clock(), [], 1.0
        for ref, waiting in list(self._waiting.items()):
            if not waiting.items:
                if now - waiting.refilled_at > IDLE_EXIT_SECONDS:
                    del self._waiting[ref]  # an attempt long quiet (its end came from elsewhere)
                continue
            waiting.refill(now, self.rate)
            if waiting.tokens >= 1:
                waiting.tokens -= 1
                progress = waiting.take()
                if progress is not None:
                    ready.append((ref, progress))
            else:
                pause = min(pause, (1 - waiting.tokens) / self.rate)
        return ready, pause

    def _publish(self, ref: TaskRef, progress: Progress) -> None:
        try:
            self.publisher().publish(progress_event(ref, progress))
            self.sent += 1
        except Exception as exc:  # publish never raises; building the event might (a bad id)
            _log_once(f"publish:{type(exc).__name__}", "runbell: a progress event was dropped: %r", exc)


# -- the task a call comes from ---------------------------------------------------------------------

_current: TaskRef | None = None  # set by a hook that knows its task (Metaflow's decorator), else Airflow is asked


def set_current(ref: TaskRef | None) -> None:
    """The task attempt this process runs, for orchestrators without a context to ask (Metaflow)."""
    global _current
    _current = ref


def current_task() -> TaskRef | None:
    """The task attempt calling: the one set, else Airflow's current task context; None outside a task."""
    if _current is not None:
        return _current
    try:
        from airflow.sdk import get_current_context
    except ImportError:
        return None
    try:
        ti = get_current_context()["ti"]
    except Exception:  # no task runs in this process (Airflow raises outside one)
        return None
    return task_ref_of(ti)


def task_ref_of(ti: Any) -> TaskRef:
    """The attempt of an Airflow task instance (the worker's RuntimeTaskInstance)."""
    map_index = getattr(ti, "map_index", None)
    try_number = getattr(ti, "try_number", None)
    return TaskRef(
        ti.dag_id,
        ti.run_id,
        ti.task_id,
        map_index if isinstance(map_index, int) else -1,
        try_number if isinstance(try_number, int) else None,
    )


# -- the process's sender -------------------------------------------------------------------------

_sender: ProgressSender | None = None
_sender_lock = threading.Lock()


def sender() -> ProgressSender:
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = ProgressSender(default_publisher().config.progress_rate)
        return _sender


def finish(ref: TaskRef) -> None:
    """The task attempt ends: send its waiting progress first (bounded; never raises)."""
    try:
        if _sender is not None:
            _sender.finish(ref)
    except Exception as exc:
        _log_once(f"finish:{type(exc).__name__}", "runbell: waiting progress not sent: %r", exc)


def progress(value: Any, *, key: str | None = None) -> bool:
    """Publish an intermediate value of the calling task for its run (see this module's doc).

    ``key`` names what the value is the latest of ("percent", "status"); without one, the value is
    a chunk appended to the ones before it. True when the value was taken to be sent; False when it
    was refused (too large, too many waiting), or when no task is running here or the hook is off."""
    try:
        ref = current_task()
        if ref is None:
            _log_once("no-task", "runbell: progress() called outside a running task; nothing is published")
            return False
        config = default_publisher().config
        if not config.enabled or ref.dag_id in config.skip_dags:
            return False
        return sender().offer(ref, key, value)
    except Exception as exc:
        _log_once(f"progress:{type(exc).__name__}", "runbell: a progress value was dropped: %r", exc)
        return False


def emit_progress(
    dag_id: str,
    run_id: str,
    task_id: str,
    value: Any,
    *,
    key: str | None = None,
    map_index: int = -1,
    try_number: int | None = None,
    publisher: Publisher | None = None,
    source: Source = Source.EMIT,
) -> int | None:
    """Publish one progress value at once, as the hook would (for scripts, `runbell emit --progress`
    and tests). Returns its seq, or None when spooled. Raises ValueError for an invalid event."""
    publisher = publisher or default_publisher()
    ref = TaskRef(dag_id, run_id, task_id, map_index, try_number)
    return publisher.publish_or_spool(progress_event(ref, Progress(items=[ProgressItem(key=key, value=value)]), source))


def _after_fork_in_child() -> None:
    """A forked process has none of the parent's threads (nor its values to send)."""
    if _sender is not None:
        _sender._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _finish_at_exit() -> None:
    if _sender is not None:
        _sender.finish_all(timeout=FINISH_SECONDS / 2)
