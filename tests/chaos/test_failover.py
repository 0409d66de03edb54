"""Chaos: a gateway SIGKILLed (of three sharing Redis and PostgreSQL) while waiters and SSE clients are
attached. Its callers reconnect to a survivor, every one still gets the correct outcome, and every SSE
client sees each of its run's events exactly once, in sequence order, with no gaps.

Three kinds of caller start on each gateway, for every run: a long-poll waiter and an SSE follower of
the client library (runbell.service.client.client, given the three gateway URLs), and a raw EventSource (below: what a
browser does, behind a load balancer that stops sending it to a dead replica). The raw one keeps every
event as it came off the wire, so a gateway that re-sent anything would show as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import time
from dataclasses import dataclass, field

import httpx

from runbell.bus.schema import parse_position
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.client.client import (
    AsyncRunbellClient,
    Outcome,
    SseEvent,
    SseParser,
)
from tests.engines import SERVED_BY

DAG = "chaos_failover"
RUNS = 6
GATEWAYS = 3
CALLERS_SETTLE_SECONDS = 60.0  # the bound on every wait in the scenario (never reached when it passes)


# -- the runs -------------------------------------------------------------------------------------


def run_id(i: int) -> str:
    return f"run-{i}"


def succeeds(i: int) -> bool:
    return i % 2 == 0


def opening(i: int) -> list[dict]:
    """seq 1-3, published while every caller is attached to its first gateway."""
    return [dict(state="running"), dict(state="running", task_id="extract"), dict(state="success", task_id="extract")]


def closing(i: int) -> list[dict]:
    """seq 4-6, published after the kill: seq 5 decides the outcome, seq 6 ends the run."""
    if succeeds(i):
        return [
            dict(state="running", task_id="answer", result_task=True),
            dict(state="success", task_id="answer", result_task=True, result={"run": i}),
            dict(state="success"),
        ]
    return [
        dict(state="running", task_id="load", critical=True),
        dict(state="failed", task_id="load", critical=True, error="disk full", error_type="IOError"),
        dict(state="failed"),
    ]


EXPECTED_SSE = [("run", 1), ("task", 2), ("task", 3), ("task", 4), ("task", 5), ("outcome", 5), ("run", 6), ("end", 6)]


def correct(i: int, outcome: dict) -> bool:
    """The outcome's body (the result endpoint's 200, or an SSE `outcome`) is the one run i must have."""
    if succeeds(i):
        return (outcome["status"], outcome["result"], outcome["decided_by"], outcome["decided_seq"]) == (
            "success",
            {"run": i},
            "result_task",
            5,
        )
    failure = outcome.get("failure") or {}
    return (outcome["status"], outcome["decided_by"], outcome["decided_seq"], failure.get("task_id"), failure.get("error")) == (
        "failed",
        "critical_task",
        5,
        "load",
        {"type": "IOError", "message": "disk full"},
    )


# -- callers --------------------------------------------------------------------------------------


class EventSource:
    """A browser's EventSource, over the gateway URLs in turn (the load balancer's part): after a drop,
    wait `retry:` and reconnect with Last-Event-ID = the last id seen; stop at a 204, or at `end` (where a
    page closes it). Events are kept as they arrive: nothing is de-duplicated here."""

    def __init__(self, http: httpx.AsyncClient, urls: list[str], path: str):
        self.http, self.urls, self.path = http, urls, path
        self.current = 0
        self.last_id: str | None = None
        self.retry = 1.0  # a browser's default is a few seconds; the gateway's retry: replaces it
        self.events: list[SseEvent] = []
        self.reconnects = 0
        self.outcome_at: float | None = None
        self.served_by: list[str | None] = []  # per connection, the backend a load balancer named (SERVED_BY)

    async def run(self) -> None:
        while True:
            headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
            try:
                async with self.http.stream("GET", self.urls[self.current] + self.path, headers=headers) as response:
                    self.served_by.append(response.headers.get(SERVED_BY))
                    if response.status_code == 204:
                        return
                    if response.status_code == 200 and await self._read(response):
                        return
            except httpx.TransportError:
                self.current = (self.current + 1) % len(self.urls)
            self.reconnects += 1
            await asyncio.sleep(self.retry)

    async def _read(self, response: httpx.Response) -> bool:
        """Read one connection's events; True once `end` has come."""
        parser = SseParser()
        async for line in response.aiter_lines():
            event = parser.feed(line)
            if parser.retry is not None:
                self.retry = parser.retry / 1000
            if event is None:
                continue
            if event.id is not None:
                self.last_id = event.id
            self.events.append(event)
            if event.event == "outcome":
                self.outcome_at = time.monotonic()
            if event.event == "end":
                return True
        return False


