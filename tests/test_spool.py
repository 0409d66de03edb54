"""runbell.listeners.spool: one file per event, written whole (temporary file, then rename), listed
oldest first; the host's flush lock (fcntl) taken by one process at a time. The publisher's side of
it (a flush: what is sent, what is dropped, what is removed) against the real Redis.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, decode_envelope
from runbell.listeners import spool as spool_module
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher
from runbell.listeners.spool import Spool, read_event

PER_WRITER = 200


def event_json(state: str = "running", run_id: str = "r1") -> str:
    return Event(kind=EventKind.RUN, dag_id="etl", run_id=run_id, state=state).to_json()


def test_appended_events_read_back_whole_and_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")  # made on first append
    assert spool.pending() == [] and spool.is_empty()
    texts = [event_json(state) for state in ("queued", "running", "success")]
    paths = [spool.append(text) for text in texts]
    assert spool.pending() == paths
    assert [read_event(p) for p in spool.pending()] == texts
    assert not spool.is_empty()


def test_an_append_cut_short_leaves_nothing_to_read(tmp_path: Path, monkeypatch) -> None:
    """A process killed mid-write leaves at most its temporary file, which is never taken for an event."""
    spool = Spool(tmp_path)
    spool.append(event_json("queued"))

    def killed(src: object, dst: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(spool_module.os, "replace", killed)
    with pytest.raises(OSError):
        spool.append(event_json("running"))
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the torn write is there...
    assert [json.loads(read_event(p) or "")["state"] for p in spool.pending()] == ["queued"]  # ...and not read


def test_a_file_taken_by_another_flusher_reads_as_none(tmp_path: Path) -> None:
    path = Spool(tmp_path).append(event_json())
    path.unlink()
    assert read_event(path) is None


def _write(directory: str, writer: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    spool = Spool(Path(directory))
    for i in range(PER_WRITER):
        spool.append(json.dumps({"writer": writer, "i": i, "pad": "x" * 2000}))


def test_two_processes_appending_at_once_lose_and_mix_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    start = context.Event()
    writers = [context.Process(target=_write, args=(str(tmp_path), n, start)) for n in (1, 2)]
    for w in writers:
        w.start()
    start.set()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    records = [json.loads(read_event(p) or "") for p in Spool(tmp_path).pending()]  # each one whole
    assert len(records) == 2 * PER_WRITER
    for n in (1, 2):  # each writer's events, all there and in its order
        assert [r["i"] for r in records if r["writer"] == n] == list(range(PER_WRITER))


def _hold_flush_lock(directory: str, held: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    with Spool(Path(directory)).flush_lock() as got:
        if got:
            held.set()
            release.wait(60)


def test_one_process_at_a_time_holds_the_flush_lock(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    held, release = context.Event(), context.Event()
    other = context.Process(target=_hold_flush_lock, args=(str(tmp_path), held, release))
    other.start()
    try:
        assert held.wait(30), "the other process did not get the lock"
        with Spool(tmp_path).flush_lock() as got:
            assert got is False
    finally:
        release.set()
        other.join(30)
    with Spool(tmp_path).flush_lock() as got:
        assert got is True  # released with the other process's flush


# -- flushing -------------------------------------------------------------------------------------


@pytest.fixture
def publisher(redis_url: str, namespace: str, tmp_path: Path, redis_cleanup: None) -> Publisher:
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "spool"))


def logged_states(publisher: Publisher, run_id: str = "r1") -> list[str]:
    with redis.Redis.from_url(publisher.config.redis_url) as client:
        entries = client.xrange(keys.run_keys(publisher.config.namespace, "etl", run_id).log)
    return [decode_envelope(fields[b"env"]).event.state for _, fields in entries]


def test_a_flush_sends_the_spool_in_order_and_removes_what_it_sent(publisher: Publisher) -> None:
    for state in ("queued", "running", "success"):
        publisher.spool.append(event_json(state))
    assert publisher.flush() == 3
    assert logged_states(publisher) == ["queued", "running", "success"]
    assert publisher.spool.pending() == []


def test_nothing_is_removed_while_redis_is_unreachable(namespace: str, tmp_path: Path) -> None:
    down = Publisher(PublisherConfig(redis_url="redis://127.0.0.1:1/0", namespace=namespace, spool_dir=tmp_path))
    spooled = [down.spool.append(event_json(state)) for state in ("queued", "running")]
    assert down.flush() == 0
    assert down.spool.pending() == spooled


def test_an_unreadable_file_is_dropped_not_counted_and_the_rest_goes_out(publisher: Publisher, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="runbell.publisher")
    publisher.spool.append(event_json("queued"))
    bad = [publisher.spool.append('{"kind": "run", "dag_id": '), publisher.spool.append('{"kind": "run"}')]  # torn; invalid
    publisher.spool.append(event_json("success"))
    assert publisher.flush() == 2  # what was sent
    assert logged_states(publisher) == ["queued", "success"]
    assert publisher.spool.pending() == [] and not any(p.exists() for p in bad)
    dropped = [r.getMessage() for r in caplog.records if "unreadable spool file" in r.getMessage()]
    assert dropped == [f"runbell: dropping unreadable spool file {bad[0].name}"]  # said once, not per file


def test_a_flush_leaves_the_spool_to_the_process_holding_the_lock(publisher: Publisher) -> None:
    publisher.spool.append(event_json())
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    held, release = context.Event(), context.Event()
    other = context.Process(target=_hold_flush_lock, args=(str(publisher.config.spool_dir), held, release))
    other.start()
    try:
        assert held.wait(30)
        assert publisher.flush() == 0
        assert len(publisher.spool.pending()) == 1
    finally:
        release.set()
        other.join(30)
    assert publisher.flush() == 1
    assert os.listdir(publisher.config.spool_dir) == [".flush.lock"]
