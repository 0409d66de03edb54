"""GET /readyz of a gateway in the test's event loop, against real Redis (the machine's, or one of
the test's own that it hangs with SIGSTOP): each state of runbell.service.http.readiness.

Not ready until subscribed and caught up with the streams' backlog; once ready, a lost subscription
or a failing ping is ridden out for the grace, then 503 until it passes again; draining is 503 at once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, envelope_json
from runbell.service.http.readiness import Readiness
from runbell.service.store.recorder import COUNT, Backlog, Recorder
from tests.test_gateway import until
from tests.test_recorder import recorder, stored_count

READ = 20  # entries a partition per read, in the backlog test (its first pass leaves the rest)


async def fill_backlog(client, namespace: str, runs: int, prefix: str = "backlog") -> dict[str, int]:
    """Puts `runs` runs' events straight into their partition streams, as the publish script would
    (seq 1, 2, ... per run), pipelined; no recorder has read them. Returns entries per stream."""
    per_stream: dict[str, int] = {}
    async with client.pipeline(transaction=False) as pipe:
        for i in range(runs):
            dag_id, run_id = "etl", f"{prefix}-{i}"
            events = [Event(kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state="running")]
            for task in ("extract", "load"):
                for state in ("running", "success"):
                    events.append(Event(kind=EventKind.TASK, dag_id=dag_id, run_id=run_id, state=state, task_id=task, try_number=1))
            stream = keys.run_keys(namespace, dag_id, run_id).stream
            for seq, event in enumerate(events, 1):
                pipe.xadd(stream, {"env": envelope_json(seq, event.to_json())})
            per_stream[stream] = per_stream.get(stream, 0) + len(events)
        await pipe.execute()
    return per_stream


async def readyz(gateway):
    async with gateway.client(token=None) as http:
        return await http.get("/readyz")


async def until_status(gateway, status: int, timeout: float = 20.0):
    async with asyncio.timeout(timeout):
        while (response := await readyz(gateway)).status_code != status:
            await asyncio.sleep(0.05)
    return response


async def test_not_ready_until_the_recorder_has_caught_up_with_the_backlog(gateway_factory, redis_url, namespace, monkeypatch):
    client = aioredis.Redis.from_url(redis_url)
    per_stream = await fill_backlog(client, namespace, runs=300)
    await client.aclose()
    total = sum(per_stream.values())
    # The recorder makes its first pass (READ entries a partition), then waits for the gate: the
    # backlog after it is known exactly.
    gate, step = asyncio.Event(), Recorder.step

    async def gated_step(self: Recorder) -> int:
        if self.passes:
            await gate.wait()
        self.count = COUNT if gate.is_set() else READ
        return await step(self)

    monkeypatch.setattr(Recorder, "step", gated_step)
    gateway = await gateway_factory(readiness_max_backlog=0)
    await until(lambda: gateway.app.state.recorder.passes == 1 and gateway.app.state.hub.connected.is_set())
    behind = sum(max(0, n - READ) for n in per_stream.values())
    assert behind > 0
    held = await until_status(gateway, 503)
    while held.json()["checks"]["recorder"] != f"catching up: {behind} entries behind":  # the next round's figure
        assert held.status_code == 503, held.json()
        await asyncio.sleep(0.05)
        held = await readyz(gateway)
    assert held.json() == {
        "status": "not ready",
        "checks": {"redis": "ok", "database": "ok", "pubsub": "ok", "recorder": f"catching up: {behind} entries behind"},
    }
    gate.set()
    ready = await until_status(gateway, 200, timeout=90)  # the rest recorded: seconds, more on a busy machine
    assert ready.json() == {"status": "ready", "checks": {"redis": "ok", "database": "ok", "pubsub": "ok", "recorder": "ok"}}
    assert await stored_count(gateway.app.state.store) == total  # bound 0: everything was recorded first


async def test_once_ready_a_lost_subscription_is_ridden_out_for_the_grace_only(gateway_factory):
    gateway = await gateway_factory(readiness_grace=1.5)
    await until_status(gateway, 200)
    hub = gateway.app.state.hub
    await hub.listener.stop()  # the subscriptions are gone (as when the listener fails)
    lost = time.monotonic()
    within = await readyz(gateway)
    assert within.status_code == 200 and within.json()["checks"]["pubsub"].startswith("not subscribed (lost"), within.json()
    out = await until_status(gateway, 503)
    assert time.monotonic() - lost >= 1.5
    assert out.json()["checks"]["pubsub"].startswith("not subscribed (lost"), out.json()
    hub.listener.start()  # subscribed again: ready again
    back = await until_status(gateway, 200)
    assert back.json()["checks"]["pubsub"] == "ok"


async def test_once_ready_a_failing_database_ping_is_reported_and_ridden_out_for_the_grace(gateway_factory):
    gateway = await gateway_factory(readiness_grace=1.5)
    await until_status(gateway, 200)
    readiness = gateway.app.state.readiness
    ping = readiness.ping_store

    async def refused() -> None:
        raise OSError("connection refused")

    readiness.ping_store = refused
    async with asyncio.timeout(10):
        while (within := await readyz(gateway)).json()["checks"]["database"] == "ok":
            await asyncio.sleep(0.05)
    assert within.status_code == 200 and within.json()["checks"]["database"].startswith("OSError (last ok"), within.json()
    out = await until_status(gateway, 503)
    assert out.json()["checks"]["database"].startswith("OSError"), out.json()
    readiness.ping_store = ping
    await until_status(gateway, 200)


async def test_redis_hanging_is_ridden_out_for_the_grace_then_not_ready_until_it_answers(gateway_factory, own_redis):
    gateway = await gateway_factory(redis_url=own_redis.url, readiness_grace=3)
    await until_status(gateway, 200)
    # A second and a half (longer than a ping's timeout): every answer is 200, some say Redis failed.
    await asyncio.to_thread(own_redis.hang)
    answers = []
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        answers.append(await readyz(gateway))
        await asyncio.sleep(0.05)
    await asyncio.to_thread(own_redis.resume)
    assert {a.status_code for a in answers} == {200}, [a.json() for a in answers if a.status_code != 200]
    assert any(a.json()["checks"]["redis"].startswith("TimeoutError") for a in answers), [a.json() for a in answers]
    await until(lambda: gateway.app.state.readiness.probes["redis"].failure is None)
    # Past the grace: 503, naming Redis; back to 200 once it answers again.
    await asyncio.to_thread(own_redis.hang)
    try:
        out = await until_status(gateway, 503)
    finally:
        await asyncio.to_thread(own_redis.resume)
    assert out.json()["checks"]["redis"].startswith("TimeoutError"), out.json()
    await until_status(gateway, 200)


async def test_draining_is_not_ready_at_once(gateway):
    await until_status(gateway, 200)
    gateway.app.state.hub.drain()
    response = await readyz(gateway)
    assert response.status_code == 503 and response.json()["checks"]["shutdown"] == "draining"


async def test_a_gateway_without_a_recorder_does_not_wait_for_one(gateway_factory):
    gateway = await gateway_factory(recorder=False)
    ready = await until_status(gateway, 200)
    assert ready.json()["checks"]["recorder"] == "ok"


async def test_caught_up_on_a_cluster_whose_partitions_live_on_every_master(redis_cluster, gateway_factory, namespace):
    """The backlog is asked of every partition's stream where it lives (a pipeline a master)."""
    from runbell.listeners.connect import async_client

    client = async_client(redis_cluster.url)
    per_stream = await fill_backlog(client, namespace, runs=200)
    await client.aclose()
    masters = {master.port for master in redis_cluster.masters() for stream in per_stream if master.serves(keys.key_slot(stream))}
    assert len(masters) == 3  # the backlog is spread over every master
    gateway = await gateway_factory(redis_url=redis_cluster.url, readiness_max_backlog=0)
    first = await readyz(gateway)
    assert first.status_code == 503 and first.json()["checks"]["recorder"].startswith("catching up"), first.json()
    ready = await until_status(gateway, 200, timeout=60)
    assert ready.json()["checks"] == {"redis": "ok", "database": "ok", "pubsub": "ok", "recorder": "ok"}
    assert await stored_count(gateway.app.state.store) == sum(per_stream.values())


