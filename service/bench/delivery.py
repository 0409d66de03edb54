"""Hook publish cost, and publish → caller latency over long-poll and SSE.

The callers are held by load generator processes (runbell.service.bench.loadgen), never by the gateway's
event loop or this one; this process only publishes, as the hook does, and reads the gateway from
outside (/metrics, /proc). A publish is timed from just before the hook's publish call, so every
latency includes the publish itself, as the floor's does.

Each scenario returns (figures, samples): figures for the report, raw latencies in seconds for charts.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from runbell.bus import keys
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.bench import procstats
from runbell.service.bench.loadgen import Arrival, LoadGen
from runbell.service.bench.measure import percentiles

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
        publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=Path(tempfile.mkdtemp())))
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

    def wait_until_recorded(self, timeout: float = 300.0) -> None:
        """Until the recorder's consumer group has read and acknowledged every event of every partition."""
        config, deadline = self.publisher.config, time.monotonic() + timeout
        streams = keys.partition_streams(config.namespace, config.stream_partitions)
        while time.monotonic() < deadline:
            if all(self._recorded(stream) for stream in streams):
                return
            time.sleep(0.1)
        raise TimeoutError("the gateway's recorder did not catch up with the published events")

    def _recorded(self, stream: str) -> bool:
        try:
            groups = {g["name"]: g for g in self.redis.xinfo_groups(stream)}
        except redis.ResponseError:  # no stream yet: nothing was published, nothing to record
            return True
        group = groups.get(keys.recorder_group().encode())
        return group is not None and group["lag"] == 0 and group["pending"] == 0

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
    gen: LoadGen, target: Target, via: str, callers: int, rounds: int, fanout_events: int = 0, resources_window: float = 0.0
) -> tuple[dict[str, Any], Samples]:
    """`callers` wait on one run whose result is then published: latency, and time until the last caller
    has it (fan-out). SSE clients first get `fanout_events` task events, one at a time, each to all."""
    latencies, to_last, fanout, missing = [], [], [], 0
    resources = None
    for r in range(rounds):
        run_id = new_run_id(f"{via}-{callers}-{r}")
        target.publish(run_id, "running")  # a started run, as most waits are
        attach(gen, target, via, [run_id] * callers)
        if resources_window and resources is None:
            resources = target.resources(resources_window)
        events = []
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
        "latency": percentiles(latencies),
        "missing": missing,
        "time_to_last_ms": [round(s * 1e3, 3) for s in to_last + fanout],
    }
    if resources is not None:
        figures["resources"] = resources
    return figures, {"latency": latencies}


def spread(
    gen: LoadGen, target: Target, via: str, callers: int, runs: int, gap: float, decided: int | None = None
) -> tuple[dict[str, Any], Samples]:
    """`callers` wait spread evenly over `runs` runs; the results of `decided` of the runs (all by
    default) are published one every `gap` seconds (sparse completions): the latency each of their
    callers sees while all the callers wait."""
    run_ids = [new_run_id(f"{via}-spread-{i}") for i in range(runs)]
    for run_id in run_ids:
        target.publish(run_id, "running")
    mine = [run_ids[i % runs] for i in range(callers)]
    attach(gen, target, via, mine)
    published = {}
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
        "latency": percentiles(got),
        "missing": lost,
    }, {"latency": got}


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
        **{kind: percentiles(s) for kind, s in samples.items()},
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
    seconds = max(tasks) - start
    total = per_run * runs
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


def capacity(gen: LoadGen, target: Target, steps: tuple[int, ...]) -> dict[str, Any]:
    """Idle SSE clients, each on a run of its own that never publishes, opened up to each step: how many
    one process holds, and its resident memory per connection (the growth over the first step's start)."""
    rss_before = procstats.rss_kib(target.pid)
    held, rows = 0, []
    for step in steps:
        fresh = [new_run_id("idle") for _ in range(step - held)]
        opened = gen.open("sse", [caller_path("sse", r) for r in fresh])
        held += opened["opened"]
        if opened["failed"]:
            rows.append({"connections": held, "failed": opened["failed"], "error": opened["error"]})
            break
        target.wait_for_metric(GAUGES["sse"], lambda value, held=held: value >= held)  # type: ignore[misc]  # a default argument binds held per step
        target.settle(step)
        rows.append({"connections": held, "rss_kib": procstats.rss_kib(target.pid)})
    measured = [row for row in rows if "rss_kib" in row]
    first, last = (measured[0], measured[-1]) if measured else ({}, {"connections": 0, "rss_kib": rss_before})
    gen.collect(timeout=0)
    # The first connections cost more (the allocator's arenas, the hub's tables growing): the average over
    # all is what the goal is judged on; the marginal cost, between the first step and the last, is beside it.
    marginal = (last["rss_kib"] - first["rss_kib"]) / (last["connections"] - first["connections"]) if len(measured) > 1 else None
    return {
        "connections_held": held,
        "rss_before_kib": rss_before,
        "rss_after_kib": last["rss_kib"],
        "kib_per_connection": round((last["rss_kib"] - rss_before) / last["connections"], 2) if last["connections"] else None,
        "marginal_kib_per_connection": round(marginal, 2) if marginal is not None else None,
        "steps": rows,
    }
