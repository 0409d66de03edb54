"""The events that travel over the bus, version 1.

Both ends validate with these models: the publisher before it sends, the gateway when it receives.
On the wire an event is wrapped in an envelope that carries the run's epoch and sequence number,
which Redis assigns (see publish.lua): ``{"epoch": "6930a1b2c3d4e", "seq": 12, "event": {...}}``.

The epoch names one life of the stream's state in Redis: it is made with the stream's first event
and made again whenever Redis has lost that state (a restart without persistence, a fail-over to a
replica that had not received it, keys expired), so a sequence that starts again at 1 is told apart
from the one before. A position is (epoch, seq); epochs are the Redis server's time in microseconds
as 13 hex digits, so they sort in the order they were made (across servers, as far as their clocks
agree). An envelope without an epoch (a publisher from before epochs) has the legacy epoch "", which
sorts before every other: its seqs compare as they always did.

Two families share the envelope and version 1: a run's events (``Event``, kind ``task`` or ``run``,
on the run's stream) and an asset's events (``AssetEvent``, kind ``asset``, on the asset's stream,
with the asset's own sequence). Asset events were added without a version bump: they travel on keys
and channels of their own, nothing about run events changed, and a reader of run events that meets
one anyway (an older gateway) rejects it as a schema error instead of misreading it.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import Enum
from typing import Any, Final, Literal, NamedTuple, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION: Final = 1
ID_MAX = 250  # dag_id, run_id, task_id: Airflow's own limit
ERROR_MESSAGE_MAX = 2000


class EventKind(str, Enum):
    TASK = "task"
    RUN = "run"


class RunState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCESS, RunState.FAILED)


class TaskState(str, Enum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"  # terminal: no retry left
    UP_FOR_RETRY = "up_for_retry"  # failed, but will be retried: NOT a failure of the run
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED)


class Source(str, Enum):
    HOOK = "hook"  # the Airflow listener
    EMIT = "emit"  # the publishing API / `runbell emit`
    RECONCILER = "reconciler"  # the gateway, from Airflow's REST API
    GATEWAY = "gateway"  # the gateway's trigger endpoint (a run it queued)


class ErrorInfo(BaseModel):
    type: str
    message: str

    @classmethod
    def from_exception(cls, error: BaseException | str | None) -> ErrorInfo:
        if error is None:
            return cls(type="unknown", message="")
        if isinstance(error, BaseException):
            return cls(type=type(error).__name__, message=truncate(str(error)))
        return cls(type="error", message=truncate(str(error)))


class ResultRef(BaseModel):
    """Where a result too large for the bus can be read (Airflow's XCom endpoint)."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1


class Result(BaseModel):
    """The result task's value, inline, or a reference when it is larger than the cap."""

    value: Any = None
    ref: ResultRef | None = None
    size: int = 0  # bytes of the JSON-encoded value

    @property
    def is_ref(self) -> bool:
        return self.ref is not None


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    kind: EventKind
    dag_id: str = Field(min_length=1, max_length=ID_MAX)
    run_id: str = Field(min_length=1, max_length=ID_MAX)
    state: str
    ts: float = Field(default_factory=time.time)
    source: Source = Source.HOOK
    host: str | None = None
    # task events
    task_id: str | None = Field(default=None, max_length=ID_MAX)
    map_index: int = -1
    try_number: int | None = None
    result_task: bool = False  # this task's value is the run's result
    critical: bool = False  # a terminal failure of this task decides the run as failed
    result: Result | None = None
    error: ErrorInfo | None = None
    # run events
    run_type: str | None = None
    logical_date: str | None = None
    run_after: str | None = None
    backfill_id: str | None = None
    msg: str | None = None

    @model_validator(mode="after")
    def _state_fits_kind(self) -> Event:
        states = TaskState if self.kind is EventKind.TASK else RunState
        try:
            states(self.state)
        except ValueError:
            accepted = ", ".join(s.value for s in states)
            raise ValueError(f"state {self.state!r} is not a {self.kind.value} state ({accepted})") from None
        if self.kind is EventKind.TASK and not self.task_id:
            raise ValueError("a task event needs task_id")
        return self

    @property
    def run_state(self) -> RunState:
        return RunState(self.state)

    @property
    def task_state(self) -> TaskState:
        return TaskState(self.state)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


ASSET_KIND: Final = "asset"
ASSET_NAME_MAX = 1500  # Airflow's limit on an asset's name and uri


class AssetInfo(BaseModel):
    """The asset an event is about, as Airflow names it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1, max_length=ASSET_NAME_MAX)
    uri: str | None = Field(default=None, max_length=ASSET_NAME_MAX)
    group: str | None = Field(default=None, max_length=ASSET_NAME_MAX)


class AssetEvent(BaseModel):
    """An asset was updated (Airflow's asset event): on the asset's own stream, with its own seq."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    kind: Literal["asset"] = ASSET_KIND
    asset: AssetInfo
    extra: dict[str, Any] | None = None  # the event's extra; None (left out on the wire) when larger than the cap
    extra_size: int = 0  # bytes of the JSON-encoded extra
    extra_truncated: bool = False  # the extra was larger than the cap and is not carried
    # Where Airflow says the event came from (a task's outlet); all None for an event made otherwise
    # (the REST API, or a hook that knew only the asset).
    source_dag_id: str | None = Field(default=None, max_length=250)
    source_run_id: str | None = Field(default=None, max_length=250)
    source_task_id: str | None = Field(default=None, max_length=ID_MAX)
    source_map_index: int | None = None
    partition_key: str | None = None
    aliases: list[str] = Field(default_factory=list)  # names of the asset aliases it came through
    ts: float = Field(default_factory=time.time)
    source: Source = Source.HOOK
    host: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


AnyEvent = Union[Event, AssetEvent]


LEGACY_EPOCH: Final = ""  # the epoch of an envelope from a publisher before epochs
EPOCH_MAX = 32
EPOCH_PATTERN: Final = r"^[0-9a-z]*$"  # no "-": an SSE id is EPOCH-SEQ


class Position(NamedTuple):
    """Where an event stands in its stream: compares by epoch, then seq (a tuple's order)."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        """The SSE id: EPOCH-SEQ, or the bare seq of the legacy epoch."""
        return f"{self.epoch}-{self.seq}" if self.epoch else str(self.seq)

    def follows(self, before: Position) -> bool:
        """Nothing can lie between ``before`` and this position: the next seq of the same epoch."""
        return self.epoch == before.epoch and self.seq == before.seq + 1


START: Final = Position(LEGACY_EPOCH, 0)  # before every event


class Envelope(BaseModel):
    """An event as stored in the replay log and sent on pub/sub: with its run's epoch and sequence number."""

    model_config = ConfigDict(frozen=True)

    epoch: str = Field(default=LEGACY_EPOCH, max_length=EPOCH_MAX, pattern=EPOCH_PATTERN)
    seq: int = Field(ge=1)
    event: Event

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq)


class AssetEnvelope(BaseModel):
    """An asset event with its asset's epoch and sequence number (the same envelope shape as a run's)."""

    model_config = ConfigDict(frozen=True)

    epoch: str = Field(default=LEGACY_EPOCH, max_length=EPOCH_MAX, pattern=EPOCH_PATTERN)
    seq: int = Field(ge=1)
    event: AssetEvent

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq)


