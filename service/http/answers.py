"""Answering a task that waits for a person: POST /v1/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/input.

The answer goes to Airflow's own HITL endpoint with the gateway's Airflow identity (as its UI
does), so Airflow records it and resumes the task. The gateway checks the answer against the open
request when it knows it (from the run's events): Airflow 3.1 and 3.2 accept any option there and
fail the task when it resumes. When it does not know it (the hook's event was lost, or the hook
is not installed), the answer still goes through and Airflow is the judge. Once Airflow has taken
it, the gateway publishes input_received, so every waiter hears at once that the request is closed,
before the task resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.bus.schema import INT_MAX, OPTIONS_MAX, START, UNNAMED_OPTION, Event, EventKind, Source, TaskState
from runbell.listeners.publisher import SpoolUnavailable
from runbell.service.airflow.api import AirflowClient, AirflowUnavailable
from runbell.service.core.outcome import InputNeeded, OutcomeFold
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import InputAccepted, InputAnswer
from runbell.service.http.errors import ApiError
from runbell.service.http.params import int_param, path_id, read_body, run_path
from runbell.service.live.topics import RunTopic

log = logging.getLogger("runbell.answers")

AIRFLOW_RETRY_AFTER = "5"  # seconds: Airflow has to come back first
# The hook says a task waits the moment Airflow has stored its request, just before the task parks.
# An answer in between is taken, but Airflow 3.3 on SQLite (no row locks) can then leave the task
# parked for ever: its answer handler saw it still running, its park saw no answer yet (seen in
# tests/airflow/test_hitl_e2e.py). So an answer waits, briefly and bounded, until the task has parked.
PARK_WAIT_SECONDS = 10.0
PARK_POLL_SECONDS = 0.2
STILL_STARTING = ("running",)  # between storing the request and parking (3.3) or deferring (3.1, 3.2)


async def answer_input(request: Request) -> Response:
    dag_id, run_id = run_path(request)
    task_id = path_id(request, "task_id")
    # dag_id, not run=: a run's endpoints also take ?access_token= (for EventSource), and a token
    # that may answer must not travel in a URL (access logs, proxies, the browser's history).
    authorize(request, Role.RESPOND, dag_id=dag_id)
    map_index = int_param(request, "map_index", minimum=-1, maximum=INT_MAX, default=-1)
    answer = await read_body(request, InputAnswer)  # a bad request is the caller's, whatever the gateway lacks
    airflow: AirflowClient | None = request.app.state.airflow
    if airflow is None:
        raise ApiError(
            503,
            "airflow_not_configured",
            "this gateway has no Airflow connection (set RUNBELL_AIRFLOW_URL): it cannot pass an answer on",
            headers={"Retry-After": AIRFLOW_RETRY_AFTER},
        )
    asked = await open_request(request.app.state.runs, dag_id, run_id, task_id, map_index)
    chosen = checked_options(answer, asked)
    if asked is not None:
        check_params(answer, asked)
    try:
        await until_parked(airflow, dag_id, run_id, task_id, map_index)
        detail = await airflow.answer_input(dag_id, run_id, task_id, map_index, chosen, answer.params_input)
    except AirflowUnavailable as exc:
        raise ApiError(exc.status, exc.code, exc.message, headers={"Retry-After": AIRFLOW_RETRY_AFTER}) from None
    await publish_received(request, received_event(dag_id, run_id, task_id, map_index, asked))
    responded_at = detail.get("responded_at")
    accepted = InputAccepted(
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        chosen_options=chosen,
        params_input=answer.params_input,
        responded_at=responded_at if isinstance(responded_at, str) else None,
    )
    return JSONResponse(accepted.model_dump(mode="json"))


async def until_parked(airflow: AirflowClient, dag_id: str, run_id: str, task_id: str, map_index: int) -> None:
    """Return once Airflow no longer has the task instance running (parked, deferred, or gone on),
    or after PARK_WAIT_SECONDS: Airflow is then the judge as it is."""
    deadline = asyncio.get_running_loop().time() + PARK_WAIT_SECONDS
    while await airflow.task_instance_state(dag_id, run_id, task_id, map_index) in STILL_STARTING:
        if asyncio.get_running_loop().time() >= deadline:
            return
        await asyncio.sleep(PARK_POLL_SECONDS)


async def open_request(runs: RunTopic, dag_id: str, run_id: str, task_id: str, map_index: int) -> InputNeeded | None:
    """The task instance's open request as the run's events tell it; None when they do not (or the
    events cannot be read now: Airflow judges alone then)."""
    try:
        history = await runs.read((dag_id, run_id), START)
    except (RedisError, OSError):
        return None
    fold = OutcomeFold(dag_id, run_id)
    for envelope in history:
        fold.apply(envelope)
    return fold.open_request(task_id, map_index)


def checked_options(answer: InputAnswer, asked: InputNeeded | None) -> list[str]:
    """The options to send: those chosen, which must be the request's (one of them unless it says
    multiple); left out, the request's only option."""
    chosen = answer.chosen_options
    if asked is None:
        if chosen is None:  # nothing to send, and no known request to take its only option from
            raise ApiError(
                404,
                "no_open_request",
                "the gateway knows no open request of this task instance: give chosen_options to pass an answer to Airflow anyway",
                accepted={"chosen_options": "required when the gateway knows no open request"},
            )
        return chosen
    accepted = {"options": asked.options, "multiple": asked.multiple}
    if asked.truncated and asked.options == [UNNAMED_OPTION]:
        raise ApiError(
            400,
            "bad_options",
            "none of the request's options fits the bounds of an answer (over 100 characters, or control characters): answer it in Airflow's UI",
            accepted=accepted,
        )
    if chosen is None:
        # A request cut to the bus's bounds may offer more than it says (or only the hook's "?" stand-in):
        # its one known option is not the only one, and Airflow 3.1/3.2 fail the task on a wrong one.
        if len(asked.options) != 1 or asked.truncated:
            raise ApiError(400, "bad_options", "give chosen_options: the request offers several", accepted=accepted)
        return list(asked.options)
    # Options past the bus's OPTIONS_MAX were left out of the request: Airflow (it has them all) judges those.
    options_cut = asked.truncated and len(asked.options) >= OPTIONS_MAX
    unknown = [option for option in chosen if option not in asked.options]
    if unknown and not options_cut:
        raise ApiError(400, "bad_options", f"not among the request's options: {unknown}", accepted=accepted)
    if not asked.multiple and len(chosen) != 1:
        raise ApiError(400, "bad_options", "the request takes exactly one option", accepted=accepted)
    if len(set(chosen)) != len(chosen):
        raise ApiError(400, "bad_options", "an option is chosen twice", accepted=accepted)
    return chosen


