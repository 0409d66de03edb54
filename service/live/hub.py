"""The hub: one pub/sub connection per process, fanned out in memory to every local subscriber.

Shape of encode/broadcaster's core (one listener task reading the broker, per-subscriber queues),
without its gaps:
- queues are bounded; a subscriber that cannot keep up is cut off with an error, memory stays flat;
- the listener is supervised: after any (re)subscribe every subscriber re-reads the replay log, so
  what was published while the connection was down is not lost (pub/sub is at-most-once);
- a subscriber registers before it reads the log (subscribe first, then replay), de-duplicates by
  position (epoch, seq), and fills any gap in the sequence from the log;
- an item of a new epoch (Redis lost the stream's state and its seq started again) is not taken for
  a duplicate: the subscriber re-reads the log from where it stood, and the topic's read returns what
  lies after that position in the old epoch (the store) and the new one.

The hub does not know what it carries. A ``Topic`` is one kind of stream (runs, assets: see
runbell.service.live.topics): its pub/sub pattern, the channel of a key, how a message decodes into
an item with a sequence number, and its replay log. Topics register with the hub before it starts;
the listener holds all their patterns on its one connection.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from runbell.bus.schema import START, BadEvent, Position
from runbell.service.core.loops import Backoff, Once, Supervised, keep_trying
from runbell.service.core.metrics import Metrics

log = logging.getLogger("runbell.hub")

LISTEN_POLL_SECONDS = 1.0  # get_message timeout: how often the listener looks up when idle
PING_EVERY_SECONDS = 5.0  # an idle pub/sub connection is pinged this often...
DEAD_AFTER_SECONDS = 15.0  # ...and dropped and re-made when nothing at all was heard for this long
BACKOFF_MAX_SECONDS = 5.0
GC_PAUSE_FANOUT = 100  # subscribers of one channel from which a fan-out runs without garbage collection
REDIS_DOWN = (RedisError, OSError)  # what a read retries until the caller's timeout


class Stamped(Protocol):
    @property
    def ts(self) -> float: ...  # when the publisher sent it (its clock)


class Item(Protocol):
    """What a topic's messages decode into: an event numbered within its stream."""

    @property
    def position(self) -> Position: ...

    @property
    def event(self) -> Stamped: ...


K = TypeVar("K", bound=Hashable)  # what names one stream of a topic: (dag_id, run_id), an asset name
T = TypeVar("T", bound=Item)
R = TypeVar("R")


class Signal(Enum):
    RESYNC = "resync"  # the connection was (re)made: re-read the log
    OVERFLOW = "overflow"  # the subscriber fell too far behind
    DRAIN = "drain"  # the process is shutting down
    NOT_FOUND = "not_found"  # the stream's source says it does not exist (a run Airflow does not have)


class SubscriptionClosed(Exception):
    def __init__(self, reason: Signal):
        super().__init__(reason.value)
        self.reason = reason


class Topic(ABC, Generic[K, T]):
    """One kind of stream the hub carries. A subclass registers itself with ``hub`` (before hub.start)."""

    def __init__(self, hub: Hub, pattern: str):
        self.hub = hub
        self.pattern = pattern  # the PSUBSCRIBE pattern matching the channel of every key
        hub.register(self)

    @abstractmethod
    def channel(self, key: K) -> str:
        """The pub/sub channel of one stream."""

    @abstractmethod
    def decode(self, data: bytes) -> T:
        """One message into an item; raises BadEvent when it is not one."""

    @abstractmethod
    def channel_of(self, item: T) -> str:
        """The channel the item's own stream publishes on (a message on another is dropped)."""

    @abstractmethod
    async def read(self, key: K, after: Position) -> list[T]:
        """The stream's items after a position, in position order, from its replay log."""

    def published(self, channel: str) -> None:
        """Called for every message on the pattern, before anything else (subscribed to or not)."""


