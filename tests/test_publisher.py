"""runbell.listeners.publisher on its own, against the real Redis: what a publish writes, and what it
does while Redis cannot be reached (the hook's view of it is in test_hook.py, assets in test_assets.py).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, decode_envelope
from runbell.listeners import publisher as publisher_module
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher
from tests.conftest import free_port

DAG = "etl"


def run_event(run_id: str, state: str = "running") -> Event:
    return Event(kind=EventKind.RUN, dag_id=DAG, run_id=run_id, state=state)


@pytest.fixture
def client(redis_url: str, redis_cleanup: None) -> Iterator[redis.Redis]:
    """A client of the test's Redis (the test's keys are deleted afterwards)."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


def make_publisher(redis_url: str, namespace: str, spool_dir: Path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=spool_dir))


def run_log(client: redis.Redis, namespace: str, run_id: str) -> list[tuple[bytes, int, str]]:
    """(entry id, seq, event id) of each entry of a run's replay log."""
    entries = client.xrange(keys.run_keys(namespace, DAG, run_id).log)
    return [(entry_id, (env := decode_envelope(fields[b"env"])).seq, env.event.id) for entry_id, fields in entries]


def test_each_run_numbers_its_events_in_publish_order(client, redis_url, namespace, tmp_path) -> None:
    publisher = make_publisher(redis_url, namespace, tmp_path)
    a = [run_event("a", s) for s in ("queued", "running", "success")]
    b = [run_event("b", s) for s in ("queued", "running")]
    order = [a[0], b[0], a[1], b[1], a[2]]  # interleaved: each run still counts from 1
    assert [publisher.publish(e) for e in order] == [1, 1, 2, 2, 3]
    assert run_log(client, namespace, "a") == [(f"0-{i + 1}".encode(), i + 1, e.id) for i, e in enumerate(a)]
    assert run_log(client, namespace, "b") == [(f"0-{i + 1}".encode(), i + 1, e.id) for i, e in enumerate(b)]
    ids = client.hgetall(keys.run_keys(namespace, DAG, "a").ids)
    assert ids == {e.id.encode(): str(i + 1).encode() for i, e in enumerate(a)}


def partition_stream(client, namespace: str, run_id: str) -> list[tuple[str, int, str]]:
    """(run_id, seq, event id) of the run's partition stream's entries, of that run only."""
    entries = client.xrange(keys.run_keys(namespace, DAG, run_id).stream)
    found = [decode_envelope(fields[b"env"]) for _, fields in entries]
    return [(env.event.run_id, env.seq, env.event.id) for env in found if env.event.run_id == run_id]


def test_every_event_goes_to_its_partition_stream_with_its_seq(client, redis_url, namespace, tmp_path) -> None:
    publisher = make_publisher(redis_url, namespace, tmp_path)
    events = [run_event("a"), run_event("b"), run_event("a", "success")]
    for event in events:
        publisher.publish(event)
    assert partition_stream(client, namespace, "a") == [("a", 1, events[0].id), ("a", 2, events[2].id)]
    assert partition_stream(client, namespace, "b") == [("b", 1, events[1].id)]
    assert client.get(keys.partitions_key(namespace)) == b"16"  # stored by the first publish


def test_a_resent_run_event_keeps_its_seq_and_is_logged_once(client, redis_url, namespace, tmp_path) -> None:
    publisher = make_publisher(redis_url, namespace, tmp_path)
    event = run_event("a")
    assert publisher.publish(event) == 1
    assert publisher.publish(event) == 1
    assert publisher.publish(run_event("a", "success")) == 2
    assert [seq for _, seq, _ in run_log(client, namespace, "a")] == [1, 2]
    # Log and partition stream are written in one atomic call: a re-send reaches neither again.
    assert [seq for _, seq, _ in partition_stream(client, namespace, "a")] == [1, 2]


