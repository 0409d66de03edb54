"""Reading what a request says: its JSON body, path ids, timeouts, Last-Event-ID, and whether the hub has room.

Every endpoint parses its input here, so a bad value gets the same answer everywhere: a bad query
parameter, header or path id a 400, a malformed body a 422.
"""

from __future__ import annotations

import math
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from runbell.bus.schema import ID_MAX, START, Position, parse_position
from runbell.service.http.errors import ApiError
from runbell.service.live.hub import Hub

LAST_EVENT_ID_PARAM = "last_event_id"  # EventSource sends the header only on reconnects
BAD_BODY_STATUS = 422

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, model: type[Body], *, required: bool = True, code: str = "bad_body") -> Body:
    """The request's JSON body as the model. Not JSON, not an object, a wrong type or a bad value:
    ApiError 422 `code`, the message naming each problem and `accepted` listing them (type, loc,
    msg: never the input, which may be large or secret). An empty optional body is `{}`."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(
                BAD_BODY_STATUS, code, "a JSON body is required", accepted=[{"type": "missing", "loc": [], "msg": "a JSON body"}]
            )
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}" for error in errors)
        raise ApiError(BAD_BODY_STATUS, code, f"the body is not valid: {problems}", accepted=errors) from None


def run_path(request: Request) -> tuple[str, str]:
    dag_id, run_id = request.path_params["dag_id"], request.path_params["run_id"]
    for name, value in (("dag_id", dag_id), ("run_id", run_id)):
        if not value or len(value) > ID_MAX:
            raise ApiError(400, f"bad_{name}", f"{name} must be 1 to {ID_MAX} characters")
    return dag_id, run_id


def parse_timeout(request: Request) -> float:
    settings = request.app.state.settings
    raw = request.query_params.get("timeout")
    if raw is None:
        return settings.long_poll_default
    accepted = {"min": 0, "max": settings.long_poll_max, "unit": "seconds"}
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 <= value <= settings.long_poll_max):  # also false for nan
        raise ApiError(400, "bad_timeout", f"timeout must be a number of seconds from 0 to {settings.long_poll_max:g}", accepted=accepted)
    return value


def parse_last_event_id(request: Request) -> Position:
    """The position a stream resumes after: an SSE id as sent, EPOCH-SEQ, or a bare seq (an id from
    before epochs: the legacy epoch). Absent: the start."""
    raw: str | None = request.headers.get("last-event-id") or request.query_params.get(LAST_EVENT_ID_PARAM)
    if raw is None or raw == "":
        return START
    position = parse_position(raw)
    if position is None:
        raise ApiError(
            400,
            "bad_last_event_id",
            "Last-Event-ID must be an event id as sent: EPOCH-SEQ (EPOCH: lowercase letters and digits) or a sequence number",
            accepted="EPOCH-SEQ, or integer >= 0",
        )
    return position


def hub_with_room(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    if not hub.has_room():
        request.app.state.metrics.rejected.inc()
        message = "the gateway is shutting down" if hub.draining else "too many waiters and streams on this process"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "1"})
    return hub
