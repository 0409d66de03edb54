"""What the hub carries: runs and assets, two kinds of stream (``Topic``) registered with it.

A run's stream is keyed by (dag_id, run_id); its replay log is Redis's, else the store (``archive``)
for what Redis no longer holds. An asset's is keyed by its name; its log is Redis's only (the store
keeps runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import AssetEnvelope, BadEvent, Envelope, decode_asset_envelope, decode_envelope
from runbell.service.live.hub import Hub, SharedReads, Signal, Subscription, Topic

MISSING_HOLD_SECONDS = 60.0

RunKey = tuple[str, str]  # (dag_id, run_id)
E = TypeVar("E")


class EventArchive(Protocol):
    """Where events older than the replay log are found (the SQL store)."""

    async def events(self, dag_id: str, run_id: str, after_seq: int = 0, limit: int | None = None) -> list[Envelope]: ...


def _decoded(hub: Hub, decode: Callable[[bytes], E], entries: Sequence[tuple[object, Mapping[Any, Any] | None]] | None) -> list[E]:
    """The valid envelopes of replay-log entries (the others are counted and logged once)."""
    found = []
    for _, fields in entries or ():
        try:
            found.append(decode((fields or {}).get(b"env", b"")))
        except BadEvent as exc:
            hub.bad_event(exc)
    return found


class RunTopic(Topic[RunKey, Envelope]):
    def __init__(
        self, hub: Hub, client: aioredis.Redis, namespace: str, archive: EventArchive | None = None, max_event_bytes: int | None = None
    ):
        super().__init__(hub, keys.channel_pattern(namespace))
        self.client, self.namespace, self.archive = client, namespace, archive
        self.max_event_bytes = max_event_bytes  # a larger event is a bad one: no publisher within the cap sent it
        self.missing: dict[str, float] = {}  # channel -> until when Airflow's "no such run" holds
        self._reads: SharedReads[list[Envelope]] = SharedReads()

    def subscribe(self, dag_id: str, run_id: str, after_seq: int = 0) -> AbstractAsyncContextManager[Subscription[RunKey, Envelope]]:
        return self.hub.subscribe(self, (dag_id, run_id), after_seq)

    def channel(self, key: RunKey) -> str:
        return keys.run_keys(self.namespace, *key).channel

    def decode(self, data: bytes) -> Envelope:
        return decode_envelope(data, self.max_event_bytes)

    def channel_of(self, item: Envelope) -> str:
        return self.channel((item.event.dag_id, item.event.run_id))

    async def read(self, key: RunKey, after_seq: int) -> list[Envelope]:
        return await self._reads((key, after_seq), lambda: self._read(key, after_seq))

    async def _read(self, key: RunKey, after_seq: int) -> list[Envelope]:
        entries = await self.client.xrange(keys.run_keys(self.namespace, *key).log, min=f"(0-{after_seq}", max="+")
        envelopes = _decoded(self.hub, self.decode, entries)
        first = envelopes[0].seq if envelopes else None
        if self.archive is not None and (first is None or first > after_seq + 1):
            # The log does not start where we need it (expired, or never existed): ask the store.
            try:
                older = await self.archive.events(*key, after_seq=after_seq)
            except Exception as exc:  # the store being down must not fail a waiter: Redis may suffice
                self.hub.log_once("archive", "store unreadable (%s); serving from Redis only", type(exc).__name__)
                return envelopes
            envelopes = [e for e in older if first is None or e.seq < first] + envelopes
        return envelopes

    # -- runs Airflow does not have (the reconciler asks) ---------------------------------------

    def silent(self, longer_than: float) -> list[tuple[str, str, float]]:
        """(dag_id, run_id, seconds silent) of the runs waited on here that had no event for a while."""
        return [(dag_id, run_id, seconds) for (dag_id, run_id), seconds in self.hub.silent(self, longer_than)]

    def mark_missing(self, dag_id: str, run_id: str, hold_seconds: float = MISSING_HOLD_SECONDS) -> None:
        """Airflow has no such run: its subscribers are told, and new ones get 404 for a while
        (until an event for it arrives: a caller may trigger it after all)."""
        channel = self.channel((dag_id, run_id))
        self.missing[channel] = time.monotonic() + hold_seconds
        self.hub.close_channel(channel, Signal.NOT_FOUND)

    def is_missing(self, dag_id: str, run_id: str) -> bool:
        channel = self.channel((dag_id, run_id))
        until = self.missing.get(channel)
        if until is not None and until < time.monotonic():
            del self.missing[channel]
            until = None
        return until is not None

    def published(self, channel: str) -> None:
        if self.missing:
            self.missing.pop(channel, None)  # it exists after all


class AssetTopic(Topic[str, AssetEnvelope]):
    def __init__(self, hub: Hub, client: aioredis.Redis, namespace: str, max_event_bytes: int | None = None):
        super().__init__(hub, keys.asset_channel_pattern(namespace))
        self.client, self.namespace = client, namespace
        self.max_event_bytes = max_event_bytes
        self._reads: SharedReads[list[AssetEnvelope]] = SharedReads()

    def subscribe(self, name: str, after_seq: int = 0) -> AbstractAsyncContextManager[Subscription[str, AssetEnvelope]]:
        return self.hub.subscribe(self, name, after_seq)

    def channel(self, key: str) -> str:
        return keys.asset_keys(self.namespace, key).channel

    def decode(self, data: bytes) -> AssetEnvelope:
        return decode_asset_envelope(data, self.max_event_bytes)

    def channel_of(self, item: AssetEnvelope) -> str:
        return self.channel(item.event.asset.name)

    async def read(self, key: str, after_seq: int) -> list[AssetEnvelope]:
        return await self._reads((key, after_seq), lambda: self._read(key, after_seq))

    async def _read(self, name: str, after_seq: int) -> list[AssetEnvelope]:
        entries = await self.client.xrange(keys.asset_keys(self.namespace, name).log, min=f"(0-{after_seq}", max="+")
        return _decoded(self.hub, self.decode, entries)

    async def current_seq(self, name: str) -> int:
        """The asset's last sequence number (0 before its first event)."""
        raw = await self.client.get(keys.asset_keys(self.namespace, name).seq)
        return int(raw) if raw is not None else 0
