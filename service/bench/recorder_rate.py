"""Recorder throughput: events per second one recorder copies from the stream partitions into the store.

The events are published as the hook publishes them, spread over many runs at once. By default they
are published first and then a recorder of this process drains the backlog, so only recording is
timed; with ``live`` a publisher process publishes while the recorder records, so each batch holds a
few events of each run (the steady state of a busy gateway: each run's history grows between batches).
Timed: wall time until every event is handled, and the CPU time of this process (which includes
SQLite, but not PostgreSQL's server): per 1,000 events it is the figure that survives a shared machine.
Each run ends decided, so outcomes and task rows are derived as in production; the store has the
webhook outbox, with no endpoint.

    python -m runbell.service.bench.recorder_rate --events 5000 --runs 50 [--live] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.store.recorder import Recorder
from runbell.service.store.store import Store
from runbell.service.webhooks.outbox import WebhookOutbox

DAG = "bench_recorder"
DRAIN_TIMEOUT = 600.0  # seconds: a recorder slower than this is reported as not having caught up


def publish(redis_url: str, namespace: str, events: int, runs: int, partitions: int = keys.DEFAULT_PARTITIONS) -> list[str]:
    """``events`` events over ``runs`` runs, interleaved (every run is under way at once): each run
    starts, its tasks run and succeed, and it ends successful. Returns the run ids."""
    config = PublisherConfig(
        redis_url=redis_url, namespace=namespace, spool_dir=Path(tempfile.mkdtemp()), timeout_seconds=5, stream_partitions=partitions
    )
    publisher = Publisher(config)
    run_ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(runs)]
    per_run = max(2, events // runs)
    for step in range(per_run):
        for run_id in run_ids:
            if step == 0:
                sent = emit(DAG, run_id, "running", publisher=publisher)
            elif step == per_run - 1:
                sent = emit(DAG, run_id, "success", publisher=publisher)
            else:
                task, phase = divmod(step - 1, 2)
                sent = emit(DAG, run_id, "success" if phase else "running", task_id=f"t{task}", try_number=1, publisher=publisher)
            if sent is None:
                raise RuntimeError("an event was spooled: Redis did not answer in time")
    return run_ids


async def drain(
    redis_url: str, database_url: str, namespace: str, events: int, partitions: int = keys.DEFAULT_PARTITIONS
) -> dict[str, Any]:
    """Run one recorder over the namespace until ``events`` entries are handled; its figures."""
    store = Store(database_url, outbox=WebhookOutbox())
    await store.start()
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    recorder = Recorder(client, store, namespace, "bench-recorder", block_ms=100, partitions=partitions)
    handled = 0
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while handled < events and time.monotonic() < deadline:
            handled += await recorder.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await client.aclose()
        await store.close()
    return {
        "events": events,
        "handled": handled,
        "caught_up": handled >= events,
        "seconds": round(wall, 3),
        "events_per_s": round(handled / wall, 1) if wall else None,
        "cpu_seconds": round(cpu, 3),
        "cpu_seconds_per_1000_events": round(1000 * cpu / handled, 4) if handled else None,
    }


def recorder_rate(
    redis_url: str,
    database_url: str | None = None,
    *,
    events: int = 5000,
    runs: int = 50,
    partitions: int = keys.DEFAULT_PARTITIONS,
    live: bool = False,
) -> dict[str, Any]:
    """Publish ``events`` over ``runs`` runs in a fresh namespace and time one recorder recording them
    into ``database_url`` (default: a fresh SQLite file): after they are all published, or while a
    publisher process publishes them (``live``). The namespace's keys are dropped after."""
    namespace = f"bench-rec-{uuid.uuid4().hex[:8]}"
    url = database_url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'recorder.db'}"
    published = runs * max(2, events // runs)
    try:
        if live:
            publisher = multiprocessing.get_context("spawn").Process(target=publish, args=(redis_url, namespace, events, runs, partitions))
            publisher.start()
            try:
                figures = asyncio.run(drain(redis_url, url, namespace, published, partitions))
            finally:
                publisher.join(DRAIN_TIMEOUT)
        else:
            publish(redis_url, namespace, events, runs, partitions)
            figures = asyncio.run(drain(redis_url, url, namespace, published, partitions))
    finally:
        asyncio.run(_drop(redis_url, namespace))
    database = "sqlite" if database_url is None else url.partition(":")[0].partition("+")[0]
    return {"database": database, "runs": runs, "partitions": partitions, "live": live, **figures}


async def _drop(redis_url: str, namespace: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        found = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
        for start in range(0, len(found), 500):
            await client.unlink(*found[start : start + 500])
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=keys.DEFAULT_PARTITIONS)
    parser.add_argument("--live", action="store_true", help="publish while recording, from another process")
    args = parser.parse_args()
    figures = recorder_rate(
        args.redis_url, args.database_url, events=args.events, runs=args.runs, partitions=args.partitions, live=args.live
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
