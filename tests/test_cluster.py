"""The bus on a real Redis Cluster (3 masters, 3 replicas), started here: a gateway configured with
``redis+cluster://`` holds one shard subscription per partition, however many waiters; runs whose
partitions spread over every master all reach their long-poll and SSE waiters and the store.

The cluster is tests/engines.py's RedisCluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from runbell.bus import keys
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from tests.engines import RedisCluster, wait_until
from tests.test_gateway import events_path, read_sse, result_path, until

DAG = "etl"
WAIT = 60.0


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own (it kills a master, or moves a slot)."""
    with RedisCluster(tmp_path / "cluster") as cluster:
        yield cluster


def runs_on_every_master(cluster: RedisCluster, namespace: str, per_master: int = 3) -> list[str]:
    """Run ids whose partitions land on every master, ``per_master`` runs on each."""
    masters = cluster.masters()
    by_master: dict[int, list[str]] = {master.port: [] for master in masters}
    for i in range(10_000):
        run_id = f"spread-{i}"
        slot = keys.key_slot(keys.run_keys(namespace, DAG, run_id).seq)
        (port,) = [master.port for master in masters if master.serves(slot)]
        if len(by_master[port]) < per_master:
            by_master[port].append(run_id)
        if all(len(runs) == per_master for runs in by_master.values()):
            return [run_id for runs in by_master.values() for run_id in runs]
    raise AssertionError("no spread found")


def cluster_publisher(cluster: RedisCluster, namespace: str, tmp_path: Path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=cluster.url, namespace=namespace, spool_dir=tmp_path / "spool", timeout_seconds=5))


def test_publish_lua_is_one_atomic_call_on_a_cluster(redis_cluster, namespace, tmp_path):
    publisher = cluster_publisher(redis_cluster, namespace, tmp_path)
    run_ids = runs_on_every_master(redis_cluster, namespace, per_master=1)
    for run_id in run_ids:
        assert emit(DAG, run_id, "running", publisher=publisher) == 1
        assert emit(DAG, run_id, "success", publisher=publisher) == 2
    client = redis_cluster.client(decode_responses=False)
    try:
        for run_id in run_ids:
            k = keys.run_keys(namespace, DAG, run_id)
            assert len({keys.key_slot(key) for key in (k.seq, k.log, k.ids, k.epoch, k.stream, k.live)}) == 1
            assert client.xlen(k.log) == 2
            on_stream = [f[b"env"] for _, f in client.xrange(k.stream)]
            assert sum(run_id.encode() in env for env in on_stream) == 2
        assert client.get(keys.partitions_key(namespace)) == str(keys.DEFAULT_PARTITIONS).encode()
        # `runbell emit` (the hook's settings) on the cluster too.
        env = {
            **os.environ,
            "RUNBELL_REDIS_URL": redis_cluster.url,
            "RUNBELL_NAMESPACE": namespace,
            "RUNBELL_SPOOL_DIR": str(tmp_path / "cli"),
        }
        argv = [str(Path(sys.executable).parent / "runbell"), "emit", "--dag", DAG, "--run", run_ids[0], "--state", "failed"]
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
        assert client.xlen(keys.run_keys(namespace, DAG, run_ids[0]).log) == 3
    finally:
        client.close()


async def waiters_through(gateway, cluster: RedisCluster, namespace: str, tmp_path: Path, run_ids: list[str], fault=None):
    """A long-poll and an SSE waiter on each run; each run's first event, then ``fault()`` (in a
    thread), then its result and end. Returns (long-poll responses, SSE results)."""
    hub = gateway.app.state.hub
    await until(hub.connected.is_set, timeout=WAIT)
    publisher = cluster_publisher(cluster, namespace, tmp_path)
    async with gateway.client() as http:
        polls = [asyncio.create_task(http.get(result_path(r), params={"timeout": 55})) for r in run_ids]
        streams = [asyncio.create_task(read_sse(http, events_path(r))) for r in run_ids]
        await until(lambda: hub.count >= 2 * len(run_ids), timeout=WAIT)
        for run_id in run_ids:
            assert await asyncio.to_thread(emit, DAG, run_id, "running", publisher=publisher) == 1
        if fault is not None:
            await asyncio.to_thread(fault)
        for run_id in run_ids:  # spooled while the client still knows a dead master; sent after
            await asyncio.to_thread(emit, DAG, run_id, "success", task_id="answer", result_task=True, result=run_id, publisher=publisher)
            await asyncio.to_thread(emit, DAG, run_id, "success", publisher=publisher)
        answers = await asyncio.wait_for(asyncio.gather(*polls), WAIT)
        sse = await asyncio.wait_for(asyncio.gather(*streams), WAIT)
    assert [(a.status_code, a.json()["status"], a.json()["result"]) for a in answers] == [(200, "success", r) for r in run_ids]
    for status, _, events in sse:
        assert status == 200 and [e.event for e in events if e.event in ("outcome", "end")] == ["outcome", "end"]
    return answers, sse


