"""The events that travel over the bus, version 1.

Both ends validate with these models: the publisher before it sends, the gateway when it receives.
On the wire an event is wrapped in an envelope that carries the run's epoch and sequence number,
which Redis assigns (see publish.lua): ``{"epoch": "6930a1b2c3d4e", "seq": 12, "event": {...}}``.

The epoch names one life of the stream's state in Redis: it is made with the stream's first event
and made again whenever Redis has lost that state (a restart without persistence, keys expired), so
a sequence that starts again at 1 is told apart from the one before, and whenever another Redis
server process writes the stream than the one that wrote it last (a restart from a snapshot, a
fail-over to a replica: either may hold only part of the writes, its seq gone back), so the seqs it
numbers again are new positions; the seq goes on then. A position is (epoch, seq); epochs are the Redis server's time in microseconds
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
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Final, Literal, NamedTuple, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

SCHEMA_VERSION: Final = 1

# Every field the store keeps is bounded here, so that an event the gateway accepts is one every
# store can hold (issue 11: one event the store refused stopped the recorder for good).
ID_MAX = 250  # dag_id, run_id, task_id: Airflow's own limit
EVENT_ID_MAX = 64
ERROR_MESSAGE_MAX = 2000
ERROR_TYPE_MAX = 250
MSG_MAX = ERROR_MESSAGE_MAX
STATE_MAX = 16  # the store's state columns
RUN_TYPE_MAX = 64  # the store's run_type column
HOST_MAX = 255  # a host name
DATE_MAX = 64  # an ISO 8601 time as text
INT_MAX: Final = 2**31 - 1  # PostgreSQL's INTEGER (SQLite's holds 64 bits): map_index, try_number
SIZE_MAX: Final = 2**53 - 1  # sizes live in JSON only: the largest integer every JSON reader keeps exactly
TS_MIN: Final = -62135596800.0  # 0001-01-01T00:00:00Z: times are held to years 1 to 9999 in UTC,
TS_MAX: Final = 253402300799.0  # 9999-12-31T23:59:59Z  what Python's datetime (so both stores) can hold
# No control characters in ids and names: PostgreSQL cannot hold NUL in text, and the rest would land
# in logs, headers and file names. Free text (messages, results) may hold anything: it is kept as JSON.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"


def _utc_time(text: str) -> str:
    """Time text the store reads (ISO 8601, no zone meaning UTC) must lie in years 1 to 9999 in UTC."""
    value = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    moment = datetime.fromisoformat(value)  # ValueError when it is not ISO 8601
    try:
        moment.astimezone(timezone.utc)  # a naive time is UTC; an offset may push it out of range
    except OverflowError:
        raise ValueError(f"{text!r} is outside years 1 to 9999 in UTC") from None
    return text


# Ids and names: bounded, without control characters.
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX, pattern=NO_CONTROL_CHARACTERS)]
EventId = Annotated[str, StringConstraints(min_length=1, max_length=EVENT_ID_MAX, pattern=NO_CONTROL_CHARACTERS)]
Name = Annotated[str, StringConstraints(max_length=ID_MAX, pattern=NO_CONTROL_CHARACTERS)]
HostName = Annotated[str, StringConstraints(max_length=HOST_MAX, pattern=NO_CONTROL_CHARACTERS)]
RunType = Annotated[str, StringConstraints(max_length=RUN_TYPE_MAX, pattern=NO_CONTROL_CHARACTERS)]
Timestamp = Annotated[float, Field(ge=TS_MIN, le=TS_MAX, allow_inf_nan=False)]  # seconds since the epoch
TimeText = Annotated[str, Field(max_length=DATE_MAX), AfterValidator(_utc_time)]
MapIndex = Annotated[int, Field(ge=-1, le=INT_MAX)]
TryNumber = Annotated[int, Field(ge=0, le=INT_MAX)]
Size = Annotated[int, Field(ge=0, le=SIZE_MAX)]


class EventKind(str, Enum):
    TASK = "task"
    RUN = "run"
    PROGRESS = "progress"  # a task's intermediate output (runbell.listeners.progress): never decides anything


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
    # Human in the loop (Airflow's HITL operators): the task instance waits for a person; the event
    # carries what is asked (input_request). Then the gateway says an answer given through it was
    # accepted by Airflow (input_received), before the task resumes.
    AWAITING_INPUT = "awaiting_input"
    INPUT_RECEIVED = "input_received"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED)


class Source(str, Enum):
    HOOK = "hook"  # the Airflow listener
    EMIT = "emit"  # the publishing API / `runbell emit`
    RECONCILER = "reconciler"  # the gateway, from Airflow's REST API
    GATEWAY = "gateway"  # the gateway's trigger endpoint (a run it queued)


class ErrorInfo(BaseModel):
    type: str = Field(max_length=ERROR_TYPE_MAX)
    message: str = Field(max_length=ERROR_MESSAGE_MAX)

    @classmethod
    def from_exception(cls, error: BaseException | str | None) -> ErrorInfo:
        if error is None:
            return cls(type="unknown", message="")
        if isinstance(error, BaseException):
            return cls(type=truncate(type(error).__name__, ERROR_TYPE_MAX), message=truncate(str(error)))
        return cls(type="error", message=truncate(str(error)))


class ResultRef(BaseModel):
    """Where a result too large for the bus can be read (Airflow's XCom endpoint)."""

    dag_id: Id
    run_id: Id
    task_id: Id
    map_index: MapIndex = -1


class Result(BaseModel):
    """The result task's value, inline, or a reference when it is larger than the cap."""

    value: Any = None
    ref: ResultRef | None = None
    size: Size = 0  # bytes of the JSON-encoded value

    @property
    def is_ref(self) -> bool:
        return self.ref is not None


# What a task waiting for a person asks (Airflow's HITL detail). Each field is bounded, and the whole
# request's JSON too, so that an event holding the largest request still fits the smallest event cap
# (64 KiB): the hook leaves out what is over a bound (truncated: Airflow's hitlDetails has it all).
INPUT_REQUEST_MAX_BYTES = 48 * 1024
SUBJECT_MAX = 500
INPUT_BODY_MAX = 4000
OPTION_MAX = 100
OPTIONS_MAX = 100
PARAMS_MAX_BYTES = 16 * 1024  # the form fields' JSON, compact UTF-8
USERS_MAX = 20
UNNAMED_OPTION = "?"  # the hook's stand-in when none of the options fits a bound: only Airflow's UI can answer
OptionText = Annotated[str, StringConstraints(min_length=1, max_length=OPTION_MAX, pattern=NO_CONTROL_CHARACTERS)]


def json_bytes(value: Any) -> int:
    """Bytes of a value's compact JSON (UTF-8; a lone surrogate counted, not raised)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "surrogatepass"))


def _params_size(params: dict[str, Any]) -> dict[str, Any]:
    size = json_bytes(params)
    if size > PARAMS_MAX_BYTES:
        raise ValueError(f"params are {size} bytes of JSON, over the bound of {PARAMS_MAX_BYTES}")
    return params


class InputKind(str, Enum):
    """Which HITL operator asks: approval (Approve/Reject), branch (options name the branches),
    entry (a form; options default to OK), choice (the plain HITLOperator)."""

    APPROVAL = "approval"
    BRANCH = "branch"
    ENTRY = "entry"
    CHOICE = "choice"


class AssignedUser(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Name
    name: Name = ""


class InputRequest(BaseModel):
    """What a task instance waiting for a person asks (with state awaiting_input)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: InputKind = InputKind.CHOICE
    subject: str = Field(max_length=SUBJECT_MAX)
    body: str | None = Field(default=None, max_length=INPUT_BODY_MAX)
    options: list[OptionText] = Field(min_length=1, max_length=OPTIONS_MAX)
    defaults: list[OptionText] | None = Field(default=None, max_length=OPTIONS_MAX)
    multiple: bool = False
    # Airflow's serialized params: {name: {"value", "schema", "description"}}, the form's fields.
    params: Annotated[dict[str, Any], AfterValidator(_params_size)] = Field(default_factory=dict)
    deadline: TimeText | None = None  # when the defaults are taken (Airflow's timeout); None: never
    assigned_users: list[AssignedUser] = Field(default_factory=list, max_length=USERS_MAX)
    truncated: bool = False  # the hook left out part of it (over a bound): Airflow's hitlDetails has it all

    @model_validator(mode="after")
    def _bounded(self) -> InputRequest:
        size = json_bytes(self.model_dump(mode="json"))
        if size > INPUT_REQUEST_MAX_BYTES:
            raise ValueError(f"the input request is {size} bytes of JSON, over the bound of {INPUT_REQUEST_MAX_BYTES}")
        return self


# Partial output (a task's progress events). One event carries the values a task offered since its
# last one, in order, so that values offered faster than the hook's rate go out together instead of
# being lost; the whole progress fits the smallest event cap (64 KiB) with room for the rest.
PROGRESS_MAX_BYTES = 48 * 1024  # the progress's JSON, compact UTF-8
PROGRESS_ITEMS_MAX = 1000
PROGRESS_KEY_MAX = 64
ProgressKey = Annotated[str, StringConstraints(min_length=1, max_length=PROGRESS_KEY_MAX, pattern=NO_CONTROL_CHARACTERS)]


class ProgressItem(BaseModel):
    """One value a task offered: under a key (a percent, a status line: each value replaces the key's
    last), or without one (a chunk of an answer: each is appended to the ones before)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key: ProgressKey | None = None
    value: Any = None


class Progress(BaseModel):
    """What a task offered since its previous progress event, in the order offered. ``dropped``
    counts the values it offered in between that no event carries: a keyed value replaced by a later
    one of its key before it was sent, or any value refused (over the size bound, or while the
    values waiting to be sent were at the bound)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    items: list[ProgressItem] = Field(min_length=1, max_length=PROGRESS_ITEMS_MAX)
    dropped: Size = 0

    @model_validator(mode="after")
    def _bounded(self) -> Progress:
        size = json_bytes(self.model_dump(mode="json"))
        if size > PROGRESS_MAX_BYTES:
            raise ValueError(f"the progress is {size} bytes of JSON, over the bound of {PROGRESS_MAX_BYTES}")
        return self


# W3C Trace Context (traceparent, tracestate): carried from a trigger through the run's conf into
# the hook's events, so the gateway's spans of an event join the caller's trace.
TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
TRACESTATE_MAX = 512  # W3C: at most 32 members; 512 characters is what propagators keep


class TraceContext(BaseModel):
    """The W3C trace context of the span that published an event (or of the trigger that made its run)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    traceparent: str = Field(pattern=TRACEPARENT_PATTERN)
    tracestate: str | None = Field(default=None, max_length=TRACESTATE_MAX, pattern=NO_CONTROL_CHARACTERS)


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    id: EventId = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: EventKind
    dag_id: Id
    run_id: Id
    state: str = Field(max_length=STATE_MAX)
    ts: Timestamp = Field(default_factory=time.time)
    source: Source = Source.HOOK
    host: HostName | None = None
    # task events
    task_id: Id | None = None
    map_index: MapIndex = -1
    try_number: TryNumber | None = None
    result_task: bool = False  # this task's value is the run's result
    critical: bool = False  # a terminal failure of this task decides the run as failed
    result: Result | None = None
    error: ErrorInfo | None = None
    input_request: InputRequest | None = None  # with state awaiting_input only
    progress: Progress | None = None  # with kind progress only (its state: running)
    trace: TraceContext | None = None  # the publishing span's W3C trace context (runbell.service.core.tracing)
    # run events
    run_type: RunType | None = None
    logical_date: TimeText | None = None
    run_after: TimeText | None = None
    backfill_id: Name | None = None
    msg: str | None = Field(default=None, max_length=MSG_MAX)

    @model_validator(mode="after")
    def _state_fits_kind(self) -> Event:
        if self.kind is EventKind.PROGRESS:
            return self._progress_fits()
        states = TaskState if self.kind is EventKind.TASK else RunState
        try:
            states(self.state)
        except ValueError:
            accepted = ", ".join(s.value for s in states)
            raise ValueError(f"state {self.state!r} is not a {self.kind.value} state ({accepted})") from None
        if self.kind is EventKind.TASK and not self.task_id:
            raise ValueError("a task event needs task_id")
        if self.progress is not None:
            raise ValueError("progress goes only with an event of kind progress")
        asks = self.kind is EventKind.TASK and self.state == TaskState.AWAITING_INPUT.value
        if asks and self.input_request is None:
            raise ValueError("a task event with state awaiting_input needs input_request")
        if not asks and self.input_request is not None:
            raise ValueError("input_request goes only with a task event of state awaiting_input")
        return self

    def _progress_fits(self) -> Event:
        if self.state != TaskState.RUNNING.value:
            raise ValueError(f"a progress event has state {TaskState.RUNNING.value!r} (its task runs), not {self.state!r}")
        if not self.task_id:
            raise ValueError("a progress event needs task_id")
        if self.progress is None:
            raise ValueError("a progress event needs progress")
        if self.input_request is not None or self.result is not None or self.error is not None:
            raise ValueError("a progress event carries progress only (no result, error or input_request)")
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
ALIASES_MAX = 100
AssetText = Annotated[str, StringConstraints(max_length=ASSET_NAME_MAX, pattern=NO_CONTROL_CHARACTERS)]


class AssetInfo(BaseModel):
    """The asset an event is about, as Airflow names it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[AssetText, Field(min_length=1)]
    uri: AssetText | None = None
    group: AssetText | None = None


class AssetEvent(BaseModel):
    """An asset was updated (Airflow's asset event): on the asset's own stream, with its own seq."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    id: EventId = Field(default_factory=lambda: uuid.uuid4().hex)
    kind: Literal["asset"] = ASSET_KIND
    asset: AssetInfo
    extra: dict[str, Any] | None = None  # the event's extra; None (left out on the wire) when larger than the cap
    extra_size: Size = 0  # bytes of the JSON-encoded extra
    extra_truncated: bool = False  # the extra was larger than the cap and is not carried
    # Where Airflow says the event came from (a task's outlet); all None for an event made otherwise
    # (the REST API, or a hook that knew only the asset).
    source_dag_id: Id | None = None
    source_run_id: Id | None = None
    source_task_id: Id | None = None
    source_map_index: MapIndex | None = None
    partition_key: AssetText | None = None
    aliases: list[AssetText] = Field(default_factory=list, max_length=ALIASES_MAX)  # names of the asset aliases it came through
    ts: Timestamp = Field(default_factory=time.time)
    source: Source = Source.HOOK
    host: HostName | None = None

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
    seq: int = Field(ge=1, le=INT_MAX)  # the store's seq column is an INTEGER: a larger one is refused as read
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


def decode_envelope(raw: bytes | str, max_bytes: int | None = None) -> Envelope:
    """Parse and validate one envelope (of at most max_bytes); raise BadEvent saying why it is not one."""
    return _validated(Envelope, _envelope_data(raw, max_bytes))


def decode_asset_envelope(raw: bytes | str, max_bytes: int | None = None) -> AssetEnvelope:
    """Parse and validate one asset envelope (of at most max_bytes); raise BadEvent saying why it is not one."""
    return _validated(AssetEnvelope, _envelope_data(raw, max_bytes))


ENVELOPE_OVERHEAD = 64  # bytes an envelope adds to its event: '{"seq":N,"event":...}'


def _envelope_data(raw: bytes | str, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and len(raw) > max_bytes + ENVELOPE_OVERHEAD:  # no publisher within the cap sent it
        raise BadEvent("size", f"{len(raw)} bytes, over the event cap of {max_bytes}")
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
    # An event that cannot be encoded again (no publisher can have sent it: it encodes before it
    # publishes) would fail later wherever it is encoded: the store, SSE, a 200. Two ways: a value
    # nested deeper than pydantic encodes, or a lone surrogate (json.loads reads "\\ud800").
    try:
        envelope.event.to_json()
    except ValueError as exc:
        reason = "schema" if isinstance(exc.__cause__ or exc.__context__, UnicodeError) or "surrogate" in str(exc) else "depth"
        raise BadEvent(reason, str(exc)[:200]) from None
    return envelope


def parse_event_json(text: str | bytes) -> AnyEvent:
    """A bare event (as spooled, or sent to the publishing API) of either family, by its kind."""
    data = json.loads(text)
    if isinstance(data, dict) and data.get("kind") == ASSET_KIND:
        return AssetEvent.model_validate_json(text)
    return Event.model_validate_json(text)


# -- heartbeats ------------------------------------------------------------------------------------

HEARTBEAT_FIELD: Final = "hb"  # the partition stream entry's field holding a heartbeat (an event's is "env")
HEARTBEAT_MAX_BYTES: Final = 4096  # far above any valid heartbeat: a larger entry is no heartbeat


class Heartbeat(BaseModel):
    """A task attempt still alive at ``ts`` (Metaflow's decorator sends one every few tens of seconds
    while a step runs). Only the recorder reads it, from the run's partition stream: it is no event
    (no seq, no replay log, no live message), and updates only the run's heartbeat time in the store."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    dag_id: Id
    run_id: Id
    task_id: Id | None = None
    map_index: MapIndex = -1
    try_number: TryNumber | None = None
    ts: Timestamp = Field(default_factory=time.time)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


def decode_heartbeat(raw: bytes | str) -> Heartbeat:
    """Parse and validate one heartbeat; raise BadEvent (reason "heartbeat") saying why it is not one."""
    if len(raw) > HEARTBEAT_MAX_BYTES:
        raise BadEvent("heartbeat", f"{len(raw)} bytes, over the heartbeat cap of {HEARTBEAT_MAX_BYTES}")
    try:
        return Heartbeat.model_validate_json(raw)
    except ValidationError as exc:
        raise BadEvent("heartbeat", str(exc.errors(include_url=False)[:3])[:300]) from None


def truncate(text: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
