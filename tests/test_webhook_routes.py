"""The webhook API against a real gateway: subscriptions, secrets, validation, auth, inspect and replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, free_port
from tests.test_gateway import publish, until

LOOPBACK_ALLOWED = "127.0.0.1,localhost"
HOOK_URL = "http://127.0.0.1:9/hook"  # never called by these tests: the dispatcher is off unless a test needs it


@pytest.fixture
async def gateway(gateway_factory):
    return await gateway_factory(webhook_allowed_hosts=LOOPBACK_ALLOWED, webhooks=False)


@pytest.fixture
async def admin(gateway):
    async with gateway.client(ADMIN_TOKEN) as client:
        yield client


async def create(admin, **body) -> dict:
    response = await admin.post("/v1/webhooks", json={"url": HOOK_URL, **body})
    assert response.status_code == 201, response.text
    return response.json()


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- subscriptions --------------------------------------------------------------------------------


async def test_create_answers_the_endpoint_with_its_secret_which_is_never_shown_again(admin):
    response = await admin.post("/v1/webhooks", json={"url": HOOK_URL, "description": "billing"})
    assert response.status_code == 201
    created = response.json()
    assert response.headers["location"] == f"/v1/webhooks/{created['id']}"
    assert created["secret"].startswith("whsec_")
    assert {k: created[k] for k in ("url", "description", "dag_ids", "kinds", "enabled")} == {
        "url": HOOK_URL,
        "description": "billing",
        "dag_ids": None,
        "kinds": ["outcome"],
        "enabled": True,
    }
    assert "previous_secret" not in created
    listed = (await admin.get("/v1/webhooks")).json()["webhooks"]
    fetched = (await admin.get(f"/v1/webhooks/{created['id']}")).json()
    assert [w["id"] for w in listed] == [created["id"]]
    for shown in (listed[0], fetched):
        assert "secret" not in shown and "previous_secret" not in shown
        assert created["secret"] not in str(shown)
        assert shown["url"] == HOOK_URL


async def test_filters_and_enabled_flag_are_kept(admin):
    created = await create(admin, dag_ids=["etl", "etl", "report"], kinds=["task", "outcome", "run"], enabled=False)
    assert created["dag_ids"] == ["etl", "report"]
    assert created["kinds"] == ["task", "outcome", "run"]
    assert created["enabled"] is False


async def test_patch_changes_only_what_is_given(admin):
    created = await create(admin, dag_ids=["etl"], description="first")
    path = f"/v1/webhooks/{created['id']}"
    response = await admin.patch(path, json={"description": "second", "kinds": ["run"], "enabled": False})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["description"], changed["kinds"], changed["enabled"], changed["dag_ids"]) == ("second", ["run"], False, ["etl"])
    assert "secret" not in changed
    changed = (await admin.patch(path, json={"dag_ids": None, "url": "http://localhost:9/other"})).json()
    assert (changed["dag_ids"], changed["url"], changed["description"]) == (None, "http://localhost:9/other", "second")
    assert (await admin.get(path)).json() == changed


async def test_patch_checks_the_new_url_and_refuses_nonsense(admin):
    created = await create(admin)
    path = f"/v1/webhooks/{created['id']}"
    refused = await admin.patch(path, json={"url": "http://10.1.2.3/hook"})
    assert refused.status_code == 422 and refused.json()["error"] == "target_refused"
    for body, says in (
        ({}, "nothing to change"),
        ({"url": None}, "url: Input should be a valid string"),
        ({"enabled": None}, "enabled: Input should be a valid boolean"),
        ({"secret": "whsec_x"}, "secret"),
        ({"kinds": ["everything"]}, "'outcome', 'task', 'run', 'needs_input' or 'progress'"),
        ({"url": "ftp://example.com/"}, "http or https"),
    ):
        response = await admin.patch(path, json=body)
        assert (response.status_code, response.json()["error"]) == (422, "bad_body"), body
        assert says in response.json()["message"], body
    assert (await admin.get(path)).json()["url"] == HOOK_URL


async def test_delete_then_the_endpoint_is_gone(admin):
    created = await create(admin)
    path = f"/v1/webhooks/{created['id']}"
    assert (await admin.delete(path)).status_code == 204
    for response in (await admin.get(path), await admin.delete(path), await admin.patch(path, json={"enabled": True})):
        assert response.status_code == 404
        assert response.json()["error"] == "unknown_webhook"
    assert (await admin.get("/v1/webhooks")).json()["webhooks"] == []


# -- secret rotation ------------------------------------------------------------------------------


async def test_rotation_answers_a_new_secret_and_both_sign_for_the_grace_period(gateway, admin):
    created = await create(admin)
    before = now()
    response = await admin.post(f"/v1/webhooks/{created['id']}/rotate-secret")
    assert response.status_code == 200, response.text
    rotated = response.json()
    assert rotated["id"] == created["id"]
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert rotated["grace_seconds"] == 86400
    expires = datetime.fromisoformat(rotated["previous_secret_expires_at"])
    assert before + timedelta(seconds=86400 - 5) <= expires <= now() + timedelta(seconds=86400 + 5)
    endpoint = await gateway.app.state.webhooks.get_endpoint(created["id"])
    assert endpoint.signing_secrets(now()) == [rotated["secret"], created["secret"]]
    assert endpoint.signing_secrets(expires + timedelta(seconds=1)) == [rotated["secret"]]
    shown = (await admin.get(f"/v1/webhooks/{created['id']}")).json()
    assert rotated["secret"] not in str(shown) and created["secret"] not in str(shown)
    assert shown["previous_secret_expires_at"] == rotated["previous_secret_expires_at"]


async def test_rotation_with_no_grace_revokes_the_old_secret_at_once(gateway, admin):
    created = await create(admin)
    rotated = (await admin.post(f"/v1/webhooks/{created['id']}/rotate-secret", json={"grace_seconds": 0})).json()
    endpoint = await gateway.app.state.webhooks.get_endpoint(created["id"])
    assert endpoint.signing_secrets(now() + timedelta(seconds=1)) == [rotated["secret"]]
    bad = await admin.post(f"/v1/webhooks/{created['id']}/rotate-secret", json={"grace_seconds": -1})
    assert (bad.status_code, bad.json()["error"]) == (422, "bad_body")
    missing = await admin.post("/v1/webhooks/nope/rotate-secret")
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_webhook")


async def test_the_grace_period_setting_is_the_default(gateway_factory):
    gateway = await gateway_factory(webhook_allowed_hosts=LOOPBACK_ALLOWED, webhooks=False, webhook_secret_grace=60)
    async with gateway.client(ADMIN_TOKEN) as admin:
        created = await create(admin)
        rotated = (await admin.post(f"/v1/webhooks/{created['id']}/rotate-secret")).json()
    assert rotated["grace_seconds"] == 60
    expires = datetime.fromisoformat(rotated["previous_secret_expires_at"])
    assert abs((expires - now()).total_seconds() - 60) < 5


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field, says",
    [
        ({"url": "ftp://example.com/hook"}, "url", "http or https"),
        ({"url": "https://user:pw@example.com/hook"}, "url", "credentials"),
        ({"url": "not a url"}, "url", "scheme"),
        ({"url": ""}, "url", "at least 1 character"),
        (
            {"url": "http://127.0.0.1:9/", "kinds": ["outcome", "everything"]},
            "kinds.1",
            "'outcome', 'task', 'run', 'needs_input' or 'progress'",
        ),
        ({"url": "http://127.0.0.1:9/", "kinds": []}, "kinds", "at least 1 item"),
        ({"url": "http://127.0.0.1:9/", "dag_ids": []}, "dag_ids", "at least 1 item"),
        ({"url": "http://127.0.0.1:9/", "dag_ids": ["x" * 251]}, "dag_ids.0", "250"),
        ({"url": "http://127.0.0.1:9/", "dag_ids": "etl"}, "dag_ids", "array"),
        ({"url": "http://127.0.0.1:9/", "enabled": "maybe"}, "enabled", "boolean"),
        ({"url": "http://127.0.0.1:9/", "secret": "whsec_mine"}, "secret", "not permitted"),
        ({"description": "no url"}, "url", "required"),
    ],
)
async def test_bad_subscriptions_are_422_naming_each_problem(admin, body, field, says):
    response = await admin.post("/v1/webhooks", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "bad_body"
    assert f"{field}: " in error["message"] and says in error["message"]
    assert [(".".join(map(str, problem["loc"])), says in problem["msg"]) for problem in error["accepted"]] == [(field, True)]


async def test_a_body_that_is_not_json_is_422(admin):
    for content in (b"", b"{not json", b"[]"):
        response = await admin.post("/v1/webhooks", content=content, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error"]) == (422, "bad_body"), content


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 (loopback)"),
        ("http://localhost:8080/hook", "(loopback)"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 (link-local)"),
        ("http://10.0.0.1/hook", "10.0.0.1 (private)"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback IPv4 127.0.0.1 wrapped in IPv6"),
    ],
)
async def test_a_target_inside_the_network_is_refused_unless_allowed(gateway_factory, url, address):
    gateway = await gateway_factory(webhooks=False)  # no allow-list
    async with gateway.client(ADMIN_TOKEN) as admin:
        response = await admin.post("/v1/webhooks", json={"url": url})
        listed = (await admin.get("/v1/webhooks")).json()["webhooks"]
    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "target_refused"
    assert address in error["message"] and "RUNBELL_WEBHOOK_ALLOWED_HOSTS" in error["message"]
    assert error["accepted"] == {"allowed_hosts": [], "setting": "RUNBELL_WEBHOOK_ALLOWED_HOSTS"}
    assert listed == []


async def test_the_allow_list_permits_by_host_or_by_cidr(gateway_factory):
    gateway = await gateway_factory(webhooks=False, webhook_allowed_hosts="localhost,10.0.0.0/8")
    async with gateway.client(ADMIN_TOKEN) as admin:
        assert (await admin.post("/v1/webhooks", json={"url": "http://localhost:9/hook"})).status_code == 201
        assert (await admin.post("/v1/webhooks", json={"url": "http://10.20.30.40/hook"})).status_code == 201
        assert (await admin.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})).status_code == 422
        assert (await admin.post("/v1/webhooks", json={"url": "http://192.168.0.1/hook"})).status_code == 422


async def test_bad_query_parameters_are_400(admin):
    created = await create(admin)
    base = f"/v1/webhooks/{created['id']}"
    for path, params, code in (
        (base + "/attempts", {"limit": "0"}, "bad_limit"),
        (base + "/attempts", {"limit": "many"}, "bad_limit"),
        (base + "/messages", {"limit": "1001"}, "bad_limit"),
        (base + "/messages", {"since": "yesterday"}, "bad_since"),
    ):
        response = await admin.get(path, params=params)
        assert (response.status_code, response.json()["error"]) == (400, code), (path, params)
    for body in ({}, {"since": "yesterday"}, {"since": "2026-01-01T00:00:00Z", "until": "now"}):
        response = await admin.post(base + "/recover", json=body)
        assert (response.status_code, response.json()["error"]) == (422, "bad_body"), body


async def test_unknown_endpoints_and_messages_are_404(admin):
    for method, path, body, code in (
        ("GET", "/v1/webhooks/nope", None, "unknown_webhook"),
        ("GET", "/v1/webhooks/nope/attempts", None, "unknown_webhook"),
        ("GET", "/v1/webhooks/nope/messages", None, "unknown_webhook"),
        ("POST", "/v1/webhooks/nope/recover", {"since": "2026-01-01T00:00:00Z"}, "unknown_webhook"),
        ("GET", "/v1/webhooks/messages/nope", None, "unknown_message"),
        ("POST", "/v1/webhooks/messages/nope/resend", None, "unknown_message"),
    ):
        response = await admin.request(method, path, json=body)
        assert (response.status_code, response.json()["error"]) == (404, code), path


async def test_an_endpoint_without_traffic_has_no_messages_or_attempts(admin):
    created = await create(admin)
    base = f"/v1/webhooks/{created['id']}"
    assert (await admin.get(base + "/messages")).json() == {"messages": []}
    assert (await admin.get(base + "/attempts", params={"limit": 5})).json() == {"attempts": []}
    recovered = await admin.post(base + "/recover", json={"since": (now() - timedelta(days=1)).isoformat()})
    assert (recovered.status_code, recovered.json()) == (202, {"requeued": 0})


# -- auth -----------------------------------------------------------------------------------------

EVERY_ROUTE = [
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{endpoint_id}"),
    ("PATCH", "/v1/webhooks/{endpoint_id}"),
    ("DELETE", "/v1/webhooks/{endpoint_id}"),
    ("POST", "/v1/webhooks/{endpoint_id}/rotate-secret"),
    ("GET", "/v1/webhooks/{endpoint_id}/attempts"),
    ("GET", "/v1/webhooks/{endpoint_id}/messages"),
    ("POST", "/v1/webhooks/{endpoint_id}/recover"),
    ("GET", "/v1/webhooks/messages/{message_id}"),
    ("POST", "/v1/webhooks/messages/{message_id}/resend"),
]


async def test_every_webhook_route_needs_the_admin_role(gateway, admin):
    from runbell.service.http.app import ROUTES

    served = {(method, route.path) for route in ROUTES if route.path.startswith("/v1/webhooks") for method in route.methods - {"HEAD"}}
    assert served == set(EVERY_ROUTE)
    created = await create(admin)
    for token, status in ((READ_TOKEN, 403), (PUBLISH_TOKEN, 403), (None, 401)):
        async with gateway.client(token) as client:
            for method, template in EVERY_ROUTE:
                path = template.format(endpoint_id=created["id"], message_id="m")
                response = await client.request(method, path, json={"url": HOOK_URL, "since": now().isoformat()})
                assert response.status_code == status, (token, method, path)
                assert "whsec_" not in response.text
    assert [w["id"] for w in (await admin.get("/v1/webhooks")).json()["webhooks"]] == [created["id"]]


async def test_the_openapi_document_describes_what_a_receiver_gets(gateway):
    async with gateway.client(token=None) as client:
        delivery = (await client.get("/openapi.json")).json()["webhooks"]["runbell"]["post"]
    assert {p["name"] for p in delivery["parameters"]} == {"webhook-id", "webhook-timestamp", "webhook-signature"}


# -- end to end: a real receiver verifying with standardwebhooks ------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified_by: list[str]  # the secrets (of those the receiver holds) that verify it

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver on a free loopback port (Starlette under uvicorn), verifying each delivery
    with the reference standardwebhooks library against every secret it holds."""

    def __init__(self):
        self.secrets: list[str] = []
        self.deliveries: list[Delivery] = []
        self.status = 204

    async def hook(self, request):
        from standardwebhooks import Webhook
        from standardwebhooks.webhooks import WebhookVerificationError
        from starlette.responses import Response

        body, headers = await request.body(), dict(request.headers)
        verified_by = []
        for secret in self.secrets:
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(body, headers)
                verified_by.append(secret)
        self.deliveries.append(Delivery(headers, body, verified_by))
        return Response(status_code=self.status)

    async def __aenter__(self) -> Receiver:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        port = free_port()
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        self.server.capture_signals = contextlib.nullcontext  # pytest owns the signals
        self.task = asyncio.create_task(self.server.serve())
        await until(lambda: self.server.started)
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)

    async def wait_for(self, count: int) -> list[Delivery]:
        await until(lambda: len(self.deliveries) >= count, timeout=20)
        return self.deliveries


