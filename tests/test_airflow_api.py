"""runbell.service.airflow.api against a stand-in Airflow: a Starlette app served by uvicorn on a loopback
port inside the test's event loop (httpx.MockTransport where no socket is needed).

The stand-in speaks the parts of Airflow 3.3's REST API the client uses, as read from its source:
POST /auth/token -> 201 {"access_token": JWT}; 401 for an expired token, 403 "Invalid JWT token" for
one that fails verification; lists capped at 100 per page; cursor paging of task instances.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runbell.service.airflow.api import (
    AirflowAuthFailed,
    AirflowBadRequest,
    AirflowClient,
    AirflowError,
    AirflowSettings,
    AirflowUnavailable,
    DagNotFound,
    NotFound,
    RunExists,
)

USER, PASSWORD = "alice", "pa55-Wh1te-Rabbit"
FIXED_TOKEN = "fixed-0123456789abcdef-token"


def b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def make_jwt(sub: str, ttl: float | None) -> str:
    now = time.time()
    claims: dict[str, Any] = {"sub": sub, "jti": uuid.uuid4().hex, "iat": now, "nbf": now}
    if ttl is not None:
        claims["exp"] = now + ttl
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims)}.unsigned"


def jwt_exp(token: str) -> float | None:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("exp")


@dataclass
class StandIn:
    """What the stand-in Airflow does and what it saw."""

    ttl: float | None = 3600.0  # life of issued JWTs; None: no exp claim
    auth: str = "jwt"  # "jwt": tokens from /auth/token; "fixed": FIXED_TOKEN; "none": no auth at all
    revoked_status: int = 401  # how a revoked token is answered (Airflow: 401 expired, 403 invalid)
    reject_all: bool = False
    forbid: bool = False  # a valid token without the permission: 403 "Forbidden"
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    seen_auth: list[str | None] = field(default_factory=list)  # Authorization of each API call
    rejections: int = 0
    api_calls: int = 0
    cursor_paging: bool = True
    cursor_shape: str = "3.3"  # "3.2": a cursor page has total_entries null and no total_entries_limit
    task_instances: list[dict] = field(default_factory=list)
    runs: dict[tuple[str, str], dict] = field(default_factory=dict)
    trigger_bodies: list[dict] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self, request: Request) -> Response | None:
        """None when the request may pass, else Airflow's answer."""
        self.api_calls += 1
        header = request.headers.get("authorization")
        self.seen_auth.append(header)
        if self.auth == "none" and not self.reject_all:
            return None
        token = header[len("Bearer ") :] if header and header.startswith("Bearer ") else None
        if token is None:
            return self._reject(401, "Not authenticated")
        if self.reject_all:
            return self._reject(401, "Token Expired")
        if self.forbid:
            return self._reject(403, "Forbidden")
        if self.auth == "fixed":
            return None if token == FIXED_TOKEN else self._reject(403, "Invalid JWT token")
        if token not in self.issued:
            return self._reject(403, "Invalid JWT token")
        if token in self.revoked:
            return self._reject(self.revoked_status, "Token Expired" if self.revoked_status == 401 else "Invalid JWT token")
        exp = jwt_exp(token)
        if exp is not None and time.time() >= exp:
            return self._reject(401, "Token Expired")
        return None

    def _reject(self, status: int, detail: str) -> Response:
        self.rejections += 1
        return JSONResponse({"detail": detail}, status_code=status)


