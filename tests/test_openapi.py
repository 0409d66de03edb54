"""The OpenAPI document: generated from the route table and the models, committed, served; and one
answer for a malformed body on every endpoint that takes one."""

from __future__ import annotations

import json

import pytest
from starlette.routing import Route

from runbell.bus.schema import EventKind, RunState, TaskState
from runbell.service.core.outcome import DecidedBy, OutcomeStatus
from runbell.service.core.roles import Role
from runbell.service.http import openapi
from runbell.service.http.openapi import OPERATIONS, ContractError, Operation, app_routes, build_openapi, rendered
from runbell.service.webhooks.outbox import MessageStatus, WebhookKind
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, TRIGGER_TOKEN


def test_the_committed_document_is_what_the_code_generates():
    committed = openapi.DOCUMENT.read_text(encoding="utf-8")
    assert committed == rendered(build_openapi(app_routes())), f"run `{openapi.COMMAND}` and commit service/http/openapi.json"


async def test_the_served_document_is_the_committed_one(gateway):
    async with gateway.client(token=None) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == json.loads(openapi.DOCUMENT.read_text(encoding="utf-8"))


def test_check_fails_naming_the_command_when_the_file_differs(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(openapi, "DOCUMENT", stale)
    assert openapi.main(["--check"]) == 1
    assert openapi.COMMAND in capsys.readouterr().err
    assert openapi.main(["--write"]) == 0
    assert openapi.main(["--check"]) == 0
    assert json.loads(stale.read_text(encoding="utf-8")) == build_openapi(app_routes())


async def noop(request):
    raise AssertionError("never called")


def test_a_route_without_an_operation_fails_loudly():
    with pytest.raises(ContractError, match="route 'undocumented' .* has no operation"):
        build_openapi([*app_routes(), Route("/v1/undocumented", noop, name="undocumented")])


def test_an_operation_without_a_route_fails_loudly(monkeypatch):
    monkeypatch.setitem(OPERATIONS, "gone", Operation("Gone", None, {}))
    with pytest.raises(ContractError, match="operation 'gone' names no route"):
        build_openapi(app_routes())


def test_path_parameters_must_match_the_route(monkeypatch):
    routes = [route if route.name != "get_webhook" else Route("/v1/webhooks/{webhook}", noop, name="get_webhook") for route in app_routes()]
    with pytest.raises(ContractError, match="get_webhook"):
        build_openapi(routes)


def test_enums_are_the_code_s():
    schemas = build_openapi(app_routes())["components"]["schemas"]
    for enum in (RunState, TaskState, Role, EventKind, OutcomeStatus, DecidedBy, WebhookKind, MessageStatus):
        assert schemas[enum.__name__]["enum"] == [member.value for member in enum], enum


def test_every_operation_says_its_role_and_open_ones_need_no_token():
    document = build_openapi(app_routes())
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if operation["x-role"] is None:
                assert operation["security"] == [], (path, method)
            else:
                assert Role(operation["x-role"])
                assert {"401", "403"} <= set(operation["responses"]), (path, method)


# -- a malformed body: one status, one shape ------------------------------------------------------

BODY_ROUTES = [(route, OPERATIONS[route.name]) for route in app_routes() if OPERATIONS[route.name].body is not None]


def test_every_endpoint_that_takes_a_body_is_walked():
    assert {route.name for route, _ in BODY_ROUTES} >= {
        "publish_event",
        "trigger_run",
        "create_webhook",
        "update_webhook",
        "rotate_webhook_secret",
        "recover_webhook",
    }


@pytest.mark.parametrize("route, operation", BODY_ROUTES, ids=[route.name for route, _ in BODY_ROUTES])
async def test_a_malformed_body_is_422_with_the_error_shape_everywhere(gateway, route, operation):
    path = route.path.format(dag_id="d", run_id="r", endpoint_id="ep_x", message_id="msg_x", task_id="t")
    [method] = route.methods - {"HEAD"}
    first_field = next(iter(operation.body.model_fields))
    bodies = {
        "not JSON": b"{not json",
        "a JSON array": b"[]",
        "a wrong-typed field": json.dumps({first_field: [[]]}).encode(),
    }
    expected_code = "bad_event" if route.name == "publish_event" else "bad_body"
    async with gateway.client(ADMIN_TOKEN) as client:
        for what, content in bodies.items():
            response = await client.request(method, path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == 422, (what, response.text)
            error = response.json()
            assert set(error) == {"error", "message", "accepted"}, (what, error)
            assert error["error"] == expected_code and error["message"].startswith("the body is not valid: ")
            assert error["accepted"] and all(set(problem) == {"type", "loc", "msg"} for problem in error["accepted"]), what
            if what == "a wrong-typed field":
                assert [first_field] in [problem["loc"][:1] for problem in error["accepted"]]
                assert "[[]]" not in json.dumps(error["accepted"])  # never the input
    document = build_openapi(app_routes())
    answer = document["paths"][route.path][method.lower()]["responses"]["422"]
    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}


async def test_each_operation_s_role_is_the_one_its_handler_demands(gateway):
    """x-role is written in the table: the handler must refuse a token one role below it (403) and
    no token at all (401)."""
    below = {Role.PUBLISH: TRIGGER_TOKEN, Role.TRIGGER: PUBLISH_TOKEN, Role.ADMIN: PUBLISH_TOKEN}
    checked = 0
    async with gateway.client(token=None) as anonymous:
        for route in app_routes():
            role = OPERATIONS[route.name].role
            if role is None:
                continue
            path = route.path.format(
                dag_id="d", run_id="r", endpoint_id="ep_x", message_id="msg_x", backfill_id="1", name="a", letter_id="1", task_id="t"
            )
            [method] = route.methods - {"HEAD"}
            assert (await anonymous.request(method, path)).status_code == 401, route.name
            if role in below:
                lower = await anonymous.request(method, path, headers={"Authorization": f"Bearer {below[role]}"})
                assert (lower.status_code, lower.json()["error"]) == (403, "forbidden"), route.name
            checked += 1
    assert checked == sum(1 for operation in OPERATIONS.values() if operation.role is not None)
