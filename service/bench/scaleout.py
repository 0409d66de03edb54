"""`runbell bench --scale-out`: what more partitions and more gateways buy, as ratios measured in one run.

Two measurements, each with its configurations side by side in the same run (absolute figures drift on
a shared machine, ratios much less):
- the recorder: events pre-loaded into the stream partitions of a fresh namespace (the hook's own
  publish call), then gateways started on them; events per second into the store, for each number of
  partitions and of recorders (gateway processes sharing the consumer group and the store);
- fan-out: one event to K SSE clients of one run, all of them on one gateway, or dealt round-robin over
  three (as a load balancer without stickiness deals them; the clients connect straight to the
  gateways, so the gateways are measured, not a proxy). The load generator runs in its own processes.

Per-core figures come from the CPU time the gateway processes used (/proc), not from the wall clock:
on a machine of 2 cores shared by the gateways, the load generator, Redis and the bench itself, the
wall clock says how the cores were shared, the CPU time what the work cost. Redis's CPU time is read
too when it runs on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import func, select

from runbell.bus import keys
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.bench import procstats
from runbell.service.bench.delivery import GAUGES, Target, caller_path, new_run_id
from runbell.service.bench.loadgen import CONNECTIONS_PER_WORKER, LoadGen
from runbell.service.bench.measure import drop_namespace, free_port, percentiles, report_head, say, spawn_gateway, wait_ready
from runbell.service.bench.report import median, ratio
from runbell.service.store.models import EventRow
from runbell.service.store.store import Store

POLL_SECONDS = 0.02  # how often the recorder's progress is read (XINFO GROUPS of every partition)
STALL_SECONDS = 120.0  # no progress this long: the measurement is given up


@dataclass(frozen=True)
class ScaleOutPlan:
    events: int  # pre-loaded per recorder measurement
    events_per_run: int  # a run's life: started, its tasks' successes, its success
    partitions: tuple[int, ...]
    recorders: tuple[int, ...]
    clients: int  # SSE clients on the one run of the fan-out
    gateways: tuple[int, ...]  # gateways the clients are dealt over (the first is the baseline)
    fanout_events: int  # events per round, one at a time
    rounds: int  # rounds per gateway count, alternating


QUICK_SCALE_OUT = ScaleOutPlan(
    events=2000, events_per_run=10, partitions=(1, 4, 16), recorders=(1, 2), clients=300, gateways=(1, 3), fanout_events=3, rounds=1
)
FULL_SCALE_OUT = ScaleOutPlan(
    events=20_000, events_per_run=10, partitions=(1, 4, 16), recorders=(1, 2), clients=3000, gateways=(1, 3), fanout_events=3, rounds=3
)


def run_scale_out(
    out: Path, redis_url: str, quick: bool, database_url: str | None = None, plan: ScaleOutPlan | None = None
) -> dict[str, Any]:
    """Measure both, write DIR/scale_out.json and DIR/scale_out_samples.json; the report."""
    plan = plan or (QUICK_SCALE_OUT if quick else FULL_SCALE_OUT)
    started = time.monotonic()
    report: dict[str, Any] = {
        **report_head(out, quick, plan, redis_url, database_url or "sqlite (a fresh file per measurement, shared by its gateways)"),
        "measured_on": "this machine: every process (gateways, load generators, Redis, the bench) shares its cores, "
        "and other work may have run beside it; compare the ratios, and size with the CPU-time figures",
    }
    samples: dict[str, Any] = {}
    recorder, samples["recorder_progress"] = bench_recorder(redis_url, database_url, plan)
    fanout, samples["fanout"] = bench_fanout(redis_url, database_url, plan)
    report["scale_out"] = {"recorder": recorder, "fanout": fanout, "per_core": per_core(recorder, fanout)}
    report["machine"]["load_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "scale_out_samples.json").write_text(json.dumps(samples))
    report["files"] = ["scale_out.json", "scale_out_samples.json"]
    (out / "scale_out.json").write_text(json.dumps(report, indent=2))
    return report


# -- gateways side by side ---------------------------------------------------------------------------


@dataclass
class Group:
    """Gateway processes on one namespace and one store, as replicas are."""

    members: list[tuple[subprocess.Popen, int]]  # (process, port)
    database_url: str
    pids: list[int] = field(default_factory=list)

    def wait_ready(self) -> None:
        for process, port in self.members:
            wait_ready(process, port)

    def check_alive(self) -> None:
        for process, port in self.members:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway on port {port} exited ({process.returncode})")


@contextlib.contextmanager
def gateway_group(
    redis_url: str, namespace: str, count: int, database_url: str | None, extra_env: dict[str, str] | None = None
) -> Iterator[Group]:
    """`count` gateways started side by side (not one after the other: each one's recorder starts at once),
    on one store: `database_url`, else one SQLite file in a fresh directory. Stopped with SIGTERM."""
    workdir = Path(tempfile.mkdtemp())
    url = database_url or f"sqlite:///{workdir / 'bench.db'}"
    env = {"RUNBELL_DATABASE_URL": url, **(extra_env or {})}
    group = Group([], url)
    ports: set[int] = set()
    try:
        for _ in range(count):
            while (port := free_port()) in ports:
                pass
            ports.add(port)
            group.members.append((spawn_gateway(redis_url, namespace, port, workdir, env), port))
        group.pids = [process.pid for process, _ in group.members]
        yield group
    finally:
        for process, _ in group.members:
            process.send_signal(signal.SIGTERM)
        for process, _ in group.members:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_of(pids: list[int]) -> float:
    return sum(procstats.cpu_seconds(pid) for pid in pids)


def redis_pid(redis_url: str) -> int | None:
    """The pid of the Redis server when it runs on this machine (its CPU time is then read), else None."""
    if httpx.URL(redis_url).host not in ("127.0.0.1", "localhost", "::1"):
        return None
    client = redis.Redis.from_url(redis_url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    try:
        return pid if Path(f"/proc/{pid}/comm").read_text().strip().startswith("redis") else None
    except OSError:
        return None


# -- the recorder ------------------------------------------------------------------------------------


def bench_recorder(redis_url: str, database_url: str | None, plan: ScaleOutPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every (partitions, recorders) of the plan: events/s into the store, and the ratios to 1 partition
    (same recorders) and to 1 recorder (same partitions)."""
    server = redis_pid(redis_url)
    rows, curves = [], {}
    for recorders in plan.recorders:
        for partitions in plan.partitions:
            say(f"recorder: {plan.events} events, {partitions} partition(s), {recorders} recorder(s)")
            row, curves[f"p{partitions}_r{recorders}"] = measure_recorder(redis_url, database_url, partitions, recorders, plan, server)
            rows.append(row)
    by = {(row["partitions"], row["recorders"]): row for row in rows}
    for row in rows:
        row["ratio_to_1_partition"] = ratio(row["events_per_s"], by.get((min(plan.partitions), row["recorders"]), {}).get("events_per_s"))
        row["ratio_to_1_recorder"] = ratio(row["events_per_s"], by.get((row["partitions"], min(plan.recorders)), {}).get("events_per_s"))
    return {"events": plan.events, "rows": rows, "redis_measured": server is not None}, curves


def measure_recorder(
    redis_url: str, database_url: str | None, partitions: int, recorders: int, plan: ScaleOutPlan, server: int | None
) -> tuple[dict[str, Any], list[tuple[float, int]]]:
    """One measurement on a namespace of its own (the partition count is stored once per namespace)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    dag_id = f"scale-{namespace}"  # its rows alone are counted (a PostgreSQL store is shared by measurements)
    client = redis.Redis.from_url(redis_url)
    try:
        preload = preload_events(redis_url, namespace, dag_id, partitions, plan, server)
        streams = keys.partition_streams(namespace, partitions)
        env = {"RUNBELL_STREAM_PARTITIONS": str(partitions)}
        with gateway_group(redis_url, namespace, recorders, database_url, env) as group:
            window, curve = watch_recording(client, streams, preload["events"], group, recorders, server)
            stored = asyncio.run(count_events(group.database_url, dag_id))
    finally:
        client.close()
        drop_namespace(redis_url, namespace)
    events = preload["events"] - window["done_before"]
    seconds, cpu = window["seconds"], window["gateway_cpu_s"]
    row = {
        "partitions": partitions,
        "recorders": recorders,
        "events": preload["events"],
        "stored": stored,
        "recorded_exactly": stored == preload["events"],
        "window": window["from"],
        "events_in_window": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else None,
        "gateway_cpu_s": round(cpu, 2),
        "cores_used": round(cpu / seconds, 2) if seconds > 0 else None,
        "events_per_cpu_s": round(events / cpu, 1) if cpu > 0 else None,
        "preload": preload,
    }
    if window.get("redis_cpu_s") is not None:
        row["redis_cpu_s"] = round(window["redis_cpu_s"], 2)
        row["redis_cpu_us_per_event"] = round(window["redis_cpu_s"] / events * 1e6, 1) if events else None
    return row, curve


def preload_events(redis_url: str, namespace: str, dag_id: str, partitions: int, plan: ScaleOutPlan, server: int | None) -> dict[str, Any]:
    """plan.events events with the hook's publish call, as whole runs: started, tasks succeeded, succeeded.
    Timed, with Redis's CPU time: what a publish costs Redis (to size its masters)."""
    # Not the hook's 0.25 s timeout: on a busy machine a publish may wait longer for a core, and a spooled
    # event would be missing from the streams.
    config = PublisherConfig(
        redis_url=redis_url, namespace=namespace, spool_dir=Path(tempfile.mkdtemp()), stream_partitions=partitions, timeout_seconds=5.0
    )
    publisher = Publisher(config)
    runs, per_run = plan.events // plan.events_per_run, plan.events_per_run
    redis_before = procstats.cpu_seconds(server) if server else None
    start = time.perf_counter()
    for r in range(runs):
        run_id = f"run-{r:06d}"
        sent = [emit(dag_id, run_id, "running", publisher=publisher)]
        sent += [emit(dag_id, run_id, "success", task_id=f"t{k}", publisher=publisher) for k in range(per_run - 2)]
        sent.append(emit(dag_id, run_id, "success", publisher=publisher))
        if None in sent:
            raise RuntimeError("Redis refused a publish (the event was spooled)")
    seconds = time.perf_counter() - start
    figures: dict[str, Any] = {
        "events": runs * per_run,
        "runs": runs,
        "seconds": round(seconds, 3),
        "publishes_per_s": round(runs * per_run / seconds, 1),
    }
    if server and redis_before is not None:
        redis_cpu = procstats.cpu_seconds(server) - redis_before
        figures["redis_cpu_s"] = round(redis_cpu, 2)
        figures["redis_cpu_us_per_publish"] = round(redis_cpu / (runs * per_run) * 1e6, 1)
    return figures


def backlog(client: redis.Redis, streams: list[str]) -> tuple[int, int]:
    """(entries not yet recorded: undelivered plus unacknowledged, fewest recorders reading any partition)."""
    group = keys.recorder_group().encode()
    with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
    remaining, consumers = 0, []
    for length, groups in zip(replies[::2], replies[1::2]):
        mine = None if isinstance(groups, Exception) else next((g for g in groups if g["name"] == group), None)
        if mine is None:  # no group yet: nothing read
            remaining += 0 if isinstance(length, Exception) else length
            consumers.append(0)
            continue
        lag = mine.get("lag")
        if lag is None:  # Redis could not tell (entries deleted): from what the group has read
            lag = length - (mine.get("entries-read") or 0)
        remaining += lag + mine["pending"]
        consumers.append(mine["consumers"])
    return remaining, min(consumers, default=0)


def watch_recording(
    client: redis.Redis, streams: list[str], total: int, group: Group, recorders: int, server: int | None
) -> tuple[dict[str, Any], list[tuple[float, int]]]:
    """Until every entry is acknowledged (the recorder acknowledges after its commit, so the store has it).

    The window starts at the first poll where every recorder reads every partition (each has joined the
    group there) and some events are recorded: the processes start side by side, but one may be reading
    a while before the others, and a process is still starting up when its recorder joins. When half the
    events were recorded before that (a small plan, a slow start), what is left is too short a window to
    read CPU time over: then from the first recorder's first events, or from its joining."""
    start = time.perf_counter()
    curve: list[tuple[float, int]] = []
    marks: dict[str, dict[str, Any]] = {}  # the candidate starts of the window, best first in WINDOW_STARTS
    last_change, last_done = start, -1
    while True:
        try:
            remaining, consumers = backlog(client, streams)
        except redis.RedisError:  # a slow moment of a shared Redis: poll again, within STALL_SECONDS
            if time.perf_counter() - last_change > STALL_SECONDS:
                raise
            time.sleep(POLL_SECONDS)
            continue
        now, done = time.perf_counter(), total - remaining
        curve.append((round(now - start, 3), done))
        for label, reached in (
            ("all recorders recording", consumers >= recorders and 0 < done <= total // 2),
            ("first recorder recording", consumers >= 1 and 0 < done < total),
            ("first recorder joined", consumers >= 1),
        ):
            if reached and label not in marks:
                marks[label] = snapshot(now, done, group, server)
        if remaining == 0 and marks:
            end = snapshot(now, done, group, server)
            break
        if done != last_done:
            last_change, last_done = now, done
        elif now - last_change > STALL_SECONDS:
            raise TimeoutError(f"the recorders stalled at {done} of {total} events")
        group.check_alive()
        time.sleep(POLL_SECONDS)
    label = next(label for label in WINDOW_STARTS if label in marks)
    begin = marks[label]
    window = {
        "from": label,
        "done_before": begin["done"],
        "seconds": end["t"] - begin["t"],
        "gateway_cpu_s": end["cpu"] - begin["cpu"],
        "redis_cpu_s": end["redis"] - begin["redis"] if server else None,
    }
    return window, curve


WINDOW_STARTS = ("all recorders recording", "first recorder recording", "first recorder joined")


def snapshot(t: float, done: int, group: Group, server: int | None) -> dict[str, Any]:
    return {"t": t, "done": done, "cpu": cpu_of(group.pids), "redis": procstats.cpu_seconds(server) if server else 0.0}


async def count_events(database_url: str, dag_id: str) -> int:
    """Rows of this DAG in the store's events table."""
    store = Store(database_url)
    await store.start()
    try:
        async with store.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(EventRow).where(EventRow.dag_id == dag_id))).scalar_one())
    finally:
        await store.close()


