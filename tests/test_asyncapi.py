"""The AsyncAPI document: committed as generated, every reference resolves, and what the gateway really
sends (a live SSE stream of a run, the webhook payloads of the outbox) validates against it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from runbell.bus.schema import Envelope, Event, EventKind, InputRequest, Progress, ProgressItem, Result
from runbell.listeners.partial_output import emit_progress
from runbell.listeners.publisher import emit
from runbell.service.http import asyncapi
from runbell.service.http.asyncapi import DOCUMENT, build_asyncapi
from runbell.service.http.openapi import rendered
from runbell.service.webhooks.outbox import PAYLOAD_TYPES, WebhookOutbox, WebhookStore
from tests.test_gateway import read_sse

DOC = build_asyncapi()


def test_the_committed_document_is_what_the_code_generates() -> None:
    assert DOCUMENT.read_text(encoding="utf-8") == rendered(DOC), "run `python -m runbell.service.http.asyncapi --write` and commit it"


def test_check_fails_naming_the_command_when_the_file_differs(tmp_path, monkeypatch, capsys) -> None:
    stale = tmp_path / "asyncapi.json"
    stale.write_text("{}")
    monkeypatch.setattr(asyncapi, "DOCUMENT", stale)
    assert asyncapi.main(["--check"]) == 1
    assert "python -m runbell.service.http.asyncapi --write" in capsys.readouterr().err
    assert asyncapi.main(["--write"]) == 0 and asyncapi.main(["--check"]) == 0


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = DOC
    for part in pointer[2:].split("/"):
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref" and isinstance(v, str)] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_reference_resolves_and_every_operation_sends_its_channels_messages() -> None:
    found = refs(DOC)
    assert len(found) > 50
    for pointer in found:
        assert resolve(pointer) is not None
    for name, operation in DOC["operations"].items():
        channel = resolve(operation["channel"]["$ref"])
        assert [m["$ref"].rsplit("/", 1)[1] for m in operation["messages"]] == list(channel["messages"]), name
        for parameter in channel["parameters"]:
            assert "{" + parameter + "}" in channel["address"], (name, parameter)
    assert set(DOC["channels"]) == {
        "runEvents",
        "assetEvents",
        "backfillEvents",
        "webhook",
        "runLive",
        "runLog",
        "partitionEvents",
        "assetLog",
    }
    assert set(DOC["channels"]["webhook"]["messages"]) == set(PAYLOAD_TYPES.values())


def validator(message_id: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/messages/{message_id}/payload", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(schema)


async def test_a_live_run_stream_sends_only_documented_events_each_as_documented(gateway) -> None:
    run_id = "documented"
    publisher = gateway.publisher()
    asks = InputRequest(subject="Ship?", options=["Yes", "No"])

    async def run() -> None:
        await asyncio.sleep(0.3)
        for kw in (
            {"state": "running"},
            {"state": "running", "task_id": "answer", "result_task": True},
        ):
            await asyncio.to_thread(emit, "etl", run_id, publisher=publisher, **kw)
        ask = Event(kind=EventKind.TASK, dag_id="etl", run_id=run_id, task_id="approve", state="awaiting_input", input_request=asks)
        await asyncio.to_thread(publisher.publish, ask)
        await asyncio.to_thread(emit_progress, "etl", run_id, "answer", {"pct": 50}, key="percent", publisher=publisher)
        await asyncio.to_thread(emit, "etl", run_id, "running", task_id="approve", publisher=publisher)
        await asyncio.to_thread(emit, "etl", run_id, "success", task_id="answer", result_task=True, result=[1, 2], publisher=publisher)
        await asyncio.to_thread(emit, "etl", run_id, "success", publisher=publisher)

    async with gateway.client() as client:
        publishing = asyncio.create_task(run())
        status, _, events = await read_sse(client, f"/v1/dags/etl/runs/{run_id}/events")
        await publishing
    assert status == 200
    documented = DOC["channels"]["runEvents"]["messages"]
    names = [event.event for event in events if event.data]
    assert {"task", "run", "progress", "needs_input", "input_received", "outcome", "end"} <= set(names)
    for event in events:
        if not event.data:
            continue  # the opening comment
        assert event.event in documented, event.event
        validator(f"runEvents.{event.event}").validate(event.json())


async def test_every_webhook_payload_validates_against_its_message(store) -> None:
    store.outbox = WebhookOutbox()
    webhooks = WebhookStore(store)
    endpoint = await webhooks.create_endpoint(url="https://example.com/all", kinds=list(asyncapi.WEBHOOK_DATA))
    events = [
        Event(kind=EventKind.RUN, dag_id="etl", run_id="r", state="running"),
        Event(
            kind=EventKind.TASK,
            dag_id="etl",
            run_id="r",
            task_id="approve",
            state="awaiting_input",
            input_request=InputRequest(subject="?", options=["ok"]),
        ),
        Event(
            kind=EventKind.PROGRESS,
            dag_id="etl",
            run_id="r",
            task_id="answer",
            state="running",
            progress=Progress(items=[ProgressItem(value="Hel")]),
        ),
        Event(
            kind=EventKind.TASK,
            dag_id="etl",
            run_id="r",
            task_id="answer",
            state="success",
            result_task=True,
            result=Result(value=1, size=1),
        ),
    ]
    await store.record([Envelope(seq=i, event=e) for i, e in enumerate(events, start=1)])
    messages = await webhooks.messages(endpoint.id, limit=100)
    assert {m.kind for m in messages} == set(asyncapi.WEBHOOK_DATA)
    for message in messages:
        payload = json.loads(message.payload)
        validator(f"webhook.{payload['type']}").validate(payload)


@pytest.mark.parametrize("path", ["/asyncapi.json"])
async def test_the_served_document_is_the_committed_one(gateway, path) -> None:
    async with gateway.client(token=None) as client:
        response = await client.get(path)
    assert response.status_code == 200 and response.json() == json.loads(DOCUMENT.read_text())
