"""The AsyncAPI document of what Runbell pushes: the SSE streams, the webhook deliveries and the bus.

Generated, as the OpenAPI document is, from the models the code sends: every SSE event and webhook
type is listed here with the model of its data (service/http/contract.py, the Outcome, the bus
schema), so a client in another language can be generated from it. What no model holds is written
here once: the event names per stream, the webhook types, the bus's key and channel shapes (from
runbell.bus.keys's documentation).

Committed as service/http/asyncapi.json (installed with the package) and served at /asyncapi.json:
`python -m runbell.service.http.asyncapi --write` writes it, `--check` exits 1 when it differs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse

from runbell.bus.schema import AssetEnvelope, Envelope, Heartbeat, RunState, TaskState
from runbell.service.core.outcome import Outcome
from runbell.service.http.contract import (
    AssetEventBody,
    AssetReady,
    BackfillProgress,
    BackfillSlot,
    InputClosed,
    NeedsInput,
    Recovered,
    RunEnd,
    RunEventBody,
    StreamError,
    StreamShutdown,
)
from runbell.service.http.openapi import document_cli
from runbell.service.webhooks.outbox import PAYLOAD_TYPES
from runbell.service.webhooks.rules import WebhookKind

DOCUMENT = Path(__file__).with_name("asyncapi.json")
SCHEMAS = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Message:
    name: str  # the SSE event name, the webhook type, or the bus message's name
    model: type[BaseModel]
    summary: str


@dataclass(frozen=True)
class Channel:
    key: str
    address: str
    server: str
    description: str
    parameters: tuple[tuple[str, str], ...]
    messages: tuple[Message, ...]


RESUME = "Resume with the Last-Event-ID header (or ?last_event_id=): the id of every event is its position, EPOCH-SEQ."
STREAM_END = (
    Message("error", StreamError, "The stream ends: slow_consumer (reconnect with Last-Event-ID) or run_not_found (do not)"),
    Message("shutdown", StreamShutdown, "The gateway is restarting: reconnect with Last-Event-ID"),
)
SSE_CHANNELS = (
    Channel(
        "runEvents",
        "/v1/dags/{dag_id}/runs/{run_id}/events",
        "gateway",
        "A run's events as Server-Sent Events: replayed after Last-Event-ID, then live, then `end` and the stream closes. " + RESUME,
        (("dag_id", "the DAG (a Metaflow flow)"), ("run_id", "the run")),
        (
            Message("recovery", Recovered, "First, on a resume: whether what follows is exactly what the client missed"),
            Message("task", RunEventBody, "A task instance changed state"),
            Message("run", RunEventBody, "The run changed state"),
            Message("progress", RunEventBody, "A task's partial output (kind progress); it decides nothing"),
            Message("needs_input", NeedsInput, "A task waits for a person (once per request)"),
            Message("input_received", InputClosed, "An input request is closed"),
            Message("outcome", Outcome, "The run's outcome, once decided (the same id as the event that decided it)"),
            Message("end", RunEnd, "The run ended: the stream closes (a reconnect after it gets 204)"),
            *STREAM_END,
        ),
    ),
    Channel(
        "assetEvents",
        "/v1/assets/{name}/events",
        "gateway",
        "An asset's events as Server-Sent Events, never ending. " + RESUME,
        (("name", "the asset's name, percent-encoded"),),
        (
            Message("ready", AssetReady, "First: where the stream starts (its id too)"),
            Message("asset", AssetEventBody, "The asset was updated"),
            *STREAM_END,
        ),
    ),
    Channel(
        "backfillEvents",
        "/v1/backfills/{backfill_id}/events",
        "gateway",
        "A backfill's slots and counts as Server-Sent Events, until every slot's run has ended.",
        (("backfill_id", "Airflow's backfill id"),),
        (
            Message("slot", BackfillSlot, "A slot changed (its run appeared or changed state)"),
            Message("progress", BackfillProgress, "The counts, after each change"),
            Message("end", BackfillProgress, "The final counts: the stream closes"),
        ),
    ),
)

# What a webhook delivery's data is, by kind (runbell.service.webhooks.outbox builds them).
WEBHOOK_DATA: dict[str, tuple[type[BaseModel], str]] = {
    WebhookKind.OUTCOME.value: (Outcome, "The run's outcome, as it stood when decided"),
    WebhookKind.TASK.value: (RunEventBody, "A task event"),
    WebhookKind.RUN.value: (RunEventBody, "A run event"),
    WebhookKind.NEEDS_INPUT.value: (NeedsInput, "A task waits for a person (once per request)"),
    WebhookKind.PROGRESS.value: (RunEventBody, "A task's partial output"),
}

BUS_CHANNELS = (
    Channel(
        "runLive",
        "{namespace}:{{{namespace}:p{partition}.{suffix}}}:live",
        "bus",
        "A partition's shard channel (SPUBLISH). Each message is `<route>\\n<envelope JSON>`: the route (run:<dag>/<run>, "
        "percent-encoded) names the run; the envelope is the replay log's entry, unchanged (the payload below).",
        (("namespace", "RUNBELL_NAMESPACE"), ("partition", "the run's partition (keys.run_partition)"), ("suffix", "keys.partition_tags")),
        (Message("envelope", Envelope, "A run's event with its position"),),
    ),
    Channel(
        "runLog",
        "{namespace}:run:{{{namespace}:p{partition}.{suffix}}}:{dag_id}/{run_id}:log",
        "bus",
        "A run's replay log (a stream; entry id 0-SEQ, field `env`: the envelope JSON). It expires RUNBELL_LOG_TTL_SECONDS after the run's last event.",
        (
            ("namespace", "RUNBELL_NAMESPACE"),
            ("partition", "the run's partition"),
            ("suffix", "keys.partition_tags"),
            ("dag_id", "percent-encoded"),
            ("run_id", "percent-encoded"),
        ),
        (Message("envelope", Envelope, "A run's event with its position"),),
    ),
    Channel(
        "partitionEvents",
        "{namespace}:{{{namespace}:p{partition}.{suffix}}}:events",
        "bus",
        "A partition's stream, read by the gateways' recorder (consumer group): field `env` an envelope, or field `hb` a "
        "running Metaflow step's heartbeat (no event: no seq).",
        (("namespace", "RUNBELL_NAMESPACE"), ("partition", "the partition"), ("suffix", "keys.partition_tags")),
        (Message("envelope", Envelope, "A run's event (field env)"), Message("heartbeat", Heartbeat, "A heartbeat (field hb)")),
    ),
    Channel(
        "assetLog",
        "{namespace}:asset:{{{namespace}:p{partition}.{suffix}}}:{name}:log",
        "bus",
        "An asset's replay log (its last 10,000 events; field `env`). Its live messages go on the partition's shard channel "
        "with the route asset:<name>.",
        (
            ("namespace", "RUNBELL_NAMESPACE"),
            ("partition", "the asset's partition"),
            ("suffix", "keys.partition_tags"),
            ("name", "percent-encoded"),
        ),
        (Message("assetEnvelope", AssetEnvelope, "An asset's event with its position"),),
    ),
)


def build_asyncapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [m.model for c in (*SSE_CHANNELS, *BUS_CHANNELS) for m in c.messages]
    models += [model for model, _ in WEBHOOK_DATA.values()]
    refs, definitions = models_json_schema([(model, "serialization") for model in dict.fromkeys(models)], ref_template=SCHEMAS)
    schemas: dict[str, Any] = definitions["$defs"]
    for enum in (RunState, TaskState):
        schemas[enum.__name__] = TypeAdapter(enum).json_schema()

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return refs[(model, "serialization")]

    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    def add_channel(channel: Channel, action: str, message_ids: dict[str, str]) -> None:
        channels[channel.key] = {
            "address": channel.address,
            "description": channel.description,
            "servers": [{"$ref": f"#/servers/{channel.server}"}],
            "parameters": {name: {"description": says} for name, says in channel.parameters},
            "messages": {name: {"$ref": f"#/components/messages/{message_id}"} for name, message_id in message_ids.items()},
        }
        operations[f"{action}{channel.key[0].upper()}{channel.key[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel.key}"},
            "messages": [{"$ref": f"#/channels/{channel.key}/messages/{name}"} for name in message_ids],
        }

    for channel in (*SSE_CHANNELS, *BUS_CHANNELS):
        ids = {}
        for message in channel.messages:
            message_id = f"{channel.key}.{message.name}"
            ids[message.name] = message_id
            messages[message_id] = {"name": message.name, "summary": message.summary, "payload": ref(message.model)}
            if channel.server == "gateway":
                messages[message_id]["x-sse-event"] = message.name
        add_channel(channel, "receive", ids)

    webhook_ids = {}
    for kind, (model, summary) in WEBHOOK_DATA.items():
        message_id = f"webhook.{PAYLOAD_TYPES[kind]}"
        webhook_ids[PAYLOAD_TYPES[kind]] = message_id
        messages[message_id] = {
            "name": PAYLOAD_TYPES[kind],
            "summary": f"{summary} (subscribe with the kind {kind})",
            "headers": {"$ref": "#/components/schemas/WebhookHeaders"},
            "payload": {
                "type": "object",
                "required": ["type", "timestamp", "data"],
                "properties": {
                    "type": {"const": PAYLOAD_TYPES[kind]},
                    "timestamp": {"type": "string", "format": "date-time", "description": "when the event happened"},
                    "data": {"allOf": [ref(model), {"$ref": "#/components/schemas/DeliveryPosition"}]},
                },
            },
        }
    add_channel(
        Channel(
            "webhook",
            "{endpoint_url}",
            "receiver",
            "What the gateway POSTs to a webhook endpoint (a subscription, or a trigger's callback): Standard Webhooks, "
            "signed; retried until a 2xx; de-duplicate on webhook-id.",
            (("endpoint_url", "the endpoint's URL"),),
            (),
        ),
        "receive",
        webhook_ids,
    )
    schemas["WebhookHeaders"] = {
        "type": "object",
        "required": ["webhook-id", "webhook-timestamp", "webhook-signature"],
        "properties": {
            "webhook-id": {"type": "string", "description": "the message id, the same on every retry and resend"},
            "webhook-timestamp": {"type": "string", "description": "Unix seconds of this attempt"},
            "webhook-signature": {"type": "string", "description": "v1,<base64 HMAC-SHA256 of '{id}.{timestamp}.{body}'>, space-separated"},
        },
    }
    schemas["DeliveryPosition"] = {
        "type": "object",
        "required": ["seq", "terminal"],
        "properties": {
            "seq": {"type": "integer", "description": "the event's sequence number (the deciding event's, for an outcome)"},
            "terminal": {"type": "boolean", "description": "the event ends its task or run (an outcome: always)"},
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Runbell: what it pushes",
            "version": "1",
            "description": "The Server-Sent Event streams of the gateway, the webhook deliveries it posts, and the bus the hook "
            "publishes to (Redis), with the data of each message. The request and answer bodies of the HTTP API are in /openapi.json.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": "localhost:8080",
                "protocol": "http",
                "description": "a Runbell gateway (runbell serve): text/event-stream; a bearer token, or ?access_token=",
                "security": [{"$ref": "#/components/securitySchemes/bearer"}],
            },
            "receiver": {"host": "receiver.example", "protocol": "https", "description": "your webhook endpoint"},
            "bus": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "the Redis the hook publishes to (node, Sentinel or Cluster)",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": dict(sorted(messages.items())),
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"bearer": {"type": "httpBearerToken"}},
        },
    }


async def asyncapi_json(request: Request) -> JSONResponse:
    document = getattr(request.app.state, "asyncapi", None)
    if document is None:
        document = request.app.state.asyncapi = build_asyncapi()
    return JSONResponse(document)


def main(argv: Sequence[str] | None = None) -> int:
    return document_cli(argv, "runbell.service.http.asyncapi", "Runbell's AsyncAPI document.", DOCUMENT, build_asyncapi)


if __name__ == "__main__":
    sys.exit(main())
