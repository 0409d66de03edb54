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
reason and its bytes: whole when within the readers' ceiling (so a re-drive reads exactly what the
recorder read), else its first RAW_PREFIX_MAX bytes and its size. Such entries are taken from the
global stream only: a run's replay log holds copies of the same entries.

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

from runbell.bus.schema import ENVELOPE_OVERHEAD, ERROR_MESSAGE_MAX, BadEvent, Envelope, decode_envelope, truncate
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE
from runbell.service.core import clock
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
RAW_KEPT_MAX = EVENT_MAX_BYTES_RANGE[1] + ENVELOPE_OVERHEAD  # the largest entry a reader decodes: kept whole
RAW_PREFIX_MAX = 64 * 1024  # of a larger one, this many first bytes are kept (and its size)
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
    raw: bytes | None = None  # an entry that is no event: its bytes, whole or their first RAW_PREFIX_MAX
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


def kept(raw: bytes) -> bytes:
    """What is kept of an entry that is no event: all of it within the readers' ceiling, else its start."""
    return raw if len(raw) <= RAW_KEPT_MAX else raw[:RAW_PREFIX_MAX]


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

    def __init__(self, store: Store, metrics: Metrics | None = None):
        self.store = store
        self.metrics = metrics  # runbell_recorder_dead_letters_total

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
        await self._upsert(row)
        log.warning(
            "recorder: dead-lettered event %s of %s/%s seq %d (stream entry %s): %s",
            event.id,
            event.dag_id,
            event.run_id,
            letter.envelope.seq,
            letter.stream_id,
            error_shown.split("\n", 1)[0][:300],  # the first line: not the statement and its parameters
        )

    async def reject(self, entries: Sequence[Rejected]) -> None:
        """Dead-letter global stream entries that are no event. Raises on an outage."""
        for entry in entries:
            now = clock.now()
            raw = kept(entry.raw)
            row: dict[str, object] = dict(
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
                raw=raw,
                raw_size=len(entry.raw),
            )
            await self._upsert(row)
            log.warning(
                "recorder: dead-lettered stream entry %s, no event (%s, %d bytes, %d kept)",
                entry.stream_id,
                entry.error.reason,
                len(entry.raw),
                len(raw),
            )

    async def _upsert(self, row: dict[str, object]) -> None:
        """Insert the dead letter; one already there (the same key) is tried once more. Counted once."""
        async with self.store._transaction(write=True) as conn:
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
            attempts = (await conn.execute(upsert.returning(DeadLetterRow.attempts))).scalar_one()
        if attempts == 1 and self.metrics is not None:  # each dead letter counted once
            self.metrics.recorder_dead_letters.inc()

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
        raise BadEvent("size", f"{letter.raw_size} bytes, over the readers' ceiling of {RAW_KEPT_MAX}; only the first bytes were kept")
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
