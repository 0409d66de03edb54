"""Hook publish cost, and publish → caller latency over long-poll and SSE.

The callers are held by load generator processes (runbell.service.bench.loadgen), never by the gateway's
event loop or this one; this process only publishes, as the hook does, and reads the gateway from
outside (/metrics, /proc). A publish is timed from just before the hook's publish call, so every
latency includes the publish itself, as the floor's does.

Each scenario returns (figures, samples): figures for the report, raw latencies in seconds for charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.bench import procstats
from runbell.service.bench.loadgen import PORTS_KEPT_FREE, Arrival, LoadGen, ephemeral_ports
from runbell.service.bench.measure import percentiles
from runbell.service.bench.report import median, ratio, ratios

DAG = "bench"
LONG_POLL_TIMEOUT = 60  # the gateway's maximum: a waiter never times out during a measurement
GAUGES = {"long-poll": "runbell_waiters", "sse": "runbell_sse_clients"}
Samples = dict[str, list[float]]


def bench_hook_publish(redis_url: str, namespace: str, count: int, first_count: int = 10) -> dict[str, Any]:
    """The publish call the hook makes, warm (connection open), and first-in-process (connect included)."""
    spool = Path(tempfile.mkdtemp())
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=spool))
    emit(DAG, "warmup", "running", publisher=publisher)
    warm = []
    for i in range(count):
        start = time.perf_counter()
        emit(DAG, f"hook-{i % 100}", "running", task_id="t", publisher=publisher)
        warm.append(time.perf_counter() - start)
    code = (
        "import time,sys,tempfile,pathlib;from runbell.listeners.config import PublisherConfig;"
        "from runbell.listeners.publisher import Publisher,emit;"
        f"p=Publisher(PublisherConfig(redis_url={redis_url!r},namespace={namespace!r},spool_dir=pathlib.Path(tempfile.mkdtemp())));"
        "s=time.perf_counter();emit('bench','first','running',publisher=p);print(time.perf_counter()-s)"
    )
    first = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(first_count)]
    return {"warm": percentiles(warm), "first_in_process": percentiles(first)}


@dataclass(frozen=True)
class Published:
    t: float  # time.perf_counter() just before the publish call
    seq: int


@dataclass
class Target:
    """The gateway under test, seen from outside: where it listens, its pid, a publisher on its Redis."""

    port: int
    pid: int
    redis_port: int
    publisher: Publisher
    http: httpx.Client
    redis: redis.Redis
    host: str = "127.0.0.1"

    @staticmethod
    def of(process: subprocess.Popen, port: int, redis_url: str, namespace: str) -> Target:
        # The hook's publish, with a longer timeout than its 0.25 s: on a busy machine a slow publish is a
        # figure (its latency), not an event lost to the spool that fails the measurement.
        config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=Path(tempfile.mkdtemp()), timeout_seconds=5.0)
        publisher = Publisher(config)
        return Target(
            port,
            process.pid,
            httpx.URL(redis_url).port or 6379,
            publisher,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30),
            redis.Redis.from_url(redis_url),
        )

    def publish(self, run_id: str, state: str, **fields: Any) -> Published:
        t = time.perf_counter()
        seq = emit(DAG, run_id, state, publisher=self.publisher, **fields)
        if seq is None:
            raise RuntimeError("Redis refused a publish (the event was spooled)")
        return Published(t, seq)

    def publish_result(self, run_id: str) -> Published:
        return self.publish(run_id, "success", task_id="answer", result_task=True, result={"answer": 42})

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_for_metric(self, name: str, done: Callable[[float], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(value := self.metric(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} stayed at {value}")
            time.sleep(0.01)

    def settle(self, callers: int) -> None:
        """Let the gateway finish subscribing callers (their replay-log reads), and its recorder catch up
        with the events published so far, before publishing: a backlog of the bench's own earlier
        events (tens of thousands, on SQLite) would be measured as latency."""
        if callers < 100:
            time.sleep(0.02)
            return
        self.wait_until_recorded()
        procstats.wait_until_idle(self.pid)

    def wait_until_recorded(self, timeout: float = 300.0) -> dict[str, Any]:
        """Until the gateway's recorder has recorded every event published so far (the store holds
        them all): its backlog, as its readiness computes it, is 0. How far behind it was, and how long
        it took; TimeoutError after `timeout` seconds."""
        started, behind = time.monotonic(), None
        while (now := self.backlog()) and time.monotonic() - started < timeout:
            behind = now if behind is None else behind
            time.sleep(0.05)
        if now:
            raise TimeoutError(f"the gateway's recorder did not catch up in {timeout:g} s: {now} events not recorded yet")
        return {"behind": behind or 0, "waited_s": round(time.monotonic() - started, 3)}

    def backlog(self) -> int:
        """Events published to the gateway's streams not recorded yet (read by no recorder, or read and
        not yet stored and acknowledged): the readiness check's backlog, over every recorder of the group."""
        # Imported here: the load generator's and the floors' processes import this package, and the store's
        # modules would add a second to each one's start.
        from runbell.service.store.recorder import backlog_of

        config = self.publisher.config
        streams = keys.partition_streams(config.namespace, config.stream_partitions)

        async def ask() -> int:
            client = aioredis.Redis.from_url(self.publisher.config.redis_url)
            try:
                return (await backlog_of(client, streams, keys.recorder_group(), None)).behind  # any gateway's recorder
            finally:
                await client.aclose()

        return asyncio.run(ask())

    def resources(self, window: float) -> dict[str, Any]:
        """Redis connections the gateway process holds, and SQL statements it sends per second."""
        before = self.metric("runbell_db_statements_total")
        time.sleep(window)
        statements = self.metric("runbell_db_statements_total") - before
        return {
            "redis_connections": procstats.tcp_connections_to(self.pid, self.redis_port),
            "db_statements_per_s": round(statements / window, 2),
            "rss_kib": procstats.rss_kib(self.pid),
        }


