"""Least privilege: every endpoint x role x a DAG in and out of the token's scope, against a real gateway.

The table says the expected status of each request; the cases issue 11 names are in it: a publish
token deciding another DAG's run, and a publish token triggering (or unpausing) a DAG.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from runbell.bus.schema import Event, EventKind
from runbell.service.core.roles import MAX_PATTERNS, DagScope, Grant, Role, parse_tokens
from runbell.service.http.auth import issue_run_token
from runbell.service.store.store import RunQuery
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, TOKENS, TRIGGER_TOKEN
from tests.test_backfills import airflow_db  # noqa: F401  (a fixture)
from tests.test_gateway import until, waiting
from tests.test_runs import run_envelopes

IN, OUT = "etl_daily", "billing"  # a DAG inside the scoped tokens' scope, and one outside it
READ_ETL, PUBLISH_ETL, TRIGGER_ETL = "read-etl", "publish-etl", "trigger-etl"
SCOPED = f"{READ_ETL}:read@etl_*,{PUBLISH_ETL}:publish@etl_*|etl,{TRIGGER_ETL}:trigger@etl_*"
SECRET = "scopes-test-secret-of-at-least-32-bytes"


@pytest.fixture
async def scoped_gateway(gateway_factory, stand_in_airflow):
    stand_in_airflow.dags = {IN: {"dag_id": IN, "is_paused": True}, OUT: {"dag_id": OUT, "is_paused": True}}
    gateway = await gateway_factory(tokens=f"{TOKENS},{SCOPED}", airflow_url=stand_in_airflow.url, token_secret=SECRET)
    gateway.airflow = stand_in_airflow
    return gateway


def event(dag_id: str, run_id: str = "r1", **kw) -> str:
    """A decisive event: the result task succeeded (it decides the run's outcome)."""
    fields = dict(kind=EventKind.TASK, state="success", task_id="answer", result_task=True, critical=True)
    return Event(dag_id=dag_id, run_id=run_id, **{**fields, **kw}).to_json()


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    token: str
    status: int
    error: str | None = None  # the error code of a 4xx
    body: str | None = None


def row(method: str, path: str, expected: dict[str, int | tuple[int, str]], body: str | None = None) -> list[Case]:
    out = []
    for token, answer in expected.items():
        status, error = answer if isinstance(answer, tuple) else (answer, None)
        out.append(Case(method, path, token, status, error, body))
    return out


FORBIDDEN, SCOPE = (403, "forbidden"), (403, "token_scope")
RESULT = "/v1/dags/{dag}/runs/r1/result?timeout=0"

# endpoint x token (role, scope) -> status. A 2xx or a 404 means: past authorization.
TABLE: list[Case] = [
    # publish: the event's DAG
    *row("POST", "/v1/events", {PUBLISH_ETL: 201, ADMIN_TOKEN: 201, READ_ETL: FORBIDDEN, TRIGGER_ETL: FORBIDDEN}, event(IN, "p-in")),
    *row("POST", "/v1/events", {PUBLISH_ETL: SCOPE, PUBLISH_TOKEN: 201, READ_ETL: FORBIDDEN}, event(OUT, "p-out")),
    *row("POST", "/v1/events", {PUBLISH_ETL: 201}, event("etl", "p-exact")),  # the second pattern, exact
    *row("POST", "/v1/events", {PUBLISH_ETL: SCOPE}, event("ETL_daily", "p-case")),  # case-sensitive
    # trigger (wait=0): the trigger role, on the path's DAG; publish may not trigger (issue 11)
    *row(
        "POST",
        f"/v1/dags/{IN}/runs?wait=0&unpause=true",
        {TRIGGER_ETL: 202, TRIGGER_TOKEN: 202, ADMIN_TOKEN: 202, PUBLISH_ETL: FORBIDDEN, PUBLISH_TOKEN: FORBIDDEN, READ_ETL: FORBIDDEN},
    ),
    *row("POST", f"/v1/dags/{OUT}/runs?wait=0&unpause=true", {TRIGGER_ETL: SCOPE, PUBLISH_TOKEN: FORBIDDEN, PUBLISH_ETL: FORBIDDEN}),
    # a run's long-poll, events, detail: the path's DAG (read, publish and trigger read)
    *row("GET", RESULT.format(dag=IN), {READ_ETL: 202, PUBLISH_ETL: 202, TRIGGER_ETL: 202, READ_TOKEN: 202}),
    *row("GET", RESULT.format(dag=OUT), {READ_ETL: SCOPE, PUBLISH_ETL: SCOPE, TRIGGER_ETL: SCOPE, READ_TOKEN: 202}),
    *row("GET", f"/v1/dags/{OUT}/runs/r1/events", {READ_ETL: SCOPE, TRIGGER_ETL: SCOPE}),
    *row("GET", f"/v1/dags/{IN}/runs/r1", {READ_ETL: (404, "run_not_found"), READ_TOKEN: (404, "run_not_found")}),
    *row("GET", f"/v1/dags/{OUT}/runs/r1", {READ_ETL: SCOPE, PUBLISH_ETL: SCOPE, READ_TOKEN: (404, "run_not_found")}),
    # listings: one DAG named must be in scope; without one, the scoped token's rows are filtered (below)
    *row("GET", f"/v1/dags/{IN}/runs", {READ_ETL: 200, READ_TOKEN: 200}),
    *row("GET", f"/v1/dags/{OUT}/runs", {READ_ETL: SCOPE, TRIGGER_ETL: SCOPE, READ_TOKEN: 200}),
    *row("GET", f"/v1/runs?dag_id={OUT}", {READ_ETL: SCOPE, READ_TOKEN: 200}),
    *row("GET", "/v1/runs", {READ_ETL: 200, READ_TOKEN: 200}),
    # spanning DAGs: a token for every DAG
    *row("GET", "/v1/assets/s3://lake/orders/next?timeout=0", {READ_ETL: SCOPE, PUBLISH_ETL: SCOPE, READ_TOKEN: 202}),
    *row("GET", "/metrics", {READ_ETL: SCOPE, READ_TOKEN: 200}),
    *row("GET", "/v1/webhooks", {READ_ETL: FORBIDDEN, PUBLISH_ETL: FORBIDDEN, TRIGGER_ETL: FORBIDDEN, ADMIN_TOKEN: 200}),
    # backfills without Airflow's database: every token that passes the role check is told so
    *row("GET", "/v1/backfills/1/runs", {READ_ETL: 503, READ_TOKEN: 503}),
    # the dashboard's page is open (its data calls are the endpoints above)
    *row("GET", "/", {READ_ETL: 200}),
]


async def test_every_endpoint_role_and_scope(scoped_gateway):
    gateway = scoped_gateway
    results = []
    for case in TABLE:
        async with gateway.client(case.token) as client:
            headers = {"content-type": "application/json"} if case.body else {}
            response = await client.request(case.method, case.path, content=case.body, headers=headers)
        got = (response.status_code, response.json().get("error") if response.status_code >= 400 else None)
        want = (case.status, case.error if case.status >= 400 else None)
        if case.status >= 400 and case.error is None:
            got = (got[0], None)
        results.append((case.method, case.path, case.token, got, want))
    wrong = [r for r in results if r[3] != r[4]]
    assert not wrong, "\n".join(f"{m} {p} as {t}: got {g}, want {w}" for m, p, t, g, w in wrong)
    # Out of scope, nothing happened: the other DAG is still paused and was never triggered.
    airflow = gateway.airflow
    assert airflow.dags[OUT]["is_paused"] is True and all(run[0] == IN for run in airflow.runs)
    assert len(airflow.runs) == 3 and airflow.dags[IN]["is_paused"] is False


async def test_a_publish_token_cannot_decide_another_dags_run(scoped_gateway):
    """The forged outcome never reaches the waiter of the other DAG's run (issue 11's first case)."""
    gateway = scoped_gateway
    async with gateway.client(READ_TOKEN) as reader, gateway.client(PUBLISH_ETL) as publisher:
        waiter = asyncio.create_task(reader.get(f"/v1/dags/{OUT}/runs/forged/result", params={"timeout": 3}))
        await until(waiting(gateway))
        forged = await publisher.post("/v1/events", content=event(OUT, "forged"), headers={"content-type": "application/json"})
        assert (forged.status_code, forged.json()["error"]) == (403, "token_scope")
        assert "billing" not in forged.text  # the answer names no DAG
        answer = await waiter
    assert answer.status_code == 202 and answer.json()["status"] == "pending"


async def test_the_runs_listing_holds_the_scoped_tokens_dags_only(scoped_gateway):
    gateway = scoped_gateway
    for dag_id in (IN, OUT, "etl_hourly", "ETL_upper", "etlXdaily"):
        async with gateway.client(ADMIN_TOKEN) as admin:
            for envelope in run_envelopes(dag_id, "r1", "queued"):
                assert (await admin.post("/v1/events", content=envelope.event.to_json())).status_code == 201
    store = gateway.app.state.store
    deadline = time.monotonic() + 20  # the recorder stores them
    while len(await store.list_runs(RunQuery(limit=10))) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    async with gateway.client(READ_ETL) as scoped, gateway.client(READ_TOKEN) as everything:
        mine = (await scoped.get("/v1/runs")).json()["runs"]
        every = (await everything.get("/v1/runs")).json()["runs"]
        paged = (await scoped.get("/v1/runs", params={"limit": 1})).json()
    assert sorted(r["dag_id"] for r in mine) == ["etl_daily", "etl_hourly"]
    assert len(every) == 5
    assert len(paged["runs"]) == 1 and paged["next_cursor"]  # a full page: filtered in the database


async def test_a_run_scoped_token_opens_its_runs_three_endpoints_only(scoped_gateway):
    gateway = scoped_gateway
    token, _ = issue_run_token(SECRET, IN, "r1", 60)
    async with gateway.client(ADMIN_TOKEN) as admin:
        for envelope in run_envelopes(IN, "r1", "success"):
            assert (await admin.post("/v1/events", content=envelope.event.to_json())).status_code == 201
    async with gateway.client(token) as run_token, gateway.client(token=None) as anonymous:
        assert (await run_token.get(f"/v1/dags/{IN}/runs/r1/result", params={"timeout": 0})).status_code == 200
        by_query = await anonymous.get(f"/v1/dags/{IN}/runs/r1/events", params={"access_token": token})
        assert by_query.status_code == 200 and "event: end" in by_query.text
        detail = await run_token.get(f"/v1/dags/{IN}/runs/r1")
        assert detail.status_code in (200, 404)  # past authorization (404 until the recorder has it)
        refused = {
            "another run": await run_token.get(f"/v1/dags/{IN}/runs/r2/result", params={"timeout": 0}),
            "another DAG": await run_token.get(f"/v1/dags/{OUT}/runs/r1/result", params={"timeout": 0}),
            "its DAG's listing": await run_token.get(f"/v1/dags/{IN}/runs"),
            "the listing": await run_token.get("/v1/runs"),
            "assets": await run_token.get("/v1/assets/a/next", params={"timeout": 0}),
            "metrics": await run_token.get("/metrics"),
            "publishing": await run_token.post("/v1/events", content=event(IN, "r1")),
            "triggering": await run_token.post(f"/v1/dags/{IN}/runs", params={"wait": 0}),
            "webhooks": await run_token.get("/v1/webhooks"),
        }
    assert {what: r.status_code for what, r in refused.items()} == dict.fromkeys(refused, 403)


def test_token_syntax_scopes_and_bounds():
    tokens = parse_tokens("a:read, b:publish@etl_*|billing, c:trigger@*, d:admin@*, e:with:colon:read@x")
    assert tokens["a"] == Grant(Role.READ) and tokens["a"].dags.every_dag  # no @: every DAG, as before
    assert tokens["b"] == Grant(Role.PUBLISH, DagScope(("etl_*", "billing")))
    assert tokens["c"].dags.every_dag and tokens["d"].role is Role.ADMIN
    assert tokens["e:with:colon"] == Grant(Role.READ, DagScope(("x",)))
    scope = tokens["b"].dags
    assert [scope.allows(d) for d in ("etl_", "etl_x.y/z", "billing", "ETL_x", "etl", "billing2", "xetl_a")] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert DagScope(("a?c", "[x]", "%")).allows("a?c") and not DagScope(("a?c",)).allows("abc")  # only * is special
    too_many = "|".join(f"d{i}" for i in range(MAX_PATTERNS + 1))
    for bad in (f"s3cret:read@{too_many}", "s3cret:read@", "s3cret:read@a||b", f"s3cret:read@{'x' * 251}", "s3cret:admin@etl_*"):
        with pytest.raises(ValueError) as refused:
            parse_tokens(bad)
        assert "s3cret" not in str(refused.value)
    with pytest.raises(ValueError, match="more than 1000 tokens"):
        parse_tokens(",".join(f"t{i}:read" for i in range(1001)))


async def test_scope_patterns_in_sql_are_exact_and_case_sensitive(store):
    """The listing's filter in SQL (GLOB on SQLite, LIKE on PostgreSQL) agrees with DagScope.allows:
    LIKE's _ and %, GLOB's ? and [ are literal characters of a pattern."""
    dag_ids = ["etl_a", "etlXa", "ETL_a", "etl_", "e%l", "eXl", "a[b]", "ab", "a?", "ab2", "x\\y", "x\\\\y"]
    await store.record([e for dag_id in dag_ids for e in run_envelopes(dag_id, "r1", "queued")])
    patterns = [("etl_*",), ("e%l",), ("a[b]",), ("a?",), ("x\\y",), ("*a",), ("etl_a", "ab*")]
    for scope in map(DagScope, patterns):
        rows = await store.list_runs(RunQuery(dag_patterns=scope.patterns, limit=100))
        assert sorted(r.dag_id for r in rows) == sorted(d for d in dag_ids if scope.allows(d)), scope


async def test_backfills_are_scoped_by_their_dag(database_url, airflow_db, gateway_factory):
    gateway = await gateway_factory(database_url=database_url, airflow_database_url=airflow_db.url, tokens=f"{TOKENS},{SCOPED}")
    mine, theirs = await airflow_db.backfill(IN), await airflow_db.backfill(OUT)
    await airflow_db.slot(mine, 1, run_id="b1", dag_id=IN, state="success")
    await airflow_db.slot(theirs, 1, run_id="b2", dag_id=OUT, state="success")
    async with gateway.client(READ_ETL) as scoped, gateway.client(token=None) as anonymous:
        statuses = {
            "mine": (await scoped.get(f"/v1/backfills/{mine}/runs")).status_code,
            "theirs": (await scoped.get(f"/v1/backfills/{theirs}/runs")).status_code,
            "my events": (await anonymous.get(f"/v1/backfills/{mine}/events", params={"access_token": READ_ETL})).status_code,
            "their events": (await anonymous.get(f"/v1/backfills/{theirs}/events", params={"access_token": READ_ETL})).status_code,
            "unknown": (await scoped.get("/v1/backfills/999999/runs")).status_code,
        }
    assert statuses == {"mine": 200, "theirs": 403, "my events": 200, "their events": 403, "unknown": 404}
