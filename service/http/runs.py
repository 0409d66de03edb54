"""The runs listing and one run with its task instances, from the store.

GET /v1/runs and GET /v1/dags/{dag_id}/runs: filters (dag_id, run_type, backfill_id, a run_after
range, status) are applied in the SQL WHERE, so a page holds matching rows; pages follow the keyset
(run_after, dag_id, run_id), newest first by default, so new runs arriving while a client pages
neither repeat nor skip a row. The cursor is opaque: base64url JSON with an HMAC-SHA256 over it
(keyed from the gateway's token secret), bound to the query's filters and order; a malformed,
tampered or foreign cursor is a 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.service.core import clock, metaflow_status
from runbell.service.http.auth import Role, authorize
from runbell.service.http.contract import ProgressValue, RunDetail, RunRow, RunsPage, TaskInstanceRow
from runbell.service.http.errors import ApiError
from runbell.service.http.params import checked_id, int_param, run_path
from runbell.service.store.store import (
    RUN_STATES,
    RunQuery,
    RunRecord,
    Store,
    TaskInstanceRecord,
)

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
# Airflow 3's DagRunType values (the first four are the usual ones), and Metaflow's runs.
RUN_TYPES = ("manual", "scheduled", "backfill", "asset_triggered", "operator_triggered", "asset_materialization", metaflow_status.RUN_TYPE)
ORDERS = ("desc", "asc")
CURSOR_VERSION = 1
CURSOR_MAC_BYTES = 16
CURSOR_MAX_LENGTH = 2048


# -- endpoints ------------------------------------------------------------------------------------


async def list_runs(request: Request) -> Response:
    """GET /v1/runs and GET /v1/dags/{dag_id}/runs (role read): a token limited to some DAGs names
    one of them, or is given the runs of its DAGs only."""
    principal = authorize(request, Role.READ, per_dag=True)
    query, fingerprint = parse_query(request)
    if query.dag_id is not None:
        principal.check_dag(query.dag_id)
    elif not principal.dags.every_dag:
        query = replace(query, dag_patterns=principal.dags.patterns)
    query = apply_cursor(request, query, fingerprint)
    now = time.time()
    stale_after = request.app.state.settings.stale_after
    # Time-relative, so not part of the cursor's fingerprint (as Metaflow's own filter says of it).
    query = replace(query, heartbeat_cutoff=clock.from_epoch(now - stale_after))
    store: Store = request.app.state.store
    # One row more than asked tells whether there is a next page without a count.
    rows = await store.list_runs(replace(query, limit=query.limit + 1))
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    cursor, headers = None, {}
    if more and rows:
        last = rows[-1]
        cursor = encode_cursor(cursor_key(request), fingerprint, query.descending, (last.run_after, last.dag_id, last.run_id))
        headers["Link"] = f'<{next_url(request, cursor)}>; rel="next"'
    page = RunsPage(runs=[run_row(r, now, stale_after) for r in rows], next_cursor=cursor)
    return JSONResponse(page.model_dump(mode="json"), headers=headers)


async def get_run(request: Request) -> Response:
    """GET /v1/dags/{dag_id}/runs/{run_id} (role read): the row plus its task instances and its latest progress per key."""
    dag_id, run_id = run_path(request)
    authorize(request, Role.READ, run=(dag_id, run_id))
    store: Store = request.app.state.store
    run = await store.get_run(dag_id, run_id)
    if run is None:
        raise ApiError(404, "run_not_found", f"the gateway has no record of run {run_id!r} of DAG {dag_id!r}")
    tries = await store.task_instances(dag_id, run_id)
    progress = [ProgressValue(**{**asdict(p), "position": str(p.position)}) for p in await store.progress(dag_id, run_id)]
    row = run_row(run, time.time(), request.app.state.settings.stale_after)
    detail = RunDetail(**dict(row), task_instances=[task_instance_row(t) for t in tries], progress=progress)
    return JSONResponse(detail.model_dump(mode="json"))


# -- rows -----------------------------------------------------------------------------------------


def run_row(run: RunRecord, now: float, stale_after: float) -> RunRow:
    state = metaflow_status.listed_state(run.state, run.run_type, run.alive_at.timestamp(), now, stale_after)
    return RunRow.model_validate(  # the stored outcome parts (JSON) validated into their models
        {
            "dag_id": run.dag_id,
            "run_id": run.run_id,
            "state": state,
            "logical_date": run.logical_date,
            "run_after": run.run_after,
            "run_type": run.run_type,
            "backfill_id": run.backfill_id,
            "started": run.started_at,
            "ended": run.ended_at,
            "outcome": run.outcome_status,
            "result_task": run.result_task,
            "first_failure": run.first_failure,
            "stale": state == "running" and is_stale(run, now, stale_after),
        }
    )


def is_stale(run: RunRecord, now: float, stale_after: float) -> bool:
    """Running, yet silent (no event, no heartbeat) for longer than the cutoff. A run's terminal event makes its state
    terminal for good (never stale); a try being retried keeps it running (up_for_retry is not a
    run failure), so a long retry delay can read as stale."""
    return run.state == "running" and now - run.alive_at.timestamp() > stale_after


def task_instance_row(ti: TaskInstanceRecord) -> TaskInstanceRow:
    return TaskInstanceRow(
        task_id=ti.task_id, map_index=ti.map_index, try_number=ti.try_number, state=ti.state, started=ti.started_at, ended=ti.ended_at
    )


# -- query parsing --------------------------------------------------------------------------------


def parse_query(request: Request) -> tuple[RunQuery, str]:
    """The filters and order of the request, and their fingerprint (which a cursor is bound to)."""
    params = request.query_params
    dag_id = request.path_params.get("dag_id")
    if dag_id is None:
        dag_id = params.get("dag_id") or None
    if dag_id is not None:
        checked_id(dag_id, "dag_id")
    states = multi_value(request, "status", RUN_STATES, "bad_status")
    run_types = multi_value(request, "run_type", RUN_TYPES, "bad_run_type")
    backfill_id = params.get("backfill_id") or None
    if backfill_id is not None:
        checked_id(backfill_id, "backfill_id")
    gte, lte = parse_time(request, "run_after_gte"), parse_time(request, "run_after_lte")
    order = params.get("order", "desc")
    if order not in ORDERS:
        raise ApiError(400, "bad_order", "order must be desc (newest first) or asc", accepted=list(ORDERS))
    limit = parse_limit(request)
    query = RunQuery(
        dag_id=dag_id,
        run_types=run_types,
        backfill_id=backfill_id,
        run_after_gte=gte,
        run_after_lte=lte,
        states=states,
        descending=order == "desc",
        limit=limit,
    )
    canonical = json.dumps([dag_id, run_types, backfill_id, clock.iso(gte), clock.iso(lte), states, order], separators=(",", ":"))
    return query, hashlib.sha256(canonical.encode()).hexdigest()[:16]


def multi_value(request: Request, name: str, accepted: tuple[str, ...], code: str) -> tuple[str, ...]:
    """?name=a&name=b and ?name=a,b both mean a OR b; sorted, without repeats. Unknown: 400."""
    values = {v.strip() for raw in request.query_params.getlist(name) for v in raw.split(",") if v.strip()}
    unknown = sorted(values - set(accepted))
    if unknown:
        raise ApiError(
            400, code, f"unknown {name} {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}", accepted=list(accepted)
        )
    return tuple(sorted(values))


def parse_time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return clock.parse(raw)  # an empty value too is refused: it is no bound, and no time
    except ValueError:
        raise ApiError(
            400, f"bad_{name}", f"{name} must be an ISO-8601 date or time (naive means UTC)", accepted="ISO-8601, e.g. 2026-05-01T00:00:00Z"
        ) from None


def parse_limit(request: Request) -> int:
    return int_param(request, "limit", minimum=1, maximum=MAX_LIMIT, default=DEFAULT_LIMIT)


# -- the cursor -----------------------------------------------------------------------------------


def cursor_key(request: Request) -> bytes:
    """The cursor's MAC key, derived from the token secret (replicas sharing it accept each
    other's cursors; with a random per-process secret a cursor dies with its process)."""
    secret = request.app.state.token_secret
    return hmac.new(secret.encode(), b"runbell runs cursor v1", hashlib.sha256).digest()


