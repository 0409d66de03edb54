"""Chaos: Redis goes away while hooks publish, and comes back from its append-only file.

A redis-server of the test's own (its own port, AOF on, fsync always, no RDB snapshots) under a served
gateway on PostgreSQL. Some runs are over and recorded before the fault; others are in flight, with
waiters and EventSources attached. Redis first hangs (SIGSTOP: connections are accepted, nothing is
answered), then dies (SIGKILL), while the hook keeps publishing those runs to their outcomes: every
publish returns within the publisher's bound and spools. Redis is started again on the same port and
data; nobody publishes anything new. The spool is re-published by itself, every waiter gets its
outcome, every EventSource each event once in order, and nothing recorded before the fault is lost:
not from Redis (the AOF), not from the store.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from runbell.bus import keys
from runbell.bus.schema import decode_envelope, parse_position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import FLUSH_BUDGET_SECONDS, Publisher, emit
from runbell.service.client.client import AsyncRunbellClient, Outcome
from runbell.service.store.store import Store
from tests.chaos.test_failover import EventSource, holds, until
from tests.engines import RedisServer

DAG = "chaos_redis"
RECORDED = range(0, 2)  # over and stored before the fault
IN_FLIGHT = range(2, 6)  # waited on across the fault
SETTLE_SECONDS = 60.0  # the bound on every wait (never reached when the scenario passes)
# A publish is bounded by its connect and command timeouts (it may first wait for a spool flush that is
# itself bounded by them); the slack is for a loaded machine's scheduling, so that this checks that a
# hook cannot hang on a dead or hung Redis, not how fast it is.
SCHEDULING_SLACK_SECONDS = 2.0


def run_id(i: int) -> str:
    return f"run-{i}"


def succeeds(i: int) -> bool:
    return i % 2 == 0


def opening(i: int) -> list[dict]:
    return [dict(state="running"), dict(state="running", task_id="extract")]


def closing(i: int) -> list[dict]:
    """What follows the opening: seq 3, then the outcome (seq 4) and the run's end (seq 5)."""
    done = dict(state="success", task_id="extract")
    if succeeds(i):
        return [done, dict(state="success", task_id="answer", result_task=True, result={"run": i}), dict(state="success")]
    return [done, dict(state="failed", task_id="load", critical=True, error="disk full", error_type="IOError"), dict(state="failed")]


def events_of(i: int) -> list[dict]:
    return opening(i) + closing(i)


EXPECTED_SSE = [("run", 1), ("task", 2), ("task", 3), ("task", 4), ("outcome", 4), ("run", 5), ("end", 5)]


def correct(i: int, outcome: dict) -> bool:
    if succeeds(i):
        return (outcome["status"], outcome["result"], outcome["decided_by"], outcome["decided_seq"]) == (
            "success",
            {"run": i},
            "result_task",
            4,
        )
    failure = outcome.get("failure") or {}
    return (outcome["status"], outcome["decided_by"], outcome["decided_seq"], failure.get("task_id")) == (
        "failed",
        "critical_task",
        4,
        "load",
    )


async def timed_emit(publisher: Publisher, i: int, event: dict) -> tuple[int | None, float]:
    started = time.monotonic()
    seq = await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event)
    return seq, time.monotonic() - started


async def wait(client: AsyncRunbellClient, i: int) -> tuple[Outcome, float]:
    outcome = await client.wait(DAG, run_id(i), timeout=SETTLE_SECONDS)
    return outcome, time.monotonic()


def logged_seqs(server: RedisServer, namespace: str, i: int) -> tuple[list[int], int]:
    """The seqs in a run's replay log (in Redis, after the restart) and how many distinct event ids."""
    client = redis.Redis.from_url(server.url)
    try:
        entries = client.xrange(keys.run_keys(namespace, DAG, run_id(i)).log)
    finally:
        client.close()
    envelopes = [decode_envelope(fields[b"env"]) for _, fields in entries]
    return [e.seq for e in envelopes], len({e.event.id for e in envelopes})


