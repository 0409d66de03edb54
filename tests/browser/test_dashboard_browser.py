"""The dashboard in a real headless Chromium against a real `runbell serve`.

Events are published the way the hook publishes them (runbell.listeners.publisher into the gateway's
namespace); the page must show them: runs appear in the table (the README's screenshot,
tests/browser/dashboard.png, is taken here), the run view's tasks and outcome
change live, a reload shows the same, and after the gateway is stopped (SIGTERM, then SIGKILL) and
started again on the same port the page carries on by itself, every event shown exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from runbell.bus.schema import Event, EventKind
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from tests.browser.conftest import read_console, save_screenshot

WAIT_SECONDS = 20  # the longest any one change may take to show
README_SCREENSHOT = Path(__file__).resolve().parent / "dashboard.png"  # the README shows it; committed


@pytest.fixture
def publisher(redis_url, namespace, tmp_path):
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "pub-spool"))


def wait_for(driver, script: str, expected=lambda value: bool(value), what: str = "", seconds: float = WAIT_SECONDS):
    """Poll a JavaScript expression until `expected(value)`; fail naming what did not happen."""
    deadline = time.monotonic() + seconds
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if expected(value):
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {seconds} s: {what or script} (last value: {value!r})")


def shown_seqs(driver) -> list[int]:
    return driver.execute_script("return [...document.querySelectorAll('#events li')].map(li => Number(li.dataset.seq));")


def wait_for_seqs(driver, last: int, what: str) -> None:
    """The event log shows 1..last, each exactly once, in order."""
    expected = list(range(1, last + 1))
    wait_for(
        driver,
        "[...document.querySelectorAll('#events li')].map(li => Number(li.dataset.seq))",
        lambda seqs: seqs == expected or (len(seqs) > len(expected)),
        what,
    )
    assert shown_seqs(driver) == expected, f"{what}: events shown {shown_seqs(driver)}"


def task_state(driver, task_id: str) -> str:
    return driver.execute_script(
        "const tr = document.querySelector(`#tasks tr[data-task='${arguments[0]}']`); return tr && tr.dataset.state;", task_id
    )


def runs_shown(driver) -> list[tuple[str, str, str]]:
    return [
        tuple(row)
        for row in driver.execute_script(
            "return [...document.querySelectorAll('#runs tbody tr')].map(tr => [tr.dataset.dag, tr.dataset.run, tr.dataset.state]);"
        )
    ]


def conn_state(driver) -> str:
    return driver.execute_script("return document.getElementById('conn').dataset.state;")


@contextlib.contextmanager
def answering(port: int, status: int):
    """Something other than the gateway on its port, answering every request with `status`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def stats(driver) -> dict:
    """What the page's live streams did: opened, reopened (after a drop), recovered (by the page), duplicates."""
    return driver.execute_script("return window.runbellStats;")


def screenshot(driver, name: str) -> Path:
    path = save_screenshot(driver, name)
    print(f"\nscreenshot: {path}")
    return path


def no_script_errors(driver) -> None:
    """The page threw nothing (refused connections while the gateway is down are expected)."""
    read_console(driver)
    errors = [
        e
        for e in driver.console
        if e.get("level") == "SEVERE" and e.get("source") != "network" and "ERR_CONNECTION_REFUSED" not in e.get("message", "")
    ]
    assert not errors, errors


