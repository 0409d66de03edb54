"""What a webhook subscription may say: the request models and their rules, in one place.

The API validates request bodies with these models and the store validates what it is asked to
save with the same ones, so a rule (the kinds, the DAG ids, the URL's shape) is written once. Whether
a target may be reached (private addresses, the allow-list) is the target guard's call: the model
checks the URL's shape with it, and `check_target` asks it about the network before an endpoint is
saved.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from runbell.bus.schema import ID_MAX
from runbell.service.core import clock
from runbell.service.webhooks.target_guard import TargetPolicy, TargetRefused, check_url, parse_target

MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 1000
MAX_DAG_IDS = 1000
MAX_GRACE_SECONDS = 30 * 24 * 3600


class WebhookKind(str, Enum):
    OUTCOME = "outcome"
    TASK = "task"
    RUN = "run"
    NEEDS_INPUT = "needs_input"  # a task waits for a person: once per request
    PROGRESS = "progress"  # a task's partial output: every progress event (its values, in order)


DEFAULT_KINDS = [WebhookKind.OUTCOME.value]
UPDATABLE = ("url", "description", "dag_ids", "kinds", "enabled")


def _target_shape(url: str) -> str:
    try:
        parse_target(url)
    except TargetRefused as refused:
        raise ValueError(f"{refused.reason} (give an http or https URL without credentials)") from None
    return url


def _distinct_kinds(kinds: list[WebhookKind]) -> list[WebhookKind]:
    return list(dict.fromkeys(kinds))


def _distinct_dag_ids(dag_ids: list[str]) -> list[str]:
    return list(dict.fromkeys(dag_ids))


Url = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH, json_schema_extra={"format": "uri"}), AfterValidator(_target_shape)]
URL_SAYS = "http or https, no credentials"
Kinds = Annotated[list[WebhookKind], Field(min_length=1), AfterValidator(_distinct_kinds)]
KINDS_SAYS = (
    "outcome: the run's outcome once decided; task, run: every such event; needs_input: once per request a task makes of a person; "
    "progress: every progress event of a task (its partial output)"
)
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"  # as the API's ids (and PostgreSQL's text keeps no NUL)
NO_NUL = r"^[^\x00]*$"
DagIds = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=ID_MAX, pattern=NO_CONTROL)]],
    Field(min_length=1, max_length=MAX_DAG_IDS),
    AfterValidator(_distinct_dag_ids),
]
DAG_IDS_SAYS = "only these DAGs; null (or left out): every DAG"


class EndpointCreate(BaseModel):
    """POST /v1/webhooks."""

    model_config = ConfigDict(extra="forbid")

    url: Url = Field(description=URL_SAYS)
    description: str = Field(default="", max_length=MAX_DESCRIPTION_LENGTH, pattern=NO_NUL)
    dag_ids: DagIds | None = Field(default=None, description=DAG_IDS_SAYS)
    kinds: Kinds = Field(default_factory=lambda: [WebhookKind(kind) for kind in DEFAULT_KINDS], description=KINDS_SAYS)
    enabled: bool = True


# A callback's headers go to a receiver its caller names: bounded, and never one the delivery itself
# sets (the signature, the body's framing) or one of the connection's.
MAX_CALLBACK_HEADERS = 20
HEADER_VALUE_MAX = 1024
RESERVED_HEADERS = frozenset(
    {
        "accept-encoding",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "expect",
        "host",
        "keep-alive",
        "proxy-authorization",
        "te",
        "traceparent",
        "tracestate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "webhook-id",
        "webhook-signature",
        "webhook-timestamp",
    }
)
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"  # an HTTP token
HEADER_VALUE_PATTERN = r"^[\t\x20-\x7e]*$"  # what HTTP sends as it is
HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=HEADER_NAME_PATTERN)]
HeaderValue = Annotated[str, StringConstraints(max_length=HEADER_VALUE_MAX, pattern=HEADER_VALUE_PATTERN)]


def header_problem(headers: dict[str, str]) -> str | None:
    """What is wrong with a callback's header names that a schema cannot say: one the delivery sets
    itself, or one given twice in another case. None: nothing."""
    lowered = [name.lower() for name in headers]
    reserved = sorted(set(lowered) & RESERVED_HEADERS)
    if reserved:
        return f"{', '.join(reserved)}: set by the delivery itself (not one of {', '.join(sorted(RESERVED_HEADERS))})"
    if len(set(lowered)) != len(lowered):
        return "a header is given twice (names are case-insensitive)"
    return None


def _headers_schema(schema: dict[str, Any]) -> None:
    """The names' rule as propertyNames, every value's as additionalProperties (pydantic writes the name
    pattern as patternProperties, which lets any other name through with any value)."""
    schema.pop("patternProperties", None)
    schema["propertyNames"] = {"minLength": 1, "maxLength": 64, "pattern": HEADER_NAME_PATTERN}
    schema["additionalProperties"] = {"type": "string", "maxLength": HEADER_VALUE_MAX, "pattern": HEADER_VALUE_PATTERN}


class Callback(BaseModel):
    """A trigger's `callback`: a webhook bound to that one run (delivered, signed and retried as a
    subscription's are), to which the run's outcome, and any other kinds asked for, are posted."""

    model_config = ConfigDict(extra="forbid")

    url: Url = Field(description=URL_SAYS)
    kinds: Kinds = Field(default_factory=lambda: [WebhookKind(kind) for kind in DEFAULT_KINDS], description=KINDS_SAYS)
    headers: Annotated[dict[HeaderName, HeaderValue], Field(max_length=MAX_CALLBACK_HEADERS)] = Field(
        default_factory=dict,
        description=f"sent with every delivery (at most {MAX_CALLBACK_HEADERS}; values up to {HEADER_VALUE_MAX} characters), e.g. Authorization; "
        "never shown again; none the delivery sets itself (422 reserved_header)",
        json_schema_extra=_headers_schema,
    )


class EndpointUpdate(BaseModel):
    """PATCH /v1/webhooks/{endpoint_id}: any of the fields; only dag_ids may be null (every DAG).

    A field left out is None and not in model_fields_set; the defaults are not validated, so a null
    sent for any field but dag_ids fails its type (and the schema says so)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    url: Url = Field(default=None, description=URL_SAYS)  # type: ignore[assignment]  # left out: None, unvalidated; a null sent fails the type
    description: str = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH, pattern=NO_NUL)  # type: ignore[assignment]  # left out: None, unvalidated; a null sent fails the type
    dag_ids: DagIds | None = Field(default=None, description=DAG_IDS_SAYS)
    kinds: Kinds = Field(default=None, description=KINDS_SAYS)  # type: ignore[arg-type]  # left out: None, unvalidated; a null sent fails the type
    enabled: bool = Field(default=None)  # type: ignore[assignment]  # left out: None, unvalidated; a null sent fails the type

    @model_validator(mode="after")
    def _something_to_change(self) -> EndpointUpdate:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give any of " + ", ".join(UPDATABLE))
        return self

    def changes(self) -> dict[str, Any]:
        """The fields given, as the store saves them (JSON values)."""
        return self.model_dump(mode="json", include=self.model_fields_set)


class Rotation(BaseModel):
    """POST /v1/webhooks/{endpoint_id}/rotate-secret (the body is optional)."""

    model_config = ConfigDict(extra="forbid")

    grace_seconds: float | None = Field(
        default=None,
        ge=0,
        le=MAX_GRACE_SECONDS,
        description="seconds the old secret still signs beside the new one; default RUNBELL_WEBHOOK_SECRET_GRACE, 0 revokes it at once",
    )


class Recovery(BaseModel):
    """POST /v1/webhooks/{endpoint_id}/recover."""

    model_config = ConfigDict(extra="forbid")

    # clock.as_utc: a time out of range is a 422 naming the field, not an OverflowError
    since: Annotated[datetime, AfterValidator(clock.as_utc)] = Field(description="messages created since then (ISO-8601; naive means UTC)")


async def check_target(policy: TargetPolicy, url: str) -> None:
    """TargetRefused (with the reason) when the URL leads where webhooks may not go."""
    await check_url(policy, url)
