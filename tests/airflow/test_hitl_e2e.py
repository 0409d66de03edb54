"""Runs that wait for a person, against a real Airflow: trigger through the gateway, be told the run
needs input (long-poll 202 needs_input, SSE needs_input) with the subject, options, form and deadline,
answer through the gateway (passed to Airflow's HITL endpoint with its own identity), keep waiting
with after=, and get the result; and a rejection, decided as Airflow decides it.

Prints how long after the task parked (its awaiting_input event) the waiter was told (pytest -s)."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from runbell.service.bench import free_port, start_gateway

pytestmark = pytest.mark.airflow

DAG = "rb_hitl"
WAIT = 60.0  # the gateway's longest wait; a 202 pending at its end is asked again (RETRIES times)
RETRIES = 3
# A person takes a moment. Airflow 3.3.2's scheduler failed a task answered before it had handled the
# parking worker's exit ("state changed externally": seen here, up to 8 s after parking on a loaded
# machine), so the test answers once the task has parked, and that long after.
PERSON_SECONDS = 10.0
PARKED = ("awaiting_input", "deferred")
CONF = {"runbell_result_task": "result", "what": "v7"}


@pytest.fixture(scope="module")
def gateway(airflow: Any) -> Iterator[str]:
    """`runbell serve` connected to this Airflow, as the other end-to-end tests connect it (its URL, and
    the admin credentials the fixture has for a version whose standalone needs them)."""
    port = free_port()
    connection = airflow.gateway_env() if hasattr(airflow, "gateway_env") else {"RUNBELL_AIRFLOW_URL": airflow.base_url}
    env = {**connection, "RUNBELL_RECONCILE_AFTER": "3600"}
    process = start_gateway(airflow.redis_url, airflow.namespace, port, Path(tempfile.mkdtemp()), extra_env=env)
    airflow.unpause(DAG)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(20)


class Stream:
    """The run's SSE stream read in the background: (when received, event, data) of each frame."""

    def __init__(self, url: str):
        self.frames: list[tuple[float, str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()

    def _read(self, url: str) -> None:
        deadline = time.monotonic() + 3 * WAIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=None)) as response:
                    if response.status_code != 200:  # 404 until the gateway has seen the run: ask again
                        time.sleep(0.2)
                        continue
                    event = ""
                    for line in response.iter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: "):
                            self.frames.append((time.time(), event, json.loads(line[6:])))
                            if event == "end" or self._stop.is_set():
                                return
            except httpx.HTTPError:
                time.sleep(0.2)

    def first(self, event: str, timeout: float = WAIT, **match: Any) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, name, data in list(self.frames):
                if name == event and all(data.get(k) == v for k, v in match.items()):
                    return at, data
            time.sleep(0.05)
        raise TimeoutError(f"no SSE {event} {match}: {[(n, d.get('task_id')) for _, n, d in self.frames]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def told_after_park(airflow: Any, run_id: str, task_id: str, told_at: float) -> float:
    """Seconds from the task's awaiting_input event (published as it parks) to the waiter being told."""
    asked = next(e.event for e in airflow.log(DAG, run_id) if e.event.task_id == task_id and e.event.state == "awaiting_input")
    return told_at - asked.ts


def events(airflow: Any, run_id: str) -> list[tuple[str | None, str, str, Any]]:
    """The run's events as the bus has them, for a failure's message."""
    return [(e.event.task_id, e.event.state, e.event.source.value, e.event.error) for e in airflow.log(DAG, run_id)]


def result(gateway: str, run_id: str, **params: Any) -> httpx.Response:
    """Long-poll, asked again while it is only pending (bounded)."""
    for _ in range(RETRIES):
        response = httpx.get(f"{gateway}/v1/dags/{DAG}/runs/{run_id}/result", params={"timeout": WAIT, **params}, timeout=WAIT + 10)
        if response.status_code != 202 or response.json()["status"] != "pending":
            break
    return response


def answer(gateway: str, request: dict, body: dict, airflow: Any = None, run_id: str = "") -> httpx.Response:
    """POST the answer; with `airflow`, as a person would: once the task has parked, a moment later."""
    if airflow is not None:
        deadline = time.monotonic() + WAIT
        path = f"/api/v2/dags/{DAG}/dagRuns/{quote(run_id, safe='')}/taskInstances/{request['task_id']}"
        while airflow.request("GET", path)["state"] not in PARKED:
            assert time.monotonic() < deadline, "the task never parked"
            time.sleep(0.2)
        time.sleep(PERSON_SECONDS)
    return httpx.post(gateway + request["respond"], json=body, timeout=30)


def test_trigger_be_told_answer_through_runbell_and_get_the_result(airflow: Any, gateway: str) -> None:
    triggered = httpx.post(f"{gateway}/v1/dags/{DAG}/runs", params={"wait": WAIT}, json={"conf": CONF}, timeout=WAIT + 10)
    told_at = time.time()
    body = triggered.json()
    assert triggered.status_code == 202 and body["token"], body
    run_id = body["run_id"]
    if body["status"] == "pending":  # not parked within the wait (a cold Airflow): the long-poll goes on
        pending = result(gateway, run_id)
        told_at, body = time.time(), pending.json()
    assert body["status"] == "needs_input", body
    stream = Stream(f"{gateway}/v1/dags/{DAG}/runs/{run_id}/events")
    try:
        (approve,) = body["needs_input"]
        assert (approve["task_id"], approve["kind"], approve["subject"]) == ("approve", "approval", "Ship v7?")
        assert (approve["options"], approve["multiple"], approve["body"]) == (
            ["Approve", "Reject"],
            False,
            "Runbell's end-to-end test asks.",
        )
        assert (
            approve["deadline"]
            and approve["respond"] == f"/v1/dags/{DAG}/runs/{run_id.replace(':', '%3A').replace('+', '%2B')}/tasks/approve/input"
        )
        latencies = {"approve (trigger-and-wait)": told_after_park(airflow, run_id, "approve", told_at)}
        stream.first("needs_input", task_id="approve")

        accepted = answer(gateway, approve, {"chosen_options": ["Approve"]}, airflow, run_id)
        assert accepted.status_code == 200 and accepted.json()["status"] == "accepted", accepted.text
        stream.first("input_received", task_id="approve", closed_by="input_received")

        # Told of the approval: the wait goes on past it, until the next request.
        asked = result(gateway, run_id, after=body["after"])
        told_at = time.time()
        asked_body = asked.json()
        assert asked.status_code == 202 and asked_body["status"] == "needs_input", (asked_body, events(airflow, run_id))
        (choose,) = asked_body["needs_input"]
        assert (choose["task_id"], choose["kind"], choose["options"], choose["defaults"]) == ("choose", "choice", ["S", "M", "L"], ["M"])
        assert choose["params"]["note"]["value"] == "none" and choose["params"]["note"]["description"] == "why"
        latencies["choose (long-poll with after=)"] = told_after_park(airflow, run_id, "choose", told_at)
        sse_at, _ = stream.first("needs_input", task_id="choose")
        latencies["choose (SSE)"] = told_after_park(airflow, run_id, "choose", sse_at)

        refused = answer(gateway, choose, {"chosen_options": ["XL"]})
        assert refused.status_code == 400 and refused.json()["accepted"]["options"] == ["S", "M", "L"]
        assert answer(gateway, choose, {"chosen_options": ["L"], "params_input": {"note": "big"}}, airflow, run_id).status_code == 200
        again = answer(gateway, choose, {"chosen_options": ["S"], "params_input": {"note": "late"}})
        assert again.status_code == 409 and again.json()["error"] == "already_answered", again.text

        done = result(gateway, run_id, after=asked_body["after"])
        outcome = done.json()
        assert done.status_code == 200 and outcome["status"] == "success", outcome
        assert outcome["result"] == {"size": ["L"], "note": "big"} and outcome["decided_by"] == "result_task"
        stream.first("outcome")
    finally:
        stream.stop()
    detail = airflow.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/choose/-1/hitlDetails")
    assert detail["chosen_options"] == ["L"] and detail["params_input"] == {"note": "big"}
    version = getattr(airflow, "version", None) or airflow.request("GET", "/api/v2/version")["version"]
    print(f"\n[hitl] Airflow {version}: told after the task parked: " + ", ".join(f"{k} {v:.2f} s" for k, v in latencies.items()))


def test_a_rejection_ends_the_run_as_airflow_decides(airflow: Any, gateway: str) -> None:
    run_id = airflow.trigger(DAG, conf=CONF)  # triggered in Airflow itself: the gateway follows it all the same
    asked = result(gateway, run_id)
    assert asked.status_code == 202 and asked.json()["status"] == "needs_input", asked.text
    (approve,) = asked.json()["needs_input"]
    assert answer(gateway, approve, {"chosen_options": ["Reject"]}, airflow, run_id).status_code == 200
    done = result(gateway, run_id, after=asked.json()["after"])
    outcome = done.json()
    # ApprovalOperator skips what follows a rejection; the run then succeeds with no result.
    assert done.status_code == 200, outcome
    said = (outcome["status"], outcome["decided_by"], outcome["result"], outcome["needs_input"])
    if said[0] != "success":
        print("\n[hitl] rejection:", json.dumps({"outcome": outcome, "events": [str(e) for e in events(airflow, run_id)]}, default=str))
    assert said == ("success", "run", None, []), (outcome, events(airflow, run_id))
    choose = airflow.request("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/choose")
    assert choose["state"] == "skipped", choose
