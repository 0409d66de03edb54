"""The hub: one shard-channel subscription per stream partition, fanned out in memory to every local subscriber.

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
runbell.service.live.topics): its kind (the first word of its routes), its shard channels, the route
of a key, how a message decodes into an item with a sequence number, and its replay log. Topics
register with the hub before it starts.

Publishers SPUBLISH ``<route>\n<envelope>`` on their partition's shard channel (runbell.bus.keys).
The listener SSUBSCRIBEs every partition's channel once (never per stream, never a pattern), so a
process holds as many subscriptions as there are partitions, however many waiters and runs; a
message is routed by its route (a dict lookup) and decoded only when someone here waits on it.
One code path for one node and a cluster: on a cluster, redis-py's ClusterPubSub keeps one
connection per master owning subscribed slots and moves a channel when its slot moves; on one
node the same commands run on one connection (a cluster of one). The listener reads each of those
connections; a connection's subscriptions confirmed (first time or again, after a reconnection or
a slot move) make every subscriber re-read its log.
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
from opentelemetry.trace import SpanKind
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import RedisError

from runbell.bus.keys import ROUTE_END
from runbell.bus.schema import START, BadEvent, Position
from runbell.service.core import tracing
from runbell.service.core.loops import Backoff, Once, Supervised, keep_trying
from runbell.service.core.metrics import Metrics

log = logging.getLogger("runbell.hub")

LISTEN_POLL_SECONDS = 1.0  # get_message timeout: how often the listener looks up when idle
PING_EVERY_SECONDS = 5.0  # an idle pub/sub connection is pinged this often...
DEAD_AFTER_SECONDS = 15.0  # ...and dropped and re-made when nothing at all was heard for this long
BACKOFF_MAX_SECONDS = 5.0
GC_PAUSE_FANOUT = 100  # subscribers of one channel from which a fan-out runs without garbage collection
REDIS_DOWN = (RedisError, OSError)  # what a read retries until the caller's timeout
ROUTE_MAX_BYTES = 32 * 1024  # where a message's route must end: the longest, a 1500-character asset name percent-encoded, is ~18 KB


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
    DONE = "done"  # the consumer took, from the fan-out, the last item it needed (a long-poll waiter answered)


class ShardChannelMoved(RedisError):
    """Redis unsubscribed one of the hub's shard channels: its slot moved to another master."""


class SubscriptionClosed(Exception):
    def __init__(self, reason: Signal):
        super().__init__(reason.value)
        self.reason = reason


class Topic(ABC, Generic[K, T]):
    """One kind of stream the hub carries. A subclass registers itself with ``hub`` (before hub.start)."""

    def __init__(self, hub: Hub, kind: str, channels: list[str]):
        self.hub = hub
        self.kind = kind  # every route of the topic is "<kind>:..."
        self.channels = channels  # the shard channels its streams publish on (shared with other topics or not)
        hub.register(self)

    @abstractmethod
    def route(self, key: K) -> str:
        """The route of one stream: what its messages start with."""

    @abstractmethod
    def decode(self, data: bytes) -> T:
        """One message's envelope (after its route) into an item; raises BadEvent when it is not one."""

    @abstractmethod
    def route_of(self, item: T) -> str:
        """The route of the item's own stream (a message under another route is dropped)."""

    @abstractmethod
    async def read(self, key: K, after: Position) -> list[T]:
        """The stream's items after a position, in position order, from its replay log."""

    def published(self, route: str) -> None:
        """Called for every message of the topic, before anything else (subscribed to or not)."""


