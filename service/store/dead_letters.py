"""Dead letters: the entries the store refuses on their own, kept aside so that recording goes on.

The schema bounds what the store keeps, so an accepted event should always be storable; this is the
net under that rule. When a batch fails with an error about its data, the recorder bisects it:
every part that records is recorded, and an entry that fails alone, twice, while the database
answers, is moved here with its payload, stream id and error, counted, and acknowledged.

An outage is not poison: the database down, unreachable, full, read-only, restarting, or a lock or
serialization conflict fails every entry alike, so its errors are raised for the recorder to retry
with backoff, entries left pending. Before an entry is dead-lettered the database must answer a
ping, so an outage that surfaces as an unexpected error does not empty the stream into this table.

An entry that is no event (not JSON, not an envelope, a value the bus schema refuses, larger than
any publisher may send, no 'env' field) is dead-lettered too, keyed by its stream id, with the schema's
reason and its bytes: whole up to ``raw_max_bytes`` (RUNBELL_DEAD_LETTER_RAW_MAX_BYTES; so a re-drive
reads exactly what the recorder read), else its first ``raw_max_bytes`` and its size. Such entries are
taken from the global stream only: a run's replay log holds copies of the same entries. They are
logged once per reason (the first one), the rest counted: whoever can write to the stream must not
flood the log either.

The table is capped (``max_rows``, RUNBELL_DEAD_LETTERS_MAX), since whoever can write to the stream
could otherwise grow it for ever. Each insert that takes it past the cap evicts, in the same
transaction, the oldest entries that are no event first (bytes of no event, mostly an attacker's or
a broken publisher's), then, only when none is left, the oldest events the store refused (each one a
lost event: worth more). Every eviction is counted in runbell_recorder_dead_letters_evicted_total by
kind ("malformed", "event") and logged once per kind. Recorders of several gateways insert at once:
each counts what it sees, so the table may pass the cap by as many rows as are inserted concurrently,
and the next insert takes it back; two evicting the same row is harmless (one deletes it).

A re-drive records a dead letter through the same path; if it fails again it stays, with the new error.
A re-drive of an entry that is still no event raises StillMalformed, the entry kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, InternalError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection

from runbell.bus.schema import ENVELOPE_OVERHEAD, ERROR_MESSAGE_MAX, BadEvent, Envelope, decode_envelope, truncate
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE
from runbell.service.core import clock
from runbell.service.core.loops import Once
from runbell.service.core.metrics import Metrics
from runbell.service.store.models import DeadLetterRow, dialect_insert
from runbell.service.store.store import Store

log = logging.getLogger("runbell.dead_letters")

# SQLSTATE classes that say the database cannot be used now, whatever is written: connection (08),
# invalid transaction state (25: read-only after a failover), invalid authorization (28), no such
# database (3D), transaction rollback (40: serialization, deadlock), insufficient resources (53: disk
# full), object not in prerequisite state (55: lock not available), operator intervention (57:
# shutdown, cancelled), system error (58), internal error (XX).
OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "25", "28", "3D", "40", "53", "55", "57", "58", "XX"})

STORE_REFUSED = "store"  # the reason of a valid event the store refused (else a BadEvent's reason)
NOT_AN_EVENT = ""  # dag_id and run_id of an entry that is no event (its key: its stream id)
RAW_KEPT_MAX = EVENT_MAX_BYTES_RANGE[1] + ENVELOPE_OVERHEAD  # the largest entry a reader decodes
RAW_MAX_BYTES = 1024 * 1024  # of an entry that is no event, this much is kept by default (the rest: its size)
RAW_MAX_BYTES_RANGE = (1024, RAW_KEPT_MAX)  # keeping more than a reader decodes serves no re-drive
MAX_ROWS = 100_000  # dead letters kept by default (each up to raw_max_bytes of entry, or an event)
MAX_ROWS_RANGE = (100, 10_000_000)
EVICT_MAX = 1000  # rows one insert evicts beyond its own: a lowered cap is reached over several inserts
MALFORMED, EVENT = "malformed", "event"  # the kinds of evicted dead letters (the metric's label)
PAGE_BYTES_MAX = 16 * 1024 * 1024  # a page of dead letters holds at most this much entry (one at least)


@dataclass(frozen=True)
class Letter:
    """An entry to record: the envelope, its payload as it came off the bus, and its stream id."""

    envelope: Envelope
    payload: str
    stream_id: str | None = None  # None: read from the run's replay log


@dataclass(frozen=True)
class Rejected:
    """A global stream entry that is no event: its id, its bytes as read, and why."""

    stream_id: str
    raw: bytes
    error: BadEvent


@dataclass(frozen=True)
class DeadLetter:
    id: int
    event_id: str | None  # None (and dag_id, run_id): an entry that is no event
    stream_id: str | None
    dag_id: str | None
    run_id: str | None
    seq: int | None
    payload: str
    error: str
    attempts: int
    dead_lettered_at: datetime
    last_attempt_at: datetime
    reason: str = STORE_REFUSED
    raw: bytes | None = None  # an entry that is no event: its bytes, whole or their first raw_max_bytes
    raw_size: int | None = None  # ... and its size in bytes

    @property
    def raw_truncated(self) -> bool:
        return self.raw is not None and self.raw_size is not None and len(self.raw) < self.raw_size


Page = tuple[list[DeadLetter], bool]  # dead letters, and whether more follow them


class StillMalformed(Exception):
    """A re-driven entry is still no event: it stays, as ``letter`` (with the new attempt)."""

    def __init__(self, letter: DeadLetter, error: BadEvent):
        super().__init__(str(error))
        self.letter, self.error = letter, error


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be used now (retry later), rather than that the
    data written was refused (poison, if one entry fails alone)."""
    if isinstance(exc, (OSError, asyncio.TimeoutError)):  # refused, reset, timed out
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError, InternalError)):
            return True
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(state, str) and state[:2] in OUTAGE_SQLSTATE_CLASSES
    if isinstance(exc, StatementError):  # an error raised while the statement was made: its cause decides
        return exc.orig is not None and is_outage(exc.orig)
    return isinstance(exc, SQLAlchemyError)  # the pool's TimeoutError, a closed engine, ...


