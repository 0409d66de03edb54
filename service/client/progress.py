"""`runbell run`: trigger a run, show its live progress, print its outcome as JSON.

On a terminal the status block (run state, elapsed, one line per task, counts) is redrawn in place
with ANSI cursor movement; to a file or a pipe only state changes are written, one line each. The
rendering is pure (`RunView`, `render_block`, `redraw`): it is tested without a terminal.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from runbell.service.client.client import (
    RunbellClient,
    RunbellError,
    RunPending,
    SseEvent,
    Triggered,
)
from runbell.service.client.exits import (
    EXIT_FAILED,
    EXIT_PENDING,
    EXIT_SUCCESS,
    EXIT_USAGE,
)

MAX_TASK_LINES = 20  # a taller block would scroll off the terminal and break the redraw in place
TICK = 1.0  # seconds between redraws of the elapsed time on a terminal
RESULT_PREVIEW = 60  # characters of the result shown in the outcome line
DONE, ACTIVE, FAILED = ("success", "skipped"), ("running", "up_for_retry"), ("failed",)
STATE_ORDER = ("failed", "up_for_retry", "running", "success", "skipped")  # in a mapped task's summary


# -- what the events said -------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInstance:
    state: str
    try_number: int | None


@dataclass
class RunView:
    """A run as its events described it so far."""

    dag_id: str
    run_id: str
    run_state: str = "queued"
    tasks: dict[str, dict[int, TaskInstance]] = field(default_factory=dict)  # task_id -> map_index -> instance
    outcome: dict | None = None  # the outcome's body, or the pending answer at the timeout

    def apply(self, event: SseEvent) -> str | None:
        """Fold one event in. The change it made, as one line, or None when it changed nothing."""
        if event.event == "outcome":
            return self.settle(event.json())
        if event.event == "recovery":  # handed out only when the gateway could not resume where asked
            return "the stream resumed without its whole history (Redis lost events): what the gateway has follows"
        if event.event not in ("task", "run"):
            return None  # `end` follows the run's terminal event, which said it all
        data = event.json()
        if event.event == "run":
            if data["state"] == self.run_state:
                return None
            self.run_state = data["state"]
            return f"run {self.run_state}"
        map_index = data.get("map_index", -1)
        instance = TaskInstance(data["state"], data.get("try_number"))
        instances = self.tasks.setdefault(data["task_id"], {})
        if instances.get(map_index) == instance:
            return None
        instances[map_index] = instance
        error = data.get("error")
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        return f"task {task_label(data['task_id'], map_index)} {instance.state}{try_text(instance.try_number, ' (try {})')}{reason}"

    def settle(self, body: dict) -> str | None:
        """The outcome, or the pending answer at the timeout: the first one told is kept."""
        if self.outcome is not None:
            return None
        self.outcome = body
        self.run_state = body.get("run_state", self.run_state)
        return outcome_line(body)

    def counts(self) -> tuple[int, int, int]:
        """Task instances done, running (or waiting for a retry), failed."""
        states = [i.state for instances in self.tasks.values() for i in instances.values()]
        done, active, failed = (sum(s in group for s in states) for group in (DONE, ACTIVE, FAILED))
        return done, active, failed


def task_label(task_id: str, map_index: int) -> str:
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


def try_text(try_number: int | None, template: str = "try {}") -> str:
    return template.format(try_number) if try_number else ""


def outcome_line(body: dict) -> str:
    status = body.get("status")
    if status == "success":
        result = json.dumps(body.get("result"))
        preview = result if len(result) <= RESULT_PREVIEW else result[: RESULT_PREVIEW - 3] + "..."
        return f"outcome: success (decided by {body.get('decided_by')}): {preview}"
    if status == "failed":
        failure = body.get("failure") or {}
        error = failure.get("error") or {}
        where = "the run"
        if failure.get("task_id"):
            where = task_label(failure["task_id"], failure.get("map_index", -1)) + try_text(failure.get("try_number"), " (try {})")
        return f"outcome: failed in {where}: {error.get('type')}: {error.get('message')}"
    return f"still pending at the timeout (run {body.get('run_state')})"


# -- the block on a terminal ------------------------------------------------------------------------


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def task_line(task_id: str, instances: dict[int, TaskInstance], name_width: int) -> str:
    tries = [i.try_number for i in instances.values() if i.try_number]
    if list(instances) == [-1]:
        status = instances[-1].state
    else:
        states = [i.state for i in instances.values()]
        counted = ", ".join(f"{states.count(s)} {s}" for s in STATE_ORDER if s in states)
        status = f"{len(instances)} mapped: {counted}"
    return f"  {task_id:<{name_width}}  {status:<12}  {try_text(max(tries) if tries else None)}".rstrip()


def visible_tasks(view: RunView, limit: int) -> tuple[list[str], int]:
    """The tasks to list, in the order first seen, and how many are left out: finished ones go first."""
    names = list(view.tasks)
    if len(names) <= limit:
        return names, 0
    finished_first = sorted(names, key=lambda n: not all(i.state in DONE for i in view.tasks[n].values()))
    hidden = set(finished_first[: len(names) - limit])
    return [n for n in names if n not in hidden], len(hidden)


def render_block(view: RunView, elapsed: float, width: int, max_tasks: int = MAX_TASK_LINES) -> list[str]:
    """The status block: the run, one line per task, the outcome once known; each line cut to `width`."""
    done, running, failed = view.counts()
    lines = [f"{view.dag_id} {view.run_id}  {view.run_state}  {format_elapsed(elapsed)}  ({done} done, {running} running, {failed} failed)"]
    names, hidden = visible_tasks(view, max_tasks)
    name_width = max((len(n) for n in names), default=0)
    lines += [task_line(name, view.tasks[name], name_width) for name in names]
    if hidden:
        lines.append(f"  ({hidden} more finished tasks not shown)")
    if view.outcome is not None:
        lines.append(outcome_line(view.outcome))
    return [line[: max(width - 1, 1)] for line in lines]  # never the last column: the terminal would wrap


def redraw(lines: list[str], previous_height: int) -> str:
    """What to write to replace the block last drawn (`previous_height` lines, the cursor below it)."""
    up = f"\x1b[{previous_height}A" if previous_height else ""
    return up + "\r\x1b[J" + "".join(line + "\n" for line in lines)


class RunProgress:
    """Shows a run's progress on `stream` as its events come in: a block redrawn in place on a
    terminal, one line per state change elsewhere."""

    def __init__(
        self,
        stream: TextIO,
        dag_id: str,
        run_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
        max_tasks: int = MAX_TASK_LINES,
    ):
        self.stream, self.clock, self.max_tasks = stream, clock, max_tasks
        self.view = RunView(dag_id, run_id)
        self.started = clock()
        self.tty = stream.isatty()
        self.width = width or shutil.get_terminal_size().columns
        self.height = 0  # lines of the block on the terminal

    def begin(self) -> None:
        self._show(f"{self.view.dag_id} {self.view.run_id} triggered")

    def feed(self, event: SseEvent) -> None:
        self._show(self.view.apply(event))

    def finish(self, body: dict) -> None:
        """The outcome (or the pending answer at the timeout), unless the events brought it already."""
        self._show(self.view.settle(body))

    def tick(self) -> None:
        """Redraw the elapsed time (on a terminal; elsewhere only changes are written)."""
        if self.tty:
            self._redraw()

    def _show(self, change: str | None) -> None:
        if change is None:
            return
        if self.tty:
            self._redraw()
        else:
            self.stream.write(f"{format_elapsed(self.clock() - self.started)}  {change}\n")
            self.stream.flush()

    def _redraw(self) -> None:
        lines = render_block(self.view, self.clock() - self.started, self.width, self.max_tasks)
        self.stream.write(redraw(lines, self.height))
        self.stream.flush()
        self.height = len(lines)


# -- the command ------------------------------------------------------------------------------------


def run_command(
    client: RunbellClient,
    dag_id: str,
    conf: dict | None,
    timeout: float,
    stream: TextIO = sys.stderr,
    out: TextIO = sys.stdout,
    *,
    unpause: bool = False,
) -> int:
    """Trigger the run, show its progress on `stream` until its outcome or `timeout` seconds, print
    the outcome (or the pending answer) as JSON on `out`. Exit 0 success, 1 failed, 2 still pending,
    64 when the gateway refused (why, on `stream`)."""
    deadline = time.monotonic() + timeout
    try:
        # A key of our own: a POST retried after a lost answer cannot start a second run.
        triggered = client.trigger(dag_id, conf=conf, idempotency_key=uuid.uuid4().hex, unpause=unpause)
        progress = RunProgress(stream, dag_id, triggered.run_id)
        progress.begin()
        body = outcome_body(client, progress, triggered, deadline)
    except RunbellError as error:
        print(f"runbell run: {error.message} ({error.code})", file=stream)
        if error.code == "dag_paused":  # the message names the HTTP API's ?unpause=true
            print("runbell run: or run again with --unpause", file=stream)
        return EXIT_USAGE
    progress.finish(body)
    print(json.dumps(body, indent=2), file=out)
    return {"success": EXIT_SUCCESS, "failed": EXIT_FAILED}.get(body.get("status", ""), EXIT_PENDING)


def outcome_body(client: RunbellClient, progress: RunProgress, triggered: Triggered, deadline: float) -> dict:
    """From the trigger's answer, else the event stream, else the long-poll (pending at the deadline)."""
    if triggered.outcome is not None:
        return triggered.outcome.body
    followed = follow(client, progress, triggered.dag_id, triggered.run_id, deadline)
    if followed is not None:
        return followed
    try:
        return client.wait(triggered.dag_id, triggered.run_id, timeout=max(0.0, deadline - time.monotonic())).body
    except RunPending as pending:
        return pending.body