@dataclass
class Caller:
    kind: str  # waiter | follower | eventsource
    run: int
    first_gateway: int
    task: asyncio.Task | None = None
    outcome: Outcome | None = None
    events: list[SseEvent] = field(default_factory=list)
    source: EventSource | None = None
    outcome_at: float | None = None

    def seen(self) -> list[SseEvent]:
        return self.source.events if self.source is not None else self.events

    def answer(self) -> dict | None:
        """The outcome this caller was given (a waiter's result, an SSE client's `outcome` event)."""
        if self.kind == "waiter":
            return self.outcome.body if self.outcome is not None else None
        outcomes = [e.json() for e in self.seen() if e.event == "outcome"]
        return outcomes[0] if outcomes else None

    def sse_counts(self) -> tuple[int, int]:
        """(missing, duplicated) events of an SSE client against its run's whole stream, by (event, seq)."""
        seen = [(e.event, parse_position(e.id).seq) for e in self.seen() if e.id is not None]
        missing = sum(1 for expected in EXPECTED_SSE if expected not in seen)
        duplicated = len(seen) - len(set(seen))
        return missing, duplicated


async def wait(client: AsyncRunbellClient, caller: Caller) -> None:
    caller.outcome = await client.wait(DAG, run_id(caller.run), timeout=CALLERS_SETTLE_SECONDS)
    caller.outcome_at = time.monotonic()


async def follow(client: AsyncRunbellClient, caller: Caller) -> None:
    async with contextlib.aclosing(client.events(DAG, run_id(caller.run))) as events:
        async for event in events:
            caller.events.append(event)
            if event.event == "outcome":
                caller.outcome_at = time.monotonic()


# -- observing the gateways -----------------------------------------------------------------------


async def attached(http: httpx.AsyncClient, url: str) -> int:
    """Waiters plus SSE clients a gateway holds now (its /metrics gauges)."""
    text = (await http.get(url + "/metrics")).text
    total = 0.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("runbell_waiters", "runbell_sse_clients"):
            total += float(value)
    return int(total)


async def holds(http: httpx.AsyncClient, url: str, count: int) -> bool:
    return await attached(http, url) == count


async def until(predicate, what: str, timeout: float = CALLERS_SETTLE_SECONDS) -> None:
    """Poll a condition of the system under test (a function, or an async one), bounded."""
    deadline = time.monotonic() + timeout
    while not (await held if inspect.isawaitable(held := predicate()) else held):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.05)


async def publish(publisher: Publisher, i: int, event: dict) -> int:
    seq = await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event)
    assert seq is not None, "Redis must take the event"
    return seq


# -- the scenario ---------------------------------------------------------------------------------


