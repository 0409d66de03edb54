"""The engines of tests/engines.py, proven with plain redis-py and httpx before any Runbell scenario
relies on them: a Redis Cluster spreads keys over its masters, survives a master's kill -9 and moves a
slot; a Sentinel group fails over and can be made to lose writes; HAProxy balances round robin,
streams unbuffered, reloads, and takes a killed gateway out."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from tests import engines
from tests.engines import SERVED_BY, RedisCluster, SentinelGroup, wait_until

KEYS = 300  # enough that every master of three gets some (each holds a third of the slots)


# -- Redis Cluster ---------------------------------------------------------------------------------


def test_cluster_keys_land_on_every_master_and_a_killed_master_is_replaced(redis_cluster: RedisCluster):
    masters = redis_cluster.masters()
    assert len(masters) == 3 and all(len(redis_cluster.replicas_of(m)) == 1 for m in masters)
    assert sum(last - first + 1 for m in masters for first, last in m.slots) == 16384
    assert all(redis_cluster.server(r.port).in_sync_replica() for m in masters for r in redis_cluster.replicas_of(m))
    assert redis_cluster.url == "redis+cluster://" + ",".join(s.address for s in redis_cluster.servers[:2])
    client = redis_cluster.client()
    for i in range(KEYS):
        client.set(f"rbengines:{i}", i)
    assert all(redis_cluster.server(m.port).client().dbsize() > 0 for m in masters)
    owner = redis_cluster.node_for_key("rbengines:7")
    assert redis_cluster.server(owner.port).client().get("rbengines:7") == "7"  # node_for_key names the holder
    assert redis_cluster.server(owner.port).client().wait(1, 5000) == 1  # its replica has every write

    promoted = redis_cluster.kill_master(owner)

    assert promoted.port != owner.port and promoted.slots == owner.slots
    assert redis_cluster.node_for_key("rbengines:7") == promoted
    assert client.get("rbengines:7") == "7"  # the client that knew the old master follows the new one
    client.set("rbengines:7", "after")
    assert redis_cluster.server(promoted.port).client().get("rbengines:7") == "after"
    rejoined = redis_cluster.restart_node(owner.port)
    assert rejoined.role == "replica" and rejoined.master_id == promoted.node_id
    client.close()


def test_cluster_slot_migration_moves_the_key_and_it_stays_readable(redis_cluster: RedisCluster):
    client = redis_cluster.client()
    key, other = "rbengines:{moved}:a", "rbengines:{moved}:b"  # one hash slot
    client.set(key, "a")
    slot = redis_cluster.keyslot(key)
    source = redis_cluster.node_for_key(key)
    target = next(m for m in redis_cluster.masters() if m.port != source.port)

    migration = redis_cluster.begin_slot_migration(slot, target)
    assert migration.move_keys() == 1 and migration.move_keys() == 0
    assert client.get(key) == "a"  # mid-migration: an ASK redirect to the importing node
    migration.finish()

    assert redis_cluster.node_for_key(key).port == target.port
    with pytest.raises(redis.exceptions.MovedError):
        redis_cluster.server(source.port).client().get(key)
    assert client.get(key) == "a"
    client.set(other, "b")
    assert redis_cluster.server(target.port).client().get(other) == "b"
    assert redis_cluster.migrate_slot(slot, source) == 2  # and back again in one call
    assert redis_cluster.node_for_key(other).port == source.port and client.get(other) == "b"
    client.close()


# -- Redis Sentinel --------------------------------------------------------------------------------


def test_sentinel_failover_moves_the_master_and_writes_go_on(sentinel_group: SentinelGroup):
    assert sentinel_group.url == "redis+sentinel://" + ",".join(s.address for s in sentinel_group.sentinels) + "/runbell"
    master = sentinel_group.sentinel_client().master_for("runbell")
    master.set("rbengines:before", "1")
    old = sentinel_group.master()
    assert old.client().wait(1, 5000) == 1

    new = sentinel_group.failover(kill=True)

    assert new.port != old.port and not old.alive
    assert sentinel_group.sentinel_client().discover_master("runbell") == ("127.0.0.1", new.port)
    master.set("rbengines:after", "2")  # the same client: it asks the sentinels again
    assert new.client().mget("rbengines:before", "rbengines:after") == ["1", "2"]
    sentinel_group.restart(old)  # back, as the new master's replica
    assert sentinel_group.replica() is old

    newer = sentinel_group.failover()  # SENTINEL FAILOVER, both alive

    assert newer is old and sentinel_group.replica() is new
    master.set("rbengines:last", "3")
    assert old.client().get("rbengines:last") == "3"


def test_sentinel_lagging_replica_then_failover_loses_what_it_missed(sentinel_group: SentinelGroup):
    old = sentinel_group.master()
    old.client().set("rbengines:replicated", "1")
    assert old.client().wait(1, 5000) == 1
    with sentinel_group.lagging_replica() as replica:
        old.client().set("rbengines:missed", "2")
        old.kill()
    new = sentinel_group.wait_new_master(old)
    assert new is replica
    assert new.client().mget("rbengines:replicated", "rbengines:missed") == ["1", None]


# -- HAProxy ---------------------------------------------------------------------------------------


class Backend:
    """A trivial HTTP backend in a thread: GET / answers its own address; GET /stream sends one SSE
    event, then a second only once the test has let it (so a proxy that buffered would hold both)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.chunk(b"data: first\n\n")
                    backend.release.wait(30)
                    self.chunk(b"data: second\n\n")
                    self.chunk(b"")
                    return
                body = backend.address.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started = [Backend(), Backend()]
    yield started
    for backend in started:
        backend.close()


