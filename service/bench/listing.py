"""The runs listing over 100,000 runs in PostgreSQL: p50/p99 of filtered, paged requests."""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from runbell.service.bench.measure import (
    KeepAliveClient,
    free_port,
    percentiles,
    start_gateway,
)
from runbell.service.bench.stores import scratch_postgres
from runbell.service.core import clock

LISTING_RUNS = 100_000
LISTING_DAGS = 60
LISTING_DAYS = 180
LISTING_INSERT_CHUNK = 5_000


def listing_rows(count: int, seed: int = 11, now: float | None = None) -> list[dict[str, Any]]:
    """`count` runs as a scheduler of LISTING_DAGS DAGs would leave them over LISTING_DAYS days: a few
    busy DAGs and a long tail; mostly scheduled, some manual (no logical_date), asset-triggered and
    backfill runs (a few backfills); mostly succeeded, some failed, a few running or queued (recent)."""
    import random
    from datetime import timedelta

    rng = random.Random(seed)
    end = clock.from_epoch(now or time.time())
    start = end - timedelta(days=LISTING_DAYS)
    dags = [f"dag_{i:02d}" for i in range(LISTING_DAGS)]
    weights = [1 / (i + 1) for i in range(LISTING_DAGS)]  # Zipf-like: dag_00 is the busiest
    rows = []
    for i in range(count):
        run_after = start + timedelta(seconds=rng.uniform(0, LISTING_DAYS * 86400))
        age = (end - run_after).total_seconds()
        run_type = rng.choices(["scheduled", "manual", "asset_triggered", "backfill"], [70, 15, 8, 7])[0]
        if age < 3600:
            state = rng.choices(["running", "queued", "success", "failed"], [50, 20, 25, 5])[0]
        else:
            state = rng.choices(["success", "failed", "running"], [90, 9.8, 0.2])[0]  # a few stuck runs
        dag_id = rng.choices(dags, weights)[0]
        backfill_id = str(rng.randrange(1, 40)) if run_type == "backfill" else None
        logical = run_after if run_type in ("scheduled", "backfill") else None
        started = run_after + timedelta(seconds=rng.uniform(1, 30)) if state != "queued" else None
        ended = started + timedelta(seconds=rng.uniform(5, 900)) if state in ("success", "failed") and started else None
        outcome = {"success": "success", "failed": "failed"}.get(state, "pending")
        failure = (
            {"task_id": "load", "map_index": -1, "try_number": 2, "error": {"type": "KeyError", "message": "'id'"}}
            if state == "failed"
            else None
        )
        result_task = {"task_id": "answer", "map_index": -1, "try_number": 1, "is_ref": False, "size": 12} if state == "success" else None
        rows.append(
            dict(
                dag_id=dag_id,
                run_id=f"{run_type}__{run_after.isoformat()}_{i:06d}",
                state=state,
                run_type=run_type,
                logical_date=logical,
                run_after=run_after,
                backfill_id=backfill_id,
                started_at=started,
                ended_at=ended,
                last_seq=4,
                last_event_at=ended or started or run_after,
                outcome_status=outcome,
                outcome={"status": outcome, "dag_id": dag_id, "run_state": state},
                result_task=result_task,
                first_failure=failure,
            )
        )
    return rows


async def load_listing_database(database_url: str, count: int) -> dict[str, Any]:
    """Migrate the (empty) database and bulk-insert `count` runs straight into the runs table."""
    from sqlalchemy import insert, text

    from runbell.service.store.models import Run
    from runbell.service.store.store import Store

    store = Store(database_url)
    await store.start()
    try:
        started = time.perf_counter()
        rows = listing_rows(count)
        async with store.engine.begin() as conn:
            for start in range(0, len(rows), LISTING_INSERT_CHUNK):
                await conn.execute(insert(Run), rows[start : start + LISTING_INSERT_CHUNK])
        async with store.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE runs"))
        return {"runs": count, "load_seconds": round(time.perf_counter() - started, 1)}
    finally:
        await store.close()