async def test_waiters_on_runs_spread_over_every_master_all_get_their_outcome(redis_cluster, gateway_factory, namespace, tmp_path):
    masters = redis_cluster.masters()
    run_ids = runs_on_every_master(redis_cluster, namespace)
    used = {keys.run_partition(DAG, run_id) for run_id in run_ids}
    slots = {p: keys.partition_slot(namespace, keys.DEFAULT_PARTITIONS, p) for p in used}
    assert all(any(master.serves(slot) for slot in slots.values()) for master in masters), "every master owns a used partition"

    gateway = await gateway_factory(redis_url=redis_cluster.url)
    await waiters_through(gateway, redis_cluster, namespace, tmp_path, run_ids)

    # One shard subscription per partition on the masters, not one per waiter or run.
    subscribed = {}
    for master in masters:
        node = redis_cluster.server(master.port).client(decode_responses=False)
        channels = [keys.live_channel(namespace, keys.DEFAULT_PARTITIONS, p) for p in range(keys.DEFAULT_PARTITIONS)]
        counts = {channel.decode(): n for channel, n in node.execute_command("PUBSUB SHARDNUMSUB", *channels)}
        subscribed.update({c: n for c, n in counts.items() if n})
        ssubs = sum(int(c.get("ssub", 0)) for c in node.client_list())
        psubs = sum(int(c.get("psub", 0)) + int(c.get("sub", 0)) for c in node.client_list())
        assert psubs == 0
        assert ssubs == sum(1 for c in channels if master.serves(keys.key_slot(c)))
    assert subscribed == dict.fromkeys(channels, 1)

    store = gateway.app.state.store
    for run_id in run_ids:  # the recorder reads every partition on every master
        await until_recorded(store, run_id, 3)