def test_load_balancer_sends_requests_round_robin_and_reloads(load_balancer, backends):
    addresses = [b.address for b in backends]
    balancer = load_balancer(addresses)
    with httpx.Client(base_url=balancer.url, timeout=10) as http:  # one keep-alive connection
        served = [http.get("/") for _ in range(6)]
    assert all(r.status_code == 200 and r.headers[SERVED_BY] == r.text for r in served)
    assert Counter(r.text for r in served) == {addresses[0]: 3, addresses[1]: 3}
    assert all(one.text != next_one.text for one, next_one in zip(served, served[1:]))  # alternating
    assert {a: s.sessions_total for a, s in balancer.stats().items()} == {addresses[0]: 3, addresses[1]: 3}

    balancer.set_state(addresses[0], "maint")
    assert {httpx.get(balancer.url + "/", timeout=10).text for _ in range(3)} == {addresses[1]}
    balancer.set_state(addresses[0], "ready")
    balancer.reload(addresses[:1])
    assert {httpx.get(balancer.url + "/", timeout=10).text for _ in range(3)} == {addresses[0]}


def test_load_balancer_streams_without_buffering(load_balancer, backends):
    balancer = load_balancer([backends[0].address])
    with httpx.Client(timeout=httpx.Timeout(10)) as http, http.stream("GET", balancer.url + "/stream") as response:
        lines = response.iter_lines()
        assert response.headers["content-type"] == "text/event-stream"
        assert next(lines) == "data: first"  # through the proxy before the backend sends anything more
        backends[0].release.set()
        assert [line for line in lines if line] == ["data: second"]


def test_gateways_behind_the_load_balancer_a_killed_one_is_taken_out(served_gateway, load_balancer):
    gateways = served_gateway.many(2)
    balancer = load_balancer([g.address for g in gateways], health_path="/readyz")
    with httpx.Client(base_url=balancer.url, timeout=10) as http:
        assert {http.get("/readyz").headers[SERVED_BY] for _ in range(4)} == {g.address for g in gateways}
        gateways[0].kill()
        wait_until(lambda: balancer.stats()[gateways[0].address].status.startswith("DOWN"), "the killed gateway marked down")
        assert {http.get("/readyz").headers[SERVED_BY] for _ in range(4)} == {gateways[1].address}
        gateways[0].start()  # the same port, ready again
        wait_until(lambda: balancer.stats()[gateways[0].address].status == "UP", "the restarted gateway back up")
        assert {http.get("/readyz").headers[SERVED_BY] for _ in range(4)} == {g.address for g in gateways}
    assert gateways[1].stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it once shut down


# -- a missing engine ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_ci", [False, True])
def test_a_missing_binary_skips_off_ci_and_fails_under_ci(monkeypatch, in_ci):
    monkeypatch.setattr(engines, "IN_CI", in_ci)
    monkeypatch.setattr(engines.shutil, "which", lambda *args, **kwargs: None)
    outcome = pytest.fail.Exception if in_ci else pytest.skip.Exception
    with pytest.raises(outcome, match="haproxy is not installed"):
        engines.require_binary("haproxy")