# -- the recorder's backlog, as readiness asks it ---------------------------------------------------


async def test_the_backlog_is_the_groups_lag_plus_what_this_consumer_read_and_has_not_recorded(redis_url, namespace, store, redis_cleanup):
    client = aioredis.Redis.from_url(redis_url)
    try:
        per_stream = await fill_backlog(client, namespace, runs=40)
        rec = recorder(client, store, namespace, consumer="me")
        assert (await rec.backlog()).undelivered == sum(per_stream.values())  # no group yet: every entry is to read
        stream = next(iter(per_stream))
        await client.xgroup_create(stream, keys.recorder_group(), id="0")
        read = await client.xreadgroup(keys.recorder_group(), "me", {stream: ">"}, count=3)
        await client.xreadgroup(keys.recorder_group(), "another", {stream: ">"}, count=1)  # another replica's: in flight there
        backlog = await rec.backlog()
        assert backlog == Backlog(undelivered=sum(per_stream.values()) - 4, own_pending=3)
        # An entry deleted past the group's position: Redis cannot tell the lag; the entries are counted.
        entries = await client.xrange(stream)
        await client.xdel(stream, entries[-1][0])
        assert (await client.xinfo_groups(stream))[0]["lag"] is None
        assert await rec.backlog() == Backlog(undelivered=backlog.undelivered - 1, own_pending=3)
        assert len(read[0][1]) == 3
    finally:
        await client.aclose()