def caller_path(via: str, run_id: str) -> str:
    suffix = f"result?timeout={LONG_POLL_TIMEOUT}" if via == "long-poll" else "events"
    return f"/v1/dags/{DAG}/runs/{run_id}/{suffix}"


def new_run_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def attach(gen: LoadGen, target: Target, via: str, run_ids: list[str]) -> None:
    """One caller per entry (repeats: several callers on a run); returns once all are subscribed."""
    gauge = GAUGES[via]
    # Callers closed by the last collect may not have been noticed gone yet: they would count as new ones.
    target.wait_for_metric(gauge, lambda value: value == 0)
    opened = gen.open(via, [caller_path(via, r) for r in run_ids])
    if opened["failed"]:
        raise RuntimeError(f"{opened['failed']} of {len(run_ids)} {via} callers could not connect: {opened['error']}")
    target.wait_for_metric(gauge, lambda value: value >= len(run_ids))
    target.settle(len(run_ids))


def collect(gen: LoadGen, via: str) -> list[Arrival]:
    """An SSE stream goes on after the outcome: close at once; a long-poll ends with its answer."""
    if via == "sse":
        gen.await_events("outcome")
    arrivals, _ = gen.collect(timeout=0 if via == "sse" else LONG_POLL_TIMEOUT + 5)
    return arrivals


def outcome_latencies(arrivals: list[Arrival], published_at: dict[int, float]) -> tuple[list[float], int]:
    """Per caller (path index) that was sent an outcome: its arrival minus the publish of its run's
    result; and how many of them never had it."""
    got = [a.t - published_at[a.path] for a in arrivals if a.event == "outcome" and a.path in published_at]
    return got, len(published_at) - len(got)