def make_app(s: StandIn) -> Starlette:
    async def token(request: Request) -> Response:
        body = await request.json()
        if body != {"username": USER, "password": PASSWORD}:
            # Like a careless server, echo what it was sent: the client must not repeat it.
            return JSONResponse({"detail": f"Invalid credentials {body!r}"}, status_code=401)
        jwt = make_jwt(USER, s.ttl)
        s.issued.append(jwt)
        return JSONResponse({"access_token": jwt}, status_code=201)

    async def dag(request: Request) -> Response:
        if (denied := s.check(request)) is not None:
            return denied
        dag_id = request.path_params["dag_id"]
        if dag_id == "boom":
            return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        if dag_id == "slow":
            try:
                await asyncio.wait_for(s.release.wait(), 30)
            except asyncio.TimeoutError:
                pass
            return JSONResponse({"dag_id": dag_id})
        if dag_id == "trickle":

            async def drip() -> AsyncIterator[bytes]:
                yield b'{"dag_id": "trickle", "pad": "'
                for _ in range(100):
                    if s.release.is_set():
                        break
                    await asyncio.sleep(0.2)
                    yield b"x"
                yield b'"}'

            return StreamingResponse(drip(), media_type="application/json")
        if dag_id == "echo":
            # A validation error that repeats the Authorization header, and a long one.
            detail = [{"loc": ["header", "authorization"], "msg": f"odd {request.headers.get('authorization')}"}]
            detail.append({"loc": ["body"], "msg": "y" * 1000})
            return JSONResponse({"detail": detail}, status_code=422)
        if dag_id == "moved":
            return Response(status_code=307, headers={"location": "https://elsewhere.example/"})
        if dag_id != "known":
            return JSONResponse({"detail": f"Dag with id {dag_id} was not found"}, status_code=404)
        if request.method == "PATCH":
            assert request.query_params.getlist("update_mask") == ["is_paused"]
            assert await request.json() == {"is_paused": False}
        return JSONResponse({"dag_id": dag_id, "is_paused": request.method != "PATCH"})

    async def trigger(request: Request) -> Response:
        if (denied := s.check(request)) is not None:
            return denied
        dag_id = request.path_params["dag_id"]
        if dag_id != "known":
            return JSONResponse({"detail": f"Dag with dag_id: '{dag_id}' not found"}, status_code=404)
        body = await request.json()
        s.trigger_bodies.append(body)
        if "logical_date" not in body:  # Airflow: a required field, null allowed
            return JSONResponse({"detail": [{"loc": ["body", "logical_date"], "msg": "Field required"}]}, status_code=422)
        run_id = body.get("dag_run_id") or f"manual__{time.time()}"
        if (dag_id, run_id) in s.runs:
            return JSONResponse(
                {
                    "detail": {
                        "reason": "Unique constraint violation",
                        "statement": "hidden",
                        "orig_error": "hidden",
                        "message": "Serious error when handling your request.",
                    }
                },
                status_code=409,
            )
        run = {"dag_id": dag_id, "dag_run_id": run_id, "conf": body.get("conf"), "state": "queued", "note": body.get("note")}
        s.runs[(dag_id, run_id)] = run
        return JSONResponse(run)

    async def get_run(request: Request) -> Response:
        if (denied := s.check(request)) is not None:
            return denied
        run = s.runs.get((request.path_params["dag_id"], request.path_params["run_id"]))
        if run is None:
            return JSONResponse({"detail": "The DagRun was not found"}, status_code=404)
        return JSONResponse(run)

    async def task_instances(request: Request) -> Response:
        if (denied := s.check(request)) is not None:
            return denied
        if request.path_params["run_id"] != "r1":
            return JSONResponse({"detail": "DagRun was not found"}, status_code=404)
        limit = min(int(request.query_params.get("limit", 50)), 100)  # Airflow's maximum_page_limit
        items = sorted(s.task_instances, key=lambda ti: ti["id"])
        cursor = request.query_params.get("cursor")
        if s.cursor_paging and cursor is not None:
            start = 0 if cursor == "" else next(i for i, ti in enumerate(items) if ti["id"] == cursor) + 1
            page = items[start : start + limit]
            more = start + limit < len(items)
            body = {"task_instances": page, "next_cursor": page[-1]["id"] if more and page else None, "previous_cursor": None}
            if s.cursor_shape == "3.2":
                return JSONResponse({**body, "total_entries": None})
            return JSONResponse({**body, "total_entries": min(len(items), 1000), "total_entries_limit": 1000})
        offset = int(request.query_params.get("offset", 0))
        return JSONResponse({"task_instances": items[offset : offset + limit], "total_entries": len(items)})

    async def xcom(request: Request) -> Response:
        if (denied := s.check(request)) is not None:
            return denied
        p = request.path_params
        if request.query_params.get("deserialize") == "true":  # Airflow's display rendering
            return JSONResponse({"key": p["key"], "value": "(1,x)"})
        map_index = int(request.query_params["map_index"])
        values = {  # as the task SDK stores them (serde), and so as Airflow answers by default
            "answer": {"answer": 42, "map_index": map_index},
            "s42": "42",
            "pair": {"__classname__": "builtins.tuple", "__version__": 1, "__data__": [1, "x"]},
            "nested": {
                "s": {"__classname__": "builtins.set", "__version__": 1, "__data__": [3]},
                "when": {"__classname__": "datetime.datetime", "__version__": 2, "__data__": {"timestamp": 1.0}},
            },
        }
        if p["task_id"] not in values:
            return JSONResponse({"detail": f"XCom entry with key: `{p['key']}` not found"}, status_code=404)
        return JSONResponse({"key": p["key"], "map_index": map_index, "value": values[p["task_id"]]})

    base = "/api/v2/dags/{dag_id}"
    return Starlette(
        routes=[
            Route("/auth/token", token, methods=["POST"]),
            Route(base, dag, methods=["GET", "PATCH"]),
            Route(base + "/dagRuns", trigger, methods=["POST"]),
            Route(base + "/dagRuns/{run_id}", get_run, methods=["GET"]),
            Route(base + "/dagRuns/{run_id}/taskInstances", task_instances, methods=["GET"]),
            Route(base + "/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key:path}", xcom, methods=["GET"]),
        ]
    )


