"""The OpenAPI document, generated from the app's route table and the pydantic models the code uses.

What is written here by hand is what no model holds: one Operation per route name (its summary, role,
parameters with bounds taken from the code's constants, request model and answers by status). The
schemas come from the models: request bodies (the trigger body, the webhook bodies, the Event) and
answer bodies (service/http/contract.py, the Outcome, the error body). `build_openapi` walks the
routes and fails loudly when a route has no operation, an operation names no route, or a route's path
parameters differ from its operation's.

The document is also committed as service/http/openapi.json (installed with the package):
`python -m runbell.service.http.openapi --write` writes it, `--check` exits 1 when it differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from runbell.bus.schema import ASSET_NAME_MAX, ID_MAX, INT_MAX, Event, RunState, TaskState
from runbell.service.core.roles import Role
from runbell.service.http import backfills, dead_letters, runs, webhooks
from runbell.service.http.assets import AFTER_PARAM
from runbell.service.http.auth import QUERY_TOKEN_PARAM
from runbell.service.http.body_limit import BODY_TOO_LARGE
from runbell.service.http.contract import (
    AssetEventBody,
    AssetPending,
    AttemptList,
    BackfillProgress,
    BackfillSlots,
    CreatedWebhook,
    DeadLetterList,
    InputAccepted,
    InputAnswer,
    InputClosed,
    MessageList,
    NeedsInput,
    ProgressPage,
    Published,
    Recovered,
    Redriven,
    RedrivenAll,
    RotatedSecret,
    RunDetail,
    RunEnd,
    RunOutcome,
    RunPending,
    RunsPage,
    Spooled,
    TriggeredOutcome,
    TriggeredPending,
    WebhookEndpoint,
    WebhookList,
    WebhookMessage,
    WebhookMessageWithAttempts,
)
from runbell.service.http.errors import ErrorBody
from runbell.service.http.idempotency import MAX_KEY_LENGTH
from runbell.service.http.params import BAD_BODY_STATUS, INT_DIGITS_MAX, LAST_EVENT_ID_PARAM
from runbell.service.http.run_routes import AFTER_PARAM as RUN_AFTER_PARAM
from runbell.service.http.run_routes import RESOLVE_PARAM
from runbell.service.http.trigger import TriggerRequest
from runbell.service.settings import Settings
from runbell.service.store.store import RUN_STATES
from runbell.service.webhooks.outbox import PAYLOAD_TYPES
from runbell.service.webhooks.rules import EndpointCreate, EndpointUpdate, Recovery, Rotation

DOCUMENT = Path(__file__).with_name("openapi.json")
COMMAND = "python -m runbell.service.http.openapi --write"
SCHEMAS = "#/components/schemas/{model}"

LONG_POLL_MAX = Settings.model_fields["long_poll_max"].default
LONG_POLL_DEFAULT = Settings.model_fields["long_poll_default"].default
ATTEMPT_TIMEOUT = Settings.model_fields["webhook_attempt_timeout"].default


# -- the table's vocabulary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str = ""
    required: bool = False  # path parameters are always required
    explode: bool | None = None

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "schema": self.schema,
        }
        if self.explode is not None:
            out["explode"] = self.explode
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Answer:
    description: str
    body: type[BaseModel] | None = None  # a JSON body of this model
    stream: bool = False  # text/event-stream
    media: str | None = None  # another media type, its body a string
    headers: dict[str, str] = field(default_factory=dict)  # name: description (a string, but see HEADER_SCHEMAS)


def failure(description: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(description, ErrorBody, headers=headers or {})


SSE_EVENT = {
    "type": "object",
    "description": "one Server-Sent Event; its data is JSON (see the operation)",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
HEADER_SCHEMAS = {"Retry-After": {"type": "integer", "minimum": 0}}  # answer headers that are not plain strings


@dataclass(frozen=True)
class Operation:
    summary: str
    role: Role | None  # None: open to anyone
    answers: dict[int, Answer]
    description: str = ""
    parameters: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True


# -- parameters, their bounds from the code -------------------------------------------------------


# An id: no '/' (a %2F in a path is a 400 bad_path) and no control character (a 400 bad_<name>).
NO_CONTROL = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
ID_PATTERN = "^[^/\\x00-\\x1f\\x7f-\\x9f]*$"
ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": ID_MAX, "pattern": ID_PATTERN}


def path_id(name: str, description: str = "") -> Param:
    return Param(name, "path", ID_SCHEMA, description)


DAG_ID, RUN_ID = path_id("dag_id"), path_id("run_id")
RUN = (DAG_ID, RUN_ID)
QUERY_TOKEN = Param(QUERY_TOKEN_PARAM, "query", {"type": "string"}, "The bearer token, for clients that cannot send headers (EventSource).")
TIMEOUT = Param(
    "timeout",
    "query",
    {"type": "number", "minimum": 0, "maximum": LONG_POLL_MAX, "default": LONG_POLL_DEFAULT},
    "seconds to wait (the bounds are RUNBELL_LONG_POLL_MAX and RUNBELL_LONG_POLL_DEFAULT)",
)
RESOLVE = Param(
    RESOLVE_PARAM,
    "query",
    {"type": "boolean", "default": False},
    "true: a result published as a reference (result_task.is_ref, larger than RUNBELL_RESULT_MAX_BYTES) is read from "
    "Airflow's XCom: result is then the value and result_ref where it came from, or result_error says why it could not be",
)


def or_empty(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter that, given empty (?limit=), means not given."""
    return {"anyOf": [schema, {"type": "string", "maxLength": 0}], "description": "empty: as if not given"}