def crowd(
    gen: LoadGen,
    target: Target,
    via: str,
    callers: int,
    rounds: int,
    fanout_events: int = 0,
    resources_window: float = 0.0,
    profile: Callable[[], AbstractContextManager[dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], Samples]:
    """`callers` wait on one run whose result is then published: latency, and time until the last caller
    has it (fan-out). SSE clients first get `fanout_events` task events, one at a time, each to all.
    `profile`: a recorder of the gateway (runbell.service.bench.profile.sampled) around each round's
    publishes and arrivals, not its callers' arrival; what it recorded is figures["profile"]."""
    latencies, to_last, fanout, missing = [], [], [], 0
    resources = None
    profiles: list[dict[str, Any]] = []
    for r in range(rounds):
        run_id = new_run_id(f"{via}-{callers}-{r}")
        target.publish(run_id, "running")  # a started run, as most waits are
        attach(gen, target, via, [run_id] * callers)
        if resources_window and resources is None:
            resources = target.resources(resources_window)
        events = []
        with profile() if profile is not None else contextlib.nullcontext({}) as profiled:
            profiles.append(profiled)
            for k in range(fanout_events if via == "sse" else 0):
                events.append(target.publish(run_id, "running", task_id=f"step{k}"))
                gen.await_events("task", k + 1)
            result = target.publish_result(run_id)
            arrivals = collect(gen, via)
        got, lost = outcome_latencies(arrivals, dict.fromkeys(range(callers), result.t))
        latencies += got
        missing += lost
        to_last.append(max(got, default=float("nan")))
        by_seq = {e.seq: e.t for e in events}
        per_event = defaultdict(list)
        for a in arrivals:
            if a.event == "task" and a.seq in by_seq:
                per_event[a.seq].append(a.t - by_seq[a.seq])
        for seq in sorted(per_event):
            fanout.append(max(per_event[seq]))
    figures = {
        "callers": callers,
        "runs": 1,
        "rounds": rounds,
        "latency": percentiles(latencies, f"{missing} of {callers * rounds} callers never had the outcome"),
        "missing": missing,
        "time_to_last_ms": [round(s * 1e3, 3) for s in to_last + fanout],
    }
    if resources is not None:
        figures["resources"] = resources
    if profile is not None:
        figures["profile"] = profiles[-1]  # the last round's (one round is profiled, see bench_callers)
    return figures, {"latency": latencies}


def spread(
    gen: LoadGen,
    target: Target,
    via: str,
    callers: int,
    runs: int,
    gap: float,
    decided: int | None = None,
    profile: Callable[[], AbstractContextManager[dict[str, Any]]] | None = None,
) -> tuple[dict[str, Any], Samples]:
    """`callers` wait spread evenly over `runs` runs; the results of `decided` of the runs (all by
    default) are published one every `gap` seconds (sparse completions): the latency each of their
    callers sees while all the callers wait. `profile`: a recorder of the gateway around the publishes
    and arrivals (not the callers' connecting); what it recorded is the figures' "profile"."""
    run_ids = [new_run_id(f"{via}-spread-{i}") for i in range(runs)]
    for run_id in run_ids:
        target.publish(run_id, "running")
    mine = [run_ids[i % runs] for i in range(callers)]
    attach(gen, target, via, mine)
    published = {}
    with profile() if profile is not None else contextlib.nullcontext({}) as profiled:
        for run_id in run_ids[: decided or runs]:
            published[run_id] = target.publish_result(run_id).t
            time.sleep(gap)
        at = {i: published[run_id] for i, run_id in enumerate(mine) if run_id in published}
        gen.await_paths("outcome", set(at), timeout=LONG_POLL_TIMEOUT)
    if via == "long-poll":  # a waiter whose caller left waits out its timeout: end the other runs now
        for run_id in run_ids[len(published) :]:
            target.publish(run_id, "success")
    arrivals, _ = gen.collect(timeout=0 if via == "sse" else LONG_POLL_TIMEOUT + 5)
    got, lost = outcome_latencies(arrivals, at)
    return {
        "callers": callers,
        "runs": runs,
        "decided_runs": len(published),
        "publish_gap_ms": gap * 1e3,
        "latency": percentiles(got, f"{lost} of {len(at)} callers of decided runs never had the outcome"),
        "missing": lost,
        **({"profile": profiled} if profile is not None else {}),
    }, {"latency": got}


EARLY_LEAD = 0.5  # issue 14: a waiter that arrives this long before its result


def early_waiters(
    gen: LoadGen, target: Target, via: str, callers: int, gap: float, lead: float = EARLY_LEAD
) -> tuple[dict[str, Any], Samples]:
    """`callers` each on a run of its own, each connecting `lead` seconds before its run's result is
    published, one publish every `gap` seconds: publish → caller, against as many settled callers (all
    subscribed before the first publish, spread()) at the same pace, measured just before on the same
    gateway; the early callers arrive while others' results are published, as callers do. The early ones are opened by the load generator at their times while this process publishes
    from a thread on the same clock (perf_counter, CLOCK_MONOTONIC), so that opens and publishes interleave
    as callers and results do; how long before its result each caller actually connected is reported."""
    settled, settled_heard = spread(gen, target, via, callers, callers, gap)
    run_ids = [new_run_id(f"{via}-early-{i}") for i in range(callers)]
    for run_id in run_ids:
        target.publish(run_id, "running")
    target.wait_for_metric(GAUGES[via], lambda value: value == 0)
    target.settle(callers)  # the recorder caught up, the gateway idle: as before the settled callers' publishes
    first = time.perf_counter() + 0.2  # the open command reaches every worker before the first time
    # Each arrival at a random point of its slot, as callers come: with arrivals exactly `gap` apart, every
    # publish met another caller's arrival at the same instant (lead / gap callers later), and the early
    # waiters' p50 measured 1.7-1.9x the settled ones' against 1.2-1.3x with arrivals off the publishes'
    # instants (1,000 long-poll waiters, 10 and 11.3 ms apart, this machine busy).
    opens = [first + (i + random.random()) * gap for i in range(callers)]
    published: dict[int, float] = {}

    def publish_paced() -> None:
        for i, run_id in enumerate(run_ids):
            time.sleep(max(0.0, opens[i] + lead - time.perf_counter()))
            published[i] = target.publish_result(run_id).t

    publisher = threading.Thread(target=publish_paced, name="early-publisher")
    publisher.start()
    try:
        opened = gen.open(via, [caller_path(via, r) for r in run_ids], at=opens)
    finally:
        publisher.join()
    if opened["failed"]:
        gen.collect(timeout=0)
        raise RuntimeError(f"{opened['failed']} of {callers} early {via} callers could not connect: {opened['error']}")
    if via == "sse":
        gen.await_paths("outcome", set(published), timeout=LONG_POLL_TIMEOUT)
    arrivals, _ = gen.collect(timeout=0 if via == "sse" else LONG_POLL_TIMEOUT + 5)
    got, lost = outcome_latencies(arrivals, published)
    leads = [published[a.path] - a.t for a in arrivals if a.event == "connect" and a.path in published]
    latency = percentiles(got, f"{lost} of {callers} early callers never had the outcome")
    return {
        "callers": callers,
        "publish_gap_ms": gap * 1e3,
        "lead_ms": lead * 1e3,
        "connected_before_publish": percentiles(leads, "no early caller's connect was recorded"),
        "early": {"latency": latency, "missing": lost},
        "settled": {"latency": settled["latency"], "missing": settled["missing"]},
        "ratio": ratios(latency, settled["latency"]),
    }, {"early": got, "settled": settled_heard["latency"]}


def polling(
    gen: LoadGen, target: Target, runs: int, rounds: int, gap: float, intervals: tuple[float, ...]
) -> tuple[dict[str, Any], Samples]:
    """The same published outcomes, heard four ways at once: a Runbell long-poll waiter, an SSE client,
    and pollers that read the run from the store (GET /v1/dags/{dag}/runs/{run}, as a hand-written
    loop would) every `interval` seconds, each starting at a random phase. In rounds of `runs` runs:
    a store read costs the gateway ~3 ms on SQLite, so many more pollers at once would measure a
    saturated process, not polling."""
    kinds = ["long-poll", "sse"] + [f"poll_{interval:g}s" for interval in intervals]
    samples: Samples = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, heard in polling_round(gen, target, runs, gap, intervals).items():
            samples[kinds[kind]] += heard
    figures: dict[str, Any] = {
        "runs": runs * rounds,
        "runs_at_once": runs,
        "store_read": "GET /v1/dags/{dag_id}/runs/{run_id}",
        **{kind: percentiles(s, f"no {kind} caller heard an outcome of {runs * rounds} runs") for kind, s in samples.items()},
    }
    return figures, samples


def polling_round(gen: LoadGen, target: Target, runs: int, gap: float, intervals: tuple[float, ...]) -> dict[int, list[float]]:
    """One round: latencies by kind of caller (0 long-poll, 1 SSE, then one per polling interval)."""
    run_ids = [new_run_id("poll") for _ in range(runs)]
    for run_id in run_ids:
        target.publish(run_id, "running")
    for via in ("long-poll", "sse"):
        attach(gen, target, via, run_ids)
    for interval in intervals:
        gen.open("poll", [f"/v1/dags/{DAG}/runs/{r}" for r in run_ids], interval=interval)
    published = []
    for run_id in run_ids:
        published.append(target.publish_result(run_id).t)
        target.publish(run_id, "success")  # the run's end: its SSE stream ends too
        time.sleep(gap)
    arrivals, _ = gen.collect(timeout=max(intervals) * 5 + 30)
    heard: dict[int, list[float]] = defaultdict(list)
    for a in arrivals:
        if a.event == "outcome":
            heard[a.path // runs].append(a.t - published[a.path % runs])
    return heard


def throughput(gen: LoadGen, target: Target, clients: int, runs: int, events: int) -> dict[str, Any]:
    """A burst of task events over `runs` runs, `clients` SSE clients spread over them: events per second
    one process takes in from Redis and hands to every subscriber, until the last client has the last."""
    run_ids = [new_run_id(f"burst-{i}") for i in range(runs)]
    for run_id in run_ids:
        target.publish(run_id, "running")
    attach(gen, target, "sse", [run_ids[i % runs] for i in range(clients)])
    per_run = events // runs
    start = time.perf_counter()
    for k in range(per_run):
        for run_id in run_ids:
            target.publish(run_id, "running", task_id=f"t{k}")
    published = time.perf_counter()
    reached = gen.await_events("task", per_run, timeout=300)
    arrivals, _ = gen.collect(timeout=0)
    tasks = [a.t for a in arrivals if a.event == "task"]
    total = per_run * runs
    if not tasks:
        return {"clients": clients, "runs": runs, "events": total, "deliveries": 0, "error": "no samples: no task event reached a client"}
    seconds = max(tasks) - start
    return {
        "clients": clients,
        "runs": runs,
        "events": total,
        "deliveries": len(tasks),
        "all_delivered": reached and len(tasks) == clients * per_run,
        "seconds": round(seconds, 3),
        "events_per_s": round(total / seconds, 1),
        "deliveries_per_s": round(len(tasks) / seconds, 1),
        "publish_events_per_s": round(total / (published - start), 1),
        "publisher_bound": (published - start) > 0.9 * seconds,
    }


# Files a gateway opens beyond those it holds when its connections are counted (Redis command connections
# filling their pool, the store's, a log file) and a load generator worker beyond its sockets (pipes, the
# interpreter's own): kept out of the connections one step may open.
GATEWAY_FILES_KEPT = 100
WORKER_FILES_KEPT = 50


@dataclass(frozen=True)
class Room:
    """The most idle connections one step may open, and what sets it (a limit read on this machine)."""

    connections: int
    why: str


def gateway_room(pid: int) -> Room:
    """What the gateway process's open-file limit leaves for connections: its soft limit (the one in force)
    less the files it already holds and GATEWAY_FILES_KEPT."""
    soft, hard = procstats.open_file_limit(pid)
    held = procstats.open_files(pid)
    room = soft - held - GATEWAY_FILES_KEPT
    return Room(
        room,
        f"the gateway process's open-file limit is {soft} (hard {hard}; /proc/{pid}/limits) and it holds {held} files "
        f"already, {GATEWAY_FILES_KEPT} more kept for its own: at most {room} connections",
    )


def load_generator_room(gen: LoadGen) -> Room:
    """What the load generator can hold: its workers' open-file limits (each holds an equal share, dealt
    round-robin) and its source addresses' ephemeral ports."""
    limits = [procstats.open_file_limit(pid)[0] for pid in gen.pids()]
    by_files = len(limits) * (min(limits) - WORKER_FILES_KEPT)
    ports = ephemeral_ports()
    by_ports = len(gen.sources) * int(ports * (1 - PORTS_KEPT_FREE))
    if by_files <= by_ports:
        return Room(
            by_files, f"the load generator's {len(limits)} workers have an open-file limit of {min(limits)} each: at most {by_files}"
        )
    sources = ", ".join(source or "127.0.0.1" for source in gen.sources)
    return Room(by_ports, f"the load generator's source addresses ({sources}) have {ports} ephemeral ports each: at most {by_ports}")


def plan_steps(steps: tuple[int, ...], room: Room) -> tuple[list[int], dict[int, str]]:
    """The steps that fit in `room`, and the others with why they cannot be reached. Where a step does not
    fit, the largest count that does is measured in its place (once, and only if it is beyond the last
    step that fits): the most this machine shows."""
    fits = [step for step in steps if step <= room.connections]
    beyond = {step: f"not measurable here: {room.why}" for step in steps if step > room.connections}
    if beyond and room.connections > max(fits, default=0):
        fits.append(room.connections)
    return fits, beyond


def capacity(
    gen: LoadGen,
    target: Target,
    steps: tuple[int, ...],
    floor: Callable[[int], list[float]],
    fanout_events: int,
    memory_floor: Callable[[int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """At each step (those the open-file limits and ports leave room for; the others reported with the
    limit read): idle SSE clients each on a run of its own that never publishes, how many one process
    holds and its resident memory per connection (the growth over the phase's start); and as many
    clients on one run, with the time until the last of them has one event (the median of
    `fanout_events`), against `floor(n)`: a bare server's frame to as many sockets (ms per round).

    Two passes, never both sets at once (that would halve the count the open-file limit allows). First
    memory, the steps opened cumulatively on a fresh gateway, each client on a run of its own: on one
    shared run a connection costs less (21.5 against 27.6 KiB at 5,000, measured side by side), as the
    run's state is paid once, and the figure judged is what a connection costs with its run. Then
    fan-out, each step's clients opened anew on one run (crowd()). Not interleaved: RSS never falls
    back, and with the fan-out sets opened and closed between the memory steps 19,877 connections
    showed 31.2 KiB each against 23.4 KiB held cumulatively (the sets before them left their peak).

    `memory_floor(n)`: what as many idle streams cost bare uvicorn (floor.bench_memory_floor), measured
    after the steps, at the largest held: the part of a connection's memory that is not the gateway's."""
    room = min(gateway_room(target.pid), load_generator_room(gen), key=lambda r: r.connections)
    measured, beyond = plan_steps(steps, room)
    rss_before = procstats.rss_kib(target.pid)
    rows = memory_steps(gen, target, measured, rss_before)
    for row in rows:
        if "error" in row:
            break
        try:
            shared, _ = crowd(gen, target, "sse", row["connections"], 1, fanout_events)
        except Exception as exc:  # as many on one run could not be opened: the step's memory stands
            row["fanout_error"] = f"{type(exc).__name__}: {exc}"
            gen.collect(timeout=0)
            break
        fanout_ms = shared["time_to_last_ms"][1:]  # the first is the result's (its outcome), the others one task event each
        row.update(fanout_ms=fanout_ms, fanout_median_ms=median(fanout_ms), fanout_missing=shared["missing"])
        try:
            floor_ms = floor(row["connections"])
        except Exception as exc:  # the floor's own failure: the step's figures stand, without their ratio
            row["floor_error"] = f"the fan-out floor failed: {type(exc).__name__}: {exc}"
            continue
        row.update(floor_ms=floor_ms, floor_median_ms=median(floor_ms), ratio_to_floor=ratio(row["fanout_median_ms"], median(floor_ms)))
    by_step = {str(row["connections"]): row for row in rows}
    by_step.update({str(step): {"connections": step, "not_measurable": why} for step, why in beyond.items()})
    held = [row for row in rows if "rss_kib" in row]
    first, last = (held[0], held[-1]) if held else ({}, {"connections": 0, "rss_kib": rss_before})
    # The first connections cost more (the allocator's arenas, the hub's tables growing): the average over
    # all is what the goal is judged on; the marginal cost, between the first step and the last, is beside it.
    marginal = (last["rss_kib"] - first["rss_kib"]) / (last["connections"] - first["connections"]) if len(held) > 1 else None
    uvicorn_floor: dict[str, Any] | None = None
    if memory_floor is not None and held:
        try:
            uvicorn_floor = memory_floor(last["connections"])
        except Exception as exc:  # the floor's own failure: the gateway's figures stand
            uvicorn_floor = {"error": f"the memory floor failed: {type(exc).__name__}: {exc}"}
    return {
        "room": {"connections": room.connections, "why": room.why},
        "connections_held": last["connections"],
        **({"uvicorn_floor": uvicorn_floor} if uvicorn_floor is not None else {}),
        "rss_before_kib": rss_before,
        "rss_after_kib": last["rss_kib"],
        "kib_per_connection": last.get("kib_per_connection"),
        "marginal_kib_per_connection": round(marginal, 2) if marginal is not None else None,
        "by_step": by_step,
    }


def memory_steps(gen: LoadGen, target: Target, steps: list[int], rss_before: int) -> list[dict[str, Any]]:
    """Idle SSE clients on runs of their own, opened up to each step in turn (cumulatively): the gateway's
    RSS at each, and KiB per connection over `rss_before`; all closed after. A step that cannot open
    them all is the last, with its error."""
    held, rows = 0, []
    for n in steps:
        opened = gen.open("sse", [caller_path("sse", new_run_id("idle")) for _ in range(n - held)])
        held += opened["opened"]
        if opened["failed"]:
            rows.append({"connections": n, "held": held, "failed": opened["failed"], "error": opened["error"]})
            break
        target.wait_for_metric(GAUGES["sse"], lambda value, held=held: value >= held)  # type: ignore[misc]  # a default argument binds held per step
        target.settle(n)
        rss = procstats.rss_kib(target.pid)
        rows.append({"connections": n, "held": held, "rss_kib": rss, "kib_per_connection": round((rss - rss_before) / n, 2)})
    gen.collect(timeout=0)
    return rows
