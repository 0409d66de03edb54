"""The OpenAPI document of every endpoint, written out by hand so it says exactly what is served."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from runbell.bus.schema import Event

_RUN_PARAMS = [
    {"name": "dag_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 250}},
    {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 250}},
]
_QUERY_TOKEN = {
    "name": "access_token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "The bearer token, for clients that cannot send headers (EventSource).",
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_AUTH_ERRORS = {"401": _error("Missing or bad token"), "403": _error("The token's role is too low")}

OUTCOME_SCHEMA = {
    "type": "object",
    "required": ["status", "dag_id", "run_id", "run_state", "seq"],
    "properties": {
        "status": {"type": "string", "enum": ["success", "failed"]},
        "dag_id": {"type": "string"},
        "run_id": {"type": "string"},
        "run_state": {"type": "string", "enum": ["queued", "running", "success", "failed", "unknown"]},
        "seq": {"type": "integer", "description": "last sequence number applied"},
        "decided_seq": {"type": ["integer", "null"]},
        "decided_by": {"type": ["string", "null"], "enum": ["result_task", "critical_task", "run", None]},
        "result": {"description": "the result task's value (a list by map_index for a mapped one), or a reference"},
        "result_task": {
            "type": ["object", "null"],
            "properties": {
                "task_id": {"type": "string"},
                "map_index": {"type": "integer"},
                "try_number": {"type": ["integer", "null"]},
                "is_ref": {"type": "boolean"},
                "size": {"type": "integer"},
            },
        },
        "failure": {
            "type": ["object", "null"],
            "properties": {
                "task_id": {"type": ["string", "null"]},
                "map_index": {"type": "integer"},
                "try_number": {"type": ["integer", "null"]},
                "error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
            },
        },
    },
}

PENDING_SCHEMA = {
    "type": "object",
    "required": ["status", "run_state", "seq"],
    "properties": {
        "status": {"type": "string", "enum": ["pending"]},
        "dag_id": {"type": "string"},
        "run_id": {"type": "string"},
        "run_state": {"type": "string", "enum": ["queued", "running", "success", "failed", "unknown"]},
        "seq": {"type": "integer"},
    },
}

TRIGGER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "conf": {"type": "object"},
        "logical_date": {"type": ["string", "null"], "format": "date-time"},
        "run_id": {"type": "string", "pattern": "^[A-Za-z0-9_.~:+-]{1,250}$"},
        "note": {"type": "string", "maxLength": 1000},
    },
}

_KINDS = {"type": "array", "items": {"type": "string", "enum": ["outcome", "task", "run"]}, "minItems": 1, "uniqueItems": True}
_DAG_IDS = {
    "type": ["array", "null"],
    "items": {"type": "string", "minLength": 1, "maxLength": 250},
    "minItems": 1,
    "description": "only these DAGs; null: every DAG",
}

WEBHOOK_CREATE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "format": "uri", "maxLength": 2048, "description": "http or https, no credentials"},
        "description": {"type": "string", "maxLength": 1000},
        "dag_ids": _DAG_IDS,
        "kinds": {**_KINDS, "default": ["outcome"], "description": "outcome: the run's outcome once decided; task, run: every such event"},
        "enabled": {"type": "boolean", "default": True},
    },
}

WEBHOOK_UPDATE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {**WEBHOOK_CREATE_SCHEMA["properties"], "kinds": _KINDS},  # type: ignore[dict-item]  # the schema dicts are inferred as dict[str, object]
}

WEBHOOK_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "url": {"type": "string"},
        "description": {"type": "string"},
        "dag_ids": _DAG_IDS,
        "kinds": _KINDS,
        "enabled": {"type": "boolean"},
        "secret": {"type": "string", "description": "whsec_...: only in the answer that creates the endpoint"},
        "previous_secret_expires_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "until then the secret before the last rotation signs too",
        },
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "disabled_reason": {"type": ["string", "null"], "description": "why the gateway disabled it (410, failing for days)"},
        "failing_since": {"type": ["string", "null"], "format": "date-time"},
    },
}

WEBHOOK_ATTEMPT_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {},
        "message_id": {"type": "string"},
        "endpoint_id": {"type": "string"},
        "attempted_at": {"type": "string", "format": "date-time"},
        "duration_ms": {"type": "number"},
        "status_code": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]},
        "response_body": {"type": ["string", "null"], "description": "the start of the receiver's answer"},
    },
}

WEBHOOK_MESSAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "the webhook-id header, the same on every attempt and resend"},
        "endpoint_id": {"type": "string"},
        "dag_id": {"type": "string"},
        "run_id": {"type": "string"},
        "seq": {"type": "integer"},
        "kind": {"type": "string", "enum": ["outcome", "task", "run"]},
        "terminal": {"type": "boolean"},
        "payload": {"description": "the body delivered"},
        "status": {"type": "string"},
        "attempts": {"type": "integer"},
        "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
        "created_at": {"type": "string", "format": "date-time"},
        "delivered_at": {"type": ["string", "null"], "format": "date-time"},
        "attempt_log": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/WebhookAttempt"},
            "description": "only from GET /v1/webhooks/messages/{message_id}",
        },
    },
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_ENDPOINT_ID = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string"}}
_MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "string"}}
_LIMIT = {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
_ADMIN = " Role: admin."
_UNKNOWN_ENDPOINT = {"404": _error("No such webhook endpoint")}
_UNKNOWN_MESSAGE = {"404": _error("No such webhook message")}
_TARGET_ERRORS = {
    "400": _error("Bad body, URL (scheme, credentials), kind (the accepted ones listed) or DAG ids"),
    "422": _error(
        "Target refused: it resolves to a private, loopback or link-local address "
        "(the reason names it; RUNBELL_WEBHOOK_ALLOWED_HOSTS can permit it)"
    ),
}


DELIVERY = {
    "post": {
        "summary": "What the gateway POSTs to a subscribed endpoint (Standard Webhooks)",
        "description": "Answer 2xx within 15 s. Retried on the schedule otherwise; 410 disables the endpoint; 429 and "
        "502-504 honour Retry-After. Verify the signature with any Standard Webhooks library, on the raw body.",
        "parameters": [
            {
                "name": "webhook-id",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "the message id, the same on every retry and resend: de-duplicate on it",
            },
            {
                "name": "webhook-timestamp",
                "in": "header",
                "required": True,
                "schema": {"type": "integer"},
                "description": "Unix seconds of this attempt",
            },
            {
                "name": "webhook-signature",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>, one per signing secret, space-separated",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["type", "timestamp", "data"],
                        "properties": {
                            "type": {"type": "string", "enum": ["run.outcome", "task.state", "run.state"]},
                            "timestamp": {"type": "string", "format": "date-time", "description": "when the event happened"},
                            "data": {
                                "type": "object",
                                "required": ["seq", "terminal"],
                                "description": "run.outcome: the Outcome; task.state and run.state: the Event",
                                "properties": {"seq": {"type": "integer"}, "terminal": {"type": "boolean"}},
                            },
                        },
                    }
                }
            },
        },
        "responses": {"2XX": {"description": "Delivered"}, "410": {"description": "Gone: the endpoint is disabled"}},
    }
}


def webhook_paths() -> dict:
    endpoint, message = "/v1/webhooks/{endpoint_id}", "/v1/webhooks/messages/{message_id}"
    return {
        "/v1/webhooks": {
            "post": {
                "summary": "Subscribe an endpoint to outcomes (or task and run events)",
                "description": "The answer carries the signing secret, shown only here and on rotation." + _ADMIN,
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("WebhookCreate")}}},
                "responses": {
                    "201": {**_json(_ref("Webhook"), "Created, with its secret"), "headers": {"Location": {"schema": {"type": "string"}}}},
                    **_TARGET_ERRORS,
                    **_AUTH_ERRORS,
                },
            },
            "get": {
                "summary": "Every webhook endpoint (never their secrets)",
                "description": _ADMIN.strip(),
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"webhooks": {"type": "array", "items": _ref("Webhook")}}}, "The endpoints"
                    ),
                    **_AUTH_ERRORS,
                },
            },
        },
        endpoint: {
            "get": {
                "summary": "One webhook endpoint (never its secret)",
                "description": _ADMIN.strip(),
                "parameters": [_ENDPOINT_ID],
                "responses": {"200": _json(_ref("Webhook"), "The endpoint"), **_UNKNOWN_ENDPOINT, **_AUTH_ERRORS},
            },
            "patch": {
                "summary": "Change any of url, description, dag_ids, kinds, enabled",
                "description": "A new URL is checked like a new endpoint's." + _ADMIN,
                "parameters": [_ENDPOINT_ID],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("WebhookUpdate")}}},
                "responses": {
                    "200": _json(_ref("Webhook"), "The endpoint as changed"),
                    **_TARGET_ERRORS,
                    **_UNKNOWN_ENDPOINT,
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Unsubscribe (its messages are no longer delivered)",
                "description": _ADMIN.strip(),
                "parameters": [_ENDPOINT_ID],
                "responses": {"204": {"description": "Deleted"}, **_UNKNOWN_ENDPOINT, **_AUTH_ERRORS},
            },
        },
        endpoint + "/rotate-secret": {
            "post": {
                "summary": "A new signing secret; the old one still signs beside it for a grace period",
                "description": "grace_seconds defaults to RUNBELL_WEBHOOK_SECRET_GRACE; 0 revokes the old secret at once." + _ADMIN,
                "parameters": [_ENDPOINT_ID],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"grace_seconds": {"type": "number", "minimum": 0, "maximum": 2592000}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "secret": {"type": "string"},
                                "grace_seconds": {"type": "number"},
                                "previous_secret_expires_at": {"type": ["string", "null"], "format": "date-time"},
                            },
                        },
                        "The new secret",
                    ),
                    "400": _error("Bad body"),
                    **_UNKNOWN_ENDPOINT,
                    **_AUTH_ERRORS,
                },
            }
        },
        endpoint + "/attempts": {
            "get": {
                "summary": "The endpoint's latest delivery attempts, newest first, with status codes and timings",
                "description": _ADMIN.strip(),
                "parameters": [_ENDPOINT_ID, _LIMIT],
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"attempts": {"type": "array", "items": _ref("WebhookAttempt")}}}, "Attempts"
                    ),
                    "400": _error("Bad limit"),
                    **_UNKNOWN_ENDPOINT,
                    **_AUTH_ERRORS,
                },
            },
        },
        endpoint + "/messages": {
            "get": {
                "summary": "The endpoint's messages (one per event or outcome), optionally since a time",
                "description": _ADMIN.strip(),
                "parameters": [
                    _ENDPOINT_ID,
                    _LIMIT,
                    {"name": "since", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
                ],
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"messages": {"type": "array", "items": _ref("WebhookMessage")}}}, "Messages"
                    ),
                    "400": _error("Bad limit or since"),
                    **_UNKNOWN_ENDPOINT,
                    **_AUTH_ERRORS,
                },
            },
        },
        endpoint + "/recover": {
            "post": {
                "summary": "Deliver again every message since a time that was not delivered (failed or dead-lettered)",
                "description": _ADMIN.strip(),
                "parameters": [_ENDPOINT_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["since"],
                                "properties": {"since": {"type": "string", "format": "date-time"}},
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json({"type": "object", "properties": {"requeued": {"type": "integer"}}}, "Queued again"),
                    "400": _error("Bad body"),
                    **_UNKNOWN_ENDPOINT,
                    **_AUTH_ERRORS,
                },
            }
        },
        message: {
            "get": {
                "summary": "One message with its attempts",
                "description": _ADMIN.strip(),
                "parameters": [_MESSAGE_ID, _LIMIT],
                "responses": {
                    "200": _json(_ref("WebhookMessage"), "The message, attempt_log included"),
                    **_UNKNOWN_MESSAGE,
                    **_AUTH_ERRORS,
                },
            },
        },
        message + "/resend": {
            "post": {
                "summary": "Deliver the message again, with the same webhook-id",
                "description": _ADMIN.strip(),
                "parameters": [_MESSAGE_ID],
                "responses": {"202": _json(_ref("WebhookMessage"), "Queued"), **_UNKNOWN_MESSAGE, **_AUTH_ERRORS},
            },
        },
    }


ASSET_EVENT_SCHEMA = {
    "type": "object",
    "required": ["seq", "v", "id", "kind", "asset", "ts", "source"],
    "properties": {
        "seq": {"type": "integer", "minimum": 1, "description": "the asset's sequence number (gap-free, its own)"},
        "v": {"type": "integer", "enum": [1]},
        "id": {"type": "string", "description": "the event's id (a re-send keeps it and is not logged twice)"},
        "kind": {"type": "string", "enum": ["asset"]},
        "asset": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "uri": {"type": "string"}, "group": {"type": "string"}},
        },
        "extra": {"type": "object", "description": "the asset event's extra; absent when larger than the cap"},
        "extra_size": {"type": "integer", "description": "bytes of the extra as JSON"},
        "extra_truncated": {"type": "boolean", "description": "the extra was larger than the cap and is left out"},
        "source_dag_id": {
            "type": "string",
            "description": "the DAG, run, task and map index whose outlet made "
            "the event, where Airflow says (absent for one made through Airflow's REST API)",
        },
        "source_run_id": {"type": "string"},
        "source_task_id": {"type": "string"},
        "source_map_index": {"type": "integer"},
        "partition_key": {"type": "string"},
        "aliases": {"type": "array", "items": {"type": "string"}, "description": "asset aliases it came through"},
        "ts": {"type": "number", "description": "Unix time the hook saw it"},
        "source": {"type": "string", "enum": ["hook", "emit", "reconciler", "gateway"]},
        "host": {"type": "string"},
    },
}

_ASSET_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 1500},
    "description": "The asset's name. It may hold '/' and ':' (e.g. s3://bucket/key), sent as is or "
    "percent-encoded as one segment; '?', '#', '%' and spaces must be percent-encoded.",
}


def asset_paths() -> dict:
    asset = {"application/json": {"schema": ASSET_EVENT_SCHEMA}}
    busy = {"503": _error("Subscriber cap reached or shutting down")}
    return {
        "/v1/assets/{name}/next": {
            "get": {
                "summary": "Long-poll the asset's next event",
                "description": "200 with the first event of the asset whose seq is greater than after (at once when "
                "the replay log has one), else 202 at the timeout with the asset's current seq: ask again with "
                "after=seq. Without after: the first event after the asset's current seq. Role: read.",
                "parameters": [
                    _ASSET_NAME,
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "a sequence number of this asset; default: its current one",
                    },
                    {
                        "name": "timeout",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 25},
                    },
                    _QUERY_TOKEN,
                ],
                "responses": {
                    "200": {"description": "The event (as the SSE asset event's data)", "content": asset},
                    "202": {
                        "description": "No such event at the timeout; ask again",
                        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["status", "asset", "seq"],
                                    "properties": {
                                        "status": {"type": "string", "enum": ["pending"]},
                                        "asset": {"type": "string"},
                                        "seq": {
                                            "type": ["integer", "null"],
                                            "description": "the asset's current seq (null: Redis unreadable, no after given)",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "400": _error("Bad after, timeout or name"),
                    **_AUTH_ERRORS,
                    **busy,
                },
            }
        },
        "/v1/assets/{name}/events": {
            "get": {
                "summary": "The asset's events as Server-Sent Events (never ending)",
                "description": "First event: ready (id: where the stream starts; data {asset, seq}); then event: asset "
                "with id: the asset's seq and data: the event; error or shutdown mean reconnect. Resume with the "
                "Last-Event-ID header or ?last_event_id=; without either the stream starts at the current seq "
                "(last_event_id=0: everything the replay log holds). Heartbeat comments, retry: set. Role: read.",
                "parameters": [
                    _ASSET_NAME,
                    {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0}},
                    _QUERY_TOKEN,
                ],
                "responses": {
                    "200": {"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "400": _error("Bad Last-Event-ID or name"),
                    **_AUTH_ERRORS,
                    **busy,
                },
            }
        },
    }


# -- runs listing (service/runs.py) ----------------------------------------------------------------

RUN_STATE_VALUES = ["queued", "running", "success", "failed", "unknown"]
RUN_TYPE_VALUES = ["manual", "scheduled", "backfill", "asset_triggered", "operator_triggered", "asset_materialization"]

RUN_ROW_SCHEMA = {
    "type": "object",
    "required": [
        "dag_id",
        "run_id",
        "state",
        "logical_date",
        "run_after",
        "run_type",
        "backfill_id",
        "started",
        "ended",
        "outcome",
        "result_task",
        "first_failure",
        "stale",
    ],
    "properties": {
        "dag_id": {"type": "string"},
        "run_id": {"type": "string"},
        "state": {
            "type": "string",
            "enum": RUN_STATE_VALUES,
            "description": "the run's state from its events; a terminal run event is final, a try being retried reads as running",
        },
        "logical_date": {"type": ["string", "null"], "format": "date-time", "description": "null for runs without one"},
        "run_after": {"type": "string", "format": "date-time", "description": "the listing's order"},
        "run_type": {"type": ["string", "null"]},
        "backfill_id": {"type": ["string", "null"]},
        "started": {"type": ["string", "null"], "format": "date-time"},
        "ended": {"type": ["string", "null"], "format": "date-time"},
        "outcome": {"type": "string", "enum": ["pending", "success", "failed"]},
        "result_task": {"type": ["object", "null"], "description": "as in the Outcome"},
        "first_failure": {"type": ["object", "null"], "description": "as the Outcome's failure"},
        "stale": {"type": "boolean", "description": "running, but no event for longer than RUNBELL_STALE_AFTER"},
    },
}

_RUNS_FILTERS = [
    {
        "name": "run_type",
        "in": "query",
        "required": False,
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string", "enum": RUN_TYPE_VALUES}},
        "description": "any of these; repeat the parameter or separate with commas",
    },
    {"name": "backfill_id", "in": "query", "required": False, "schema": {"type": "string"}},
    {
        "name": "run_after_gte",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "format": "date-time"},
        "description": "ISO-8601; naive means UTC",
    },
    {"name": "run_after_lte", "in": "query", "required": False, "schema": {"type": "string", "format": "date-time"}},
    {
        "name": "status",
        "in": "query",
        "required": False,
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string", "enum": RUN_STATE_VALUES}},
        "description": "the run's state, any of these: status=running&status=failed and status=running,failed both mean "
        "running OR failed; another value is a 400 listing the accepted ones",
    },
    {
        "name": "order",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["desc", "asc"], "default": "desc"},
        "description": "by run_after (ties: dag_id, run_id); desc is newest first",
    },
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "next_cursor of the previous page, with the same filters and order",
    },
]


def runs_list_get(with_dag_id: bool) -> dict:
    dag_param = (
        {"name": "dag_id", "in": "query", "required": False, "schema": {"type": "string"}}
        if with_dag_id
        else {"name": "dag_id", "in": "path", "required": True, "schema": {"type": "string"}}
    )
    page = {
        "type": "object",
        "required": ["runs", "next_cursor"],
        "properties": {
            "runs": {"type": "array", "items": RUN_ROW_SCHEMA},
            "next_cursor": {"type": ["string", "null"], "description": "null on the last page"},
        },
    }
    return {
        "summary": "Runs the gateway has recorded, filtered in the database, newest first, paged by cursor",
        "description": "Keyset pages on (run_after, dag_id, run_id): stable while new runs arrive (no row twice, "
        "none skipped). The cursor is opaque and signed; a malformed, altered or foreign one is a 400. Role: read.",
        "parameters": [dag_param, *_RUNS_FILTERS],
        "responses": {
            "200": {
                **_json(page, "A page of runs"),
                "headers": {"Link": {"schema": {"type": "string"}, "description": '<url>; rel="next" when there is a next page'}},
            },
            "400": _error("Unknown status or run_type (accepted listed), bad time, order, limit or cursor"),
            **_AUTH_ERRORS,
        },
    }


def runs_paths() -> dict:
    tries = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "task_id": {"type": "string"},
                "map_index": {"type": "integer"},
                "try_number": {"type": "integer"},
                "state": {"type": "string"},
                "started": {"type": ["string", "null"], "format": "date-time"},
                "ended": {"type": ["string", "null"], "format": "date-time"},
            },
        },
    }
    detail = {**RUN_ROW_SCHEMA, "properties": {**RUN_ROW_SCHEMA["properties"], "task_instances": tries}}  # type: ignore[dict-item]
    return {
        "/v1/runs": {"get": runs_list_get(with_dag_id=True)},
        "/v1/dags/{dag_id}/runs/{run_id}": {
            "get": {
                "summary": "One recorded run with its task instances (one per try)",
                "description": "Task instances by start, then task_id, map_index, try_number. Role: read.",
                "parameters": _RUN_PARAMS,
                "responses": {"200": _json(detail, "The run"), "404": _error("The gateway has no record of this run"), **_AUTH_ERRORS},
            }
        },
    }


def backfills_paths() -> dict:
    backfill_id = {
        "name": "backfill_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "Airflow's backfill id",
    }
    slot = {
        "type": "object",
        "required": ["sort_ordinal", "logical_date", "run_id", "state", "exception_reason"],
        "properties": {
            "sort_ordinal": {"type": "integer"},
            "logical_date": {"type": ["string", "null"], "format": "date-time"},
            "run_id": {"type": ["string", "null"], "description": "null: Airflow made no run for this slot"},
            "state": {
                "type": ["string", "null"],
                "enum": [*RUN_STATE_VALUES, None],
                "description": "the run's state in the gateway's store, else Airflow's; null without a run",
            },
            "exception_reason": {
                "type": ["string", "null"],
                "enum": ["already exists", "in flight", "unknown", None],
                "description": "why Airflow skipped the slot",
            },
        },
    }
    progress = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("done", "failed", "running", "skipped", "total")},
        "description": "done: runs succeeded; failed; running; skipped: slots without a run; total: slots",
    }
    not_configured = {"503": _error("RUNBELL_AIRFLOW_DATABASE_URL is not set, or Airflow's database is unreadable")}
    return {
        "/v1/backfills/{backfill_id}/runs": {
            "get": {
                "summary": "The backfill's slots in sort_ordinal order, each with its run's state or Airflow's reason for skipping it",
                "description": "Read from Airflow's metadata database (read only): its REST API does not list a backfill's "
                "slots. Role: read.",
                "parameters": [
                    backfill_id,
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {"name": "offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 0}},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "backfill_id": {"type": "string"},
                                "dag_id": {"type": "string"},
                                "total_entries": {"type": "integer"},
                                "slots": {"type": "array", "items": slot},
                            },
                        },
                        "A page of slots",
                    ),
                    "400": _error("Bad limit or offset"),
                    "404": _error("Airflow has no such backfill"),
                    **_AUTH_ERRORS,
                    **not_configured,
                },
            }
        },
        "/v1/backfills/{backfill_id}/events": {
            "get": {
                "summary": "The backfill's progress as Server-Sent Events",
                "description": "event: progress (data: the summary) first and after every change; event: slot (data: "
                "the slot as listed) when a slot's state changes; event: end (id: end, data: the summary) once every "
                "slot is terminal, then the stream closes (a reconnect with Last-Event-ID: end gets 204). "
                "error or shutdown mean reconnect. Role: read.",
                "parameters": [backfill_id, _QUERY_TOKEN],
                "responses": {
                    "200": {
                        "description": "An event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}, "example": progress}},
                    },
                    "204": {"description": "The stream already ended for this client"},
                    "404": _error("Airflow has no such backfill"),
                    **_AUTH_ERRORS,
                    **not_configured,
                },
            }
        },
    }


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "accepted": {}},
}


def build_openapi() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Runbell gateway", "version": "1", "description": "The outcome of an Airflow run, pushed."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Outcome": OUTCOME_SCHEMA,
                "Pending": PENDING_SCHEMA,
                "Error": ERROR_SCHEMA,
                "Event": Event.model_json_schema(),
                "Webhook": WEBHOOK_SCHEMA,
                "WebhookCreate": WEBHOOK_CREATE_SCHEMA,
                "WebhookUpdate": WEBHOOK_UPDATE_SCHEMA,
                "WebhookMessage": WEBHOOK_MESSAGE_SCHEMA,
                "WebhookAttempt": WEBHOOK_ATTEMPT_SCHEMA,
            },
        },
        "security": [{"bearer": []}],
        "webhooks": {"runbell": DELIVERY},
        "paths": {
            "/v1/dags/{dag_id}/runs": {
                "get": runs_list_get(with_dag_id=False),
                "post": {
                    "summary": "Trigger a run through Airflow and wait for its outcome",
                    "description": "Triggers the run (the gateway names it unless run_id is given), then waits like the "
                    "result endpoint. 200 with the outcome if it lands within the wait, else 202 with Location. Both carry "
                    "a token scoped to this run (read its result and events). Role: publish.",
                    "parameters": [
                        _RUN_PARAMS[0],
                        {"name": "wait", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0, "maximum": 60}},
                        {
                            "name": "Prefer",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "RFC 7240 wait=SECONDS (capped at 60), when ?wait is not given",
                        },
                        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}},
                        {
                            "name": "unpause",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "boolean"},
                            "description": "unpause a paused DAG instead of answering 409",
                        },
                    ],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": TRIGGER_SCHEMA}}},
                    "responses": {
                        "200": {
                            "description": "Decided within the wait (the outcome plus token, token_expires_at)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Outcome"}}},
                        },
                        "202": {
                            "description": "Triggered, still pending",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pending"}}},
                        },
                        "400": _error("Bad body or wait"),
                        **_AUTH_ERRORS,
                        "404": _error("Unknown DAG"),
                        "409": _error("DAG paused, run id taken, or the same Idempotency-Key still triggering"),
                        "422": _error("Idempotency-Key reused with another body"),
                        "502": _error("Airflow answered with an error"),
                        "503": _error("Airflow unreachable or not configured"),
                    },
                },
            },
            "/v1/dags/{dag_id}/runs/{run_id}/result": {
                "get": {
                    "summary": "Long-poll the run's outcome",
                    "description": "Answers 200 the moment the result task succeeds or a critical task fails, else 202 at the timeout. "
                    "A run not seen yet is waited for. Role: read.",
                    "parameters": _RUN_PARAMS
                    + [
                        {
                            "name": "timeout",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 25},
                        },
                        _QUERY_TOKEN,
                    ],
                    "responses": {
                        "200": {
                            "description": "Decided",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Outcome"}}},
                        },
                        "202": {
                            "description": "Still pending at the timeout; ask again",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pending"}}},
                        },
                        "400": _error("Bad timeout or id"),
                        **_AUTH_ERRORS,
                        "503": _error("Subscriber cap reached or shutting down"),
                    },
                }
            },
            "/v1/dags/{dag_id}/runs/{run_id}/events": {
                "get": {
                    "summary": "The run's events as Server-Sent Events",
                    "description": "id: is the run's sequence number; event: task, run, outcome, end (then the stream closes), "
                    "error or shutdown (reconnect). Resume with the Last-Event-ID header or ?last_event_id=. Role: read.",
                    "parameters": _RUN_PARAMS
                    + [
                        {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0}},
                        _QUERY_TOKEN,
                    ],
                    "responses": {
                        "200": {"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        "204": {"description": "The stream already ended for this Last-Event-ID: stop reconnecting"},
                        "400": _error("Bad Last-Event-ID or id"),
                        **_AUTH_ERRORS,
                        "503": _error("Subscriber cap reached or shutting down"),
                    },
                }
            },
            "/v1/events": {
                "post": {
                    "summary": "Publish one event, as the Airflow hook or `runbell emit` would",
                    "description": "Role: publish.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Event"}}}},
                    "responses": {
                        "201": {
                            "description": "Published",
                            "content": {
                                "application/json": {
                                    "schema": {"type": "object", "properties": {"id": {"type": "string"}, "seq": {"type": "integer"}}}
                                }
                            },
                        },
                        "202": {"description": "Redis unreachable: spooled, published later"},
                        "422": _error("Not a valid event"),
                        **_AUTH_ERRORS,
                    },
                }
            },
            **webhook_paths(),
            **runs_paths(),
            **backfills_paths(),
            **asset_paths(),
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "Up"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: Redis, store and pub/sub",
                    "security": [],
                    "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready, with the failing checks"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (role: read)",
                    "responses": {"200": {"description": "text/plain exposition"}, **_AUTH_ERRORS},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }


async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(build_openapi())