@asynccontextmanager
async def serve(app: Starlette) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    server.capture_signals = contextlib.nullcontext  # leave the test process's signal handlers alone
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "the stand-in Airflow did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@pytest.fixture
async def standin() -> AsyncIterator[tuple[StandIn, str]]:
    state = StandIn()
    async with serve(make_app(state)) as url:
        try:
            yield state, url
        finally:
            state.release.set()  # let a held request end, so that the server stops at once


def login(url: str, timeout: float = 5.0, password: str = PASSWORD) -> AirflowClient:
    return AirflowClient(AirflowSettings(url, username=USER, password=password, timeout=timeout))


def no_secret(text: str, *secrets: str) -> None:
    for secret in (PASSWORD, FIXED_TOKEN, *secrets):
        assert secret not in text, f"a secret leaked into: {text!r}"


# -- auth ---------------------------------------------------------------------------------------


async def test_token_is_fetched_reused_and_refreshed_before_it_expires(standin):
    s, url = standin
    s.ttl = 2.0  # refreshed once less than half of its life remains
    async with login(url) as client:
        assert (await client.get_dag("known"))["dag_id"] == "known"
        await client.get_dag("known")
        assert len(s.issued) == 1  # reused while fresh
        assert s.seen_auth == [f"Bearer {s.issued[0]}"] * 2
        await asyncio.sleep(1.2)  # 0.8 s left of 2 s: time for a new one, before the old expires
        await client.get_dag("known")
        assert len(s.issued) == 2
        assert s.seen_auth[-1] == f"Bearer {s.issued[1]}"
    assert s.rejections == 0  # never sent an expired token


async def test_a_long_lived_token_is_fetched_once(standin):
    s, url = standin
    s.ttl = 86400.0  # Airflow's default jwt_expiration_time
    async with login(url) as client:
        await asyncio.gather(*(client.get_dag("known") for _ in range(20)))
    assert len(s.issued) == 1 and s.api_calls == 20


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_token_is_replaced_once_and_the_call_retried(standin, status):
    s, url = standin
    s.revoked_status = status  # 401 "Token Expired", or 403 "Invalid JWT token" (secret rotated)
    async with login(url) as client:
        await client.get_dag("known")
        s.revoked.add(s.issued[0])
        assert (await client.get_dag("known"))["dag_id"] == "known"
    assert len(s.issued) == 2 and s.rejections == 1 and s.api_calls == 3


