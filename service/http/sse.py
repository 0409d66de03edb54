"""The Server-Sent Events response every stream uses (runs, assets, backfills), and its farewells."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import anyio
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from runbell.service.live.hub import Signal


class EventStream(Response):
    """A Server-Sent Events response with the gateway's settings (heartbeat, send timeout).

    Lean, because one process holds thousands: the request's own task sends the stream's frames, one
    more task waits for the client to leave (its stream ends at once, releasing its subscription),
    and one timer per stream, ticking every half of min(heartbeat, send timeout), sends the heartbeat
    comment when the stream was quiet and ends a write stuck for send_timeout. sse-starlette, used
    before, ran four tasks per stream and a cancel scope per write: 50 KiB per idle stream and a
    slower fan-out (runbell bench); a deadline per write alone cost ~4 µs, 40 ms over 10,000 clients.

    A client that does not take a write within send_timeout (checked at the next tick: up to 1.5 times
    that) is dropped and counted (runbell_sse_send_timeouts_total), not raised to uvicorn as an
    application error; what is left is to wait, briefly, for the connection to go (the kernel drops it,
    see runbell.service.http.server.GuardedHttp). Shutdown needs nothing here: the hub's drain ends every stream
    with a farewell."""

    media_type = "text/event-stream"

    def __init__(self, request: Request, stream: AsyncIterator[ServerSentEvent | bytes]):
        settings = request.app.state.settings
        self.status_code, self.background, self.stream = 200, None, stream
        self.init_headers({"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"})
        self.metrics, self.linger = request.app.state.metrics, settings.unacked_timeout + 1
        self.heartbeat, self.send_timeout = settings.heartbeat_seconds, settings.send_timeout
        self.every = min(self.heartbeat, self.send_timeout) / 2
        self.cancel = anyio.CancelScope()  # cancelled when the client leaves or a write is stuck
        self.left = False
        self.sending_since: float | None = None  # loop time a write began, while it has not gone
        self.pinging: asyncio.Future | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "HEAD":  # headers only: a stream would never end
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()
        watcher = self.loop.create_task(self._until_left(receive))
        self.timer = self.loop.call_later(self.every, self._tick, send)
        try:
            with self.cancel:
                await self._send(send, {"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for item in self.stream:
                    body = item if isinstance(item, bytes) else item.encode()
                    await self._send(send, {"type": "http.response.body", "body": body, "more_body": True})
                await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
            if self.cancel.cancelled_caught and not self.left:  # a write did not go within send_timeout
                self.metrics.sse_send_timeouts.inc()
                with anyio.move_on_after(self.linger):  # else uvicorn closes it, saying the response is incomplete
                    while (await receive())["type"] != "http.disconnect":
                        pass
        finally:
            watcher.cancel()
            self.timer.cancel()
            if self.pinging is not None:
                self.pinging.cancel()
            await self.stream.aclose()  # type: ignore[attr-defined]  # the stream is an async generator, which has aclose(); a stream stopped at a yield (a write timed out) releases its subscription

    async def _send(self, send, message: dict) -> None:
        self.sending_since = self.loop.time()
        await send(message)
        self.sending_since, self.last_write = None, self.loop.time()

    async def _until_left(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self.cancel.cancel()

    def _tick(self, send) -> None:
        now = self.loop.time()
        if self.sending_since is not None and now - self.sending_since >= self.send_timeout:
            self.cancel.cancel()  # the client stopped reading
            return
        if now - self.last_write >= self.heartbeat and (self.pinging is None or self.pinging.done()):
            # A whole frame per write, so a ping never lands inside an event's frame.
            self.pinging = asyncio.ensure_future(self._send(send, {"type": "http.response.body", "body": PING, "more_body": True}))
        self.timer = self.loop.call_later(self.every, self._tick, send)


PING = b": ping\r\n\r\n"


def farewell(reason: Signal, retry_ms: int) -> ServerSentEvent:
    if reason is Signal.OVERFLOW:
        message = {"error": "slow_consumer", "message": "this client fell too far behind; reconnect with Last-Event-ID"}
        return ServerSentEvent(data=json.dumps(message), event="error", retry=retry_ms)
    if reason is Signal.NOT_FOUND:
        message = {"error": "run_not_found", "message": "Airflow has no such run; a reconnect gets 404"}
        return ServerSentEvent(data=json.dumps(message), event="error")
    message = {"reason": "shutdown", "message": "the gateway is restarting; reconnect with Last-Event-ID"}
    return ServerSentEvent(data=json.dumps(message), event="shutdown", retry=retry_ms)
