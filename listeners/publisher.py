"""Publishing events: the one path the Airflow hook, `runbell emit` and other schedulers share.

Every publish is bounded (connect and command timeouts well under a second, no retries), never
raises, and spools to a local file when Redis cannot be reached. The next successful publish on the
host sends the spooled events first, in order, so nothing is lost and nothing overtakes; until then a
background thread of the process that spooled tries every few seconds, so that a run's last events
reach Redis when it returns even if nothing else is published. That thread lives only while the
process's own spooled events wait (no thread otherwise: a hook must not add threads to Airflow's
processes for nothing). Events left by a process that ended first are sent by the next publish of
the namespace on that host, and by a gateway sharing the spool directory (its flush loop).

The spool is per namespace (a subdirectory of the spool directory). A publish that can neither
reach Redis nor spool durably loses the event: the hook's ``publish`` logs that once and counts it
(``lost``); ``publish_or_spool``, the gateway's, raises SpoolUnavailable so its caller can refuse it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from importlib import resources
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runbell.bus import keys
from runbell.bus.schema import (
    HEARTBEAT_FIELD,
    AnyEvent,
    AssetEvent,
    AssetInfo,
    ErrorInfo,
    Event,
    EventKind,
    Heartbeat,
    Result,
    ResultRef,
    Source,
    parse_event_json,
)
from runbell.listeners.config import PublisherConfig
from runbell.listeners.connect import BadRedisUrl, agreed_partitions, is_cluster, sync_client
from runbell.listeners.spool import adopt_legacy, has_legacy, namespace_spool, read_event

log = logging.getLogger("runbell.publisher")

PUBLISH_LUA = resources.files("runbell.bus").joinpath("publish.lua").read_text(encoding="utf-8")
PARTITIONS_CHECK_SECONDS = 60.0  # a long-lived process asks for the stored partition count again this often
BREAKER_SECONDS = 2.0  # after a failure, spool straight away for this long instead of reconnecting
FLUSH_BUDGET_SECONDS = 0.5  # how long one publish may spend sending spooled events
FLUSH_BATCH = 200
RETRY_SPOOL_SECONDS = BREAKER_SECONDS  # while events are spooled, a background thread tries to send them this often
ASSET_WINDOW = 10_000  # an asset's replay log keeps this many events (publish.lua's window)


class SpoolUnavailable(Exception):
    """Redis was unreachable and the event could not be written to the spool either: it is not kept."""

    def __init__(self, directory: Path, reason: str):
        super().__init__(f"cannot spool to {directory}: {reason}")
        self.directory, self.reason = directory, reason


class Publisher:
    def __init__(self, config: PublisherConfig, client: redis.Redis | None = None):
        self.config = config
        self.spool = namespace_spool(config.spool_dir, config.namespace)
        self.lost = 0  # events neither published nor spooled (the hook's publish drops them)
        self._legacy_unseen = True  # events from before per-namespace spools may lie at the top of the directory
        self._client = client
        self._sha: str | None = None
        self._partition_count: int | None = None
        self._partitions_checked_at = 0.0  # monotonic time of the last SET NX GET of the count
        self._broken_until = 0.0
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._flusher: threading.Thread | None = None
        self._flusher_lock = threading.Lock()
        _publishers.add(self)

    # -- public ---------------------------------------------------------------------------------

    def publish(self, event: AnyEvent) -> int | None:
        """Publish one event. Returns its sequence number, or None when it was spooled (or, logged
        once and counted in ``lost``, could not be: not encodable, over the event cap even with its
        result as a reference, or the spool unwritable). Never raises."""
        try:
            event, event_json = within_cap(event, event.to_json(), self.config.event_max_bytes)
        except EventTooLarge as exc:
            self.lost += 1
            self._log_once("too-large", "runbell: event dropped: %s", exc)
            return None
        except Exception as exc:  # a value pydantic cannot serialise must not reach Airflow
            self.lost += 1
            self._log_once("encode", "runbell: event could not be encoded: %s", exc)
            return None
        try:
            return self._publish_json(event, event_json)
        except SpoolUnavailable as exc:
            self.lost += 1
            self._log_once("spool-io", "runbell: %s; the event is lost", exc)
            return None

    def publish_or_spool(self, event: AnyEvent) -> int | None:
        """Publish one event. Returns its sequence number, or None once it is durably spooled.
        Raises SpoolUnavailable when Redis is unreachable and the spool cannot take it."""
        return self._publish_json(event, event.to_json())

    def _publish_json(self, event: AnyEvent, event_json: str) -> int | None:
        with self._lock:
            try:
                return self._publish_locked(event, event_json)
            except SpoolUnavailable:
                raise
            except BadRedisUrl as exc:  # kept until the setting is fixed (a restart with the right URL sends them)
                self._log_once("bad-url", "runbell: %s; spooling events", exc)
                self._spool(event_json)
                return None
            except Exception as exc:
                self._log_once("unexpected", "runbell: unexpected publish error: %r", exc)
                self._spool(event_json)
                return None

    def flush(self) -> int:
        """Send whatever is spooled (bounded in time). Returns how many events went out."""
        with self._lock:
            try:
                return self._flush_spool()[0]
            except redis.RedisError as exc:
                self._trip(exc)
                return 0

    def heartbeat(self, beat: Heartbeat) -> bool:
        """Add a heartbeat to its run's partition stream (for the recorder only: no seq, replay log or
        live message, so no waiter wakes and no log grows). Returns whether Redis took it. Never
        raises, never spools (a lost heartbeat is replaced by the next), and is bounded: it skips
        while the breaker is open or another publish holds the connection past the timeout."""
        if time.monotonic() < self._broken_until or not self._lock.acquire(timeout=self.config.timeout_seconds):
            return False
        try:
            client = self._redis()
            stream = keys.run_keys(self.config.namespace, beat.dag_id, beat.run_id, self._partitions(client)).stream
            client.xadd(stream, {HEARTBEAT_FIELD: beat.to_json()}, maxlen=self.config.stream_maxlen, approximate=True)
            return True
        except redis.RedisError as exc:
            self._trip(exc)
            return False
        except Exception as exc:
            self._log_once("heartbeat", "runbell: heartbeat not sent: %r", exc)
            return False
        finally:
            self._lock.release()

    # -- internals ------------------------------------------------------------------------------

    def _publish_locked(self, event: AnyEvent, event_json: str) -> int | None:
        if time.monotonic() < self._broken_until:
            self._spool(event_json)
            return None
        try:
            if self.spool.pending() or self._legacy_waits():
                sent, drained = self._flush_spool()
                if not drained:  # older events still wait: this one must queue behind them
                    self._spool(event_json)
                    return None
            return self._send([(event, event_json)])[0]
        except redis.RedisError as exc:
            self._trip(exc)
            self._spool(event_json)
            return None

    def _send(self, batch: list[tuple[AnyEvent, str]]) -> list[int]:
        """Run publish.lua for each event: one atomic call appends it to its run's (or asset's) log,
        its partition's stream and shard channel. A script the server no longer has (restarted, a
        promoted replica) is loaded again and the batch re-sent once: a re-sent event id is not
        logged twice."""
        client = self._redis()
        try:
            return self._send_once(client, batch)
        except redis.exceptions.NoScriptError:
            self._sha = None
            return self._send_once(client, batch)

    def _send_once(self, client: redis.Redis, batch: list[tuple[AnyEvent, str]]) -> list[int]:
        sha = self._publish_sha(client)
        count = self._partitions(client)
        ns, config = self.config.namespace, self.config
        # One event (the hook's case) is one EVALSHA; a batch (a spool flush) one pipeline, but on a
        # cluster, where redis-py refuses EVALSHA in a pipeline, one EVALSHA each.
        pipe = client.pipeline(transaction=False) if len(batch) > 1 and not is_cluster(client) else None
        target = client if pipe is None else pipe
        replies = []
        for event, event_json in batch:
            k: keys.RunKeys | keys.AssetKeys
            if isinstance(event, AssetEvent):
                k, window = keys.asset_keys(ns, event.asset.name, count), ASSET_WINDOW
            else:
                k, window = keys.run_keys(ns, event.dag_id, event.run_id, count), 0
            args: list[str | int] = [event.id, event_json, config.log_ttl_seconds, k.live, window, config.stream_maxlen, k.route]
            replies.append(target.evalsha(sha, 6, k.seq, k.log, k.ids, k.epoch, k.writer, k.stream, *args))
        if pipe is not None:
            replies = pipe.execute()
        return [int(reply[0]) for reply in replies]

    def _partitions(self, client: redis.Redis) -> int:
        """The namespace's partition count: stored in Redis by the first hook or gateway (it wins).
        Asked again every PARTITIONS_CHECK_SECONDS, with the count in use: a key lost with Redis's
        data (a restart without persistence, a flush) is stored again, and a count stored meanwhile
        (by a gateway that kept its own) is followed, so this process does not publish for ever
        where no gateway reads."""
        now = time.monotonic()
        if self._partition_count is None or now - self._partitions_checked_at >= PARTITIONS_CHECK_SECONDS:
            in_use = self._partition_count or self.config.stream_partitions
            stored = client.set(keys.partitions_key(self.config.namespace), in_use, nx=True, get=True)
            self._partition_count = agreed_partitions(stored, in_use, log)
            self._partitions_checked_at = now
        return self._partition_count

    def _flush_spool(self) -> tuple[int, bool]:
        """Publish spooled events oldest first. Returns (sent, whether the spool is now empty)."""
        deadline = time.monotonic() + FLUSH_BUDGET_SECONDS
        sent = 0
        with self.spool.flush_lock() as held:
            if not held:
                return 0, False
            self._adopt_legacy_once()
            while time.monotonic() < deadline:
                paths = self.spool.pending()[:FLUSH_BATCH]
                if not paths:
                    return sent, True
                batch, done = [], []
                for path in paths:
                    text = read_event(path)
                    if text is None:
                        continue
                    try:
                        batch.append(within_cap(parse_event_json(text), text, self.config.event_max_bytes))
                    except EventTooLarge as exc:  # spooled by a version without the cap
                        self._log_once("spool-too-large", "runbell: dropping spool file %s: %s", path.name, exc)
                    except ValueError:
                        self._log_once("spool-bad", "runbell: dropping unreadable spool file %s", path.name)
                    done.append(path)
                if batch:
                    self._send(batch)
                for path in done:
                    path.unlink(missing_ok=True)
                sent += len(batch)
        return sent, not self.spool.pending()

    def _redis(self) -> redis.Redis:
        if self._client is None:
            t = self.config.timeout_seconds
            self._client = sync_client(
                self.config.redis_url,
                socket_connect_timeout=t,
                socket_timeout=t,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        return self._client

    def _publish_sha(self, client: redis.Redis) -> str:
        if self._sha is None:
            # Loaded up front, once per process (on every master of a cluster): EVALSHA then meets
            # NOSCRIPT only when a server lost its scripts.
            self._sha = _text(client.script_load(PUBLISH_LUA))
        return self._sha

    def _trip(self, exc: Exception) -> None:
        self._broken_until = time.monotonic() + BREAKER_SECONDS
        self._log_once(
            "redis-" + type(exc).__name__,
            "runbell: Redis unreachable (%s); spooling events to %s",
            type(exc).__name__,
            self.config.spool_dir,
        )

    def _legacy_waits(self) -> bool:
        """Whether events from before per-namespace spools wait to be adopted (a flush does it, once)."""
        if self._legacy_unseen and not has_legacy(self.config.spool_dir):
            self._legacy_unseen = False
        return self._legacy_unseen

    def _adopt_legacy_once(self) -> None:
        """Events spooled at the top of the spool directory by a version before per-namespace spools."""
        if not self._legacy_unseen:
            return
        self._legacy_unseen = False
        found = adopt_legacy(self.config.spool_dir, self.spool)
        if found < 0:
            self._log_once(
                "spool-legacy",
                "runbell: %d events in %s predate per-namespace spools and other namespaces share the directory; "
                "move each into its namespace's subdirectory (this namespace's: %s) to have them sent",
                -found,
                self.config.spool_dir,
                self.spool.directory.name,
            )

    def _spool(self, event_json: str) -> None:
        """Keep the event durably in the spool, or raise SpoolUnavailable."""
        try:
            self.spool.append(event_json)
        except OSError as exc:
            raise SpoolUnavailable(self.spool.directory, exc.strerror or type(exc).__name__) from exc
        self._keep_flushing()

    def _keep_flushing(self) -> None:
        """Have a thread send the spool once Redis is back, whether or not anything else is published."""
        with self._flusher_lock:
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_until_empty, name="runbell-spool", daemon=True)
                self._flusher.start()

    def _flush_until_empty(self) -> None:
        while True:
            time.sleep(max(RETRY_SPOOL_SECONDS, self._broken_until - time.monotonic()))
            try:
                self.flush()
            except Exception as exc:  # the thread must not die with the spool still full
                self._log_once("flusher", "runbell: spool flush failed: %r", exc)
            with self._flusher_lock:  # an event spooled after this look starts a new thread
                if not self.spool.pending():
                    self._flusher = None
                    return

    def _log_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(msg, *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- building events ------------------------------------------------------------------------------


def extra_fields(extra: Any, max_bytes: int) -> dict[str, Any]:
    """An asset event's extra as published: inline up to max_bytes of JSON, else left out (with its
    size and extra_truncated; Airflow's asset events endpoint has the whole of it)."""
    if extra is None:
        return {}
    encoded = json.dumps(extra, default=str, separators=(",", ":"))
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        return {"extra": None, "extra_size": size, "extra_truncated": True}
    value = json.loads(encoded)
    if not isinstance(value, dict):
        value = {"value": value}
    return {"extra": value, "extra_size": size}


