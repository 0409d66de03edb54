"""`runbell bench`: figures measured on this machine (a benchmark: it reports, never fails).

The gateway runs in its own process; the load generator and the publisher run outside it, so the
publish time and the arrival time are read from one clock.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

from listeners.config import PublisherConfig
from listeners.publisher import Publisher
from service.bench.delivery import bench_delivery, bench_hook_publish
from service.bench.listing import run_listing
from service.bench.measure import free_port, start_gateway
from service.bench.webhooks import FastReceiver, bench_webhooks

__all__ = ["FastReceiver", "free_port", "run", "run_listing", "start_gateway"]


def run(out: Path, redis_url: str, quick: bool, database_url: str | None = None) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    rounds = 30 if quick else 200
    report: dict[str, Any] = {"redis_url": redis_url, "quick": quick, "database": database_url or "sqlite (default)"}
    report["hook_publish"] = bench_hook_publish(redis_url, namespace, 500 if quick else 5000)
    port = free_port()
    env = {"RUNBELL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", **({"RUNBELL_DATABASE_URL": database_url} if database_url else {})}
    gateway = start_gateway(redis_url, namespace, port, Path(tempfile.mkdtemp()), extra_env=env)  # a fresh store each run
    try:
        publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=Path(tempfile.mkdtemp())))
        url = f"http://127.0.0.1:{port}"
        for via in ("long-poll", "sse"):
            report[f"{via}_1_caller"] = asyncio.run(bench_delivery(url, publisher, rounds, 1, via))
            report[f"{via}_100_callers"] = asyncio.run(bench_delivery(url, publisher, max(5, rounds // 10), 100, via))
        report["webhooks"] = asyncio.run(bench_webhooks(url, publisher, rounds, 200 if quick else 2000))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(20)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
