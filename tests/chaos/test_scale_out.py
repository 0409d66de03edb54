"""Scale-out on the real engines (tests/engines.py): three `runbell serve` gateways sharing one
PostgreSQL store, with long-poll waiters, SSE followers of the client library and raw EventSources on
every run, through a fault in the middle of the runs:

- the Redis master is killed -9 and Sentinel promotes its replica, the gateways and the hook's
  Publisher on the same redis+sentinel:// URL (the hook spools what it publishes meanwhile);
- behind HAProxy (round robin, no stickiness) one gateway is killed -9;
- behind HAProxy every gateway is restarted in turn (SIGTERM, ready again, the next), each closing
  event published while one of them is down;
- behind HAProxy with a webhook subscription, one gateway is killed -9 while it holds leases on outcome
  messages (the receiver holding every request): a survivor delivers them once the lease runs out, and
  the receiver is answered each message exactly once.

Each run publishes its first half (tests/chaos/test_failover.py's opening), the fault strikes, then the
rest (its closing). Every caller must get its run's outcome, every SSE client every event exactly once
in order (the raw EventSources keep what came off the wire), and the store every event of every run.
Each scenario records its chaos summary line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import Sequence

import asyncpg
import httpx

from tests.chaos.test_failover import DAG, Caller, Fault, each_first, hook_publisher, report_and_check, run_id, runs_through, until
from tests.engines import LoadBalancer, SentinelGroup, wait_until
from tests.served import ServedGateway
from tests.test_webhooks_e2e import receiving

RUNS = 4
GATEWAYS = 3
WEBHOOK_RUNS = 10
WEBHOOK_ATTEMPT_SECONDS = 5  # a held attempt lasts this long: the kill comes well within it (the lease: 2x + 5 s)


# -- the scenarios --------------------------------------------------------------------------------


async def test_sentinel_failover_mid_run_loses_nothing(
    served_gateway, sentinel_group: SentinelGroup, postgres_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_REDIS_URL=sentinel_group.url, RUNBELL_DATABASE_URL=postgres_url)
    publisher = hook_publisher(sentinel_group.url, namespace, tmp_path)
    old_master = sentinel_group.master()
    promoted: list[str] = []

    def kill_the_master(_: Sequence[Caller]) -> None:
        # The opening must be on the replica before the kill: what asynchronous replication has not
        # carried yet is lost with the master (the README says so); this scenario is about the rest.
        with old_master.client() as client:
            assert client.wait(1, 10_000) == 1
        old_master.kill()  # the events published now find no master: the hook spools them

    def promoted_replica(_: Sequence[Caller]) -> None:
        promoted.append(sentinel_group.wait_new_master(old_master).address)

    sites = each_first([g.url for g in gateways])
    outcomes = await runs_through(RUNS, sites, gateways, publisher, postgres_url, [kill_the_master, promoted_replica])
    report_and_check(outcomes, chaos_summary, gateways=GATEWAYS, killed_master=old_master.address, promoted=promoted[0])
    for caller in outcomes.sse_callers:  # the promoted replica numbers on in an epoch of its own
        epochs = [e.id.partition("-")[0] for e in caller.seen() if e.id is not None]
        assert len(set(epochs[:3])) == len(set(epochs[3:])) == 1 and epochs[0] != epochs[-1], (caller.kind, caller.run, epochs)


async def test_gateway_killed_behind_the_load_balancer_sse_resumes_elsewhere(
    served_gateway, load_balancer, postgres_url, redis_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_DATABASE_URL=postgres_url)
    lb: LoadBalancer = load_balancer([g.address for g in gateways], health_path="/readyz")
    killed: list[ServedGateway] = []

    def kill_the_busiest(callers: Sequence[Caller]) -> None:
        # kill -9 the gateway holding the most EventSources (round robin places them as requests come)
        held = Counter(c.source.served_by[-1] for c in callers if c.source is not None)
        victim = next(g for g in gateways if g.address == held.most_common(1)[0][0])
        victim.kill()
        killed.append(victim)

    outcomes = await runs_through(
        RUNS, [[lb.url]] * GATEWAYS, gateways, hook_publisher(redis_url, namespace, tmp_path), postgres_url, [kill_the_busiest]
    )
    (victim,) = killed
    on_victim = [c for c in outcomes.sse_callers if c.source is not None and c.source.served_by[0] == victim.address]
    spread = Counter(c.source.served_by[0] for c in outcomes.sse_callers if c.source is not None)
    report_and_check(
        outcomes, chaos_summary, gateways=GATEWAYS, eventsources_by_gateway=dict(spread), eventsources_on_killed=len(on_victim)
    )
    assert on_victim
    for caller in on_victim:  # reconnected through the load balancer to a survivor, from Last-Event-ID
        assert caller.source is not None and caller.source.reconnects >= 1
        assert victim.address not in caller.source.served_by[1:], caller.source.served_by


async def test_rolling_restart_of_every_gateway_loses_nothing(
    served_gateway, load_balancer, postgres_url, redis_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_DATABASE_URL=postgres_url)
    lb: LoadBalancer = load_balancer([g.address for g in gateways], health_path="/readyz")

    exits: list[int] = []

    def step(starting: ServedGateway | None, stopping: ServedGateway | None) -> Fault:
        """Starts the gateway stopped by the step before (ready, and back in the load balancer), then
        SIGTERMs the next one: the closing event published after the step finds it gone."""

        def fault(_: Sequence[Caller]) -> None:
            if starting is not None:
                starting.start()
                wait_until(lambda: lb.stats()[starting.address].status == "UP", f"{starting.address} back in the load balancer")
            if stopping is not None:
                exits.append(stopping.stop(signal.SIGTERM))  # returns once it has drained and exited

        return fault

    steps = [step(before, gateway) for before, gateway in zip([None, *gateways], gateways, strict=False)] + [step(gateways[-1], None)]
    publisher = hook_publisher(redis_url, namespace, tmp_path)
    outcomes = await runs_through(RUNS, [[lb.url]] * GATEWAYS, gateways, publisher, postgres_url, steps)
    report_and_check(outcomes, chaos_summary, gateways=GATEWAYS, restarts=sum(g.starts - 1 for g in gateways))
    assert all(g.starts == 2 for g in gateways)
    assert all(code in (0, -signal.SIGTERM) for code in exits), exits  # uvicorn re-raises the signal once shut down


async def test_webhooks_are_delivered_exactly_once_across_replicas(
    served_gateway, load_balancer, postgres_url, redis_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(
        GATEWAYS,
        RUNBELL_DATABASE_URL=postgres_url,
        RUNBELL_WEBHOOKS="true",
        RUNBELL_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",  # the receiver is on loopback
        RUNBELL_WEBHOOK_ATTEMPT_TIMEOUT=str(WEBHOOK_ATTEMPT_SECONDS),
        RUNBELL_WEBHOOK_SCHEDULE="0,1,1,1,1,1,1,1",  # the survivors' held attempts time out: retried soon
        RUNBELL_WEBHOOK_BREAKER_FAILURES="1000",  # ...and not kept back by the breaker
    )
    lb: LoadBalancer = load_balancer([g.address for g in gateways], health_path="/readyz")
    loop = asyncio.get_running_loop()
    runs = {run_id(i) for i in range(WEBHOOK_RUNS)}
    leased_by_killed: list[int] = []
    async with receiving() as receiver:
        async with httpx.AsyncClient(base_url=lb.url) as http:
            created = await http.post("/v1/webhooks", json={"url": receiver.url})  # outcome messages
            assert created.status_code == 201, created.text
        receiver.hold.set()  # every request is held, unanswered: each gateway keeps its leases

        def kill_a_leaseholder(_: Sequence[Caller]) -> None:
            # Every run's outcome is decided (seq 5): once each has reached the receiver, kill -9 the
            # gateway holding the most leases, then let the receiver answer.
            wait_until(lambda: runs <= {hit["run_id"] for hit in receiver.hits}, "every outcome message in flight")
            leases = wait_until(lambda: asyncio.run(leases_by_port(postgres_url)), "a lease (none between a timeout and its retry)")
            victim = max(gateways, key=lambda g: leases.get(g.port, 0))
            victim.kill()
            leased_by_killed.append(leases.get(victim.port, 0))
            loop.call_soon_threadsafe(receiver.hold.clear)

        publisher = hook_publisher(redis_url, namespace, tmp_path)
        faults: list[Fault] = [lambda _: None, kill_a_leaseholder]  # seq 4-5 before the kill, 6 after it
        outcomes = await runs_through(WEBHOOK_RUNS, [[lb.url]], gateways, publisher, postgres_url, faults)
        messages = await outbox(postgres_url)
        with contextlib.suppress(AssertionError):  # what is missing or repeated, the figures below count
            await until(lambda: {hit["id"] for hit in receiver.answered} >= messages.keys(), "every message answered")
            await until(lambda: all_delivered(postgres_url), "every message settled as delivered")  # no attempt left to come
        settled = await all_delivered(postgres_url)
    answered = Counter(hit["id"] for hit in receiver.answered)
    per_run = Counter(messages[message_id] for message_id in answered)
    missing = messages.keys() - answered.keys()
    duplicated = sum(count - 1 for count in answered.values())
    report_and_check(  # the callers' figures, and the webhooks' beside them
        outcomes,
        chaos_summary,
        gateways=GATEWAYS,
        leased_by_killed=leased_by_killed[0],
        webhooks_delivered=len(answered),
        webhooks_lost=len(missing),
        webhooks_duplicated=duplicated,
        webhook_requests=len(receiver.hits),  # held ones included: retried with the same webhook-id
    )
    assert sorted(messages.values()) == sorted(runs), messages  # one outcome message per run
    assert not missing and not duplicated, (missing, answered)
    assert settled, "a message is still pending or leased"
    assert per_run == Counter(dict.fromkeys(runs, 1)), per_run


def _asyncpg_url(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


async def leases_by_port(database_url: str) -> Counter[int]:
    """Messages leased now, by the port of the gateway holding them (locked_by is host:port:pid/claim)."""
    connection = await asyncpg.connect(_asyncpg_url(database_url))
    try:
        rows = await connection.fetch("SELECT locked_by FROM webhook_messages WHERE locked_by IS NOT NULL AND locked_until > now()")
    finally:
        await connection.close()
    return Counter(int(row["locked_by"].partition("/")[0].split(":")[-2]) for row in rows)


async def outbox(database_url: str) -> dict[str, str]:
    """Every webhook message of DAG's runs: id -> run_id."""
    connection = await asyncpg.connect(_asyncpg_url(database_url))
    try:
        rows = await connection.fetch("SELECT id, run_id FROM webhook_messages WHERE dag_id = $1", DAG)
    finally:
        await connection.close()
    return {row["id"]: row["run_id"] for row in rows}


async def all_delivered(database_url: str) -> bool:
    connection = await asyncpg.connect(_asyncpg_url(database_url))
    try:
        return await connection.fetchval("SELECT bool_and(status = 'delivered' AND locked_by IS NULL) FROM webhook_messages")
    finally:
        await connection.close()
