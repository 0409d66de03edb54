"""The recorder: copies every event from the global stream into the store, once.

Each gateway replica runs one; they share the consumer group ``keys.recorder_group()``, so every
stream entry goes to one of them, and the store's idempotent ``record`` makes a re-delivered entry
harmless. An entry is acknowledged only after its batch is committed, so a crash between the two
re-delivers it (to this consumer on restart, or to another one through XAUTOCLAIM).

The global stream is capped and publishers may fail between their two writes, so it can miss
events: when an envelope's seq jumps past what the store has for its run (in its epoch; from 1 in an
epoch newer than the store's), the missing range is read from the run's replay log first.

One entry the store refuses never stops the recording: the batch is bisected, the rest recorded, and
that entry moved to the dead-letter table (runbell.service.store.dead_letters). An entry that is no
event (the bus schema refuses it) is moved there too, as its bytes, with the schema's reason. An
outage of the database is retried with backoff instead, its entries left pending.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from runbell.bus import keys
from runbell.bus.schema import START, BadEvent, Envelope, decode_envelope
from runbell.service.core.loops import Backoff, Once, Supervised
from runbell.service.core.metrics import Metrics
from runbell.service.store.dead_letters import DeadLetters, Letter, Rejected, payload_text, raw_field
from runbell.service.store.store import RunKey, Store

log = logging.getLogger("runbell.recorder")

BLOCK_MS = 1000
COUNT = 200
CLAIM_IDLE_MS = 60_000  # an entry unacknowledged this long belongs to a dead consumer
CLAIM_INTERVAL_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 5.0
STREAM_SEQ_MAX = 2**64 - 1  # the sequence part of a Redis stream id

Entry = tuple[Any, dict[Any, Any]]  # (entry id, fields) as redis-py returns them


class Recorder:
    """Records the global stream of ``namespace`` into ``store`` as consumer ``consumer``.

    ``redis`` must be a client of the recorder's own, made with ``socket_timeout=None``: XREADGROUP
    blocks for ``block_ms``, and redis-py's default 5 s socket timeout turns a blocking read that
    outlives it into retries on new connections (delivery notes, trap 1). Give each replica a
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
    ):
        self.redis = redis
        self.max_event_bytes = max_event_bytes  # a larger entry is skipped as a bad event (reason "size")
        self.store = store
        self.namespace = namespace
        self.consumer = consumer
        self.stream = keys.global_stream(namespace)
        self.group = keys.recorder_group()
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval = claim_interval
        self._skipped = Once(log)
        self.decode_errors: Counter[str] = self._skipped.counts  # malformed entries read, by reason (each read)
        self.metrics = metrics  # runbell_recorder_skipped_total counts them too
        self.dead_letters = DeadLetters(store, metrics)
        self._group_ready = False
        self._own_pending_done = False  # re-read after start and after every failed step
        self._claim_cursor = "0-0"
        self._next_claim = 0.0  # monotonic time; 0: claim on the first step
        # step is looked up at each run, not bound here: tests replace it on the instance.
        self.loop = Supervised(
            "runbell-recorder",
            lambda: self.step(),
            backoff=Backoff(cap=BACKOFF_MAX_SECONDS),
            logger=log,
            expected=(RedisError, SQLAlchemyError, OSError),
        )

    async def run(self) -> None:
        """Record until cancelled. Outages of Redis or the database are logged and waited out."""
        await self.loop.run()

    async def step(self) -> int:
        """One read/record/ack cycle: own pending entries first, then idle entries of dead
        consumers, then new entries (blocking up to block_ms). Returns how many entries it handled."""
        try:
            await self._ensure_group()
            if not self._own_pending_done:
                entries = await self._read("0", block=None)
                if entries:
                    return await self._handle(entries)
                self._own_pending_done = True
            if time.monotonic() >= self._next_claim:
                entries = await self._claim()
                if entries:
                    return await self._handle(entries)
            return await self._handle(await self._read(">", block=self.block_ms))
        except BaseException:
            # Entries read but not acknowledged wait in our pending list; the group may be gone.
            self._own_pending_done = False
            self._group_ready = False
            raise

    # -- reading --------------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From "0", not "$": entries added before the group existed are recorded too.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self, start: str, block: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.count, block=block)
        return _stream_entries(reply)

    async def _claim(self) -> list[Entry]:
        """One XAUTOCLAIM page; after a full pass over the pending list, wait claim_interval."""
        cursor, entries, *_ = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.count,
        )
        self._claim_cursor = _text(cursor)
        if self._claim_cursor == "0-0":
            self._next_claim = time.monotonic() + self.claim_interval
        return entries

    # -- recording ------------------------------------------------------------------------------

    async def _handle(self, entries: list[Entry]) -> int:
        decoded = [self._decode(fields, _text(entry_id)) for entry_id, fields in entries]
        letters = [letter for letter in decoded if isinstance(letter, Letter)]
        if letters:
            missing = await self._fill_gaps([letter.envelope for letter in letters])
            await self.dead_letters.record(missing + letters)  # raises on an outage: nothing acknowledged
        await self.dead_letters.reject([entry for entry in decoded if isinstance(entry, Rejected)])  # as well
        if entries:
            await self.redis.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        return len(entries)

    def _decode(self, fields: dict[Any, Any] | None, stream_id: str | None = None) -> Letter | Rejected | None:
        """The entry as a letter to record; Rejected when it is no event (None when read from a
        replay log: the global stream's copy is the one dead-lettered); None when it is gone."""
        if not fields:
            return None  # the entry was trimmed or deleted while pending: nothing to record
        raw = fields.get(b"env", fields.get("env"))
        try:
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
        log_key = keys.run_keys(self.namespace, *run).log
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