def test_runs_appear_and_a_run_goes_live_through_reload_and_restarts(browser, served_gateway, publisher):
    gateway = served_gateway()
    emit("etl", "r1", "queued", publisher=publisher)
    emit("etl", "r1", "running", publisher=publisher)
    emit("etl", "r1", "running", task_id="extract", try_number=1, publisher=publisher)
    emit("etl", "bad", "running", publisher=publisher)
    emit(
        "etl",
        "bad",
        "failed",
        task_id="load",
        try_number=2,
        critical=True,
        error="no such table: orders",
        error_type="OperationalError",
        publisher=publisher,
    )

    browser.get(gateway.url + "/")
    wait_for(browser, "document.querySelectorAll('#runs tbody tr').length", lambda n: n == 2, "both runs listed")
    assert set(runs_shown(browser)) == {("etl", "r1", "running"), ("etl", "bad", "running")}

    # Filter chips: multi-select, reflected in the address as ?status=a,b.
    browser.find_element("css selector", "#status-chips [data-status='failed']").click()
    wait_for(browser, "location.hash", lambda h: h == "#/?status=failed", "the failed chip in the address")
    wait_for(
        browser,
        "document.querySelector('#runs-status').textContent",
        lambda t: t == "No runs match.",
        "no failed run yet (the failure was critical, the run has not ended)",
    )
    browser.find_element("css selector", "#status-chips [data-status='running']").click()
    wait_for(browser, "location.hash", lambda h: h == "#/?status=running,failed", "two chips")
    wait_for(browser, "document.querySelectorAll('#runs tbody tr').length", lambda n: n == 2, "running or failed")
    emit("etl", "late", "queued", publisher=publisher)  # a new run shows up without a reload...
    browser.find_element("css selector", "#status-chips [data-status='queued']").click()
    wait_for(
        browser,
        "[...document.querySelectorAll('#runs tbody tr')].map(tr => tr.dataset.run).join()",
        lambda runs: "late" in runs.split(","),
        "a queued run under the queued chip",
    )
    emit("etl", "late2", "queued", publisher=publisher)  # ...and without touching anything
    wait_for(
        browser,
        "[...document.querySelectorAll('#runs tbody tr')].map(tr => tr.dataset.run).join()",
        lambda runs: "late2" in runs.split(","),
        "a run published while the table is open",
    )
    taken = screenshot(browser, "dashboard.png")
    if os.environ.get("RUNBELL_UPDATE_SCREENSHOT") or not README_SCREENSHOT.exists():
        # Only when asked: every run's timestamps differ, and a test run should not dirty the tree.
        shutil.copy(taken, README_SCREENSHOT)

    # A row opens the run view; what happened so far is replayed.
    browser.find_element("css selector", "#runs tbody tr[data-run='r1']").click()
    wait_for(browser, "location.hash", lambda h: h == "#/runs/etl/r1", "the run view's address")
    wait_for_seqs(browser, 3, "the run's history")
    assert task_state(browser, "extract") == "running"
    assert browser.execute_script("return document.getElementById('outcome').dataset.status") == "pending"
    wait_for(browser, "document.getElementById('conn').dataset.state", lambda s: s == "live", "the stream open")

    # Live: each event shows as it is published.
    emit("etl", "r1", "success", task_id="extract", try_number=1, publisher=publisher)
    emit("etl", "r1", "running", task_id="answer", try_number=1, publisher=publisher)
    wait_for_seqs(browser, 5, "two live events")
    assert task_state(browser, "extract") == "success" and task_state(browser, "answer") == "running"

    # A reload shows the same, once.
    browser.refresh()
    wait_for_seqs(browser, 5, "after a reload")
    wait_for(browser, "document.getElementById('conn').dataset.state", lambda s: s == "live", "the stream open again")

    # SIGTERM: the gateway says shutdown; the outcome is published while it is away.
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    wait_for(
        browser,
        "document.getElementById('conn').dataset.state",
        lambda s: s in ("reconnecting", "connecting"),
        "the page notices the gateway went away",
    )
    result = {"answer": 42, "rows": [1, 2, 3], "note": "näive <b>not html</b>"}
    emit("etl", "r1", "success", task_id="answer", try_number=1, result_task=True, result=result, publisher=publisher)
    gateway.start()
    wait_for_seqs(browser, 6, "the event published while the gateway was down, after the restart")
    assert stats(browser)["reopened"] >= 1  # the same page reconnected (no reload)
    wait_for(browser, "document.getElementById('outcome').dataset.status", lambda s: s == "success", "the outcome")
    shown = json.loads(browser.find_element("id", "result").text)
    assert shown == result
    assert browser.find_element("id", "result").text == json.dumps(result, indent=2, ensure_ascii=False)  # pretty
    assert browser.find_element("id", "result-task").text == "answer"

    # SIGKILL: no goodbye at all. While it is away something else answers 503 on its port (a proxy
    # would): the browser gives up on the stream for good, so the page must start a new one itself.
    before = stats(browser)
    gateway.stop(signal.SIGKILL)
    emit("etl", "r1", "running", task_id="cleanup", try_number=1, publisher=publisher)
    with answering(gateway.port, 503):
        wait_for(browser, "window.runbellStats.recovered", lambda n: n > before["recovered"], "the page takes over from the browser")
    gateway.start()
    wait_for_seqs(browser, 7, "after a SIGKILL and a restart")
    assert stats(browser)["reopened"] > before["reopened"]
    emit("etl", "r1", "success", task_id="cleanup", try_number=1, publisher=publisher)
    emit("etl", "r1", "success", publisher=publisher)
    wait_for_seqs(browser, 9, "the run's end")
    wait_for(browser, "document.getElementById('conn').dataset.state", lambda s: s == "ended", "the stream closed after end")
    assert browser.execute_script("return document.querySelector('#run-state .badge').dataset.state") == "success"
    assert task_state(browser, "cleanup") == "success"
    time.sleep(1)  # nothing arrives twice afterwards
    assert shown_seqs(browser) == list(range(1, 10))
    screenshot(browser, "dashboard-run.png")
    print(f"live stream of the run: {stats(browser)}")

    # The failed run names its failing task and message.
    browser.get(gateway.url + "/#/runs/etl/bad")
    wait_for(browser, "document.getElementById('outcome').dataset.status", lambda s: s == "failed", "the failure")
    assert browser.find_element("id", "failed-task").text == "load"
    assert browser.find_element("id", "failure").text == "OperationalError: no such table: orders"
    screenshot(browser, "dashboard-failed.png")
    no_script_errors(browser)


