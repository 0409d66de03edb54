"""The recorder: copies every event from the stream partitions into the store, once.

Each gateway replica runs one; they share the consumer group ``keys.recorder_group()`` on every
partition's stream, so every entry goes to one of them, and the store's idempotent ``record`` makes
a re-delivered entry harmless. An entry is acknowledged only after its batch is committed, so a
crash between the two re-delivers it (to this consumer on restart, or to another one through
XAUTOCLAIM, per partition).

Each partition's stream sits in its own slot (on a cluster, on its own master), and a blocking
XREADGROUP over several streams must stay in one slot there, so the recorder asks every partition
without blocking, in one pipeline (one round trip per master), and pauses when none had anything:
IDLE_POLL_SECONDS, doubling with each empty poll up to IDLE_POLL_MAX_SECONDS (never beyond
``block_ms``), back to the first after any entry. The entries one poll finds, of every partition,
are recorded as one batch (one transaction: Store.record; several of whole streams' reads past
RECORD_BATCH_MAX entries), then acknowledged. The stream of every run event before partitions,
``keys.global_stream``, is read the same way while it exists (events of hooks not yet upgraded); until
then the poll only asks whether it exists (its group is made once it does).

The streams are capped, so they can miss events: when an envelope's seq jumps past what the store
has for its run (in its epoch; from 1 in an epoch newer than the store's), the missing range is read
from the run's replay log first.

An entry may instead be a heartbeat (field ``hb``, runbell.bus.schema.Heartbeat: a running Metaflow
step's, sent by its decorator): it only moves its run's heartbeat time forward (Store.record_heartbeats,
after the batch's events, so a run first seen in the same batch has its row); it is no event, so no
seq, gap, outbox message or waiter is concerned. One that is no heartbeat is dead-lettered like an
entry that is no event.

One entry the store refuses never stops the recording: the batch is bisected, the rest recorded, and
that entry moved to the dead-letter table (runbell.service.store.dead_letters). An entry that is no
event (the bus schema refuses it) is moved there too, as its bytes, with the schema's reason. An
outage of the database is retried with backoff instead, its entries left pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from runbell.bus import keys
from runbell.bus.schema import HEARTBEAT_FIELD, START, BadEvent, Envelope, Heartbeat, decode_envelope, decode_heartbeat
from runbell.service.core.loops import Backoff, Once, Supervised
from runbell.service.core.metrics import Metrics
from runbell.service.store.dead_letters import DeadLetters, Letter, Rejected, payload_text, raw_field
from runbell.service.store.store import RunKey, Store

log = logging.getLogger("runbell.recorder")

BLOCK_MS = 1000
IDLE_POLL_SECONDS = 0.1  # the first pause after a poll that found nothing
# The longest pause of an idle recorder (each pause doubles from IDLE_POLL_SECONDS). The trade-off: an
# idle gateway polls every partition 2 times a second instead of 10, but the first event after an idle
# spell may wait up to this long to be stored (and its webhooks to start). Waiters and SSE clients are
# not delayed: live delivery is pub/sub, not this loop.
IDLE_POLL_MAX_SECONDS = 0.5
COUNT = 200  # entries per partition per read
CLAIM_IDLE_MS = 60_000  # an entry unacknowledged this long belongs to a dead consumer
CLAIM_INTERVAL_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 5.0
STREAM_SEQ_MAX = 2**64 - 1  # the sequence part of a Redis stream id

# Entries one transaction records at most (whole streams' reads): a poll over many partitions
# (count each) would otherwise hold SQLite's one writer, and the memory, for all of them at once.
RECORD_BATCH_MAX = 5000
LAG_UNKNOWN_COUNT_MAX = 10_000  # where lag is unknown, the undelivered entries are counted up to this

Entry = tuple[Any, dict[Any, Any]]  # (entry id, fields) as redis-py returns them


@dataclass(frozen=True)
class Backlog:
    """How far the recorder is behind its streams (the group's, shared by every replica, and its own)."""

    undelivered: int  # entries of the streams not yet read by the group (XINFO GROUPS lag), at least
    own_pending: int  # read by this consumer, not yet recorded and acknowledged

    @property
    def behind(self) -> int:
        return self.undelivered + self.own_pending


class Recorder:
    """Records the stream partitions of ``namespace`` into ``store`` as consumer ``consumer``.

    ``redis`` should be a client of the recorder's own (its reads come in bursts of one command per
    partition). Give each replica a
    consumer name that survives its restarts (e.g. the host name) so it finds its own pending
    entries again; entries of a consumer that never returns are claimed after ``claim_idle_ms``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        store: Store,
        namespace: str,
        consumer: str,
        *,
        block_ms: int = BLOCK_MS,
        count: int = COUNT,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        claim_interval: float = CLAIM_INTERVAL_SECONDS,
        metrics: Metrics | None = None,
        max_event_bytes: int | None = None,
        dead_letters: DeadLetters | None = None,
        partitions: int = keys.DEFAULT_PARTITIONS,
    ):
        self.redis = redis
        self.max_event_bytes = max_event_bytes  # a larger entry is skipped as a bad event (reason "size")
        self.store = store
        self.namespace = namespace
        self.consumer = consumer
        self.partitions = partitions
        self.streams = keys.partition_streams(namespace, partitions)
        self.legacy_stream = keys.global_stream(namespace)  # read while it exists: see the module's doc
        self._legacy_ready = False
        self.group = keys.recorder_group()
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval = claim_interval
        self._skipped = Once(log)
        self._refused = Once(log)  # commands Redis refused (an ACL short of one)
        self.decode_errors: Counter[str] = self._skipped.counts  # malformed entries read, by reason (each read)
        self.metrics = metrics  # runbell_recorder_skipped_total counts them too
        self.dead_letters = dead_letters if dead_letters is not None else DeadLetters(store, metrics)  # its bounds: the caller's
        self._group_ready = False
        self._own_pending_done = False  # re-read after start and after every failed step
        self._claim_cursors: dict[str, str] = {}  # stream -> XAUTOCLAIM cursor of the pass under way
        self._next_claim = 0.0  # monotonic time; 0: claim on the first step
        self._idle_pause = IDLE_POLL_SECONDS  # the next pause after an empty poll
        # Full passes since start (or the last repartition): own pending entries read, then every
        # partition asked for new ones and what came recorded. Readiness waits for the first.
        self.passes = 0
        # step is looked up at each run, not bound here: tests replace it on the instance.
        self.loop = Supervised(
            "runbell-recorder",
            lambda: self.step(),
            backoff=Backoff(cap=BACKOFF_MAX_SECONDS),
            logger=log,
            expected=(RedisError, SQLAlchemyError, OSError),
        )

    def repartition(self, count: int) -> None:
        """Another partition count (the one stored in Redis): read its streams from the next step
        (their groups made, this consumer's pending entries read first, dead consumers' claimed)."""
        self.partitions, self.streams = count, keys.partition_streams(self.namespace, count)
        self._group_ready = self._own_pending_done = False
        self._claim_cursors, self._next_claim = {}, 0.0
        self.passes = 0

    async def run(self) -> None:
        """Record until cancelled. Outages of Redis or the database are logged and waited out."""
        await self.loop.run()

    async def step(self) -> int:
        """One read/record/ack cycle: own pending entries first, then idle entries of dead
        consumers, then new entries of every partition (pausing up to block_ms when there are
        none). Returns how many entries it handled."""
        try:
            await self._ensure_group()
            if not self._own_pending_done:
                for stream in self._reading():
                    entries = await self._read(stream)
                    if entries:
                        return await self._handle(stream, entries)
                self._own_pending_done = True
            if time.monotonic() >= self._next_claim:
                stream, entries = await self._claim()
                if entries:
                    return await self._handle(stream, entries)
            handled = await self._handle_all(await self._read_new())
            self.passes += 1
            if not handled:
                await asyncio.sleep(min(self.block_ms / 1000, self._idle_pause))
                self._idle_pause = min(2 * self._idle_pause, IDLE_POLL_MAX_SECONDS)
            return handled
        except BaseException:
            # Entries read but not acknowledged wait in our pending list; the group may be gone.
            self._own_pending_done = False
            self._group_ready = False
            raise

    # -- reading --------------------------------------------------------------------------------

    def _reading(self) -> list[str]:
        return [*self.streams, self.legacy_stream] if self._legacy_ready else self.streams

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                # From "0", not "$": entries added before the group existed are recorded too.
                pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
        await self._ensure_legacy_group()
        self._group_ready = True

    async def _ensure_legacy_group(self) -> None:
        """The pre-partition stream, when it exists (not made: nothing new should write it)."""
        try:
            await self.redis.xgroup_create(self.legacy_stream, self.group, id="0")
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                self._legacy_ready = False  # no such stream (or no more)
                return
        self._legacy_ready = True

    async def _read(self, stream: str) -> list[Entry]:
        """This consumer's own pending entries of one stream."""
        reply = await self.redis.xreadgroup(self.group, self.consumer, {stream: "0"}, count=self.count)
        return _stream_entries(reply)

    async def _read_new(self) -> list[tuple[str, list[Entry]]]:
        """New entries of every stream, without blocking: one pipeline (a round trip per master).
        The pre-partition stream is read once it has our group; until then the pipeline only asks
        whether it exists, and its group is made when it does (not tried on every poll). NOGROUP
        there means it is gone (or its group deleted): looked at again the same way."""
        streams = self._reading()
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xreadgroup(self.group, self.consumer, {stream: ">"}, count=self.count)
            if not self._legacy_ready:
                pipe.exists(self.legacy_stream)
            replies = await pipe.execute(raise_on_error=False)
        if not self._legacy_ready:
            legacy = replies.pop()
            if isinstance(legacy, Exception):  # refused (an ACL without EXISTS): said once, not drained
                self._refused("legacy", "recorder: cannot ask whether %s exists (%s); it is not drained", self.legacy_stream, legacy)
            elif legacy == 1:
                await self._ensure_legacy_group()
        found = []
        for stream, reply in zip(streams, replies):
            if isinstance(reply, Exception):
                if stream != self.legacy_stream or "NOGROUP" not in str(reply):
                    raise reply
                self._legacy_ready = False
            elif entries := _stream_entries(reply):
                found.append((stream, entries))
        return found

    async def _claim(self) -> tuple[str, list[Entry]]:
        """One XAUTOCLAIM page of the first stream whose pass is not over; after a full pass over
        every stream's pending list, wait claim_interval."""
        if not self._claim_cursors:
            self._claim_cursors = dict.fromkeys(self._reading(), "0-0")
        for stream, start in list(self._claim_cursors.items()):
            cursor, entries, *_ = await self.redis.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=start,
                count=self.count,
            )
            if _text(cursor) == "0-0":
                del self._claim_cursors[stream]
            else:
                self._claim_cursors[stream] = _text(cursor)
            if entries:
                return stream, entries
        self._next_claim = time.monotonic() + self.claim_interval
        return "", []

    async def backlog(self) -> Backlog:
        """How far behind this recorder is: see backlog_of (readiness asks it)."""
        return await backlog_of(self.redis, self._reading(), self.group, self.consumer)

    # -- recording ------------------------------------------------------------------------------

    async def _handle(self, stream: str, entries: list[Entry]) -> int:
        return await self._handle_all([(stream, entries)])

    async def _handle_all(self, batches: list[tuple[str, list[Entry]]]) -> int:
        """Record the entries of one poll, of every stream read, in batches of whole streams' entries
        up to RECORD_BATCH_MAX (one stream's read never split), one after another."""
        handled = size = 0
        part: list[tuple[str, list[Entry]]] = []
        for stream, entries in batches:
            if part and size + len(entries) > RECORD_BATCH_MAX:
                handled += await self._handle_batch(part)
                part, size = [], 0
            part.append((stream, entries))
            size += len(entries)
        return handled + await self._handle_batch(part)

    async def _handle_batch(self, batches: list[tuple[str, list[Entry]]]) -> int:
        """Record entries of one or more streams as one batch: one transaction (a run's events all
        sit in one partition, so each run's stay in order); then acknowledge them, each stream's in
        one XACK of one pipeline. Poison is isolated by bisecting (dead_letters)."""
        decoded = [self._decode(fields, _text(entry_id)) for _, entries in batches for entry_id, fields in entries]
        letters = [letter for letter in decoded if isinstance(letter, Letter)]
        if letters:
            missing = await self._fill_gaps([letter.envelope for letter in letters])
            await self.dead_letters.record(missing + letters)  # raises on an outage: nothing acknowledged
        await self.store.record_heartbeats([beat for beat in decoded if isinstance(beat, Heartbeat)])  # as well
        await self.dead_letters.reject([entry for entry in decoded if isinstance(entry, Rejected)])  # as well
        batches = [(stream, entries) for stream, entries in batches if entries]
        if not batches:
            return 0
        if len(batches) == 1:
            stream, entries = batches[0]
            await self.redis.xack(stream, self.group, *(entry_id for entry_id, _ in entries))
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, entries in batches:
                    pipe.xack(stream, self.group, *(entry_id for entry_id, _ in entries))
                await pipe.execute()
        self._idle_pause = IDLE_POLL_SECONDS  # busy: poll again soon after the next empty one
        return sum(len(entries) for _, entries in batches)

    def _decode(self, fields: dict[Any, Any] | None, stream_id: str | None = None) -> Letter | Heartbeat | Rejected | None:
        """The entry as a letter to record, or a heartbeat; Rejected when it is neither (None when
        read from a replay log: the global stream's copy is the one dead-lettered); None when it is gone."""
        if not fields:
            return None  # the entry was trimmed or deleted while pending: nothing to record
        raw = fields.get(b"env", fields.get("env"))
        beat = fields.get(HEARTBEAT_FIELD.encode(), fields.get(HEARTBEAT_FIELD))
        try:
            if raw is None and beat is not None and stream_id is not None:
                raw = beat
                return decode_heartbeat(beat)
            if raw is None:
                raise BadEvent("field", "no 'env' field")
            return Letter(decode_envelope(raw, self.max_event_bytes), payload_text(raw), stream_id)
        except BadEvent as exc:
            self._bad(exc.reason, str(exc))
            if stream_id is None:
                return None
            entry = raw_field(fields) if raw is None else raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
            return Rejected(stream_id, entry, exc)

    def _bad(self, reason: str, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.recorder_skipped.labels(reason).inc()
        self._skipped(reason, "recorder: malformed entries, not recorded (%s): %s", reason, detail[:300])

    async def _fill_gaps(self, envelopes: list[Envelope]) -> list[Letter]:
        """Envelopes missing between the store's last position of each run and the positions in this
        batch, read from the runs' replay logs (whatever of them is still there). An epoch older than
        the store's is not looked for: Redis lost its log with it."""
        seqs: dict[tuple[RunKey, str], set[int]] = defaultdict(set)
        for envelope in envelopes:
            seqs[((envelope.event.dag_id, envelope.event.run_id), envelope.epoch)].add(envelope.seq)
        stored = await self.store.last_positions(run for run, _ in seqs)
        missing: list[Letter] = []
        for (run, epoch), run_seqs in seqs.items():
            last_stored = stored.get(run, START)
            if epoch < last_stored.epoch:
                continue
            for first, last in gaps(last_stored.seq if epoch == last_stored.epoch else 0, run_seqs):
                found = [letter for letter in await self._read_log(run, first, last) if letter.envelope.epoch == epoch]
                missing.extend(found)
                log.info("recorder: %s/%s: seq %d-%d missing from the stream, %d found in the replay log", *run, first, last, len(found))
        return missing

    async def _read_log(self, run: RunKey, first: int, last: int) -> list[Letter]:
        log_key = keys.run_keys(self.namespace, *run, self.partitions).log
        last = min(last, STREAM_SEQ_MAX)  # a seq beyond a stream id's (a bad entry) is no Redis error
        if first > last:
            return []
        entries = await self.redis.xrange(log_key, min=f"0-{first}", max=f"0-{last}")
        return [letter for _, fields in entries if isinstance(letter := self._decode(fields), Letter)]  # type: ignore[union-attr]  # xreadgroup returns a list here (typed Optional)


def gaps(last_stored: int, seqs: set[int]) -> list[tuple[int, int]]:
    """The (first, last) seq ranges missing before each seq of a run, given its last stored seq."""
    found = []
    expected = last_stored + 1
    for seq in sorted(seqs):
        if seq > expected:
            found.append((expected, seq - 1))
        expected = max(expected, seq + 1)
    return found


def _stream_entries(reply: Any) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply, in any of redis-py's reply shapes."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: entries}, with legacy responses {stream: [entries]}
        entries = next(iter(reply.values()))
        return entries[0] if entries and isinstance(entries[0], list) else entries
    return reply[0][1]  # RESP2: [[stream, entries]]


async def backlog_of(redis: aioredis.Redis, streams: list[str], group: str, consumer: str | None) -> Backlog:
    """Entries of the streams the group has not read yet (their consumer groups' ``lag``, summed),
    and those ``consumer`` (None: any consumer of the group) read and has not recorded yet: one pipeline, a round trip per master.
    Where Redis cannot tell the lag (an XDEL past the group's position), the entries after the
    group's last delivered id are counted, up to LAG_UNKNOWN_COUNT_MAX. A stream that does not
    exist (yet, or no more) has nothing to read. Also asked from outside a gateway (the bench waits on
    a gateway's recorder with it, as its own readiness does)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, group)
        replies = await pipe.execute(raise_on_error=False)
    undelivered = own = 0
    for i, stream in enumerate(streams):
        groups, pending = replies[2 * i], replies[2 * i + 1]
        for reply in (groups, pending):
            if isinstance(reply, Exception) and "no such key" not in str(reply) and "NOGROUP" not in str(reply):
                raise reply
        found = next((g for g in groups if _text(g["name"]) == group), None) if isinstance(groups, list) else None
        if found is None:  # no group yet: every entry is still to read
            undelivered += await redis.xlen(stream) if not isinstance(groups, Exception) else 0
            continue
        if found.get("lag") is not None:
            undelivered += int(found["lag"])
        else:
            after = "(" + _text(found["last-delivered-id"])
            undelivered += len(await redis.xrange(stream, min=after, max="+", count=LAG_UNKNOWN_COUNT_MAX) or ())
        if isinstance(pending, dict):
            own += sum(int(c["pending"]) for c in pending.get("consumers") or () if consumer in (None, _text(c["name"])))
    return Backlog(undelivered, own)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