SEQ = {"type": "integer", "minimum": 0, "maximum": 10**INT_DIGITS_MAX - 1}  # a sequence number: at most 18 ASCII digits
LAST_EVENT_ID = (
    Param(LAST_EVENT_ID_PARAM, "query", or_empty(SEQ), "as the Last-Event-ID header, for a first connection"),
    Param("Last-Event-ID", "header", SEQ, "the last id received: resume after it"),
)
ENDPOINT_ID, MESSAGE_ID = path_id("endpoint_id"), path_id("message_id")
WEBHOOK_LIMIT = Param(
    "limit", "query", or_empty({"type": "integer", "minimum": 1, "maximum": webhooks.MAX_LIMIT, "default": webhooks.DEFAULT_LIMIT})
)
DEAD_LETTER_PAGE = (
    Param(
        "after",
        "query",
        or_empty({"type": "integer", "minimum": 0, "maximum": dead_letters.MAX_ID}),
        "a dead letter's id: those after it (next_after of the previous call)",
    ),
    Param(
        "limit",
        "query",
        or_empty({"type": "integer", "minimum": 1, "maximum": dead_letters.MAX_LIMIT, "default": dead_letters.DEFAULT_LIMIT}),
    ),
)
ASSET_NAME = Param(
    "name",
    "path",
    {"type": "string", "minLength": 1, "maxLength": ASSET_NAME_MAX, "pattern": NO_CONTROL},
    "The asset's name. It may hold '/' and ':' (e.g. s3://bucket/key), sent as is or percent-encoded as one "
    "segment; '?', '#', '%' and spaces must be percent-encoded.",
)
BACKFILL_ID = Param("backfill_id", "path", {"type": "string", "pattern": ID_PATTERN}, "Airflow's backfill id")
RUNS_FILTERS = (
    Param(
        "run_type",
        "query",
        {"type": "array", "items": {"type": "string", "enum": list(runs.RUN_TYPES)}},
        "any of these; repeat the parameter or separate with commas",
        explode=True,
    ),
    Param("backfill_id", "query", {**ID_SCHEMA, "minLength": 0}),
    Param("run_after_gte", "query", {"type": "string", "format": "date-time"}, "ISO-8601; naive means UTC"),
    Param("run_after_lte", "query", {"type": "string", "format": "date-time"}),
    Param(
        "status",
        "query",
        {"type": "array", "items": {"type": "string", "enum": list(RUN_STATES)}},
        "the run's state, any of these: status=running&status=failed and status=running,failed both mean running OR "
        "failed; another value is a 400 listing the accepted ones",
        explode=True,
    ),
    Param(
        "order",
        "query",
        {"type": "string", "enum": list(runs.ORDERS), "default": runs.ORDERS[0]},
        "by run_after (ties: dag_id, run_id); desc is newest first",
    ),
    Param("limit", "query", or_empty({"type": "integer", "minimum": 1, "maximum": runs.MAX_LIMIT, "default": runs.DEFAULT_LIMIT})),
    Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page, with the same filters and order"),
)

# -- answers said more than once ----------------------------------------------------------------------

BUSY = {503: failure("Subscriber cap reached or shutting down", {"Retry-After": "seconds"})}
UNKNOWN_ENDPOINT = {404: failure("No such webhook endpoint")}
STORE_DOWN = {503: failure("The store cannot be reached (nothing was changed)", {"Retry-After": "seconds"})}
UNKNOWN_MESSAGE = {404: failure("No such webhook message")}
TARGET_REFUSED = {
    422: failure(
        "A malformed body (the URL's shape, kinds, DAG ids: accepted lists the problems), or the target refused: "
        "it resolves to a private, loopback or link-local address (error target_refused; the message names it, "
        "RUNBELL_WEBHOOK_ALLOWED_HOSTS can permit it)"
    )
}
NO_AIRFLOW_DATABASE = {503: failure("RUNBELL_AIRFLOW_DATABASE_URL is not set, or Airflow's database is unreadable")}
EVENT_STREAM = "An event stream"
RUNS_LIST = Operation(
    "Runs the gateway has recorded, filtered in the database, newest first, paged by cursor",
    Role.READ,
    {
        200: Answer("A page of runs", RunsPage, headers={"Link": '<url>; rel="next" when there is a next page'}),
        400: failure("Unknown status or run_type (accepted listed), bad time, order, limit or cursor"),
    },
    "Keyset pages on (run_after, dag_id, run_id): stable while new runs arrive (no row twice, none skipped). "
    "The cursor is opaque and signed; a malformed, altered or foreign one is a 400. A token limited to some DAGs "
    "gets their runs only (a DAG named by the path or ?dag_id= must be one of them).",
)

