"""What the hub carries: runs and assets, two kinds of stream (``Topic``) registered with it.

A run's stream is keyed by (dag_id, run_id); its replay log is Redis's, else the store (``archive``)
for what Redis no longer holds: events that expired, the epochs before the one Redis holds now
(Redis lost the run's state; see runbell.bus.schema), and the last events of an epoch that Redis
kept only part of (a stale snapshot, a promoted replica: the log then has a hole where it went on in
a new epoch). An asset's is keyed by its name; its log is Redis's only (the store keeps runs).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from runbell.bus import keys
from runbell.bus.schema import (
    LEGACY_EPOCH,
    START,
    AssetEnvelope,
    BadEvent,
    Envelope,
    Position,
    decode_asset_envelope,
    decode_envelope,
)
from runbell.listeners.connect import raised_inside_redis
from runbell.service.live.hub import Hub, Signal, Subscription, Topic

MISSING_HOLD_SECONDS = 60.0
FIRST_EPOCHS_HELD = 10_000  # runs whose first epoch is remembered (then the oldest is forgotten)
HISTORIES_BATCH = 500  # runs whose stored history is read in one query (StoredHistories)

RunKey = tuple[str, str]  # (dag_id, run_id)
E = TypeVar("E")
P = TypeVar("P", Envelope, AssetEnvelope)


class EventArchive(Protocol):
    """Where events older than the replay log are found (the SQL store)."""

    async def events(self, dag_id: str, run_id: str, after: Position = START, limit: int | None = None) -> list[Envelope]: ...

    async def histories(self, runs: Sequence[RunKey]) -> Mapping[RunKey, list[Envelope]]: ...


class StoredHistories:
    """Each run's stored history (its events from the start), read for many runs in one query. A crowd
    of callers arriving on runs whose replay log does not tell whether it begins the run's history (a
    new run's first epoch, unseen here; an empty log) would otherwise cost one events query each,
    thousands queued on the store's pool while the callers' first reads wait; here they cost one query
    per HISTORIES_BATCH runs. A read asked for while a query is out goes into the next one, so a lone
    caller waits for no timer, and every answer is at least as fresh as the moment it was asked."""

    def __init__(self, archive: EventArchive, batch: int = HISTORIES_BATCH):
        self.archive, self.batch = archive, batch
        self.waiting: dict[RunKey, list[asyncio.Future[list[Envelope]]]] = {}
        self.asking: asyncio.Task[None] | None = None

    async def history(self, key: RunKey) -> list[Envelope]:
        future: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, []).append(future)
        if self.asking is None:
            self.asking = asyncio.create_task(self._ask())
        return await future

    async def _ask(self) -> None:
        batch: dict[RunKey, list[asyncio.Future[list[Envelope]]]] = {}
        try:
            while self.waiting:
                batch = dict(itertools.islice(self.waiting.items(), self.batch))
                for key in batch:
                    del self.waiting[key]
                try:
                    stored = await self.archive.histories(list(batch))
                except Exception as exc:  # each asker handles it (the store being down fails no waiter)
                    _fail(batch, exc)
                else:
                    for key, futures in batch.items():
                        for future in futures:
                            if not future.done():  # its asker may have gone (cancelled)
                                future.set_result(list(stored.get(key, ())))  # its own list
                batch = {}
        except BaseException:  # cancelled (shutdown): nobody is left waiting for an answer that never comes
            _fail({**batch, **self.waiting}, None)
            self.waiting.clear()
            raise
        finally:
            self.asking = None


def _fail(waiting: Mapping[RunKey, list[asyncio.Future[list[Envelope]]]], exc: Exception | None) -> None:
    """Each future still awaited gets the exception (None: is cancelled)."""
    for futures in waiting.values():
        for future in futures:
            if future.done():
                continue
            if exc is None:
                future.cancel()
            else:
                future.set_exception(exc)


def _decoded(hub: Hub, decode: Callable[[bytes], E], entries: Sequence[tuple[object, Mapping[Any, Any] | None]] | None) -> list[E]:
    """The valid envelopes of replay-log entries (the others are counted and logged once)."""
    found = []
    for _, fields in entries or ():
        try:
            found.append(decode((fields or {}).get(b"env", b"")))
        except BadEvent as exc:
            hub.bad_event(exc)
    return found


async def _log_after(
    hub: Hub, client: aioredis.Redis, k: keys.RunKeys | keys.AssetKeys, after: Position, decode: Callable[[bytes], P]
) -> list[P]:
    """The log's envelopes after a position. When the stream's epoch is no longer the position's
    (Redis lost the state and began again), the new epoch's log from its start: one more round trip
    then, only then."""
    try:
        entries = await _log_entries(client, k, after)
    except (AttributeError, TypeError) as exc:
        if not raised_inside_redis(exc):
            raise
        raise RedisConnectionError(f"the Redis client failed while the cluster changed ({exc!r})") from exc
    return [e for e in _decoded(hub, decode, entries) if e.position > after]


async def _log_entries(
    client: aioredis.Redis, k: keys.RunKeys | keys.AssetKeys, after: Position
) -> Sequence[tuple[object, Mapping[Any, Any] | None]] | None:
    if after == START:
        entries = await client.xrange(k.log, min="-", max="+")
    else:
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(k.epoch)
            pipe.xrange(k.log, min=f"(0-{after.seq}", max="+")
            epoch, entries = await pipe.execute()
        if epoch is not None and _text(epoch) != after.epoch:
            entries = await client.xrange(k.log, min="-", max="+")
    return entries


def _unbroken(envelopes: Sequence[Envelope]) -> bool:
    """Each envelope of the log follows the one before: no position lies between them."""
    return all(later.position.follows(earlier.position) for earlier, later in zip(envelopes, envelopes[1:]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RunTopic(Topic[RunKey, Envelope]):
    def __init__(
        self,
        hub: Hub,
        client: aioredis.Redis,
        namespace: str,
        archive: EventArchive | None = None,
        max_event_bytes: int | None = None,
        partitions: int = keys.DEFAULT_PARTITIONS,
    ):
        super().__init__(hub, "run", keys.live_channels(namespace, partitions))
        self.client, self.namespace, self.archive, self.partitions = client, namespace, archive, partitions
        self.max_event_bytes = max_event_bytes  # a larger event is a bad one: no publisher within the cap sent it
        self.missing: dict[str, float] = {}  # route -> until when Airflow's "no such run" holds
        self.first_epochs: dict[RunKey, str] = {}  # runs whose Redis epoch the store has nothing before
        self.histories = StoredHistories(archive) if archive is not None else None

    def repartition(self, count: int) -> None:
        """Another partition count (the one stored in Redis): keys and channels by it from now on."""
        self.partitions, self.channels = count, keys.live_channels(self.namespace, count)

    def subscribe(self, dag_id: str, run_id: str, after: Position = START) -> AbstractAsyncContextManager[Subscription[RunKey, Envelope]]:
        return self.hub.subscribe(self, (dag_id, run_id), after)

    def keys_of(self, dag_id: str, run_id: str) -> keys.RunKeys:
        return keys.run_keys(self.namespace, dag_id, run_id, self.partitions)

    def route(self, key: RunKey) -> str:
        return keys.run_route(*key)

    def decode(self, data: bytes) -> Envelope:
        return decode_envelope(data, self.max_event_bytes)

    def route_of(self, item: Envelope) -> str:
        return self.route((item.event.dag_id, item.event.run_id))

    async def read(self, key: RunKey, after: Position) -> list[Envelope]:
        envelopes = await _log_after(self.hub, self.client, self.keys_of(*key), after, self.decode)
        first = envelopes[0].position if envelopes else None
        if self.archive is None or (
            first is not None and (first.follows(after) or self._starts_history(key, after, first)) and _unbroken(envelopes)
        ):
            return envelopes
        # The log does not start where we need it (expired, never existed, or a new epoch: Redis lost
        # the run's state, and what came before is the store's), or has a hole (Redis came back with
        # part of the run's writes, and went on in a new epoch; the store may have the rest): ask the
        # store, and take both, in position order.
        try:
            stored = (
                await self.histories.history(key) if after == START and self.histories else await self.archive.events(*key, after=after)
            )
        except Exception as exc:  # the store being down must not fail a waiter: Redis may suffice
            self.hub.log_once("archive", "store unreadable (%s); serving from Redis only", type(exc).__name__)
            return envelopes
        history = {e.position: e for e in stored} | {e.position: e for e in envelopes}
        if after == START and first is not None and first.seq == 1 and len(history) == len(envelopes):  # the store adds nothing
            self._remember_first_epoch(key, first.epoch)
        return [history[position] for position in sorted(history)]

    def _starts_history(self, key: RunKey, after: Position, first: Position) -> bool:
        """A read from the start whose log begins the run's history: its first seq, of the legacy
        epoch or of an epoch the store was seen to have nothing before. (A new run's first epoch
        costs one store read per process; a run whose Redis state was lost is read from the store.)"""
        return after == START and first.seq == 1 and (first.epoch == LEGACY_EPOCH or self.first_epochs.get(key) == first.epoch)

    def _remember_first_epoch(self, key: RunKey, epoch: str) -> None:
        if len(self.first_epochs) >= FIRST_EPOCHS_HELD:
            self.first_epochs.pop(next(iter(self.first_epochs)))
        self.first_epochs[key] = epoch

    # -- runs Airflow does not have (the reconciler asks) ---------------------------------------

    def silent(self, longer_than: float) -> list[tuple[str, str, float]]:
        """(dag_id, run_id, seconds silent) of the runs waited on here that had no event for a while."""
        return [(dag_id, run_id, seconds) for (dag_id, run_id), seconds in self.hub.silent(self, longer_than)]

    def mark_missing(self, dag_id: str, run_id: str, hold_seconds: float = MISSING_HOLD_SECONDS) -> None:
        """Airflow has no such run: its subscribers are told, and new ones get 404 for a while
        (until an event for it arrives: a caller may trigger it after all)."""
        route = self.route((dag_id, run_id))
        self.missing[route] = time.monotonic() + hold_seconds
        self.hub.close_route(route, Signal.NOT_FOUND)

    async def heard_of(self, dag_id: str, run_id: str) -> bool:
        """Whether the bus holds the run's sequence: it exists, whatever Airflow says."""
        return await self.client.get(self.keys_of(dag_id, run_id).seq) is not None

    def is_missing(self, dag_id: str, run_id: str) -> bool:
        route = self.route((dag_id, run_id))
        until = self.missing.get(route)
        if until is not None and until < time.monotonic():
            del self.missing[route]
            until = None
        return until is not None

    def published(self, route: str) -> None:
        if self.missing:
            self.missing.pop(route, None)  # it exists after all


