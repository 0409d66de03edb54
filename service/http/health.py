"""Liveness, readiness and metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runbell.service.http.auth import Role, authorize


async def healthz(request: Request) -> Response:
    """The process is up (open)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Subscribed and caught up, and since then no shared dependency down past the grace (open;
    runbell.service.http.readiness)."""
    report = request.app.state.readiness.report()
    body = {"status": "ready" if report.ready else "not ready", "checks": report.checks}
    return JSONResponse(body, status_code=200 if report.ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics (role: read)."""
    authorize(request, Role.READ)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