def encode_cursor(key: bytes, fingerprint: str, descending: bool, position: tuple[datetime, str, str]) -> str:
    run_after, dag_id, run_id = position
    payload = json.dumps(
        {
            "v": CURSOR_VERSION,
            "q": fingerprint,
            "o": "desc" if descending else "asc",
            "k": [clock.iso(run_after), dag_id, run_id],
        },
        separators=(",", ":"),
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:CURSOR_MAC_BYTES]
    return _b64(payload) + "." + _b64(mac)


def decode_cursor(key: bytes, cursor: str) -> dict[str, Any]:
    """The cursor's payload; ApiError 400 bad_cursor when it is malformed or its MAC is wrong."""
    bad = ApiError(
        400,
        "bad_cursor",
        "the cursor is malformed or was altered; use next_cursor exactly as given",
        accepted="the next_cursor of a previous page of the same query",
    )
    if len(cursor) > CURSOR_MAX_LENGTH or cursor.count(".") != 1:
        raise bad
    raw_payload, raw_mac = cursor.split(".")
    try:
        payload, mac = _unb64(raw_payload), _unb64(raw_mac)
    except (binascii.Error, ValueError):
        raise bad from None
    expected = hmac.new(key, payload, hashlib.sha256).digest()[:CURSOR_MAC_BYTES]
    if not hmac.compare_digest(mac, expected):
        raise bad
    try:
        data = json.loads(payload)
        run_after = clock.parse(data["k"][0])
        dag_id, run_id = data["k"][1], data["k"][2]
        if data["v"] != CURSOR_VERSION or not isinstance(dag_id, str) or not isinstance(run_id, str):
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise bad from None
    return {"q": data.get("q"), "o": data.get("o"), "k": (run_after, dag_id, run_id)}


def apply_cursor(request: Request, query: RunQuery, fingerprint: str) -> RunQuery:
    raw = request.query_params.get("cursor")
    if raw is None or raw == "":
        return query
    data = decode_cursor(cursor_key(request), raw)
    if data["q"] != fingerprint or data["o"] != ("desc" if query.descending else "asc"):
        raise ApiError(
            400,
            "bad_cursor",
            "the cursor belongs to another query: keep the filters and order of the page that gave it",
            accepted="the next_cursor of a previous page of the same query",
        )
    return replace(query, after=data["k"])


def next_url(request: Request, cursor: str) -> str:
    """The next page's URL: this request's path and query, with the new cursor (relative, so it
    holds behind a proxy)."""
    items = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    items.append(("cursor", cursor))
    # Percent-encoded, so the header is ASCII whatever the dag id holds (é, a space, '>', ';'); the
    # path's '/' are its own, an id never holds one (EncodedSlashes).
    return f"{quote(request.url.path)}?{urlencode(items)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