def error_text(exc: BaseException) -> str:
    """The error as kept and shown: bounded, and without NUL (PostgreSQL's text cannot hold it)."""
    return truncate(f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00"), ERROR_MESSAGE_MAX)


class DeadLetters:
    """Records letters, isolating the poison among them, and keeps the dead letters of ``store``."""

    def __init__(self, store: Store, metrics: Metrics | None = None, *, raw_max_bytes: int = RAW_MAX_BYTES, max_rows: int = MAX_ROWS):
        if raw_max_bytes < 1 or max_rows < 1:
            raise ValueError("raw_max_bytes and max_rows must be positive")
        self.store = store
        self.metrics = metrics  # runbell_recorder_dead_letters_total, ..._evicted_total
        self.raw_max_bytes = raw_max_bytes
        self.max_rows = max_rows
        self._once = Once(log)  # entries that are no event, and evictions: the first of each kind logged

    # -- recording ------------------------------------------------------------------------------

    async def record(self, letters: Sequence[Letter]) -> int:
        """Record the letters; dead-letter each that fails on its own. Returns how many were
        dead-lettered. Raises on an outage (nothing is dead-lettered then)."""
        if not letters:
            return 0
        error = await self._try_record(letters)
        if error is None:
            return 0
        if len(letters) == 1:
            # Poison fails again; a passing fault (a prepared statement invalidated by another
            # replica's migration, a conflict) does not: one more try, once the database answers.
            await self.store.ping()  # raises if the database is gone: an outage, not this entry
            error = await self._try_record(letters)
            if error is None:
                return 0
            await self._dead_letter(letters[0], error)
            return 1
        middle = len(letters) // 2
        return await self.record(letters[:middle]) + await self.record(letters[middle:])

    async def _try_record(self, letters: Sequence[Letter]) -> BaseException | None:
        """None when recorded; the error when the store refused the data. Raises on an outage."""
        try:
            await self.store.record([letter.envelope for letter in letters])
        except Exception as exc:
            if is_outage(exc):
                raise
            return exc
        return None

    async def _dead_letter(self, letter: Letter, error: BaseException) -> None:
        event = letter.envelope.event
        now = clock.now()
        error_shown = error_text(error)
        row: dict[str, object] = dict(
            event_id=event.id,
            stream_id=letter.stream_id,
            dag_id=event.dag_id,
            run_id=event.run_id,
            payload=letter.payload,
            error=error_shown,
            attempts=1,
            dead_lettered_at=now,
            last_attempt_at=now,
        )
        [attempts] = await self._upsert([row])
        log.log(
            logging.WARNING if attempts == 1 else logging.DEBUG,  # a re-delivery is the same dead letter
            "recorder: dead-lettered event %s of %s/%s seq %d (stream entry %s): %s",
            event.id,
            event.dag_id,
            event.run_id,
            letter.envelope.seq,
            letter.stream_id,
            error_shown.split("\n", 1)[0][:300],  # the first line: not the statement and its parameters
        )

    async def reject(self, entries: Sequence[Rejected]) -> None:
        """Dead-letter global stream entries that are no event, in one transaction. Raises on an outage."""
        if not entries:
            return
        now = clock.now()
        rows = [
            dict(
                event_id=entry.stream_id,
                stream_id=entry.stream_id,
                dag_id=NOT_AN_EVENT,
                run_id=NOT_AN_EVENT,
                payload="",
                error=error_text(entry.error),
                attempts=1,
                dead_lettered_at=now,
                last_attempt_at=now,
                reason=entry.error.reason,
                raw=entry.raw[: self.raw_max_bytes],
                raw_size=len(entry.raw),
            )
            for entry in entries
        ]
        await self._upsert(rows)
        for entry in entries:
            self._once(
                f"malformed-{entry.error.reason}",
                "recorder: dead-lettered stream entry %s, no event (%s, %d bytes, %d kept); more of this reason are "
                "counted in runbell_recorder_dead_letters_total, not logged",
                entry.stream_id,
                entry.error.reason,
                len(entry.raw),
                min(len(entry.raw), self.raw_max_bytes),
            )

    async def _upsert(self, rows: Sequence[dict[str, object]]) -> list[int]:
        """Insert the dead letters, in one transaction that also evicts past the cap; one already there
        (the same key) is tried once more. Each counted once. Returns their attempts."""
        attempts = []
        evicted: dict[str, int] = {}
        async with self.store._transaction(write=True) as conn:
            for row in rows:
                attempts.append(await self._upsert_one(conn, row))
            if 1 in attempts:
                evicted = await self._evict(conn, attempts.count(1))
        # Committed: counted and logged now (a rolled-back eviction evicted nothing).
        if self.metrics is not None:  # each dead letter counted once
            self.metrics.recorder_dead_letters.inc(attempts.count(1))
        for kind, count in evicted.items():
            self._evicted(kind, count)
        return attempts

    async def _upsert_one(self, conn: AsyncConnection, row: dict[str, object]) -> int:
        insert = dialect_insert(conn, DeadLetterRow).values(row)
        # A re-delivered entry (a crash before its ack) is the same dead letter, tried once more.
        # (Or read again to fill a gap before a later event of its run.)
        upsert = insert.on_conflict_do_update(
            index_elements=[DeadLetterRow.dag_id, DeadLetterRow.run_id, DeadLetterRow.event_id],
            set_=dict(
                stream_id=func.coalesce(insert.excluded.stream_id, DeadLetterRow.stream_id),
                payload=insert.excluded.payload,
                error=insert.excluded.error,
                attempts=DeadLetterRow.attempts + 1,
                last_attempt_at=insert.excluded.last_attempt_at,
            ),
        )
        return int((await conn.execute(upsert.returning(DeadLetterRow.attempts))).scalar_one())

    async def _evict(self, conn: AsyncConnection, inserted: int) -> dict[str, int]:
        """Delete the oldest dead letters past the cap: entries that are no event first, then events.
        At most ``inserted`` + EVICT_MAX rows (a bounded DELETE). Returns how many, by kind."""
        count = int((await conn.execute(select(func.count()).select_from(DeadLetterRow))).scalar_one())
        excess = min(count - self.max_rows, inserted + EVICT_MAX)
        evicted: dict[str, int] = {}
        for kind, which in ((MALFORMED, DeadLetterRow.reason != STORE_REFUSED), (EVENT, DeadLetterRow.reason == STORE_REFUSED)):
            if excess <= 0:
                break
            oldest = select(DeadLetterRow.id).where(which).order_by(DeadLetterRow.id).limit(excess)
            deleted = (await conn.execute(delete(DeadLetterRow).where(DeadLetterRow.id.in_(oldest)))).rowcount
            if deleted:
                evicted[kind] = deleted
                excess -= deleted
        return evicted

    def _evicted(self, kind: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.recorder_dead_letters_evicted.labels(kind).inc(count)
        self._once(
            f"evicted-{kind}",
            "recorder: the dead-letter table is full (%d rows, RUNBELL_DEAD_LETTERS_MAX): evicted the %d oldest %s; "
            "further evictions are counted in runbell_recorder_dead_letters_evicted_total, not logged",
            self.max_rows,
            count,
            "entries that were no event" if kind == MALFORMED else "events the store refused (no entry that is no event was left)",
        )

    # -- reading and re-driving -----------------------------------------------------------------

    async def list(self, *, after: int = 0, limit: int = 50) -> list[DeadLetter]:
        """Dead letters with id > after, oldest first (a page: see page)."""
        return (await self.page(after=after, limit=limit))[0]

    async def page(self, *, after: int = 0, limit: int = 50) -> Page:
        """Dead letters with id > after, oldest first: at most limit, and no more than PAGE_BYTES_MAX of
        entries (payload and raw) unless one alone is; and whether there are more after them."""
        size = func.length(DeadLetterRow.payload) + func.coalesce(func.length(DeadLetterRow.raw), 0)
        sizes = select(DeadLetterRow.id, size).where(DeadLetterRow.id > after).order_by(DeadLetterRow.id).limit(limit + 1)
        async with self.store.engine.connect() as conn:
            found = (await conn.execute(sizes)).all()
            ids = _within_budget([(row[0], row[1]) for row in found[:limit]])
            rows = (
                (await conn.execute(select(DeadLetterRow).where(DeadLetterRow.id.in_(ids)).order_by(DeadLetterRow.id))).all() if ids else []
            )
        return [_dead_letter(row) for row in rows], len(ids) < len(found)

    async def get(self, letter_id: int) -> DeadLetter | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(DeadLetterRow).where(DeadLetterRow.id == letter_id))).first()
        return None if row is None else _dead_letter(row)

    async def count(self) -> int:
        async with self.store.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(DeadLetterRow))).scalar_one())

    async def redrive(self, letter: DeadLetter) -> DeadLetter | None:
        """Record the dead letter again. None when it is recorded now (and gone from the table); else
        the dead letter with the new error. StillMalformed when it is an entry that is still no event
        (kept, with the new attempt). Raises on an outage."""
        error: BaseException | None
        if letter.reason != STORE_REFUSED:
            try:
                envelope, payload = _decoded(letter), payload_text(letter.raw or b"")
            except BadEvent as exc:
                raise StillMalformed(await self._tried(letter, exc), exc) from None
            error = await self._try_record([Letter(envelope, payload, letter.stream_id)])
        else:
            try:
                envelope = decode_envelope(letter.payload)
            except BadEvent as exc:  # the schema changed since: it cannot be recorded as it is
                error = exc
            else:
                error = await self._try_record([Letter(envelope, letter.payload, letter.stream_id)])
        if error is None:
            async with self.store._transaction(write=True) as conn:
                await conn.execute(delete(DeadLetterRow).where(DeadLetterRow.id == letter.id))
            return None
        return await self._tried(letter, error)

    async def _tried(self, letter: DeadLetter, error: BaseException) -> DeadLetter:
        """The dead letter tried once more and refused with ``error``, as kept."""
        async with self.store._transaction(write=True) as conn:
            values = dict(error=error_text(error), attempts=letter.attempts + 1, last_attempt_at=clock.now())
            await conn.execute(update(DeadLetterRow).where(DeadLetterRow.id == letter.id).values(**values))
        return DeadLetter(**{**letter.__dict__, **values})


