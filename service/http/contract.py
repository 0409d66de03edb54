"""The bodies the API answers with, as pydantic models: each handler builds its answer through one of
these, and the OpenAPI document (service/http/openapi.py) takes their schemas from them, so what is
documented is what is served.

Times are ISO-8601 in UTC with an explicit offset (``2026-05-01T12:00:00+00:00``), as the API has
always written them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema

from runbell.bus.schema import OPTION_MAX, OPTIONS_MAX, PARAMS_MAX_BYTES, AssetEvent, Event, OptionText, ResultRef, json_bytes
from runbell.service.core import clock
from runbell.service.core.outcome import UNKNOWN_RUN_STATE, Failure, InputNeeded, Outcome, OutcomeStatus, ResultTask, respond_path
from runbell.service.store.dead_letters import PAGE_BYTES_MAX, RAW_MAX_BYTES, DeadLetter
from runbell.service.store.store import RUN_STATES
from runbell.service.webhooks.outbox import Attempt, Endpoint, Message, MessageStatus, WebhookKind

UtcTime = Annotated[
    datetime,
    PlainSerializer(clock.iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
RunStateName = Annotated[str, WithJsonSchema({"type": "string", "enum": list(RUN_STATES)})]  # RunState, or unknown


# -- a run's outcome --------------------------------------------------------------------------------


class RunOutcome(Outcome):
    """200 of GET .../result: the decided outcome. A result published as a reference (too large for
    the bus) is read from Airflow: `result` is then the value and `result_ref` where it came from, or
    `result_error` says why it could not be read."""

    run_state: RunStateName = UNKNOWN_RUN_STATE  # Outcome's str, documented with its values
    result_ref: ResultRef | list[ResultRef] | None = Field(
        default=None,
        description="only when the result was read from Airflow (?resolve=true); of a mapped result task, those of its values that were read",
    )
    result_error: str | None = Field(default=None, description="only when the referenced result could not be read")

    def body(self) -> dict[str, Any]:
        # The optional fields appear only when given: the rest is every field of the Outcome.
        return self.model_dump(mode="json", exclude_unset=True)


class NeedsInput(InputNeeded):
    """An open input request (a task of Airflow's human-in-the-loop operators waits for a person),
    with where to answer it."""

    respond: str = Field(description="the path to POST the answer to (role respond): .../tasks/{task_id}/input[?map_index=N]")

    @classmethod
    def of(cls, dag_id: str, run_id: str, request: InputNeeded) -> NeedsInput:
        return cls(**request.model_dump(), respond=respond_path(dag_id, run_id, request.task_id, request.map_index))


class RunPending(BaseModel):
    """202: not decided yet; `needs_input` when a task asks a person something the caller has not
    been told of (asked after its `after`)."""

    status: Literal["pending", "needs_input"] = "pending"
    dag_id: str
    run_id: str
    run_state: RunStateName
    epoch: str = Field(default="", description="the epoch of seq (see Epochs in the README)")
    seq: int = Field(description="the last sequence number applied")
    needs_input: list[NeedsInput] = Field(
        default_factory=list, description="the run's newest open input requests (at most 20), oldest first (absent: none)"
    )
    after: str | None = Field(
        default=None,
        description="the newest open request's position (null: none is open): pass it as after= to keep waiting past it",
    )

    @classmethod
    def of(cls, outcome: Outcome, *, asking: bool = False) -> RunPending:
        requests = [NeedsInput.of(outcome.dag_id, outcome.run_id, r) for r in outcome.needs_input]
        return cls(
            status="needs_input" if asking else "pending",
            dag_id=outcome.dag_id,
            run_id=outcome.run_id,
            run_state=outcome.run_state,
            epoch=outcome.epoch,
            seq=outcome.seq,
            needs_input=requests,
            after=requests[-1].position if requests else None,
        )

    def body(self) -> dict[str, Any]:
        """The answer: without needs_input and after while no request is open (the pending body as before)."""
        return self.model_dump(mode="json", exclude=None if self.needs_input else {"needs_input", "after"})


class CreatedCallback(BaseModel):
    """The trigger's `callback`, registered: a webhook endpoint bound to the run."""

    id: str = Field(description="the endpoint's id: its deliveries are in GET /v1/webhooks/{id}/messages (role admin)")
    secret: str = Field(description="whsec_...: verifies the deliveries' signatures (Standard Webhooks); shown only here")
    kinds: list[WebhookKind]
    expires_at: UtcTime = Field(description="no new message after this (RUNBELL_CALLBACK_TTL); deliveries already due keep their retries")

    @classmethod
    def of(cls, endpoint: Endpoint) -> CreatedCallback:
        return cls.model_validate(endpoint, from_attributes=True)


class RunToken(BaseModel):
    token: str = Field(description="a token scoped to this run: it may read the run's result and events")
    token_expires_at: UtcTime
    callback: CreatedCallback | None = Field(
        default=None, description="the callback registered by this call (absent without one, and on a retry with the same Idempotency-Key)"
    )


class TriggeredOutcome(RunOutcome, RunToken):
    """200 of POST /v1/dags/{dag_id}/runs: decided within the wait."""


class TriggeredPending(RunPending, RunToken):
    """202 of POST /v1/dags/{dag_id}/runs: triggered, still pending."""


class RunEventBody(Event):
    """A run's event as SSE sends it (events task, run, progress), as a long-poll of progress answers
    it and as a webhook's data carries it: the bus Event with its position."""

    epoch: str = Field(description="the epoch of seq (see Epochs in the README)")
    seq: int = Field(description="its sequence number in the run's stream: the SSE id is EPOCH-SEQ")


class StreamError(BaseModel):
    """The data of an SSE `error` event: the stream ends; reconnect (with Last-Event-ID) unless the run is not found."""

    error: Literal["slow_consumer", "run_not_found"]
    message: str


class StreamShutdown(BaseModel):
    """The data of an SSE `shutdown` event: the gateway is restarting; reconnect with Last-Event-ID."""

    reason: Literal["shutdown"] = "shutdown"
    message: str


class RunEnd(BaseModel):
    """The data of the SSE `end` event."""

    run_state: RunStateName
    status: OutcomeStatus
    epoch: str = ""
    seq: int


class InputClosed(BaseModel):
    """The data of the SSE `input_received` event: an open request is no longer open."""

    task_id: str
    map_index: int
    try_number: int | None
    position: str = Field(description="the request's position (as its needs_input event's id)")
    closed_by: str = Field(
        description="the state of the event that closed it: input_received (answered through the gateway), "
        "running (the task resumed: answered in Airflow, or its deadline's defaults taken), another task state, "
        "or the run's end"
    )

    @classmethod
    def of(cls, request: InputNeeded, closed_by: str) -> InputClosed:
        fields = request.model_dump(include={"task_id", "map_index", "try_number", "position"})
        return cls(**fields, closed_by=closed_by)


# -- answering a task that waits for a person -------------------------------------------------------


def _params_input_size(params: dict[str, Any]) -> dict[str, Any]:
    if (size := json_bytes(params)) > PARAMS_MAX_BYTES:
        raise ValueError(f"params_input is {size} bytes of JSON, over the bound of {PARAMS_MAX_BYTES}")
    return params


class InputAnswer(BaseModel):
    """POST /v1/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/input."""

    model_config = ConfigDict(extra="forbid")

    chosen_options: list[OptionText] | None = Field(
        default=None,
        min_length=1,
        max_length=OPTIONS_MAX,
        description=f"the options chosen (each at most {OPTION_MAX} characters): one of the request's, or several when it "
        "says multiple; may be left out when the request offers a single option (HITLEntryOperator's OK)",
    )
    params_input: Annotated[dict[str, Any], AfterValidator(_params_input_size)] = Field(
        default_factory=dict, description="the form's values by param name (the request's params)"
    )


class InputAccepted(BaseModel):
    """200 of POST .../tasks/{task_id}/input: Airflow took the answer; the task resumes."""

    status: Literal["accepted"] = "accepted"
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    chosen_options: list[str]
    params_input: dict[str, Any]
    responded_at: str | None = Field(description="when Airflow recorded the answer (ISO-8601)")


# -- publishing ---------------------------------------------------------------------------------------


class Published(BaseModel):
    id: str = Field(description="the event's id")
    seq: int = Field(description="its sequence number in the run")


class Spooled(BaseModel):
    id: str
    spooled: Literal[True] = Field(default=True, description="Redis was unreachable: the event is spooled and published later")


# -- recorded runs ------------------------------------------------------------------------------------


class RunRow(BaseModel):
    dag_id: str
    run_id: str
    state: RunStateName = Field(
        description="the run's state from its events; a terminal run event is final, a try being retried reads as running"
    )
    logical_date: UtcTime | None = Field(description="null for runs without one")
    run_after: UtcTime = Field(description="the listing's order")
    run_type: str | None
    backfill_id: str | None
    started: UtcTime | None
    ended: UtcTime | None
    outcome: OutcomeStatus
    result_task: ResultTask | None = Field(description="as in the Outcome")
    first_failure: Failure | None = Field(description="as the Outcome's failure")
    stale: bool = Field(description="running, but no event for longer than RUNBELL_STALE_AFTER")


class RunsPage(BaseModel):
    runs: list[RunRow]
    next_cursor: str | None = Field(description="null on the last page")


class TaskInstanceRow(BaseModel):
    task_id: str
    map_index: int
    try_number: int
    state: str
    started: UtcTime | None
    ended: UtcTime | None


class ProgressValue(BaseModel):
    """A run's latest progress value of one key, as the store keeps it."""

    key: str | None = Field(description="the key the task gave (null: no key, the value is the last chunk it sent)")
    value: Any
    task_id: str
    map_index: int = -1
    try_number: int | None = None
    position: str = Field(description="the progress event's position (EPOCH-SEQ)")
    at: UtcTime


class RunDetail(RunRow):
    task_instances: list[TaskInstanceRow] = Field(description="one per try: by start, then task_id, map_index, try_number")
    progress: list[ProgressValue] = Field(
        default_factory=list, description="the latest progress value of each key, oldest first (every value: the events stream)"
    )


class ProgressPage(BaseModel):
    """GET .../progress: the run's progress events after `after`."""

    dag_id: str
    run_id: str
    events: list[dict[str, Any]] = Field(
        description="progress events after `after`, oldest first, at most 100, each as the SSE `progress` event's data"
    )
    after: str = Field(description="where this answer leaves off: pass it as after= to ask for the next")
    ended: bool = Field(description="the run has ended: after these, no progress will come")


# -- backfills ----------------------------------------------------------------------------------------


class BackfillSlot(BaseModel):
    sort_ordinal: int
    logical_date: UtcTime | None
    run_id: str | None = Field(description="null: Airflow made no run for this slot")
    state: RunStateName | None = Field(description="the run's state in the gateway's store, else Airflow's; null without a run")
    exception_reason: str | None = Field(description="why Airflow skipped the slot: already exists, in flight, unknown")


class BackfillSlots(BaseModel):
    backfill_id: str
    dag_id: str
    total_entries: int
    slots: list[BackfillSlot]


class BackfillProgress(BaseModel):
    """The data of the backfill stream's `progress` and `end` events."""

    done: int = Field(description="runs succeeded")
    failed: int
    running: int
    skipped: int = Field(description="slots without a run")
    total: int = Field(description="slots")


# -- assets -------------------------------------------------------------------------------------------


class AssetReady(BaseModel):
    """The data of the asset stream's first event, `ready`: where it starts (its id too)."""

    asset: str
    seq: int


class AssetEventBody(AssetEvent):
    """An asset event with the asset's sequence number, as long-poll answers it and SSE sends it."""

    seq: int = Field(ge=1, description="the asset's sequence number (gap-free, its own)")


class AssetPending(BaseModel):
    status: Literal["pending"] = "pending"
    asset: str
    seq: int | None = Field(description="the asset's current seq, to pass as after (null: Redis unreadable and no after given)")


# -- webhooks -----------------------------------------------------------------------------------------


class WebhookEndpoint(BaseModel):
    """An endpoint as the API shows it: never its secrets."""

    id: str
    url: str
    description: str
    dag_ids: list[str] | None = Field(description="only these DAGs; null: every DAG")
    kinds: list[WebhookKind]
    enabled: bool
    previous_secret_expires_at: UtcTime | None = Field(description="until then the secret before the last rotation signs too")
    created_at: UtcTime
    updated_at: UtcTime
    disabled_reason: str | None = Field(description="why the gateway disabled it (410, failing for days)")
    failing_since: UtcTime | None
    run_id: str | None = Field(default=None, description="a trigger's callback: only this run's events (null: a subscription)")
    expires_at: UtcTime | None = Field(default=None, description="a callback takes no new message after this")

    @classmethod
    def of(cls, endpoint: Endpoint) -> WebhookEndpoint:
        return cls.model_validate(endpoint, from_attributes=True)


class CreatedWebhook(WebhookEndpoint):
    """The answer that creates an endpoint: the only one that shows its secret."""

    secret: str = Field(description="whsec_...: sign-verification secret, shown only here (and by a rotation)")


class WebhookAttempt(BaseModel):
    id: int
    message_id: str
    endpoint_id: str
    attempted_at: UtcTime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str | None = Field(description="the start of the receiver's answer")

    @classmethod
    def of(cls, attempt: Attempt) -> WebhookAttempt:
        return cls.model_validate(attempt, from_attributes=True)


class WebhookMessage(BaseModel):
    id: str = Field(description="the webhook-id header, the same on every attempt and resend")
    endpoint_id: str
    dag_id: str
    run_id: str
    seq: int
    kind: WebhookKind
    terminal: bool
    payload: Any = Field(description="the body delivered (see the webhooks section), parsed")
    status: MessageStatus
    attempts: int
    next_attempt_at: UtcTime | None
    created_at: UtcTime
    delivered_at: UtcTime | None

    @classmethod
    def of(cls, message: Message) -> WebhookMessage:
        # The payload is stored as the exact text delivered; the API shows it parsed.
        return cls.model_validate({**dataclasses.asdict(message), "payload": _parsed(message.payload)})


class WebhookMessageWithAttempts(WebhookMessage):
    """GET /v1/webhooks/messages/{message_id}: the message with its latest attempts."""

    attempt_log: list[WebhookAttempt] = Field(description="newest first")


def _parsed(payload: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload


class WebhookList(BaseModel):
    webhooks: list[WebhookEndpoint]


class AttemptList(BaseModel):
    attempts: list[WebhookAttempt]


class MessageList(BaseModel):
    messages: list[WebhookMessage]


class RotatedSecret(BaseModel):
    id: str
    secret: str = Field(description="the new secret")
    previous_secret_expires_at: UtcTime | None = Field(description="until then the old secret signs too")
    grace_seconds: float


class Recovered(BaseModel):
    requeued: int = Field(description="how many messages were queued again")


# -- dead letters (the recorder's) --------------------------------------------------------------------


class DeadLetterView(BaseModel):
    """A stream entry set aside so that recording went on: an event the store refused on its own
    (reason "store"), or an entry that is no event (the bus schema's reason; its bytes are kept)."""

    id: int
    reason: str = Field(
        description='"store": a valid event the store refused; else why the entry is no event: '
        "json, shape, version, schema, depth, size (over the readers' ceiling), field (no 'env' field)"
    )
    event_id: str | None = Field(description="null: the entry is no event")
    stream_id: str | None = Field(description="the entry's id on the global stream; null: read from the run's replay log")
    dag_id: str | None = Field(description="null: the entry is no event")
    run_id: str | None = Field(description="null: the entry is no event")
    seq: int | None
    envelope: Any = Field(
        description="the entry as it came off the bus, parsed ({seq, event}); of an entry that is no event, "
        "its JSON, or its text (UTF-8, other bytes replaced) when it is not JSON"
    )
    raw_base64: str | None = Field(description="an entry that is no event: the bytes kept, exactly (null for reason store)")
    raw_size: int | None = Field(description="an entry that is no event: its size in bytes")
    raw_truncated: bool = Field(
        description="only the first bytes were kept: the entry was larger than RUNBELL_DEAD_LETTER_RAW_MAX_BYTES "
        f"(default {RAW_MAX_BYTES}); raw_size is its size"
    )
    error: str = Field(description="why it was refused, the last time it was tried")
    attempts: int = Field(description="how many times it was tried (the first, re-deliveries and re-drives)")
    dead_lettered_at: UtcTime
    last_attempt_at: UtcTime

    @classmethod
    def of(cls, letter: DeadLetter) -> DeadLetterView:
        fields = {**dataclasses.asdict(letter), "raw_truncated": letter.raw_truncated}
        raw = fields.pop("raw")
        if raw is None:
            return cls.model_validate({**fields, "envelope": _shown(letter.payload.encode()), "raw_base64": None})
        return cls.model_validate({**fields, "envelope": _shown(raw), "raw_base64": base64.b64encode(raw).decode()})


SHOWN_DEPTH_MAX = 200  # pydantic answers at most ~250 levels, the answer's own (a few) included


def _shown(raw: bytes) -> Any:
    """A dead letter's entry, for a person: its JSON if that can be answered again as JSON (not too
    deep, no lone surrogate), else its text (an entry that is no event: raw_base64 has it exactly)."""
    text = raw.decode("utf-8", "replace")
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return text
    return value if _depth(value) <= SHOWN_DEPTH_MAX else text


def _depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, (list, dict)):
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterView] = Field(
        description=f"oldest first: at most limit, and at most {PAGE_BYTES_MAX} bytes of entries (one at least), so a page may be shorter than limit"
    )
    next_after: int | None = Field(description="pass as after for the next page; null: this was the last page")


class Redriven(BaseModel):
    id: int
    recorded: bool = Field(description="true: recorded now and removed from the dead letters")
    dead_letter: DeadLetterView | None = Field(description="when not recorded: the dead letter with the new error")


class RedrivenAll(BaseModel):
    recorded: int = Field(description="recorded now and removed")
    failed: int = Field(description="refused again: still dead-lettered, with the new error")
    remaining: int = Field(description="dead letters left (those refused again, and any past this call's limit)")
    next_after: int | None = Field(description="pass as after to re-drive the next ones; null: none are left past these")