class SharedReads(Generic[R]):
    """The same read asked by many callers at once (a crowd waiting on one run) is made once.

    A caller joins a read in flight only when that read started after the caller began to need it
    (``since``, a ticket from ``ticket()``): a read started earlier may have been answered before an
    event that the caller, registered later, was never offered live, and would hide that event."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, tuple[int, asyncio.Future[R]]] = {}

    async def __call__(self, key: Hashable, read: Callable[[], Awaitable[R]], since: int) -> R:
        found = self._inflight.get(key)
        if found is None or found[0] < since:
            started = ticket()
            future = asyncio.ensure_future(read())
            self._inflight[key] = found = (started, future)
            future.add_done_callback(lambda _: self._forget(key, future))
        return await asyncio.shield(found[1])

    def _forget(self, key: Hashable, future: asyncio.Future[R]) -> None:
        found = self._inflight.get(key)
        if found is not None and found[1] is future:  # not a later read that replaced it
            del self._inflight[key]


_tickets = itertools.count()


def ticket() -> int:
    """An ever-growing number: orders the moments a subscriber needs a read and reads start."""
    return next(_tickets)


class Subscription(Generic[K, T]):
    """One waiter's or SSE client's view of one stream: items in position order, gap-free, each once."""

    def __init__(self, hub: Hub, topic: Topic[K, T], key: K, after: Position):
        self.hub, self.topic, self.key = hub, topic, key
        self.last = after
        # What the listener offered, at most hub.buffer. A deque and a future made only while waiting,
        # not an asyncio.Queue (four deques and an Event): thousands of subscribers each hold one.
        self.queue: deque[T | Signal] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ready: deque[T] = deque()
        self._needs_replay = True  # the first read comes from the log
        self._since = ticket()  # registered now: a log read must start after this to be ours
        self._closed: Signal | None = None

    def __aiter__(self) -> Subscription[K, T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self._ready:
                item = self._ready.popleft()
                if item.position <= self.last:
                    continue  # already delivered (the log and pub/sub overlap)
                # In order; a hole that neither the log nor the store could fill is stepped over.
                self.last = item.position
                return item
            if self._needs_replay:
                await self._replay()
                self._needs_replay = False
                continue
            offered = await self._offered()
            if isinstance(offered, Signal):
                if offered is Signal.RESYNC:
                    self._needs_replay = True
                    self._since = ticket()
                    continue
                raise SubscriptionClosed(offered)
            if offered.position <= self.last:
                continue
            # A gap, or a new epoch: read the log first. (The first item after an empty first read,
            # seq 1 of any epoch, is no gap: that read asked the store for earlier epochs already.)
            first = self.last == START and offered.position.seq == 1
            if not (first or offered.position.follows(self.last)):
                self._since = ticket()  # what is missing was published before now
                await self._replay()
            self._ready.append(offered)

    async def backlog(self) -> list[T]:
        """What the log already holds after the last position: the first read, which never waits for news."""
        await self._replay()
        self._needs_replay = False
        items = []
        while self._ready:
            item = self._ready.popleft()
            if item.position > self.last:
                self.last = item.position
                items.append(item)
        return items

    async def ahead(self) -> list[T]:
        """What the log holds after the last position, left for the iteration to deliver: a look
        at what is there before the first item (an SSE client's resume checks its last id)."""
        if self._needs_replay:
            await self._replay()
            self._needs_replay = False
        return list(self._ready)

    async def _replay(self) -> None:
        """Read the log after the last position into the ready queue (while Redis is down, keep
        trying: the caller's own timeout bounds the wait, a waiter gets 202, never an error)."""
        topic, key, after, since = self.topic, self.key, self.last, self._since
        self._ready.extend(
            await keep_trying(
                lambda: self.hub.reads((topic, key, after), lambda: topic.read(key, after), since),
                retry_on=REDIS_DOWN,
                log_once=self.hub.log_once,
                what="replay log",
            )
        )

    async def _offered(self) -> T | Signal:
        """The next item the listener offered, waiting for one."""
        while not self.queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.queue.popleft()

    def offer(self, item: T | Signal) -> None:
        """Called by the listener: never blocks. A full queue cuts the subscriber off."""
        if self._closed is not None:
            return
        if len(self.queue) >= self.hub.buffer:
            self.close(Signal.OVERFLOW)
            self.hub.metrics.overflows.inc()
            return
        self.queue.append(item)
        self._wake()

    def close(self, reason: Signal) -> None:
        """Drop whatever is buffered (memory goes back at once) and leave only the reason."""
        if self._closed is not None:
            return
        self._closed = reason
        self.queue.clear()
        self.queue.append(reason)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class SharedBytes:
    """Bytes built once and shared by every subscriber of a stream, so that a crowd's fan-out encodes
    an event and its outcome once, not once per caller. Bounded in bytes (results can be 256 KiB):
    the oldest entries go first; an entry is needed only while its event fans out.

    Keys hold what fixes the bytes: a run's events are numbered by Redis and a position (epoch, seq)
    is never reused, so the event at (dag, run, epoch, seq), and the outcome folded up to it, are the
    same for every caller."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024):
        self.max_bytes, self.held = max_bytes, 0
        self._items: dict[Hashable, bytes] = {}  # insertion-ordered: the first key is the oldest

    def get(self, key: Hashable, build: Callable[[], bytes]) -> bytes:
        found = self._items.get(key)
        if found is None:
            found = self._items[key] = build()
            self.held += len(found)
            while self.held > self.max_bytes and len(self._items) > 1:
                self.held -= len(self._items.pop(next(iter(self._items))))
        return found


class Hub:
    def __init__(self, pubsub_client: aioredis.Redis, metrics: Metrics, buffer: int = 1000, max_subscribers: int = 20_000):
        self.pubsub_client = pubsub_client  # its own connection with socket_timeout=None
        self.metrics = metrics
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.topics: dict[str, Topic[Any, Any]] = {}  # by pattern, in registration order
        self.shared = SharedBytes()  # encoded events and outcomes, for the routes
        self.reads: SharedReads[list[Any]] = SharedReads()  # log reads, shared by a stream's crowd
        self.subscribers: dict[str, set[Subscription[Any, Any]]] = {}  # by channel name
        self.heard: dict[str, float] = {}  # channel -> when its last event (or first subscriber) came
        self.count = 0
        self.connected = asyncio.Event()
        self.draining = False
        self.log_once = Once(log)
        self.listener = Supervised(
            "runbell-hub-listener",
            self._listen,
            backoff=Backoff(cap=BACKOFF_MAX_SECONDS),
            logger=log,
            expected=(RedisError, OSError, TimeoutError),
        )

    def register(self, topic: Topic[Any, Any]) -> None:
        """Carry one more kind of stream; its pattern is subscribed at the next (re)connection."""
        self.topics[topic.pattern] = topic

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.listener.start()

    async def stop(self) -> None:
        self.drain()
        await self.listener.stop()

    def drain(self) -> None:
        """Shutdown has begun: every subscriber is told to leave (SSE farewell, long-poll 202)."""
        self.draining = True
        self._broadcast(Signal.DRAIN, close=True)

    # -- subscribers ----------------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.count < self.max_subscribers and not self.draining

    @asynccontextmanager
    async def subscribe(self, topic: Topic[K, T], key: K, after: Position = START) -> AsyncIterator[Subscription[K, T]]:
        """Register a subscriber to one stream (before its log is read; closed at once while
        draining), and always unregister it."""
        channel = topic.channel(key)
        sub = Subscription(self, topic, key, after)
        if self.draining:
            sub.close(Signal.DRAIN)
        self.heard.setdefault(channel, time.monotonic())
        self.subscribers.setdefault(channel, set()).add(sub)
        self.count += 1
        try:
            yield sub
        finally:
            self.count -= 1
            subs = self.subscribers.get(channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.subscribers[channel]
                    self.heard.pop(channel, None)

    def silent(self, topic: Topic[K, Any], longer_than: float) -> list[tuple[K, float]]:
        """(key, seconds silent) of the topic's streams waited on here that had no item for a while."""
        now, found = time.monotonic(), []
        for channel, subs in self.subscribers.items():
            silent = now - self.heard.get(channel, now)
            if subs and silent > longer_than:
                sub = next(iter(subs))
                if sub.topic is topic:
                    found.append((sub.key, silent))
        return found

    def close_channel(self, channel: str, reason: Signal) -> None:
        """Tell every subscriber of one stream to leave, with the reason."""
        for sub in list(self.subscribers.get(channel, ())):
            sub.close(reason)

    def bad_event(self, exc: BadEvent) -> None:
        """Count a dropped message by reason; log the first of each reason only."""
        self.metrics.decode_errors.labels(exc.reason).inc()
        self.log_once("bad-" + exc.reason, "dropping a message that is not a valid event (%s); further ones are only counted", exc)

    # -- the listener ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        pubsub = self.pubsub_client.pubsub()
        try:
            # One command, so every pattern holds before any confirmation arrives.
            await pubsub.psubscribe(*self.topics)
            last_heard = last_ping = time.monotonic()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=LISTEN_POLL_SECONDS)
                now = time.monotonic()
                if message is not None:
                    last_heard = now
                    self._handle(message)
                elif now - last_heard > DEAD_AFTER_SECONDS:
                    raise TimeoutError("no answer from Redis on the pub/sub connection")
                if now - last_ping > PING_EVERY_SECONDS and now - last_heard > PING_EVERY_SECONDS:
                    last_ping = now
                    await pubsub.ping()
        finally:
            self.connected.clear()
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "pmessage":
            topic = self.topics.get(_text(message["pattern"]))
            if topic is not None:
                self._dispatch(topic, _text(message["channel"]), message["data"])
        elif kind == "psubscribe" and _text(message["channel"]) == next(iter(self.topics), None):
            # (Re)subscribed, perhaps silently by redis-py after a short outage: whatever was
            # published meanwhile is only in the logs, so every subscriber re-reads its log. The first
            # pattern's confirmation stands for all: they were subscribed by the same PSUBSCRIBE.
            self.metrics.resubscribes.inc()
            self.connected.set()
            self.listener.ok()
            self._broadcast(Signal.RESYNC)

    def _dispatch(self, topic: Topic[Any, Any], channel: str, data: bytes) -> None:
        topic.published(channel)
        subs = self.subscribers.get(channel)
        if not subs:
            return  # nobody here waits on this stream: not even decoded
        self.heard[channel] = time.monotonic()
        try:
            item = topic.decode(data)
        except BadEvent as exc:
            self.bad_event(exc)
            return
        if topic.channel_of(item) != channel:  # another stream's event, misread as this one's if let in
            self.bad_event(BadEvent("channel", f"an event of another stream on {channel}"))
            return
        self.metrics.events_in.inc()
        self.metrics.delivery_latency.observe(max(0.0, time.time() - item.event.ts))
        if len(subs) < GC_PAUSE_FANOUT:
            for sub in list(subs):
                sub.offer(item)
            return
        # A collection in the middle of a fan-out stalls every subscriber after it: collect after. The
        # subscribers run in the order they were woken, and gc.enable is queued behind them.
        gc.disable()
        try:
            for sub in list(subs):
                sub.offer(item)
        finally:
            asyncio.get_running_loop().call_soon(gc.enable)

    def _broadcast(self, signal: Signal, close: bool = False) -> None:
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                if close:
                    sub.close(signal)
                else:
                    sub.offer(signal)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
