"""A run's event stream is served ahead of Starlette's middleware (runbell.service.http.streams), so that
an open stream does not keep every layer's frames alive. What it answers before the stream starts must
be exactly what the app answers: the same request to both, the same status, headers and JSON body; and
what it does not serve (another method, another route, an encoded '/') goes on to the app. The same for
the long-poll result route, whose every answer is compared."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.routing import Route

from runbell.listeners.publisher import emit
from runbell.service.http.streams import StreamRoutes
from tests.conftest import READ_TOKEN

DAG, RUN = "d", "r"
EVENTS = f"/v1/dags/{DAG}/runs/{RUN}/events"


class Counting:
    """The app, counting the requests handed on to it."""

    def __init__(self, app: Any):
        self.inner, self.calls = app, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await self.inner(scope, receive, send)


def answer(response: httpx.Response) -> tuple[int, Any, str | None]:
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text
    return response.status_code, body, response.headers.get("content-type")


async def test_what_the_stream_route_answers_before_streaming_is_what_the_app_answers(gateway_factory) -> None:
    gateway = await gateway_factory()
    app = gateway.app
    counted = Counting(app)
    streams = StreamRoutes(counted, [r for r in app.routes if isinstance(r, Route) and r.name == "run_events"])
    assert len(streams.routes) == 1
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    served_here = [
        ("GET", EVENTS, {}),  # no token: 401
        ("GET", EVENTS, {"Authorization": "Bearer not-a-token"}),
        ("GET", EVENTS, {**auth, "Last-Event-ID": "not-a-position"}),  # 400, with what is accepted
        ("GET", f"/v1/dags/{DAG}/runs/{'x' * 300}/events", auth),  # an id over its bound
        ("GET", f"/v1/dags/{DAG}/runs/bad%01id/events", auth),
    ]
    handed_on = [
        ("POST", EVENTS, auth),  # 405 from the app's router
        ("GET", f"/v1/dags/{DAG}/runs/a%2Fb/events", auth),  # the app's 400 for an encoded '/'
        ("GET", f"/v1/dags/{DAG}/runs/{RUN}", auth),  # another route
    ]
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as direct,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=streams), base_url="http://gw") as fast,
    ):
        for method, path, headers in served_here + handed_on:
            theirs = answer(await asyncio.wait_for(direct.request(method, path, headers=headers), 20))
            ours = answer(await asyncio.wait_for(fast.request(method, path, headers=headers), 20))
            assert ours == theirs, (method, path)
            assert theirs[0] >= 400, (method, path, theirs)  # each is refused, with a JSON body
            assert theirs[2] == "application/json", (method, path, theirs)
        assert counted.calls == len(handed_on)  # the others were answered here
        head = await asyncio.wait_for(fast.head(EVENTS, headers=auth), 20)  # headers only: a stream would never end
        assert (head.status_code, head.headers["content-type"], head.content) == (200, "text/event-stream; charset=utf-8", b"")
        assert counted.calls == len(handed_on)


async def test_a_request_with_a_body_gets_the_apps_answer_body_limit_included(gateway_factory) -> None:
    """BodyLimit is not ahead of the stream route: a GET declaring a body over the limit was served
    (401 here, a stream with a token, its body read and dropped) where the app answers 413 before reading it."""
    gateway = await gateway_factory()
    app = gateway.app
    counted = Counting(app)
    streams = StreamRoutes(counted, [r for r in app.routes if isinstance(r, Route) and r.name == "run_events"])
    over = b"x" * (app.state.settings.body_max_bytes + 1)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as direct,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=streams), base_url="http://gw") as fast,
    ):
        for body in (over, b"{}"):
            theirs = answer(await asyncio.wait_for(direct.request("GET", EVENTS, content=body), 20))
            ours = answer(await asyncio.wait_for(fast.request("GET", EVENTS, content=body), 20))
            assert ours == theirs, body[:8]
        assert theirs[0] == 401  # under the limit, the same refusal as without a body
        assert counted.calls == 2  # a request with a body goes on to the app, whose BodyLimit bounds it


async def test_what_the_result_route_answers_is_what_the_app_answers(gateway_factory) -> None:
    """The long-poll result route is served here too: every answer, refusals, 202 pending and 200
    outcome alike, has the app's status, headers and body, byte for byte."""
    gateway = await gateway_factory()
    app = gateway.app
    counted = Counting(app)
    streams = StreamRoutes.of(counted)  # type: ignore[arg-type]  # the app, counted
    assert [route.name for route in streams.routes] == ["run_result", "run_events"]
    publisher = gateway.publisher()
    await asyncio.to_thread(emit, DAG, "decided", "success", task_id="answer", result_task=True, result={"v": 1}, publisher=publisher)
    await asyncio.to_thread(emit, DAG, "pending", "running", publisher=publisher)
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    result = f"/v1/dags/{DAG}/runs/{{}}/result"
    served_here = [
        (result.format("decided"), {}),  # no token: 401
        (result.format("decided"), {"Authorization": "Bearer not-a-token"}),
        (result.format("decided") + "?timeout=x", auth),
        (result.format("decided") + "?timeout=1&timeout=2", auth),
        (result.format("decided") + "?after=not-a-position", auth),
        (result.format("decided") + "?resolve=yes", auth),
        (result.format("x" * 300), auth),
        (result.format("decided") + "?timeout=5", auth),  # 200, the outcome
        (result.format("pending") + "?timeout=0", auth),  # 202 pending, with Retry-After
    ]
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as direct,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=streams), base_url="http://gw") as fast,
    ):
        statuses = []
        for path, headers in served_here:
            theirs = await asyncio.wait_for(direct.get(path, headers=headers), 20)
            ours = await asyncio.wait_for(fast.get(path, headers=headers), 20)
            assert (ours.status_code, ours.headers.raw, ours.content) == (theirs.status_code, theirs.headers.raw, theirs.content), path
            statuses.append(theirs.status_code)
        assert statuses == [401, 401, 400, 400, 400, 400, 400, 200, 202]
        assert counted.calls == 0  # every one answered here
        handed_on = await asyncio.wait_for(fast.get(f"/v1/dags/{DAG}/runs/a%2Fb/result", headers=auth), 20)
        assert handed_on.status_code == 400 and counted.calls == 1  # the app's refusal of an encoded '/'