def listing_queries(now: float) -> list[tuple[str, dict[str, str]]]:
    """Filter combinations a dashboard or a script asks for (each followed across pages)."""
    from datetime import timedelta

    week_ago = clock.iso(clock.from_epoch(now) - timedelta(days=7))
    return [
        ("newest", {}),
        ("status=failed", {"status": "failed"}),
        ("status=running,queued", {"status": "running,queued"}),
        ("dag_id (busiest)", {"dag_id": "dag_00"}),
        ("dag_id (tail) status=success order=asc", {"dag_id": "dag_41", "status": "success", "order": "asc"}),
        ("run_type=backfill backfill_id", {"run_type": "backfill", "backfill_id": "7"}),
        ("last 7 days status=failed", {"run_after_gte": week_ago, "status": "failed"}),
        ("run_type=manual,asset_triggered status=failed", {"run_type": "manual,asset_triggered", "status": "failed"}),
    ]


async def bench_listing_queries(port: int, now: float, rounds: int, pages: int, limit: int) -> dict[str, Any]:
    """Each filter combination `rounds` times: its first page, then next_cursor for `pages` - 1 more."""
    from urllib.parse import urlencode

    client = KeepAliveClient("127.0.0.1", port)
    report: dict[str, Any] = {}
    every: list[float] = []
    try:
        for _ in range(3):  # warm the connection, the pool and the plans
            await client.get("/v1/runs?limit=1")
        for name, params in listing_queries(now):
            samples, rows = [], 0
            for _ in range(rounds):
                query = {**params, "limit": str(limit)}
                for _ in range(pages):
                    start = time.perf_counter()
                    status, body = await client.get("/v1/runs?" + urlencode(query))
                    samples.append(time.perf_counter() - start)
                    assert status == 200, body[:300]
                    page = json.loads(body)
                    rows += len(page["runs"])
                    if page["next_cursor"] is None:
                        break
                    query["cursor"] = page["next_cursor"]
            every += samples
            report[name] = {**percentiles(samples), "rows": rows, "params": params}
    finally:
        client.close()
    return {"all": percentiles(every), "by_query": report}


def run_listing(
    out: Path, redis_url: str, database_url: str, runs: int = LISTING_RUNS, rounds: int = 20, pages: int = 5, limit: int = 50
) -> dict[str, Any]:
    """`runbell bench --listing --database-url postgresql://...`: a scratch database is made on that
    PostgreSQL server (and dropped after), `runs` runs are bulk-inserted into its runs table, and a
    gateway in its own process answers filtered, paged listings over HTTP; p50/p99 per request."""
    from urllib.parse import urlsplit

    if not database_url.startswith(("postgresql", "postgres")):
        raise ValueError("--listing measures PostgreSQL: give --database-url postgresql://user@host:port/db")
    parts = urlsplit(database_url)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "database": f"{parts.hostname}:{parts.port or 5432} (a scratch database)",
        "limit": limit,
        "pages_followed": pages,
        "rounds": rounds,
    }
    with scratch_postgres(database_url, "bench_listing", fallback=False) as scratch_url:  # never 100,000 rows into yours
        now = time.time()
        report["load"] = asyncio.run(load_listing_database(scratch_url, runs))
        port = free_port()
        env = {"RUNBELL_DATABASE_URL": scratch_url, "RUNBELL_RECORDER": "false", "RUNBELL_WEBHOOKS": "false"}
        gateway = start_gateway(redis_url, f"bench-{uuid.uuid4().hex[:8]}", port, Path(tempfile.mkdtemp()), extra_env=env)
        try:
            report.update(asyncio.run(bench_listing_queries(port, now, rounds, pages, limit)))
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(20)
    (out / "listing.json").write_text(json.dumps(report, indent=2))
    return report
