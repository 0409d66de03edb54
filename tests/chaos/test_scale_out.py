"""Scale-out on the real engines (tests/engines.py): three `runbell serve` gateways sharing one
PostgreSQL store, with long-poll waiters, SSE followers of the client library and raw EventSources on
every run, through a fault in the middle of the runs:

- the Redis master fails over under Sentinel (kill -9), the gateways and the hook's Publisher on the
  same redis+sentinel:// URL;
- behind HAProxy (round robin, no stickiness) one gateway is killed -9;
- behind HAProxy every gateway is restarted in turn (SIGTERM, ready again, the next) while the runs go on.

Each run publishes its first half (tests/chaos/test_failover.py's opening), the fault strikes, then the
rest (its closing). Every caller must get its run's outcome, every SSE client every event exactly once
in order (the raw EventSources keep what came off the wire), and the store every event of every run.
Each scenario records its chaos summary line.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.client.client import AsyncRunbellClient
from runbell.service.store.store import Store
from tests.chaos.test_failover import (
    CALLERS_SETTLE_SECONDS,
    DAG,
    EXPECTED_SSE,
    Caller,
    EventSource,
    attached,
    closing,
    correct,
    follow,
    opening,
    run_id,
    succeeds,
    until,
    wait,
)
from tests.engines import LoadBalancer, SentinelGroup, wait_until
from tests.served import ServedGateway

RUNS = 4
GATEWAYS = 3
Fault = Callable[[Sequence[Caller]], None]  # given the callers; blocking (engines' process control): run in a thread


@dataclass
class Outcomes:
    callers: list[Caller]
    failures: list[str]  # exceptions the callers' tasks ended with
    stored_seqs: dict[int, list[int]]  # run -> the seqs of its events in the store, in order
    stored_outcomes: dict[int, str | None]
    fault_at: float

    @property
    def sse_callers(self) -> list[Caller]:
        return [c for c in self.callers if c.kind != "waiter"]


async def publish(publisher: Publisher, i: int, event: dict) -> None:
    """Publishes, or spools (a Publisher still holding a connection to a dead master spools; its spool
    goes out with a later publish or flush)."""
    await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event)


async def runs_through(
    sites: Sequence[Sequence[str]],
    gateways: Sequence[ServedGateway],
    publisher: Publisher,
    database_url: str,
    faults: Sequence[Fault],
) -> Outcomes:
    """Every run's three callers on each site (the gateway URLs a caller knows, in its order: one
    gateway's first, or just the load balancer); once all are attached, each run's opening; once every
    SSE client has it, the faults in turn, each followed by its share of every run's closing; then
    waits for every caller and for the store to hold every event."""
    clients = [AsyncRunbellClient(list(site), timeout=5) for site in sites]
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=CALLERS_SETTLE_SECONDS))
    store = Store(database_url)
    callers: list[Caller] = []
    try:
        for g, site in enumerate(sites):
            for i in range(RUNS):
                waiter, follower, raw = Caller("waiter", i, g), Caller("follower", i, g), Caller("eventsource", i, g)
                raw.source = EventSource(http, list(site), f"/v1/dags/{DAG}/runs/{run_id(i)}/events")
                starts = [(waiter, wait(clients[g], waiter)), (follower, follow(clients[g], follower)), (raw, raw.source.run())]
                shift = (g * RUNS + i) % len(starts)  # each kind's first request in turn (a balancer places by order)
                for caller, coroutine in starts[shift:] + starts[:shift]:
                    caller.task = asyncio.create_task(coroutine)
                    callers.append(caller)

        async def all_attached() -> bool:
            return sum([await attached(http, g.url) for g in gateways]) == len(callers)

        await until(all_attached, f"{len(callers)} callers attached")
        for i in range(RUNS):
            for event in opening(i):
                await publish(publisher, i, event)
        sse_callers = [c for c in callers if c.kind != "waiter"]
        await until(lambda: all(any(e.id and e.id.endswith("-3") for e in c.seen()) for c in sse_callers), "every SSE client has seq 3")

        fault_at = time.monotonic()
        share = -(-len(closing(0)) // len(faults))  # the closing events published after each fault
        for k, fault in enumerate(faults):
            await asyncio.to_thread(fault, callers)
            for i in range(RUNS):
                for event in closing(i)[k * share : (k + 1) * share]:
                    await publish(publisher, i, event)
        await until(lambda: publisher.flush() >= 0 and not publisher.spool.pending(), "the hook's spool sent")

        done, pending = await asyncio.wait([c.task for c in callers if c.task is not None], timeout=CALLERS_SETTLE_SECONDS)
        failures = [repr(t.exception()) for t in done if t.exception() is not None]

        await store.start()
        stored: dict[int, list[int]] = {}

        async def all_stored() -> bool:
            for i in range(RUNS):
                stored[i] = [envelope.seq for envelope in await store.events(DAG, run_id(i))]
            return all(len(seqs) >= len(EXPECTED_SSE) - 2 for seqs in stored.values())  # 6 events a run

        await until(all_stored, "the store has every run's events")
        runs = {i: await store.get_run(DAG, run_id(i)) for i in range(RUNS)}
        return Outcomes(callers, failures, stored, {i: run.outcome_status if run else None for i, run in runs.items()}, fault_at)
    finally:
        for caller in callers:
            if caller.task is not None and not caller.task.done():
                caller.task.cancel()
        await asyncio.gather(*(c.task for c in callers if c.task is not None), return_exceptions=True)
        for client in clients:
            await client.aclose()
        await http.aclose()
        await store.close()


def report_and_check(outcomes: Outcomes, chaos_summary, **extra: object) -> None:
    """Records the summary line, then asserts nothing lost, nothing repeated, every outcome right."""
    callers, sse_callers = outcomes.callers, outcomes.sse_callers
    answers = [(c, c.answer()) for c in callers]
    delivered = [c for c, answer in answers if answer is not None]
    sse_missing = sum(c.sse_counts()[0] for c in sse_callers)
    duplicated = sum(c.sse_counts()[1] for c in sse_callers)
    answered_at = [c.source.outcome_at if c.source is not None else c.outcome_at for c in callers]
    chaos_summary(
        runs=RUNS,
        outcomes_delivered=len(delivered),
        lost=len(callers) - len(delivered) + sse_missing,
        duplicated=duplicated,
        recover_seconds=max(at for at in answered_at if at is not None) - outcomes.fault_at if delivered else None,
        extra={
            "gateways": GATEWAYS,
            "callers": len(callers),
            "eventsource_reconnects": sum(c.source.reconnects for c in callers if c.source is not None),
            **extra,
        },
    )
    assert not outcomes.failures, outcomes.failures
    assert len(delivered) == len(callers), [(c.kind, c.run, c.first_gateway) for c, a in answers if a is None]
    wrong = [(c.kind, c.run, answer) for c, answer in answers if answer is not None and not correct(c.run, answer)]
    assert not wrong, wrong
    for caller in sse_callers:  # each event once, in sequence order, no gaps; the outcome once, then the end
        seen = [(e.event, e.id) for e in caller.seen() if e.id is not None]
        assert [(event, int(event_id.rpartition("-")[2])) for event, event_id in seen] == EXPECTED_SSE, (caller.kind, caller.run, seen)
    for i, seqs in outcomes.stored_seqs.items():
        assert seqs == [1, 2, 3, 4, 5, 6], (i, seqs)
        assert outcomes.stored_outcomes[i] == ("success" if succeeds(i) else "failed"), i


def hook_publisher(redis_url: str, namespace: str, tmp_path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "hook-spool", timeout_seconds=5))


def each_first(urls: Sequence[str]) -> list[list[str]]:
    """One site per gateway: its URL first, then the others (a client configured per site)."""
    return [[*urls[g:], *urls[:g]] for g in range(len(urls))]


# -- the scenarios --------------------------------------------------------------------------------


async def test_sentinel_failover_mid_run_loses_nothing(
    served_gateway, sentinel_group: SentinelGroup, postgres_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_REDIS_URL=sentinel_group.url, RUNBELL_DATABASE_URL=postgres_url)
    publisher = hook_publisher(sentinel_group.url, namespace, tmp_path)
    old_master = sentinel_group.master()
    promoted: list[str] = []

    def fail_over(_: Sequence[Caller]) -> None:
        # The opening must be on the replica before the kill: what asynchronous replication has not
        # carried yet is lost with the master (the README says so); this scenario is about the rest.
        with old_master.client() as client:
            assert client.wait(1, 10_000) == 1
        promoted.append(sentinel_group.failover(kill=True).address)

    outcomes = await runs_through(each_first([g.url for g in gateways]), gateways, publisher, postgres_url, [fail_over])
    report_and_check(outcomes, chaos_summary, killed_master=old_master.address, promoted=promoted[0])
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
        [[lb.url]] * GATEWAYS, gateways, hook_publisher(redis_url, namespace, tmp_path), postgres_url, [kill_the_busiest]
    )
    (victim,) = killed
    on_victim = [c for c in outcomes.sse_callers if c.source is not None and c.source.served_by[0] == victim.address]
    spread = Counter(c.source.served_by[0] for c in outcomes.sse_callers if c.source is not None)
    report_and_check(outcomes, chaos_summary, eventsources_by_gateway=dict(spread), eventsources_on_killed=len(on_victim))
    assert on_victim
    for caller in on_victim:  # reconnected through the load balancer to a survivor, from Last-Event-ID
        assert caller.source is not None and caller.source.reconnects >= 1
        assert victim.address not in caller.source.served_by[1:], caller.source.served_by


async def test_rolling_restart_of_every_gateway_loses_nothing(
    served_gateway, load_balancer, postgres_url, redis_url, namespace, tmp_path, chaos_summary
):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_DATABASE_URL=postgres_url)
    lb: LoadBalancer = load_balancer([g.address for g in gateways], health_path="/readyz")

    def restart(gateway: ServedGateway) -> Fault:
        def fault(_: Sequence[Caller]) -> None:
            gateway.restart(signal.SIGTERM)  # returns once it is ready again
            wait_until(lambda: lb.stats()[gateway.address].status == "UP", f"{gateway.address} back in the load balancer")

        return fault

    outcomes = await runs_through(
        [[lb.url]] * GATEWAYS, gateways, hook_publisher(redis_url, namespace, tmp_path), postgres_url, [restart(g) for g in gateways]
    )
    report_and_check(outcomes, chaos_summary, restarts=sum(g.starts - 1 for g in gateways))
    assert all(g.starts == 2 for g in gateways)
