"""Reading what a request says: path ids, timeouts, Last-Event-ID, and whether the hub has room.

Every endpoint parses its input here, so a bad value gets the same 400 everywhere.
"""

from __future__ import annotations

import math

from starlette.requests import Request

from runbell.bus.schema import ID_MAX
from runbell.service.http.errors import ApiError
from runbell.service.live.hub import Hub

LAST_EVENT_ID_PARAM = "last_event_id"  # EventSource sends the header only on reconnects


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


def parse_last_event_id(request: Request) -> int:
    raw: str | None = request.headers.get("last-event-id") or request.query_params.get(LAST_EVENT_ID_PARAM)
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(
            400, "bad_last_event_id", "Last-Event-ID must be a sequence number (a non-negative integer)", accepted="integer >= 0"
        )
    return int(raw)


def hub_with_room(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    if not hub.has_room():
        request.app.state.metrics.rejected.inc()
        message = "the gateway is shutting down" if hub.draining else "too many waiters and streams on this process"
        raise ApiError(503, "unavailable", message, headers={"Retry-After": "1"})
    return hub