def json_size(value: Any) -> int:
    """Bytes of a value's JSON, as the result cap measures it."""
    return utf8_size(json.dumps(value, default=str, separators=(",", ":")))


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


_RESULT_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))  # what json.dumps(value, default=str, separators=...) uses


def make_result(value: Any, *, dag_id: str, run_id: str, task_id: str, map_index: int, max_bytes: int) -> Result:
    """The result as published: inline up to max_bytes of JSON, else a reference to Airflow's XCom.

    A value whose JSON is surely over the cap is never encoded: a walk adds up a lower bound of its
    size and stops as soon as that is past the cap, so a multi-GB artifact costs the task process
    about max_bytes of walking, not its whole size (a reference's ``size`` is then that bound: over
    the cap, at most the value's). Any other value is encoded at once by json's C encoder (a single
    huge string counts by its length, without being encoded)."""
    bound = _json_size_past(value, max_bytes)
    if bound > max_bytes:
        return Result(ref=ResultRef(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index), size=bound)
    encoded = _RESULT_ENCODER.encode(value)
    size = utf8_size(encoded)
    if size > max_bytes:  # escapes and numbers longer than the bound counted them
        return Result(ref=ResultRef(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index), size=size)
    return Result(value=json.loads(encoded), size=size)


def _json_size_past(value: Any, limit: int) -> int:
    """A lower bound of the bytes of value's JSON, added up until it passes limit (then returned at
    once): a string is at least its length and two quotes, a container its brackets and separators,
    anything else at least one byte. A cycle never ends the walk but passes the limit."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 2 * len(item) - (1 if item else 0)  # braces, a colon each, commas between
            if total <= limit:  # else not worth listing: the bound is past the limit already
                pending.extend(item.keys())
                pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += 2 + max(len(item) - 1, 0)  # brackets, commas between
            if total <= limit:
                pending.extend(item)
        else:
            total += 1
        if total > limit:
            return total
    return total


class EventTooLarge(ValueError):
    """An event whose JSON is over the event cap even with its result (or extra) left out."""


def within_cap(event: AnyEvent, event_json: str, max_bytes: int) -> tuple[AnyEvent, str]:
    """The event as published, and its JSON: as given when it fits the cap; else with its result as a
    reference to its XCom (an asset event without its extra), which is never lost; else EventTooLarge.
    Redis drops a subscriber whose output buffer a large message overflows: no event may be larger."""
    size = utf8_size(event_json)
    if size <= max_bytes:
        return event, event_json
    if isinstance(event, AssetEvent) and event.extra is not None:
        event = event.model_copy(update={"extra": None, "extra_truncated": True})
    elif isinstance(event, Event) and event.result is not None and not event.result.is_ref and event.task_id:
        # Its whole size, as it was encoded whole in the event already.
        ref = ResultRef(dag_id=event.dag_id, run_id=event.run_id, task_id=event.task_id, map_index=event.map_index)
        event = event.model_copy(update={"result": Result(ref=ref, size=json_size(event.result.value))})
    else:
        raise EventTooLarge(f"{size} bytes of JSON, over the event cap of {max_bytes}")
    event_json = event.to_json()
    if utf8_size(event_json) > max_bytes:
        raise EventTooLarge(f"{size} bytes of JSON, over the event cap of {max_bytes} even without its result")
    return event, event_json


_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked process (Airflow forks its workers and tasks) has none of the parent's threads: a lock
    one of them held would never be released, and the spool's thread must be started anew."""
    for publisher in list(_publishers):
        publisher._lock, publisher._flusher_lock, publisher._flusher = threading.Lock(), threading.Lock(), None


