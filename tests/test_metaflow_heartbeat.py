"""Heartbeats of running Metaflow steps: the decorator's thread, the publisher's heartbeat, the
recorder turning them into the run's heartbeat time, and the runs listing reading it (Metaflow's
branch 5). The real-Metaflow check is in test_metaflow.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import HEARTBEAT_FIELD, Envelope, Event, EventKind, Heartbeat
from runbell.listeners import guard, metaflow_hook
from runbell.listeners.config import PublisherConfig
from runbell.listeners.metaflow_hook import Attempt, Beating, Settings
from runbell.listeners.publisher import Publisher
from runbell.service.store.recorder import Recorder
from tests.conftest import free_port
from tests.test_metaflow_status import metaflow_run
from tests.test_runs import api  # noqa: F401  (a fixture)

FLOW = "LongFlow"
WAIT = 20.0  # upper bound for what should happen at once; never reached when it works


def until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def attempt(run_id: str = "1", step: str = "train") -> Attempt:
    return Attempt(flow=FLOW, run_id=run_id, step=step, task_id="7", retry_count=0, max_user_code_retries=0, map_index=-1)


# -- the thread -------------------------------------------------------------------------------------


def test_beating_beats_until_stopped_then_never_again() -> None:
    calls: list[float] = []
    beating = Beating(lambda: calls.append(time.time()), interval=0.01).start()
    until(lambda: len(calls) >= 3)
    beating.stop(timeout=5)
    assert not beating.alive
    stopped_at = len(calls)
    time.sleep(0.05)  # ten intervals: a thread still beating would have added some
    assert len(calls) == stopped_at


def test_a_beat_that_raises_neither_ends_the_thread_nor_escapes(caplog) -> None:
    tries = Counter[str]()

    def broken() -> None:
        tries["beat"] += 1
        raise RuntimeError("boom")

    beating = Beating(broken, interval=0.01).start()
    until(lambda: tries["beat"] >= 3)
    assert beating.alive
    beating.stop(timeout=5)
    assert not beating.alive
    assert sum("heartbeat failed" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.fixture
def redis_down(tmp_path: Path, monkeypatch) -> Publisher:
    """The process's publisher, pointed at a port nobody listens on, beating every 10 ms."""
    config = PublisherConfig(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", spool_dir=tmp_path, timeout_seconds=0.1, metaflow_heartbeat_seconds=0.01
    )
    publisher = Publisher(config)
    monkeypatch.setattr(guard, "default_publisher", lambda: publisher)
    return publisher


def test_the_attempts_heartbeat_runs_from_pre_step_to_finished_and_redis_down_only_skips(redis_down: Publisher, monkeypatch) -> None:
    sent: list[bool] = []
    heartbeat = redis_down.heartbeat
    monkeypatch.setattr(redis_down, "heartbeat", lambda beat: sent.append(heartbeat(beat)) or sent[-1])
    mine = attempt()
    metaflow_hook.publish_started(mine, Settings())
    assert mine.beating is not None and mine.beating.alive
    until(lambda: len(sent) >= 3)
    metaflow_hook.publish_finished(mine, Settings(), flow=None, is_task_ok=True)
    assert not mine.beating.alive
    assert not any(sent)  # Redis is down: skipped, never raised
    assert len(redis_down.spool.pending()) == 2  # the two events; no heartbeat is spooled


def test_no_heartbeat_when_its_interval_is_0(redis_down: Publisher, monkeypatch) -> None:
    monkeypatch.setattr(redis_down, "config", PublisherConfig(spool_dir=redis_down.config.spool_dir, metaflow_heartbeat_seconds=0))
    mine = attempt()
    metaflow_hook.publish_started(mine, Settings())
    assert mine.beating is None


def test_settings_read_the_heartbeat_interval() -> None:
    assert PublisherConfig.from_env({}).metaflow_heartbeat_seconds == 60
    assert PublisherConfig.from_env({"RUNBELL_METAFLOW_HEARTBEAT_SECONDS": "1.5"}).metaflow_heartbeat_seconds == 1.5


# -- the publisher --------------------------------------------------------------------------------


def test_a_heartbeat_goes_to_the_runs_partition_stream_only(redis_url, namespace, redis_cleanup, tmp_path) -> None:
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path))
    beat = Heartbeat(dag_id=FLOW, run_id="1", task_id="train", try_number=1)
    assert publisher.heartbeat(beat) and publisher.heartbeat(beat)
    run = keys.run_keys(namespace, FLOW, "1")
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(run.stream)
        assert [Heartbeat.model_validate_json(fields[HEARTBEAT_FIELD.encode()]) for _, fields in entries] == [beat, beat]
        assert not client.exists(run.log, run.seq, run.ids)  # no event: no replay log, no seq