def publish_runs(publisher, dag_id: str, numbers) -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for n in numbers:
        when = (start + timedelta(hours=n)).isoformat()
        publisher.publish(
            Event(
                kind=EventKind.RUN,
                dag_id=dag_id,
                run_id=f"m{n:03d}",
                state="success",
                run_type="scheduled",
                logical_date=when,
                run_after=when,
            )
        )


def wait_recorded(url: str, dag_id: str, count: int) -> None:
    """The gateway's store holds `count` runs of the DAG (the recorder writes it shortly after)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if len(httpx.get(url + "/v1/runs", params={"dag_id": dag_id, "limit": 500}, timeout=5).json()["runs"]) == count:
            return
        time.sleep(0.1)
    pytest.fail(f"the gateway did not record {count} runs of {dag_id} within {WAIT_SECONDS} s")


def scroll_until(driver, count: int) -> list[str]:
    """Scroll to the end of the table until it holds `count` runs; never a run twice on the way."""
    deadline = time.monotonic() + WAIT_SECONDS
    runs: list[str] = []
    while time.monotonic() < deadline:
        runs = [run for _, run, _ in runs_shown(driver)]
        assert len(runs) == len(set(runs)), f"a run shown twice: {runs}"
        if len(runs) == count:
            return runs
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        time.sleep(0.2)
    pytest.fail(f"the table did not reach {count} runs within {WAIT_SECONDS} s (it shows {len(runs)})")


def test_infinite_scroll_pages_through_the_cursor(browser, served_gateway, publisher):
    gateway = served_gateway()
    publish_runs(publisher, "many", range(60))
    emit("other", "x", "running", publisher=publisher)
    wait_recorded(gateway.url, "many", 60)
    browser.get(gateway.url + "/#/?dag_id=many")
    wait_for(browser, "document.querySelectorAll('#runs tbody tr').length", lambda n: n == 50, "the first page only")
    assert scroll_until(browser, 60) == [f"m{n:03d}" for n in reversed(range(60))]  # newest first, none of "other"

    # More new runs than a page while scrolled down: the refresh brings them in, with no gap.
    publish_runs(publisher, "many", range(60, 120))
    wait_recorded(gateway.url, "many", 120)
    assert scroll_until(browser, 120) == [f"m{n:03d}" for n in reversed(range(120))]
    wait_for(browser, "document.querySelector('#runs-status').textContent", lambda t: t == "120 runs", "the end of the list")
    no_script_errors(browser)


def airflow_backfill_db(path: Path, dag_id: str, slots: list[tuple[int, str, str | None]]) -> int:
    """Airflow's backfill tables in a SQLite file, as Airflow fills them: (ordinal, day, skip reason)."""
    from sqlalchemy import create_engine, insert

    from runbell.service.http.backfills import (
        _airflow,
        backfill_dag_run_table,
        backfill_table,
        dag_run_table,
    )

    engine = create_engine(f"sqlite:///{path}")
    _airflow.create_all(engine)
    with engine.begin() as conn:
        backfill_id = conn.execute(insert(backfill_table).values(dag_id=dag_id).returning(backfill_table.c.id)).scalar_one()
        for ordinal, day, reason in slots:
            run_pk = None
            if reason is None:
                run_pk = conn.execute(
                    insert(dag_run_table).values(dag_id=dag_id, run_id=f"backfill__{day}", state="queued").returning(dag_run_table.c.id)
                ).scalar_one()
            conn.execute(
                insert(backfill_dag_run_table).values(
                    backfill_id=backfill_id,
                    dag_run_id=run_pk,
                    exception_reason=reason,
                    sort_ordinal=ordinal,
                    logical_date=datetime.fromisoformat(f"{day}T00:00:00+00:00"),
                )
            )
    engine.dispose()
    return backfill_id


