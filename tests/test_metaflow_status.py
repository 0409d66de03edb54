"""A Metaflow run's listed status follows Metaflow's own rules (metaflow-service's runs status filter,
PR #481): the five branches as a pure function, the end step's events read as its attempt records,
and the runs listing (PostgreSQL and SQLite) with both status filter forms."""

from __future__ import annotations

import time

import pytest

from runbell.bus.schema import Envelope, ErrorInfo, Event, EventKind
from runbell.service.core.metaflow_status import EndAttempts, end_attempts, listed_state, metaflow_status
from tests.test_runs import BASE, api, run_envelopes  # noqa: F401  (api is a fixture)

CUTOFF = 360.0
NOW = 1_800_000_000.0

# (branch, end's attempt records, heartbeat age in seconds or None, status)
BRANCHES = [
    ("1 end failed, a newer attempt: running", EndAttempts(ok=False, ok_at=NOW - 20, attempt_at=NOW - 10), 10, "running"),
    ("1 ... also with a silent heartbeat", EndAttempts(ok=False, ok_at=NOW - 900, attempt_at=NOW - 800), 800, "running"),
    ("2 end ok: completed", EndAttempts(ok=True, ok_at=NOW - 10, attempt_at=NOW - 11), 10, "success"),
    ("2 ... wins over a live heartbeat", EndAttempts(ok=True, ok_at=NOW - 900, attempt_at=NOW - 901), 0, "success"),
    ("2 ... and over a dead one", EndAttempts(ok=True, ok_at=NOW - 900, attempt_at=NOW - 901), 900, "success"),
    ("3 end failed, no newer attempt: failed", EndAttempts(ok=False, ok_at=NOW - 10, attempt_at=NOW - 11), 10, "failed"),
    ("3 ... an attempt at the same time is not newer", EndAttempts(ok=False, ok_at=NOW - 10, attempt_at=NOW - 10), 10, "failed"),
    ("3 ... a failed end without an attempt record", EndAttempts(ok=False, ok_at=NOW - 10), 0, "failed"),
    ("4 no end yet, heartbeat within the cutoff: running", EndAttempts(), 10, "running"),
    ("4 ... exactly at the cutoff", EndAttempts(), CUTOFF, "running"),
    ("4 ... end started, not ended", EndAttempts(attempt_at=NOW - 5), 5, "running"),
    ("5 heartbeat older than the cutoff: failed", EndAttempts(), CUTOFF + 1, "failed"),
    ("5 ... end started long ago, never ended", EndAttempts(attempt_at=NOW - 900), 900, "failed"),
    ("5 ... no heartbeat at all", EndAttempts(), None, "failed"),
]


@pytest.mark.parametrize(("end", "age", "status"), [b[1:] for b in BRANCHES], ids=[b[0] for b in BRANCHES])
def test_the_five_branches(end, age, status):
    heartbeat = None if age is None else NOW - age
    assert metaflow_status(end, heartbeat, NOW, CUTOFF) == status


def task(step: str, state: str, ts: float, try_number: int = 1) -> Event:
    error = ErrorInfo(type="RuntimeError", message="x") if state in ("failed", "up_for_retry") else None
    return Event(kind=EventKind.TASK, dag_id="F", run_id="1", task_id=step, state=state, ts=ts, try_number=try_number, error=error)


def test_the_end_steps_events_are_its_attempt_records():
    assert end_attempts([]) == EndAttempts()
    assert end_attempts([task("start", "success", 1), task("end", "running", 2)]) == EndAttempts(attempt_at=2)
    assert end_attempts([task("end", "running", 2), task("end", "success", 3)]) == EndAttempts(ok=True, ok_at=3, attempt_at=2)
    # A failure that will be retried is attempt_ok=false too, then the retry's start is newer.
    retried = [task("end", "running", 2), task("end", "up_for_retry", 3), task("end", "running", 4, try_number=2)]
    assert end_attempts(retried) == EndAttempts(ok=False, ok_at=3, attempt_at=4)
    assert metaflow_status(end_attempts(retried), 4, 4, CUTOFF) == "running"
    assert end_attempts([*retried, task("end", "failed", 5, try_number=2)]) == EndAttempts(ok=False, ok_at=5, attempt_at=4)
    # Only the end step counts, and the run's own events are the heartbeat, not attempts.
    run_failed = Event(kind=EventKind.RUN, dag_id="F", run_id="1", state="failed", ts=9)
    assert end_attempts([task("work", "failed", 5), run_failed]) == EndAttempts()