class AssetTopic(Topic[str, AssetEnvelope]):
    def __init__(
        self,
        hub: Hub,
        client: aioredis.Redis,
        namespace: str,
        max_event_bytes: int | None = None,
        partitions: int = keys.DEFAULT_PARTITIONS,
    ):
        super().__init__(hub, "asset", keys.live_channels(namespace, partitions))
        self.client, self.namespace, self.partitions = client, namespace, partitions
        self.max_event_bytes = max_event_bytes

    def repartition(self, count: int) -> None:
        """Another partition count (the one stored in Redis): keys and channels by it from now on."""
        self.partitions, self.channels = count, keys.live_channels(self.namespace, count)

    def subscribe(self, name: str, after: Position = START) -> AbstractAsyncContextManager[Subscription[str, AssetEnvelope]]:
        return self.hub.subscribe(self, name, after)

    def keys_of(self, name: str) -> keys.AssetKeys:
        return keys.asset_keys(self.namespace, name, self.partitions)

    def route(self, key: str) -> str:
        return keys.asset_route(key)

    def decode(self, data: bytes) -> AssetEnvelope:
        return decode_asset_envelope(data, self.max_event_bytes)

    def route_of(self, item: AssetEnvelope) -> str:
        return self.route(item.event.asset.name)

    async def read(self, name: str, after: Position) -> list[AssetEnvelope]:
        return await _log_after(self.hub, self.client, self.keys_of(name), after, self.decode)

    async def current(self, name: str) -> Position:
        """The asset's last position (seq 0 before its first event)."""
        k = self.keys_of(name)
        seq, epoch = await self.client.mget(k.seq, k.epoch)
        return Position(_text(epoch) if epoch is not None else LEGACY_EPOCH, int(seq) if seq is not None else 0)
