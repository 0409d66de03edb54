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
from collections.abc import Callable, Sequence
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
from runbell.service.store.store import Store
from tests.engines import SERVED_BY
from tests.served import ServedGateway

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
EXPECTED_SEQS = sorted({seq for _, seq in EXPECTED_SSE})  # a run's events, as the store keeps them


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


# -- a scenario: the runs through faults ---------------------------------------------------------


Fault = Callable[[Sequence[Caller]], None]  # given the callers; blocking (engines' process control): run in a thread


@dataclass
class Outcomes:
    callers: list[Caller]
    failures: list[str]  # exceptions the callers' tasks ended with
    stored_seqs: dict[int, list[int]]  # run -> the seqs of its events in the store, in order
    stored_outcomes: dict[int, str | None]
    fault_at: float
    base_urls: list[str]  # the gateway each site's library client talks to at the end
    spooled: int  # closing events the hook spooled (sent later from its spool)

    @property
    def sse_callers(self) -> list[Caller]:
        return [c for c in self.callers if c.kind != "waiter"]


async def publish(publisher: Publisher, i: int, event: dict) -> bool:
    """Publishes, or spools (a Publisher still holding a connection to a dead master spools; its spool
    goes out with a later publish or flush): False when spooled."""
    return await asyncio.to_thread(emit, DAG, run_id(i), publisher=publisher, **event) is not None


async def runs_through(
    runs: int,
    sites: Sequence[Sequence[str]],
    gateways: Sequence[ServedGateway],
    publisher: Publisher,
    database_url: str,
    faults: Sequence[Fault],
) -> Outcomes:
    """Every run's three callers (a waiter, a follower, an EventSource) on each site (the gateway URLs a caller knows, in its order: one
    gateway's first, or just the load balancer); once all are attached, each run's opening; once every
    SSE client has it, the faults in turn, each followed by its share of every run's closing; then
    waits for every caller and for the store to hold every event."""
    clients = [AsyncRunbellClient(list(site), timeout=5) for site in sites]
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=CALLERS_SETTLE_SECONDS))
    store = Store(database_url)
    callers: list[Caller] = []
    try:
        for g, site in enumerate(sites):
            for i in range(runs):
                waiter, follower, raw = Caller("waiter", i, g), Caller("follower", i, g), Caller("eventsource", i, g)
                raw.source = EventSource(http, list(site), f"/v1/dags/{DAG}/runs/{run_id(i)}/events")
                starts = [(waiter, wait(clients[g], waiter)), (follower, follow(clients[g], follower)), (raw, raw.source.run())]
                shift = (g * runs + i) % len(starts)  # each kind's first request in turn (a balancer places by order)
                for caller, coroutine in starts[shift:] + starts[:shift]:
                    caller.task = asyncio.create_task(coroutine)
                    callers.append(caller)

        async def all_attached() -> bool:
            return sum([await attached(http, g.url) for g in gateways]) == len(callers)

        await until(all_attached, f"{len(callers)} callers attached")
        for i in range(runs):
            for event in opening(i):
                assert await publish(publisher, i, event), "Redis must take the opening (nothing has failed yet)"
        sse_callers = [c for c in callers if c.kind != "waiter"]
        await until(lambda: all(any(e.id and e.id.endswith("-3") for e in c.seen()) for c in sse_callers), "every SSE client has seq 3")

        fault_at, spooled = time.monotonic(), 0
        share = -(-len(closing(0)) // len(faults))  # the closing events published after each fault
        for k, fault in enumerate(faults):
            await asyncio.to_thread(fault, callers)
            for i in range(runs):
                for event in closing(i)[k * share : (k + 1) * share]:
                    spooled += not await publish(publisher, i, event)
        await until(lambda: publisher.flush() >= 0 and not publisher.spool.pending(), "the hook's spool sent")

        done, pending = await asyncio.wait([c.task for c in callers if c.task is not None], timeout=CALLERS_SETTLE_SECONDS)
        failures = [repr(t.exception()) for t in done if t.exception() is not None]

        await store.start()
        stored: dict[int, list[int]] = {}

        async def all_stored() -> bool:
            for i in range(runs):
                stored[i] = [envelope.seq for envelope in await store.events(DAG, run_id(i))]
            return all(len(seqs) >= len(EXPECTED_SEQS) for seqs in stored.values())

        with contextlib.suppress(AssertionError):  # what is missing, report_and_check counts and reports
            await until(all_stored, "the store has every run's events")
        rows = {i: await store.get_run(DAG, run_id(i)) for i in range(runs)}
        stored_outcomes = {i: row.outcome_status if row else None for i, row in rows.items()}
        return Outcomes(callers, failures, stored, stored_outcomes, fault_at, [client.base_url for client in clients], spooled)
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
    stored_missing = sum(len(set(EXPECTED_SEQS) - set(seqs)) for seqs in outcomes.stored_seqs.values())
    chaos_summary(
        runs=len(outcomes.stored_seqs),
        outcomes_delivered=len(delivered),
        lost=len(callers) - len(delivered) + sse_missing,
        duplicated=duplicated,
        recover_seconds=max(at for at in answered_at if at is not None) - outcomes.fault_at if delivered else None,
        extra={
            "callers": len(callers),
            "eventsource_reconnects": sum(c.source.reconnects for c in callers if c.source is not None),
            "stored_events_missing": stored_missing,
            "hook_spooled": outcomes.spooled,
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
        assert seqs == EXPECTED_SEQS, (i, seqs)
        assert outcomes.stored_outcomes[i] == ("success" if succeeds(i) else "failed"), i


def hook_publisher(redis_url: str, namespace: str, tmp_path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "hook-spool", timeout_seconds=5))


def each_first(urls: Sequence[str]) -> list[list[str]]:
    """One site per gateway: its URL first, then the others (a client configured per site)."""
    return [[*urls[g:], *urls[:g]] for g in range(len(urls))]


# -- the scenario ---------------------------------------------------------------------------------


async def test_gateway_killed_callers_move_to_a_survivor(served_gateway, postgres_url, redis_url, namespace, tmp_path, chaos_summary):
    gateways = served_gateway.many(GATEWAYS, RUNBELL_DATABASE_URL=postgres_url)
    urls = [g.url for g in gateways]
    victim = gateways[0]

    def kill_victim(_: Sequence[Caller]) -> None:
        victim.stop(signal.SIGKILL)

    publisher = hook_publisher(redis_url, namespace, tmp_path)
    outcomes = await runs_through(RUNS, each_first(urls), gateways, publisher, postgres_url, [kill_victim])
    report_and_check(outcomes, chaos_summary, gateways=GATEWAYS, on_killed=3 * RUNS)
    # The victim's callers really moved: the library clients now talk to a survivor, the raw ones reconnected.
    assert outcomes.base_urls[0] != victim.url and outcomes.base_urls[1:] == urls[1:]
    assert all(c.source.reconnects >= 1 for c in outcomes.sse_callers if c.source is not None and c.first_gateway == 0)
