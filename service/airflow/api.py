"""An async client of Airflow 3's REST API (/api/v2): trigger runs, and read back what the event
bus may have lost (run state, task instances, XCom values).

Checked against apache-airflow 3.3.2's source:
- token: POST {base}/auth/token, JSON {"username", "password"} -> 201 {"access_token": JWT}
  (simple auth manager, mounted under /auth); the JWT carries iat/nbf/exp and lives
  [api_auth] jwt_expiration_time (default 86400 s). An expired token gets 401 "Token Expired"; a
  token whose signature no longer verifies (secret rotated, api-server restarted) gets 403
  "Invalid JWT token".
- lists are capped at [api] maximum_page_limit (default 100) whatever `limit` asks; task
  instances page by keyset cursor (`cursor=""`, then `next_cursor` until null) since 3.2, by
  limit/offset before.
- an XCom entry comes back as stored: what the task SDK's serde made of the value, i.e. plain JSON
  values as they are and other types as {"__classname__", "__version__", "__data__"} envelopes.
  `deserialize=true` is for display, not data: it re-parses strings as JSON ("42" becomes 42) and
  renders a tuple as the string "(1,x)" (seen with 3.3.2), so it is not used.
- an unknown route under /api answers 404 {"error": "API route not found"} (3.1.8, 3.2.2, 3.3.2: a
  catch-all in the core API app), not FastAPI's {"detail": "Not Found"}.

A backfill's slots (its backfill_dag_run rows): `GET /api/v2/backfills/{id}/dag_runs`, added by
apache/airflow PR #67381 (released in 3.4; 3.1 to 3.3 have no such route). Read from that PR's
datamodels/backfills.py and routes/public/backfills.py:
- answer: {"backfill_dag_runs": [...], "total_entries": int}; each entry {"id", "backfill_id",
  "dag_id" (the backfill's), "dag_run_id" (the run's run_id string, null for a slot Airflow skipped),
  "logical_date" (null for a partitioned backfill), "partition_key", "sort_ordinal",
  "exception_reason", "dag_run_state" (null without a run)};
- limit (default 50, capped at maximum_page_limit) / offset paging; order_by "sort_ordinal"
  (default) or "id", the primary key always appended as the tie-break: sort_ordinal, then id;
- an unknown backfill: 404 {"detail": "Backfill with id N not found"}; a negative id: 422.
Whether the route exists is probed (feature detection, never a version number): ask it for
backfill 0, which no Airflow has (ids start at 1). A 404 that speaks of a backfill means the route
answered; any other 404 (the catch-all above, a proxy's) or a page that is no JSON collection means
it is not there.

Errors are typed, each with the HTTP status and code the gateway should answer with; no message
ever carries the password or a token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ValidationError, field_validator

from runbell.service.core import clock
from runbell.service.core.loops import within

log = logging.getLogger("runbell.airflow_api")

TOKEN_PATH = "/auth/token"
PAGE_LIMIT = 100  # Airflow's default maximum_page_limit; a smaller server cap just means more pages
MAX_PAGES = 10_000  # a guard against a server that never stops paging
DETAIL_MAX = 300  # characters of Airflow's error text kept in a message
REFRESH_MARGIN_MIN = 60.0  # refresh a JWT when less than max(60 s, 10% of its life) remains...
REFRESH_MARGIN_SHARE = 0.1  # ...but never earlier than half-way, so a short token is still reused
BACKFILL_DAG_RUNS = "/api/v2/backfills/{backfill_id}/dag_runs"  # PR #67381, Airflow 3.4+
PROBE_BACKFILL_ID = 0  # no Airflow has it: ids start at 1, and 0 passes the route's NonNegativeInt
# How long the probe's finding holds: an Airflow upgraded (or rolled back) behind the same URL is
# seen within this, without restarting the gateway. A rollback is also seen at once: a listing that
# meets a missing route says so.
ROUTE_RECHECK_SECONDS = 300.0


@dataclass
class AirflowSettings:
    base_url: str
    token: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 10.0

    def __repr__(self) -> str:  # dataclass' repr would print the secrets
        return f"AirflowSettings(base_url={_display_url(self.base_url)!r}, timeout={self.timeout})"


class AirflowError(Exception):
    """Base: `.status` is what the gateway answers, `.code` a short snake_case error code."""

    status = 502
    code = "airflow_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(AirflowError):
    """Airflow answered 404 for something other than the DAG itself (a run, an XCom entry)."""

    status, code = 404, "not_found"


class DagNotFound(NotFound):
    status, code = 404, "unknown_dag"


class RunExists(AirflowError):
    status, code = 409, "run_exists"


class NoOpenRequest(NotFound):
    """No task instance, or it has no HITL detail (it never asked)."""

    status, code = 404, "no_open_request"


class AlreadyAnswered(AirflowError):
    status, code = 409, "already_answered"


class AnswerRefused(AirflowError):
    """Airflow refused the answer itself: options not offered, several for a single choice (3.3+), a
    malformed body; or the gateway's Airflow user is not among the request's assigned users (403)."""

    status, code = 400, "answer_refused"


class AirflowAuthFailed(AirflowError):
    status, code = 502, "airflow_auth_failed"


class AirflowUnavailable(AirflowError):
    """Unreachable or timed out (503, airflow_unreachable), or a 5xx answer (502, airflow_error)."""

    status, code = 503, "airflow_unreachable"


class AirflowBadRequest(AirflowError):
    status, code = 502, "airflow_rejected"


class RouteMissing(AirflowError):
    """This Airflow has no such route (an older release): use another way, never the caller's fault."""

    status, code = 501, "airflow_route_missing"


