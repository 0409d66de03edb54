"""Trigger-and-wait in one call: POST /v1/dags/{dag_id}/runs.

The gateway names the run itself (so it can follow it from the first event), triggers it through
Airflow's REST API, then waits for the outcome exactly as the result endpoint does. The caller's
disconnect or timeout never cancels the run, unless it asked for that (``cancel_on_disconnect``:
runbell.service.airflow.cancels).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import string
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote

from opentelemetry.trace import SpanKind
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from runbell.bus.schema import Event, EventKind, RunState, Source, TraceContext
from runbell.listeners.tracing import conf_with
from runbell.service.airflow.api import AirflowClient, AirflowUnavailable, RunExists
from runbell.service.core import clock, tracing
from runbell.service.core.outcome import Outcome
from runbell.service.http.auth import Role, authorize, issue_run_token
from runbell.service.http.contract import CreatedCallback, RunToken
from runbell.service.http.errors import ApiError
from runbell.service.http.idempotency import Claim, IdempotencyKeys, fingerprint
from runbell.service.http.params import ascii_seconds, path_id, read_body, seconds_param
from runbell.service.http.run_routes import caller_trace, outcome_response, parse_resolve, wait_for_outcome
from runbell.service.http.webhooks import reachable_target
from runbell.service.webhooks.outbox import Endpoint, WebhookStore, callback_id
from runbell.service.webhooks.rules import RESERVED_HEADERS, Callback, header_problem

RUN_ID_ATTEMPTS = 5
SERVER_ERROR_RETRIES = 2  # Airflow on SQLite answers 500 when its database is briefly locked
SERVER_ERROR_BACKOFF_SECONDS = 0.5
SUFFIX_ALPHABET = string.ascii_letters + string.digits
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.~:+-]{1,250}$")  # Airflow's default allowed_run_id_pattern


class TriggerRequest(BaseModel):
    """The body of POST /v1/dags/{dag_id}/runs (optional: an empty body is {})."""

    model_config = ConfigDict(extra="forbid")

    conf: dict[str, Any] = Field(default_factory=dict, description="the run's conf")
    # clock.as_utc: a time outside years 1-9999 in UTC is a 422 naming the field, not Airflow's error
    logical_date: Annotated[datetime, AfterValidator(clock.as_utc)] | None = None
    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN.pattern, description="default: the gateway names the run")
    note: str | None = Field(default=None, max_length=1000)
    cancel_on_disconnect: bool = Field(
        default=False,
        description="if this call's connection closes before its answer, fail the run in Airflow after RUNBELL_CANCEL_GRACE, "
        "unless its outcome is decided, someone else waits on it or a callback is registered",
    )
    callback: Callback | None = Field(
        default=None,
        description="a webhook for this run only: its outcome (and any other kinds asked for) is posted there, signed and retried "
        "as a subscription's; checked by the same target guard",
    )


async def trigger_run(request: Request) -> Response:
    dag_id = path_id(request, "dag_id")
    authorize(request, Role.TRIGGER, dag_id=dag_id)  # triggering and ?unpause=true: the trigger role
    body = await read_body(request, TriggerRequest, required=False)  # a bad request is the caller's, whatever the gateway lacks
    caller = caller_trace(request)
    with tracing.span("runbell.trigger", caller, kind=SpanKind.SERVER, attributes={"runbell.dag_id": dag_id}) as span:
        response = await trigger_and_wait(request, dag_id, body)
        span.set_attribute("http.response.status_code", response.status_code)
        return response


async def trigger_and_wait(request: Request, dag_id: str, body: TriggerRequest) -> Response:
    airflow: AirflowClient | None = request.app.state.airflow
    if airflow is None:
        raise ApiError(503, "airflow_not_configured", "this gateway has no Airflow connection (set RUNBELL_AIRFLOW_URL)")
    wait, applied = parse_wait(request)
    resolve = parse_resolve(request)
    if body.cancel_on_disconnect and wait <= 0:
        raise ApiError(
            400,
            "bad_wait",
            "cancel_on_disconnect needs a wait: ?wait=S or Prefer: wait=S (a call that waits can go away)",
            accepted="wait > 0",
        )
    if body.callback is not None:
        callback_store(request)  # 503 before anything is triggered, when this gateway keeps no webhooks
        problem = header_problem(body.callback.headers)
        if problem is not None:
            raise ApiError(422, "reserved_header", f"callback.headers: {problem}", accepted=sorted(RESERVED_HEADERS))
        await reachable_target(request, body.callback.url)
    run_id, callback = await asyncio.shield(start_run(request, airflow, dag_id, body))  # a disconnect must not stop it
    state = request.app.state
    token, expires = issue_run_token(state.token_secret, dag_id, run_id, state.settings.scoped_token_ttl)
    if body.cancel_on_disconnect:
        waited = await wait_unless_gone(request, dag_id, run_id, wait)
        if waited is None:  # the caller went away before its answer: nobody reads one
            request.app.state.cancels.schedule(dag_id, run_id)
            return Response(status_code=499)
        outcome = waited
    else:
        outcome = await wait_for_outcome(request, dag_id, run_id, wait)
    headers = {"Location": result_location(dag_id, run_id)}
    if applied:
        headers["Preference-Applied"] = f"wait={wait:g}"
    created = CreatedCallback.of(callback) if callback is not None else None
    answer = RunToken(token=token, token_expires_at=expires, callback=created)
    return await outcome_response(request, outcome, answer, headers=headers, resolve=resolve)


async def wait_unless_gone(request: Request, dag_id: str, run_id: str, wait: float) -> Outcome | None:
    """The outcome as wait_for_outcome gives it (decided, or pending at the wait's end); None when the
    caller's connection closed first."""
    waiting = asyncio.ensure_future(wait_for_outcome(request, dag_id, run_id, wait))
    leaving = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, leaving):
            task.cancel()
        await asyncio.gather(waiting, leaving, return_exceptions=True)
    if waiting.cancelled() or leaving.done() and not leaving.cancelled():
        return None
    return waiting.result()  # an error of the wait (404: no such run) is the caller's answer


