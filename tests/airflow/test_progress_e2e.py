"""Partial output on a real Airflow, into a real browser: a task streams 200 chunks with
runbell.listeners.progress; an EventSource in Chromium, opened on a real `runbell serve` before the run
is triggered, gets every chunk in order, once, and then the result.

The task-to-browser latency of each chunk (the task's time.time() when it offered it, against the
browser's Date.now() when its event arrived: one machine, one clock) is printed as a
`[progress latency airflow-V]` line (pytest -s), never asserted.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import pytest

from tests.browser.conftest import browser  # noqa: F401  # the fixture: a real headless Chromium

pytestmark = pytest.mark.airflow

DAG = "rb_progress"
CHUNKS = 200  # as the DAG streams
RUN_SECONDS = 120.0

LISTEN = """
window.got = {chunks: [], percent: null, events: [], outcome: null, ended: false, errors: 0};
const es = new EventSource(arguments[0]);
es.addEventListener("progress", (e) => {
  const at = Date.now() / 1000;
  const data = JSON.parse(e.data);
  window.got.events.push({kind: "progress", seq: data.seq, id: e.lastEventId});
  for (const item of data.progress.items) {
    if (item.key === "percent") window.got.percent = item.value;
    else if (item.key === undefined) window.got.chunks.push({...item.value, received_at: at});
  }
});
for (const kind of ["task", "run"]) es.addEventListener(kind, (e) => {
  const data = JSON.parse(e.data);
  window.got.events.push({kind, seq: data.seq, state: data.state, id: e.lastEventId});
});
es.addEventListener("outcome", (e) => {
  window.got.outcome = JSON.parse(e.data);
  window.got.events.push({kind: "outcome", seq: window.got.outcome.seq});
});
es.addEventListener("end", () => { window.got.ended = true; es.close(); });
es.addEventListener("error", () => { window.got.errors += 1; });
"""


def wait_until(driver, script: str, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not within {seconds} s: {what} (last: {value!r})")


def test_a_browser_gets_every_chunk_of_a_streaming_task_in_order_then_the_result(airflow: Any, gateway: str, browser) -> None:  # noqa: F811
    airflow.unpause(DAG)
    run_id = f"e2e__{uuid.uuid4().hex[:12]}"
    browser.get(f"{gateway}/healthz")  # a page of the gateway's origin
    browser.execute_script(LISTEN, f"/v1/dags/{DAG}/runs/{run_id}/events")
    wait_until(browser, "window.got.errors === 0 && performance.now() > 0", 5, "the stream opened")
    airflow.trigger(DAG, run_id=run_id)  # the stream waits for a run not seen yet
    wait_until(browser, "window.got.ended", RUN_SECONDS, "the run's end")
    got = browser.execute_script("return window.got;")

    chunks = got["chunks"]
    assert [c["i"] for c in chunks] == list(range(CHUNKS)), "every chunk, in order, once"
    assert got["percent"] == 100
    outcome = got["outcome"]
    assert outcome is not None and outcome["status"] == "success" and outcome["decided_by"] == "result_task"
    assert outcome["result"] == "".join(c["text"] for c in chunks)
    kinds = [e["kind"] for e in got["events"]]
    assert kinds.index("outcome") > max(i for i, kind in enumerate(kinds) if kind == "progress"), "the result after the last chunk"
    seqs = [e["seq"] for e in got["events"] if e["kind"] != "outcome"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "no event twice, none out of order"

    latencies_ms = sorted(1000 * (c["received_at"] - c["offered_at"]) for c in chunks)
    p50 = statistics.median(latencies_ms)
    p99 = latencies_ms[min(len(latencies_ms) - 1, round(0.99 * len(latencies_ms)))]
    events = kinds.count("progress")
    print(
        f"\n[progress latency airflow-{airflow.version}] {CHUNKS} chunks (and {CHUNKS} percent values) in {events} progress events: "
        f"task call to browser p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies_ms[-1]:.1f} ms"
    )
