"""`runbell bench`: figures measured on this machine (a benchmark: it reports and judges, never fails).

The gateway runs in its own process; the callers are held by load generator processes
(runbell.service.bench.loadgen) and the events are published from this one, as the hook publishes. Every
comparison (gateway against the Redis floor, against polling, against Airflow's /wait) runs both
sides in the same run on the same machine, and the report gives the ratio: absolute times on a
shared machine drift.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from runbell.service.bench.delivery import (
    Target,
    bench_hook_publish,
    capacity,
    crowd,
    polling,
    spread,
    throughput,
)
from runbell.service.bench.floor import bench_fanout_floor, bench_floor
from runbell.service.bench.listing import run_listing
from runbell.service.bench.loadgen import LoadGen, raise_fd_limit
from runbell.service.bench.measure import free_port, percentiles, start_gateway
from runbell.service.bench.report import (
    draw_charts,
    judge,
    median,
    ratio,
    ratios,
    summary,
)
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
    capacity_steps: tuple[int, ...]  # idle SSE connections opened, cumulatively
    burst: tuple[int, int, int]  # (SSE clients, runs, events) of the throughput burst
    polling: tuple[int, int]  # (runs at once, rounds)
    resources_window: float  # seconds over which SQL statements are counted
    webhook_rounds: int
    webhook_burst: int


QUICK = Plan(
    hook_publishes=500,
    first_in_process=3,
    floor_messages=300,
    single_rounds=30,
    crowds=(100, 1000),
    crowd_rounds=1,
    fanout_events=2,
    spread=(1000, 100),
    sparse=(1000, 200),
    spread_gap=0.003,
    capacity_steps=(1000, 2000),
    burst=(100, 10, 1000),
    polling=(8, 2),
    resources_window=1.0,
    webhook_rounds=20,
    webhook_burst=200,
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
    capacity_steps=(5000, 10_000, 15_000, 18_000),
    burst=(1000, 100, 5000),
    polling=(8, 5),
    resources_window=3.0,
    webhook_rounds=100,
    webhook_burst=1000,
)


SPARSE_GAP = 0.05  # seconds between the sparse floor's publishes: as far apart as one-caller rounds


def run(out: Path, redis_url: str, quick: bool, database_url: str | None = None, airflow: bool = False) -> dict[str, Any]:
    """Measure everything, write DIR/report.json, DIR/samples.json and the charts; the report."""
    bench_airflow = import_airflow_bench() if airflow else None
    plan = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()  # inherited by the gateway and the load generators
    started = time.monotonic()
    report: dict[str, Any] = {
        "quick": quick,
        "plan": plan.__dict__,
        "machine": machine(redis_url),
        "database": database_url or "sqlite (a fresh file per gateway)",
        "clock": "time.perf_counter() in every process: CLOCK_MONOTONIC on Linux, one clock "
        "for the machine, so a publish and an arrival in two processes subtract",
    }
    samples: dict[str, Any] = {}
    say("hook publish cost and the Redis floor")
    hook_namespace = f"bench-{uuid.uuid4().hex[:8]}"
    report["hook_publish"] = bench_hook_publish(redis_url, hook_namespace, plan.hook_publishes, plan.first_in_process)
    drop_namespace(redis_url, hook_namespace)
    # Two floors, paced as the gateway's publishes are: a process woken from idle answers later (on this
    # machine ~0.5 ms against ~0.2 ms), so each figure is compared with the floor of its own pace.
    samples["floor"] = bench_floor(redis_url, plan.floor_messages, gap=plan.spread_gap)
    samples["floor_sparse"] = bench_floor(redis_url, plan.floor_messages // 10, gap=SPARSE_GAP)
    report["floor"] = percentiles(samples["floor"])
    report["floor_sparse"] = {**percentiles(samples["floor_sparse"]), "publish_gap_ms": SPARSE_GAP * 1e3}
    report["floor"]["publish_gap_ms"] = plan.spread_gap * 1e3
    with (
        gateway(redis_url, database_url) as target,
        LoadGen.for_connections(target.host, target.port, max(plan.spread[0], plan.sparse[0], *plan.crowds)) as gen,
    ):
        report["resources"] = {"long_poll": {"0": target.resources(plan.resources_window)}}
        # Polling first: the store lags while the recorder works through the later phases' events.
        say("Runbell against polling the store every 1 s and 0.1 s")
        report["polling"] = bench_polling(gen, target, plan, samples)
        for via in ("long-poll", "sse"):
            report[via.replace("-", "_")] = bench_callers(gen, target, via, plan, report, samples)
        report["resources"] = resources(report)
        report["fanout"] = fanout(report["sse"], plan.crowds, plan.fanout_events + 1)
        say("events per second: a burst")
        report["throughput"] = throughput(gen, target, *plan.burst)
        say("webhooks")
        report["webhooks"] = asyncio.run(
            bench_webhooks(f"http://{target.host}:{target.port}", target.publisher, plan.webhook_rounds, plan.webhook_burst)
        )
    # Capacity on a gateway of its own: memory from the phases above would blur the per-connection growth.
    say(f"idle SSE connections up to {plan.capacity_steps[-1]}")
    with gateway(redis_url, database_url) as target, LoadGen.for_connections(target.host, target.port, plan.capacity_steps[-1]) as gen:
        report["capacity"] = capacity(gen, target, plan.capacity_steps)
    if bench_airflow is not None:
        say("Runbell against Airflow's /wait on a real Airflow")
        result = bench_airflow(redis_url, quick)
        report["airflow"] = {k: v for k, v in result.items() if k != "samples"}
        samples["airflow"] = result.get("samples", {})
    report["goals"] = judge(report)
    report["machine"]["load_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "samples.json").write_text(json.dumps(samples))
    report["files"] = ["report.json", "samples.json", *draw_charts(samples, out, str(plan.spread[0]))]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def say(what: str) -> None:
    """Progress, on stderr: the summary table goes to stdout at the end."""
    print(f"runbell bench: {what}", file=sys.stderr, flush=True)


def bench_polling(gen: LoadGen, target: Target, plan: Plan, samples: dict[str, Any]) -> dict[str, Any]:
    figures, heard = polling(gen, target, *plan.polling, 0.05, (1.0, 0.1))
    samples.update({f"polling_{kind}": v for kind, v in heard.items()})
    figures["ratios"] = {
        f"{runbell}/{poll}": ratios(figures[runbell], figures[poll])
        for runbell in ("long-poll", "sse")
        for poll in ("poll_1s", "poll_0.1s")
    }
    return figures


def bench_callers(gen: LoadGen, target: Target, via: str, plan: Plan, report: dict[str, Any], samples: dict[str, Any]) -> dict[str, Any]:
    """Publish → caller over `via`: one caller, crowds on one run, callers spread over runs. Each against
    the floor of its pace: one publish at a time (after the callers settle) or one every spread_gap."""
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
    callers, decided = plan.sparse
    say(f"{via}: {callers} callers, each on a run of its own, {decided} of the runs decided")
    figures["sparse"], heard = spread(gen, target, via, callers, callers, plan.spread_gap, decided)
    samples[f"{key}_sparse"] = heard["latency"]
    say(f"{via}: {plan.spread[0]} callers over {plan.spread[1]} runs")
    figures["spread"], heard = spread(gen, target, via, *plan.spread, plan.spread_gap)
    samples[f"{key}_spread"] = heard["latency"]
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
    """A gateway in its own process on a fresh namespace and store, as a Target; stopped with SIGTERM."""

    def __init__(self, redis_url: str, database_url: str | None):
        self.redis_url, self.database_url = redis_url, database_url

    def __enter__(self) -> Target:
        self.namespace = f"bench-{uuid.uuid4().hex[:8]}"
        port = free_port()
        env = {"RUNBELL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", **({"RUNBELL_DATABASE_URL": self.database_url} if self.database_url else {})}
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


def drop_namespace(redis_url: str, namespace: str) -> None:
    """The bench's keys go with it (runs' logs would otherwise stay for their 7-day TTL)."""
    client = redis.Redis.from_url(redis_url)
    for keys in batched(client.scan_iter(match=f"{namespace}:*", count=1000), 500):
        client.unlink(*keys)
    client.close()


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def resources(report: dict[str, Any]) -> dict[str, Any]:
    """Redis connections and SQL statements per second of the gateway, idle and with each crowd of
    callers waiting. Constant when neither grows from the smallest crowd to the largest (ten times as
    many callers) and statements stay within one per second of idle. Command connections are pooled
    and bounded (runbell.service.http.app.REDIS_COMMAND_CONNECTIONS), so the pool may have filled before the first crowd."""
    levels: dict[str, Any] = {"long_poll": dict(report["resources"]["long_poll"]), "sse": {}}
    for via in ("long_poll", "sse"):
        for n, figures in report[via].items():
            if "resources" in figures:
                levels[via][n] = figures.pop("resources")
    idle = levels["long_poll"]["0"]
    connections, statements = True, 0.0
    for rows in levels.values():
        crowds = [rows[n] for n in sorted((n for n in rows if n != "0"), key=int)]
        connections &= crowds[-1]["redis_connections"] <= crowds[0]["redis_connections"]
        statements = max([statements] + [row["db_statements_per_s"] - idle["db_statements_per_s"] for row in crowds])
    seen = sorted({row["redis_connections"] for rows in levels.values() for row in rows.values()})
    return {
        **levels,
        "constant": {
            "redis_connections": connections,
            "db_statements": statements < 1.0,
            "detail": f"Redis connections {seen}; SQL statements/s at most {statements:+.2f} over idle",
        },
    }


def fanout(sse: dict[str, Any], crowds: tuple[int, ...], rounds: int) -> dict[str, Any]:
    """Time until the last SSE client of a run has an event, per crowd size, against the fan-out floor (a
    bare server writing one frame to as many sockets); `largest` is the biggest crowd."""
    by_clients = {}
    for n in crowds:
        say(f"fan-out floor: a bare server's frame to {n} sockets")
        times = sse[str(n)]["time_to_last_ms"]
        floor = [round(s * 1e3, 3) for s in bench_fanout_floor(n, rounds)]
        by_clients[str(n)] = {
            "time_to_last_ms": times,
            "median_ms": median(times),
            "max_ms": max(times),
            "floor_ms": floor,
            "floor_median_ms": median(floor),
            "ratio_to_floor": ratio(median(times), median(floor)),
        }
    return {"by_clients": by_clients, "largest": {"clients": crowds[-1], **by_clients[str(crowds[-1])]}}


def machine(redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    info = client.info("server")
    client.close()
    return {
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "redis": info.get("redis_version"),
    }
