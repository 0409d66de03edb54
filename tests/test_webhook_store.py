"""The webhook outbox and its store, against real PostgreSQL and SQLite: messages are written in the
transaction that records their events, once each, filtered by DAG and kind; endpoints, rotation,
replay; claims that never hand one message to two workers."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from runbell.bus.schema import Envelope, ErrorInfo, Event, EventKind, Result
from runbell.service.core.outcome import decide
from runbell.service.store.models import EventRow
from runbell.service.store.store import Store
from runbell.service.webhooks.outbox import (
    MESSAGES,
    Endpoint,
    MessageStatus,
    Verdict,
    WebhookKind,
    WebhookOutbox,
    WebhookStore,
)

DAG = "etl"
T0 = 1_700_000_000.0
ALL_KINDS = ["outcome", "task", "run"]


def run_event(state: str, *, run_id: str = "r1", dag_id: str = DAG, ts: float = T0, **kw) -> Event:
    return Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state=state, ts=ts, **kw)


def task_event(task_id: str, state: str, *, run_id: str = "r1", dag_id: str = DAG, ts: float = T0, **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id=dag_id, run_id=run_id, task_id=task_id, state=state, ts=ts, try_number=1, **kw)


def numbered(*events: Event, start: int = 1) -> list[Envelope]:
    return [Envelope(seq=i, event=e) for i, e in enumerate(events, start=start)]


def a_run(run_id: str = "r1", dag_id: str = DAG) -> list[Envelope]:
    """running; extract running, success; answer (the result task) success — decides at seq 5; a
    cleanup task after it; the run's success."""
    return numbered(
        run_event("running", run_id=run_id, dag_id=dag_id),
        task_event("extract", "running", run_id=run_id, dag_id=dag_id, ts=T0 + 1),
        task_event("extract", "success", run_id=run_id, dag_id=dag_id, ts=T0 + 2),
        task_event("answer", "running", run_id=run_id, dag_id=dag_id, ts=T0 + 3, result_task=True),
        task_event(
            "answer", "success", run_id=run_id, dag_id=dag_id, ts=T0 + 4, result_task=True, result=Result(value={"rows": 3}, size=10)
        ),
        task_event("cleanup", "success", run_id=run_id, dag_id=dag_id, ts=T0 + 5),
        run_event("success", run_id=run_id, dag_id=dag_id, ts=T0 + 6),
    )


@pytest.fixture
async def outbox_store(store):
    store.outbox = WebhookOutbox()
    return store


@pytest.fixture
def webhooks(outbox_store) -> WebhookStore:
    return WebhookStore(outbox_store)


async def all_messages(webhooks: WebhookStore, endpoint: Endpoint) -> list:
    return sorted(await webhooks.messages(endpoint.id, limit=1000), key=lambda m: (m.run_id, m.seq, m.kind))


# -- the outbox ------------------------------------------------------------------------------------