def test_a_backfill_shows_its_slots_and_live_progress_through_a_restart(browser, served_gateway, publisher, tmp_path):
    days = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    airflow_db = tmp_path / "airflow.db"
    backfill_id = airflow_backfill_db(
        airflow_db, "daily", [(1, days[0], None), (2, days[1], "already exists"), (3, days[2], None), (4, days[3], None)]
    )
    gateway = served_gateway(RUNBELL_AIRFLOW_DATABASE_URL=f"sqlite:///{airflow_db}")
    browser.get(gateway.url + f"/#/backfills/{backfill_id}")
    progress = (
        "(() => { const d = document.getElementById('progress').dataset;"
        " return [d.done, d.failed, d.running, d.skipped, d.total].join(); })()"
    )
    slot_states = "[...document.querySelectorAll('#slots tbody tr')].map(tr => tr.dataset.state).join()"
    wait_for(browser, progress, lambda p: p == "0,0,0,1,4", "three queued slots and one skipped")
    assert browser.execute_script(f"return {slot_states}") == "queued,skipped,queued,queued"
    # (read in one script: the table is re-rendered on each change, so an element found may be gone)
    assert "already exists" in browser.execute_script("return document.querySelector(\"#slots tr[data-ordinal='2']\").textContent")
    wait_for(browser, "document.getElementById('conn').dataset.state", lambda s: s == "live", "the stream open")

    def run(day: str, state: str) -> None:
        publisher.publish(
            Event(
                kind=EventKind.RUN,
                dag_id="daily",
                run_id=f"backfill__{day}",
                state=state,
                run_type="backfill",
                backfill_id=str(backfill_id),
                logical_date=f"{day}T00:00:00+00:00",
            )
        )

    run(days[0], "running")
    wait_for(browser, progress, lambda p: p == "0,0,1,1,4", "a slot running, live")
    run(days[0], "success")
    run(days[2], "failed")
    wait_for(browser, progress, lambda p: p == "1,1,0,1,4", "a slot done and one failed, live")
    wait_for(browser, slot_states, lambda states: states == "success,skipped,failed,queued", "the slots, live")

    # The gateway dies; the last slot ends meanwhile. Back on the same port, the page catches up.
    gateway.stop(signal.SIGKILL)
    run(days[3], "running")
    run(days[3], "success")
    gateway.start()
    wait_for(browser, progress, lambda p: p == "2,1,0,1,4", "the backfill done, after the restart")
    # the slots are read again after a reconnect (the stream only sends changes after it starts)
    try:
        wait_for(browser, slot_states, lambda states: states == "success,skipped,failed,success", "the slots caught up", seconds=8)
    except BaseException:
        print("DIAG runs:", httpx.get(gateway.url + f"/v1/backfills/{backfill_id}/runs").text)
        print("DIAG stats:", stats(browser))
        print("DIAG log:", browser.execute_script("return window.diag"))
        raise
    wait_for(browser, "document.getElementById('conn').dataset.state", lambda s: s == "ended", "the stream closed after end")
    screenshot(browser, "dashboard-backfill.png")
    no_script_errors(browser)