async def test_redis_down_hooks_spool_and_callers_recover(own_redis, served_gateway, postgres_url, namespace, tmp_path, chaos_summary):
    gateway = served_gateway(RUNBELL_REDIS_URL=own_redis.url, RUNBELL_DATABASE_URL=postgres_url)
    config = PublisherConfig(redis_url=own_redis.url, namespace=namespace, spool_dir=tmp_path / "hook-spool")
    publisher = Publisher(config)  # the hook's, as configured from the environment but for the URL and spool
    bound = 2 * config.timeout_seconds + FLUSH_BUDGET_SECONDS + SCHEDULING_SLACK_SECONDS
    client = AsyncRunbellClient(gateway.url, timeout=5)
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=SETTLE_SECONDS))
    tasks: list[asyncio.Task] = []
    try:
        for i in RECORDED:
            for event in events_of(i):
                assert (await timed_emit(publisher, i, event))[0] is not None
        for i in IN_FLIGHT:
            for event in opening(i):
                assert (await timed_emit(publisher, i, event))[0] is not None

        async def recorded() -> bool:
            rows = [await http.get(f"{gateway.url}/v1/dags/{DAG}/runs/{run_id(i)}") for i in RECORDED]
            return all(r.status_code == 200 and r.json()["state"] in ("success", "failed") for r in rows)

        await until(recorded, "the store has the recorded runs' ends")

        waiters = {i: asyncio.create_task(wait(client, i)) for i in IN_FLIGHT}
        sources = {i: EventSource(http, [gateway.url], f"/v1/dags/{DAG}/runs/{run_id(i)}/events") for i in IN_FLIGHT}
        tasks = [*waiters.values(), *(asyncio.create_task(s.run()) for s in sources.values())]
        await until(lambda: holds(http, gateway.url, 2 * len(IN_FLIGHT)), "waiters and EventSources attached")
        await until(
            lambda: all(any(e.id.endswith("-2") for e in s.events if e.id) for s in sources.values()), "every EventSource has seq 2"
        )

        # The fault: Redis hangs (a publish meets its command timeout), then dies (connection refused).
        own_redis.hang()
        fault_at = time.monotonic()
        outage: list[tuple[int | None, float]] = []
        for i in IN_FLIGHT:
            outage.append(await timed_emit(publisher, i, closing(i)[0]))
        own_redis.kill()
        for i in IN_FLIGHT:
            for event in closing(i)[1:]:
                outage.append(await timed_emit(publisher, i, event))
        spooled = len(publisher.spool.pending())
        early = [i for i, task in waiters.items() if task.done()]

        own_redis.start()  # the same port and append-only file; nothing new is published from here
        restarted_at = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=SETTLE_SECONDS)
        answers: dict[int, tuple[Outcome, float]] = {
            i: task.result() for i, task in waiters.items() if task.done() and task.exception() is None
        }
        failures = [repr(t.exception()) for t in done if t.exception() is not None]
        await until(lambda: not publisher.spool.pending(), "the spool is empty")

        # Nothing recorded is lost: the recorded runs are still answered, Redis kept every run's log
        # (the AOF), and the store holds every event of every run.
        again = {i: (await client.wait(DAG, run_id(i), timeout=SETTLE_SECONDS)).body for i in RECORDED}

        async def stored_ends() -> bool:
            rows = [await http.get(f"{gateway.url}/v1/dags/{DAG}/runs/{run_id(i)}") for i in (*RECORDED, *IN_FLIGHT)]
            return all(r.status_code == 200 and r.json()["state"] in ("success", "failed") for r in rows)

        await until(stored_ends, "the store has every run's end")
        store = Store(postgres_url)
        await store.start()
        try:
            stored = {i: [e.seq for e in await store.events(DAG, run_id(i))] for i in (*RECORDED, *IN_FLIGHT)}
            stored_outcomes = {i: (await store.get_run(DAG, run_id(i))).outcome for i in (*RECORDED, *IN_FLIGHT)}
        finally:
            await store.close()
        logs = {i: logged_seqs(own_redis, namespace, i) for i in (*RECORDED, *IN_FLIGHT)}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await http.aclose()

    expected_seqs = {i: list(range(1, len(events_of(i)) + 1)) for i in (*RECORDED, *IN_FLIGHT)}
    sse = {i: [(e.event, parse_position(e.id).seq) for e in s.events if e.id is not None] for i, s in sources.items()}
    sse_missing = sum(1 for i in IN_FLIGHT for pair in EXPECTED_SSE if pair not in sse[i])
    duplicated = (
        sum(len(seen) - len(set(seen)) for seen in sse.values())
        + sum(len(seqs) - ids for seqs, ids in logs.values())  # an event id logged twice
        + sum(len(seqs) - len(set(seqs)) for seqs in stored.values())
    )
    lost_events = sum(len(set(expected_seqs[i]) - set(stored[i])) + len(set(expected_seqs[i]) - set(logs[i][0])) for i in expected_seqs)
    delivered = len(answers) + sum(1 for i in IN_FLIGHT if ("outcome", 4) in sse[i])
    last_answer = max([at for _, at in answers.values()] + [s.outcome_at for s in sources.values() if s.outcome_at], default=None)
    chaos_summary(
        runs=len(RECORDED) + len(IN_FLIGHT),
        outcomes_delivered=delivered,
        lost=2 * len(IN_FLIGHT) - delivered + sse_missing + lost_events,
        duplicated=duplicated,
        recover_seconds=None if last_answer is None else last_answer - fault_at,
        extra={
            "spooled": spooled,
            "after_restart": "-" if last_answer is None else f"{last_answer - restarted_at:.2f}s",
            "slowest_publish": f"{max(t for _, t in outage):.2f}s",
            "publish_bound": f"{bound:.2f}s",
        },
    )

    # The hooks: every publish during the outage spooled, within its bound.
    assert [seq for seq, _ in outage] == [None] * len(outage)
    assert all(took < bound for _, took in outage), [round(t, 2) for _, t in outage]
    assert spooled == len(outage) and early == []
    # The callers: every waiter its outcome, every EventSource each event once, in order.
    assert not failures and not pending, failures
    assert all(correct(i, answers[i][0].body) for i in IN_FLIGHT), answers
    assert sse == {i: EXPECTED_SSE for i in IN_FLIGHT}, sse
    # Nothing recorded before the fault is lost; what was in flight came back from the spool.
    assert all(correct(i, again[i]) for i in RECORDED), again
    assert {i: seqs for i, (seqs, _) in logs.items()} == expected_seqs
    assert stored == expected_seqs
    assert all(correct(i, stored_outcomes[i]) for i in stored_outcomes), stored_outcomes
    assert duplicated == 0
