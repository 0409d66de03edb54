"""runbell.listeners.progress on the publishing side: what is kept when a task offers values faster than
its rate, the bounds, the order against the task's end, and a real publish on the run's stream."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from runbell.bus import keys
from runbell.bus.schema import PROGRESS_MAX_BYTES, Event, EventKind, Progress, ProgressItem, decode_envelope
from runbell.listeners import partial_output
from runbell.listeners.config import PublisherConfig, progress_rate
from runbell.listeners.partial_output import PENDING_MAX_BYTES, VALUE_MAX_BYTES, ProgressSender, TaskRef, emit_progress
from runbell.listeners.publisher import Publisher
from tests.test_reconciler import Clock

REF = TaskRef("chat", "run-1", "answer", -1, 1)


class Captured:
    """A publisher that keeps what it is given, and can be held up to see what waits meanwhile."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.gate = threading.Event()
        self.gate.set()
        self.arrived = threading.Condition()

    def publish(self, event: Event) -> int:
        self.gate.wait(10)
        with self.arrived:
            self.events.append(event)
            self.arrived.notify_all()
        return len(self.events)

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: predicate(self.events), timeout), self.events

    def items(self) -> list[tuple[str | None, object]]:
        return [(item.key, item.value) for event in self.events for item in event.progress.items]


@pytest.fixture
def captured() -> Captured:
    return Captured()


def wait_until_taken(sender: ProgressSender) -> None:
    """Until the sending thread has taken what waited (it is then held in the publisher)."""
    for _ in range(1000):
        with sender._cond:
            if not sender._waiting[REF].items:
                return
        threading.Event().wait(0.01)
    raise AssertionError("the sending thread never took the first value")


def sender_of(captured: Captured, rate: float = 20.0, clock=None) -> ProgressSender:
    return ProgressSender(rate, publisher=lambda: captured, **({"clock": clock} if clock else {}))  # type: ignore[arg-type,return-value]


def test_every_chunk_arrives_in_order_however_fast_they_are_offered(captured: Captured) -> None:
    sender = sender_of(captured, rate=5)
    for i in range(200):
        assert sender.offer(REF, None, f"chunk {i} ")
    sender.finish(REF)
    assert captured.items() == [(None, f"chunk {i} ") for i in range(200)]
    assert len(captured.events) <= 6  # at most a burst of 5, then one event with the rest (the finish)
    assert all(event.progress.dropped == 0 for event in captured.events)
    assert all(event.kind is EventKind.PROGRESS and event.state == "running" and event.task_id == "answer" for event in captured.events)


def test_of_a_key_only_the_latest_waiting_value_is_sent_and_the_rest_are_counted(captured: Captured) -> None:
    captured.gate.clear()  # the first event is held in the publisher: the rest wait meanwhile
    sender = sender_of(captured, rate=1000)
    sender.offer(REF, "percent", 0)
    wait_until_taken(sender)
    for percent in range(1, 101):
        sender.offer(REF, "percent", percent)
        sender.offer(REF, "status", f"step {percent}")
    captured.gate.set()
    sender.finish(REF)
    captured.wait_for(lambda events: len(events) >= 2)
    first, *rest = captured.events
    assert [(i.key, i.value) for i in first.progress.items] == [("percent", 0)]
    waited = [(i.key, i.value) for e in rest for i in e.progress.items]
    assert waited == [("percent", 100), ("status", "step 100")]  # each key's latest, in the order last offered
    assert sum(e.progress.dropped for e in rest) == 198  # 99 of each key were replaced


def test_the_rate_holds_values_back_and_sends_them_together_when_it_allows(captured: Captured) -> None:
    clock = Clock()
    sender = sender_of(captured, rate=2, clock=clock)
    for i in range(5):
        sender.offer(REF, None, i)
        captured.wait_for(lambda events: len(events) >= min(i + 1, 2))
    assert [[item.value for item in e.progress.items] for e in captured.events] == [[0], [1]]  # the burst of 2
    clock.now += 1.0  # two more tokens: what waited (2, 3, 4) goes out as one event
    with sender._cond:
        sender._news = True
        sender._cond.notify()
    captured.wait_for(lambda events: len(events) == 3)
    assert [item.value for item in captured.events[2].progress.items] == [2, 3, 4]