def test_the_page_asks_for_a_token_and_uses_it(browser, served_gateway, publisher):
    from tests.conftest import READ_TOKEN, TOKENS

    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS)
    emit("etl", "tok", "running", task_id="t", try_number=1, publisher=publisher)
    browser.get(gateway.url + "/#/runs/etl/tok")
    wait_for(browser, "!document.getElementById('token-dialog').hidden", what="the token prompt")
    browser.find_element("id", "token-input").send_keys(READ_TOKEN)
    browser.find_element("css selector", "#token-form button[type='submit']").click()
    wait_for_seqs(browser, 1, "the run's events with the token")
    emit("etl", "tok", "success", task_id="t", try_number=1, publisher=publisher)
    wait_for_seqs(browser, 2, "live with the token (EventSource sends it as ?access_token=)")
    # ?token= in the address is taken once, kept for the tab, and removed from the address.
    browser.get(gateway.url + f"/?token={READ_TOKEN}#/runs/etl/tok")
    wait_for_seqs(browser, 2, "a token given in the address")
    assert "token" not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('runbell.token')") == READ_TOKEN
    no_script_errors(browser)


def test_the_readme_eventsource_block_runs_in_a_browser(browser, served_gateway, publisher):
    from tests.conftest import READ_TOKEN, TOKENS
    from tests.readme_blocks import code_blocks

    (block,) = code_blocks("js")
    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS)
    run_id = "manual__2026-05-01T12:00:00+00:00_readme02"
    emit("answer_question", run_id, "running", task_id="answer", try_number=1, publisher=publisher)
    browser.get(gateway.url + "/healthz")  # a page of the gateway's origin, with nothing else on it
    browser.execute_script(
        "window.logged = []; console.log = (...args) => window.logged.push(args);window.runId = arguments[0]; window.token = arguments[1];",
        run_id,
        READ_TOKEN,
    )
    browser.execute_script(block)
    logged = "window.logged.map(([kind, data]) => `${kind}:${data.state || data.status}`).join()"
    wait_for(browser, logged, lambda text: text == "task:running", "the task event replayed")
    emit("answer_question", run_id, "success", task_id="answer", try_number=1, result_task=True, result={"answer": 42}, publisher=publisher)
    emit("answer_question", run_id, "success", publisher=publisher)
    wait_for(browser, logged, lambda text: text == "task:running,task:success,outcome:success", "the outcome, live")
    assert browser.execute_script("return window.logged[2][1].result") == {"answer": 42}