# -- fan-out over 1 and 3 gateways -------------------------------------------------------------------


def bench_fanout(redis_url: str, database_url: str | None, plan: ScaleOutPlan) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """plan.clients SSE clients of one run, on the first n gateways for each n of plan.gateways (rounds
    alternate between them); plan.fanout_events events one at a time. All the gateways run throughout,
    as replicas do: those without clients of the run still receive its events (and drop them), and
    their CPU time is counted too."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    most = max(plan.gateways)
    # A multiple of the gateways (each worker talks to one), the same for every n: the same load generator.
    workers = most * max(1, math.ceil(plan.clients / (CONNECTIONS_PER_WORKER * most)))
    by_n: dict[int, list[dict[str, Any]]] = {n: [] for n in plan.gateways}
    try:
        with gateway_group(redis_url, namespace, most, database_url) as group, contextlib.ExitStack() as stack:
            ports = [port for _, port in group.members]
            # Started before the gateways are ready: both start up (imports) meanwhile.
            gens = {n: stack.enter_context(LoadGen("127.0.0.1", ports[:n], workers)) for n in plan.gateways}
            group.wait_ready()
            targets = [Target.of(process, port, redis_url, namespace) for process, port in group.members]
            for target in targets:
                stack.callback(target.redis.close)
                stack.callback(target.http.close)
            for r in range(plan.rounds):
                for n in plan.gateways:
                    say(f"fan-out: one event to {plan.clients} SSE clients over {n} gateway(s), round {r + 1} of {plan.rounds}")
                    by_n[n].append(fanout_round(gens[n], targets, n, plan, r))
    finally:
        drop_namespace(redis_url, namespace)
    rows = {str(n): fanout_figures(n, rounds, plan) for n, rounds in by_n.items()}
    base = str(plan.gateways[0])
    samples = {f"gateways_{n}": [s for r in rounds for s in r["latencies"]] for n, rounds in by_n.items()}
    for key, row in rows.items():
        if key != base:
            row["ratio_to_1_gateway"] = {
                "time_to_last_median": ratio(row["time_to_last_median_ms"], rows[base]["time_to_last_median_ms"]),
                "p50": ratio(row["latency"]["p50_ms"], rows[base]["latency"]["p50_ms"]),
                "p99": ratio(row["latency"]["p99_ms"], rows[base]["latency"]["p99_ms"]),
                "cpu_per_delivery": ratio(row["cpu_s_per_1000_deliveries"], rows[base]["cpu_s_per_1000_deliveries"]),
            }
    return {"clients": plan.clients, "load_generator_workers": workers, "by_gateways": rows}, samples


def fanout_round(gen: LoadGen, targets: list[Target], n: int, plan: ScaleOutPlan, r: int) -> dict[str, Any]:
    """One run, plan.clients SSE clients dealt over the first n gateways, plan.fanout_events task events."""
    used = targets[:n]
    run_id = new_run_id(f"fanout-{n}-{r}")
    used[0].publish(run_id, "running")
    gauge = GAUGES["sse"]
    for target in used:  # the previous round's clients gone
        target.wait_for_metric(gauge, lambda value: value == 0)
    opened = gen.open("sse", [caller_path("sse", run_id)] * plan.clients)
    if opened["failed"]:
        raise RuntimeError(f"{opened['failed']} of {plan.clients} SSE clients could not connect: {opened['error']}")
    per_gateway = clients_held(used, gauge, plan.clients)
    used[0].wait_until_recorded()
    for target in targets:
        procstats.wait_until_idle(target.pid)
    pids = [t.pid for t in targets]
    cpu_before = cpu_of(pids)
    published = {}
    reached = True
    for k in range(plan.fanout_events):
        event = used[0].publish(run_id, "running", task_id=f"step{k}")
        published[event.seq] = event.t
        reached &= gen.await_events("task", k + 1, timeout=60)
    cpu = cpu_of(pids) - cpu_before
    arrivals, _ = gen.collect(timeout=0)
    latencies, per_event = [], defaultdict(list)
    for a in arrivals:
        if a.event == "task" and a.seq in published:
            latencies.append(a.t - published[a.seq])
            per_event[a.seq].append(a.t - published[a.seq])
    return {
        "clients_per_gateway": per_gateway,
        "latencies": latencies,
        "to_last": [max(per_event[seq]) for seq in sorted(per_event)],
        "missing": plan.clients * plan.fanout_events - len(latencies),
        "reached": reached,
        "cpu_s": cpu,
    }


def clients_held(targets: list[Target], gauge: str, clients: int, timeout: float = 120.0) -> list[int]:
    """Until the gateways hold `clients` between them; how many each holds (the load generator's dealing)."""
    deadline = time.monotonic() + timeout
    while sum(held := [int(t.metric(gauge)) for t in targets]) < clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateways hold {held} of {clients} SSE clients")
        time.sleep(0.01)
    return held


def fanout_figures(n: int, rounds: list[dict[str, Any]], plan: ScaleOutPlan) -> dict[str, Any]:
    latencies = [s for r in rounds for s in r["latencies"]]
    to_last = [round(s * 1e3, 3) for r in rounds for s in r["to_last"]]
    cpu = sum(r["cpu_s"] for r in rounds)
    deliveries = len(latencies)
    return {
        "gateways": n,
        "clients": plan.clients,
        "clients_per_gateway": rounds[0]["clients_per_gateway"],
        "events": plan.fanout_events * len(rounds),
        "deliveries": deliveries,
        "missing": sum(r["missing"] for r in rounds),
        "all_delivered": all(r["reached"] for r in rounds) and sum(r["missing"] for r in rounds) == 0,
        "latency": percentiles(latencies) if latencies else {},
        "time_to_last_ms": to_last,
        "time_to_last_median_ms": median(to_last),
        "time_to_last_max_ms": max(to_last, default=None),
        "gateway_cpu_s": round(cpu, 2),
        "cpu_s_per_1000_deliveries": round(cpu / deliveries * 1000, 4) if deliveries else None,
        "deliveries_per_cpu_s": round(deliveries / cpu, 1) if cpu > 0 else None,
    }


def per_core(recorder: dict[str, Any], fanout: dict[str, Any]) -> dict[str, Any]:
    """The figures a deployment is sized with: work per CPU-second, from the measurements above."""
    rows = recorder["rows"]
    widest = max(row["partitions"] for row in rows)
    at_widest = [row for row in rows if row["partitions"] == widest and row["events_per_cpu_s"]]
    publishes = [row["preload"]["redis_cpu_us_per_publish"] for row in rows if "redis_cpu_us_per_publish" in row["preload"]]
    recorded = [row["redis_cpu_us_per_event"] for row in rows if row.get("redis_cpu_us_per_event")]
    deliveries = {n: row["deliveries_per_cpu_s"] for n, row in fanout["by_gateways"].items()}
    return {
        "recorder_events_per_cpu_s": median([row["events_per_cpu_s"] for row in at_widest]),
        "recorder_at_partitions": widest,
        "fanout_deliveries_per_cpu_s": deliveries,
        "redis_cpu_us_per_publish": median(publishes),
        "redis_cpu_us_per_recorded_event": median(recorded),
    }
