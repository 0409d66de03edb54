"""Running the app under uvicorn so that SIGTERM drains clients instead of cutting them off, and so
that connections which send nothing, or stop reading, cannot hold the server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from typing import Any
from urllib.parse import unquote, urlsplit

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from runbell.service.core.redaction import install_log_redaction
from runbell.service.http.errors import error_response
from runbell.service.settings import Settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, first tell every subscriber to leave (SSE farewell with retry:, long-poll
    202), then let uvicorn's graceful shutdown wait for the now-closing connections."""

    def __init__(self, config: uvicorn.Config, app: Starlette):
        super().__init__(config)
        self.starlette_app = app

    def handle_exit(self, sig, frame) -> None:
        hub = getattr(self.starlette_app.state, "hub", None)
        if hub is not None:
            # A signal handler may interrupt the loop anywhere: schedule the drain as a callback.
            asyncio.get_event_loop().call_soon_threadsafe(hub.drain)
        super().handle_exit(sig, frame)


class GuardedHttp(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with two bounds it lacks:

    - a header timeout: a connection must send a whole request's headers within ``header_timeout``
      of connecting (or of its previous response), else it is closed. uvicorn times out only idle
      keep-alive connections, so one that sends nothing, or half a request line, was held for ever;
    - ``TCP_USER_TIMEOUT`` (Linux): data the client leaves unacknowledged (it stopped reading) for
      ``unacked_timeout`` makes the kernel drop the connection. The gateway ends a too-slow SSE
      stream itself (send timeout), but closing a socket whose buffers are full only waits for
      them to drain: without this, a client that never reads kept megabytes buffered for ever.
    """

    header_timeout: float = 10.0
    unacked_timeout: float = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.unacked_timeout * 1000))
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request's headers are bound by it too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        # No request being served (none yet, or the last one answered): its headers did not come.
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def guarded_http(settings: Settings) -> type[asyncio.Protocol]:
    return type("GuardedHttp", (GuardedHttp,), {"header_timeout": settings.header_timeout, "unacked_timeout": settings.unacked_timeout})


class InFlightLimit:
    """At most ``limit`` HTTP requests served at once; beyond it a JSON 503 with Retry-After.

    Instead of uvicorn's limit_concurrency, which also counts connections that have sent no request
    yet: a flood of such connections made it answer every real request with a plain-text 503."""

    def __init__(self, app: Starlette, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.app.state.metrics.rejected.inc()
            response = error_response(503, "unavailable", "too many requests in flight on this process", headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


# A full collection walks every tracked object, and 10,000 connections hold millions: with Python's
# default thresholds (700, 10, 10) full collections kept coming and stalled every caller for up to a
# second (runbell bench). Young collections stay frequent and short; a full one waits for 1,000 of the
# middle generation's (and Python's own rule, a quarter more long-lived objects since the last), so
# cyclic garbage is still freed. What exists at start-up (modules, the app) lives for ever and is
# frozen out of the walk; the hub pauses collection during a large fan-out (runbell.service.live.hub).
GC_THRESHOLDS = (700, 10, 1000)


def known_secrets(settings: Settings) -> list[str]:
    """The configured secrets, masked wherever they appear in a log line (besides every token's shape)."""
    secrets = [*settings.tokens]
    for secret in (settings.token_secret, settings.airflow_token, settings.airflow_password, settings.airflow_database_url):
        if secret is not None:
            secrets.append(secret.get_secret_value())
    # A password of the Redis or database URL, also where a driver prints it outside a URL.
    for url in (settings.redis_url, settings.database_url):
        try:
            password = urlsplit(url).password if url else None
        except ValueError:  # not a URL that can be split: the patterns still see one's password
            password = None
        if password:
            secrets += [password, unquote(password)]
    return secrets


def serve(app: Starlette, settings: Settings) -> None:
    # Before uvicorn logs anything: its access log prints query strings (?access_token=, ?token=).
    install_log_redaction(known_secrets(settings))
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    config = uvicorn.Config(
        InFlightLimit(app, settings.max_subscribers + 1000),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 1,
        proxy_headers=False,
        server_header=False,
        http=guarded_http(settings),
        timeout_keep_alive=5,
    )
    DrainingServer(config, app).run()