async def disconnected(request: Request) -> None:
    """Returns when the caller's connection closes (its body is read already: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def callback_store(request: Request) -> WebhookStore:
    store: WebhookStore | None = getattr(request.app.state, "webhooks", None)
    if store is None:
        raise ApiError(503, "webhooks_unavailable", "this gateway keeps no webhooks: a callback cannot be registered")
    return store


async def start_run(request: Request, airflow: AirflowClient, dag_id: str, body: TriggerRequest) -> tuple[str, Endpoint | None]:
    """Trigger the run once, whatever the caller retries; return its run id, and the callback this
    call registered. The callback is registered before the trigger, so no event of the run precedes it."""
    idempotency_key = request.headers.get("idempotency-key")
    keys: IdempotencyKeys = request.app.state.idempotency
    payload = body.model_dump(mode="json")
    print_ = fingerprint(dag_id, payload)
    claim = Claim(body.run_id or new_run_id(), must_trigger=True)
    if idempotency_key is not None:
        claim = await keys.claim(idempotency_key, print_, claim.run_id)
        if not claim.must_trigger:  # the first call triggered it, and registered its callback
            known = await callback_store(request).get_endpoint(callback_id(dag_id, claim.run_id)) if body.callback else None
            return claim.run_id, known
    callback: Endpoint | None = None
    try:
        await check_dag(airflow, dag_id, unpause=request.query_params.get("unpause") == "true")
        if body.callback is not None:
            callback = await register_callback(request, dag_id, claim.run_id, body.callback)
        traced = body.model_copy(update={"conf": conf_with(body.conf, tracing.current())})  # the hook's spans join the trigger's trace
        run_id = await trigger(airflow, dag_id, traced, claim.run_id, caller_named=body.run_id is not None, resumed=claim.resumed)
    except BaseException:
        if idempotency_key is not None:
            await keys.release(idempotency_key)
        if callback is not None:
            await callback_store(request).delete_endpoint(callback.id)  # no run: nothing to call back about
        raise
    # The run exists now: nothing below may release the key (a retry would trigger a second run).
    if body.callback is not None and run_id != claim.run_id:  # the drawn id was taken: the run has another
        if callback is not None:
            await callback_store(request).delete_endpoint(callback.id)
        callback = await register_callback(request, dag_id, run_id, body.callback)
    if idempotency_key is not None:
        await keys.done(idempotency_key, print_, run_id)
    await asyncio.to_thread(request.app.state.publisher.publish, queued_event(dag_id, run_id, tracing.current()))
    return run_id, callback


async def register_callback(request: Request, dag_id: str, run_id: str, callback: Callback) -> Endpoint:
    expires_at = clock.now() + timedelta(seconds=request.app.state.settings.callback_ttl)
    return await callback_store(request).create_endpoint(
        url=callback.url,
        description=f"callback of run {run_id} of {dag_id}",
        dag_ids=[dag_id],
        kinds=[kind.value for kind in callback.kinds],
        run_id=run_id,
        headers=callback.headers,
        expires_at=expires_at,
    )


async def check_dag(airflow: AirflowClient, dag_id: str, *, unpause: bool) -> None:
    dag = await airflow.get_dag(dag_id)  # DagNotFound -> 404
    if dag.get("is_paused"):
        if not unpause:
            raise ApiError(
                409,
                "dag_paused",
                f"DAG {dag_id!r} is paused: its runs would wait until it is unpaused. "
                "Unpause it in Airflow, or pass ?unpause=true to have the gateway unpause it.",
            )
        await airflow.unpause(dag_id)


async def trigger(airflow: AirflowClient, dag_id: str, body: TriggerRequest, run_id: str, *, caller_named: bool, resumed: bool) -> str:
    """POST the run to Airflow. A clash on a run id the gateway drew is retried with a new one; an
    error answer (5xx) is retried with the same id, since the run may exist despite the error."""
    server_errors = 0
    for _ in range(RUN_ID_ATTEMPTS):
        try:
            await airflow.trigger_run(
                dag_id,
                run_id=run_id,
                conf=body.conf,
                logical_date=body.logical_date.isoformat() if body.logical_date else None,
                note=body.note,
            )
            return run_id
        except AirflowUnavailable as exc:
            server_errors += 1
            if exc.code != "airflow_error" or server_errors > SERVER_ERROR_RETRIES:
                raise
            resumed = True  # a 409 on the retry means the failed-looking attempt did trigger it
            await asyncio.sleep(SERVER_ERROR_BACKOFF_SECONDS)
        except RunExists:
            if resumed:
                return run_id  # an earlier attempt (or the first call, which died) did trigger it
            if caller_named:
                raise ApiError(409, "run_exists", f"DAG {dag_id!r} already has a run {run_id!r}") from None
            run_id = new_run_id()
    raise ApiError(409, "run_exists", "could not draw a free run id; retry")


def new_run_id() -> str:
    """manual__<run_after ISO-8601>_<8 random [A-Za-z0-9]>: Airflow's manual shape, made unique."""
    suffix = "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(8))
    return f"manual__{clock.iso(clock.now())}_{suffix}"


