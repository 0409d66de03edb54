"""The hub: one pub/sub connection per process, fanned out in memory to every local subscriber.

Shape of encode/broadcaster's core (one listener task reading the broker, per-subscriber queues),
without its gaps:
- queues are bounded; a subscriber that cannot keep up is cut off with an error, memory stays flat;
- the listener is supervised: after any (re)subscribe every subscriber re-reads the replay log, so
  what was published while the connection was down is not lost (pub/sub is at-most-once);
- a subscriber registers before it reads the log (subscribe first, then replay), de-duplicates by
  sequence number, and fills any gap in the sequence from the log.

Runs and assets: the listener holds two patterns on its one connection (``keys.channel_pattern``
for runs, ``keys.asset_channel_pattern`` for assets). An asset's subscription (``AssetSubscription``)
is a Subscription whose log is the asset's (``AssetReplayLog``, Redis only: the store keeps runs).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from enum import Enum
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from runbell.bus import keys
from runbell.bus.schema import (
    AssetEnvelope,
    BadEvent,
    Envelope,
    decode_asset_envelope,
    decode_envelope,
)
from runbell.service.core.loops import Backoff, Once, Supervised
from runbell.service.core.metrics import Metrics

log = logging.getLogger("runbell.hub")

LISTEN_POLL_SECONDS = 1.0  # get_message timeout: how often the listener looks up when idle
PING_EVERY_SECONDS = 5.0  # an idle pub/sub connection is pinged this often...
DEAD_AFTER_SECONDS = 15.0  # ...and dropped and re-made when nothing at all was heard for this long
BACKOFF_MAX_SECONDS = 5.0
MISSING_HOLD_SECONDS = 60.0
GC_PAUSE_FANOUT = 100  # subscribers of one run from which a fan-out runs without garbage collection


class EventArchive(Protocol):
    """Where events older than the replay log are found (the SQL store)."""

    async def events(self, dag_id: str, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[Envelope]: ...


class Signal(Enum):
    RESYNC = "resync"  # the connection was (re)made: re-read the log
    OVERFLOW = "overflow"  # the subscriber fell too far behind
    DRAIN = "drain"  # the process is shutting down
    NOT_FOUND = "not_found"  # Airflow says the run does not exist (the reconciler asked)


class SubscriptionClosed(Exception):
    def __init__(self, reason: Signal):
        super().__init__(reason.value)
        self.reason = reason


class ReplayLog:
    """Reads a run's envelopes after a sequence number: Redis's replay log, else the store."""

    def __init__(self, client: aioredis.Redis, namespace: str, archive: EventArchive | None, metrics: Metrics):
        self.client, self.namespace, self.archive, self.metrics = client, namespace, archive, metrics
        self._logged: set[str] = set()
        self._inflight: dict[tuple[str, str, int], asyncio.Future[list[Envelope]]] = {}

    async def read(self, dag_id: str, run_id: str, after_seq: int) -> list[Envelope]:
        """The same read asked by many subscribers at once (a crowd waiting on one run) is made once."""
        key = (dag_id, run_id, after_seq)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._read(dag_id, run_id, after_seq))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _read(self, dag_id: str, run_id: str, after_seq: int) -> list[Envelope]:
        log_key = keys.run_keys(self.namespace, dag_id, run_id).log
        entries = await self.client.xrange(log_key, min=f"(0-{after_seq}", max="+")
        envelopes = [e for e in (self._decode(fields) for _, fields in entries) if e is not None]
        first = envelopes[0].seq if envelopes else None
        if self.archive is not None and (first is None or first > after_seq + 1):
            # The log does not start where we need it (expired, or never existed): ask the store.
            try:
                older = await self.archive.events(dag_id, run_id, after_seq=after_seq)
            except Exception as exc:  # the store being down must not fail a waiter: Redis may suffice
                if "archive" not in self._logged:
                    self._logged.add("archive")
                    log.warning("store unreadable (%s); serving from Redis only", type(exc).__name__)
                return envelopes
            envelopes = [e for e in older if first is None or e.seq < first] + envelopes
        return envelopes

    def _decode(self, fields: dict) -> Envelope | None:
        try:
            return decode_envelope(fields.get(b"env", b""))
        except BadEvent as exc:
            count_bad_event(self.metrics, self._logged, exc)
            return None


class AssetReplayLog:
    """Reads an asset's envelopes after a sequence number from its replay log in Redis."""

    def __init__(self, client: aioredis.Redis, namespace: str, metrics: Metrics):
        self.client, self.namespace, self.metrics = client, namespace, metrics
        self._logged: set[str] = set()
        self._inflight: dict[tuple[str, int], asyncio.Future[list[AssetEnvelope]]] = {}

    async def read(self, name: str, after_seq: int) -> list[AssetEnvelope]:
        """The same read asked by many subscribers at once is made once (as ReplayLog.read)."""
        key = (name, after_seq)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._read(name, after_seq))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _read(self, name: str, after_seq: int) -> list[AssetEnvelope]:
        log_key = keys.asset_keys(self.namespace, name).log
        entries = await self.client.xrange(log_key, min=f"(0-{after_seq}", max="+")
        return [e for e in (self._decode(fields) for _, fields in entries) if e is not None]

    async def current_seq(self, name: str) -> int:
        """The asset's last sequence number (0 before its first event)."""
        raw = await self.client.get(keys.asset_keys(self.namespace, name).seq)
        return int(raw) if raw is not None else 0

    def _decode(self, fields: dict) -> AssetEnvelope | None:
        try:
            return decode_asset_envelope(fields.get(b"env", b""))
        except BadEvent as exc:
            count_bad_event(self.metrics, self._logged, exc)
            return None