async def test_a_token_without_exp_is_kept_until_airflow_rejects_it(standin):
    s, url = standin
    s.ttl = None
    async with login(url) as client:
        for _ in range(3):
            await client.get_dag("known")
        assert len(s.issued) == 1
        s.revoked.add(s.issued[0])
        await client.get_dag("known")
        await client.get_dag("known")
    assert len(s.issued) == 2 and s.rejections == 1


async def test_still_rejected_after_a_fresh_token_is_auth_failed(standin):
    s, url = standin
    async with login(url) as client:
        await client.get_dag("known")
        s.reject_all = True
        with pytest.raises(AirflowAuthFailed) as info:
            await client.trigger_run("known", run_id="r")
    err = info.value
    assert (err.status, err.code) == (502, "airflow_auth_failed")
    assert "401" in str(err) and "fresh token" in str(err)
    assert len(s.issued) == 2 and s.api_calls == 3  # one refresh, one retry, no loop
    no_secret(str(err), *s.issued)


async def test_a_valid_token_without_permission_is_not_refreshed(standin):
    s, url = standin
    s.forbid = True
    async with login(url) as client:
        with pytest.raises(AirflowAuthFailed, match="403.*forbidden") as info:
            await client.unpause("known")
    assert info.value.status == 502 and len(s.issued) == 1 and s.api_calls == 1


async def test_a_wrong_password_is_auth_failed_without_echoing_it(standin):
    s, url = standin
    async with login(url, password="not-" + PASSWORD[::-1]) as client:
        with pytest.raises(AirflowAuthFailed) as info:
            await client.get_dag("known")
    assert info.value.status == 502 and "refused the username/password" in str(info.value)
    no_secret(str(info.value), PASSWORD[::-1])
    assert s.api_calls == 0


async def test_a_fixed_token_is_sent_as_is_and_never_refreshed(standin):
    s, url = standin
    s.auth = "fixed"
    async with AirflowClient(AirflowSettings(url, token=FIXED_TOKEN, timeout=5)) as client:
        await client.get_dag("known")
        assert s.seen_auth == [f"Bearer {FIXED_TOKEN}"]
        s.reject_all = True
        with pytest.raises(AirflowAuthFailed) as info:
            await client.get_dag("known")
    assert s.issued == [] and s.api_calls == 2
    no_secret(str(info.value))


async def test_without_credentials_no_authorization_header_is_sent(standin):
    s, url = standin
    s.auth = "none"
    async with AirflowClient(AirflowSettings(url, timeout=5)) as client:
        await client.get_dag("known")
        s.reject_all = True
        with pytest.raises(AirflowAuthFailed, match="without credentials"):
            await client.get_dag("known")
    assert s.seen_auth == [None, None] and s.issued == []


async def test_secrets_never_reach_logs_or_messages(standin, caplog):
    s, url = standin
    caplog.set_level(logging.DEBUG)  # every logger: ours, httpx's, httpcore's
    s.ttl = 1.0
    messages: list[str] = []
    async with login(url) as client:
        await client.get_dag("known")
        await asyncio.sleep(0.6)
        await client.get_dag("known")  # refreshed
        s.revoked.add(s.issued[-1])
        await client.get_dag("known")  # rejected, refreshed, retried
        with pytest.raises(AirflowBadRequest) as info:
            await client.get_dag("echo")  # Airflow's answer repeats the Authorization header
        messages.append(str(info.value))
        assert "***" in str(info.value) and len(str(info.value)) < 600  # redacted, and truncated
        s.reject_all = True
        with pytest.raises(AirflowAuthFailed) as info:
            await client.get_dag("known")
        messages.append(str(info.value))
        messages.append(repr(client.settings))
    async with login(url, password=PASSWORD + "x") as client:
        with pytest.raises(AirflowAuthFailed) as info:
            await client.get_dag("known")
        messages.append(str(info.value))
    assert len(s.issued) >= 4
    logged = [r.getMessage() for r in caplog.records]
    assert any("runbell.airflow_api" == r.name for r in caplog.records)
    for text in messages + logged:
        no_secret(text, *s.issued)


# -- transport failures -------------------------------------------------------------------------