async def test_recording_an_event_enqueues_its_messages_in_the_same_transaction(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook", kinds=ALL_KINDS)
    envelopes = a_run()
    await outbox_store.record(envelopes)
    messages = await all_messages(webhooks, endpoint)
    assert [(m.seq, m.kind) for m in messages] == [
        (1, "run"),
        (2, "task"),
        (3, "task"),
        (4, "task"),
        (5, "outcome"),
        (5, "task"),
        (6, "task"),
        (7, "run"),
    ]
    assert all(m.status == "pending" and m.attempts == 0 and m.id.startswith("msg_") for m in messages)
    assert len({m.id for m in messages}) == len(messages)
    assert [m.terminal for m in messages] == [False, False, True, False, True, True, True, True]

    by_key = {(m.seq, m.kind): json.loads(m.payload) for m in messages}
    task = by_key[(3, "task")]
    assert task["type"] == "task.state"
    assert task["timestamp"] == datetime.fromtimestamp(T0 + 2, timezone.utc).isoformat().replace("+00:00", "Z")
    # the event exactly as SSE data gives it, plus terminal
    sse_data = {"epoch": envelopes[2].epoch, "seq": 3, **envelopes[2].event.model_dump(mode="json", exclude_none=True)}
    assert task["data"] == {**sse_data, "terminal": True}
    assert by_key[(1, "run")]["type"] == "run.state" and by_key[(1, "run")]["data"]["terminal"] is False
    assert by_key[(7, "run")]["data"]["terminal"] is True

    outcome = by_key[(5, "outcome")]
    assert outcome["type"] == "run.outcome"
    assert outcome["timestamp"] == datetime.fromtimestamp(T0 + 4, timezone.utc).isoformat().replace("+00:00", "Z")
    # the outcome as the result endpoint and the SSE outcome event give it when it is decided
    expected = decide(envelopes[:5], DAG, "r1").model_dump(mode="json")
    assert outcome["data"] == {**expected, "seq": 5, "terminal": True}
    assert outcome["data"]["status"] == "success" and outcome["data"]["result"] == {"rows": 3}
    assert outcome["data"]["decided_seq"] == 5


async def test_recording_twice_enqueues_once(webhooks, outbox_store, database_url):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook", kinds=ALL_KINDS)
    envelopes = a_run()
    await outbox_store.record(envelopes[:3])
    await outbox_store.record(envelopes[:3])  # a re-delivered stream entry
    await outbox_store.record(envelopes[1:6] + envelopes[1:6])
    # two replicas recording the rest at once
    other = Store(database_url, outbox=WebhookOutbox())
    await other.start()
    try:
        await asyncio.gather(outbox_store.record(envelopes), other.record(envelopes))
    finally:
        await other.close()
    messages = await all_messages(webhooks, endpoint)
    assert [(m.seq, m.kind) for m in messages] == [
        (1, "run"),
        (2, "task"),
        (3, "task"),
        (4, "task"),
        (5, "outcome"),
        (5, "task"),
        (6, "task"),
        (7, "run"),
    ]


async def test_the_outcome_is_enqueued_exactly_once_when_decided(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook")  # outcome only, by default
    assert endpoint.kinds == ["outcome"]
    envelopes = a_run()
    for envelope in envelopes[:4]:
        await outbox_store.record([envelope])
    assert await webhooks.messages(endpoint.id) == []  # pending: nothing for an outcome subscriber
    await outbox_store.record([envelopes[4]])  # the result task succeeds: decided
    for envelope in envelopes[5:]:  # later events, repeats: decided already
        await outbox_store.record([envelope])
    await outbox_store.record(envelopes)
    messages = await webhooks.messages(endpoint.id)
    assert [(m.seq, m.kind, m.terminal) for m in messages] == [(5, "outcome", True)]


async def test_a_failed_run_decided_by_its_critical_task_and_by_the_run(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook")
    critical = numbered(
        run_event("running", run_id="c"),
        task_event("load", "failed", run_id="c", ts=T0 + 1, critical=True, error=ErrorInfo(type="KeyError", message="'id'")),
        run_event("failed", run_id="c", ts=T0 + 2),
    )
    by_run = numbered(run_event("running", run_id="f"), run_event("failed", run_id="f", ts=T0 + 1, msg="timed out"))
    await outbox_store.record(critical + by_run)  # one batch, two runs
    outcomes = {m.run_id: json.loads(m.payload)["data"] for m in await webhooks.messages(endpoint.id)}
    assert outcomes["c"]["status"] == "failed" and outcomes["c"]["decided_by"] == "critical_task"
    assert outcomes["c"]["seq"] == 2 and outcomes["c"]["failure"]["task_id"] == "load"
    assert outcomes["f"]["status"] == "failed" and outcomes["f"]["decided_by"] == "run"
    assert outcomes["f"]["seq"] == 2 and outcomes["f"]["failure"]["error"]["message"] == "timed out"


async def test_filters_by_dag_and_kind(webhooks, outbox_store):
    etl_outcomes = await webhooks.create_endpoint(url="https://a.example/h", dag_ids=["etl"])
    every_task = await webhooks.create_endpoint(url="https://b.example/h", kinds=["task"])
    runs_of_two = await webhooks.create_endpoint(url="https://c.example/h", dag_ids=["etl", "other"], kinds=["run"])
    disabled = await webhooks.create_endpoint(url="https://d.example/h", kinds=ALL_KINDS, enabled=False)
    await outbox_store.record(a_run(dag_id="etl") + a_run(dag_id="report") + a_run(dag_id="other"))

    def seen(messages):
        return sorted({(m.dag_id, m.kind) for m in messages})

    assert seen(await webhooks.messages(etl_outcomes.id)) == [("etl", "outcome")]
    assert seen(await webhooks.messages(every_task.id)) == [("etl", "task"), ("other", "task"), ("report", "task")]
    assert seen(await webhooks.messages(runs_of_two.id)) == [("etl", "run"), ("other", "run")]
    assert await webhooks.messages(disabled.id) == []


async def test_no_event_is_recorded_without_its_deliveries(webhooks, outbox_store):
    """The outbox writes in the recording transaction: when it fails, the events are not stored
    either (and the recorder, not having acknowledged them, records them again later)."""
    await webhooks.create_endpoint(url="https://example.com/hook", kinds=ALL_KINDS)
    real = outbox_store.outbox

    class Broken(WebhookOutbox):
        async def enqueue(self, conn, changes):
            await real.enqueue(conn, changes)
            raise RuntimeError("the database went away mid-transaction")

    outbox_store.outbox = Broken()
    with pytest.raises(RuntimeError):
        await outbox_store.record(a_run())
    async with outbox_store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(EventRow))).scalar() == 0
        assert (await conn.execute(select(func.count()).select_from(MESSAGES))).scalar() == 0
    outbox_store.outbox = real
    assert len(await outbox_store.record(a_run())) == 7
    async with outbox_store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(MESSAGES))).scalar() == 8