class BackfillDagRun(BaseModel):
    """One slot of a backfill as GET /api/v2/backfills/{id}/dag_runs gives it (the fields read;
    partition_key is not: a slot here is a logical date)."""

    sort_ordinal: int
    logical_date: datetime | None
    dag_id: str
    dag_run_id: str | None  # the run's run_id
    dag_run_state: str | None
    exception_reason: str | None

    @field_validator("logical_date")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return clock.as_utc(value) if value is not None else None  # as the database path gives it


@dataclass
class RouteCheck:
    """What the last probe found of an optional route, and when (time.monotonic(); None: never)."""

    present: bool = False
    at: float | None = None

    def fresh(self) -> bool:
        return self.at is not None and time.monotonic() - self.at < ROUTE_RECHECK_SECONDS


class AirflowClient:
    def __init__(self, settings: AirflowSettings, *, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self._base = settings.base_url.rstrip("/")
        self._where = _display_url(self._base)
        self._http = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(settings.timeout),  # connect, read, write and pool
        )
        # httpx bounds each socket operation; this bounds a whole exchange (a server trickling one
        # byte at a time would otherwise reset the read timeout forever).
        self._exchange_bound = 2 * settings.timeout
        self._use_login = bool(settings.username) and settings.password is not None and not settings.token
        self._jwt: str | None = None
        self._old_jwt: str | None = None  # still redacted: a message may echo the one just replaced
        self._refresh_at = 0.0  # time.monotonic() after which the cached JWT is replaced
        self._token_lock = asyncio.Lock()
        self._backfill_dag_runs = RouteCheck()
        self._probe_lock = asyncio.Lock()

    @property
    def where(self) -> str:
        """The base URL as messages show it (without any user:password@)."""
        return self._where

    async def __aenter__(self) -> AirflowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- API ------------------------------------------------------------------------------------

    async def get_dag(self, dag_id: str) -> dict:
        path = f"/api/v2/dags/{_q(dag_id)}"
        resp = await self._call("GET", path)
        self._raise_for(resp, "GET", path, not_found=lambda m: DagNotFound(f"Airflow knows no DAG {dag_id!r}"))
        return _json_object(resp, self._where)

    async def unpause(self, dag_id: str) -> None:
        path = f"/api/v2/dags/{_q(dag_id)}"
        resp = await self._call("PATCH", path, params={"update_mask": "is_paused"}, json={"is_paused": False})
        self._raise_for(resp, "PATCH", path, not_found=lambda m: DagNotFound(f"Airflow knows no DAG {dag_id!r}"))

    async def trigger_run(
        self,
        dag_id: str,
        *,
        run_id: str | None = None,
        conf: dict[str, Any] | None = None,
        logical_date: datetime | str | None = None,
        note: str | None = None,
    ) -> dict:
        """Create a manual run. `logical_date` None makes a run without one (Airflow 3's default for
        manual runs); the field itself is required by Airflow, so it is always sent."""
        if isinstance(logical_date, datetime):
            if logical_date.tzinfo is None:
                raise ValueError("logical_date must be timezone-aware (Airflow rejects naive datetimes)")
            logical_date = logical_date.isoformat()
        body = {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf or {}, "note": note}
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns"
        resp = await self._call("POST", path, json=body)
        self._raise_for(
            resp,
            "POST",
            path,
            not_found=lambda m: DagNotFound(f"Airflow knows no DAG {dag_id!r} (or has not parsed it yet)"),
            conflict=lambda m: RunExists(
                (f"DAG {dag_id!r} already has a run {run_id!r}" if run_id else f"DAG {dag_id!r} already has that run")
                + (" (or one at that logical date)" if logical_date else "")
            ),
        )
        return _json_object(resp, self._where)

    async def fail_run(self, dag_id: str, run_id: str, note: str) -> None:
        """Mark a run failed, as Airflow's UI does (PATCH its state; its unfinished tasks are stopped),
        with a note saying why (Airflow keeps at most 1000 characters)."""
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}"
        resp = await self._call("PATCH", path, json={"state": "failed", "note": note[:1000]})
        self._raise_for(resp, "PATCH", path, not_found=lambda m: NotFound(f"Airflow has no run {run_id!r} of DAG {dag_id!r}"))

    async def get_run(self, dag_id: str, run_id: str) -> dict | None:
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}"
        resp = await self._call("GET", path)
        if resp.status_code == 404:
            return None
        self._raise_for(resp, "GET", path)
        return _json_object(resp, self._where)

    async def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of the run (current try each; mapped ones one per map_index), all pages."""
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances"

        def not_found(detail: str) -> NotFound:
            return NotFound(f"Airflow knows no run {run_id!r} of DAG {dag_id!r}", code="unknown_run")

        found: list[dict] = []
        cursor: str | None = ""  # keyset paging: stable while the run adds mapped instances
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"limit": PAGE_LIMIT, "order_by": "id"}
            if cursor is not None:
                params["cursor"] = cursor
            else:
                params["offset"] = len(found)
            resp = await self._call("GET", path, params=params)
            self._raise_for(resp, "GET", path, not_found=not_found)
            page = _json_object(resp, self._where)
            items = page.get("task_instances")
            if not isinstance(items, list):
                raise _bad_answer(self._where, "answered a task instance page without a list")
            found.extend(items)
            # Asked with a cursor, an Airflow with cursor paging (3.2+) answers a page with next_cursor (3.2
            # without any total; 3.3 with total_entries_limit); one without it (3.1) has no such field.
            if cursor is not None and "next_cursor" in page:
                cursor = page.get("next_cursor")  # cursor mode answered: null means the last page
                if not cursor or not items:
                    return found
                continue
            # An Airflow without cursor paging (before 3.2) answered in offset mode; so continue.
            cursor = None
            total = page.get("total_entries")
            if not items or not isinstance(total, int) or len(found) >= total:
                return found
        raise _bad_answer(self._where, f"kept paging task instances past {MAX_PAGES} pages")

    async def task_instance_state(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str | None:
        """The task instance's state as Airflow has it now (None: no such task instance, or no state)."""
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
        if map_index >= 0:
            path += f"/{map_index}"
        resp = await self._call("GET", path)
        if resp.status_code == 404:
            return None
        self._raise_for(resp, "GET", path)
        state = _json_object(resp, self._where).get("state")
        return state if isinstance(state, str) else None

    async def answer_input(
        self, dag_id: str, run_id: str, task_id: str, map_index: int, chosen_options: list[str], params_input: dict[str, Any]
    ) -> dict:
        """Answer a task waiting for a person (a HITL operator), as Airflow's UI does: PATCH its HITL
        detail (the same path on 3.1, 3.2 and 3.3). Airflow's answer: responded_by, responded_at,
        chosen_options, params_input. 404 NoOpenRequest, 409 AlreadyAnswered, 400/422 AnswerRefused
        (3.1 and 3.2 accept any option here and fail the task when it resumes: the gateway checks first)."""
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/{map_index}/hitlDetails"
        body = {"chosen_options": chosen_options, "params_input": params_input}
        resp = await self._call("PATCH", path, json=body)
        where = f"{dag_id}/{run_id}/{task_id}[{map_index}]"
        if resp.status_code in (400, 422) or (resp.status_code == 403 and "not a respondent" in resp.text):
            status = 403 if resp.status_code == 403 else 400
            code = "not_a_respondent" if status == 403 else "answer_refused"
            raise AnswerRefused(f"Airflow refused the answer to {where}: {self._redact(_detail(resp))}", status=status, code=code)
        self._raise_for(
            resp,
            "PATCH",
            path,
            not_found=lambda m: NoOpenRequest(f"Airflow has no input request of {where}: {m}"),
            conflict=lambda m: AlreadyAnswered(f"the input request of {where} has already been answered"),
        )
        return _json_object(resp, self._where)

    async def xcom_value(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        """The XCom value as JSON, as the hook would have published it: tuples and sets (which the
        task SDK stores as serde envelopes) become lists; other non-JSON types stay as Airflow's
        serde envelopes."""
        path = f"/api/v2/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}"
        resp = await self._call("GET", path, params={"map_index": map_index, "deserialize": "false"})
        self._raise_for(
            resp,
            "GET",
            path,
            not_found=lambda m: NotFound(f"no XCom {key!r} of {dag_id}/{run_id}/{task_id}[{map_index}] in Airflow: {m}", code="no_xcom"),
        )
        entry = _json_object(resp, self._where)
        if "value" not in entry:
            raise _bad_answer(self._where, "answered an XCom entry without a value")
        return _unwrap_collections(entry["value"])

    async def get_backfill(self, backfill_id: int) -> dict | None:
        """The backfill (GET /api/v2/backfills/{id}, in every Airflow 3), or None."""
        path = f"/api/v2/backfills/{backfill_id}"
        resp = await self._call("GET", path)
        if resp.status_code in (404, 422):  # 422: an id Airflow's NonNegativeInt refuses, so none
            return None
        self._raise_for(resp, "GET", path)
        backfill = _json_object(resp, self._where)
        if not isinstance(backfill.get("dag_id"), str):
            raise _bad_answer(self._where, f"answered GET {path} without a dag_id")
        return backfill

    async def has_backfill_dag_runs(self) -> bool:
        """Whether this Airflow lists a backfill's slots (PR #67381): probed once, then again after
        ROUTE_RECHECK_SECONDS. Concurrent callers share one probe. A probe that gets no usable answer
        (unreachable, 5xx, refused) raises its AirflowError and is not remembered."""
        async with self._probe_lock:
            if self._backfill_dag_runs.fresh():
                return self._backfill_dag_runs.present
            path = BACKFILL_DAG_RUNS.format(backfill_id=PROBE_BACKFILL_ID)
            resp = await self._call("GET", path, params={"limit": 1})
            if _route_missing(resp):
                present = False
            elif 200 <= resp.status_code < 300:  # a collection, or an SPA's page served for any path
                body = _json_or_none(resp)
                present = isinstance(body, dict) and isinstance(body.get("backfill_dag_runs"), list)
            elif resp.status_code == 404:
                present = True  # the route itself said there is no backfill 0
            else:
                self._raise_for(resp, "GET", path)
                raise _bad_answer(self._where, f"answered {resp.status_code} to GET {path} (unexpected)")
            self._remember_backfill_dag_runs(present)
            return present

    async def backfill_dag_runs(self, backfill_id: int, *, offset: int = 0, limit: int | None = None) -> tuple[int, list[BackfillDagRun]]:
        """(total_entries, the backfill's slots in sort_ordinal order from `offset`, at most `limit`,
        all of them without one), reading every page Airflow's page cap makes. RouteMissing where
        this Airflow has no such route (remembered: the next probe is due only after the recheck);
        NotFound (backfill_not_found) for a backfill Airflow does not have."""
        path = BACKFILL_DAG_RUNS.format(backfill_id=backfill_id)
        found: list[BackfillDagRun] = []
        total = 0
        for _ in range(MAX_PAGES):
            want = PAGE_LIMIT if limit is None else min(PAGE_LIMIT, limit - len(found))
            if want <= 0:
                return total, found
            params = {"limit": want, "offset": offset + len(found), "order_by": "sort_ordinal"}
            resp = await self._call("GET", path, params=params)
            if _route_missing(resp):
                self._remember_backfill_dag_runs(False)
                raise RouteMissing(f"Airflow at {self._where} has no GET {BACKFILL_DAG_RUNS} (it came with Airflow 3.4)")
            self._raise_for(
                resp, "GET", path, not_found=lambda m: NotFound(f"Airflow has no backfill {backfill_id}", code="backfill_not_found")
            )
            page = _json_object(resp, self._where)
            items, entries = page.get("backfill_dag_runs"), page.get("total_entries")
            if not isinstance(items, list) or not isinstance(entries, int):
                raise _bad_answer(self._where, f"answered GET {path} without a backfill_dag_runs list and total_entries")
            try:
                found.extend(BackfillDagRun.model_validate(item) for item in items)
            except ValidationError as exc:
                raise _bad_answer(
                    self._where, f"answered GET {path} with a slot not of the expected shape ({exc.error_count()} errors)"
                ) from None
            total = entries
            if not items or offset + len(found) >= total:
                return total, found
        raise _bad_answer(self._where, f"kept paging a backfill's dag runs past {MAX_PAGES} pages")

    def _remember_backfill_dag_runs(self, present: bool) -> None:
        known = self._backfill_dag_runs
        if known.at is None or present != known.present:
            log.info("Airflow at %s %s GET %s", self._where, "has" if present else "has no", BACKFILL_DAG_RUNS)
        self._backfill_dag_runs = RouteCheck(present, time.monotonic())

    # -- transport and auth ---------------------------------------------------------------------

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API request; with username/password, a 401 (or a 403 for a token Airflow can no longer
        verify) gets one fresh token and one retry."""
        for attempt in (1, 2):
            token = await self._bearer()
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await self._send(method, path, headers=headers, **kwargs)
            if attempt == 1 and self._use_login and _token_rejected(resp):
                log.info("Airflow rejected the token (%s to %s %s); fetching a new one", resp.status_code, method, path)
                self._invalidate(token)
                continue
            return resp
        raise AssertionError("unreachable")

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self._base + path
        try:
            resp = await within(self._exchange_bound, self._http.request(method, url, **kwargs))
        except (httpx.TimeoutException, TimeoutError):
            raise AirflowUnavailable(
                f"Airflow at {self._where} did not answer {method} {path} in time (timeout {self.settings.timeout:g} s)"
            ) from None
        except httpx.TransportError as exc:
            raise AirflowUnavailable(
                f"Airflow at {self._where} is unreachable ({type(exc).__name__}: {self._redact(str(exc))[:DETAIL_MAX]})"
            ) from None
        log.debug("%s %s -> %s", method, path, resp.status_code)
        return resp

    async def _bearer(self) -> str | None:
        if self.settings.token:
            return self.settings.token
        if not self._use_login:
            return None  # e.g. an all-admins development Airflow
        async with self._token_lock:  # concurrent callers share one fetch
            if self._jwt is None or time.monotonic() >= self._refresh_at:
                await self._fetch_token()
            return self._jwt

    def _invalidate(self, token: str | None) -> None:
        if token is not None and token == self._jwt:  # a concurrent caller may have refreshed already
            self._refresh_at = 0.0

    async def _fetch_token(self) -> None:
        body = {"username": self.settings.username, "password": self.settings.password}
        resp = await self._send("POST", TOKEN_PATH, json=body)
        if resp.status_code in (401, 403):
            raise AirflowAuthFailed(
                f"Airflow at {self._where} refused the username/password for user "
                f"{self.settings.username!r} ({resp.status_code} from POST {TOKEN_PATH})"
            )
        if resp.status_code >= 500:
            raise _bad_answer(self._where, f"answered {resp.status_code} to POST {TOKEN_PATH}")
        if not 200 <= resp.status_code < 300:
            # The detail is not echoed: a validation error there repeats the request body.
            raise AirflowAuthFailed(
                f"Airflow at {self._where} answered {resp.status_code} to POST {TOKEN_PATH} "
                "(is its auth manager one that issues tokens there?)"
            )
        try:
            token = resp.json()["access_token"]
            if not isinstance(token, str) or not token:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise AirflowAuthFailed(f"Airflow at {self._where} answered POST {TOKEN_PATH} without an access_token") from None
        now = time.monotonic()
        self._old_jwt, self._jwt = self._jwt, token
        self._refresh_at = now + _refresh_after(token)
        log.debug("fetched an Airflow token for user %r", self.settings.username)

    def _raise_for(
        self,
        resp: httpx.Response,
        method: str,
        path: str,
        *,
        not_found: Callable[[str], AirflowError] | None = None,
        conflict: Callable[[str], AirflowError] | None = None,
    ) -> None:
        """Nothing for a 2xx; else the typed error (the factories get Airflow's redacted detail)."""
        status = resp.status_code
        if 200 <= status < 300:
            return
        detail = self._redact(_detail(resp))
        said = f"answered {status} to {method} {path}"
        if status == 404 and not_found is not None:
            raise not_found(detail)
        if status == 409 and conflict is not None:
            raise conflict(detail)
        if status in (401, 403):
            why = (
                "(forbidden: does the Airflow user lack the permission?)"
                if not _token_rejected(resp)
                else "even after a fresh token"
                if self._use_login
                else "with the configured token"
                if self.settings.token
                else "without credentials (configure a token or username/password)"
            )
            raise AirflowAuthFailed(f"Airflow at {self._where} {said} {why}: {detail}")
        if status >= 500:
            raise _bad_answer(self._where, f"{said}: {detail}")
        if 400 <= status < 500:
            raise AirflowBadRequest(f"Airflow at {self._where} {said}: {detail}")
        # 1xx/3xx: redirects are not followed (they would drop or leak the Authorization header).
        raise _bad_answer(self._where, f"{said} (unexpected; is the base URL right?)")

    def _redact(self, text: str) -> str:
        for secret in (self.settings.password, self.settings.token, self._jwt, self._old_jwt):
            if secret:
                text = text.replace(secret, "***")
        return text


# -- helpers ------------------------------------------------------------------------------------


def _q(segment: str) -> str:
    quoted = quote(str(segment), safe="")
    # "." and ".." are left as they are by quote, and httpx removes such segments from a path: an id
    # that is one would move the call elsewhere. Encoded, Airflow reads it back as the id it is.
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _display_url(url: str) -> str:
    """The base URL without any user:password@ part."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _token_rejected(resp: httpx.Response) -> bool:
    if resp.status_code == 401:
        return True
    # 403 is also a valid token lacking permission; only a token that fails verification is renewed.
    return resp.status_code == 403 and "Invalid JWT token" in resp.text


def _jwt_claims(token: str) -> dict:
    """The JWT's payload, read without verifying (only its times matter here)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError):
        return {}


def _refresh_after(token: str) -> float:
    """Seconds from now until the token should be replaced; infinite without an `exp` (then a 401
    triggers the refresh). With `iat`, the lifetime is exp - iat, so the server's clock being off
    from ours does not matter."""
    claims = _jwt_claims(token)
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)):
        return float("inf")
    life = exp - iat if isinstance(iat, (int, float)) else exp - time.time()
    if life <= 0:
        return 0.0
    margin = min(max(REFRESH_MARGIN_MIN, REFRESH_MARGIN_SHARE * life), life / 2)
    return life - margin


