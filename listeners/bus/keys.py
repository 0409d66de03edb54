"""Every Redis key and channel name Runbell uses, in one place.

A run's keys share one hash tag, ``{<dag_id>/<run_id>}``, so they live in one slot on Redis Cluster
and publish.lua can touch them atomically. Both ids are percent-encoded inside the tag, so braces,
slashes and glob characters in an id cannot break the layout.

An asset's keys share the tag ``{<name>}`` (percent-encoded the same way) under ``<ns>:asset:``, so
they never match the run channels' pattern ``<ns>:run:*:ch``; the hub listens on a second pattern,
``<ns>:asset:*:ch``. Asset events go to a global stream of their own, ``<ns>:asset-events``: the
run stream's reader (the recorder; webhooks are written from the store) takes every entry there for a
run's event. Nothing in the gateway reads the asset stream (capped, it is for other consumers).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

DEFAULT_NAMESPACE = "runbell"
_SAFE = ":+-_.~@=,"


@dataclass(frozen=True)
class RunKeys:
    seq: str  # INCR counter: the run's last sequence number
    log: str  # stream: the replay log, entry id 0-<seq>
    ids: str  # hash: event id -> seq, so a re-sent event is not logged twice
    channel: str  # pub/sub: the fast path
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


def run_tag(dag_id: str, run_id: str) -> str:
    return "{" + quote(dag_id, safe=_SAFE) + "/" + quote(run_id, safe=_SAFE) + "}"


def run_keys(namespace: str, dag_id: str, run_id: str) -> RunKeys:
    base = f"{namespace}:run:{run_tag(dag_id, run_id)}"
    return RunKeys(
        seq=f"{base}:seq", log=f"{base}:log", ids=f"{base}:ids", channel=f"{base}:ch", epoch=f"{base}:epoch", writer=f"{base}:writer"
    )


def channel_pattern(namespace: str) -> str:
    """The one PSUBSCRIBE pattern a gateway process listens on."""
    return f"{namespace}:run:*:ch"


def run_from_channel(namespace: str, channel: str) -> tuple[str, str] | None:
    """(dag_id, run_id) of a run channel, or None when the name is not one."""
    prefix, suffix = f"{namespace}:run:{{", "}:ch"
    if not (channel.startswith(prefix) and channel.endswith(suffix)):
        return None
    dag, sep, run = channel[len(prefix) : -len(suffix)].partition("/")
    if not sep or not dag or not run:
        return None
    return unquote(dag), unquote(run)


@dataclass(frozen=True)
class AssetKeys:
    seq: str  # INCR counter: the asset's last sequence number (never expires: ids stay meaningful)
    log: str  # stream: the replay log, entry id 0-<seq>, capped to the last publisher.ASSET_WINDOW entries
    ids: str  # sorted set: event id scored by seq, for the same window, so a re-send is not logged twice
    channel: str  # pub/sub: the fast path
    epoch: str  # the asset's epoch, as a run's (never expires, as the seq)
    writer: str  # the Redis server process that last wrote the asset, as a run's (never expires, as the epoch)


def asset_tag(name: str) -> str:
    return "{" + quote(name, safe=_SAFE) + "}"


def asset_keys(namespace: str, name: str) -> AssetKeys:
    base = f"{namespace}:asset:{asset_tag(name)}"
    return AssetKeys(
        seq=f"{base}:seq", log=f"{base}:log", ids=f"{base}:ids", channel=f"{base}:ch", epoch=f"{base}:epoch", writer=f"{base}:writer"
    )


def asset_channel_pattern(namespace: str) -> str:
    """The hub's second PSUBSCRIBE pattern: every asset's channel, and no run's."""
    return f"{namespace}:asset:*:ch"


def asset_from_channel(namespace: str, channel: str) -> str | None:
    """The asset name of an asset channel, or None when the name is not one."""
    prefix, suffix = f"{namespace}:asset:{{", "}:ch"
    if not (channel.startswith(prefix) and channel.endswith(suffix)) or len(channel) <= len(prefix) + len(suffix):
        return None
    inner = channel[len(prefix) : -len(suffix)]
    if "{" in inner or "}" in inner:
        return None
    return unquote(inner)


def asset_stream(namespace: str) -> str:
    """The capped stream of every asset event (apart from the run events' global stream)."""
    return f"{namespace}:asset-events"


def global_stream(namespace: str) -> str:
    """The capped stream of every run event, read with the recorder's consumer group."""
    return f"{namespace}:events"


def recorder_group() -> str:
    return "recorder"


def idempotency_key(namespace: str, key: str) -> str:
    """An Idempotency-Key of the trigger endpoint: the first call's fingerprint and run id."""
    return f"{namespace}:idem:{quote(key, safe=_SAFE)}"
