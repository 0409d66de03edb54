"""Hook publish cost, and publish → caller latency over long-poll and SSE."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from listeners.config import PublisherConfig
from listeners.publisher import Publisher, emit
from service.bench.measure import await_outcome_long_poll, await_outcome_sse, percentiles


def bench_hook_publish(redis_url: str, namespace: str, count: int) -> dict[str, Any]:
    """The publish call the hook makes, warm (connection open), and first-in-process (connect included)."""
    spool = Path(tempfile.mkdtemp())
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=spool))
    emit("bench", "warmup", "running", publisher=publisher)
    warm = []
    for i in range(count):
        start = time.perf_counter()
        emit("bench", f"hook-{i % 100}", "running", task_id="t", publisher=publisher)
        warm.append(time.perf_counter() - start)
    code = (
        "import time,sys,tempfile,pathlib;from listeners.config import PublisherConfig;"
        "from listeners.publisher import Publisher,emit;"
        f"p=Publisher(PublisherConfig(redis_url={redis_url!r},namespace={namespace!r},spool_dir=pathlib.Path(tempfile.mkdtemp())));"
        "s=time.perf_counter();emit('bench','first','running',publisher=p);print(time.perf_counter()-s)"
    )
    first = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(10)]
    return {"warm": percentiles(warm), "first_in_process": percentiles(first)}


async def bench_delivery(url: str, publisher: Publisher, rounds: int, count: int, via: str) -> dict[str, Any]:
    """Publish → caller latency: `count` callers wait on one run, one result is published per round."""
    receive, gauge = {"long-poll": (await_outcome_long_poll, "runbell_waiters"),
                      "sse": (await_outcome_sse, "runbell_sse_clients")}[via]
    parsed = httpx.URL(url)
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for r in range(rounds):
            run_id = f"{via}-{r}-{uuid.uuid4().hex[:6]}"
            arrivals: list[float] = []

            async def one_caller() -> None:
                await receive(parsed.host, parsed.port, run_id)
                arrivals.append(time.perf_counter())

            callers = [asyncio.create_task(one_caller()) for _ in range(count)]
            await wait_for_gauge(client, gauge, count)
            await asyncio.sleep(0.02)  # the gauge counts callers from arrival; let their log reads finish
            start = time.perf_counter()
            emit("bench", run_id, "success", task_id="answer", result_task=True, result=r, publisher=publisher)
            await asyncio.gather(*callers)
            samples.extend(a - start for a in arrivals)
    return percentiles(samples)


async def wait_for_gauge(client: httpx.AsyncClient, name: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        for line in text.splitlines():
            if line.startswith(name + " ") and float(line.split()[1]) >= value:
                return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{name} never reached {value}")