_SERDE_KEYS = {"__classname__", "__version__", "__data__"}
_SERDE_COLLECTIONS = {"builtins.tuple", "builtins.set", "builtins.frozenset"}


def _unwrap_collections(value: Any) -> Any:
    """Serde's tuple/set/frozenset envelopes as plain lists (json.dumps, as the hook uses, makes a
    tuple a list too)."""
    if isinstance(value, list):
        return [_unwrap_collections(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == _SERDE_KEYS and value["__classname__"] in _SERDE_COLLECTIONS and isinstance(value["__data__"], list):
            return [_unwrap_collections(v) for v in value["__data__"]]
        return {k: _unwrap_collections(v) for k, v in value.items()}
    return value


def _detail(resp: httpx.Response) -> str:
    """Airflow's error text: FastAPI's {"detail": str | {"reason", "message"} | [validation errors]}."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        text = resp.text.strip() or resp.reason_phrase
    elif isinstance(detail, str):
        text = detail
    elif isinstance(detail, dict) and ("reason" in detail or "message" in detail):
        text = ": ".join(str(detail[k]) for k in ("reason", "message") if detail.get(k))
    elif isinstance(detail, list):
        text = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', '')}" if isinstance(e, dict) else str(e) for e in detail)
    else:
        text = json.dumps(detail)
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def _route_missing(resp: httpx.Response) -> bool:
    """A 404 (or 405) that is not the backfill routes' own: Airflow's catch-all for unknown API
    routes, FastAPI's {"detail": "Not Found"}, or a proxy's page."""
    if resp.status_code not in (404, 405):
        return False
    body = _json_or_none(resp)
    detail = body.get("detail") if isinstance(body, dict) else None
    return resp.status_code == 405 or not (isinstance(detail, str) and "backfill" in detail.lower())


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _json_object(resp: httpx.Response, where: str) -> dict:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _bad_answer(where, f"answered {resp.status_code} with a body that is not a JSON object")
    return body


def _bad_answer(where: str, what: str) -> AirflowUnavailable:
    """Airflow answered, but not usefully (a 5xx, a malformed body): 502, airflow_error."""
    return AirflowUnavailable(f"Airflow at {where} {what}", status=502, code="airflow_error")