def check_params(answer: InputAnswer, asked: InputNeeded) -> None:
    """The form's values must name exactly the request's params when both are given: Airflow fails the
    task on resume otherwise (HITLOperator.validate_params_input)."""
    given, fields = set(answer.params_input), set(asked.params)
    if given and fields and given != fields and not asked.truncated:
        raise ApiError(
            400,
            "bad_params_input",
            f"params_input must give exactly the request's params: missing {sorted(fields - given)}, unknown {sorted(given - fields)}",
            accepted={"params": sorted(fields)},
        )


def received_event(dag_id: str, run_id: str, task_id: str, map_index: int, asked: InputNeeded | None) -> Event:
    """input_received, said once per task instance try (a stable id: a repeat is the same event)."""
    try_number = asked.try_number if asked is not None else None
    event_id = hashlib.sha256(f"gateway|{dag_id}|{run_id}|{task_id}|{map_index}|{try_number}|input".encode()).hexdigest()[:32]
    return Event(
        id=event_id,
        kind=EventKind.TASK,
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        try_number=try_number,
        state=TaskState.INPUT_RECEIVED.value,
        source=Source.GATEWAY,
    )


async def publish_received(request: Request, event: Event) -> None:
    """Best effort: Airflow has the answer; if this is lost, the task's resuming closes the request."""
    try:
        await asyncio.to_thread(request.app.state.publisher.publish_or_spool, event)
    except (SpoolUnavailable, RedisError, OSError) as exc:
        log.warning("input_received of %s/%s/%s not published: %s", event.dag_id, event.run_id, event.task_id, type(exc).__name__)