def follow(client: RunbellClient, progress: RunProgress, dag_id: str, run_id: str, deadline: float) -> dict | None:
    """Feed the run's events to the display until the outcome (its body), or None at the deadline or
    when the stream gave out. The stream is read in a thread, so the deadline and the clock keep time."""
    events: queue.Queue[SseEvent | None] = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=pump, args=(client, dag_id, run_id, events, stop), daemon=True).start()
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = events.get(timeout=min(TICK, remaining))
            except queue.Empty:
                progress.tick()
                continue
            if event is None:
                return None
            progress.feed(event)
            if event.event == "outcome":
                return event.json()
        return None
    finally:
        stop.set()


def pump(client: RunbellClient, dag_id: str, run_id: str, into: queue.Queue, stop: threading.Event) -> None:
    """Hand the run's events over until told to stop; None when the stream is over or gave out."""
    try:
        with contextlib.closing(client.events(dag_id, run_id)) as events:  # type: ignore[type-var]  # events() is a generator, which has close()
            for event in events:
                if stop.is_set():
                    return
                into.put(event)
    except Exception as error:
        # A stream that gave out leaves the answer to the long-poll that follows, which reports a
        # lasting error itself; and once stopped, the caller may close the client under this thread.
        if not isinstance(error, RunbellError) and not stop.is_set():
            raise
    finally:
        into.put(None)