def _dead_letter(row: Any) -> DeadLetter:
    an_event = row.reason == STORE_REFUSED
    return DeadLetter(
        id=row.id,
        event_id=row.event_id if an_event else None,
        stream_id=row.stream_id,
        dag_id=row.dag_id if an_event else None,
        run_id=row.run_id if an_event else None,
        seq=_seq(row.payload),
        payload=row.payload,
        error=row.error,
        attempts=row.attempts,
        dead_lettered_at=row.dead_lettered_at,
        last_attempt_at=row.last_attempt_at,
        reason=row.reason,
        raw=None if row.raw is None else bytes(row.raw),  # memoryview on PostgreSQL's driver
        raw_size=row.raw_size,
    )


def _within_budget(sizes: list[tuple[int, int]]) -> list[int]:
    """The ids, in order, while their sizes add up to PAGE_BYTES_MAX at most (the first one always)."""
    ids: list[int] = []
    total = 0
    for letter_id, size in sizes:
        total += size
        if ids and total > PAGE_BYTES_MAX:
            break
        ids.append(letter_id)
    return ids


def _decoded(letter: DeadLetter) -> Envelope:
    """The envelope of an entry dead-lettered as no event, read again now; BadEvent if it still is none."""
    if letter.reason == "field":
        raise BadEvent("field", "the stream entry has no 'env' field")
    if letter.raw is None or letter.raw_truncated:
        raise BadEvent("size", f"{letter.raw_size} bytes, of which only the first {len(letter.raw or b'')} bytes were kept")
    return decode_envelope(letter.raw)


def raw_field(fields: dict[Any, Any]) -> bytes:
    """A stream entry without an 'env' field, as bytes to keep: its fields as JSON (for a person)."""
    return json.dumps({_decoded_text(name): _decoded_text(value) for name, value in fields.items()}).encode()


def payload_text(raw: bytes | str) -> str:
    """An entry that decoded as an envelope, as text for the payload column (it decoded as JSON:
    UTF-8, any NUL escaped)."""
    return _decoded_text(raw).replace("\x00", "\\x00")  # JSON in UTF-16, which json.loads reads too


def _decoded_text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _seq(payload: str) -> int | None:
    """The envelope's seq, read from the payload (it may be the value the store refused)."""
    try:
        seq: Any = json.loads(payload).get("seq")
    except (ValueError, AttributeError, RecursionError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None