@pytest.fixture
async def delivering(gateway_factory):
    """A gateway whose dispatcher delivers, to receivers on loopback."""
    return await gateway_factory(webhook_allowed_hosts=LOOPBACK_ALLOWED)


async def test_an_outcome_is_posted_signed_and_resend_and_recover_redeliver_it(delivering):
    gateway = delivering
    async with Receiver() as receiver, gateway.client(ADMIN_TOKEN) as admin:
        endpoint = await create_at(admin, receiver.url, dag_ids=["etl"])
        other = await create_at(admin, receiver.url, dag_ids=["another_dag"])
        receiver.secrets = [endpoint["secret"], other["secret"]]
        await publish(gateway, "r1", "running")
        await publish(gateway, "r1", "running", task_id="answer", result_task=True)
        seq = await publish(gateway, "r1", "success", task_id="answer", result_task=True, result={"answer": 42})

        first = (await receiver.wait_for(1))[0]
        assert first.verified_by == [endpoint["secret"]]  # signed with this endpoint's secret only
        message_id = first.headers["webhook-id"]
        payload = first.payload
        assert payload["type"] == "run.outcome"
        data = payload["data"]
        assert (data["status"], data["result"], data["decided_by"], data["seq"], data["terminal"]) == (
            "success",
            {"answer": 42},
            "result_task",
            seq,
            True,
        )
        assert (data["dag_id"], data["run_id"]) == ("etl", "r1")

        listed = (await admin.get(f"/v1/webhooks/{endpoint['id']}/messages")).json()["messages"]
        assert [m["id"] for m in listed] == [message_id]
        assert listed[0]["payload"] == payload and listed[0]["kind"] == "outcome"
        assert (await admin.get(f"/v1/webhooks/{other['id']}/messages")).json()["messages"] == []
        shown = await until_json(admin, f"/v1/webhooks/messages/{message_id}", lambda m: m["status"] == "delivered")
        assert [a["status_code"] for a in shown["attempt_log"]] == [204]
        assert shown["attempt_log"][0]["duration_ms"] >= 0

        resent = await admin.post(f"/v1/webhooks/messages/{message_id}/resend")
        assert resent.status_code == 202 and resent.json()["id"] == message_id
        second = (await receiver.wait_for(2))[1]
        assert second.headers["webhook-id"] == message_id and second.body == first.body
        assert second.verified_by == [endpoint["secret"]]

        rotated = (await admin.post(f"/v1/webhooks/{endpoint['id']}/rotate-secret")).json()
        receiver.secrets = [rotated["secret"], endpoint["secret"]]
        since = (datetime.fromisoformat(endpoint["created_at"]) - timedelta(seconds=1)).isoformat()
        recovered = await admin.post(f"/v1/webhooks/{endpoint['id']}/recover", json={"since": since})
        assert (recovered.status_code, recovered.json()) == (202, {"requeued": 1})
        third = (await receiver.wait_for(3))[2]
        assert third.headers["webhook-id"] == message_id and third.body == first.body
        assert len(third.headers["webhook-signature"].split(" ")) == 2
        assert third.verified_by == [rotated["secret"], endpoint["secret"]]  # each secret verifies on its own

        attempts = await until_json(admin, f"/v1/webhooks/{endpoint['id']}/attempts", lambda body: len(body["attempts"]) == 3)
        assert {a["message_id"] for a in attempts["attempts"]} == {message_id}
        assert len(receiver.deliveries) == 3  # nothing for the other endpoint, nothing twice


