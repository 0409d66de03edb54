"""Running the app under uvicorn so that SIGTERM drains clients instead of cutting them off, and so
that connections which send nothing, or stop reading, cannot hold the server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import Callable, Hashable
from typing import Any
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from runbell.service.core.metrics import Metrics
from runbell.service.core.redaction import install_log_redaction, url_password
from runbell.service.http.errors import error_response
from runbell.service.http.streams import StreamRoutes
from runbell.service.live.hub import SharedBytes
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

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = getattr(self, "cycle", None)
        if cycle is not None and hasattr(cycle, "chunked_encoding"):  # httptools' cycle (h11's frames otherwise)
            cycle.scope.setdefault("extensions", {})[DIRECT_WRITE] = DirectWrite(cycle)

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


DIRECT_WRITE = "runbell.direct_write"  # the scope extension holding a request's DirectWrite


class DirectWrite:
    """Writes one chunk of a streaming response on its connection at once, from any callback, when
    ready() says the connection takes it without waiting: the response is under way with chunked
    encoding, the client is there and the transport is not paused by flow control. When it is not
    ready, the chunk goes through the ASGI send as usual (which waits for the transport).

    What an SSE fan-out costs per client is mostly the path to the socket: a task woken, the stream's
    generator, four send wrappers, uvicorn's send. A caught-up stream's shared frame goes straight to
    its transport (runbell.service.http.sse.EventStream.write_now), as uvicorn's send would write it."""

    __slots__ = ("cycle",)

    def __init__(self, cycle: Any):
        self.cycle = cycle

    def ready(self) -> bool:
        cycle = self.cycle
        if not (cycle.response_started and cycle.chunked_encoding) or cycle.response_complete or cycle.disconnected:
            return False
        return not (cycle.flow.write_paused or cycle.transport.is_closing())

    def write(self, body: bytes) -> None:
        """One chunk, framed as uvicorn's send frames it; only when ready() says so."""
        self.cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))

    # -- a whole response (a long-poll answer) ------------------------------------------------------

    def can_answer(self) -> bool:
        """Whether a whole response may be written at once, from a callback: none has begun on this
        request, the client is there, the transport takes a write without waiting, and it is a GET
        (a HEAD's answer has no body: it goes the usual way)."""
        cycle = self.cycle
        if cycle.response_started or cycle.disconnected or cycle.scope["method"] != "GET":
            return False
        return not (cycle.flow.write_paused or cycle.transport.is_closing())

    @property
    def answered(self) -> bool:
        """Whether a response has begun on this request: then nothing else may be sent on it."""
        return bool(self.cycle.response_started)

    def answer(self, shared: SharedBytes, key: Hashable, build: Callable[[], Response]) -> None:
        """Write a whole response in one write and complete the request as uvicorn's send completes it
        (access log, keep-alive, the next pipelined request); only right after can_answer() said so.

        Its bytes, head and body, are what uvicorn's send writes for that Starlette response (with a
        Content-Length, no Connection header): built once per `key` (what fixes the response) and
        keep-alive, shared by every request answered so; uvicorn's Date of the request is put in per
        request (one join), not a head assembled per caller and two writes."""
        cycle = self.cycle
        cycle.response_started, cycle.waiting_for_100_continue = True, False
        keep_alive = cycle.keep_alive

        def whole() -> bytes:
            response = build()
            return response_bytes(response.status_code, list(response.raw_headers), bytes(response.body), keep_alive)

        # Shared per (key, keep-alive) only: keyed by Date too, a crowd that came in over more seconds
        # than hub.shared holds answers of (16 of 256 KiB) evicted and rebuilt it once per waiter (the
        # fan-out visits waiters in a set's order, not by Date). uvicorn's Date of this request goes
        # after the status line, as its send puts it: one copy of the answer, not one build.
        data = dated_answer(shared.get((key, keep_alive), whole), cycle.default_headers)
        if cycle.access_log and cycle.access_logger.isEnabledFor(logging.INFO):  # as uvicorn logs it, without formatting it for nothing
            status = int(data[9:12])
            scope = cycle.scope
            path = get_path_with_query_string(scope)
            cycle.access_logger.info(
                '%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"], path, scope["http_version"], status
            )
        cycle.chunked_encoding, cycle.expected_content_length = False, 0
        cycle.transport.write(data)
        cycle.response_complete = True
        cycle.message_event.set()
        if not keep_alive:
            cycle.transport.close()
        # At once, as uvicorn's send calls it: deferred, the connection's next request could be read
        # first (its bytes in the same loop iteration), and on_response_complete then armed the
        # keep-alive timer over that request, which closed its connection while it was served.
        cycle.on_response()


def dated_answer(answer: bytes, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A response of response_bytes with uvicorn's default headers (its Date of the request) right
    after the status line, where its send writes them."""
    line_end = answer.index(b"\r\n") + 2
    view = memoryview(answer)
    return b"".join((view[:line_end], *header_lines(default_headers), view[line_end:]))


def header_lines(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Each header as uvicorn's send writes it: its name lowercased."""
    return [part for name, value in headers for part in (name.lower(), b": ", value, b"\r\n")]


def response_bytes(status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool) -> bytes:
    """What uvicorn's httptools send writes for a response whose headers give its length and hold no
    Connection header: the status line, each header with its name lowercased, `connection: close`
    when the connection is not kept alive, the blank line, the body."""
    content = [STATUS_LINE[status], *header_lines(headers)]
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content += [b"\r\n", body]
    return b"".join(content)


def guarded_http(settings: Settings) -> type[asyncio.Protocol]:
    return type("GuardedHttp", (GuardedHttp,), {"header_timeout": settings.header_timeout, "unacked_timeout": settings.unacked_timeout})


class InFlightLimit:
    """At most ``limit`` HTTP requests served at once; beyond it a JSON 503 with Retry-After.

    Instead of uvicorn's limit_concurrency, which also counts connections that have sent no request
    yet: a flood of such connections made it answer every real request with a plain-text 503."""

    def __init__(self, app: Any, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics, self.in_flight = app, limit, metrics, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.metrics.rejected.inc()
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
        password = url_password(url) if url else None
        if password:
            secrets += [password, unquote(password)]
    return secrets


def serve(app: Starlette, settings: Settings) -> None:
    # Before uvicorn logs anything: its access log prints query strings (?access_token=, ?token=).
    install_log_redaction(known_secrets(settings))
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    config = uvicorn.Config(
        # The run events route ahead of Starlette's stack (runbell.service.http.streams), within the limit.
        InFlightLimit(StreamRoutes.of(app), settings.max_subscribers + 1000, app.state.metrics),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 1,
        proxy_headers=False,
        server_header=False,
        http=guarded_http(settings),
        backlog=settings.listen_backlog,
        timeout_keep_alive=5,
    )
    DrainingServer(config, app).run()