def test_a_runs_page_shows_its_progress_live_and_after_a_reload(browser, served_gateway, publisher):
    from runbell.listeners.partial_output import emit_progress

    gateway = served_gateway()
    run_id = "streaming"
    emit("chat", run_id, "running", publisher=publisher)
    emit("chat", run_id, "running", task_id="answer", try_number=1, publisher=publisher)
    emit_progress("chat", run_id, "answer", "Hello", publisher=publisher)
    emit_progress("chat", run_id, "answer", 10, key="percent", publisher=publisher)
    browser.get(f"{gateway.url}/#/runs/chat/{run_id}")
    text = "(document.querySelector('#progress-text') || {}).textContent"
    percent = "(document.querySelector('#progress-keys [data-key=percent]') || {}).textContent"
    wait_for(browser, text, lambda t: t == "Hello", "the chunk so far")
    wait_for(browser, percent, lambda t: bool(t) and t.startswith("10"), "the percent so far")
    for word in [", ", "world", "!"]:
        emit_progress("chat", run_id, "answer", word, publisher=publisher)
    emit_progress("chat", run_id, "answer", {"done": 3, "of": 4}, key="percent", publisher=publisher)
    wait_for(browser, text, lambda t: t == "Hello, world!", "the chunks appended live, in order")
    wait_for(browser, percent, lambda t: '"done": 3' in (t or ""), "the keyed value replaced")
    assert browser.execute_script("return document.querySelectorAll('#events li[data-kind=progress]').length") == 0
    browser.refresh()  # the replay log gives the whole text again, once
    wait_for(browser, text, lambda t: t == "Hello, world!", "the same text after a reload")
    no_script_errors(browser)


# -- a run that waits for a person ------------------------------------------------------------------

RESPOND_TOKEN = "test-respond-token"
# Text from a DAG's author, which the page must show as text and never run.
HOSTILE_SUBJECT = 'Ship <b id="bold">release 7</b>?'
HOSTILE_BODY = 'Notes: <img id="pwn" src="x" onerror="window.pwned = true">\nsecond line'


@pytest.fixture
def hitl_gateway(served_gateway, threaded_stand_in_airflow):
    from tests.conftest import TOKENS

    return served_gateway(
        auth=True,
        RUNBELL_TOKENS=f"{TOKENS},{RESPOND_TOKEN}:respond@etl",
        RUNBELL_AIRFLOW_URL=threaded_stand_in_airflow.url,
        RUNBELL_RECONCILE_AFTER="3600",  # the stand-in knows no runs: no reconciling here
    )


def hitl_task(run_id: str, task_id: str, state: str, **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id="etl", run_id=run_id, task_id=task_id, state=state, try_number=1, **kw)


def asks(run_id: str, task_id: str, **request) -> Event:
    from runbell.bus.schema import InputRequest

    return hitl_task(run_id, task_id, "awaiting_input", input_request=InputRequest(**request))


def card(driver, task_id: str) -> dict | None:
    """The request card of the task as shown: status, subject, body, options, deadline, users, message."""
    return driver.execute_script(
        """const el = [...document.querySelectorAll('#needs-input .ask')].find(c => c.dataset.task === arguments[0]);
        if (!el) return null;
        const text = (sel) => { const e = el.querySelector(sel); return e ? e.textContent : null; };
        const countdown = el.querySelector('.countdown');
        return {status: el.dataset.status, received: el.dataset.received || null, subject: text('.subject'), body: text('.ask-body'),
          options: [...el.querySelectorAll('.choices [data-option]')].map(o => o.dataset.option),
          checked: [...el.querySelectorAll('.choices input:checked')].map(o => o.value),
          deadline: text('.deadline'), remaining: countdown ? Number(countdown.dataset.remaining) : null,
          assigned: text('.assigned'), message: text('.answer-status')};""",
        task_id,
    )


def click_option(driver, task_id: str, option: str) -> None:
    driver.execute_script(
        "[...document.querySelectorAll('#needs-input .ask')].find(c => c.dataset.task === arguments[0])"
        ".querySelector(`.choices button[data-option='${arguments[1]}']`).click();",
        task_id,
        option,
    )


