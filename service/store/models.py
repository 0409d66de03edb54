"""The store's tables, all of them: runs, their events and task tries, and the webhook outbox.

One metadata (Base) holds every table, so migrations are compared against the whole schema, and the
store package owns it; webhooks/ and the recorder write through these classes.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from runbell.bus.schema import EPOCH_MAX, ID_MAX, PROGRESS_KEY_MAX
from runbell.service.core import clock

ID_LENGTH = ID_MAX  # dag_id, run_id and task_id columns hold what the bus schema accepts
KEY_LENGTH = 64  # webhook endpoint and message ids


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends (SQLite stores naive text, so it is stored as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = clock.as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return clock.as_utc(value)


WRAPPED_JSON_KEY = "$runbell.json"


class StoredJSON(TypeDecorator[Any]):
    """JSON (jsonb on PostgreSQL) that keeps every value exactly, NUL characters included.

    PostgreSQL's jsonb refuses ``\\u0000`` in any string, and a task's result or an error message may
    hold one. Such a value is stored as ``{"$runbell.json": "<its JSON text>"}``: in that text the NUL
    is the six characters of its escape, which jsonb keeps, and reading unwraps it. A value that would
    itself read as a wrapper is wrapped too, so that every value comes back as it went in.
    """

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        return dialect.type_descriptor(postgresql.JSONB() if dialect.name == "postgresql" else JSON())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        text = json.dumps(value)
        if "\\u0000" in text or _looks_wrapped(value):  # also a literal backslash-u0000: wrapping is harmless
            return {WRAPPED_JSON_KEY: text}
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return json.loads(value[WRAPPED_JSON_KEY]) if _looks_wrapped(value) else value


def _looks_wrapped(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(WRAPPED_JSON_KEY), str)


JSONType = StoredJSON()


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        # Keyset paging of the runs listing (migration 0003): the order, per DAG, per backfill.
        Index("ix_runs_keyset", "run_after", "dag_id", "run_id"),
        Index("ix_runs_dag_keyset", "dag_id", "run_after", "run_id"),
        Index("ix_runs_backfill_id", "backfill_id"),
        Index("ix_runs_state_keyset", "state", "run_after", "dag_id", "run_id"),  # migration 0004
    )

    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    run_type: Mapped[str | None] = mapped_column(String(64))
    logical_date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    run_after: Mapped[datetime] = mapped_column(UTCDateTime())
    backfill_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    epoch: Mapped[str] = mapped_column(String(EPOCH_MAX), server_default="")  # the epoch of last_seq
    last_seq: Mapped[int] = mapped_column(Integer)
    last_event_at: Mapped[datetime] = mapped_column(UTCDateTime())
    outcome_status: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[dict[str, Any]] = mapped_column(JSONType)
    result_task: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    first_failure: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The newest heartbeat of a Metaflow run's tasks (migration 0008); NULL: none, the last event is.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TaskInstance(Base):
    __tablename__ = "task_instances"

    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    map_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    try_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EventRow(Base):
    __tablename__ = "events"

    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    epoch: Mapped[str] = mapped_column(String(EPOCH_MAX), primary_key=True, server_default="")  # migration 0005
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16))
    task_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    envelope: Mapped[str] = mapped_column(Text)  # the envelope JSON exactly as on the bus


class RunProgress(Base):
    """The last progress value per key of each run (migration 0009): progress is no outcome, so only
    the replay log keeps every value; the store keeps what a late reader shows. A value without a key
    (a chunk) is kept under the key ""."""

    __tablename__ = "run_progress"

    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    key: Mapped[str] = mapped_column(String(PROGRESS_KEY_MAX), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    map_index: Mapped[int] = mapped_column(Integer)
    try_number: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[str] = mapped_column(String(EPOCH_MAX))
    seq: Mapped[int] = mapped_column(Integer)
    value: Mapped[Any] = mapped_column(JSONType, nullable=True)  # a JSON null is kept as NULL
    ts: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookEndpointRow(Base):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_run_id", "run_id"),)  # a run's callbacks (migration 0010)

    id: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    dag_ids: Mapped[list[str] | None] = mapped_column(JSONType)  # None: every DAG
    kinds: Mapped[list[str]] = mapped_column(JSONType)
    enabled: Mapped[bool] = mapped_column(Boolean)
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A trigger's callback (migration 0010): bound to one run, with headers of its caller, until it expires.
    run_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    headers: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookMessageRow(Base):
    __tablename__ = "webhook_messages"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "dag_id", "run_id", "epoch", "seq", "kind", name="uq_webhook_messages_event"),
        Index("ix_webhook_messages_due", "status", "next_attempt_at"),
        Index("ix_webhook_messages_endpoint_created", "endpoint_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)  # the webhook-id header
    endpoint_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    epoch: Mapped[str] = mapped_column(String(EPOCH_MAX), server_default="")  # migration 0005
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    terminal: Mapped[bool] = mapped_column(Boolean)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    locked_by: Mapped[str | None] = mapped_column(String(200))  # the claim's token while leased
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttemptRow(Base):
    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_message", "message_id", "id"),
        Index("ix_webhook_attempts_endpoint", "endpoint_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    endpoint_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)


class DeadLetterRow(Base):
    """A stream entry set aside so that recording goes on (migration 0005): one the store refused on
    its own (reason "store"), or one that is no event (migration 0007: the bus schema's reason for it,
    runbell.bus.schema.BadEvent), kept with why until re-driven."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("dag_id", "run_id", "event_id", name="uq_dead_letters_event"),
    )  # ids are the publisher's: unique per run only

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The key of a re-delivered entry's one row: the event's (dag_id, run_id, id), or, for an entry
    # that is no event, ("", "", its stream id): no event has an empty dag_id.
    event_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    stream_id: Mapped[str | None] = mapped_column(String(KEY_LENGTH))  # None: read from the run's replay log
    dag_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    payload: Mapped[str] = mapped_column(Text)  # the envelope JSON as it came off the bus; "" for an entry that is no event
    error: Mapped[str] = mapped_column(Text)  # why the store refused it, the last time it was tried
    attempts: Mapped[int] = mapped_column(Integer)
    dead_lettered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(String(16), server_default="store")  # "store", or BadEvent.reason
    # An entry that is no event, as bytes (bytea/BLOB: NUL and invalid UTF-8 kept exactly): whole up to
    # RUNBELL_DEAD_LETTER_RAW_MAX_BYTES, else its first that many (runbell.service.store.dead_letters);
    # raw_size is the entry's size. Both None for an event the store refused (payload holds it).
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    raw_size: Mapped[int | None] = mapped_column(Integer)


# __table__ is typed FromClause; a declarative model's is a Table.
ENDPOINTS: Table = WebhookEndpointRow.__table__  # type: ignore[assignment]
MESSAGES: Table = WebhookMessageRow.__table__  # type: ignore[assignment]
ATTEMPTS: Table = WebhookAttemptRow.__table__  # type: ignore[assignment]


def dialect_insert(conn: AsyncConnection, table: type[Base]) -> Any:
    """INSERT with ON CONFLICT support, for the connection's dialect."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)
