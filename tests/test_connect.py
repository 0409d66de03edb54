"""RUNBELL_REDIS_URL: the shapes accepted (one node, a cluster, a Sentinel group), the errors for the
others (naming the accepted shapes, never a password), and the clients each one makes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster

from runbell.listeners import connect
from runbell.listeners.connect import ACCEPTED, BadRedisUrl, agreed_partitions, async_client, parse, sync_client


def test_one_node_urls_are_taken_as_redis_py_reads_them():
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/2", "unix:///run/redis.sock?db=1"):
        assert parse(url).kind == "node" and parse(url).url == url


def test_a_cluster_url_lists_every_seed_node():
    target = parse("redis+cluster://runbell-hook:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/?ssl=true")
    assert target.kind == "cluster"
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == ("runbell-hook", "p@ss", True)
    assert parse("redis+cluster://h:1").nodes == (("h", 1),)


def test_a_sentinel_url_names_the_master_and_its_database():
    target = parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3?sentinel_password=spw")
    assert (target.kind, target.nodes, target.master, target.db) == ("sentinel", (("s1", 26379), ("s2", 26380)), "mymaster", 3)
    assert (target.password, target.sentinel_password) == ("pw", "spw")
    assert parse("redis+sentinel://s1:26379/mymaster").db == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:hunter2@h:1", "unknown scheme"),
        ("h:6379", "no scheme"),
        ("redis+cluster://u:hunter2@h", "HOST:PORT"),
        ("redis+cluster://u:hunter2@h:1,:2", "HOST:PORT"),
        ("redis+cluster://u:hunter2@h:99999", "HOST:PORT"),
        ("redis+cluster://u:hunter2@h:1/3", "no path"),
        ("redis+cluster://u:hunter2@h:1?read_from=x", "unknown option"),
        ("redis+cluster://u:hunter2@h:1?ssl=maybe", "ssl must be"),
        ("redis+sentinel://u:hunter2@s:1", "MASTER_NAME"),
        ("redis+sentinel://u:hunter2@s:1/m/x", "database must be a number"),
        ("redis+sentinel://s:1/m?sentinel_password=hunter2&x=1", "unknown option"),
        ("redis://u:hunter2@h:port/0", ""),
    ],
)
def test_a_bad_url_is_refused_with_the_accepted_shapes_and_no_password(url, reason):
    with pytest.raises(BadRedisUrl) as refused:
        parse(url)
    message = str(refused.value)
    assert reason in message and all(shape in message for shape in ACCEPTED)
    assert "hunter2" not in message


def test_each_shape_makes_its_client():
    assert type(sync_client("redis://127.0.0.1:6379/0")) is redis.Redis
    assert type(async_client("redis://127.0.0.1:6379/0", max_connections=4)) is aioredis.Redis
    cluster = async_client("redis+cluster://127.0.0.1:1,127.0.0.1:2")  # no connection made yet
    assert isinstance(cluster, aiocluster.RedisCluster)
    assert {(n.host, n.port) for n in cluster.nodes_manager.startup_nodes.values()} == {("127.0.0.1", 1), ("127.0.0.1", 2)}
    sentinel = sync_client("redis+sentinel://127.0.0.1:1/mymaster/2")
    assert sentinel.connection_pool.service_name == "mymaster" and sentinel.connection_pool.connection_kwargs["db"] == 2


def test_the_stored_partition_count_wins_and_a_disagreement_is_logged(caplog):
    log = logging.getLogger("test")
    assert agreed_partitions(None, 16, log) == 16  # we stored ours
    assert agreed_partitions(b"16", 16, log) == 16 and not caplog.records
    with caplog.at_level(logging.ERROR):
        assert agreed_partitions(b"32", 16, log) == 32
    assert "RUNBELL_STREAM_PARTITIONS is 16" in caplog.text and "holds 32" in caplog.text


def test_the_gateway_refuses_a_bad_url_at_start_without_echoing_its_password():
    from pydantic import ValidationError

    from runbell.service.settings import Settings

    with pytest.raises(ValidationError) as refused:
        Settings(redis_url="redis+cluster://runbell:hunter2@redis-1")
    assert "redis+sentinel://" in str(refused.value) and "hunter2" not in str(refused.value)
    assert Settings(redis_url="redis+cluster://runbell:hunter2@redis-1:7000,redis-2:7000").redis_url


def test_a_sentinel_url_reaches_the_master_the_sentinel_names(tmp_path):
    """A real redis-server and a Sentinel watching it (started here, stopped by PID): the hook's and
    the gateway's clients of a redis+sentinel:// URL publish to the master it names."""
    import asyncio
    import shutil
    import subprocess
    import time

    from tests.conftest import free_port

    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    master_port, sentinel_port = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor runbell-main 127.0.0.1 {master_port} 1\n")
    processes = [
        subprocess.Popen([server, "--port", str(master_port), "--bind", "127.0.0.1", "--save", ""], stdout=subprocess.DEVNULL),
        subprocess.Popen([server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/runbell-main/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert sync_client(url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the Sentinel never named its master"
                time.sleep(0.1)
        sync_client(url).set("rbtest-sentinel", "hook")
        assert redis.Redis(port=master_port).get("rbtest-sentinel") == b"hook"

        async def gateway_side() -> bytes | None:
            client = async_client(url, max_connections=2, socket_timeout=2)
            try:
                return await client.get("rbtest-sentinel")
            finally:
                await client.aclose()

        assert asyncio.run(gateway_side()) == b"hook"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


def test_the_startup_line_shows_no_password_of_any_shape():
    from runbell.service.settings import without_password

    shown = {
        "redis+cluster://u:hunter2@a:1,b:2": "redis+cluster://u:***@a:1,b:2",
        "redis+sentinel://:hunter2@s:1/m/0?sentinel_password=hunter2": "redis+sentinel://:***@s:1/m/0?sentinel_password=***",
        "redis+sentinel://s:1,s:2/m?sentinel_password=hunter2": "redis+sentinel://s:1,s:2/m?sentinel_password=***",
        "redis://u:hunter2@h:1/0": "redis://u:***@h:1/0",
        "redis+cluster://a:1,b:2": "redis+cluster://a:1,b:2",
    }
    assert {url: without_password(url) for url in shown} == shown


# -- redis-py's own faults while a cluster's topology changes --------------------------------------


async def _redis_internal_fault() -> AttributeError:
    """What redis-py's cluster pipeline raised here when a master was killed: a connection torn down
    under it, an AttributeError from inside the redis package (redis-py 5-7: ``self._writer`` gone
    in ``_send_packed_command``; 8 raises ConnectionError there, so a connection missing what its
    command packer needs stands in: the same kind of fault, raised in the same package)."""
    from redis.asyncio.connection import Connection

    torn_down = Connection.__new__(Connection)  # never set up
    try:
        torn_down.pack_command("PING")
    except AttributeError as exc:
        return exc
    raise AssertionError("redis-py no longer fails this way: the test needs another fault")


async def test_a_fault_inside_redis_py_is_told_from_one_of_ours():
    assert connect.raised_inside_redis(await _redis_internal_fault())
    try:
        _ = object().writelines  # type: ignore[attr-defined]  # the same error, raised by our own code
    except AttributeError as ours:
        assert not connect.raised_inside_redis(ours)
    assert not connect.raised_inside_redis(ValueError("no traceback"))


async def test_a_replay_read_meeting_a_redis_py_fault_is_an_outage_to_retry_not_a_broken_stream():
    # Seen in CI on a cluster master killed mid-run: the SSE stream died with the AttributeError.
    from redis.exceptions import ConnectionError as RedisConnectionError

    from runbell.bus.schema import START
    from runbell.service.live.topics import _log_after

    class Client:
        async def xrange(self, *args, **kwargs):
            raise await _redis_internal_fault()

    with pytest.raises(RedisConnectionError, match="cluster"):
        await _log_after(None, Client(), SimpleNamespace(log="log"), START, lambda data: data)  # type: ignore[arg-type]