async def test_an_acl_that_refuses_the_backlog_does_not_keep_a_replica_out_for_ever():
    # A gateway user of an ACL from before readiness asked the backlog (no XINFO GROUPS, XPENDING,
    # XLEN): the backlog cannot be known, and never will be. After the recorder's first pass the
    # replica is ready, and says why its backlog is unknown (not "catching up" for ever).
    class Refused:
        passes, partitions = 1, 16

        async def backlog(self) -> Backlog:
            raise NoPermissionError("this user has no permissions to run the 'xinfo|groups' command")

    async def ping() -> bool:
        return True

    connected = asyncio.Event()
    connected.set()
    hub = SimpleNamespace(connected=connected, lost_at=None, draining=False)
    readiness = Readiness(hub, ping, ping, Refused(), grace=5.0, max_backlog=0)  # type: ignore[arg-type]
    await readiness.check()
    report = readiness.report()
    assert report.ready, report.checks
    assert "NOPERM" in report.checks["recorder"] or "ACL" in report.checks["recorder"]


async def test_a_fleet_backlog_that_stays_over_the_bound_delays_a_new_replica_only_up_to_the_longest_catch_up():
    # Under sustained overload the fleet's backlog may never drop under the bound: a replica added to
    # scale out must still join (its recorder works the backlog down whether it is ready or not), once
    # it has waited the longest catch-up; until then it says how far behind the fleet is.
    class Behind:
        passes, partitions = 1, 16

        async def backlog(self) -> Backlog:
            return Backlog(undelivered=50_000, own_pending=0)

    async def ping() -> bool:
        return True

    connected = asyncio.Event()
    connected.set()
    hub = SimpleNamespace(connected=connected, lost_at=None, draining=False)
    now = [100.0]
    readiness = Readiness(hub, ping, ping, Behind(), grace=5.0, max_backlog=1000, max_catch_up=60.0, clock=lambda: now[0])  # type: ignore[arg-type]
    await readiness.check()
    report = readiness.report()
    assert not report.ready and report.checks["recorder"] == "catching up: 50000 entries behind", report.checks
    now[0] += 59.0
    await readiness.check()
    assert not readiness.report().ready
    now[0] += 2.0
    await readiness.check()
    report = readiness.report()
    assert report.ready, report.checks
    assert report.checks["recorder"].startswith("ok: 50000 entries behind"), report.checks