def test_a_run_waiting_for_a_person_is_answered_from_its_page(browser, hitl_gateway, threaded_stand_in_airflow, publisher):
    from tests.conftest import READ_TOKEN

    airflow, run_id = threaded_stand_in_airflow, "hitl1"
    deadline = (datetime.now(timezone.utc) + timedelta(minutes=30)).isoformat()
    publisher.publish(Event(kind=EventKind.RUN, dag_id="etl", run_id=run_id, state="running"))
    publisher.publish(hitl_task(run_id, "approve", "running"))
    ask = dict(kind="approval", subject=HOSTILE_SUBJECT, body=HOSTILE_BODY, options=["Approve", "Reject"], deadline=deadline)
    publisher.publish(asks(run_id, "approve", **ask, assigned_users=[{"id": "alice", "name": "Alice"}, {"id": "bob"}]))
    airflow.ask("etl", run_id, "approve", options=["Approve", "Reject"])  # Airflow stored the request

    # With a read token the page shows the request live...
    browser.get(gateway_page(hitl_gateway, READ_TOKEN, run_id))
    shown = wait_for(browser, "document.querySelector('#needs-input .ask') !== null", what="the request's card") and card(
        browser, "approve"
    )
    assert shown["status"] == "open" and shown["subject"] == HOSTILE_SUBJECT and shown["body"] == HOSTILE_BODY
    assert shown["options"] == ["Approve", "Reject"] and shown["assigned"] == "Who may answer: Alice (alice), bob"
    assert re.fullmatch(r"Deadline \d{4}-\d\d-\d\d \d\d:\d\d:\d\d — in \d+ min \d\d s", shown["deadline"]), shown["deadline"]
    assert browser.execute_script("return document.getElementById('bold') === null && document.getElementById('pwn') === null")
    assert not browser.execute_script("return window.pwned === true")
    assert task_state(browser, "approve") == "awaiting_input"
    wait_for(
        browser,
        "Number(document.querySelector('#needs-input .countdown').dataset.remaining)",
        lambda s: s < shown["remaining"],
        "the countdown",
    )
    screenshot(browser, "dashboard-input.png")

    # ...but cannot answer it: the gateway's 403 is shown on the card, and Airflow is not asked.
    click_option(browser, "approve", "Approve")
    refused = wait_for(browser, "document.querySelector('#needs-input .ask').dataset.status", lambda s: s == "error", "the refusal")
    assert refused and "needs the respond role" in card(browser, "approve")["message"]
    assert airflow.hitl_patches == []

    # Another token, given on the card: the respond role answers through the gateway to Airflow.
    browser.execute_script("document.querySelector('#needs-input .other-token').click();")
    wait_for(browser, "!document.getElementById('token-dialog').hidden", what="the token prompt")
    browser.find_element("id", "token-input").send_keys(RESPOND_TOKEN)
    browser.find_element("css selector", "#token-form button[type='submit']").click()
    wait_for(
        browser,
        "document.querySelector('#needs-input .ask') && document.querySelector('#needs-input .ask').dataset.status",
        lambda s: s == "open",
    )
    click_option(browser, "approve", "Approve")
    # (the gateway publishes input_received before it answers the POST: either may show first)
    answered = wait_for(
        browser,
        "(() => { const c = document.querySelector('#needs-input .ask'); return [c.dataset.status, c.dataset.received, c.querySelector('.answer-status').textContent]; })()",
        lambda shown: shown == ["answered", "true", "Answered: Approve"],
        "the answer taken (the POST's reply) and input_received (live)",
    )
    assert answered
    assert airflow.hitl_patches == [{"key": ("etl", run_id, "approve", -1), "chosen_options": ["Approve"], "params_input": {}}]
    assert task_state(browser, "approve") == "input_received"
    screenshot(browser, "dashboard-input-answered.png")
    browser.refresh()  # the run's history replayed: asked, then answered
    wait_for(
        browser,
        "document.querySelector('#needs-input .ask') && document.querySelector('#needs-input .ask').dataset.status",
        lambda s: s == "answered",
    )
    assert card(browser, "approve")["message"] == "Answered" and len(airflow.hitl_patches) == 1

    # The task resumes (its card goes), succeeds, and the result task decides the run.
    publisher.publish(hitl_task(run_id, "approve", "running"))
    wait_for(browser, "document.querySelectorAll('#needs-input .ask').length", lambda n: n == 0, "the card gone once the task resumed")
    publisher.publish(hitl_task(run_id, "approve", "success"))
    publisher.publish(hitl_task(run_id, "publish", "success", result_task=True, result={"value": {"released": 7}, "size": 16}))
    wait_for(browser, "document.getElementById('outcome').dataset.status", lambda s: s == "success", "the outcome")
    assert json.loads(browser.find_element("id", "result").text) == {"released": 7}
    screenshot(browser, "dashboard-input-outcome.png")
    no_script_errors(browser)


