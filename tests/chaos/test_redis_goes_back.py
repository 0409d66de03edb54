"""Chaos: Redis comes back with only part of a run's writes, its epoch key kept but its seq gone back.

Two ways it happens, each with real redis-server processes of the test's own, served gateways and
PostgreSQL: Redis restarted from a stale snapshot (SAVE, more writes, SIGKILL, started again on the
same port and dump), and a fail-over to a replica that had not received the last writes (SIGSTOP it,
drop its link, write more, SIGKILL the master, REPLICAOF NO ONE; publishers and a new gateway are
pointed at it, an EventSource fails over to that gateway).

Each run: seq 1-2 reach the state that is kept (the snapshot, the replica) and every reader; seq 3
(a task's success) reaches the readers (the store, EventSources, waiters' gateway) and the server
that is then lost. The rest of the run (the deciding task, then the run's end) is published to the
server that took over, which holds seq 2: those events take seq 3 and 4 again. Another server process
writes the run now, so they get a new epoch (publish.lua keeps the writer's INFO run_id), and:
- the store holds all five events of every run, in position order, and the right outcome;
- every waiter gets the right outcome, decided by the new epoch's seq 3;
- every EventSource gets every event once, in order.
Before writers were kept, the repeated (epoch, 3) and (epoch, 4) were taken for events already seen:
the store's ON CONFLICT dropped the outcome, live readers dropped it as a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import httpx
import redis

from runbell.bus import keys
from runbell.bus.schema import Position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.client.client import AsyncRunbellClient
from runbell.service.store.store import Store
from tests.chaos.test_failover import EventSource, attached, until
from tests.chaos.test_redis_data_loss import frames
from tests.chaos.test_redis_outage import closing, opening, succeeds
from tests.engines import RedisServer, start_own_redis

DAG = "chaos_redis_back"
RUNS = range(4)
SETTLE_SECONDS = 30.0  # the bound on every wait (never reached when the scenario passes)
# (event, epoch: 0 old, 1 new, seq) of every SSE frame a client following from the start must see.
EXPECTED_SSE = [("run", 0, 1), ("task", 0, 2), ("task", 0, 3), ("task", 1, 3), ("outcome", 1, 3), ("run", 1, 4), ("end", 1, 4)]
EVENTS_PER_RUN = 5


def run_id(i: int) -> str:
    return f"run-{i}"


def kept(i: int) -> list[dict]:
    return opening(i)  # seq 1-2


def lost(i: int) -> list[dict]:
    return closing(i)[:1]  # seq 3: seen by every reader, then lost with the server that had it


def rest(i: int) -> list[dict]:
    return closing(i)[1:]  # the deciding task and the run's end, to the server that took over


def correct(i: int, outcome: dict, new_epoch: str) -> bool:
    decided = (outcome["status"], outcome["decided_by"], outcome["decided_epoch"], outcome["decided_seq"])
    if succeeds(i):
        return decided == ("success", "result_task", new_epoch, 3) and outcome["result"] == {"run": i}
    return decided == ("failed", "critical_task", new_epoch, 3) and (outcome.get("failure") or {}).get("task_id") == "load"


def publisher_for(url: str, namespace: str, spool_dir: Path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=url, namespace=namespace, spool_dir=spool_dir))


async def publish(publisher: Publisher, i: int, events: list[dict]) -> None:
    for event in events:
        seq = await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event)
        assert seq is not None, "Redis must take the event"


def seq_of(server: RedisServer, namespace: str, i: int) -> int:
    with redis.Redis.from_url(server.url) as client:
        return int(client.get(keys.run_keys(namespace, DAG, run_id(i)).seq) or 0)


class Readers:
    """The store (read directly) and the callers: long-poll waiters and EventSources."""

    def __init__(self, postgres_url: str):
        self.store = Store(postgres_url)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=SETTLE_SECONDS))
        self.sources: dict[int, EventSource] = {}
        self.waiters: dict[int, asyncio.Task] = {}
        self.clients: list[AsyncRunbellClient] = []
        self.tasks: list[asyncio.Task] = []

    async def stored(self, i: int) -> list[Position]:
        return [e.position for e in await self.store.events(DAG, run_id(i))]

    async def recorded(self, count: int) -> bool:
        return all([len(await self.stored(i)) >= count for i in RUNS])

    def follow(self, urls: list[str]) -> None:
        self.sources = {i: EventSource(self.http, urls, f"/v1/dags/{DAG}/runs/{run_id(i)}/events") for i in RUNS}
        self.tasks += [asyncio.create_task(s.run()) for s in self.sources.values()]

    def wait(self, url: str) -> None:
        client = AsyncRunbellClient(url, timeout=5)
        self.clients.append(client)
        self.waiters = {i: asyncio.create_task(client.wait(DAG, run_id(i), timeout=SETTLE_SECONDS)) for i in RUNS}
        self.tasks += self.waiters.values()

    async def seen_lost_seq(self, old: dict[int, str]) -> None:
        """Seq 3 (lost from Redis next) is in the store and at every EventSource."""
        await until(lambda: self.recorded(3), "the store has every run's seq 3", SETTLE_SECONDS)
        await until(lambda: all(any(e.id == f"{old[i]}-3" for e in s.events) for i, s in self.sources.items()), "seq 3 seen")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients:
            await client.aclose()
        await self.http.aclose()
        await self.store.close()


async def settle_and_check(readers: Readers, old: dict[int, str], fault_at: float, chaos_summary) -> None:
    """Wait (bounded) for every caller and the store, record the figures, then assert."""
    done, pending = await asyncio.wait(readers.tasks, timeout=SETTLE_SECONDS)
    settled_at = time.monotonic()
    with contextlib.suppress(AssertionError):  # on failure, the figures below say what is missing
        await until(lambda: readers.recorded(EVENTS_PER_RUN), "the store has every run's events", SETTLE_SECONDS)
    answers = {i: t.result().body for i, t in readers.waiters.items() if t.done() and not t.cancelled() and t.exception() is None}
    failures = [repr(t.exception()) for t in done if not t.cancelled() and t.exception() is not None]
    stored = {i: await readers.stored(i) for i in RUNS}
    stored_outcomes = {i: (await readers.store.get_run(DAG, run_id(i))).outcome for i in RUNS}
    new = {i: next((p.epoch for p in stored[i] if p.epoch != old[i]), "") for i in RUNS}
    epochs = {i: [old[i], new[i]] for i in RUNS}
    sse = {i: frames(s.events, epochs[i]) for i, s in readers.sources.items()}
    expected_stored = {i: [*(Position(old[i], seq) for seq in (1, 2, 3)), Position(new[i], 3), Position(new[i], 4)] for i in RUNS}
    lost_stored = sum(len(set(expected_stored[i]) - set(stored[i])) for i in RUNS)
    lost_sse = sum(1 for seen in sse.values() for frame in EXPECTED_SSE if frame not in seen)
    lost_outcomes = sum(1 for i in RUNS if not (i in answers and correct(i, answers[i], new[i])))
    lost_outcomes += sum(1 for i in RUNS if not correct(i, stored_outcomes[i], new[i]))
    chaos_summary(
        runs=len(RUNS),
        outcomes_delivered=sum(1 for i in answers if correct(i, answers[i], new[i]))
        + sum(1 for seen in sse.values() if ("outcome", 1, 3) in seen),
        lost=lost_stored + lost_sse + lost_outcomes,
        duplicated=sum(len(seen) - len(set(seen)) for seen in sse.values()),
        recover_seconds=settled_at - fault_at,
        extra={
            "published": EVENTS_PER_RUN * len(RUNS),
            "stored": sum(len(s) for s in stored.values()),
            "lost_stored": lost_stored,
            "lost_sse_frames": lost_sse,
            "lost_outcomes": lost_outcomes,
        },
    )

    assert all(new[i] > old[i] for i in RUNS), (old, new)
    assert stored == expected_stored, stored
    assert all(correct(i, stored_outcomes[i], new[i]) for i in RUNS), stored_outcomes
    assert not failures and not pending, (failures, len(pending))
    assert all(i in answers and correct(i, answers[i], new[i]) for i in RUNS), answers
    assert sse == {i: EXPECTED_SSE for i in RUNS}, sse


async def open_runs(readers: Readers, publisher: Publisher) -> dict[int, str]:
    """Publish every run's seq 1-2 and wait for the store to have them: the runs' (old) epochs."""
    for i in RUNS:
        await publish(publisher, i, kept(i))
    await readers.store.start()
    await until(lambda: readers.recorded(2), "the store has every run's opening", SETTLE_SECONDS)
    return {i: (await readers.stored(i))[0].epoch for i in RUNS}


async def attach(readers: Readers, url: str, count: int, what: str) -> None:
    async def held() -> bool:
        return await attached(readers.http, url) == count

    await until(held, what, SETTLE_SECONDS)


async def go_on(
    readers: Readers, server: RedisServer, namespace: str, tmp_path: Path, old: dict[int, str], fault_at: float, chaos_summary
) -> None:
    """The server that took over holds seq 2 of every run: publish the rest of the runs to it (a hook
    process's new connection), then check what every reader has."""
    assert [seq_of(server, namespace, i) for i in RUNS] == [2] * len(RUNS)  # the seq went back
    after = publisher_for(server.url, namespace, tmp_path / "spool-after")
    for i in RUNS:
        await publish(after, i, rest(i))
    await settle_and_check(readers, old, fault_at, chaos_summary)


async def test_redis_restarts_from_a_stale_snapshot_mid_run(served_gateway, postgres_url, namespace, tmp_path, chaos_summary):
    own = start_own_redis(tmp_path / "redis", persistent=False)  # no AOF: a restart loads the last SAVE
    server = next(own)
    gateway = served_gateway(RUNBELL_REDIS_URL=server.url, RUNBELL_DATABASE_URL=postgres_url)
    readers = Readers(postgres_url)
    try:
        old = await open_runs(readers, publisher_for(server.url, namespace, tmp_path / "spool-before"))
        with redis.Redis.from_url(server.url) as admin:
            admin.save()  # the snapshot: every run at seq 2
        readers.wait(gateway.url)
        readers.follow([gateway.url])
        await attach(readers, gateway.url, 2 * len(RUNS), "waiters and EventSources attached")
        before = publisher_for(server.url, namespace, tmp_path / "spool-before")
        for i in RUNS:
            await publish(before, i, lost(i))
        await readers.seen_lost_seq(old)

        server.kill()  # SIGKILL: seq 3 was never saved
        fault_at = time.monotonic()
        server.start()
        await go_on(readers, server, namespace, tmp_path, old, fault_at, chaos_summary)
    finally:
        await readers.close()
        next(own, None)


async def test_a_replica_promoted_without_the_last_writes(served_gateway, postgres_url, namespace, tmp_path, chaos_summary):
    own_master = start_own_redis(tmp_path / "master", persistent=False)
    master = next(own_master)
    own_replica = start_own_redis(tmp_path / "replica", persistent=False, args=("--replicaof", "127.0.0.1", str(master.port)))
    replica = next(own_replica)
    gateways = [served_gateway(RUNBELL_REDIS_URL=master.url, RUNBELL_DATABASE_URL=postgres_url)]
    readers = Readers(postgres_url)
    try:
        with redis.Redis.from_url(replica.url) as client:
            await until(lambda: client.info("replication")["master_link_status"] == "up", "the replica in sync", SETTLE_SECONDS)
        old = await open_runs(readers, publisher_for(master.url, namespace, tmp_path / "spool-before"))
        readers.follow([gateways[0].url])  # on a drop, the EventSource tries the next URL (the load balancer's part)
        await attach(readers, gateways[0].url, len(RUNS), "EventSources attached")
        with redis.Redis.from_url(master.url) as client:
            assert client.wait(1, int(SETTLE_SECONDS * 1000)) == 1  # the replica has seq 1-2
            replica.hang()  # it lags: from here it receives nothing
            client.client_kill_filter(_type="replica")  # nor finds anything in its socket when it resumes
        before = publisher_for(master.url, namespace, tmp_path / "spool-before")
        for i in RUNS:
            await publish(before, i, lost(i))
        await readers.seen_lost_seq(old)

        master.kill()  # seq 3 dies with it
        fault_at = time.monotonic()
        replica.resume()
        with redis.Redis.from_url(replica.url) as client:
            client.replicaof("NO", "ONE")  # the fail-over
        gateways[0].stop()  # its Redis is gone; the EventSources move to a gateway on the new master
        gateways.append(served_gateway(RUNBELL_REDIS_URL=replica.url, RUNBELL_DATABASE_URL=postgres_url))
        for source in readers.sources.values():
            source.urls.append(gateways[1].url)
        readers.wait(gateways[1].url)
        await attach(readers, gateways[1].url, 2 * len(RUNS), "waiters and EventSources on the new master's gateway")
        await go_on(readers, replica, namespace, tmp_path, old, fault_at, chaos_summary)
    finally:
        await readers.close()
        next(own_replica, None)
        next(own_master, None)