async def test_a_5xx_answer_is_unavailable_502(standin):
    s, url = standin
    async with login(url) as client:
        with pytest.raises(AirflowUnavailable) as info:
            await client.get_dag("boom")
    assert (info.value.status, info.value.code) == (502, "airflow_error")
    assert "500" in str(info.value) and "Internal Server Error" in str(info.value)


async def test_connection_refused_is_unavailable_503_at_once():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nobody listens there
    started = time.monotonic()
    async with login(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(AirflowUnavailable) as info:
            await client.get_dag("known")
    assert time.monotonic() - started < 2
    assert (info.value.status, info.value.code) == (503, "airflow_unreachable")
    assert "unreachable" in str(info.value)
    no_secret(str(info.value))


@pytest.mark.parametrize("dag_id", ["slow", "trickle"])
async def test_a_slow_server_is_unavailable_503_within_the_bound(standin, dag_id):
    """`slow` sends nothing (the read timeout); `trickle` sends a byte every 0.2 s, which no single
    read timeout catches (the bound on the whole exchange does)."""
    s, url = standin
    s.auth = "none"
    started = time.monotonic()
    async with AirflowClient(AirflowSettings(url, timeout=0.5)) as client:
        with pytest.raises(AirflowUnavailable) as info:
            await client.get_dag(dag_id)
    took = time.monotonic() - started
    s.release.set()
    assert took < 1.5, took
    assert (info.value.status, info.value.code) == (503, "airflow_unreachable")
    assert "did not answer" in str(info.value) and "0.5 s" in str(info.value)


async def test_a_redirect_is_not_followed(standin):
    s, url = standin
    async with login(url) as client:
        with pytest.raises(AirflowUnavailable) as info:
            await client.get_dag("moved")
    assert info.value.status == 502 and "307" in str(info.value)
    assert s.api_calls == 1


# -- the API calls ------------------------------------------------------------------------------


async def test_dags_and_runs(standin):
    s, url = standin
    async with login(url) as client:
        with pytest.raises(DagNotFound) as info:
            await client.get_dag("nope")
        assert (info.value.status, info.value.code) == (404, "unknown_dag")
        with pytest.raises(DagNotFound):
            await client.unpause("nope")
        with pytest.raises(DagNotFound):
            await client.trigger_run("nope", run_id="r1")
        await client.unpause("known")

        run = await client.trigger_run("known", run_id="r1", conf={"x": 1}, logical_date=None, note="hi")
        assert run["dag_run_id"] == "r1"
        assert s.trigger_bodies[-1] == {"dag_run_id": "r1", "logical_date": None, "conf": {"x": 1}, "note": "hi"}
        with pytest.raises(RunExists) as info:
            await client.trigger_run("known", run_id="r1")
        assert (info.value.status, info.value.code) == (409, "run_exists")
        assert "'r1'" in str(info.value)

        assert (await client.get_run("known", "r1"))["conf"] == {"x": 1}
        assert await client.get_run("known", "never") is None


async def test_task_instances_gathers_every_page(standin):
    s, url = standin
    s.task_instances = [
        {
            "id": f"{i:04d}",
            "task_id": "mapped" if i < 230 else f"t{i}",
            "map_index": i if i < 230 else -1,
            "try_number": 1 + i % 3,
            "state": "success",
        }
        for i in range(250)
    ]
    async with login(url) as client:
        tis = await client.task_instances("known", "r1")
        assert [ti["id"] for ti in tis] == [ti["id"] for ti in s.task_instances]  # every one, once
        assert {ti["map_index"] for ti in tis if ti["task_id"] == "mapped"} == set(range(230))
        cursor_calls = s.api_calls

        s.cursor_shape = "3.2"  # Airflow 3.2's cursor pages: no total at all
        tis = await client.task_instances("known", "r1")
        assert [ti["id"] for ti in tis] == [ti["id"] for ti in s.task_instances]
        assert s.api_calls - cursor_calls == 3
        cursor_calls = s.api_calls

        s.cursor_paging = False  # an Airflow before 3.2: offset paging only
        tis = await client.task_instances("known", "r1")
        assert len(tis) == 250 and len({ti["id"] for ti in tis}) == 250
        assert s.api_calls - cursor_calls == 3

        s.task_instances = []
        assert await client.task_instances("known", "r1") == []
        with pytest.raises(NotFound) as info:
            await client.task_instances("known", "no-such-run")
        assert (info.value.status, info.value.code) == (404, "unknown_run")
    assert cursor_calls == 6  # 100 + 100 + 50, twice


async def test_xcom_value_is_the_stored_json_with_tuples_as_lists(standin):
    s, url = standin
    async with login(url) as client:
        assert await client.xcom_value("known", "r1", "answer") == {"answer": 42, "map_index": -1}
        assert await client.xcom_value("known", "r1", "answer", map_index=3) == {"answer": 42, "map_index": 3}
        assert await client.xcom_value("known", "r1", "s42") == "42"  # a string stays a string
        assert await client.xcom_value("known", "r1", "pair") == [1, "x"]
        assert await client.xcom_value("known", "r1", "nested") == {
            "s": [3],
            "when": {"__classname__": "datetime.datetime", "__version__": 2, "__data__": {"timestamp": 1.0}},
        }
        with pytest.raises(NotFound) as info:
            await client.xcom_value("known", "r1", "other")
        assert (info.value.status, info.value.code) == (404, "no_xcom")


async def test_path_segments_are_quoted():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"task_instances": [], "total_entries": 0, "value": 1})

    async with AirflowClient(AirflowSettings("http://airflow.test/"), transport=httpx.MockTransport(handler)) as client:
        await client.get_run("a dag/x", "manual__2024-01-01T00:00:00+00:00")
        await client.xcom_value("d", "r?#", "t%1", map_index=2, key="a/b")
    assert seen[0].url.raw_path == b"/api/v2/dags/a%20dag%2Fx/dagRuns/manual__2024-01-01T00%3A00%3A00%2B00%3A00"
    assert seen[1].url.raw_path.startswith(b"/api/v2/dags/d/dagRuns/r%3F%23/taskInstances/t%251/xcomEntries/a%2Fb?")
    assert seen[1].url.params["map_index"] == "2" and seen[1].url.params["deserialize"] == "false"
    assert "authorization" not in seen[0].headers


