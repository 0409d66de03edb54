"""The `runbell run` display: a run's events rendered to a pipe (one line per change) and to a terminal
(a block redrawn in place), and the command against a stand-in gateway. Content, not timing."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import pytest

from runbell.service.client.client import RunbellClient, SseEvent
from runbell.service.client.progress import (
    RunProgress,
    RunView,
    format_elapsed,
    redraw,
    render_block,
    run_command,
)
from tests.conftest import TRIGGER_TOKEN
from tests.test_client import airflow, triggering_gateway  # noqa: F401  (fixtures)
from tests.test_gateway import publish, until

DAG, RUN = "etl", "manual__1"


def task(seq: int, task_id: str, state: str, try_number: int = 1, map_index: int = -1, **extra: Any) -> SseEvent:
    data = {
        "seq": seq,
        "kind": "task",
        "dag_id": DAG,
        "run_id": RUN,
        "task_id": task_id,
        "state": state,
        "map_index": map_index,
        "try_number": try_number,
        **extra,
    }
    return SseEvent("task", json.dumps(data), str(seq))


def run(seq: int, state: str) -> SseEvent:
    return SseEvent("run", json.dumps({"seq": seq, "kind": "run", "dag_id": DAG, "run_id": RUN, "state": state}), str(seq))


SUCCESS = {
    "status": "success",
    "dag_id": DAG,
    "run_id": RUN,
    "result": {"answer": 42},
    "decided_by": "result_task",
    "run_state": "running",
    "seq": 12,
    "failure": None,
    "result_task": {"task_id": "answer", "map_index": -1, "try_number": 1, "is_ref": False, "size": 13},
}
FAILED = {
    "status": "failed",
    "dag_id": DAG,
    "run_id": RUN,
    "result": None,
    "decided_by": "critical_task",
    "run_state": "running",
    "seq": 4,
    "result_task": None,
    "failure": {"task_id": "load", "map_index": 2, "try_number": 3, "error": {"type": "IOError", "message": "disk full"}},
}

EVENTS = [
    run(1, "queued"),
    run(2, "running"),
    task(3, "extract", "running"),
    task(4, "extract", "success"),
    task(5, "transform", "running", map_index=0),
    task(6, "transform", "running", map_index=1),
    task(7, "transform", "success", map_index=0),
    task(8, "load", "running"),
    task(9, "load", "up_for_retry", error={"type": "IOError", "message": "busy"}),
    task(10, "load", "running", try_number=2),
    task(10, "load", "running", try_number=2),  # a replay changes nothing
    task(11, "answer", "running"),
    task(12, "answer", "success", result_task=True),
    SseEvent("outcome", json.dumps(SUCCESS), "12"),
    SseEvent("end", json.dumps({"run_state": "success", "status": "success", "seq": 13}), "13"),
]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def show(stream: io.StringIO, events: list[SseEvent], **kw: Any) -> RunProgress:
    """Feed the events one second apart."""
    clock = Clock()
    progress = RunProgress(stream, DAG, RUN, clock=clock, **kw)
    progress.begin()
    for event in events:
        clock.now += 1
        progress.feed(event)
    return progress


# -- pure rendering ---------------------------------------------------------------------------------


def test_a_view_folds_events_and_says_what_changed():
    view = RunView(DAG, RUN)
    changes = [view.apply(event) for event in EVENTS]
    assert changes == [
        None,  # a triggered run is queued already
        "run running",
        "task extract running (try 1)",
        "task extract success (try 1)",
        "task transform[0] running (try 1)",
        "task transform[1] running (try 1)",
        "task transform[0] success (try 1)",
        "task load running (try 1)",
        "task load up_for_retry (try 1): IOError: busy",
        "task load running (try 2)",
        None,
        "task answer running (try 1)",
        "task answer success (try 1)",
        'outcome: success (decided by result_task): {"answer": 42}',
        None,
    ]
    assert view.counts() == (3, 2, 0)
    assert view.settle({"status": "pending", "run_state": "running"}) is None  # the first outcome told is kept


def test_the_block_has_the_run_one_line_per_task_and_the_outcome():
    view = RunView(DAG, RUN)
    for event in EVENTS:
        view.apply(event)
    assert render_block(view, 75, width=80) == [
        "etl manual__1  running  1:15  (3 done, 2 running, 0 failed)",
        "  extract    success       try 1",
        "  transform  2 mapped: 1 running, 1 success  try 1",
        "  load       running       try 2",
        "  answer     success       try 1",
        'outcome: success (decided by result_task): {"answer": 42}',
    ]


def test_the_block_fits_the_terminal():
    view = RunView(DAG, RUN)
    view.apply(task(1, "a" * 100, "failed", error={"type": "E", "message": "m"}))
    for seq in range(2, 8):
        view.apply(task(seq, f"t{seq}", "success" if seq < 6 else "running"))
    lines = render_block(view, 0, width=40, max_tasks=4)
    assert all(len(line) <= 39 for line in lines)
    names = [line.split()[0] for line in lines[1:5]]
    assert names[0].startswith("aaa") and names[1:] == ["t5", "t6", "t7"]  # finished tasks give way first
    assert lines[5] == "  (3 more finished tasks not shown)"


def test_a_failure_and_a_timeout_read_plainly():
    view = RunView(DAG, RUN)
    assert view.apply(SseEvent("outcome", json.dumps(FAILED), "4")) == "outcome: failed in load[2] (try 3): IOError: disk full"
    assert RunView(DAG, RUN).settle({"status": "pending", "run_state": "queued"}) == "still pending at the timeout (run queued)"
    recovery = SseEvent("recovery", json.dumps({"recovered": False, "from": "0"}))
    assert RunView(DAG, RUN).apply(recovery).startswith("the stream resumed without its whole history")
    assert [format_elapsed(s) for s in (0, 59.9, 61, 3725)] == ["0:00", "0:59", "1:01", "1:02:05"]


def test_redraw_moves_up_over_the_last_block_and_clears_it():
    assert redraw(["a", "b"], 0) == "\r\x1b[Ja\nb\n"
    assert redraw(["a"], 2) == "\x1b[2A\r\x1b[Ja\n"


# -- the display on a stream ------------------------------------------------------------------------


def test_to_a_pipe_each_change_is_one_line():
    stream = io.StringIO()
    show(stream, EVENTS)
    assert stream.getvalue().splitlines() == [
        "0:00  etl manual__1 triggered",
        "0:02  run running",
        "0:03  task extract running (try 1)",
        "0:04  task extract success (try 1)",
        "0:05  task transform[0] running (try 1)",
        "0:06  task transform[1] running (try 1)",
        "0:07  task transform[0] success (try 1)",
        "0:08  task load running (try 1)",
        "0:09  task load up_for_retry (try 1): IOError: busy",
        "0:10  task load running (try 2)",
        "0:12  task answer running (try 1)",
        "0:13  task answer success (try 1)",
        '0:14  outcome: success (decided by result_task): {"answer": 42}',
    ]
    assert "\x1b" not in stream.getvalue()


def test_on_a_terminal_the_block_is_redrawn_in_place():
    terminal = Terminal()
    progress = show(terminal, EVENTS, width=80)
    progress.tick()
    frames = terminal.getvalue().split("\r\x1b[J")
    assert frames[0] == ""
    for before, _after in zip(frames[1:], frames[2:]):  # each frame climbs exactly over the one before
        lines, up = before.rsplit("\n", 1)
        assert up == f"\x1b[{len(lines.splitlines())}A"
    assert frames[-1].splitlines() == [
        "etl manual__1  running  0:15  (3 done, 2 running, 0 failed)",
        "  extract    success       try 1",
        "  transform  2 mapped: 1 running, 1 success  try 1",
        "  load       running       try 2",
        "  answer     success       try 1",
        'outcome: success (decided by result_task): {"answer": 42}',
    ]
    assert len(frames) == 1 + 1 + 12 + 1  # begin, each change, the tick


# -- the command against a stand-in gateway -------------------------------------------------------


def stand_in(events: list[SseEvent] | None, post: httpx.Response | None = None, result: dict | None = None):
    """POST answers 202 (or `post`); the events endpoint streams `events` (204 when None); the result
    endpoint answers `result` (202 pending when None)."""
    pending = {"status": "pending", "dag_id": DAG, "run_id": RUN, "run_state": "queued", "seq": 1}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return post or httpx.Response(202, json={**pending, "token": "t.o.k", "token_expires_at": "2030-01-01T00:00:00+00:00"})
        if request.url.path.endswith("/events"):
            if events is None:
                return httpx.Response(204)
            text = "".join(f"event: {e.event}\nid: {e.id}\ndata: {e.data}\n\n" for e in events)
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())
        return httpx.Response(200, json=result) if result else httpx.Response(202, json=pending, headers={"Retry-After": "1"})

    return RunbellClient("http://gw", "publish-token", transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    "events, code, status",
    [
        (EVENTS, 0, "success"),
        (
            [run(1, "queued"), task(2, "load", "failed", map_index=2, try_number=3), SseEvent("outcome", json.dumps(FAILED), "2")],
            1,
            "failed",
        ),
    ],
)
def test_run_command_follows_the_run_and_prints_its_outcome(events, code, status):
    stream, out = io.StringIO(), io.StringIO()
    with stand_in(events) as client:
        assert run_command(client, DAG, {"rows": 3}, timeout=30, stream=stream, out=out) == code
    assert json.loads(out.getvalue())["status"] == status
    changes = [line.split("  ", 1)[1] for line in stream.getvalue().splitlines()]  # without the elapsed time
    assert changes[0] == "etl manual__1 triggered" and changes[-1].startswith(f"outcome: {status}")


def test_run_command_on_a_terminal_ends_with_the_block_and_the_outcome():
    terminal, out = Terminal(), io.StringIO()
    with stand_in(EVENTS) as client:
        assert run_command(client, DAG, None, timeout=30, stream=terminal, out=out) == 0
    last = terminal.getvalue().split("\r\x1b[J")[-1].splitlines()
    assert last[0].startswith("etl manual__1  running") and last[-1].startswith("outcome: success")
    assert json.loads(out.getvalue()) == SUCCESS


def test_run_command_prints_the_pending_answer_at_its_timeout():
    stream, out = io.StringIO(), io.StringIO()
    with stand_in(None) as client:
        assert run_command(client, DAG, None, timeout=0.3, stream=stream, out=out) == 2
    assert json.loads(out.getvalue()) == {"status": "pending", "dag_id": DAG, "run_id": RUN, "run_state": "queued", "seq": 1}
    assert stream.getvalue().splitlines()[-1].endswith("still pending at the timeout (run queued)")


def test_run_command_takes_the_outcome_from_the_long_poll_when_the_stream_has_none():
    stream, out = io.StringIO(), io.StringIO()
    with stand_in(None, result=FAILED) as client:
        assert run_command(client, DAG, None, timeout=30, stream=stream, out=out) == 1
    assert json.loads(out.getvalue()) == FAILED


def test_run_command_reports_a_refusal():
    stream, out = io.StringIO(), io.StringIO()
    refusal = httpx.Response(404, json={"error": "unknown_dag", "message": "no DAG 'etl' in Airflow"})
    with stand_in(None, post=refusal) as client:
        assert run_command(client, DAG, None, timeout=30, stream=stream, out=out) == 64
    assert stream.getvalue() == "runbell run: no DAG 'etl' in Airflow (unknown_dag)\n" and out.getvalue() == ""


async def test_run_command_against_the_gateway(triggering_gateway, airflow):
    gateway, stream, out = triggering_gateway, io.StringIO(), io.StringIO()

    def command() -> int:
        with RunbellClient(gateway.url, TRIGGER_TOKEN) as client:
            return run_command(client, "etl", {"rows": 3}, timeout=20, stream=stream, out=out)

    done = asyncio.create_task(asyncio.to_thread(command))
    await until(lambda: airflow.runs)
    ((_, run_id),) = airflow.runs
    # Following the events: an SSE client (the trigger's own wait=0 read is a subscriber too, and an
    # event published while it reads would decide the run in the trigger's answer instead).
    await until(lambda: gateway.app.state.metrics.sse_clients._value.get() >= 1)
    await publish(gateway, run_id, "running")
    await publish(gateway, run_id, "running", task_id="answer", result_task=True)
    await publish(gateway, run_id, "success", task_id="answer", result_task=True, result={"answer": 42})
    assert await done == 0
    changes = [line.split("  ", 1)[1] for line in stream.getvalue().splitlines()]
    assert changes == [
        f"etl {run_id} triggered",
        "run running",
        "task answer running",
        "task answer success",
        'outcome: success (decided by result_task): {"answer": 42}',
    ]
    assert json.loads(out.getvalue())["result"] == {"answer": 42} and airflow.posts[0]["conf"] == {"rows": 3}