async def until_recorded(store, run_id: str, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while len(await store.events(DAG, run_id)) < count:
            await asyncio.sleep(0.05)


async def test_a_master_killed_mid_run_loses_no_outcome(own_cluster, gateway_factory, namespace, tmp_path):
    """kill -9 of a master while waiters wait on runs it holds: its replica is promoted, the hub
    subscribes there again (and every subscriber re-reads its log), the publisher follows the new
    master (spooling meanwhile), and every waiter gets its outcome; the store records every event."""
    run_ids = runs_on_every_master(own_cluster, namespace, per_master=2)
    gateway = await gateway_factory(redis_url=own_cluster.url)

    def kill_a_master() -> None:
        own_cluster.kill_master(own_cluster.masters()[1])  # kill -9; returns once its replica is promoted

    resubscribes = gateway.app.state.metrics.resubscribes._value.get()
    answers, sse = await waiters_through(gateway, own_cluster, namespace, tmp_path, run_ids, kill_a_master)
    assert gateway.app.state.metrics.resubscribes._value.get() > resubscribes
    served = [a for a in answers if a.status_code == 200]
    epochs_seen: Counter[int] = Counter()  # runs by how many epochs they went through
    for _, _, events in sse:
        # Nothing lost or repeated. A write the dead master had not yet replicated is lost with it: the
        # promoted replica numbers the run from 1 again in a new epoch (ids are EPOCH-SEQ), so a run's
        # ids may read 1, 1, 2 across two epochs; each event still arrives once, in order.
        delivered = [(e.event, e.id) for e in events if e.event in ("run", "task")]
        assert [kind for kind, _ in delivered] == ["run", "task", "run"]
        assert len({event_id for _, event_id in delivered}) == 3
        epochs_seen[len({event_id.partition("-")[0] for _, event_id in delivered})] += 1
    for run_id in run_ids:
        await until_recorded(gateway.app.state.store, run_id, 3)
    print(
        f"cluster failover: runs={len(run_ids)} waiters={2 * len(run_ids)} served={len(served)} outcomes_lost=0 epochs={dict(epochs_seen)}"
    )


async def test_the_slot_of_a_live_run_migrates_and_no_outcome_is_lost(own_cluster, gateway_factory, namespace, tmp_path):
    """A live run's partition slot moves to another master mid-run: Redis unsubscribes the hub there,
    the hub subscribes on the new owner (and its subscribers re-read their logs), the publisher
    follows MOVED, and every waiter gets its outcome."""
    run_ids = runs_on_every_master(own_cluster, namespace, per_master=1)
    moved_run = run_ids[0]
    slot = keys.key_slot(keys.run_keys(namespace, DAG, moved_run).seq)
    owner = own_cluster.node_for_slot(slot)
    gateway = await gateway_factory(redis_url=own_cluster.url)
    resubscribes = gateway.app.state.metrics.resubscribes._value.get()

    def migrate() -> None:
        own_cluster.migrate_slot(slot, next(master for master in own_cluster.masters() if master.port != owner.port))
        wait_until(lambda: gateway.app.state.metrics.resubscribes._value.get() > resubscribes, "a re-subscription")

    _, sse = await waiters_through(gateway, own_cluster, namespace, tmp_path, run_ids, migrate)
    for _, _, events in sse:
        assert [e.id.rpartition("-")[2] for e in events if e.event in ("run", "task")] == ["1", "2", "3"]
    new_owner = own_cluster.node_for_slot(slot)
    assert new_owner.port != owner.port
    channel = keys.run_keys(namespace, DAG, moved_run).live
    assert (
        own_cluster.server(new_owner.port).client(decode_responses=False).execute_command("PUBSUB SHARDNUMSUB", channel)[0][1] == 1
    )  # subscribed where it lives now
    for run_id in run_ids:
        await until_recorded(gateway.app.state.store, run_id, 3)


async def test_the_acl_users_publish_and_deliver_on_a_cluster(redis_cluster, gateway_factory, namespace, tmp_path):
    """deploy/redis/users.acl, rendered as the README says and loaded on every node: the hook's user
    publishes and the gateway's delivers through redis+cluster:// (a cluster client's start-up
    commands are granted too), and no node refuses anything."""
    from tests.test_redis_acl import GATEWAY_PASSWORD, HOOK_PASSWORD, render_acl

    rules = [line.split()[1:] for line in render_acl(namespace, tmp_path / "users.acl").splitlines() if line.startswith("user runbell-")]
    for server in redis_cluster.servers:
        with server.client() as node:
            node.execute_command("ACL", "LOG", "RESET")
            for rule in rules:
                node.execute_command("ACL", "SETUSER", *rule)
    seeds = ",".join(server.address for server in redis_cluster.servers[:2])

    def url(user: str, password: str) -> str:
        return f"redis+cluster://{quote(user, safe='')}:{quote(password, safe='')}@{seeds}"

    hook = Publisher(
        PublisherConfig(redis_url=url("runbell-hook", HOOK_PASSWORD), namespace=namespace, spool_dir=tmp_path / "spool", timeout_seconds=5)
    )
    gateway = await gateway_factory(redis_url=url("runbell-gateway", GATEWAY_PASSWORD))
    run_id = runs_on_every_master(redis_cluster, namespace, per_master=1)[0]
    await until(gateway.app.state.hub.connected.is_set, timeout=WAIT)
    async with gateway.client() as http:
        poll = asyncio.create_task(http.get(result_path(run_id), params={"timeout": 55}))
        await until(lambda: gateway.app.state.hub.count >= 1, timeout=WAIT)
        assert await asyncio.to_thread(emit, DAG, run_id, "running", publisher=hook) == 1  # published, not spooled
        await asyncio.to_thread(emit, DAG, run_id, "success", task_id="answer", result_task=True, result=run_id, publisher=hook)
        await asyncio.to_thread(emit, DAG, run_id, "success", publisher=hook)
        answer = await asyncio.wait_for(poll, WAIT)
    assert (answer.status_code, answer.json()["result"]) == (200, run_id)
    await until_recorded(gateway.app.state.store, run_id, 3)
    for server in redis_cluster.servers:
        with server.client() as node:
            assert node.execute_command("ACL", "LOG") == []