async def test_gateway_killed_callers_move_to_a_survivor(served_gateway, postgres_url, redis_url, namespace, tmp_path, chaos_summary):
    gateways = [served_gateway(RUNBELL_DATABASE_URL=postgres_url) for _ in range(GATEWAYS)]
    urls = [g.url for g in gateways]
    victim = gateways[0]
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "hook-spool"))

    # Each caller lists the gateways starting with its own (as a client configured per site would).
    clients = [AsyncRunbellClient(urls[g:] + urls[:g], timeout=5) for g in range(GATEWAYS)]
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=CALLERS_SETTLE_SECONDS))
    callers: list[Caller] = []
    try:
        for g in range(GATEWAYS):
            for i in range(RUNS):
                waiter, follower = Caller("waiter", i, g), Caller("follower", i, g)
                waiter.task = asyncio.create_task(wait(clients[g], waiter))
                follower.task = asyncio.create_task(follow(clients[g], follower))
                raw = Caller("eventsource", i, g)
                raw.source = EventSource(http, urls[g:] + urls[:g], f"/v1/dags/{DAG}/runs/{run_id(i)}/events")
                raw.task = asyncio.create_task(raw.source.run())
                callers += [waiter, follower, raw]
        per_gateway = 3 * RUNS
        for gateway in gateways:
            await until(lambda: holds(http, gateway.url, per_gateway), f"{per_gateway} callers on {gateway.url}")

        for i in range(RUNS):
            for event in opening(i):
                await publish(publisher, i, event)
        sse_callers = [c for c in callers if c.kind != "waiter"]

        async def all_saw_opening() -> bool:
            return all(any(e.id and e.id.endswith("-3") for e in c.seen()) for c in sse_callers)

        await until(all_saw_opening, "every SSE client has seq 3")

        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        for i in range(RUNS):  # keep publishing while the victim's callers reconnect; then the outcomes
            for event in closing(i):
                await publish(publisher, i, event)

        done, pending = await asyncio.wait([c.task for c in callers], timeout=CALLERS_SETTLE_SECONDS)
        for task in pending:
            task.cancel()
        failures = [repr(t.exception()) for t in done if t.exception() is not None]

        # The store (PostgreSQL, written by the survivors' recorders) has every run's outcome too.
        async def stored_outcomes() -> bool:
            rows = [(await http.get(f"{urls[1]}/v1/dags/{DAG}/runs/{run_id(i)}")) for i in range(RUNS)]
            return all(r.status_code == 200 and r.json()["state"] in ("success", "failed") for r in rows)

        await until(stored_outcomes, "the store has every run's end")
        stored = {i: (await http.get(f"{urls[1]}/v1/dags/{DAG}/runs/{run_id(i)}")).json() for i in range(RUNS)}
        moved_on = [c.base_url for c in clients]
    finally:
        for caller in callers:
            if caller.task is not None and not caller.task.done():
                caller.task.cancel()
        await asyncio.gather(*(c.task for c in callers if c.task is not None), return_exceptions=True)
        for client in clients:
            await client.aclose()
        await http.aclose()

    answers = [(c, c.answer()) for c in callers]
    delivered = [c for c, answer in answers if answer is not None]
    wrong = [(c.kind, c.run, answer) for c, answer in answers if answer is not None and not correct(c.run, answer)]
    sse_missing = sum(c.sse_counts()[0] for c in sse_callers)
    duplicated = sum(c.sse_counts()[1] for c in sse_callers)
    answered_at = [c.source.outcome_at if c.source is not None else c.outcome_at for c in callers]
    chaos_summary(
        runs=RUNS,
        outcomes_delivered=len(delivered),
        lost=len(callers) - len(delivered) + sse_missing,
        duplicated=duplicated,
        recover_seconds=max(at for at in answered_at if at is not None) - killed_at if delivered else None,
        extra={
            "gateways": GATEWAYS,
            "callers": len(callers),
            "on_killed": 3 * RUNS,
            "eventsource_reconnects": sum(c.source.reconnects for c in callers if c.source is not None),
        },
    )

    assert not failures, failures
    assert len(delivered) == len(callers), [(c.kind, c.run, c.first_gateway) for c, a in answers if a is None]
    assert not wrong, wrong
    for caller in sse_callers:  # each event once, in sequence order, no gaps; the outcome once, then the end
        assert [(e.event, parse_position(e.id).seq) for e in caller.seen() if e.id is not None] == EXPECTED_SSE, (
            caller.kind,
            caller.run,
            caller.first_gateway,
            caller.seen(),
        )
    # The victim's callers really moved: the library clients now talk to a survivor, the raw ones reconnected.
    assert moved_on[0] != victim.url and moved_on[1:] == urls[1:]
    assert all(c.source.reconnects >= 1 for c in sse_callers if c.source is not None and c.first_gateway == 0)
    for i, row in stored.items():
        assert row["outcome"] == ("success" if succeeds(i) else "failed"), row
