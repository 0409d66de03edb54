"""Progress in the store, against real PostgreSQL and SQLite: never an event of the store, only each
key's latest value; it moves its run's last position on (so the recorder reads no gap); subscribed
webhooks get each progress event once, however often it is recorded."""

from __future__ import annotations

import json

import pytest

from runbell.bus.schema import Envelope, Event, EventKind, Position, Progress, ProgressItem, Result
from runbell.service.webhooks.outbox import WebhookOutbox, WebhookStore

DAG, RUN = "chat", "r1"
T0 = 1_700_000_000.0


def task_event(state: str, ts: float = T0, **kw) -> Event:
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=RUN, task_id="answer", state=state, ts=ts, try_number=1, **kw)


def progress(*items: tuple[str | None, object], ts: float = T0, dropped: int = 0) -> Event:
    return Event(
        kind=EventKind.PROGRESS,
        dag_id=DAG,
        run_id=RUN,
        task_id="answer",
        state="running",
        ts=ts,
        try_number=1,
        progress=Progress(items=[ProgressItem(key=key, value=value) for key, value in items], dropped=dropped),
    )


def numbered(*events: Event, epoch: str = "") -> list[Envelope]:
    return [Envelope(epoch=epoch, seq=i, event=e) for i, e in enumerate(events, start=1)]


A_RUN = numbered(
    task_event("running", result_task=True),
    progress(("percent", 10), (None, "Hel"), ts=T0 + 1),
    progress(("percent", 20), (None, "lo"), ("status", "writing"), ts=T0 + 2),
    task_event("success", ts=T0 + 3, result_task=True, result=Result(value="Hello", size=7)),
)


async def test_the_store_keeps_only_each_keys_latest_value(store) -> None:
    stored = await store.record(A_RUN)
    assert [e.seq for e in stored] == [1, 2, 3, 4]
    assert [e.seq for e in await store.events(DAG, RUN)] == [1, 4]  # progress is no event of the store
    latest = {p.key: (p.value, p.position.seq, p.task_id) for p in await store.progress(DAG, RUN)}
    assert latest == {"percent": (20, 3, "answer"), None: ("lo", 3, "answer"), "status": ("writing", 3, "answer")}
    run = await store.get_run(DAG, RUN)
    assert run is not None and run.outcome_status == "success"


async def test_an_older_progress_recorded_late_changes_no_latest_value(store) -> None:
    first, older, newer, _ = A_RUN
    await store.record([first, newer])
    await store.record([older])  # a re-delivered entry, or a gap filled from the replay log
    await store.record([newer])  # a repeat
    latest = {p.key: p.value for p in await store.progress(DAG, RUN)}
    assert latest == {"percent": 20, None: "lo", "status": "writing"}


async def test_progress_moves_the_runs_last_position_on(store) -> None:
    running, p1, p2, _ = A_RUN
    await store.record([running])
    assert await store.last_position(DAG, RUN) == Position("", 1)
    await store.record([p1, p2])
    assert await store.last_position(DAG, RUN) == Position("", 3)  # the recorder reads seq 4 as no gap
    await store.record([p1])
    assert await store.last_position(DAG, RUN) == Position("", 3)  # never back


async def test_progress_of_a_run_the_store_has_not_seen_makes_its_row(store) -> None:
    (only,) = numbered(progress(("percent", 5)))
    await store.record([only])
    run = await store.get_run(DAG, RUN)
    assert run is not None and run.outcome_status == "pending" and run.state == "unknown"
    assert await store.last_position(DAG, RUN) == Position("", 1)


async def test_a_new_epoch_replaces_the_latest_value(store) -> None:
    await store.record(A_RUN)
    (again,) = numbered(progress(("percent", 1)), epoch="00000000000ff")  # Redis lost the run's state
    await store.record([again])
    latest = {p.key: (p.value, p.position) for p in await store.progress(DAG, RUN)}
    assert latest["percent"] == (1, Position("00000000000ff", 1))
    assert latest[None] == ("lo", Position("", 3))


@pytest.fixture
async def webhooks(store) -> WebhookStore:
    store.outbox = WebhookOutbox()
    return WebhookStore(store)


async def test_a_webhook_subscribed_to_progress_gets_each_progress_event_once(store, webhooks) -> None:
    progress_only = await webhooks.create_endpoint(url="https://example.com/progress", kinds=["progress"])
    outcome_only = await webhooks.create_endpoint(url="https://example.com/outcome", kinds=["outcome"])
    await store.record(A_RUN[:3])
    await store.record(A_RUN)  # recorded twice: enqueued once
    messages = sorted(await webhooks.messages(progress_only.id, limit=100), key=lambda m: m.seq)
    assert [(m.seq, m.kind, m.terminal) for m in messages] == [(2, "progress", False), (3, "progress", False)]
    body = json.loads(messages[1].payload)
    assert body["type"] == "task.progress"
    assert body["data"]["progress"] == {
        "items": [{"key": "percent", "value": 20}, {"value": "lo"}, {"key": "status", "value": "writing"}],
        "dropped": 0,
    }
    assert body["data"]["kind"] == "progress" and body["data"]["task_id"] == "answer"
    assert [(m.seq, m.kind) for m in await webhooks.messages(outcome_only.id, limit=100)] == [(4, "outcome")]