def test_a_heartbeat_waits_for_a_busy_publisher_no_longer_than_its_timeout(tmp_path) -> None:
    publisher = Publisher(PublisherConfig(spool_dir=tmp_path, timeout_seconds=0.01))
    with publisher._lock:  # another thread's publish (a spool flush) holds the connection
        done = threading.Event()
        result: list[bool] = []
        threading.Thread(target=lambda: (result.append(publisher.heartbeat(Heartbeat(dag_id=FLOW, run_id="1"))), done.set())).start()
        assert done.wait(WAIT)
    assert result == [False]


# -- the recorder and the store -------------------------------------------------------------------


def metaflow_events(run_id: str, ts: float) -> list[Event]:
    return [
        Event(kind=EventKind.RUN, dag_id=FLOW, run_id=run_id, state="running", run_type="metaflow", ts=ts),
        Event(kind=EventKind.TASK, dag_id=FLOW, run_id=run_id, state="running", task_id="train", try_number=1, ts=ts),
    ]


async def test_the_recorder_moves_the_runs_heartbeat_forward_and_dead_letters_poison(redis_url, redis_cleanup, namespace, store, tmp_path):
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))
    now = time.time()
    for event in metaflow_events("1", now - 100):
        assert publisher.publish(event) is not None
    beats = [now - 10, now - 50, now - 10, now - 80]  # a duplicate and late ones
    for ts in beats:
        assert publisher.heartbeat(Heartbeat(dag_id=FLOW, run_id="1", task_id="train", ts=ts))
    assert publisher.heartbeat(Heartbeat(dag_id=FLOW, run_id="unknown", ts=now))
    stream = keys.run_keys(namespace, FLOW, "1").stream
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd(stream, {HEARTBEAT_FIELD: "not json"})
        await client.xadd(stream, {HEARTBEAT_FIELD: '{"dag_id": "", "run_id": "1"}'})
        rec = Recorder(client, store, namespace, "replica-1", block_ms=100)
        handled = 0
        while handled < 2 + len(beats) + 3:
            handled += await asyncio.wait_for(rec.step(), WAIT)
        pending = (await client.xpending(stream, keys.recorder_group()))["pending"]
    finally:
        await client.aclose()
    run = await store.get_run(FLOW, "1")
    assert run is not None and run.heartbeat_at is not None
    assert run.heartbeat_at.timestamp() == pytest.approx(now - 10, abs=1e-3)
    assert run.last_event_at.timestamp() == pytest.approx(now - 100, abs=1e-3)  # heartbeats are no events
    assert [e.seq for e in await store.events(FLOW, "1")] == [1, 2]
    assert await store.get_run(FLOW, "unknown") is None
    assert rec.decode_errors == Counter({"heartbeat": 2})
    assert await rec.dead_letters.count() == 2
    assert pending == 0


async def test_late_or_repeated_heartbeats_never_move_it_back(store):
    now = time.time()
    await store.record([Envelope(seq=i, event=e) for i, e in enumerate(metaflow_events("1", now - 100), start=1)])
    assert await store.record_heartbeats([Heartbeat(dag_id=FLOW, run_id="1", ts=now - 10)]) == 1
    assert await store.record_heartbeats([Heartbeat(dag_id=FLOW, run_id="1", ts=t) for t in (now - 10, now - 20)]) == 0
    assert await store.record_heartbeats([Heartbeat(dag_id=FLOW, run_id="2", ts=now)]) == 0  # no such run
    run = await store.get_run(FLOW, "1")
    assert run is not None and run.heartbeat_at is not None and run.heartbeat_at.timestamp() == pytest.approx(now - 10, abs=1e-3)
    assert await store.record_heartbeats([]) == 0


# -- the listing ----------------------------------------------------------------------------------


async def test_a_long_step_that_beats_lists_running_and_one_whose_heartbeats_stopped_lists_failed(api, store):  # noqa: F811
    now = time.time()
    cutoff = 2.0  # a small stale_after stands for Metaflow's 360 s
    api.app.state.settings = api.app.state.settings.model_copy(update={"stale_after": cutoff})  # type: ignore[attr-defined]
    started = now - 3600  # both steps started an hour ago and published nothing since
    envelopes = [e for run_id in ("beating", "stopped", "never_beat") for e in metaflow_run(run_id, [("train", "running", started)])]
    await store.record(envelopes)
    await store.record_heartbeats(
        [
            Heartbeat(dag_id="Flow", run_id="beating", ts=now - cutoff / 4),
            Heartbeat(dag_id="Flow", run_id="stopped", ts=now - 3 * cutoff),  # killed: its beats ended
        ]
    )
    rows = {r["run_id"]: r for r in (await api.get("/v1/runs")).json()["runs"]}
    assert {run_id: (r["state"], r["stale"]) for run_id, r in rows.items()} == {
        "beating": ("running", False),
        "stopped": ("failed", False),
        "never_beat": ("failed", False),
    }
    assert (await api.get("/v1/dags/Flow/runs/beating")).json()["state"] == "running"

    async def listed(status: str) -> set[str]:
        return {r["run_id"] for r in (await api.get("/v1/runs", params={"status": status})).json()["runs"]}

    assert await listed("running") == {"beating"}
    assert await listed("failed") == {"stopped", "never_beat"}
