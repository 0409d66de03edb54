"""Chaos: Redis restarts with nothing (no persistence) in the middle of runs that have callers attached.

A redis-server of the test's own with no AOF and no snapshots, under two served gateways sharing it and
PostgreSQL. Every run's opening (seq 1-2) is published and recorded; long-poll waiters (on one gateway)
and EventSources (raw, and the client library's follower, on the other) attach. Redis is killed and
started again on the same port, empty: each run's sequence starts again at 1, in a new epoch. The rest
of every run is published (seq 1-3 of the new epoch), and:
- every waiter gets the right outcome (decided by the new epoch's seq 2);
- every EventSource gets every later event, each once, in order (none dropped as a duplicate of the
  old epoch's seq 1-2);
- the store holds all five events of every run, in order, and the right outcome;
- a client resuming from an id of the old epoch is told `recovered: true` and gets what followed; one
  resuming from an id the gateway never had is told `recovered: false` and gets the whole history.

On a bus without epochs the new seq 1-2 were taken for the old ones: the outcome was lost everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from runbell.bus.schema import Position, parse_position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.client.client import AsyncRunbellClient, SseEvent, SseParser
from runbell.service.store.store import Store
from tests.chaos.test_failover import EventSource, attached, until
from tests.chaos.test_redis_outage import closing, opening, succeeds  # the same runs: 2 events, then 3
from tests.engines import start_own_redis

DAG = "chaos_redis_lost"
RUNS = range(4)
SETTLE_SECONDS = 60.0  # the bound on every wait (never reached when the scenario passes)
UNKNOWN_ID = "00000000000aa-7"  # a well-formed id of an epoch this gateway never had


def run_id(i: int) -> str:
    return f"run-{i}"


# (event, epoch: 0 old, 1 new, seq) of every SSE frame a client following from the start must see.
EXPECTED_SSE = [("run", 0, 1), ("task", 0, 2), ("task", 1, 1), ("task", 1, 2), ("outcome", 1, 2), ("run", 1, 3), ("end", 1, 3)]


def correct(i: int, outcome: dict, new_epoch: str) -> bool:
    decided = (outcome["status"], outcome["decided_by"], outcome["decided_epoch"], outcome["decided_seq"])
    if succeeds(i):
        return decided == ("success", "result_task", new_epoch, 2) and outcome["result"] == {"run": i}
    return decided == ("failed", "critical_task", new_epoch, 2) and (outcome.get("failure") or {}).get("task_id") == "load"


def frames(events: list[SseEvent], epochs: list[str]) -> list[tuple[str, int, int]]:
    """(event, epoch index, seq) of the frames with an id; an unknown epoch is -1."""
    found = []
    for e in events:
        if e.id is not None:
            position = parse_position(e.id)
            found.append((e.event, epochs.index(position.epoch) if position.epoch in epochs else -1, position.seq))
    return found


async def resume(http: httpx.AsyncClient, url: str, last_event_id: str) -> list[SseEvent]:
    """One SSE connection resuming after last_event_id, read until `end`."""
    events: list[SseEvent] = []
    parser = SseParser()
    async with http.stream("GET", url, headers={"Last-Event-ID": last_event_id}) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if (event := parser.feed(line)) is not None:
                events.append(event)
                if event.event == "end":
                    break
    return events


async def test_redis_restarts_empty_mid_run(served_gateway, postgres_url, namespace, tmp_path, chaos_summary):
    own = start_own_redis(tmp_path / "redis", persistent=False)
    redis_server = next(own)
    env = dict(RUNBELL_REDIS_URL=redis_server.url, RUNBELL_DATABASE_URL=postgres_url)
    gateways = [served_gateway(**env), served_gateway(**env)]
    publisher = Publisher(PublisherConfig(redis_url=redis_server.url, namespace=namespace, spool_dir=tmp_path / "hook-spool"))
    clients = [AsyncRunbellClient(g.url, timeout=5) for g in gateways]
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=SETTLE_SECONDS))
    tasks: list[asyncio.Task] = []
    followed: dict[int, list[SseEvent]] = {i: [] for i in RUNS}

    async def publish(i: int, event: dict) -> None:
        await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event)

    async def follow(i: int) -> None:
        async with contextlib.aclosing(clients[1].events(DAG, run_id(i))) as events:
            async for event in events:
                followed[i].append(event)

    try:
        for i in RUNS:
            for event in opening(i):
                await publish(i, event)

        store = Store(postgres_url)
        await store.start()

        async def events_stored(i: int) -> list[Position]:
            return [e.position for e in await store.events(DAG, run_id(i))]

        async def recorded(count: int) -> bool:
            return all([len(await events_stored(i)) >= count for i in RUNS])

        await until(lambda: recorded(2), "the store has every run's opening")
        old = {i: (await events_stored(i))[0].epoch for i in RUNS}  # each run has epochs of its own

        waiters = {i: asyncio.create_task(clients[0].wait(DAG, run_id(i), timeout=SETTLE_SECONDS)) for i in RUNS}
        sources = {i: EventSource(http, [gateways[1].url], f"/v1/dags/{DAG}/runs/{run_id(i)}/events") for i in RUNS}
        tasks = [*waiters.values(), *(asyncio.create_task(s.run()) for s in sources.values())]
        tasks += [asyncio.create_task(follow(i)) for i in RUNS]

        async def all_attached() -> bool:
            return await attached(http, gateways[0].url) == len(RUNS) and await attached(http, gateways[1].url) == 2 * len(RUNS)

        await until(all_attached, "waiters and EventSources attached")
        await until(lambda: all(any(e.id == f"{old[i]}-2" for e in s.events) for i, s in sources.items()), "every EventSource has seq 2")

        # The fault: Redis dies and comes back empty on the same port.
        redis_server.kill()
        fault_at = time.monotonic()
        redis_server.start()
        for i in RUNS:
            for event in closing(i):
                await publish(i, event)
        await until(lambda: not publisher.spool.pending(), "every event published")

        done, pending = await asyncio.wait(tasks, timeout=SETTLE_SECONDS)
        settled_at = time.monotonic()
        answers = {i: task.result().body for i, task in waiters.items() if task.done() and task.exception() is None}
        failures = [repr(t.exception()) for t in done if t.exception() is not None]
        await until(lambda: recorded(5), "the store has every run's five events")
        stored = {i: await events_stored(i) for i in RUNS}
        stored_outcomes = {i: (await store.get_run(DAG, run_id(i))).outcome for i in RUNS}
        await store.close()
        new = {i: stored[i][-1].epoch for i in RUNS}
        late = {i: (await clients[0].wait(DAG, run_id(i), timeout=SETTLE_SECONDS)).body for i in RUNS}
        events_url = f"{gateways[0].url}/v1/dags/{DAG}/runs/{run_id(0)}/events"
        resumed = await resume(http, events_url, f"{old[0]}-1")
        unknown = await resume(http, events_url, UNKNOWN_ID)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()
        await http.aclose()
        next(own, None)  # stop the redis-server

    epochs = {i: [old[i], new[i]] for i in RUNS}
    sse = {i: frames(s.events, epochs[i]) for i, s in sources.items()}
    follower = {i: frames(followed[i], epochs[i]) for i in RUNS}
    expected_stored = {i: [Position(old[i], 1), Position(old[i], 2), *(Position(new[i], seq) for seq in (1, 2, 3))] for i in RUNS}
    lost_sse = sum(1 for seen in (*sse.values(), *follower.values()) for frame in EXPECTED_SSE if frame not in seen)
    lost_outcomes = sum(1 for i in RUNS if not (i in answers and correct(i, answers[i], new[i])))
    lost_outcomes += sum(1 for i in RUNS if not correct(i, stored_outcomes[i], new[i]))
    lost_stored = sum(len(set(expected_stored[i]) - set(stored[i])) for i in RUNS)
    chaos_summary(
        runs=len(RUNS),
        outcomes_delivered=len(answers) + sum(1 for seen in sse.values() if ("outcome", 1, 2) in seen),
        lost=lost_sse + lost_outcomes + lost_stored,
        duplicated=sum(len(seen) - len(set(seen)) for seen in (*sse.values(), *follower.values())),
        recover_seconds=settled_at - fault_at,
        extra={"epochs": len({p.epoch for positions in stored.values() for p in positions})},
    )

    assert all(new[i] > old[i] for i in RUNS), (old, new)
    # Every waiter its outcome, decided in the new epoch; a waiter arriving afterwards the same.
    assert not failures and not pending, failures
    assert all(correct(i, answers[i], new[i]) for i in RUNS), answers
    assert all(correct(i, late[i], new[i]) for i in RUNS), late
    # Every EventSource and client follower each frame once, in order, none taken for a duplicate.
    assert sse == {i: EXPECTED_SSE for i in RUNS}, sse
    assert follower == {i: EXPECTED_SSE for i in RUNS}, follower
    # The store: both epochs' events, in position order, and the outcome.
    assert stored == expected_stored, stored
    assert all(correct(i, stored_outcomes[i], new[i]) for i in RUNS), stored_outcomes
    # Resuming: from the old epoch's seq 1, history complete; from an unknown id, the whole of it again.
    assert [(e.event, e.json()) for e in resumed if e.event == "recovery"] == [("recovery", {"recovered": True, "from": f"{old[0]}-1"})]
    assert frames(resumed, epochs[0]) == EXPECTED_SSE[1:]
    assert [(e.event, e.json()) for e in unknown if e.event == "recovery"] == [("recovery", {"recovered": False, "from": "0"})]
    assert frames(unknown, epochs[0]) == EXPECTED_SSE