def count_bad_event(metrics: Metrics, logged: set[str], exc: BadEvent) -> None:
    """Count a dropped message by reason; log the first of each reason only."""
    metrics.decode_errors.labels(exc.reason).inc()
    if exc.reason not in logged:
        logged.add(exc.reason)
        log.warning("dropping a message that is not a valid event (%s); further ones are only counted", exc)


class Subscription:
    """One waiter's or SSE client's view of a run: envelopes in seq order, gap-free, each once."""

    def __init__(self, hub: Hub, dag_id: str, run_id: str, after_seq: int):
        self.hub, self.dag_id, self.run_id = hub, dag_id, run_id
        self.last_seq = after_seq
        # What the listener offered, at most hub.buffer. A deque and a future made only while waiting,
        # not an asyncio.Queue (four deques and an Event): thousands of subscribers each hold one.
        self.queue: deque[Envelope | Signal] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ready: deque[Envelope] = deque()
        self._needs_replay = True  # the first read comes from the log
        self._closed: Signal | None = None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Envelope:
        while True:
            if self._ready:
                envelope = self._ready.popleft()
                if envelope.seq <= self.last_seq:
                    continue  # already delivered (the log and pub/sub overlap)
                # In order; a hole that neither the log nor the store could fill is stepped over.
                self.last_seq = envelope.seq
                return envelope
            if self._needs_replay:
                await self._replay()
                self._needs_replay = False
                continue
            item = await self._offered()
            if isinstance(item, Signal):
                if item is Signal.RESYNC:
                    self._needs_replay = True
                    continue
                raise SubscriptionClosed(item)
            if item.seq <= self.last_seq:
                continue
            if item.seq > self.last_seq + 1:  # a gap: fetch what is missing from the log first
                await self._replay()
            self._ready.append(item)

    async def backlog(self) -> list[Envelope]:
        """What the log already holds after last_seq: the first read, which never waits for news."""
        await self._replay()
        self._needs_replay = False
        envelopes = []
        while self._ready:
            envelope = self._ready.popleft()
            if envelope.seq > self.last_seq:
                self.last_seq = envelope.seq
                envelopes.append(envelope)
        return envelopes

    async def _replay(self) -> None:
        """Read the log after last_seq into the ready queue; while Redis is down, keep trying
        (the caller's own timeout bounds the wait: a waiter gets 202, never an error)."""
        delay = 0.05
        while True:
            try:
                self._ready.extend(await self._read_log())
                return
            except (RedisError, OSError) as exc:
                self.hub.log_once("replay-" + type(exc).__name__, "replay log unreadable (%r); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _read_log(self) -> list[Envelope]:
        return await self.hub.replay.read(self.dag_id, self.run_id, self.last_seq)

    async def _offered(self) -> Envelope | Signal:
        """The next item the listener offered, waiting for one."""
        while not self.queue:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.queue.popleft()

    def offer(self, item: Envelope | Signal) -> None:
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


class AssetSubscription(Subscription):
    """One waiter's or SSE client's view of an asset: its envelopes in seq order, gap-free, each once."""

    def __init__(self, hub: Hub, name: str, after_seq: int):
        super().__init__(hub, "", "", after_seq)
        self.name = name

    async def _read_log(self) -> list[AssetEnvelope]:  # type: ignore[override]
        return await self.hub.asset_replay.read(self.name, self.last_seq)


SubscriptionT = TypeVar("SubscriptionT", bound=Subscription)


class SharedBytes:
    """Bytes built once and shared by every subscriber of a run, so that a crowd's fan-out encodes an
    event and its outcome once, not once per caller. Bounded in bytes (results can be 256 KiB): the
    oldest entries go first; an entry is needed only while its event fans out.

    Keys hold what fixes the bytes: a run's events are numbered by Redis and a number is never reused
    while the run's events exist, so the event at (dag, run, seq), and the outcome folded up to it, are
    the same for every caller."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024):
        self.max_bytes, self.held = max_bytes, 0
        self._items: dict[tuple, bytes] = {}  # insertion-ordered: the first key is the oldest

    def get(self, key: tuple, build: Callable[[], bytes]) -> bytes:
        found = self._items.get(key)
        if found is None:
            found = self._items[key] = build()
            self.held += len(found)
            while self.held > self.max_bytes and len(self._items) > 1:
                self.held -= len(self._items.pop(next(iter(self._items))))
        return found


class Hub:
    def __init__(
        self,
        client: aioredis.Redis,
        pubsub_client: aioredis.Redis,
        namespace: str,
        metrics: Metrics,
        archive: EventArchive | None = None,
        buffer: int = 1000,
        max_subscribers: int = 20_000,
    ):
        self.client = client
        self.pubsub_client = pubsub_client  # its own connection with socket_timeout=None
        self.namespace = namespace
        self.metrics = metrics
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self.replay = ReplayLog(client, namespace, archive, metrics)
        self.asset_replay = AssetReplayLog(client, namespace, metrics)
        self.shared = SharedBytes()  # encoded events and outcomes, for the routes
        self._asset_prefix = keys.asset_channel_pattern(namespace)[: -len("*:ch")]
        self.subscribers: dict[str, set[Subscription]] = {}  # by channel name
        self.missing: dict[str, float] = {}  # channel -> until when Airflow's "no such run" holds
        self.heard: dict[str, float] = {}  # channel -> when its last event (or first subscriber) came
        self.count = 0
        self.connected = asyncio.Event()
        self.draining = False
        self._logged: set[str] = set()
        self.log_once = Once(log)
        self.listener = Supervised(
            "runbell-hub-listener",
            self._listen,
            backoff=Backoff(cap=BACKOFF_MAX_SECONDS),
            logger=log,
            expected=(RedisError, OSError, TimeoutError),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.listener.start()

    async def stop(self) -> None:
        self.drain()
        await self.listener.stop()

    def drain(self) -> None:
        """Shutdown has begun: every subscriber is told to leave (SSE farewell, long-poll 202)."""
        self.draining = True
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.close(Signal.DRAIN)

    # -- subscribers ----------------------------------------------------------------------------

    def silent_runs(self, longer_than: float) -> list[tuple[str, str, float]]:
        """(dag_id, run_id, seconds silent) of the runs waited on here that had no event for a while."""
        now, found = time.monotonic(), []
        for channel, subs in self.subscribers.items():
            silent = now - self.heard.get(channel, now)
            if subs and silent > longer_than:
                sub = next(iter(subs))
                if isinstance(sub, AssetSubscription):
                    continue  # assets have no run to reconcile
                found.append((sub.dag_id, sub.run_id, silent))
        return found

    def mark_missing(self, dag_id: str, run_id: str, hold_seconds: float = MISSING_HOLD_SECONDS) -> None:
        """Airflow has no such run: its subscribers are told, and new ones get 404 for a while
        (until an event for it arrives: a caller may trigger it after all)."""
        channel = keys.run_keys(self.namespace, dag_id, run_id).channel
        self.missing[channel] = time.monotonic() + hold_seconds
        for sub in list(self.subscribers.get(channel, ())):
            sub.close(Signal.NOT_FOUND)

    def is_missing(self, dag_id: str, run_id: str) -> bool:
        channel = keys.run_keys(self.namespace, dag_id, run_id).channel
        until = self.missing.get(channel)
        if until is not None and until < time.monotonic():
            del self.missing[channel]
            until = None
        return until is not None

    def has_room(self) -> bool:
        return self.count < self.max_subscribers and not self.draining

    @asynccontextmanager
    async def subscribe(self, dag_id: str, run_id: str, after_seq: int = 0) -> AsyncIterator[Subscription]:
        """Register a subscriber for a run (before its log is read), and always unregister it."""
        channel = keys.run_keys(self.namespace, dag_id, run_id).channel
        self.heard.setdefault(channel, time.monotonic())
        async with self._registered(channel, Subscription(self, dag_id, run_id, after_seq)) as sub:
            yield sub

    @asynccontextmanager
    async def subscribe_asset(self, name: str, after_seq: int = 0) -> AsyncIterator[AssetSubscription]:
        """Register a subscriber for an asset (before its log is read), and always unregister it."""
        channel = keys.asset_keys(self.namespace, name).channel
        async with self._registered(channel, AssetSubscription(self, name, after_seq)) as sub:
            yield sub

    @asynccontextmanager
    async def _registered(self, channel: str, sub: SubscriptionT) -> AsyncIterator[SubscriptionT]:
        """Add a subscriber to its channel (closed at once while draining); always take it out again."""
        if self.draining:
            sub.close(Signal.DRAIN)
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

    # -- the listener ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        pubsub = self.pubsub_client.pubsub()
        pattern = keys.channel_pattern(self.namespace)
        try:
            # One command, so both patterns hold before either confirmation arrives.
            await pubsub.psubscribe(pattern, keys.asset_channel_pattern(self.namespace))
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
            await pubsub.aclose()

    def _handle(self, message: dict) -> None:
        kind = message["type"]
        if kind == "pmessage":
            self._dispatch(message["channel"], message["data"])
        elif kind == "psubscribe" and not self._is_asset_pattern(message.get("channel")):
            # (Re)subscribed, perhaps silently by redis-py after a short outage: whatever was
            # published meanwhile is only in the logs, so every subscriber re-reads its log.
            self.metrics.resubscribes.inc()
            self.connected.set()
            self.listener.ok()
            self._broadcast(Signal.RESYNC)

    def _is_asset_pattern(self, pattern: Any) -> bool:
        """The asset pattern's confirmation: the run pattern's, from the same PSUBSCRIBE, resyncs all."""
        if isinstance(pattern, bytes):
            pattern = pattern.decode("utf-8", "replace")
        return pattern == keys.asset_channel_pattern(self.namespace)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        if self.missing:
            self.missing.pop(name, None)  # it exists after all
        subs = self.subscribers.get(name)
        if not subs:
            return  # nobody here waits on this run: not even decoded
        self.heard[name] = time.monotonic()
        decode = decode_asset_envelope if name.startswith(self._asset_prefix) else decode_envelope
        try:
            envelope = decode(data)
        except BadEvent as exc:
            count_bad_event(self.metrics, self._logged, exc)
            return
        if self._channel_of(envelope) != name:  # another run's or asset's event, misread as this one's if let in
            count_bad_event(self.metrics, self._logged, BadEvent("channel", f"an event of another stream on {name}"))
            return
        self.metrics.events_in.inc()
        self.metrics.delivery_latency.observe(max(0.0, time.time() - envelope.event.ts))
        if len(subs) < GC_PAUSE_FANOUT:
            for sub in list(subs):
                sub.offer(envelope)
            return
        # A collection in the middle of a fan-out stalls every subscriber after it: collect after. The
        # subscribers run in the order they were woken, and gc.enable is queued behind them.
        gc.disable()
        try:
            for sub in list(subs):
                sub.offer(envelope)
        finally:
            asyncio.get_running_loop().call_soon(gc.enable)

    def _channel_of(self, envelope: Envelope | AssetEnvelope) -> str:
        """The channel the envelope's own run or asset publishes on."""
        if isinstance(envelope, AssetEnvelope):
            return keys.asset_keys(self.namespace, envelope.event.asset.name).channel
        return keys.run_keys(self.namespace, envelope.event.dag_id, envelope.event.run_id).channel

    def _broadcast(self, signal: Signal) -> None:
        for subs in list(self.subscribers.values()):
            for sub in list(subs):
                sub.offer(signal)