class BadEvent(ValueError):
    """A message on the bus that is not a valid event. ``reason`` names the kind, for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def envelope_json(seq: int, event_json: str, epoch: str = LEGACY_EPOCH) -> str:
    """The envelope as publish.lua builds it: by concatenation, so the event JSON is never re-encoded."""
    head = '{"epoch":"' + epoch + '",' if epoch else "{"
    return head + '"seq":' + str(seq) + ',"event":' + event_json + "}"


def parse_position(text: str) -> Position | None:
    """An SSE id (EPOCH-SEQ, or a bare seq: the legacy epoch) as a position; None when malformed.
    ASCII digits only: str.isdigit() also accepts "²", which int() refuses."""
    epoch, _, seq = text.rpartition("-")
    if not (seq.isascii() and seq.isdigit()) or len(seq) > 18 or len(epoch) > EPOCH_MAX:
        return None
    if not (epoch.isascii() and (epoch.isalnum() or epoch == "") and epoch == epoch.lower()):
        return None
    if text.startswith("-"):  # "-5": an empty epoch is written without its dash
        return None
    return Position(epoch, int(seq))


def decode_envelope(raw: bytes | str) -> Envelope:
    """Parse and validate one envelope; raise BadEvent saying why it is not one."""
    return _validated(Envelope, _envelope_data(raw))


def decode_asset_envelope(raw: bytes | str) -> AssetEnvelope:
    """Parse and validate one asset envelope; raise BadEvent saying why it is not one."""
    return _validated(AssetEnvelope, _envelope_data(raw))


def _envelope_data(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except RecursionError:  # not a ValueError: it would escape every reader of the bus
        raise BadEvent("depth", "nested deeper than JSON can be read") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent("json", str(exc)[:200]) from None
    if not isinstance(data, dict) or not isinstance(data.get("event"), dict):
        raise BadEvent("shape", "expected an object with 'seq' and 'event'")
    version = data["event"].get("v")
    if version != SCHEMA_VERSION:
        raise BadEvent("version", f"unknown event version {version!r}")
    return data


_AnyEnvelope = TypeVar("_AnyEnvelope", Envelope, AssetEnvelope)


def _validated(model: type[_AnyEnvelope], data: dict[str, Any]) -> _AnyEnvelope:
    try:
        envelope = model.model_validate(data)
    except ValidationError as exc:
        raise BadEvent("schema", str(exc.errors(include_url=False)[:3])[:300]) from None
    event = envelope.event
    free_form = event.extra if isinstance(event, AssetEvent) else event.result
    if free_form is not None:
        # A value nested deeper than pydantic encodes (no publisher can have sent it: it encodes
        # before it publishes) would fail later wherever the event is encoded: the store, SSE, a 200.
        try:
            event.to_json()
        except ValueError as exc:
            raise BadEvent("depth", str(exc)[:200]) from None
    return envelope


def parse_event_json(text: str | bytes) -> AnyEvent:
    """A bare event (as spooled, or sent to the publishing API) of either family, by its kind."""
    data = json.loads(text)
    if isinstance(data, dict) and data.get("kind") == ASSET_KIND:
        return AssetEvent.model_validate_json(text)
    return Event.model_validate_json(text)


def truncate(text: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
