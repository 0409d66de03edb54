"""Reading what a request says: its JSON body, path ids, numbers, timeouts, Last-Event-ID, and whether the hub has room.

Every endpoint parses its input here, so a bad value gets the same answer everywhere: a bad query
parameter, header or path id a 400, a malformed body a 422.

Numbers are ASCII only: str.isdigit() is true for '²', which int() refuses (a 500 once), and int()
and float() read Arabic-Indic and fullwidth digits, '1_0' and surrounding spaces, which no client
means. Ids are what Airflow's are: never a '/' (see `EncodedSlashes`) nor a control character (a
NUL is an error of PostgreSQL, CR and LF would break a header built from the id).
"""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from runbell.bus.schema import ID_MAX, START, Position, parse_position
from runbell.service.http.errors import ApiError, error_response
from runbell.service.live.hub import Hub

LAST_EVENT_ID_PARAM = "last_event_id"  # EventSource sends the header only on reconnects
INT_DIGITS_MAX = 18  # below 2**63: every integer read fits a BIGINT and a Redis integer
_SECONDS = re.compile(r"(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,3})?")  # no sign, inf, nan, '_' or space
ASSETS_PREFIX = b"/v1/assets/"  # asset names may hold '/', encoded or not
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
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
    return path_id(request, "dag_id"), path_id(request, "run_id")


def path_id(request: Request, name: str) -> str:
    """The id `name` of the request's path, checked as `checked_id`."""
    return checked_id(request.path_params[name], name)


def checked_id(value: str, name: str) -> str:
    """An id (dag, run, backfill, webhook): 1 to ID_MAX characters, none of them a control
    character. Else ApiError 400 bad_<name>."""
    if not value or len(value) > ID_MAX or has_control(value):
        raise ApiError(
            400,
            f"bad_{name}",
            f"{name} must be 1 to {ID_MAX} characters, none of them a control character",
            accepted={"min_length": 1, "max_length": ID_MAX},
        )
    return value


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def query_value(request: Request, name: str) -> str | None:
    """The query parameter `name`, given once at most (twice is a 400: which one was meant?)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"bad_{name}", f"{name} is given {len(values)} times; give it once", accepted="one value")
    return values[0] if values else None


def ascii_int(raw: str, max_digits: int = INT_DIGITS_MAX) -> int | None:
    """The non-negative integer `raw` spells in ASCII digits (at most max_digits), else None."""
    return int(raw) if 0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit() else None


def ascii_seconds(raw: str) -> float | None:
    """The non-negative number `raw` spells in ASCII (12.5, .5, 5e-1), else None."""
    return float(raw) if len(raw) <= 48 and raw.isascii() and _SECONDS.fullmatch(raw) else None


def int_param(request: Request, name: str, *, minimum: int, maximum: int, default: int) -> int:
    """The query parameter `name` as an integer from minimum to maximum; `default` when it is not
    given or empty. Else ApiError 400 bad_<name> saying what is accepted."""
    raw = query_value(request, name)
    if raw is None or raw == "":
        return default
    value = ascii_int(raw)
    if value is None or not minimum <= value <= maximum:
        raise ApiError(
            400,
            f"bad_{name}",
            f"{name} must be an integer from {minimum} to {maximum} (ASCII digits)",
            accepted={"min": minimum, "max": maximum, "default": default},
        )
    return value


def seconds_param(request: Request, name: str, maximum: float) -> float | None:
    """The query parameter `name` as a number of seconds from 0 to maximum; None when not given.
    Else ApiError 400 bad_<name> saying what is accepted."""
    raw = query_value(request, name)
    if raw is None:
        return None
    value = ascii_seconds(raw)
    if value is None or not 0 <= value <= maximum:
        raise ApiError(
            400,
            f"bad_{name}",
            f"{name} must be a number of seconds from 0 to {maximum:g}",
            accepted={"min": 0, "max": maximum, "unit": "seconds"},
        )
    return value


def parse_timeout(request: Request) -> float:
    settings = request.app.state.settings
    timeout = seconds_param(request, "timeout", settings.long_poll_max)
    return settings.long_poll_default if timeout is None else timeout


def parse_last_event_id(request: Request) -> Position:
    """The position a stream resumes after: an SSE id as sent, EPOCH-SEQ, or a bare seq (an id from
    before epochs: the legacy epoch). Absent: the start."""
    raw: str | None = request.headers.get("last-event-id") or query_value(request, LAST_EVENT_ID_PARAM)
    return position_value(raw, "bad_last_event_id", "Last-Event-ID must be an event id as sent")


def position_value(raw: str | None, code: str, what: str) -> Position:
    """A position as the gateway sends them (EPOCH-SEQ, or a bare seq); absent or empty: the start."""
    if raw is None or raw == "":
        return START
    position = parse_position(raw)
    if position is None:
        raise ApiError(
            400,
            code,
            f"{what}: EPOCH-SEQ (EPOCH: lowercase letters and digits) or a sequence number",
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


class EncodedSlashes:
    """A '%2F' in a path id is a 400, on every route but the assets' (whose names may hold '/').

    Starlette routes on the percent-decoded path, so `/v1/dags/d/runs/x%2Fresult` would be run
    "x"'s result, and `/v1/dags/a%2Fb/runs` no route at all. Airflow's dag and run ids never hold
    '/' (`[\\w.-]` and, by default, `[A-Za-z0-9_.~:+-]`), nor do the gateway's own ids, so such a
    path names nothing: it is refused as a whole, before routing, the same way everywhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = (scope.get("raw_path") or b"") if scope["type"] == "http" else b""
        if b"%2f" in raw_path.lower() and not raw_path.startswith(ASSETS_PREFIX):
            response = error_response(
                400,
                "bad_path",
                "an id in the path holds an encoded '/' (%2F): dag, run, backfill and webhook ids never hold '/'",
                accepted="each id as one path segment, without '/'",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
