"""The Server-Sent Events response every stream uses (runs, assets, backfills), and its farewells."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import anyio
from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from runbell.service.http.contract import StreamError, StreamShutdown
from runbell.service.http.server import DIRECT_WRITE, DirectWrite
from runbell.service.live.hub import Signal
from runbell.service.settings import Settings

log = logging.getLogger("runbell.sse")


class EventStream(Response):
    """A Server-Sent Events response with the gateway's settings (heartbeat, send timeout).

    Lean, because one process holds thousands: the request's own task sends the stream's frames, one
    more task waits for the client to leave (its stream ends at once, releasing its subscription),
    and the process's one Sweep looks at the stream every half of min(heartbeat, send timeout): it
    sends the heartbeat comment when the stream was quiet and ends a write stuck for send_timeout.
    sse-starlette, used before, ran four tasks per stream and a cancel scope per write: 50 KiB per
    idle stream and a slower fan-out (runbell bench); a deadline per write alone cost ~4 µs, 40 ms
    over 10,000 clients, and a timer per stream 11% of a core with 10,000 idle streams.

    A client that does not take a write within send_timeout (checked at the next look: up to 1.5 times
    that) is dropped and counted (runbell_sse_send_timeouts_total), not raised to uvicorn as an
    application error; what is left is to wait, briefly, for the connection to go (the kernel drops it,
    see runbell.service.http.server.GuardedHttp). Shutdown needs nothing here: the hub's drain ends every stream
    with a farewell."""

    media_type = "text/event-stream"

    stream: AsyncGenerator[ServerSentEvent | bytes, None]
    shared_headers: tuple[tuple[bytes, bytes], ...] | None = None  # built by the first stream

    def __init__(self, request: Request, stream: AsyncGenerator[ServerSentEvent | bytes, None] | None = None):
        """`stream` may be set after (one that writes through this response's write_now)."""
        settings = request.app.state.settings
        self.status_code, self.background = 200, None
        if stream is not None:
            self.stream = stream
        if EventStream.shared_headers is None:
            self.init_headers({"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"})
            EventStream.shared_headers = tuple(self.raw_headers)
        # Every stream's headers are the same: one encoding of them, a list of its own per stream (0.45
        # KiB and 10 allocations a connection less, by tracemalloc at 3,000 idle streams).
        self.raw_headers = list(EventStream.shared_headers)
        self.metrics, self.linger = request.app.state.metrics, settings.unacked_timeout + 1
        self.heartbeat, self.send_timeout = settings.heartbeat_seconds, settings.send_timeout
        self.sweep: Sweep = request.app.state.sse_sweep
        self.cancel = anyio.CancelScope()  # cancelled when the client leaves or a write is stuck
        self.left = False
        self.sending_since: float | None = None  # loop time a write began, while it has not gone
        self.pinging: asyncio.Future | None = None
        self.slot: set[EventStream] = set()  # the sweep's slot it is in
        self.direct_write: DirectWrite | None = None  # uvicorn's connection, when served by it

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "HEAD":  # headers only: a stream would never end
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()
        self.send = send
        self.direct_write = scope.get("extensions", {}).get(DIRECT_WRITE)
        watcher = self.loop.create_task(self._until_left(receive))
        self.sweep.add(self)
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
            self.sweep.discard(self)
            if self.pinging is not None:
                self.pinging.cancel()
            await self.stream.aclose()  # a stream stopped at a yield (a write timed out) releases its subscription

    async def _send(self, send, message: dict) -> None:
        self.sending_since = self.loop.time()
        await send(message)
        self.sending_since, self.last_write = None, self.loop.time()

    def can_write_now(self) -> bool:
        """Whether a frame may be written at once, from a callback: nothing else is being written on
        this stream and the connection takes it without waiting (else: send it the usual way)."""
        if self.direct_write is None or self.sending_since is not None or self.cancel.cancel_called:
            return False
        if self.pinging is not None and not self.pinging.done():
            return False
        return self.direct_write.ready()

    def write_now(self, body: bytes) -> None:
        """Write a frame at once; only right after can_write_now() said so."""
        assert self.direct_write is not None
        self.direct_write.write(body)
        self.last_write = self.loop.time()
        self.metrics.sse_direct_frames.inc()

    async def _until_left(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self.cancel.cancel()

    def look(self, now: float) -> None:
        """The sweep's visit: end a stuck write, or send the heartbeat when the stream was quiet."""
        if self.sending_since is not None and now - self.sending_since >= self.send_timeout:
            self.cancel.cancel()  # the client stopped reading
            return
        if now - self.last_write >= self.heartbeat and (self.pinging is None or self.pinging.done()):
            # A whole frame per write, so a ping never lands inside an event's frame.
            self.pinging = asyncio.ensure_future(self._send(self.send, {"type": "http.response.body", "body": PING, "more_body": True}))


class Sweep:
    """One timer for every stream of the process, instead of one per stream: each stream is looked at
    once every `every` seconds. The streams are dealt round-robin into SLOTS slots and each tick
    visits one slot, so a tick's work (and the pause it adds to a fan-out) is an eighth of the streams,
    not all of them. The timer runs only while there are streams."""

    SLOTS = 8

    def __init__(self, every: float):
        self.every = every
        self.slots: list[set[EventStream]] = [set() for _ in range(self.SLOTS)]
        self.count = 0
        self._dealt = 0  # streams dealt so far: the next one goes to slot _dealt % SLOTS
        self._visit = 0  # the slot the next tick visits
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def of(cls, settings: Settings) -> Sweep:
        return cls(min(settings.heartbeat_seconds, settings.send_timeout) / 2)

    def add(self, stream: EventStream) -> None:
        stream.slot = self.slots[self._dealt % self.SLOTS]
        stream.slot.add(stream)
        self._dealt += 1
        self.count += 1
        loop = asyncio.get_running_loop()
        if self._timer is None or self._loop is not loop:  # none yet, or one of a loop that is gone (tests)
            self._loop = loop
            self._timer = loop.call_later(self.every / self.SLOTS, self._tick)

    def discard(self, stream: EventStream) -> None:
        if stream in stream.slot:
            stream.slot.discard(stream)
            self.count -= 1

    def _tick(self) -> None:
        assert self._loop is not None
        slot, now = self.slots[self._visit], self._loop.time()
        self._visit = (self._visit + 1) % self.SLOTS
        for stream in list(slot):
            try:
                stream.look(now)
            except Exception:  # one stream's bug must not stop every stream's heartbeats and send timeouts
                log.exception("looking at an SSE stream failed")
        self._timer = self._loop.call_later(self.every / self.SLOTS, self._tick) if self.count else None


PING = b": ping\r\n\r\n"


def farewell(reason: Signal, retry_ms: int) -> ServerSentEvent:
    if reason is Signal.OVERFLOW:
        error = StreamError(error="slow_consumer", message="this client fell too far behind; reconnect with Last-Event-ID")
        return ServerSentEvent(data=error.model_dump_json(), event="error", retry=retry_ms)
    if reason is Signal.NOT_FOUND:
        error = StreamError(error="run_not_found", message="Airflow has no such run; a reconnect gets 404")
        return ServerSentEvent(data=error.model_dump_json(), event="error")
    shutdown = StreamShutdown(message="the gateway is restarting; reconnect with Last-Event-ID")
    return ServerSentEvent(data=shutdown.model_dump_json(), event="shutdown", retry=retry_ms)
