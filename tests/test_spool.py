"""runbell.listeners.spool: one file per event, written whole (temporary file, then rename), listed
oldest first; the host's flush lock (fcntl) taken by one process at a time. The publisher's side of
it (a flush: what is sent, what is dropped, what is removed) against the real Redis.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, decode_envelope
from runbell.listeners import spool as spool_module
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
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
        raise SystemExit("killed before the rename")  # no clean-up runs, as with SIGKILL

    monkeypatch.setattr(spool_module.os, "replace", killed)
    with pytest.raises(SystemExit):
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
    other = context.Process(target=_hold_flush_lock, args=(str(publisher.spool.directory), held, release))
    other.start()
    try:
        assert held.wait(30)
        assert publisher.flush() == 0
        assert len(publisher.spool.pending()) == 1
    finally:
        release.set()
        other.join(30)
    assert publisher.flush() == 1
    assert os.listdir(publisher.spool.directory) == [".flush.lock"]


# -- the spool keeps its promise --------------------------------------------------------------------


def test_an_append_is_durable_the_file_and_the_rename_are_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    Spool(tmp_path / "spool").append(event_json("queued"))  # the directory exists: only this append's syncs below
    monkeypatch.setattr(os, "fsync", recording_fsync)
    Spool(tmp_path / "spool").append(event_json("running"))
    assert synced == ["file", "dir"]  # the data, then the directory entry the rename made


def test_an_append_that_cannot_be_made_durable_raises_and_leaves_no_event(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path)
    spool.append(event_json("queued"))

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        spool.append(event_json("running"))
    monkeypatch.undo()
    assert [json.loads(read_event(p) or "")["state"] for p in spool.pending()] == ["queued"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def unwritable_dir(tmp_path: Path) -> Path:
    """A spool directory no process can make, not even root's: its parent is a regular file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "spool"


def test_the_hooks_publish_never_raises_when_neither_redis_nor_the_spool_can_take_an_event(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="runbell.publisher")
    down = Publisher(PublisherConfig(redis_url="redis://127.0.0.1:1/0", spool_dir=unwritable_dir(tmp_path)))
    for state in ("queued", "running", "success"):
        assert down.publish(Event(kind=EventKind.RUN, dag_id="etl", run_id="r1", state=state)) is None
    assert down.lost == 3
    lost = [r.getMessage() for r in caplog.records if "is lost" in r.getMessage()]
    assert len(lost) == 1 and "not-a-directory" in lost[0]  # said once, naming where


def test_publish_or_spool_raises_when_the_spool_cannot_take_the_event(tmp_path: Path) -> None:
    from runbell.listeners.publisher import SpoolUnavailable

    down = Publisher(PublisherConfig(redis_url="redis://127.0.0.1:1/0", spool_dir=unwritable_dir(tmp_path)))
    with pytest.raises(SpoolUnavailable) as raised:
        down.publish_or_spool(Event(kind=EventKind.RUN, dag_id="etl", run_id="r1", state="running"))
    assert "not-a-directory" in str(raised.value.directory) and raised.value.reason


def test_two_namespaces_sharing_a_spool_directory_never_send_each_others_events(
    redis_url: str, namespace: str, tmp_path: Path, redis_cleanup: None
) -> None:
    shared = tmp_path / "spool"
    other = namespace + "-other"
    for ns, run_id in ((namespace, "mine"), (other, "theirs")):
        down = Publisher(PublisherConfig(redis_url="redis://127.0.0.1:1/0", namespace=ns, spool_dir=shared))
        assert emit("etl", run_id, "running", publisher=down) is None
    try:
        mine = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=shared))
        assert mine.flush() == 1
        assert logged_states(mine, "mine") == ["running"]
        assert logged_states(mine, "theirs") == []  # the other namespace's event is not sent as this one's ...
        theirs = Publisher(PublisherConfig(redis_url=redis_url, namespace=other, spool_dir=shared))
        assert len(theirs.spool.pending()) == 1  # ... it waits for its own namespace
        assert theirs.flush() == 1 and logged_states(theirs, "theirs") == ["running"]
        assert logged_states(theirs, "mine") == []
    finally:
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{other}:*"):
                client.delete(key)


def test_events_spooled_before_per_namespace_spools_are_adopted_when_the_directory_was_not_shared(publisher: Publisher) -> None:
    root = publisher.config.spool_dir
    legacy = Spool(root)  # what an older version wrote: files at the top of the directory
    for state in ("queued", "running"):
        legacy.append(event_json(state))
    assert emit("etl", "r1", "success", publisher=publisher) == 3  # sent after them, in order
    assert logged_states(publisher) == ["queued", "running", "success"]
    assert legacy.pending() == [] and publisher.spool.pending() == []


def test_events_spooled_before_per_namespace_spools_are_left_when_another_namespace_shares_the_directory(
    publisher: Publisher, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="runbell.publisher")
    root = publisher.config.spool_dir
    Spool(root).append(event_json("queued"))
    (root / "another-namespace").mkdir()
    assert emit("etl", "r1", "running", publisher=publisher) == 1
    assert logged_states(publisher) == ["running"]  # not guessed to be this namespace's
    assert len(Spool(root).pending()) == 1
    [warning] = [r.getMessage() for r in caplog.records if "predate" in r.getMessage()]
    assert "1 events" in warning and publisher.spool.directory.name in warning


def test_a_namespace_directory_name_is_one_safe_path_segment() -> None:
    from runbell.listeners.spool import namespace_dirname

    assert namespace_dirname("runbell") == "runbell"
    for tricky in (".", "..", "a/b", "../etc", ".hidden", "", "x" * 1000, "ns:with spaces"):
        name = namespace_dirname(tricky)
        assert "/" not in name and not name.startswith(".") and name not in ("", ".", "..") and len(name) <= 120
    assert namespace_dirname("x" * 1000) != namespace_dirname("x" * 999)