class Forwarder:
    """A TCP port that forwards to Redis, opened when the test says: Redis "comes back" on the very
    address the publisher was configured with."""

    def __init__(self, port: int, redis_url: str):
        self.port = port
        target = redis.connection.parse_url(redis_url)
        self.target = (target.get("host", "127.0.0.1"), int(target.get("port", 6379)))
        self.server: socket.socket | None = None

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_while_redis_is_unreachable_events_spool_and_go_out_in_order_when_it_answers(
    client, redis_url, namespace, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(publisher_module, "BREAKER_SECONDS", 0.0)  # every publish tries Redis again
    monkeypatch.setattr(publisher_module, "RETRY_SPOOL_SECONDS", 3600.0)  # the spool's thread stays out of it
    forwarder = Forwarder(free_port(), redis_url)  # nothing listens on its port yet
    publisher = make_publisher(f"redis://127.0.0.1:{forwarder.port}/0", namespace, tmp_path / "spool")
    events = [run_event("a", s) for s in ("queued", "running", "success")]
    try:
        assert [publisher.publish(e) for e in events[:2]] == [None, None]  # spooled; nothing raised
        assert [p.read_text() for p in publisher.spool.pending()] == [e.to_json() for e in events[:2]]
        assert run_log(client, namespace, "a") == []
        forwarder.start()
        assert publisher.publish(events[2]) == 3  # behind the two spooled ones
    finally:
        forwarder.close()
    assert [event_id for _, _, event_id in run_log(client, namespace, "a")] == [e.id for e in events]
    assert publisher.spool.pending() == []


def test_a_redis_that_never_answers_costs_one_timeout_then_the_breaker_spools(namespace, tmp_path, monkeypatch) -> None:
    """Bounded: the publish gives up after the command timeout, and the next ones do not connect again."""
    monkeypatch.setattr(publisher_module, "BREAKER_SECONDS", 3600.0)
    monkeypatch.setattr(publisher_module, "RETRY_SPOOL_SECONDS", 3600.0)
    # Never accepted, never answered: the kernel completes each connection into the backlog, where
    # they are counted afterwards.
    silent = socket.create_server(("127.0.0.1", 0))
    publisher = make_publisher(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", namespace, tmp_path / "spool")
    results: list[int | None] = []
    worker = threading.Thread(target=lambda: results.extend(publisher.publish(run_event("a", s)) for s in ("queued", "running", "success")))
    connections = []
    try:
        worker.start()
        worker.join(60)  # only a hang guard: each publish is bounded by timeout_seconds
        assert not worker.is_alive(), "a publish to a silent Redis did not return"
        silent.setblocking(False)
        while True:
            try:
                connections.append(silent.accept()[0])
            except BlockingIOError:
                break
    finally:
        silent.close()
        for conn in connections:
            conn.close()
    assert results == [None, None, None]
    assert len(connections) == 1  # the breaker: no connection after the first failure
    assert len(publisher.spool.pending()) == 3


def test_the_stored_partition_count_wins_over_a_disagreeing_hook(client, redis_url, namespace, tmp_path, caplog) -> None:
    client.set(keys.partitions_key(namespace), 4)  # stored by whichever hook or gateway came first
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5, stream_partitions=32)
    assert Publisher(config).publish(run_event("a")) == 1
    assert client.xlen(keys.run_keys(namespace, DAG, "a", 4).log) == 1  # the stored count's layout
    assert not client.exists(keys.run_keys(namespace, DAG, "a", 32).log)
    assert "RUNBELL_STREAM_PARTITIONS is 32 but this namespace's Redis holds 4" in caplog.text


def test_a_bad_url_is_said_once_without_its_password_and_the_events_are_kept(tmp_path, caplog) -> None:
    publisher = Publisher(PublisherConfig(redis_url="redis+cluster://hook:hunter2@redis-1", spool_dir=tmp_path))
    assert [publisher.publish(run_event("a", s)) for s in ("running", "success")] == [None, None]  # never raises
    assert len(publisher.spool.pending()) == 2 and publisher.lost == 0
    (said,) = [r.getMessage() for r in caplog.records if "RUNBELL_REDIS_URL" in r.getMessage()]
    assert "accepted: redis://" in said and "redis+cluster://" in said and "hunter2" not in said


def test_the_partition_count_is_asked_again_so_a_lost_one_is_stored_again_and_a_stored_one_followed(
    client, redis_url, namespace, tmp_path, monkeypatch
) -> None:
    """A long-lived hook process (Airflow's scheduler, triggerer) outlives the key: Redis restarted
    empty or was flushed. It stores the count in use again, and follows the one stored meanwhile."""
    from runbell.listeners import publisher as publisher_module

    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, timeout_seconds=5))
    assert publisher.publish(run_event("a")) == 1
    client.delete(keys.partitions_key(namespace))  # lost with Redis's data
    monkeypatch.setattr(publisher_module, "PARTITIONS_CHECK_SECONDS", 0.0)
    assert publisher.publish(run_event("b")) == 1
    assert client.get(keys.partitions_key(namespace)) == str(keys.DEFAULT_PARTITIONS).encode()  # stored again
    client.set(keys.partitions_key(namespace), 4)  # e.g. stored by a gateway before this hook asked again
    assert publisher.publish(run_event("c")) == 1
    assert client.xlen(keys.run_keys(namespace, DAG, "c", 4).log) == 1  # the stored count followed