class SharedReads(Generic[R]):
    """The same read asked by many callers at once (a crowd waiting on one run) is made once.

    A caller joins a read in flight only when that read started after ``since`` (a ticket from
    ``ticket()``): a read started earlier may have been answered before an event that the caller was
    never offered live, and would hide that event. The caller passes the earlier of when it began to
    need the read and when anything last went by live on its stream (``Hub.live_marks``): a read
    started after both misses nothing the caller was not offered, so a crowd arriving on a quiet run
    shares one read."""

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
        self.route = topic.route(key)
        self.last = after
        # What the listener offered, at most hub.buffer, and what the log read gave: deques made only
        # while they hold something (an empty deque is 760 bytes; thousands of idle subscribers), and a
        # future only while waiting, not an asyncio.Queue (four deques and an Event).
        self._queue: deque[T | Signal] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._ready: deque[T] | None = None
        self._needs_replay = True  # the first read comes from the log
        self._since = ticket()  # registered now: a log read must start after this to be ours
        self._closed: Signal | None = None
        # Set by a consumer that can take an item at once, from the listener's call, without waking
        # its task (an SSE stream writing the shared frame to its socket, a long-poll waiter folding
        # it and writing the answer it decides); False: not taken now.
        self.direct: Callable[[T], bool] | None = None

    def __aiter__(self) -> Subscription[K, T]:
        return self

    @property
    def queue(self) -> deque[T | Signal]:
        """What the listener offered and the consumer has not taken yet."""
        if self._queue is None:
            self._queue = deque()
        return self._queue

    def _ready_now(self, items: list[T]) -> None:
        """Items to deliver before anything offered later (from the log, or one offered after it)."""
        if items:
            if self._ready is None:
                self._ready = deque()
            self._ready.extend(items)

    def _next_ready(self) -> T:
        assert self._ready is not None
        item = self._ready.popleft()
        if not self._ready:
            self._ready = None
        return item

    async def __anext__(self) -> T:
        while True:
            if self._ready:
                item = self._next_ready()
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
            self._ready_now([offered])

    async def backlog(self) -> list[T]:
        """What the log already holds after the last position: the first read, which never waits for news."""
        await self._replay()
        self._needs_replay = False
        items = []
        while self._ready:
            item = self._next_ready()
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
        return list(self._ready or ())

    async def _replay(self) -> None:
        """Read the log after the last position into the ready queue (while Redis is down, keep
        trying: the caller's own timeout bounds the wait, a waiter gets 202, never an error)."""
        topic, key, after = self.topic, self.key, self.last
        since = min(self._since, self.hub.live_marks.get(self.route, self._since))
        self._ready_now(
            await keep_trying(
                lambda: self.hub.reads((topic, key, after), lambda: topic.read(key, after), since),
                retry_on=REDIS_DOWN,
                log_once=self.hub.log_once,
                what="replay log",
            )
        )

    async def _offered(self) -> T | Signal:
        """The next item the listener offered, waiting for one."""
        while not self._queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        if not self._queue:
            self._queue = None
        return item

    def offer(self, item: T | Signal) -> None:
        """Called by the listener: never blocks. A full queue cuts the subscriber off."""
        if self._closed is not None:
            return
        if self.direct is not None and self._caught_up() and not isinstance(item, Signal) and self._take_directly(item):
            return
        if self._queue is not None and len(self._queue) >= self.hub.buffer:
            self.close(Signal.OVERFLOW)
            self.hub.metrics.overflows.inc()
            return
        self.queue.append(item)
        self._wake()

    def _caught_up(self) -> bool:
        """The consumer waits for the next item with nothing before it: nothing ready, nothing queued,
        no log read to make (it waits in _offered only then)."""
        return self._waiter is not None and not self._waiter.done() and not self._queue

    def _take_directly(self, item: T) -> bool:
        """Hand the next item in sequence to the consumer's direct taker; anything else (a gap, a new
        epoch, a taker that cannot take it now) goes through the queue. A taker that fails cuts
        this subscriber off (it resumes from its last position), never the listener's fan-out."""
        if not item.position.follows(self.last) and not (self.last == START and item.position.seq == 1):
            return False
        try:
            taken = self.direct(item)  # type: ignore[misc]  # checked by the caller
        except Exception:
            log.exception("a direct delivery failed; its subscriber is cut off and resumes from its last position")
            self.close(Signal.OVERFLOW)
            return True
        if taken:
            self.last = item.position
        return taken

    def close(self, reason: Signal) -> None:
        """Drop whatever is buffered (memory goes back at once) and leave only the reason."""
        if self._closed is not None:
            return
        self._closed = reason
        self._queue = deque((reason,))
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
        self.topics: dict[str, Topic[Any, Any]] = {}  # by kind, in registration order
        self.channels: list[str] = []  # every topic's shard channels, each once
        self.shared = SharedBytes()  # encoded events and outcomes, for the routes
        self.reads: SharedReads[list[Any]] = SharedReads()  # log reads, shared by a stream's crowd
        self.subscribers: dict[str, set[Subscription[Any, Any]]] = {}  # by route
        self.heard: dict[str, float] = {}  # route -> when its last event (or first subscriber) came
        # route -> ticket of its last item offered live (or first subscriber, or re-subscription):
        # a log read started after it misses nothing its subscribers were not offered live.
        self.live_marks: dict[str, int] = {}
        self.confirmed: set[str] = set()  # shard channels confirmed since the listener (re)started
        self.count = 0
        self.connected = asyncio.Event()  # every channel subscribed (set by the listener, cleared when it fails)
        self.lost_at: float | None = None  # monotonic time the subscriptions were last lost (None: never held)
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
        """Carry one more kind of stream; its channels are subscribed at the next (re)connection."""
        self.topics[topic.kind] = topic
        self.channels = self._topic_channels()

    def _topic_channels(self) -> list[str]:
        return list(dict.fromkeys(c for topic in self.topics.values() for c in topic.channels))  # each once

    async def resubscribe(self) -> None:
        """The topics' channels changed (another partition count): the listener starts over on them,
        and every subscriber re-reads its log once they are confirmed."""
        self.channels = self._topic_channels()
        await self.listener.stop()
        if not self.draining:
            self.listener.start()

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
        sub = Subscription(self, topic, key, after)
        route = sub.route
        if self.draining:
            sub.close(Signal.DRAIN)
        self.heard.setdefault(route, time.monotonic())
        self.live_marks.setdefault(route, ticket())
        self.subscribers.setdefault(route, set()).add(sub)
        self.count += 1
        try:
            yield sub
        finally:
            self.count -= 1
            subs = self.subscribers.get(route)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.subscribers[route]
                    self.heard.pop(route, None)
                    self.live_marks.pop(route, None)

    def silent(self, topic: Topic[K, Any], longer_than: float) -> list[tuple[K, float]]:
        """(key, seconds silent) of the topic's streams waited on here that had no item for a while."""
        now, found = time.monotonic(), []
        for route, subs in self.subscribers.items():
            silent = now - self.heard.get(route, now)
            if subs and silent > longer_than:
                sub = next(iter(subs))
                if sub.topic is topic:
                    found.append((sub.key, silent))
        return found

    def close_route(self, route: str, reason: Signal) -> None:
        """Tell every subscriber of one stream to leave, with the reason."""
        for sub in list(self.subscribers.get(route, ())):
            sub.close(reason)

    def bad_event(self, exc: BadEvent) -> None:
        """Count a dropped message by reason; log the first of each reason only."""
        self.metrics.decode_errors.labels(exc.reason).inc()
        self.log_once("bad-" + exc.reason, "dropping a message that is not a valid event (%s); further ones are only counted", exc)

    # -- the listener ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe every shard channel, then read every connection that holds some (one per
        master on a cluster, one on a single node) until one fails: then all is made anew."""
        await refresh_topology(self.pubsub_client)  # a fail-over or slot move since the last try
        pubsub = self.pubsub_client.pubsub()
        readers: dict[int, asyncio.Task[None]] = {}
        self.confirmed.clear()
        try:
            await pubsub.ssubscribe(*self.channels)
            while True:
                connections = node_pubsubs(pubsub)
                for connection in connections:
                    if id(connection) not in readers:
                        readers[id(connection)] = asyncio.create_task(self._read(connection), name="runbell-hub-reader")
                alive = {id(c) for c in connections}
                for key, task in list(readers.items()):
                    if task.done():
                        task.result()  # a reader that failed fails the listener, which starts over
                        del readers[key]
                    elif key not in alive:  # its channels moved to another master
                        task.cancel()
                        del readers[key]
                await asyncio.wait(readers.values(), timeout=LISTEN_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self.connected.is_set():
                self.lost_at = time.monotonic()
            self.connected.clear()
            for task in readers.values():
                task.cancel()
            await asyncio.gather(*readers.values(), return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # redis-py leaves PubSub.aclose unannotated

    async def _read(self, connection: PubSub) -> None:
        """Read one connection's messages; ping it when idle, fail when it stays silent."""
        last_heard = last_ping = time.monotonic()
        while True:
            message = await connection.get_message(ignore_subscribe_messages=False, timeout=LISTEN_POLL_SECONDS)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                self._handle(connection, message)
            elif now - last_heard > DEAD_AFTER_SECONDS:
                raise TimeoutError("no answer from Redis on a pub/sub connection")
            if now - last_ping > PING_EVERY_SECONDS and now - last_heard > PING_EVERY_SECONDS:
                last_ping = now
                await connection.ping()

    def _handle(self, connection: PubSub, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "smessage":
            self._route(message["data"])
        elif kind == "sunsubscribe":
            # The hub never unsubscribes: Redis moved the channel's slot to another master (or a
            # reconfiguration dropped it). Start over: the topology is re-read and every channel
            # subscribed where it lives now, then every subscriber re-reads its log.
            raise ShardChannelMoved(f"shard channel {_text(message['channel'])!r} unsubscribed by Redis (its slot moved)")
        elif kind == "ssubscribe":
            self.confirmed.add(_text(message["channel"]))
            if message["data"] == len(connection.shard_channels):
                # This connection holds all its channels (again: perhaps silently re-made by redis-py
                # after a short outage, or moved by a slot migration): whatever was published
                # meanwhile is only in the logs, so every subscriber re-reads its log.
                self.metrics.resubscribes.inc()
                if self.confirmed.issuperset(self.channels):
                    self.connected.set()
                self.listener.ok()
                self._broadcast(Signal.RESYNC)

    def _route(self, data: bytes) -> None:
        """Hand one message to the subscribers of its route; read no further when there are none."""
        end = data.find(ROUTE_END, 0, ROUTE_MAX_BYTES)
        if end < 0:
            self.bad_event(BadEvent("route", "a message without a route"))
            return
        route = data[:end].decode("utf-8", "replace")
        topic = self.topics.get(route.partition(":")[0])
        if topic is None:
            self.bad_event(BadEvent("route", f"a message of no known kind ({route[:100]!r})"))
            return
        topic.published(route)
        if route in self.subscribers:  # else nobody here waits on this stream: not even copied
            self._dispatch(topic, route, data[end + 1 :])

    def _dispatch(self, topic: Topic[Any, Any], route: str, data: bytes) -> None:
        subs = self.subscribers.get(route)
        if not subs:
            return  # nobody here waits on this stream: not even decoded
        self.heard[route] = time.monotonic()
        self.live_marks[route] = ticket()
        try:
            item = topic.decode(data)
        except BadEvent as exc:
            self.bad_event(exc)
            return
        if topic.route_of(item) != route:  # another stream's event, misread as this one's if let in
            self.bad_event(BadEvent("route", f"an event of another stream under {route}"))
            return
        self.metrics.events_in.inc()
        self.metrics.delivery_latency.observe(max(0.0, time.time() - item.event.ts))
        parent = getattr(item.event, "trace", None)
        if parent is None:
            self._offer(subs, item)
            return
        attributes = {"runbell.route": route, "runbell.subscribers": len(subs)}
        with tracing.span("runbell.fanout", parent, kind=SpanKind.CONSUMER, attributes=attributes):
            self._offer(subs, item)

    def _offer(self, subs: set[Subscription[Any, Any]], item: Any) -> None:
        """Hand the item to each subscriber of its stream."""
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
        for route in self.live_marks:
            self.live_marks[route] = ticket()
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                if close:
                    sub.close(signal)
                else:
                    sub.offer(signal)


def node_pubsubs(pubsub: PubSub) -> list[PubSub]:
    """The connections holding the subscriptions: a cluster's one per master, else the one."""
    if isinstance(pubsub, ClusterPubSub):
        return list(pubsub.node_pubsub_mapping.values())
    return [pubsub]


async def refresh_topology(client: aioredis.Redis) -> None:
    """A cluster client re-reads which master owns which slot (after a fail-over, the dead master's
    replica does); nothing for one node."""
    if isinstance(client, RedisCluster):
        await client.nodes_manager.initialize()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
