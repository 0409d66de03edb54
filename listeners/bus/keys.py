"""Every Redis key and channel name Runbell uses, in one place.

The bus is split into N stream partitions (``RUNBELL_STREAM_PARTITIONS``, default 16, stored once in
Redis: ``partitions_key``). A run belongs to the partition ``run_partition`` gives (a CRC32 of its
encoded ids, mod N), an asset to ``asset_partition``'s. Each partition has one hash tag
(``partition_tags``), and every key of its runs and assets carries it, so on Redis Cluster a run's
sequence, replay log, ids and epoch share one slot with the partition's recorder stream and its
shard channel, and publish.lua appends, streams and publishes in one atomic call:

    <ns>:run:{<ns>:p<P>.<S>}:<dag>/<run>:seq|log|ids|epoch|writer    a run's keys
    <ns>:asset:{<ns>:p<P>.<S>}:<name>:seq|log|ids|epoch|writer       an asset's keys
    <ns>:{<ns>:p<P>.<S>}:events                                 the partition's run events (recorder)
    <ns>:{<ns>:p<P>.<S>}:asset-events                           the partition's asset events (capped; nothing in the gateway reads it)
    <ns>:{<ns>:p<P>.<S>}:live                                   the partition's shard channel (SPUBLISH)

Ids are percent-encoded, so braces, slashes and glob characters in an id cannot break the layout.
``S`` is the first suffix that puts partition P's slot into the P-th of N equal slot ranges, so the
partitions spread evenly over a cluster's masters (whose default slot ranges are contiguous).

A message on a shard channel is ``<route>\\n<envelope>``: the route (``run:<dag>/<run>`` or
``asset:<name>``, encoded) lets the gateway's hub hand it to the stream's local subscribers, or drop
it, without decoding the envelope. The envelope is the replay log's entry, unchanged.

Before partitions, every run event went to one global stream, ``global_stream``: the recorder still
drains it (events of hooks not yet upgraded).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

DEFAULT_NAMESPACE = "runbell"
DEFAULT_PARTITIONS = 16
PARTITIONS_RANGE = (1, 1024)
ROUTE_END = b"\n"  # ends a live message's route: percent-encoding keeps it out of every route
_SAFE = ":+-_.~@=,"


CLUSTER_SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def key_slot(key: str) -> int:
    """The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (or of the whole key), mod 16384.
    (Here rather than redis-py's: the bus contract imports no client.)"""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc % CLUSTER_SLOTS


@dataclass(frozen=True)
class RunKeys:
    seq: str  # INCR counter: the run's last sequence number
    log: str  # stream: the replay log, entry id 0-<seq>
    ids: str  # hash: event id -> seq, so a re-sent event is not logged twice
    # The run's epoch (see runbell.bus.schema): made with the run's first event, and again when Redis
    # lost the run's state. One per run, not one per namespace: it shares the run's hash tag, so
    # publish.lua reads it atomically with the seq on Redis Cluster too (a namespace key would sit in
    # another slot), and it also tells a run whose keys expired and started again apart.
    epoch: str
    # The run_id of the Redis server process that last wrote the run (INFO server): when another one
    # writes next (a restart from a snapshot, a promoted replica, which may hold only part of the
    # run's writes), publish.lua makes a new epoch. Beside the epoch rather than in its value, so a
    # gateway from before writers reads the epoch key as it always did.
    writer: str
    stream: str  # the partition's run-event stream, read by the recorder's consumer group
    live: str  # the partition's shard channel (SPUBLISH / SSUBSCRIBE)
    route: str  # names the run in a live message (before the envelope)


@dataclass(frozen=True)
class AssetKeys:
    seq: str  # INCR counter: the asset's last sequence number (never expires: ids stay meaningful)
    log: str  # stream: the replay log, entry id 0-<seq>, capped to the last publisher.ASSET_WINDOW entries
    ids: str  # sorted set: event id scored by seq, for the same window, so a re-send is not logged twice
    epoch: str  # the asset's epoch, as a run's (never expires, as the seq)
    writer: str  # the Redis server process that last wrote the asset, as a run's (never expires, as the epoch)
    stream: str  # the partition's asset-event stream (capped; no reader in the gateway)
    live: str  # the partition's shard channel, shared with its runs
    route: str  # names the asset in a live message


def partitions(value: int) -> int:
    """The partition count, if within PARTITIONS_RANGE; else ValueError saying the range."""
    low, high = PARTITIONS_RANGE
    if not low <= value <= high:
        raise ValueError(f"the stream partition count must be {low} to {high}, not {value}")
    return value


@lru_cache(maxsize=16)
def partition_tags(namespace: str, count: int) -> tuple[str, ...]:
    """The hash tag of each partition (braces included): partition p's slot lies in the p-th of
    ``count`` equal ranges of the 16384 slots. Computed once per (namespace, count): about
    count * ln(count) CRC16s (some 7000 for 1024 partitions)."""
    partitions(count)
    base = quote(namespace, safe=_SAFE)
    found: list[str | None] = [None] * count
    missing, suffix = count, 0
    while missing:
        for p in range(count):
            if found[p] is None:
                tag = f"{base}:p{p}.{suffix}"
                slot = key_slot(tag)
                if slot * count // CLUSTER_SLOTS == p:
                    found[p] = "{" + tag + "}"
                    missing -= 1
        suffix += 1
    return tuple(t for t in found if t is not None)


def partition_slot(namespace: str, count: int, partition: int) -> int:
    return key_slot(partition_tags(namespace, count)[partition])


def _partition_of(route: str, count: int) -> int:
    return zlib.crc32(route.encode()) % count


def run_route(dag_id: str, run_id: str) -> str:
    return "run:" + quote(dag_id, safe=_SAFE) + "/" + quote(run_id, safe=_SAFE)


def asset_route(name: str) -> str:
    return "asset:" + quote(name, safe=_SAFE)


def run_partition(dag_id: str, run_id: str, count: int = DEFAULT_PARTITIONS) -> int:
    """The run's partition: the same in every hook and gateway of a namespace (CRC32, not hash())."""
    return _partition_of(run_route(dag_id, run_id), count)


def asset_partition(name: str, count: int = DEFAULT_PARTITIONS) -> int:
    return _partition_of(asset_route(name), count)


def partition_stream(namespace: str, count: int, partition: int) -> str:
    """The partition's run-event stream, read with the recorder's consumer group."""
    return f"{namespace}:{partition_tags(namespace, count)[partition]}:events"


def partition_asset_stream(namespace: str, count: int, partition: int) -> str:
    return f"{namespace}:{partition_tags(namespace, count)[partition]}:asset-events"


def live_channel(namespace: str, count: int, partition: int) -> str:
    """The partition's shard channel."""
    return f"{namespace}:{partition_tags(namespace, count)[partition]}:live"


def live_channels(namespace: str, count: int) -> list[str]:
    """Every partition's shard channel: what a gateway's hub subscribes to, and nothing more."""
    return [live_channel(namespace, count, p) for p in range(count)]


def partition_streams(namespace: str, count: int) -> list[str]:
    return [partition_stream(namespace, count, p) for p in range(count)]


def run_keys(namespace: str, dag_id: str, run_id: str, count: int = DEFAULT_PARTITIONS) -> RunKeys:
    p = run_partition(dag_id, run_id, count)
    return RunKeys(**_stream_keys(namespace, run_route(dag_id, run_id), count, p), stream=partition_stream(namespace, count, p))


def asset_keys(namespace: str, name: str, count: int = DEFAULT_PARTITIONS) -> AssetKeys:
    p = asset_partition(name, count)
    return AssetKeys(**_stream_keys(namespace, asset_route(name), count, p), stream=partition_asset_stream(namespace, count, p))


def _stream_keys(namespace: str, route: str, count: int, partition: int) -> dict[str, str]:
    """The keys of a run or an asset, ``<ns>:<kind>:<partition tag>:<encoded ids>:...``."""
    kind, _, ids = route.partition(":")
    base = f"{namespace}:{kind}:{partition_tags(namespace, count)[partition]}:{ids}"
    keys = {name: f"{base}:{name}" for name in ("seq", "log", "ids", "epoch", "writer")}
    return {**keys, "live": live_channel(namespace, count, partition), "route": route}


def live_message(route: str, envelope: str | bytes) -> bytes:
    """A message on a shard channel: the route, then the envelope (publish.lua builds the same)."""
    body = envelope.encode() if isinstance(envelope, str) else envelope
    return route.encode() + ROUTE_END + body


def partitions_key(namespace: str) -> str:
    """The namespace's partition count, set once by the first hook or gateway (SET NX): it wins."""
    return f"{namespace}:meta:partitions"


def global_stream(namespace: str) -> str:
    """The single stream of every run event before partitions: drained by the recorder (upgrades)."""
    return f"{namespace}:events"


def recorder_group() -> str:
    return "recorder"


def idempotency_key(namespace: str, key: str) -> str:
    """An Idempotency-Key of the trigger endpoint: the first call's fingerprint and run id."""
    return f"{namespace}:idem:{quote(key, safe=_SAFE)}"