# -- the operations, by route name ------------------------------------------------------------------

OPERATIONS: dict[str, Operation] = {
    "trigger_run": Operation(
        "Trigger a run through Airflow and wait for its outcome",
        Role.TRIGGER,
        {
            200: Answer("Decided within the wait: the outcome, with a token scoped to this run", TriggeredOutcome),
            202: Answer(
                "Triggered, still pending; or status needs_input: a task waits for a person (go on with the result endpoint and after=)",
                TriggeredPending,
                headers={"Location": "the result endpoint of the run"},
            ),
            400: failure("Bad wait, resolve or Idempotency-Key"),
            404: failure("Unknown DAG"),
            409: failure("DAG paused, run id taken, or the same Idempotency-Key still triggering"),
            422: failure("A malformed body (accepted lists the problems), or an Idempotency-Key reused with another body"),
            502: failure("Airflow answered with an error"),
            503: failure("Airflow unreachable or not configured"),
        },
        "Triggers the run (the gateway names it unless run_id is given), then waits like the result endpoint. 200 "
        "with the outcome if it lands within the wait, else 202 with Location. Both carry a token scoped to this run "
        "(read its result and events). Triggering and ?unpause=true need the trigger role, on this DAG.",
        (
            DAG_ID,
            Param("wait", "query", {"type": "number", "minimum": 0, "maximum": LONG_POLL_MAX}, "seconds to wait for the outcome"),
            Param(
                "Prefer",
                "header",
                {"type": "string"},
                f"RFC 7240 wait=SECONDS (capped at {LONG_POLL_MAX:g}), when ?wait is not given",
            ),
            Param("Idempotency-Key", "header", {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH}),
            Param("unpause", "query", {"type": "boolean"}, "unpause a paused DAG instead of answering 409"),
            RESOLVE,
        ),
        body=TriggerRequest,
        body_required=False,
    ),
    "list_runs": Operation(
        RUNS_LIST.summary,
        RUNS_LIST.role,
        RUNS_LIST.answers,
        RUNS_LIST.description,
        (Param("dag_id", "query", {**ID_SCHEMA, "minLength": 0}), *RUNS_FILTERS),
    ),
    "list_dag_runs": Operation(RUNS_LIST.summary, RUNS_LIST.role, RUNS_LIST.answers, RUNS_LIST.description, (DAG_ID, *RUNS_FILTERS)),
    "get_run": Operation(
        "One recorded run with its task instances (one per try)",
        Role.READ,
        {200: Answer("The run", RunDetail), 400: failure("Bad id"), 404: failure("The gateway has no record of this run")},
        "Task instances by start, then task_id, map_index, try_number.",
        RUN,
    ),
    "backfill_runs": Operation(
        "The backfill's slots in sort_ordinal order, each with its run's state or Airflow's reason for skipping it",
        Role.READ,
        {
            200: Answer("A page of slots", BackfillSlots),
            400: failure("Bad limit or offset"),
            404: failure("Airflow has no such backfill"),
            **NO_AIRFLOW_DATABASE,
        },
        "Read from Airflow's metadata database (read only): its REST API does not list a backfill's slots.",
        (
            BACKFILL_ID,
            Param(
                "limit",
                "query",
                or_empty({"type": "integer", "minimum": 1, "maximum": backfills.MAX_LIMIT, "default": backfills.DEFAULT_LIMIT}),
            ),
            Param("offset", "query", or_empty({"type": "integer", "minimum": 0, "maximum": backfills.MAX_OFFSET, "default": 0})),
        ),
    ),
    "backfill_events": Operation(
        "The backfill's progress as Server-Sent Events",
        Role.READ,
        {
            200: Answer(EVENT_STREAM, stream=True),
            204: Answer("The stream already ended for this client"),
            404: failure("Airflow has no such backfill"),
            **BUSY,
            **NO_AIRFLOW_DATABASE,
        },
        "event: progress (data: a BackfillProgress) first and after every change; event: slot (data: the slot as "
        "listed) when a slot's state changes; event: end (id: end, data: the BackfillProgress) once every slot is "
        "terminal, then the stream closes (a reconnect with Last-Event-ID: end gets 204). error or shutdown mean "
        "reconnect.",
        (
            BACKFILL_ID,
            Param("Last-Event-ID", "header", {"type": "string"}, f"{backfills.END_ID}: the stream ended for this client"),
            QUERY_TOKEN,
        ),
    ),
    "run_result": Operation(
        "Long-poll the run's outcome",
        Role.READ,
        {
            200: Answer("Decided", RunOutcome),
            202: Answer(
                "status needs_input: a task waits for a person (asked after `after`): answer it, and call again with "
                "after= the answer's after to keep waiting; status pending: still pending at the timeout, ask again",
                RunPending,
                headers={"Retry-After": "seconds"},
            ),
            400: failure("Bad timeout, resolve, after or id"),
            404: failure("Airflow has no such run"),
            **BUSY,
        },
        "Answers 200 the moment the result task succeeds or a critical task fails; 202 needs_input at once while the "
        "run is undecided and a task asks a person something asked after `after` (without after: any open request); "
        "else 202 pending at the timeout. A run not seen yet is waited for. A run-scoped token of this run is accepted.",
        (
            *RUN,
            TIMEOUT,
            RESOLVE,
            Param(
                RUN_AFTER_PARAM,
                "query",
                {"type": "string", "pattern": "^([0-9a-z]+-)?[0-9]{1,18}$"},
                "a position (EPOCH-SEQ), the after of a needs_input answer: requests asked up to there are known to the caller",
            ),
            QUERY_TOKEN,
        ),
    ),
    "answer_input": Operation(
        "Answer a task that waits for a person (Airflow's human-in-the-loop operators)",
        Role.RESPOND,
        {
            200: Answer("Airflow took the answer: the task resumes", InputAccepted),
            400: failure(
                "Bad map_index or id; options not among the request's, or several for a single choice (bad_options, accepted "
                "lists them); params_input not the request's params (bad_params_input); Airflow refused it (answer_refused)"
            ),
            403: failure("Also: the gateway's Airflow user is not among the request's assigned users (not_a_respondent)"),
            404: failure(
                "No open request of this task instance (no_open_request): Airflow has none, or the gateway knows none "
                "and chosen_options was left out"
            ),
            409: failure("Already answered (already_answered)"),
            502: failure("Airflow answered with an error, or refused the gateway's Airflow identity"),
            503: failure("Airflow unreachable or not configured", {"Retry-After": "seconds"}),
        },
        "Passed to Airflow's PATCH .../taskInstances/{task_id}/{map_index}/hitlDetails with the gateway's own Airflow "
        "identity, which needs the DAG-level permission to edit HITL details. When the gateway knows the open request "
        "(from the run's events) the options are checked first; it then publishes input_received, so waiters hear at once.",
        (
            *RUN,
            path_id("task_id"),
            Param(
                "map_index", "query", or_empty({"type": "integer", "minimum": -1, "maximum": INT_MAX, "default": -1}), "of a mapped task"
            ),
        ),
        body=InputAnswer,
    ),
    "run_events": Operation(
        "The run's events as Server-Sent Events",
        Role.READ,
        {
            200: Answer(EVENT_STREAM, stream=True),
            204: Answer("The stream already ended for this Last-Event-ID: stop reconnecting"),
            400: failure("Bad Last-Event-ID or id"),
            404: failure("Airflow has no such run"),
            **BUSY,
        },
        "id: is the run's sequence number; event: task, run or progress (data: the Event with its seq; a progress event "
        "carries a task's partial output and decides nothing), needs_input (data: a "
        "NeedsInput: a task waits for a person), input_received (data: an InputClosed: that request is closed), outcome "
        "(data: the Outcome), end (data: a RunEnd; then the stream closes), error or shutdown (reconnect). Resume with the "
        "Last-Event-ID header or ?last_event_id=. A run-scoped token of this run is accepted.",
        (*RUN, *LAST_EVENT_ID, QUERY_TOKEN),
    ),
    "run_progress": Operation(
        "The run's progress events (a task's partial output), by long-poll",
        Role.READ,
        {
            200: Answer("Progress events after `after` (at most 100), or none and ended: the run has ended", ProgressPage),
            202: Answer("None came within the timeout: ask again with the same after", ProgressPage, headers={"Retry-After": "seconds"}),
            400: failure("Bad after, timeout or id"),
            404: failure("Airflow has no such run"),
            **BUSY,
        },
        "Answers at once with the progress events the run's replay log holds after `after` (default: from its start), else "
        "the moment one is published. Pass the answer's after= to ask for the next. Progress never decides the run: "
        "GET .../result waits for the outcome. A run-scoped token of this run is accepted.",
        (
            *RUN,
            TIMEOUT,
            Param(
                RUN_AFTER_PARAM,
                "query",
                {"type": "string", "pattern": "^([0-9a-z]+-)?[0-9]{1,18}$"},
                "a position (EPOCH-SEQ): the after of the previous answer",
            ),
            QUERY_TOKEN,
        ),
    ),
    "publish_event": Operation(
        "Publish one event, as the Airflow hook or `runbell emit` would",
        Role.PUBLISH,
        {
            201: Answer("Published", Published),
            202: Answer("Redis unreachable: durably spooled (fsynced), published later", Spooled),
            413: failure(
                "The body is larger than RUNBELL_EVENT_MAX_BYTES (body_too_large), so is the event (event_too_large), "
                "or its result is larger than RUNBELL_RESULT_MAX_BYTES (result_too_large: publish a reference instead); "
                "accepted.max_bytes is the limit"
            ),
            422: failure("Not a valid event (error bad_event; accepted lists the problems)"),
            503: failure(
                "Redis unreachable and the spool cannot keep the event (error spool_unavailable): it was not accepted; send it again",
                {"Retry-After": "seconds"},
            ),
        },
        "The event's dag_id must be in the token's scope (else 403 token_scope). Run and task events only: the hook "
        "publishes asset events straight to Redis.",
        body=Event,
    ),
    "asset_events": Operation(
        "The asset's events as Server-Sent Events (never ending)",
        Role.READ,
        {200: Answer(EVENT_STREAM, stream=True), 400: failure("Bad Last-Event-ID or name"), **BUSY},
        "First event: ready (id: where the stream starts; data {asset, seq}); then event: asset with id: the asset's "
        "seq and data: an AssetEventBody; error or shutdown mean reconnect. Resume with the Last-Event-ID header or "
        "?last_event_id=; without either the stream starts at the current seq (last_event_id=0: everything the "
        "replay log holds). Heartbeat comments, retry: set.",
        (ASSET_NAME, *LAST_EVENT_ID, QUERY_TOKEN),
    ),
    "asset_next": Operation(
        "Long-poll the asset's next event",
        Role.READ,
        {
            200: Answer("The event (as the SSE asset event's data)", AssetEventBody),
            202: Answer("No such event at the timeout; ask again with after=seq", AssetPending, headers={"Retry-After": "seconds"}),
            400: failure("Bad after, timeout or name"),
            **BUSY,
        },
        "200 with the first event of the asset whose seq is greater than after (at once when the replay log has one), "
        "else 202 at the timeout with the asset's current seq. Without after: the first event after the asset's "
        "current seq.",
        (
            ASSET_NAME,
            Param(AFTER_PARAM, "query", SEQ, "a sequence number of this asset; default: its current one"),
            TIMEOUT,
            QUERY_TOKEN,
        ),
    ),
    "create_webhook": Operation(
        "Subscribe an endpoint to outcomes (or task and run events)",
        Role.ADMIN,
        {201: Answer("Created, with its secret", CreatedWebhook, headers={"Location": "the endpoint's URL"}), **TARGET_REFUSED},
        "The answer carries the signing secret, shown only here and on rotation.",
        body=EndpointCreate,
    ),
    "list_webhooks": Operation("Every webhook endpoint (never their secrets)", Role.ADMIN, {200: Answer("The endpoints", WebhookList)}),
    "get_webhook_message": Operation(
        "One message with its attempts",
        Role.ADMIN,
        {200: Answer("The message with its attempts", WebhookMessageWithAttempts), 400: failure("Bad limit"), **UNKNOWN_MESSAGE},
        parameters=(MESSAGE_ID, WEBHOOK_LIMIT),
    ),
    "resend_webhook_message": Operation(
        "Deliver the message again, with the same webhook-id",
        Role.ADMIN,
        {202: Answer("Queued", WebhookMessage), **UNKNOWN_MESSAGE},
        parameters=(MESSAGE_ID,),
    ),
    "get_webhook": Operation(
        "One webhook endpoint (never its secret)",
        Role.ADMIN,
        {200: Answer("The endpoint", WebhookEndpoint), **UNKNOWN_ENDPOINT},
        parameters=(ENDPOINT_ID,),
    ),
    "update_webhook": Operation(
        "Change any of url, description, dag_ids, kinds, enabled",
        Role.ADMIN,
        {200: Answer("The endpoint as changed", WebhookEndpoint), **UNKNOWN_ENDPOINT, **TARGET_REFUSED},
        "A new URL is checked like a new endpoint's.",
        (ENDPOINT_ID,),
        body=EndpointUpdate,
    ),
    "delete_webhook": Operation(
        "Unsubscribe (its messages are no longer delivered)",
        Role.ADMIN,
        {204: Answer("Deleted"), **UNKNOWN_ENDPOINT},
        parameters=(ENDPOINT_ID,),
    ),
    "rotate_webhook_secret": Operation(
        "A new signing secret; the old one still signs beside it for a grace period",
        Role.ADMIN,
        {200: Answer("The new secret", RotatedSecret), **UNKNOWN_ENDPOINT},
        "grace_seconds defaults to RUNBELL_WEBHOOK_SECRET_GRACE; 0 revokes the old secret at once.",
        (ENDPOINT_ID,),
        body=Rotation,
        body_required=False,
    ),
    "webhook_attempts": Operation(
        "The endpoint's latest delivery attempts, newest first, with status codes and timings",
        Role.ADMIN,
        {200: Answer("Attempts", AttemptList), 400: failure("Bad limit"), **UNKNOWN_ENDPOINT},
        parameters=(ENDPOINT_ID, WEBHOOK_LIMIT),
    ),
    "webhook_messages": Operation(
        "The endpoint's messages (one per event or outcome), optionally since a time",
        Role.ADMIN,
        {200: Answer("Messages", MessageList), 400: failure("Bad limit or since"), **UNKNOWN_ENDPOINT},
        parameters=(ENDPOINT_ID, WEBHOOK_LIMIT, Param("since", "query", {"type": "string", "format": "date-time"})),
    ),
    "recover_webhook": Operation(
        "Deliver again every message since a time that was not delivered (failed or dead-lettered)",
        Role.ADMIN,
        {202: Answer("Queued again", Recovered), **UNKNOWN_ENDPOINT},
        parameters=(ENDPOINT_ID,),
        body=Recovery,
    ),
    "list_dead_letters": Operation(
        "The recorder's dead letters: stream entries the store refused on their own, and entries that are no event, oldest first",
        Role.ADMIN,
        {200: Answer("A page of dead letters", DeadLetterList), 400: failure("Bad after or limit"), **STORE_DOWN},
        parameters=DEAD_LETTER_PAGE,
    ),
    "redrive_dead_letters": Operation(
        "Record the dead letters after `after` again, oldest first, up to limit of them; those refused again stay, with the new error",
        Role.ADMIN,
        {200: Answer("How many were recorded, failed, remain", RedrivenAll), 400: failure("Bad after or limit"), **STORE_DOWN},
        "Repeat with after=next_after until next_after is null to re-drive them all.",
        parameters=DEAD_LETTER_PAGE,
    ),
    "redrive_dead_letter": Operation(
        "Record one dead letter again; refused again, it stays with the new error",
        Role.ADMIN,
        {
            200: Answer("Recorded (and removed), or the dead letter with the new error", Redriven),
            400: failure("Bad id"),
            404: failure("No such dead letter"),
            409: failure("The entry is still no event (the bus schema refuses it): it stays, tried once more"),
            **STORE_DOWN,
        },
        parameters=(Param("letter_id", "path", {"type": "integer", "minimum": 1, "maximum": 10**dead_letters.ID_DIGITS - 1}),),
    ),
    "healthz": Operation("Liveness", None, {200: Answer("Up")}),
    "readyz": Operation(
        "Readiness: subscribed and caught up",
        None,
        {200: Answer("Ready, with each check's state"), 503: Answer("Not ready, with each check's state: what is not ok says why")},
        "Not ready until this replica is subscribed to every stream partition's shard channel, Redis and the store "
        "answer, and its recorder has made a full pass over the partitions with at most RUNBELL_READINESS_MAX_BACKLOG "
        'entries left to record (`"recorder": "catching up: 4123 entries behind"`). Once ready, a check that '
        "fails (a ping of Redis or the store, the subscriptions) is reported at once but answers 503 only when it has "
        "not passed for RUNBELL_READINESS_GRACE seconds; the recorder's backlog is then only reported. Draining "
        '(SIGTERM) is 503 at once (`"shutdown": "draining"`). Answered from the last checks, never waiting '
        'on Redis or the store. The body: `{"status": "ready" | "not ready", "checks": {"redis", '
        '"database", "pubsub", "recorder"[, "shutdown"]: "ok" or why not}}`.',
    ),
    "metrics": Operation("Prometheus metrics", Role.READ, {200: Answer("The exposition", media="text/plain")}),
    "openapi": Operation("This document", None, {200: Answer("OpenAPI 3.1")}),
    "asyncapi": Operation(
        "What the gateway pushes: its SSE streams, its webhook deliveries and the bus (AsyncAPI 3.0)", None, {200: Answer("AsyncAPI 3.0")}
    ),
    "dashboard": Operation(
        "The dashboard: one page (its views live in the URL's fragment)", None, {200: Answer("The page", media="text/html")}
    ),
    "browser_client": Operation(
        "The browser client, an ES module (also the npm package runbell-client, with TypeScript types)",
        None,
        {200: Answer("The module", media="text/javascript")},
        "EventSource for a run, an asset or a backfill, with resume after a restart, recovery, token refresh and "
        "result() as a Promise. Any origin may import it.",
    ),
    "dashboard_asset": Operation(
        "A file of the dashboard (script, style)",
        None,
        {200: Answer("The file", media="application/octet-stream"), 404: failure("No such file")},
        parameters=(
            Param("name", "path", {"type": "string", "pattern": ID_PATTERN}),
            Param("v", "query", {"type": "string"}, "the file's version: cached for good"),
        ),
    ),
}