os.register_at_fork(after_in_child=_after_fork_in_child)

_MISSING = object()
_default_publisher: Publisher | None = None


def default_publisher() -> Publisher:
    """The process's publisher, configured from the environment."""
    global _default_publisher
    if _default_publisher is None:
        _default_publisher = Publisher(PublisherConfig.from_env())
    return _default_publisher


def emit(
    dag_id: str,
    run_id: str,
    state: str,
    *,
    task_id: str | None = None,
    map_index: int = -1,
    try_number: int | None = None,
    result: Any = _MISSING,
    result_task: bool = False,
    critical: bool = False,
    error: str | None = None,
    error_type: str | None = None,
    msg: str | None = None,
    publisher: Publisher | None = None,
    source: Source = Source.EMIT,
) -> int | None:
    """Publish exactly the event the Airflow hook would, for other schedulers and scripts.

    A task event when task_id is given, else a run event. Returns the sequence number, or None when
    Redis was unreachable and the event was spooled. Raises ValueError for an invalid event.
    """
    publisher = publisher or default_publisher()
    kind = EventKind.TASK if task_id else EventKind.RUN
    payload: Result | None = None
    if result is not _MISSING:
        payload = make_result(
            result,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id or "",
            map_index=map_index,
            max_bytes=publisher.config.result_max_bytes,
        )
    error_info = ErrorInfo(type=error_type or "error", message=error) if error is not None else None
    event = Event(
        kind=kind,
        dag_id=dag_id,
        run_id=run_id,
        state=state,
        source=source,
        host=socket.gethostname(),
        task_id=task_id,
        map_index=map_index,
        try_number=try_number,
        result_task=result_task,
        critical=critical or (result_task and kind is EventKind.TASK),
        result=payload,
        error=error_info,
        msg=msg,
    )
    return publisher.publish(event)


def emit_asset(
    name: str,
    *,
    uri: str | None = None,
    group: str | None = None,
    extra: Any = None,
    source_dag_id: str | None = None,
    source_run_id: str | None = None,
    source_task_id: str | None = None,
    source_map_index: int | None = None,
    publisher: Publisher | None = None,
    source: Source = Source.EMIT,
) -> int | None:
    """Publish an asset event as the hook would (for tests and scripts). Returns the asset's seq,
    or None when Redis was unreachable and the event was spooled. Raises ValueError when invalid."""
    publisher = publisher or default_publisher()
    event = AssetEvent(
        asset=AssetInfo(name=name, uri=uri, group=group),
        source_dag_id=source_dag_id,
        source_run_id=source_run_id,
        source_task_id=source_task_id,
        source_map_index=source_map_index,
        source=source,
        host=socket.gethostname(),
        **extra_fields(extra, publisher.config.result_max_bytes),
    )
    return publisher.publish(event)