async def test_an_id_that_is_a_dot_segment_stays_one_segment():
    """httpx removes "." and ".." segments from a path (RFC 3986): an id of the gateway's URL that is one
    would otherwise move the call the gateway makes with its own Airflow identity to another path."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"state": "deferred", "responded_at": None})

    async with AirflowClient(AirflowSettings("http://airflow.test/"), transport=httpx.MockTransport(handler)) as client:
        await client.answer_input("..", "..", ".", 0, ["yes"], {})
        await client.task_instance_state("d", "..", "..")
    assert seen[0].url.raw_path == b"/api/v2/dags/%2E%2E/dagRuns/%2E%2E/taskInstances/%2E/0/hitlDetails"
    assert seen[1].url.raw_path == b"/api/v2/dags/d/dagRuns/%2E%2E/taskInstances/%2E%2E"


async def test_a_naive_logical_date_is_refused_before_sending():
    from datetime import datetime, timezone

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"dag_run_id": "r"})

    async with AirflowClient(AirflowSettings("http://airflow.test"), transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ValueError):
            await client.trigger_run("d", logical_date=datetime(2024, 1, 1))
        await client.trigger_run("d", logical_date=datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert bodies == [{"dag_run_id": None, "logical_date": "2024-01-01T00:00:00+00:00", "conf": {}, "note": None}]


def test_errors_are_typed():
    for cls, status, code in [
        (NotFound, 404, "not_found"),
        (DagNotFound, 404, "unknown_dag"),
        (RunExists, 409, "run_exists"),
        (AirflowAuthFailed, 502, "airflow_auth_failed"),
        (AirflowUnavailable, 503, "airflow_unreachable"),
        (AirflowBadRequest, 502, "airflow_rejected"),
    ]:
        err = cls("m")
        assert isinstance(err, AirflowError) and (err.status, err.code, str(err)) == (status, code, "m")