def test_a_value_over_the_bound_is_refused_and_said_dropped(captured: Captured) -> None:
    sender = sender_of(captured, rate=1000)
    captured.gate.clear()
    assert sender.offer(REF, None, "first")
    wait_until_taken(sender)
    assert not sender.offer(REF, None, "x" * VALUE_MAX_BYTES)  # its JSON has two quotes more
    assert sender.offer(REF, None, "after")
    captured.gate.set()
    sender.finish(REF)
    assert captured.items() == [(None, "first"), (None, "after")]
    assert sum(e.progress.dropped for e in captured.events) == 1


def test_what_waits_is_bounded_and_each_event_fits_the_progress_bound(captured: Captured) -> None:
    captured.gate.clear()
    sender = sender_of(captured, rate=1)
    sender.offer(REF, None, "the one the publisher holds")
    wait_until_taken(sender)
    chunk = "y" * 4000
    taken = [sender.offer(REF, None, chunk) for _ in range(40)]
    item_bytes = len(ProgressItem(value=chunk).model_dump_json(exclude_none=True)) + 1  # and its comma
    assert taken.count(True) == PENDING_MAX_BYTES // item_bytes and not all(taken)
    captured.gate.set()
    sender.finish(REF)
    last = captured.events[-1]
    assert len(json.dumps(last.progress.model_dump(mode="json"))) <= PROGRESS_MAX_BYTES
    assert last.progress.dropped == taken.count(False)


class Unencodable:
    pass


def test_a_value_that_cannot_be_encoded_is_refused_and_the_sender_goes_on(captured: Captured) -> None:
    sender = sender_of(captured, rate=1000)
    assert sender.offer(REF, None, "before")
    for bad in (Unencodable(), b"\xff"):
        assert not sender.offer(REF, None, bad)
    assert not sender.offer(REF, "\u00e9" * 65, 1)  # a key over 64 characters
    assert sender.offer(REF, None, "after")
    sender.finish(REF)
    assert captured.items() == [(None, "before"), (None, "after")]
    assert sum(e.progress.dropped for e in captured.events) == 3


def test_a_refused_keyed_value_leaves_the_keys_waiting_value(captured: Captured) -> None:
    captured.gate.clear()
    sender = sender_of(captured, rate=1)
    sender.offer(REF, None, "held")
    wait_until_taken(sender)
    assert sender.offer(REF, "status", "short")
    filler = "y" * 4000
    while sender.offer(REF, None, filler):
        pass  # what waits is at its bound now
    assert not sender.offer(REF, "status", "z" * 9000)  # does not fit: the waiting one stays
    captured.gate.set()
    sender.finish(REF)
    assert ("status", "short") in captured.items()


def test_a_sending_thread_that_fails_is_replaced(captured: Captured, monkeypatch) -> None:
    sender = sender_of(captured, rate=1000)
    calls = {"n": 0}
    real = sender._take_ready

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(sender, "_take_ready", failing_once)
    sender.offer(REF, None, "a")
    captured.wait_for(lambda events: len(events) == 1)  # the loop went on after the failure
    assert captured.items() == [(None, "a")]


def test_a_task_attempt_sends_a_bounded_number_of_events(captured: Captured, monkeypatch) -> None:
    monkeypatch.setattr(partial_output, "MAX_EVENTS_PER_ATTEMPT", 3)
    sender = sender_of(captured, rate=1000)
    for i in range(3):
        assert sender.offer(REF, None, i)
        captured.wait_for(lambda events, n=i + 1: len(events) == n)  # each its own event
    assert not sender.offer(REF, None, "one too many")


def test_the_tasks_end_sends_what_waits_first_past_the_rate(captured: Captured) -> None:
    clock = Clock()  # never moves: after the burst, nothing more goes out by the rate
    sender = sender_of(captured, rate=1, clock=clock)
    for i in range(10):
        sender.offer(REF, None, i)
    sender.finish(REF)  # returns once what waited was handed to the publisher
    assert [v for _, v in captured.items()] == list(range(10))
    assert REF not in sender._waiting


