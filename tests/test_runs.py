"""The runs listing and one run's detail, on PostgreSQL and SQLite (runs recorded through Store.record):
filters in SQL, status forms, order with and without logical_date, limits, cursors (malformed,
tampered, foreign), the Link header, stale runs, and 10,000 runs paged while new ones arrive."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from runbell.bus.schema import Envelope, ErrorInfo, Event, EventKind, Result
from runbell.service.http.app import create_app
from runbell.service.settings import Settings
from runbell.service.store.store import RUN_STATES
from tests.conftest import READ_TOKEN, TOKENS

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)
SECRET = "a-token-secret-of-at-least-32-bytes!!"


def ts_of(moment: datetime) -> float:
    return moment.timestamp()


def run_envelopes(
    dag_id: str,
    run_id: str,
    state: str = "success",
    *,
    run_after: datetime = BASE,
    logical_date: datetime | None = None,
    run_type: str | None = "scheduled",
    backfill_id: str | None = None,
    last_event: float | None = None,
) -> list[Envelope]:
    """A run's events up to `state`: queued, running, a result task, then success or failure.
    Events are stamped `last_event` (default: now) so silence is measured from there."""
    at = time.time() if last_event is None else last_event
    fields = dict(
        run_type=run_type,
        run_after=run_after.isoformat(),
        logical_date=logical_date.isoformat() if logical_date else None,
        backfill_id=backfill_id,
    )
    events = [Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state="queued", ts=at, **fields)]
    if state in ("running", "success", "failed"):
        events.append(Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state="running", ts=at, **fields))
    if state == "success":
        events.append(
            Event(
                kind=EventKind.TASK,
                dag_id=dag_id,
                run_id=run_id,
                task_id="answer",
                state="success",
                ts=at,
                try_number=1,
                result_task=True,
                result=Result(value=42, size=2),
            )
        )
        events.append(Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state="success", ts=at, **fields))
    if state == "failed":
        events.append(
            Event(
                kind=EventKind.TASK,
                dag_id=dag_id,
                run_id=run_id,
                task_id="load",
                state="failed",
                ts=at,
                try_number=2,
                error=ErrorInfo(type="KeyError", message="'id'"),
            )
        )
        events.append(Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state="failed", ts=at, **fields))
    return [Envelope(seq=i, event=e) for i, e in enumerate(events, start=1)]


def single_event_run(dag_id: str, run_id: str, state: str, run_after: datetime, logical_date: datetime | None = None) -> Envelope:
    """A run told by one run event (what the reconciler publishes for a run it finds in Airflow)."""
    event = Event(
        kind=EventKind.RUN,
        dag_id=dag_id,
        run_id=run_id,
        state=state,
        run_type="scheduled",
        run_after=run_after.isoformat(),
        logical_date=logical_date.isoformat() if logical_date else None,
    )
    return Envelope(seq=1, event=event)


@pytest.fixture
async def api(store, database_url):
    """The gateway's routes over this test's store (PostgreSQL and SQLite), without Redis."""
    app = create_app(Settings(tokens=TOKENS, database_url=database_url, token_secret=SECRET))
    app.state.store = store
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", headers={"Authorization": f"Bearer {READ_TOKEN}"}) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


async def page_all(api, url: str, params: dict | None = None, limit: int = 7) -> list[dict]:
    """Every row by following next_cursor; checks that the Link header says the same."""
    rows: list[dict] = []
    response = await api.get(url, params={**(params or {}), "limit": limit})
    while True:
        assert response.status_code == 200, response.text
        body = response.json()
        rows += body["runs"]
        if body["next_cursor"] is None:
            assert "link" not in response.headers
            return rows
        link = response.headers["link"]
        assert link.endswith('>; rel="next"') and link.startswith("</")
        response = await api.get(link[1 : link.index(">")])


def ids(rows: list[dict]) -> list[str]:
    return [r["run_id"] for r in rows]


# -- the listing ----------------------------------------------------------------------------------


@pytest.fixture
async def mixed(store) -> dict[str, dict]:
    """Twelve runs over two DAGs, every state, run types, a backfill, with and without logical_date."""
    specs = {
        "m1": ("etl", "success", "manual", None, None),
        "m2": ("etl", "failed", "manual", None, None),
        "s1": ("etl", "running", "scheduled", None, BASE - timedelta(days=1)),
        "s2": ("etl", "queued", "scheduled", None, BASE - timedelta(days=2)),
        "b1": ("etl", "success", "backfill", "7", BASE - timedelta(days=10)),
        "b2": ("etl", "failed", "backfill", "7", BASE - timedelta(days=9)),
        "b3": ("etl", "running", "backfill", "8", BASE - timedelta(days=8)),
        "a1": ("report", "success", "asset_triggered", None, None),
        "a2": ("report", "running", "asset_triggered", None, None),
        "r1": ("report", "queued", "manual", None, None),
        "r2": ("report", "success", "scheduled", None, BASE - timedelta(days=3)),
        "r3": ("report", "failed", "scheduled", None, BASE - timedelta(days=4)),
    }
    envelopes = []
    made = {}
    for i, (run_id, (dag_id, state, run_type, backfill_id, logical_date)) in enumerate(specs.items()):
        run_after = BASE + timedelta(hours=i)
        envelopes += run_envelopes(
            dag_id, run_id, state, run_after=run_after, logical_date=logical_date, run_type=run_type, backfill_id=backfill_id
        )
        made[run_id] = dict(
            dag_id=dag_id, state=state, run_type=run_type, backfill_id=backfill_id, logical_date=logical_date, run_after=run_after
        )
    await store.record(envelopes)
    return made


async def test_rows_newest_first_with_every_field(api, mixed):
    response = await api.get("/v1/runs")
    assert response.status_code == 200
    body = response.json()
    assert body["next_cursor"] is None and "link" not in response.headers
    assert ids(body["runs"]) == list(reversed(mixed))  # run_after ascends with the spec order
    by_id = {r["run_id"]: r for r in body["runs"]}
    assert by_id["m1"] == {
        "dag_id": "etl",
        "run_id": "m1",
        "state": "success",
        "logical_date": None,
        "run_after": mixed["m1"]["run_after"].isoformat(),
        "run_type": "manual",
        "backfill_id": None,
        "started": by_id["m1"]["started"],
        "ended": by_id["m1"]["ended"],
        "outcome": "success",
        "result_task": {"task_id": "answer", "map_index": -1, "try_number": 1, "is_ref": False, "size": 2},
        "first_failure": None,
        "stale": False,
    }
    assert by_id["m1"]["started"] and by_id["m1"]["ended"]
    assert by_id["m2"]["outcome"] == "failed" and by_id["m2"]["result_task"] is None
    assert by_id["m2"]["first_failure"] == {
        "task_id": "load",
        "map_index": -1,
        "try_number": 2,
        "error": {"type": "KeyError", "message": "'id'"},
    }
    assert by_id["s2"] | {} and by_id["s2"]["outcome"] == "pending" and by_id["s2"]["started"] is None
    assert by_id["b1"]["logical_date"] == (BASE - timedelta(days=10)).isoformat()
    assert by_id["b1"]["backfill_id"] == "7"


async def test_each_filter(api, mixed):
    async def listed(url="/v1/runs", **params) -> set[str]:
        response = await api.get(url, params=params)
        assert response.status_code == 200, response.text
        return set(ids(response.json()["runs"]))

    def expect(**match) -> set[str]:
        return {k for k, v in mixed.items() if all(v[f] == want for f, want in match.items())}

    assert await listed(dag_id="report") == expect(dag_id="report")
    assert await listed("/v1/dags/report/runs") == expect(dag_id="report")
    assert await listed("/v1/dags/nope/runs") == set()
    for run_type in ("manual", "scheduled", "backfill", "asset_triggered"):
        assert await listed(run_type=run_type) == expect(run_type=run_type)
    assert await listed(backfill_id="7") == {"b1", "b2"}
    assert await listed(backfill_id="7", status="failed") == {"b2"}
    assert await listed("/v1/dags/etl/runs", run_type="backfill", status="running") == {"b3"}
    for state in ("queued", "running", "success", "failed"):
        assert await listed(status=state) == expect(state=state)
    assert await listed(status="unknown") == set()
    gte, lte = mixed["s1"]["run_after"], mixed["b2"]["run_after"]
    assert await listed(run_after_gte=gte.isoformat()) == {k for k, v in mixed.items() if v["run_after"] >= gte}
    assert await listed(run_after_lte=lte.isoformat()) == {k for k, v in mixed.items() if v["run_after"] <= lte}
    assert await listed(run_after_gte=gte.isoformat(), run_after_lte=lte.isoformat()) == {"s1", "s2", "b1", "b2"}
    # Naive means UTC; 'Z' works; an unencoded '+' (a space once decoded) too.
    naive = gte.replace(tzinfo=None).isoformat()
    assert await listed(run_after_gte=naive) == await listed(run_after_gte=gte.isoformat().replace("+00:00", "Z"))
    raw = await api.get(f"/v1/runs?run_after_gte={gte.isoformat()}")  # '+00:00' sent as is
    assert set(ids(raw.json()["runs"])) == await listed(run_after_gte=gte.isoformat())


async def test_status_repeated_and_comma_separated_mean_or(api, mixed):
    repeated = await api.get("/v1/runs?status=running&status=failed")
    comma = await api.get("/v1/runs?status=running,failed")
    both = await api.get("/v1/runs?status=running,%20failed&status=running")
    expected = [k for k in reversed(mixed) if mixed[k]["state"] in ("running", "failed")]
    for response in (repeated, comma, both):
        assert response.status_code == 200
        assert ids(response.json()["runs"]) == expected
    paged = await page_all(api, "/v1/runs", {"status": "running,failed"}, limit=2)
    assert ids(paged) == expected  # the filter composes with paging: full pages of matches


async def test_unknown_status_is_400_listing_the_accepted_values(api, mixed):
    for query in ("status=done", "status=running,done", "status=running&status=RUNNING"):
        response = await api.get(f"/v1/runs?{query}")
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "bad_status"
        assert body["accepted"] == list(RUN_STATES) == ["queued", "running", "success", "failed", "unknown"]
        assert "queued, running, success, failed, unknown" in body["message"]
    response = await api.get("/v1/runs?run_type=daily")
    assert response.status_code == 400 and "asset_triggered" in response.json()["accepted"]
    for bad in ("order=newest", "run_after_gte=yesterday", "run_after_lte=2026-13-01", "run_after_lte="):
        response = await api.get(f"/v1/runs?{bad}")
        assert response.status_code == 400, bad


async def test_order_by_run_after_whatever_logical_date(api, store):
    """logical_date null (manual, asset-triggered) or not, or even out of step with run_after, the
    order is run_after's, ties broken by dag_id then run_id, in both directions and across pages."""
    envelopes, expected = [], []
    for i in range(30):
        run_after = BASE + timedelta(minutes=i // 3)  # three runs share each run_after
        logical = None if i % 2 else BASE - timedelta(days=i)  # descending logical dates
        dag_id = ["b_dag", "a_dag", "c_dag"][i % 3]
        run_id = f"run_{29 - i:02d}"
        envelopes += run_envelopes(dag_id, run_id, "success", run_after=run_after, logical_date=logical)
        expected.append((run_after, dag_id, run_id))
    await store.record(envelopes)
    ascending = [r for _, _, r in sorted(expected)]
    for limit in (1, 4, 30, 500):
        assert ids(await page_all(api, "/v1/runs", {"order": "asc"}, limit)) == ascending
        assert ids(await page_all(api, "/v1/runs", {"order": "desc"}, limit)) == ascending[::-1]
        assert ids(await page_all(api, "/v1/runs", {}, limit)) == ascending[::-1]
    per_dag = [r for _, d, r in sorted(expected) if d == "a_dag"]
    assert ids(await page_all(api, "/v1/dags/a_dag/runs", {"order": "asc"}, 2)) == per_dag
    assert ids(await page_all(api, "/v1/runs", {"dag_id": "a_dag"}, 3)) == per_dag[::-1]


async def test_limit_default_and_bounds(api, store):
    envelopes = []
    for i in range(501):
        envelopes += run_envelopes("etl", f"r{i:04d}", "queued", run_after=BASE + timedelta(seconds=i))
    await store.record(envelopes)
    default = (await api.get("/v1/runs")).json()
    assert len(default["runs"]) == 50 and default["next_cursor"]
    most = (await api.get("/v1/runs", params={"limit": 500})).json()
    assert len(most["runs"]) == 500 and most["next_cursor"]
    last = (await api.get("/v1/runs", params={"limit": 500, "cursor": most["next_cursor"]})).json()
    assert ids(last["runs"]) == ["r0000"] and last["next_cursor"] is None
    assert len((await api.get("/v1/runs", params={"limit": 1})).json()["runs"]) == 1
    for bad in ("0", "501", "-1", "ten", "1.5"):
        response = await api.get("/v1/runs", params={"limit": bad})
        assert response.status_code == 400, bad
        assert response.json()["error"] == "bad_limit"
        assert response.json()["accepted"] == {"min": 1, "max": 500, "default": 50}


async def test_link_header_and_next_cursor_agree(api, mixed):
    response = await api.get("/v1/runs", params={"limit": 3, "status": "success,failed", "dag_id": "etl"})
    body = response.json()
    cursor = body["next_cursor"]
    assert cursor
    link = response.headers["link"]
    target = link[1 : link.index(">")]
    assert target.startswith("/v1/runs?") and "status=success%2Cfailed" in target and "dag_id=etl" in target
    assert "limit=3" in target and httpx.URL(target).params["cursor"] == cursor
    following = await api.get(target)
    assert following.status_code == 200
    assert ids(following.json()["runs"]) == ids(
        (await api.get("/v1/runs", params={"limit": 3, "status": "success,failed", "dag_id": "etl", "cursor": cursor})).json()["runs"]
    )


async def test_malformed_tampered_and_foreign_cursors_are_400(api, store):
    envelopes = []
    for i in range(5):
        envelopes += run_envelopes("etl", f"r{i}", "success", run_after=BASE + timedelta(minutes=i))
    await store.record(envelopes)
    cursor = (await api.get("/v1/runs", params={"limit": 2})).json()["next_cursor"]
    payload, mac = cursor.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged_payload = dict(decoded, k=[(BASE + timedelta(days=9)).isoformat(), "etl", "zzz"])
    forged = base64.urlsafe_b64encode(json.dumps(forged_payload).encode()).rstrip(b"=").decode() + "." + mac
    flipped_mac = payload + "." + ("A" if mac[0] != "A" else "B") + mac[1:]
    for bad in (
        "garbage",
        "",
        "a.b.c",
        "!!!.???",
        forged,
        flipped_mac,
        payload,
        cursor + "x",
        "x" * 5000,
        base64.urlsafe_b64encode(b"{}").decode() + "." + mac,
    ):
        response = await api.get("/v1/runs", params={"limit": 2, "cursor": bad})
        if bad == "":
            assert response.status_code == 200  # no cursor: the first page
            continue
        assert response.status_code == 400, bad
        assert response.json()["error"] == "bad_cursor"
    # A valid cursor with other filters or another order belongs to another query.
    for other in ({"order": "asc"}, {"status": "success"}, {"dag_id": "etl"}):
        response = await api.get("/v1/runs", params={"limit": 2, "cursor": cursor, **other})
        assert response.status_code == 400 and response.json()["error"] == "bad_cursor"
    assert (await api.get("/v1/dags/etl/runs", params={"limit": 2, "cursor": cursor})).status_code == 400
    # The same query with it is fine (limit may change between pages).
    assert (await api.get("/v1/runs", params={"limit": 3, "cursor": cursor})).status_code == 200
    # A gateway with another secret does not accept it.
    api.app.state.token_secret = "another-secret-of-at-least-32-bytes!!!"  # type: ignore[attr-defined]
    assert (await api.get("/v1/runs", params={"limit": 2, "cursor": cursor})).status_code == 400


async def test_listing_needs_the_read_role(api, mixed):
    assert (await api.get("/v1/runs", headers={"Authorization": ""})).status_code == 401
    assert (await api.get("/v1/runs", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (await api.get(f"/v1/runs?access_token={READ_TOKEN}", headers={"Authorization": ""})).status_code == 401


async def test_stale_running_runs(api, store):
    now = time.time()
    long_ago, recently = now - 3600, now - 5
    envelopes = (
        run_envelopes("etl", "silent", "running", run_after=BASE, last_event=long_ago)
        + run_envelopes("etl", "lively", "running", run_after=BASE + timedelta(minutes=1), last_event=recently)
        + run_envelopes("etl", "done_long_ago", "success", run_after=BASE + timedelta(minutes=2), last_event=long_ago)
        + run_envelopes("etl", "queued_long_ago", "queued", run_after=BASE + timedelta(minutes=3), last_event=long_ago)
    )
    # A terminal run event wins over a late non-terminal one (a spool flushed after the end).
    ended = run_envelopes("etl", "ended_then_late", "failed", run_after=BASE + timedelta(minutes=4), last_event=long_ago)
    late = Event(kind=EventKind.RUN, dag_id="etl", run_id="ended_then_late", state="running", ts=long_ago + 1)
    envelopes += ended + [Envelope(seq=len(ended) + 1, event=late)]
    # A failed try being retried: the run still runs (up_for_retry is not a failure of the run).
    retry = [
        Event(
            kind=EventKind.RUN,
            dag_id="etl",
            run_id="retrying",
            state="running",
            ts=recently,
            run_after=(BASE + timedelta(minutes=5)).isoformat(),
        ),
        Event(
            kind=EventKind.TASK, dag_id="etl", run_id="retrying", task_id="load", state="running", ts=recently, try_number=1, critical=True
        ),
        Event(
            kind=EventKind.TASK,
            dag_id="etl",
            run_id="retrying",
            task_id="load",
            state="up_for_retry",
            ts=recently,
            try_number=1,
            critical=True,
            error=ErrorInfo(type="IOError", message="flaky"),
        ),
    ]
    envelopes += [Envelope(seq=i, event=e) for i, e in enumerate(retry, start=1)]
    await store.record(envelopes)
    rows = {r["run_id"]: r for r in (await api.get("/v1/runs")).json()["runs"]}
    assert {k: (r["state"], r["stale"]) for k, r in rows.items()} == {
        "silent": ("running", True),
        "lively": ("running", False),
        "done_long_ago": ("success", False),
        "queued_long_ago": ("queued", False),
        "ended_then_late": ("failed", False),
        "retrying": ("running", False),
    }
    assert rows["retrying"]["outcome"] == "pending" and rows["retrying"]["first_failure"] is None
    retrying = [r["run_id"] for r in (await api.get("/v1/runs?status=running")).json()["runs"]]
    assert "retrying" in retrying and "ended_then_late" not in retrying
    # The cutoff is the stale_after setting.
    api.app.state.settings = api.app.state.settings.model_copy(update={"stale_after": 1.0})  # type: ignore[attr-defined]
    rows = {r["run_id"]: r for r in (await api.get("/v1/runs")).json()["runs"]}
    assert rows["lively"]["stale"] and rows["retrying"]["stale"] and not rows["done_long_ago"]["stale"]


async def test_ten_thousand_runs_paged_while_new_runs_arrive(api, store):
    """Every run that existed when paging began is listed exactly once, in keyset order, while runs
    keep being recorded: in the background, and after each page right around the cursor (the same
    run_after as the page's last row, sorting on either side of it, and just before and after)."""
    rng = random.Random(5)
    dags = [f"dag_{i}" for i in range(7)]
    existing: set[str] = set()
    batches: list[list[Envelope]] = [[]]
    started = time.perf_counter()
    for i in range(10_000):
        run_after = BASE + timedelta(seconds=rng.randrange(0, 5_000))  # many ties on run_after
        logical = None if i % 3 else run_after
        state = rng.choice(["queued", "running", "success", "failed"])
        batches[-1].append(single_event_run(rng.choice(dags), f"r{i:05d}", state, run_after, logical))
        existing.add(f"r{i:05d}")
        if len(batches[-1]) == 500:
            batches.append([])
    if store.engine.dialect.name == "postgresql":  # disjoint runs: replicas may record them at once
        gate = asyncio.Semaphore(6)

        async def record(batch: list[Envelope]) -> None:
            async with gate:
                await store.record(batch)

        await asyncio.gather(*(record(b) for b in batches))
    else:
        for batch in batches:
            await store.record(batch)
    print(f"\n[10k] loaded in {time.perf_counter() - started:.1f} s")

    inserted: set[str] = set()
    counter = iter(range(10**6))

    async def insert(around: list[datetime]) -> None:
        envelopes = []
        for run_after in around:
            run_id = f"new{next(counter):06d}"
            envelopes.append(single_event_run(rng.choice(dags), run_id, "running", run_after))
            inserted.add(run_id)
        await store.record(envelopes)

    async def background(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await insert([BASE + timedelta(seconds=rng.uniform(-100, 5_100)) for _ in range(5)])
            await asyncio.sleep(0.001)

    for order, reverse in (("desc", True), ("asc", False)):
        present = existing | inserted  # what exists when this paging begins
        stop = asyncio.Event()
        writer = asyncio.create_task(background(stop))
        rows: list[dict] = []
        params: dict[str, Any] = {"order": order, "limit": 250}
        try:
            while True:
                response = await api.get("/v1/runs", params=params)
                assert response.status_code == 200, response.text
                body = response.json()
                rows += body["runs"]
                if body["next_cursor"] is None:
                    break
                params["cursor"] = body["next_cursor"]
                edge = datetime.fromisoformat(body["runs"][-1]["run_after"])
                tick = timedelta(microseconds=1)
                await insert([edge, edge, edge - tick, edge + tick, edge - timedelta(seconds=1)])
        finally:
            stop.set()
            await writer
        print(f"[10k] {order}: {len(rows)} rows paged; {len(inserted)} runs inserted so far")
        keys = [(datetime.fromisoformat(r["run_after"]), r["dag_id"], r["run_id"]) for r in rows]
        assert len(keys) == len(set(keys)), "a run was listed twice"
        assert keys == sorted(keys, reverse=reverse), "not in keyset order"
        listed = {k[2] for k in keys}
        missing = present - listed
        assert not missing, f"{len(missing)} runs that existed before paging were skipped"
        assert listed - present <= inserted
        assert listed - present, "no run inserted while paging landed ahead of the cursor"
    assert len(inserted) > 100


# -- one run --------------------------------------------------------------------------------------


async def test_one_run_with_its_task_instances(api, store):
    t = time.time() - 100
    events = [
        Event(kind=EventKind.RUN, dag_id="etl", run_id="r1", state="running", ts=t, run_type="manual", run_after=BASE.isoformat()),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="extract", state="running", ts=t + 1, try_number=1),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="extract", state="up_for_retry", ts=t + 2, try_number=1),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="extract", state="running", ts=t + 3, try_number=2),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="extract", state="success", ts=t + 4, try_number=2),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="fan", state="running", ts=t + 5, try_number=1, map_index=1),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="fan", state="running", ts=t + 5, try_number=1, map_index=0),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="fan", state="success", ts=t + 6, try_number=1, map_index=0),
        Event(kind=EventKind.TASK, dag_id="etl", run_id="r1", task_id="skipped", state="skipped", ts=t + 7, try_number=1),
    ]
    await store.record([Envelope(seq=i, event=e) for i, e in enumerate(events, start=1)])
    response = await api.get("/v1/dags/etl/runs/r1")
    assert response.status_code == 200
    body = response.json()
    listed = (await api.get("/v1/runs")).json()["runs"][0]
    assert {k: v for k, v in body.items() if k not in ("task_instances", "progress")} == listed
    assert body["progress"] == []  # the run published none
    assert body["state"] == "running" and body["outcome"] == "pending"

    def at(offset: float) -> str:
        return datetime.fromtimestamp(t + offset, tz=timezone.utc).isoformat()

    assert body["task_instances"] == [
        {"task_id": "extract", "map_index": -1, "try_number": 1, "state": "up_for_retry", "started": at(1), "ended": at(2)},
        {"task_id": "extract", "map_index": -1, "try_number": 2, "state": "success", "started": at(3), "ended": at(4)},
        {"task_id": "fan", "map_index": 0, "try_number": 1, "state": "success", "started": at(5), "ended": at(6)},
        {"task_id": "fan", "map_index": 1, "try_number": 1, "state": "running", "started": at(5), "ended": None},
        {"task_id": "skipped", "map_index": -1, "try_number": 1, "state": "skipped", "started": None, "ended": at(7)},
    ]
    missing = await api.get("/v1/dags/etl/runs/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "run_not_found"
    assert (await api.get("/v1/dags/etl/runs/r1", headers={"Authorization": ""})).status_code == 401


async def test_routes_beside_trigger_result_and_events(database_url, gateway_factory):
    """Through a served gateway: GET lists where POST triggers; the run's own routes still answer."""
    gateway = await gateway_factory(database_url=database_url)
    await gateway.app.state.store.record(run_envelopes("etl", "r1", "success"))
    async with gateway.client() as client:
        listed = await client.get("/v1/dags/etl/runs")
        assert listed.status_code == 200 and ids(listed.json()["runs"]) == ["r1"]
        assert (await client.post("/v1/dags/etl/runs")).status_code == 403  # read role: POST is trigger's
        assert (await client.get("/v1/dags/etl/runs/r1")).json()["outcome"] == "success"
        result = await client.get("/v1/dags/etl/runs/r1/result", params={"timeout": 0})
        assert result.status_code == 200 and result.json()["result"] == 42
        assert (await client.delete("/v1/runs")).status_code == 405
