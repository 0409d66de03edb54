"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.service.http.auth import Role, authorize

READY_CHECK_TIMEOUT = 2.0


async def healthz(request: Request) -> Response:
    """The process is up (open)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Redis and the store answer, and the pub/sub listener is subscribed (open)."""
    state = request.app.state
    checks = {
        "redis": await _check(state.redis.ping()),
        "database": await _check(state.store.ping()),
        "pubsub": "ok" if state.hub.connected.is_set() else "not subscribed",
    }
    if state.hub.draining:
        checks["shutdown"] = "draining"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics (role: read)."""
    authorize(request, Role.READ)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _check(awaitable) -> str:
    try:
        await asyncio.wait_for(awaitable, READY_CHECK_TIMEOUT)
        return "ok"
    except Exception as exc:  # reported, never raised: readiness must answer
        return f"{type(exc).__name__}"