def test_progress_outside_a_task_or_with_a_bad_key_is_refused_without_raising(monkeypatch) -> None:
    partial_output.set_current(None)
    assert partial_output.current_task() is None  # no Airflow task context in the test process
    assert partial_output.progress(1) is False
    partial_output.set_current(REF)
    try:
        assert partial_output.progress(1, key="\x00bad") is False
        assert partial_output.progress(1, key="k" * 65) is False
    finally:
        partial_output.set_current(None)


def test_the_progress_rate_is_bounded() -> None:
    assert PublisherConfig.from_env({"RUNBELL_PROGRESS_RATE": "50"}).progress_rate == 50
    assert PublisherConfig.from_env({}).progress_rate == 20
    for bad in ("0", "1001", "-5"):
        with pytest.raises(ValueError, match="1 to 1000"):
            PublisherConfig.from_env({"RUNBELL_PROGRESS_RATE": bad})
    assert progress_rate(1.0) == 1.0


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"progress": None}, "needs progress"),
        ({"state": "success"}, "has state 'running'"),
        ({"task_id": None}, "needs task_id"),
        ({"error": {"type": "E", "message": "m"}}, "progress only"),
    ],
)
def test_a_progress_event_is_checked_on_the_bus(fields, message) -> None:
    good = {
        "kind": "progress",
        "dag_id": "d",
        "run_id": "r",
        "task_id": "t",
        "state": "running",
        "progress": {"items": [{"value": 1}]},
    }
    Event.model_validate(good)
    with pytest.raises(ValidationError, match=message):
        Event.model_validate({**good, **fields})


def test_progress_bounds_on_the_bus() -> None:
    with pytest.raises(ValidationError):
        Progress(items=[])
    with pytest.raises(ValidationError, match="over the bound"):
        Progress(items=[ProgressItem(value="z" * PROGRESS_MAX_BYTES)])
    with pytest.raises(ValidationError):
        Progress(items=[ProgressItem(value=i) for i in range(1001)])
    with pytest.raises(ValidationError, match="progress goes only"):
        Event(kind=EventKind.TASK, dag_id="d", run_id="r", task_id="t", state="running", progress=Progress(items=[ProgressItem(value=1)]))


# -- a real publish -------------------------------------------------------------------------------


@pytest.fixture
def client(redis_url: str, redis_cleanup: None) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url) as client:
        yield client


def test_progress_goes_on_the_runs_stream_in_order_with_its_events(client, redis_url: str, namespace: str, tmp_path: Path) -> None:
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path))
    sender = ProgressSender(20, publisher=lambda: publisher)
    publisher.publish(Event(kind=EventKind.TASK, dag_id=REF.dag_id, run_id=REF.run_id, task_id=REF.task_id, state="running"))
    for i in range(50):
        sender.offer(REF, None, i)
    sender.finish(REF)
    publisher.publish(Event(kind=EventKind.TASK, dag_id=REF.dag_id, run_id=REF.run_id, task_id=REF.task_id, state="success"))
    assert emit_progress(REF.dag_id, REF.run_id, REF.task_id, {"pct": 100}, key="percent", publisher=publisher) is not None
    log = keys.run_keys(namespace, REF.dag_id, REF.run_id, publisher._partition_count or keys.DEFAULT_PARTITIONS).log
    envelopes = [decode_envelope(fields[b"env"]) for _, fields in client.xrange(log)]
    assert [e.seq for e in envelopes] == list(range(1, len(envelopes) + 1))
    kinds = [e.event.kind.value for e in envelopes]
    assert kinds[0] == "task" and kinds[-2:] == ["task", "progress"] and set(kinds[1:-2]) == {"progress"}
    chunks = [item.value for e in envelopes[1:-2] for item in e.event.progress.items]
    assert chunks == list(range(50))
    assert envelopes[-1].event.progress.items == [ProgressItem(key="percent", value={"pct": 100})]
    assert envelopes[-1].event.source.value == "emit"