def test_listed_state_applies_the_cutoff_to_metaflow_runs_only():
    assert listed_state("running", "metaflow", NOW - CUTOFF - 1, NOW, CUTOFF) == "failed"
    assert listed_state("running", "metaflow", NOW - CUTOFF, NOW, CUTOFF) == "running"
    assert listed_state("running", "manual", NOW - 3600, NOW, CUTOFF) == "running"  # Airflow: running, stale
    assert listed_state("success", "metaflow", NOW - 3600, NOW, CUTOFF) == "success"


def metaflow_run(run_id: str, events: list[tuple[str | None, str, float]]) -> list[Envelope]:
    """A Metaflow run as the @runbell decorator publishes it: a run event, then (step, state, ts) each."""
    first_ts = min(ts for _, _, ts in events)
    made = [Event(kind=EventKind.RUN, dag_id="Flow", run_id=run_id, state="running", ts=first_ts, run_type="metaflow")]
    for step, state, ts in events:
        if step is None:
            made.append(Event(kind=EventKind.RUN, dag_id="Flow", run_id=run_id, state=state, ts=ts, run_type="metaflow"))
        else:
            made.append(task(step, state, ts).model_copy(update={"dag_id": "Flow", "run_id": run_id}))
    return [Envelope(seq=i, event=e) for i, e in enumerate(made, start=1)]


async def test_the_listing_gives_metaflows_status_in_each_branch(api, store):
    now = time.time()
    recently, long_ago = now - 5, now - 3600
    runs = {
        "completed": [("start", "success", recently), ("end", "running", recently), ("end", "success", recently)],
        "retrying": [("end", "running", recently - 3), ("end", "up_for_retry", recently - 2), ("end", "running", recently)],
        "end_failed": [("end", "running", recently - 1), ("end", "failed", recently)],
        "lively": [("start", "running", recently)],
        # Failed before end (the run's own failed event is no attempt record of end): running
        # until its heartbeat, the last event, is older than the cutoff, as in Metaflow.
        "failed_early": [("work", "failed", recently), (None, "failed", recently)],
        "silent": [("start", "running", long_ago)],
        "silent_in_end": [("end", "running", long_ago)],
    }
    envelopes = [e for run_id, events in runs.items() for e in metaflow_run(run_id, events)]
    # An Airflow run silent as long keeps Airflow's reading: running, and stale.
    envelopes += run_envelopes("etl", "airflow_silent", "running", run_after=BASE, last_event=long_ago)
    await store.record(envelopes)
    expected = {
        "completed": "success",
        "retrying": "running",
        "end_failed": "failed",
        "lively": "running",
        "failed_early": "running",
        "silent": "failed",
        "silent_in_end": "failed",
        "airflow_silent": "running",
    }
    rows = {r["run_id"]: r for r in (await api.get("/v1/runs")).json()["runs"]}
    assert {run_id: r["state"] for run_id, r in rows.items()} == expected
    assert rows["airflow_silent"]["stale"] and not rows["silent"]["stale"]
    detail = await api.get("/v1/dags/Flow/runs/silent")
    assert detail.json()["state"] == "failed"

    async def listed(query: str) -> set[str]:
        response = await api.get("/v1/runs?" + query)
        assert response.status_code == 200, response.text
        return {r["run_id"] for r in response.json()["runs"]}

    for state in ("running", "success", "failed"):
        assert await listed(f"status={state}") == {k for k, v in expected.items() if v == state}, state
    either = {k for k, v in expected.items() if v in ("running", "failed")}
    assert await listed("status=running&status=failed") == await listed("status=running,failed") == either
    assert await listed("status=failed&run_type=metaflow") == {"end_failed", "silent", "silent_in_end"}
    # The cutoff is the stale_after setting: with an hour and a half, nothing here is silent.
    api.app.state.settings = api.app.state.settings.model_copy(update={"stale_after": 5400.0})  # type: ignore[attr-defined]
    assert await listed("status=failed") == {"end_failed"}