def queued_event(dag_id: str, run_id: str, trace: TraceContext | None = None) -> Event:
    """Airflow has no listener hook for a queued run: the gateway says it, once (a stable id)."""
    event_id = hashlib.sha256(f"gateway|{dag_id}|{run_id}|queued".encode()).hexdigest()[:32]
    return Event(
        id=event_id,
        kind=EventKind.RUN,
        dag_id=dag_id,
        run_id=run_id,
        state=RunState.QUEUED.value,
        source=Source.GATEWAY,
        run_type="manual",
        trace=trace,
    )


def parse_wait(request: Request) -> tuple[float, bool]:
    """How long to wait for the outcome: ?wait=S, or the standard `Prefer: wait=S` (RFC 7240),
    capped at the long-poll maximum. Returns (seconds, whether a Prefer header was applied)."""
    maximum = request.app.state.settings.long_poll_max
    wait = seconds_param(request, "wait", maximum)
    if wait is not None:
        return wait, False
    for preference in re.split(r"[,;]", request.headers.get("prefer", "")):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            seconds = ascii_seconds(value.strip())
            if seconds is None:
                break  # RFC 7240: a preference that cannot be honoured is ignored
            return min(seconds, maximum), True
    return 0.0, False


def result_location(dag_id: str, run_id: str) -> str:
    return f"/v1/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/result"