async def test_an_endpoint_of_run_events_gets_each_in_order_with_its_seq_and_terminal_flag(delivering):
    gateway = delivering
    async with Receiver() as receiver, gateway.client(ADMIN_TOKEN) as admin:
        endpoint = await create_at(admin, receiver.url, kinds=["run"])
        receiver.secrets = [endpoint["secret"]]
        await publish(gateway, "r2", "running")
        await publish(gateway, "r2", "running", task_id="extract")
        await publish(gateway, "r2", "success")
        deliveries = await receiver.wait_for(2)
        await asyncio.sleep(0.3)  # nothing else comes: no task events, no outcome
    assert len(receiver.deliveries) == 2
    assert all(d.verified_by == [endpoint["secret"]] for d in deliveries)
    payloads = sorted((d.payload for d in deliveries), key=lambda p: p["data"]["seq"])
    assert [(p["type"], p["data"]["state"], p["data"]["seq"], p["data"]["terminal"]) for p in payloads] == [
        ("run.state", "running", 1, False),
        ("run.state", "success", 3, True),
    ]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 2


async def create_at(admin, url: str, **body) -> dict:
    response = await admin.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    return response.json()


async def until_json(client, path: str, predicate, timeout: float = 10.0) -> dict:
    """GET the path until its JSON satisfies the predicate (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            body = (await client.get(path)).json()
            if predicate(body):
                return body
            await asyncio.sleep(0.05)