def gateway_page(gateway, token: str, run_id: str) -> str:
    return f"{gateway.url}/?token={token}#/runs/etl/{run_id}"


def test_several_options_and_a_form_are_answered_with_typed_values(browser, hitl_gateway, threaded_stand_in_airflow, publisher):
    airflow, run_id = threaded_stand_in_airflow, "hitl2"
    params = {
        "reason": {"value": "looks fine", "schema": {"type": "string"}, "description": "Why"},
        "count": {"value": 2, "schema": {"type": "integer", "minimum": 1}, "description": None},
        "urgent": {"value": False, "schema": {"type": "boolean"}, "description": None},
        "level": {"value": "low", "schema": {"type": "string", "enum": ["low", "high"]}, "description": None},
        "extra": {"value": {"k": [1]}, "schema": {"type": "object"}, "description": None},
    }
    publisher.publish(asks(run_id, "pick", subject="Which ones?", options=["a", "b", "c"], defaults=["b"], multiple=True, params=params))
    airflow.ask("etl", run_id, "pick", options=["a", "b", "c"], multiple=True)
    browser.get(gateway_page(hitl_gateway, RESPOND_TOKEN, run_id))
    wait_for(browser, "document.querySelector('#needs-input .ask') !== null", what="the request's card")
    shown = card(browser, "pick")
    assert shown["options"] == ["a", "b", "c"] and shown["checked"] == ["b"] and shown["deadline"] is None  # defaults checked
    field = "document.querySelector(`#needs-input [data-param='${arguments[0]}']`)"
    read = f"const f = {field}; return f.type === 'checkbox' ? f.checked : f.value;"
    assert [browser.execute_script(read, name) for name in params] == ["looks fine", "2", False, "low", '{\n  "k": [\n    1\n  ]\n}']
    for option in ("a", "b", "c"):  # b unchecked, a and c checked
        browser.execute_script("document.querySelector(`#needs-input [data-option='${arguments[0]}']`).click();", option)

    # A value the schema refuses is caught on the page, and nothing is sent.
    browser.execute_script(f"{field}.value = '0';", "count")
    browser.execute_script("document.querySelector('#needs-input .send').click();")
    wait_for(browser, "document.querySelector('#needs-input .ask').dataset.status", lambda s: s == "error", "the refused value")
    assert card(browser, "pick")["message"].startswith("count: ") and airflow.hitl_patches == []

    browser.execute_script(f"{field}.value = '5';", "count")
    browser.execute_script(f"{field}.click();", "urgent")
    browser.execute_script(f"{field}.selectedIndex = 1;", "level")
    browser.execute_script("document.querySelector('#needs-input .send').click();")
    wait_for(browser, "document.querySelector('#needs-input .ask').dataset.status", lambda s: s == "answered", "the answer taken")
    (patch,) = airflow.hitl_patches
    assert patch["chosen_options"] == ["a", "c"]
    assert patch["params_input"] == {"reason": "looks fine", "count": 5, "urgent": True, "level": "high", "extra": {"k": [1]}}
    screenshot(browser, "dashboard-input-form.png")

    # The run ends: its card goes.
    publisher.publish(Event(kind=EventKind.RUN, dag_id="etl", run_id=run_id, state="failed"))
    wait_for(browser, "document.querySelectorAll('#needs-input .ask').length", lambda n: n == 0, "no card after the run's end")
    no_script_errors(browser)