async def test_committed_is_told_after_commit_only_when_something_was_enqueued(webhooks, outbox_store):
    told = []
    outbox_store.outbox.on_enqueued = told.append
    envelopes = a_run()
    await outbox_store.record(envelopes[:2])
    assert told == []  # no endpoint
    await webhooks.create_endpoint(url="https://example.com/hook", kinds=["task"])
    await outbox_store.record(envelopes[:3])
    assert told == [1]
    await outbox_store.record(envelopes[:3])
    assert told == [1]


# -- endpoints ---------------------------------------------------------------------------------------


async def test_endpoint_lifecycle(webhooks):
    created = await webhooks.create_endpoint(
        url="https://example.com/hook", description="ops", dag_ids=["etl"], kinds=["task", "outcome", "task"]
    )
    assert created.id.startswith("ep_") and created.secret.startswith("whsec_")
    assert created.kinds == ["task", "outcome"] and created.dag_ids == ["etl"] and created.enabled
    assert created.secret not in repr(created)
    assert await webhooks.get_endpoint(created.id) == created
    assert await webhooks.list_endpoints() == [created]
    assert await webhooks.get_endpoint("ep_nope") is None

    with pytest.raises(ValueError):
        await webhooks.create_endpoint(url="https://example.com/hook", kinds=["everything"])
    with pytest.raises(ValueError):
        await webhooks.create_endpoint(url="https://example.com/hook", kinds=[])
    with pytest.raises(ValueError):
        await webhooks.update_endpoint(created.id, secret="mine")
    # The API's rules (service/webhooks/rules.py), whoever calls the store.
    for bad in ({"url": "https://user:pw@example.com/hook"}, {"url": "ftp://example.com/"}, {"dag_ids": []}, {"dag_ids": ["x" * 251]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            await webhooks.create_endpoint(**{"url": "https://example.com/hook", **bad})
        with pytest.raises(ValueError, match=next(iter(bad))):
            await webhooks.update_endpoint(created.id, **bad)
    with pytest.raises(ValueError, match="enabled"):
        await webhooks.update_endpoint(created.id, enabled=None)

    updated = await webhooks.update_endpoint(created.id, url="https://example.com/v2", dag_ids=None, kinds=["run"])
    assert (updated.url, updated.dag_ids, updated.kinds, updated.secret) == ("https://example.com/v2", None, ["run"], created.secret)
    assert updated.updated_at >= created.updated_at
    assert await webhooks.update_endpoint("ep_nope", description="x") is None

    assert await webhooks.delete_endpoint(created.id) is True
    assert await webhooks.delete_endpoint(created.id) is False
    assert await webhooks.get_endpoint(created.id) is None


async def test_disabling_cancels_pending_messages_and_re_enabling_clears_the_reason(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook", kinds=["task"])
    await outbox_store.record(a_run()[:3])
    disabled = await webhooks.update_endpoint(endpoint.id, enabled=False)
    assert not disabled.enabled and disabled.disabled_reason
    assert {m.status for m in await webhooks.messages(endpoint.id)} == {"cancelled"}
    await outbox_store.record(a_run()[3:5])
    assert len(await webhooks.messages(endpoint.id)) == 2  # nothing enqueued while disabled
    enabled = await webhooks.update_endpoint(endpoint.id, enabled=True)
    assert enabled.enabled and enabled.disabled_reason is None and enabled.failing_since is None
    # recover brings back what was cancelled
    assert await webhooks.recover(endpoint.id, since=datetime.now(timezone.utc) - timedelta(hours=1)) == 2
    assert {m.status for m in await webhooks.messages(endpoint.id)} == {"pending"}


async def test_deleting_an_endpoint_cancels_its_pending_messages(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook", kinds=["task"])
    await outbox_store.record(a_run()[:3])
    assert await webhooks.delete_endpoint(endpoint.id)
    assert {m.status for m in await webhooks.messages(endpoint.id)} == {"cancelled"}
    assert await webhooks.claim("w", limit=10, per_endpoint=10, lease_seconds=60) == []


async def test_rotation_keeps_the_old_secret_signing_during_the_grace(webhooks):
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook")
    now = datetime.now(timezone.utc)
    assert endpoint.signing_secrets(now) == [endpoint.secret]
    rotated = await webhooks.rotate_secret(endpoint.id, grace_seconds=3600)
    assert rotated.secret != endpoint.secret and rotated.secret.startswith("whsec_")
    assert rotated.previous_secret == endpoint.secret
    assert rotated.signing_secrets(now) == [rotated.secret, endpoint.secret]
    assert rotated.signing_secrets(now + timedelta(hours=2)) == [rotated.secret]
    again = await webhooks.rotate_secret(endpoint.id, grace_seconds=0)
    assert again.previous_secret == rotated.secret and again.signing_secrets(datetime.now(timezone.utc)) == [again.secret]
    assert await webhooks.rotate_secret("ep_nope", 10) is None


# -- claims, verdicts, replay ---------------------------------------------------------------------


async def test_claims_lease_messages_and_a_lapsed_lease_frees_them(webhooks, outbox_store):
    one = await webhooks.create_endpoint(url="https://a.example/h", kinds=["task", "run"])
    two = await webhooks.create_endpoint(url="https://b.example/h", kinds=["task", "run"])
    await outbox_store.record(a_run())  # 7 messages per endpoint
    now = datetime.now(timezone.utc)
    first = await webhooks.claim("w1", limit=100, per_endpoint=3, lease_seconds=60, now=now)
    assert sorted(m.endpoint_id for m in first) == sorted([one.id] * 3 + [two.id] * 3)
    # leased messages are not handed out again; an excluded endpoint gives none
    second = await webhooks.claim("w2", limit=100, per_endpoint=100, exclude=[two.id], lease_seconds=60, now=now)
    assert {m.endpoint_id for m in second} == {one.id} and len(second) == 4
    assert not {m.id for m in first} & {m.id for m in second}
    third = await webhooks.claim("w3", limit=2, per_endpoint=100, lease_seconds=60, now=now)
    assert len(third) == 2 and {m.endpoint_id for m in third} == {two.id}
    assert await webhooks.claim("w4", limit=100, per_endpoint=100, lease_seconds=60, now=now) != []  # 2 of two's left
    assert await webhooks.claim("w5", limit=100, per_endpoint=100, lease_seconds=60, now=now) == []
    # the worker that holds them dies: after the lease they are due again
    later = now + timedelta(seconds=61)
    assert len(await webhooks.claim("w6", limit=100, per_endpoint=100, lease_seconds=60, now=later)) == 14


async def test_concurrent_claims_never_share_a_message(webhooks, outbox_store):
    endpoints = [await webhooks.create_endpoint(url=f"https://{i}.example/h", kinds=["task", "run"]) for i in range(3)]
    await outbox_store.record([e for run in range(5) for e in a_run(run_id=f"r{run}")])
    total = 3 * 5 * 7
    claimed: list[list] = []

    async def worker(name: str) -> None:
        while True:
            got = await webhooks.claim(name, limit=4, per_endpoint=2, lease_seconds=60)
            if not got:
                return
            claimed.append(got)

    await asyncio.gather(*(worker(f"w{i}") for i in range(6)))
    ids = [m.id for batch in claimed for m in batch]
    assert len(ids) == len(set(ids)) == total
    assert {m.endpoint_id for batch in claimed for m in batch} == {e.id for e in endpoints}


async def test_finish_applies_only_under_the_lease_and_records_every_attempt(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://a.example/h", kinds=["task"])
    await outbox_store.record(a_run()[:2])
    [message] = await webhooks.claim("w1", limit=10, per_endpoint=10, lease_seconds=60)
    attempt = dict(attempted_at=datetime.now(timezone.utc), duration_ms=12.5, status_code=500, error=None, response_body="oops")
    retry_at = datetime.now(timezone.utc) + timedelta(seconds=5)
    done = await webhooks.finish(message, "w1", attempt, Verdict(MessageStatus.PENDING, retry_at), disable_after=3600)
    assert done.applied and done.disabled_reason is None
    stored = await webhooks.get_message(message.id)
    assert (stored.status, stored.attempts) == ("pending", 1)
    assert abs((stored.next_attempt_at - retry_at).total_seconds()) < 0.01
    assert (await webhooks.get_endpoint(endpoint.id)).failing_since is not None
    # a finish under a lease that is not held (any more) is recorded but changes nothing
    late = await webhooks.finish(
        message, "w-old", {**attempt, "status_code": 200}, Verdict(MessageStatus.DELIVERED, endpoint="success"), disable_after=3600
    )
    assert not late.applied and (await webhooks.get_message(message.id)).status == "pending"
    attempts = await webhooks.attempts(message_id=message.id)
    assert [a.status_code for a in attempts] == [200, 500]  # newest first
    assert attempts[1].response_body == "oops" and attempts[1].duration_ms == 12.5
    assert await webhooks.attempts(endpoint_id=endpoint.id, limit=1) == attempts[:1]


async def test_resend_and_recover(webhooks, outbox_store):
    endpoint = await webhooks.create_endpoint(url="https://a.example/h", kinds=["task"])
    await outbox_store.record(a_run()[:3])
    claimed = await webhooks.claim("w1", limit=10, per_endpoint=10, lease_seconds=60)
    attempt = dict(attempted_at=datetime.now(timezone.utc), duration_ms=1.0, status_code=200, error=None, response_body="")
    for message in claimed:
        await webhooks.finish(message, "w1", attempt, Verdict(MessageStatus.DELIVERED, endpoint="success"), disable_after=3600)
    assert {m.status for m in await webhooks.messages(endpoint.id)} == {"delivered"}
    resent = await webhooks.resend(claimed[0].id)
    assert resent.status == "pending" and resent.id == claimed[0].id and resent.attempts == 1
    assert [m.id for m in await webhooks.claim("w2", limit=10, per_endpoint=10, lease_seconds=60)] == [resent.id]
    assert await webhooks.resend("msg_nope") is None
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert await webhooks.recover(endpoint.id, since=future) == 0
    assert await webhooks.recover(endpoint.id, since=datetime.now(timezone.utc) - timedelta(hours=1)) == 2
    assert len(await webhooks.messages(endpoint.id, since=datetime.now(timezone.utc) - timedelta(hours=1))) == 2
    assert await webhooks.messages(endpoint.id, since=future) == []


def test_kinds_are_the_interfaces():
    assert [k.value for k in WebhookKind] == ["outcome", "task", "run", "needs_input", "progress"]
    assert {s.value for s in MessageStatus} >= {"pending", "delivered", "dead"}


async def test_a_resend_during_an_attempt_in_flight_is_not_undone_by_its_finish(webhooks, outbox_store):
    await webhooks.create_endpoint(url="https://a.example/h", kinds=["task"])
    await outbox_store.record(a_run()[:2])
    [in_flight] = await webhooks.claim("w1", limit=10, per_endpoint=10, lease_seconds=60)
    await webhooks.resend(in_flight.id)  # asked for while that attempt is still out
    attempt = dict(attempted_at=datetime.now(timezone.utc), duration_ms=1.0, status_code=200, error=None, response_body="")
    done = await webhooks.finish(in_flight, "w1", attempt, Verdict(MessageStatus.DELIVERED, endpoint="success"), disable_after=3600)
    assert not done.applied  # the resend took the lease away
    assert (await webhooks.get_message(in_flight.id)).status == "pending"
    assert [m.id for m in await webhooks.claim("w2", limit=10, per_endpoint=10, lease_seconds=60)] == [in_flight.id]


async def test_needs_input_is_enqueued_once_per_request(webhooks, outbox_store):
    from runbell.bus.schema import InputRequest

    asking = await webhooks.create_endpoint(url="https://example.com/hook", kinds=["needs_input"])
    outcome_only = await webhooks.create_endpoint(url="https://example.com/other")
    request = InputRequest(kind="approval", subject="Ship it?", options=["Approve", "Reject"])
    asks = lambda try_number=1, map_index=-1: task_event(  # noqa: E731
        "approve", "awaiting_input", input_request=request, map_index=map_index, ts=T0 + 1
    ).model_copy(update={"try_number": try_number})
    envelopes = numbered(
        run_event("running"),
        asks(),
        asks(),  # a duplicate: the same request
        task_event("approve", "input_received"),
        asks(),  # a late copy after the answer
        asks(map_index=2),  # a mapped instance's own request
        asks(try_number=2),  # the next try asks again
    )
    for envelope in envelopes[:3]:
        await outbox_store.record([envelope])
    await outbox_store.record(envelopes)  # recorded again, with the rest
    messages = await all_messages(webhooks, asking)
    assert [(m.seq, m.kind, m.terminal) for m in messages] == [
        (2, "needs_input", False),
        (6, "needs_input", False),
        (7, "needs_input", False),
    ]
    first = json.loads(messages[0].payload)
    assert first["type"] == "run.needs_input"
    assert first["data"]["subject"] == "Ship it?" and first["data"]["options"] == ["Approve", "Reject"]
    assert (first["data"]["dag_id"], first["data"]["run_id"], first["data"]["task_id"], first["data"]["seq"]) == (DAG, "r1", "approve", 2)
    assert first["data"]["respond"] == "/v1/dags/etl/runs/r1/tasks/approve/input"
    assert json.loads(messages[1].payload)["data"]["respond"].endswith("?map_index=2")
    assert await webhooks.messages(outcome_only.id) == []