# -- results: the cap is checked while encoding -----------------------------------------------------


class Counted:
    """An item json encodes through default=str, counting how many times it was encoded."""

    def __init__(self) -> None:
        self.encoded = 0

    def __str__(self) -> str:
        self.encoded += 1
        return "x"


def test_a_result_far_over_the_cap_becomes_a_reference_without_being_encoded_whole() -> None:
    item = Counted()
    value = [item] * 2_000_000  # 8 MB of JSON; the cap is 1 KiB
    result = publisher_module.make_result(value, dag_id=DAG, run_id="r", task_id="t", map_index=3, max_bytes=1024)
    assert result.is_ref and result.value is None and result.ref is not None and result.ref.map_index == 3
    assert 1024 < result.size <= 8_000_001  # over the cap, at most the JSON's 2 + 4 bytes each - 1
    assert item.encoded == 0  # surely over the cap by its length alone: nothing was encoded


@pytest.mark.parametrize(
    "value",
    [
        {"rows": 3, "name": "é\u2028", "nested": [1, 2.5, None, True, {"k": [float("nan")]}], 7: "int key"},
        "x" * 1024,
        [Path("/tmp"), (1, 2)],
        1e300,
        [],
    ],
)
def test_a_result_under_the_cap_is_as_json_dumps_made_it(value) -> None:
    import json

    encoded = json.dumps(value, default=str, separators=(",", ":"))
    result = publisher_module.make_result(value, dag_id=DAG, run_id="r", task_id="t", map_index=-1, max_bytes=len(encoded.encode()))
    assert not result.is_ref and result.size == len(encoded.encode())
    assert Event(kind=EventKind.TASK, dag_id=DAG, run_id="r", task_id="t", state="success", result=result).result == result
    assert json.dumps(result.value, separators=(",", ":")) == json.dumps(json.loads(encoded), separators=(",", ":"))


def test_a_result_one_byte_over_the_cap_is_a_reference_with_its_size() -> None:
    result = publisher_module.make_result("x" * 500, dag_id=DAG, run_id="r", task_id="t", map_index=-1, max_bytes=501)
    assert result.is_ref and result.size == 502


def test_a_result_under_the_cap_encodes_each_item_once() -> None:
    # The size is bounded by a walk that encodes nothing, then the value is encoded once, whole.
    item = Counted()
    result = publisher_module.make_result([item] * 100, dag_id=DAG, run_id="r", task_id="t", map_index=-1, max_bytes=1024)
    assert not result.is_ref and result.value == ["x"] * 100
    assert item.encoded == 100


@pytest.mark.parametrize("value", [{"k": [1, {"a": "é" * 10}]}, ["\n" * 40], [123456789] * 20, {"1": 2}])
def test_the_walk_never_says_more_than_the_json_holds(value) -> None:
    import json

    encoded = json.dumps(value, default=str, separators=(",", ":")).encode()
    assert publisher_module._json_size_past(value, 10**9) <= len(encoded)
