"""`runbell bench`: figures measured on this machine (a benchmark: it reports and judges, never fails).

The gateway runs in its own process; the callers are held by load generator processes
(runbell.service.bench.loadgen) and the events are published from this one, as the hook publishes. Every
comparison (gateway against the Redis floor, against polling, against Airflow's /wait) runs both
sides in the same run on the same machine, and the report gives the ratio: absolute times on a
shared machine drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runbell.service.bench import procstats
from runbell.service.bench.delivery import (
    EARLY_LEAD,
    GAUGES,
    Target,
    bench_hook_publish,
    capacity,
    crowd,
    early_waiters,
    gateway_room,
    polling,
    spread,
    throughput,
)
from runbell.service.bench.floor import bench_fanout_floor, bench_floor, bench_memory_floor
from runbell.service.bench.listing import run_listing
from runbell.service.bench.loadgen import LoadGen
from runbell.service.bench.measure import drop_namespace, free_port, percentiles, report_head, say, start_gateway
from runbell.service.bench.profile import sampled
from runbell.service.bench.report import (
    dig,
    draw_matrix_charts,
    failure_on,
    judge_matrix,
    median,
    ratio,
    ratios,
    summary,
    summary_markdown,
)
from runbell.service.bench.stores import StoreKind, fresh_store, store_matrix
from runbell.service.bench.webhooks import FastReceiver, bench_webhooks

__all__ = ["FastReceiver", "Plan", "free_port", "run", "run_listing", "start_gateway", "summary"]


@dataclass(frozen=True)
class Plan:
    """How much of everything: QUICK runs in under a minute, FULL in a few minutes."""

    hook_publishes: int
    first_in_process: int
    floor_messages: int
    single_rounds: int  # rounds with one caller
    crowds: tuple[int, ...]  # callers on one run (the fan-out case)
    crowd_rounds: int  # long-poll rounds per crowd (SSE: one round with fanout_events events)
    fanout_events: int
    spread: tuple[int, int]  # (callers, runs): callers spread over runs, results published sparsely
    sparse: tuple[int, int]  # (callers, decided runs): one caller per run, a sample of the runs decided
    spread_gap: float  # seconds between two runs' results
    capacity_steps: tuple[int, ...]  # idle SSE connections one process holds: memory and fan-out at each
    early: tuple[int, float]  # (callers, publish gap s): each caller arriving EARLY_LEAD before its result
    burst: tuple[int, int, int]  # (SSE clients, runs, events) of the throughput burst
    polling: tuple[int, int]  # (runs at once, rounds)
    resources_window: float  # seconds over which SQL statements are counted
    webhook_rounds: int
    webhook_burst: int
    recorder_events: int  # published, then recorded by one recorder into a fresh store (its rate)
    recorder_runs: int  # the runs they are spread over


QUICK = Plan(  # both databases in about a minute on a quiet 2-core machine: a smoke run, not the goals' scale
    hook_publishes=300,
    first_in_process=1,
    floor_messages=200,
    single_rounds=5,
    crowds=(50, 200),
    crowd_rounds=1,
    fanout_events=2,
    spread=(100, 10),
    sparse=(100, 50),
    spread_gap=0.003,
    capacity_steps=(200, 400),
    early=(20, 0.02),
    burst=(50, 10, 500),
    polling=(4, 1),
    resources_window=0.3,
    webhook_rounds=3,
    webhook_burst=50,
    recorder_events=1000,
    recorder_runs=10,
)
FULL = Plan(
    hook_publishes=5000,
    first_in_process=10,
    floor_messages=2000,
    single_rounds=200,
    crowds=(1000, 10_000),
    crowd_rounds=2,
    fanout_events=5,
    spread=(10_000, 1000),
    sparse=(10_000, 1000),
    spread_gap=0.003,
    capacity_steps=(1000, 10_000, 20_000, 50_000),  # issue 14's; those beyond the open-file limit are reported as such
    early=(1000, 0.01),
    burst=(1000, 100, 5000),
    polling=(8, 5),
    resources_window=3.0,
    webhook_rounds=100,
    webhook_burst=1000,
    recorder_events=20_000,
    recorder_runs=200,
)


SPARSE_GAP = 0.05  # seconds between the sparse floor's publishes: as far apart as one-caller rounds


def run(
    out: Path,
    redis_url: str,
    quick: bool,
    database_url: str | None = None,
    airflow: bool = False,
    plan: Plan | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Measure everything, on SQLite and on PostgreSQL (`database_url`'s server, by default the local
    one where it answers); write DIR/report.json, DIR/samples.json, the charts and DIR/summary.md; the
    report. A measurement that fails is reported as failed (its error), and the others go on.
    `profile`: one more round of the largest crowds and of the spread callers, and one more webhook burst,
    with py-spy recording the gateway (DIR/profile-DATABASE-*.txt, summarized in the report and the summary)."""
    bench_airflow = import_airflow_bench() if airflow else None
    plan = plan or (QUICK if quick else FULL)
    stores = store_matrix(database_url)
    started = time.monotonic()
    report: dict[str, Any] = {
        **report_head(out, quick, plan, redis_url, ", ".join(kind.described for kind in stores)),
        "clock": "time.perf_counter() in every process: CLOCK_MONOTONIC on Linux, one clock "
        "for the machine, so a publish and an arrival in two processes subtract",
    }
    samples: dict[str, Any] = {}
    # Store-independent: measured once, compared with every store's figures.
    say("hook publish cost and the Redis floor")
    hook_namespace = f"bench-{uuid.uuid4().hex[:8]}"
    report["hook_publish"] = bench_hook_publish(redis_url, hook_namespace, plan.hook_publishes, plan.first_in_process)
    drop_namespace(redis_url, hook_namespace)
    # Two floors, paced as the gateway's publishes are: a process woken from idle answers later (on this
    # machine ~0.5 ms against ~0.2 ms), so each figure is compared with the floor of its own pace.
    samples["floor"] = bench_floor(redis_url, plan.floor_messages, gap=plan.spread_gap)
    samples["floor_sparse"] = bench_floor(redis_url, plan.floor_messages // 10, gap=SPARSE_GAP)
    report["floor"] = {**percentiles(samples["floor"], "the floor's subscriber heard nothing"), "publish_gap_ms": plan.spread_gap * 1e3}
    report["floor_sparse"] = {
        **percentiles(samples["floor_sparse"], "the floor's subscriber heard nothing"),
        "publish_gap_ms": SPARSE_GAP * 1e3,
    }
    # Quick: the floor of the largest crowd only (the one judged); each costs two processes' start.
    floored = plan.crowds[-1:] if quick else plan.crowds
    say(f"the fan-out floor: a bare server's frame to {', '.join(map(str, floored))} sockets")
    report["fanout_floor"] = {str(n): [round(t * 1e3, 3) for t in bench_fanout_floor(n, plan.fanout_events + 1)] for n in floored}
    # Celery's AsyncResult on the same Redis, default and tuned: once per run (it needs Redis only).
    # About 8 minutes in full; --quick leaves it out to stay within its minute.
    if not quick:
        say("Celery's AsyncResult on the same Redis (defaults, then result_backend_thread_safe)")
        from runbell.service.bench.celery import bench_celery

        phase(report, "celery", lambda: bench_celery(redis_url, quick=False))
    report["databases"], samples["by_database"] = {}, {}
    for kind in stores:
        say(f"the gateway on {kind.name}")
        profiles = out / f"profile-{kind.name}" if profile else None
        report["databases"][kind.name], samples["by_database"][kind.name] = bench_store(redis_url, kind, plan, report, profiles)
    if bench_airflow is not None:
        say("Runbell against Airflow's /wait on a real Airflow")
        result = bench_airflow(redis_url, quick)
        report["airflow"] = {k: v for k, v in result.items() if k != "samples"}
        samples["airflow"] = result.get("samples", {})
    report["goals"] = judge_matrix(report)
    report["machine"]["load_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "samples.json").write_text(json.dumps(samples))
    (out / "summary.md").write_text(summary_markdown(report))
    report["files"] = ["report.json", "samples.json", "summary.md", *draw_matrix_charts(samples, out, str(plan.spread[0]))]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def bench_store(
    redis_url: str, kind: StoreKind, plan: Plan, shared: dict[str, Any], profiles: Path | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every phase that runs through the store, on one kind of store: (figures, samples). Each phase
    that fails is reported as {"error": ...} and the next one runs on."""
    figures: dict[str, Any] = {"database": kind.described}
    samples: dict[str, Any] = {}
    if kind.unreachable:
        say(kind.unreachable)
        return {**figures, "error": kind.unreachable}, samples
    started = time.monotonic()
    from runbell.service.bench.recorder_rate import recorder_rate  # the store's modules: see Target.backlog

    say(f"{kind.name}: recorder throughput, {plan.recorder_events} events")
    with fresh_store(kind, "bench_recorder") as url:
        phase(figures, "recorder", lambda: recorder_rate(redis_url, url, events=plan.recorder_events, runs=plan.recorder_runs))
    # Capacity on a gateway of its own, the other phases on a fresh one, so that each measures a process
    # the other did not load. (10,000 long-poll waiters on new runs once never all arrived: the listen
    # queue overflowed while the gateway read each new run's history, one query each; both are fixed,
    # RUNBELL_LISTEN_BACKLOG and runbell.service.live.topics.StoredHistories.)
    for phases, measure in ((CAPACITY_PHASES, bench_capacity), (GATEWAY_PHASES, bench_gateway)):
        with contextlib.ExitStack() as stack:
            served = phase(figures, "gateway", lambda: serve(stack, redis_url, kind, plan), record=False)
            if served is None:  # each of its phases failed with it
                error = figures.pop("gateway")["error"]
                figures.update({name: {"error": f"the gateway did not start: {error}"} for name in phases})
            else:
                measure(*served, kind, plan, shared, figures, samples, profiles)
    figures["long_poll_over_sse"] = long_poll_over_sse(figures, plan.crowds[-1])
    figures["seconds"] = round(time.monotonic() - started, 1)
    return figures, samples


def bench_gateway(
    target: Target,
    gen: LoadGen,
    kind: StoreKind,
    plan: Plan,
    shared: dict[str, Any],
    figures: dict[str, Any],
    samples: dict[str, Any],
    profiles: Path | None = None,
) -> None:
    """The phases on one gateway, into `figures` and `samples`: GATEWAY_PHASES. `profiles`: the prefix
    of the py-spy files of the profiled rounds (none without it)."""
    idle = phase(figures, "resources", lambda: {"long_poll": {"0": idle_resources(target, plan.resources_window)}}, gen)
    # Polling first: the store lags while the recorder works through the later phases' events.
    say(f"{kind.name}: Runbell against polling the store every 1 s and 0.1 s")
    phase(figures, "polling", lambda: bench_polling(gen, target, plan, samples), gen, caught_up=target)
    for via in ("long-poll", "sse"):
        phase(figures, via.replace("-", "_"), functools.partial(bench_callers, gen, target, via, plan, shared, samples, profiles), gen)
    if idle is not None:
        figures["resources"] = resources(figures)
    phase(figures, "fanout", lambda: fanout(figures.get("sse") or {}, plan.crowds, shared["fanout_floor"]))
    callers, gap = plan.early
    say(f"{kind.name}: {callers} callers each arriving {EARLY_LEAD:g} s before its result, against as many settled")
    phase(figures, "early_waiter", lambda: bench_early(gen, target, callers, gap, samples), gen, caught_up=target)
    say(f"{kind.name}: events per second, a burst")
    phase(figures, "throughput", lambda: throughput(gen, target, *plan.burst), gen)
    say(f"{kind.name}: webhooks")  # delivered from the outbox the recorder writes: after it has caught up
    url = f"http://{target.host}:{target.port}"
    raw = profiles.with_name(f"{profiles.name}-webhooks.txt") if profiles is not None else None
    profile = (lambda: sampled(target.pid, raw)) if raw is not None else None
    webhooks = functools.partial(bench_webhooks, url, target.publisher, plan.webhook_rounds, plan.webhook_burst, profile)
    phase(figures, "webhooks", lambda: asyncio.run(webhooks()), caught_up=target)


def bench_capacity(
    target: Target,
    gen: LoadGen,
    kind: StoreKind,
    plan: Plan,
    shared: dict[str, Any],
    figures: dict[str, Any],
    samples: dict[str, Any],
    profiles: Path | None = None,
) -> None:
    """CAPACITY_PHASES on a fresh gateway of their own: memory from other phases would blur the
    per-connection growth. (`profiles`: none here; the signature is bench_gateway's.)"""
    say(f"{kind.name}: idle SSE connections up to {plan.capacity_steps[-1]}: memory, and fan-out against the floor")
    floor = functools.partial(fanout_floor, shared.setdefault("fanout_floor", {}), plan.fanout_events + 1)
    held = phase(
        figures, "capacity", lambda: capacity(gen, target, plan.capacity_steps, floor, plan.fanout_events, bench_memory_floor), gen
    )
    if held is not None:
        samples["capacity"] = capacity_series(held)


T = TypeVar("T")
# The phases on each gateway: where it does not start, each is a failed measurement.
CAPACITY_PHASES = ("capacity",)
GATEWAY_PHASES = ("resources", "polling", "long_poll", "sse", "fanout", "early_waiter", "throughput", "webhooks")


def phase(
    figures: dict[str, Any],
    name: str,
    measure: Callable[[], T],
    gen: LoadGen | None = None,
    caught_up: Target | None = None,
    record: bool = True,
) -> T | None:
    """figures[name] = measure() (not `record`ed: only returned); where it raises, {"error": ...}
    instead, said, and the load generator's callers let go (the next phase starts clean). `caught_up`:
    a gateway whose recorder must first have recorded every event published so far, for a phase that
    reads the store (how far behind it was is reported beside the phase's figures)."""
    started = time.monotonic()
    try:
        waited = caught_up.wait_until_recorded() if caught_up is not None else None
        result = measure()
    except Exception as exc:  # a benchmark reports a failed measurement and goes on
        error = f"{type(exc).__name__}: {exc}"
        say(f"{name} failed: {error}")
        figures[name] = {"error": error}
        if gen is not None:
            with contextlib.suppress(Exception):
                gen.collect(timeout=0)
        return None
    say(f"{name}: {time.monotonic() - started:.1f} s")
    if record:
        figures[name] = {**result, "recorder_caught_up": waited} if isinstance(result, dict) and waited is not None else result
    return result


def idle_resources(target: Target, window: float) -> dict[str, Any]:
    """The gateway's resources while it is idle, before its first caller: what the callers' are compared with."""
    target.wait_for_metric(GAUGES["sse"], lambda value: value == 0)
    procstats.wait_until_idle(target.pid)
    return target.resources(window)


def serve(stack: contextlib.ExitStack, redis_url: str, kind: StoreKind, plan: Plan) -> tuple[Target, LoadGen]:
    """A gateway on a fresh store of this kind, and load generators for the plan's callers (its capacity
    steps as far as the gateway's open-file limit leaves room: a load generator for more would only cost
    memory), all closed with the stack."""
    most = max(plan.spread[0], plan.sparse[0], *plan.crowds, plan.early[0], plan.capacity_steps[-1])
    target = stack.enter_context(gateway(redis_url, stack.enter_context(fresh_store(kind)), most))
    held = min(plan.capacity_steps[-1], gateway_room(target.pid).connections)
    connections = max(plan.spread[0], plan.sparse[0], *plan.crowds, plan.early[0], held)
    return target, stack.enter_context(LoadGen.for_connections(target.host, target.port, connections))


def fanout_floor(floors: dict[str, list[float]], rounds: int, clients: int) -> list[float]:
    """The fan-out floor to `clients` sockets (ms per round), measured once per run: kept in `floors`
    (the report's "fanout_floor"), where the crowds' already are."""
    if str(clients) not in floors:
        say(f"the fan-out floor: a bare server's frame to {clients} sockets")
        floors[str(clients)] = [round(t * 1e3, 3) for t in bench_fanout_floor(clients, rounds)]
    return floors[str(clients)]


def capacity_series(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The capacity steps measured, for the chart (samples.json): connections, KiB each, fan-out and floor."""
    keys = ("connections", "kib_per_connection", "fanout_median_ms", "floor_median_ms")
    return [{key: row.get(key) for key in keys} for row in figures["by_step"].values() if "rss_kib" in row]


def bench_early(gen: LoadGen, target: Target, callers: int, gap: float, samples: dict[str, Any]) -> dict[str, Any]:
    """Callers that arrive EARLY_LEAD before their result against settled ones, over long-poll and SSE."""
    figures = {}
    for via in ("long-poll", "sse"):
        key = via.replace("-", "_")
        figures[key], heard = early_waiters(gen, target, via, callers, gap)
        samples[f"{key}_early"], samples[f"{key}_settled"] = heard["early"], heard["settled"]
    return figures


def bench_polling(gen: LoadGen, target: Target, plan: Plan, samples: dict[str, Any]) -> dict[str, Any]:
    figures, heard = polling(gen, target, *plan.polling, 0.05, (1.0, 0.1))
    samples.update({f"polling_{kind}": v for kind, v in heard.items()})
    figures["ratios"] = {
        f"{runbell}/{poll}": ratios(figures[runbell], figures[poll])
        for runbell in ("long-poll", "sse")
        for poll in ("poll_1s", "poll_0.1s")
    }
    return figures


def bench_callers(
    gen: LoadGen, target: Target, via: str, plan: Plan, report: dict[str, Any], samples: dict[str, Any], profiles: Path | None = None
) -> dict[str, Any]:
    """Publish → caller over `via`: one caller, crowds on one run, callers spread over runs. Each against
    the floor of its pace: one publish at a time (after the callers settle) or one every spread_gap.
    With `profiles`, one more round of the largest crowd and of the spread callers under py-spy (their
    figures are not the measured rounds')."""
    key = via.replace("-", "_")
    figures: dict[str, Any] = {}
    say(f"{via}: one caller, {plan.single_rounds} rounds")
    figures["1"], heard = crowd(gen, target, via, 1, plan.single_rounds)
    samples[f"{key}_1"] = heard["latency"]
    for n in plan.crowds:
        say(f"{via}: {n} callers on one run")
        rounds = plan.crowd_rounds if via == "long-poll" else 1  # SSE: one round of fanout_events events
        figures[str(n)], heard = crowd(gen, target, via, n, rounds, plan.fanout_events, plan.resources_window)
        samples[f"crowd_{via}_{n}"] = heard["latency"]
    if profiles is not None:
        n = plan.crowds[-1]
        say(f"{via}: {n} callers on one run, profiled")
        raw = profiles.with_name(f"{profiles.name}-{key}-{n}.txt")
        profiled, _ = crowd(gen, target, via, n, 1, plan.fanout_events, profile=lambda: sampled(target.pid, raw))
        figures[str(n)]["profile"] = profiled["profile"]
    callers, decided = plan.sparse
    say(f"{via}: {callers} callers, each on a run of its own, {decided} of the runs decided")
    figures["sparse"], heard = spread(gen, target, via, callers, callers, plan.spread_gap, decided)
    samples[f"{key}_sparse"] = heard["latency"]
    say(f"{via}: {plan.spread[0]} callers over {plan.spread[1]} runs")
    figures["spread"], heard = spread(gen, target, via, *plan.spread, plan.spread_gap)
    samples[f"{key}_spread"] = heard["latency"]
    if profiles is not None:  # the tail of paced deliveries: where the loop's time goes between them
        say(f"{via}: {plan.spread[0]} callers over {plan.spread[1]} runs, profiled")
        raw = profiles.with_name(f"{profiles.name}-{key}-spread.txt")
        profiled, _ = spread(gen, target, via, *plan.spread, plan.spread_gap, profile=lambda: sampled(target.pid, raw))
        figures["spread"]["profile"] = profiled["profile"]
    for name, figs in figures.items():
        paced = name in ("spread", "sparse")
        figs["ratio_to_floor"] = ratios(figs["latency"], report["floor" if paced else "floor_sparse"])
    return figures


def import_airflow_bench():
    """runbell.service.bench.airflow is loaded only for --airflow (it needs an Airflow installation)."""
    try:
        from runbell.service.bench.airflow import bench_airflow
    except ImportError as exc:
        raise SystemExit(f"runbell bench --airflow: the Airflow comparison is not available ({exc})") from None
    return bench_airflow


class gateway:
    """A gateway in its own process on a fresh namespace and the store at `database_url`, as a Target;
    stopped with SIGTERM."""

    def __init__(self, redis_url: str, database_url: str, subscribers: int = 0):
        self.redis_url, self.database_url = redis_url, database_url
        # Room for the plan's callers: the default limit (20,000) would answer the largest steps 503.
        self.max_subscribers = max(20_000, subscribers + 1000)

    def __enter__(self) -> Target:
        self.namespace = f"bench-{uuid.uuid4().hex[:8]}"
        port = free_port()
        env = {
            "RUNBELL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "RUNBELL_DATABASE_URL": self.database_url,
            "RUNBELL_MAX_SUBSCRIBERS": str(self.max_subscribers),
        }
        self.process = start_gateway(self.redis_url, self.namespace, port, Path(tempfile.mkdtemp()), extra_env=env)
        self.target = Target.of(self.process, port, self.redis_url, self.namespace)
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.target.http.close()
        self.target.redis.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        drop_namespace(self.redis_url, self.namespace)


def resources(figures: dict[str, Any]) -> dict[str, Any]:
    """Redis connections and SQL statements per second of the gateway, idle and with each crowd of
    callers waiting. Constant when neither grows from the smallest crowd to the largest (ten times as
    many callers) and statements stay within one per second of idle. Command connections are pooled
    and bounded (runbell.service.http.app.REDIS_COMMAND_CONNECTIONS), so the pool may have filled before
    the first crowd. Crowds whose measurement failed are left out; fewer than one: not judged."""
    levels: dict[str, Any] = {"long_poll": dict(figures["resources"]["long_poll"]), "sse": {}}
    for via in ("long_poll", "sse"):
        for n, crowd_figures in (figures.get(via) or {}).items():
            if isinstance(crowd_figures, dict) and "resources" in crowd_figures:
                levels[via][n] = crowd_figures.pop("resources")
    idle = levels["long_poll"]["0"]
    connections, statements, judged = True, 0.0, False
    for rows in levels.values():
        crowds = [rows[n] for n in sorted((n for n in rows if n != "0"), key=int)]
        if not crowds:
            continue
        judged = True
        connections &= crowds[-1]["redis_connections"] <= crowds[0]["redis_connections"]
        statements = max([statements] + [row["db_statements_per_s"] - idle["db_statements_per_s"] for row in crowds])
    if not judged:
        return {**levels, "error": "no crowd of callers was measured"}
    seen = sorted({row["redis_connections"] for rows in levels.values() for row in rows.values()})
    return {
        **levels,
        "constant": {
            "redis_connections": connections,
            "db_statements": statements < 1.0,
            "detail": f"Redis connections {seen}; SQL statements/s at most {statements:+.2f} over idle",
        },
    }


def fanout(sse: dict[str, Any], crowds: tuple[int, ...], floors: dict[str, list[float]]) -> dict[str, Any]:
    """Time until the last SSE client of a run has an event, per crowd size, against the fan-out floor
    (`floors`: a bare server writing one frame to as many sockets, ms per round); `largest` is the
    biggest crowd."""
    if "error" in sse:
        raise RuntimeError(f"no SSE crowd was measured: {sse['error']}")
    by_clients: dict[str, Any] = {}
    for n in crowds:
        times = [t for t in dig(sse, str(n), "time_to_last_ms") or [] if not math.isnan(t)]
        if not times:
            by_clients[str(n)] = {
                "error": failure_on(sse, (str(n), "time_to_last_ms")) or f"no samples: no SSE client of {n} had the event"
            }
            continue
        by_clients[str(n)] = {"time_to_last_ms": times, "median_ms": median(times), "max_ms": max(times)}
        if str(n) in floors:
            floor = floors[str(n)]
            by_clients[str(n)].update(floor_ms=floor, floor_median_ms=median(floor), ratio_to_floor=ratio(median(times), median(floor)))
    return {"by_clients": by_clients, "largest": {"clients": crowds[-1], **by_clients[str(crowds[-1])]}}


def long_poll_over_sse(figures: dict[str, Any], callers: int) -> dict[str, Any]:
    """`callers` long-poll waiters on one run against as many SSE clients: the median time until the last
    of them has the outcome, and its ratio (issue 14: long-poll no slower than SSE)."""
    lp, sse = (median(dig(figures, via, str(callers), "time_to_last_ms") or []) for via in ("long_poll", "sse"))
    if lp is None or sse is None:
        return {"callers": callers, "error": "no samples: a crowd of long-poll waiters or SSE clients was not measured"}
    return {"callers": callers, "long_poll_ms": lp, "sse_ms": sse, "ratio": ratio(lp, sse)}