# Models described in text (the data of SSE events) but in no answer of their own.
MENTIONED: tuple[type[BaseModel], ...] = (BackfillProgress, RunEnd, NeedsInput, InputClosed)

DELIVERY_PAYLOAD = {
    "type": "object",
    "required": ["type", "timestamp", "data"],
    "properties": {
        "type": {"type": "string", "enum": sorted(PAYLOAD_TYPES.values())},
        "timestamp": {"type": "string", "format": "date-time", "description": "when the event happened"},
        "data": {
            "type": "object",
            "required": ["seq", "terminal"],
            "description": "run.outcome: the Outcome; task.state and run.state: the Event with its seq",
            "properties": {"seq": {"type": "integer"}, "terminal": {"type": "boolean"}},
        },
    },
}
DELIVERY = {
    "post": {
        "summary": "What the gateway POSTs to a subscribed endpoint (Standard Webhooks)",
        "description": f"Answer 2xx within {ATTEMPT_TIMEOUT:g} s (RUNBELL_WEBHOOK_ATTEMPT_TIMEOUT). Retried on the schedule "
        "otherwise; 410 disables the endpoint; 429 and 502-504 honour Retry-After. Verify the signature with any Standard "
        "Webhooks library, on the raw body.",
        "parameters": [
            Param(
                "webhook-id", "header", {"type": "string"}, "the message id, the same on every retry and resend: de-duplicate on it", True
            ).render(),
            Param("webhook-timestamp", "header", {"type": "integer"}, "Unix seconds of this attempt", True).render(),
            Param(
                "webhook-signature",
                "header",
                {"type": "string"},
                "v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>, one per signing secret, space-separated",
                True,
            ).render(),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": DELIVERY_PAYLOAD}}},
        "responses": {"2XX": {"description": "Delivered"}, "410": {"description": "Gone: the endpoint is disabled"}},
    }
}

BAD_PATH = failure("An id in the path holds an encoded '/' (error bad_path) or a control character, or is too long")
BAD_BODY = "A malformed body: not JSON, not an object, a wrong type or a bad value (accepted lists the problems)"
AUTH_ERRORS = {
    401: failure("Missing or bad token"),
    403: failure("The token's role is too low (error forbidden), or the DAG is outside the token's scope (error token_scope)"),
}


# -- the generator ----------------------------------------------------------------------------------


class ContractError(Exception):
    """The route table and the operations disagree."""


def openapi_path(route: Route) -> str:
    """The route's path as OpenAPI spells it: {name}, never {name:converter}."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)


def documented_routes(routes: Iterable[BaseRoute]) -> list[tuple[Route, Operation]]:
    """Each route with its operation; ContractError when either side has one the other lacks."""
    found: list[tuple[Route, Operation]] = []
    problems: list[str] = []
    for route in routes:
        if not isinstance(route, Route):
            problems.append(f"{route!r} is not a plain Route: describe it or leave it out of the app")
            continue
        operation = OPERATIONS.get(route.name)
        if operation is None:
            problems.append(f"route {route.name!r} ({openapi_path(route)}) has no operation in OPERATIONS")
            continue
        declared = {p.name for p in operation.parameters if p.where == "path"}
        in_path = set(re.findall(r"\{(\w+)\}", openapi_path(route)))
        if declared != in_path:
            problems.append(f"route {route.name!r}: path parameters {sorted(in_path)}, operation declares {sorted(declared)}")
        found.append((route, operation))
    names = {route.name for route, _ in found}
    problems += [f"operation {name!r} names no route" for name in sorted(set(OPERATIONS) - names)]
    if problems:
        raise ContractError("; ".join(problems))
    return found


def build_openapi(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    documented = documented_routes(routes)
    uses: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for _, operation in documented:
        if operation.body is not None:
            uses.append((operation.body, "validation"))
        uses += [(answer.body, "serialization") for answer in operation.answers.values() if answer.body is not None]
    uses += [(model, "serialization") for model in MENTIONED]
    uses = list(dict.fromkeys(uses))
    refs, definitions = models_json_schema(uses, ref_template=SCHEMAS)
    schemas: dict[str, Any] = definitions["$defs"]
    for enum in (RunState, TaskState, Role):
        schemas[enum.__name__] = TypeAdapter(enum).json_schema()
    # Event.state is a string that a model validator checks against RunState or TaskState by kind:
    # JSON Schema cannot see the validator, so it is said here.
    schemas["Event"]["properties"]["state"] = {
        "anyOf": [{"$ref": SCHEMAS.format(model="RunState")}, {"$ref": SCHEMAS.format(model="TaskState")}],
        "description": "a RunState for kind run, a TaskState for kind task",
        "title": "State",
    }

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return refs[(model, mode)]

    def render(operation: Operation) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": operation.summary, "x-role": operation.role.value if operation.role else None}
        role = f"Role: {operation.role.value}." if operation.role is not None else ""
        description = " ".join(part for part in (operation.description, role) if part)
        if description:
            out["description"] = description
        if operation.role is None:
            out["security"] = []
        if operation.parameters:
            out["parameters"] = [param.render() for param in operation.parameters]
        answers = dict(operation.answers)
        if any(param.where == "path" for param in operation.parameters):
            answers.setdefault(400, BAD_PATH)
        if operation.body is not None:
            content = {"application/json": {"schema": ref(operation.body, "validation")}}
            out["requestBody"] = {"required": operation.body_required, "content": content}
            answers.setdefault(BAD_BODY_STATUS, failure(BAD_BODY))
            answers.setdefault(BODY_TOO_LARGE, failure("The body is larger than RUNBELL_BODY_MAX_BYTES (error body_too_large)"))
        if operation.role is not None:
            answers = {**answers, **AUTH_ERRORS}
        out["responses"] = {str(status): respond(answer) for status, answer in sorted(answers.items())}
        return out

    def respond(answer: Answer) -> dict[str, Any]:
        out: dict[str, Any] = {"description": answer.description}
        if answer.headers:
            out["headers"] = {
                name: {"schema": HEADER_SCHEMAS.get(name, {"type": "string"}), "description": says} for name, says in answer.headers.items()
            }
        if answer.body is not None:
            out["content"] = {"application/json": {"schema": ref(answer.body, "serialization")}}
        elif answer.stream:
            out["content"] = {"text/event-stream": {"schema": SSE_EVENT}}  # OpenAPI 3.1: the schema of each event
        elif answer.media is not None:
            out["content"] = {answer.media: {"schema": {"type": "string"}}}
        return out

    paths: dict[str, dict[str, Any]] = {}
    for route, operation in documented:
        for method in sorted((route.methods or set()) - {"HEAD"}):
            paths.setdefault(openapi_path(route), {})[method.lower()] = render(operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Runbell gateway",
            "version": "1",
            "description": "The outcome of an Airflow run, pushed. Each operation's x-role is the Role its token needs "
            "(publish, respond and trigger include read, trigger includes respond, admin includes all; null: open). A token limited to some DAGs "
            "(RUNBELL_TOKENS token:role@patterns) acts on those only: another DAG is a 403 token_scope; listings "
            "hold its DAGs' runs only; endpoints that span DAGs (assets, metrics, webhooks) need a token for every DAG.",
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "webhooks": {"runbell": DELIVERY},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": dict(sorted(schemas.items()))},
    }


def app_routes() -> list[BaseRoute]:
    from runbell.service.http.app import APP_ROUTES  # the app imports this module for its handler

    return list(APP_ROUTES)


def rendered(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


async def openapi_json(request: Request) -> JSONResponse:
    document = getattr(request.app.state, "openapi", None)
    if document is None:
        document = request.app.state.openapi = build_openapi(request.app.routes)
    return JSONResponse(document)


def document_cli(argv: Sequence[str] | None, prog: str, title: str, document: Path, build: Callable[[], dict[str, Any]]) -> int:
    """The command of a committed, generated document: print it, --write it, or --check it (exit 1 when it differs)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=title)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {document.name} next to this module")
    action.add_argument("--check", action="store_true", help=f"exit 1 when {document.name} differs from what the code generates")
    args = parser.parse_args(argv)
    text = rendered(build())
    if args.write:
        document.write_text(text, encoding="utf-8")
        print(f"wrote {document}")
    elif args.check:
        if not document.exists() or document.read_text(encoding="utf-8") != text:
            print(f"{document} is not what the code generates: run `python -m {prog} --write` and commit it", file=sys.stderr)
            return 1
        print(f"{document} is up to date")
    else:
        sys.stdout.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return document_cli(
        argv, "runbell.service.http.openapi", "The gateway's OpenAPI document.", DOCUMENT, lambda: build_openapi(app_routes())
    )


if __name__ == "__main__":
    sys.exit(main())
