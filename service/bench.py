"""`runbell bench`: latency figures measured on this machine (a benchmark: it reports, never fails).

The gateway runs in its own process; this process is the load generator and the publisher, so the
publish time and the arrival time are read from one clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
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


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(pick(0.5) * 1e3, 3), "p99_ms": round(pick(0.99) * 1e3, 3),
            "max_ms": round(ordered[-1] * 1e3, 3), "mean_ms": round(statistics.fmean(ordered) * 1e3, 3)}


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


# The callers speak raw HTTP/1.1 over asyncio streams: httpx costs about a millisecond per response on
# this machine, which would be measured as gateway latency.


async def raw_get(host: str, port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def await_outcome_long_poll(host: str, port: int, run_id: str) -> None:
    reader, writer = await raw_get(host, port, f"/v1/dags/bench/runs/{run_id}/result?timeout=30")
    status = await reader.readline()
    assert b" 200 " in status, status
    await reader.read()  # Connection: close: the body ends with the connection
    writer.close()


async def await_outcome_sse(host: str, port: int, run_id: str) -> None:
    reader, writer = await raw_get(host, port, f"/v1/dags/bench/runs/{run_id}/events")
    while (line := await reader.readline()) and not line.startswith(b"event: outcome"):
        pass
    writer.close()


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


def start_gateway(redis_url: str, namespace: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "RUNBELL_REDIS_URL": redis_url, "RUNBELL_NAMESPACE": namespace,
           "RUNBELL_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}", "RUNBELL_LOG_LEVEL": "warning", **(extra_env or {})}
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-auth", "--port", str(port)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the gateway did not become ready")


class FastReceiver:
    """A bare HTTP/1.1 receiver on loopback (keep-alive, 204 at once) that notes each webhook and
    when the first one for a run arrived, so the dispatcher, not the receiver, is what gets measured.
    While `hold` is set it answers nothing (a delivery in progress, for tests)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}  # run_id -> perf_counter at its first webhook
        self.hits: list[dict[str, str]] = []  # webhook-id and run_id of every request, in order
        self.hold = asyncio.Event()
        self.changed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    def stop(self) -> None:
        self.hold.clear()
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():  # the request line; empty at EOF
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                run_id = json.loads(body)["data"]["run_id"]
                self.hits.append({"id": headers.get("webhook-id", ""), "run_id": run_id})
                self.arrivals.setdefault(run_id, time.perf_counter())
                self.changed.set()
                if self.hold.is_set():
                    await asyncio.sleep(3600)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def until(self, run_ids: set[str], timeout: float = 120.0) -> None:
        """Until a webhook for each of these runs has arrived (others may come too: earlier runs)."""
        async with asyncio.timeout(timeout):
            while not run_ids <= self.arrivals.keys():
                self.changed.clear()
                await self.changed.wait()


async def bench_webhooks(url: str, publisher: Publisher, rounds: int, burst: int) -> dict[str, Any]:
    """Outcome published -> webhook received, one run at a time; then a burst of outcomes, to count
    deliveries per second to a fast local receiver."""
    receiver = FastReceiver()
    await receiver.start()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        created = await client.post("/v1/webhooks", json={"url": receiver.url})
        assert created.status_code == 201, created.text
        latencies = []
        for r in range(rounds):
            run_id = f"wh-{r}-{uuid.uuid4().hex[:6]}"
            start = time.perf_counter()
            emit("bench", run_id, "success", task_id="answer", result_task=True, result=r, publisher=publisher)
            await receiver.until({run_id})
            latencies.append(receiver.arrivals[run_id] - start)
        burst_ids = {f"burst-{r}-{uuid.uuid4().hex[:6]}" for r in range(burst)}
        start = time.perf_counter()
        for run_id in burst_ids:
            emit("bench", run_id, "success", publisher=publisher)
        await receiver.until(burst_ids)
        seconds = max(receiver.arrivals[run_id] for run_id in burst_ids) - start
    receiver.stop()
    return {"latency": percentiles(latencies), "burst": burst, "burst_seconds": round(seconds, 3),
            "deliveries_per_second": round(burst / seconds, 1)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# -- the runs listing over 100,000 runs ------------------------------------------------------------

LISTING_RUNS = 100_000
LISTING_DAGS = 60
LISTING_DAYS = 180
LISTING_INSERT_CHUNK = 5_000


def listing_rows(count: int, seed: int = 11, now: float | None = None) -> list[dict[str, Any]]:
    """`count` runs as a scheduler of LISTING_DAGS DAGs would leave them over LISTING_DAYS days: a few
    busy DAGs and a long tail; mostly scheduled, some manual (no logical_date), asset-triggered and
    backfill runs (a few backfills); mostly succeeded, some failed, a few running or queued (recent)."""
    import random
    from datetime import datetime, timedelta, timezone

    rng = random.Random(seed)
    end = datetime.fromtimestamp(now or time.time(), tz=timezone.utc)
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
        failure = ({"task_id": "load", "map_index": -1, "try_number": 2,
                    "error": {"type": "KeyError", "message": "'id'"}} if state == "failed" else None)
        result_task = ({"task_id": "answer", "map_index": -1, "try_number": 1, "is_ref": False, "size": 12}
                       if state == "success" else None)
        rows.append(dict(
            dag_id=dag_id, run_id=f"{run_type}__{run_after.isoformat()}_{i:06d}", state=state, run_type=run_type,
            logical_date=logical, run_after=run_after, backfill_id=backfill_id, started_at=started, ended_at=ended,
            last_seq=4, last_event_at=ended or started or run_after, outcome_status=outcome,
            outcome={"status": outcome, "dag_id": dag_id, "run_state": state}, result_task=result_task,
            first_failure=failure,
        ))
    return rows


async def load_listing_database(database_url: str, count: int) -> dict[str, Any]:
    """Migrate the (empty) database and bulk-insert `count` runs straight into the runs table."""
    from sqlalchemy import insert, text

    from service.store import Run, Store

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
    from datetime import datetime, timedelta, timezone

    week_ago = (datetime.fromtimestamp(now, tz=timezone.utc) - timedelta(days=7)).isoformat()
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


class KeepAliveClient:
    """GET over one keep-alive HTTP/1.1 connection, reading the body by Content-Length (httpx costs
    about a millisecond per response, which would be measured as gateway latency)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


def run_listing(out: Path, redis_url: str, database_url: str, runs: int = LISTING_RUNS, rounds: int = 20,
                pages: int = 5, limit: int = 50) -> dict[str, Any]:
    """`runbell bench --listing --database-url postgresql://...`: a scratch database is made on that
    PostgreSQL server (and dropped after), `runs` runs are bulk-inserted into its runs table, and a
    gateway in its own process answers filtered, paged listings over HTTP; p50/p99 per request."""
    from urllib.parse import urlsplit

    from service.store import normalize_database_url

    if not database_url.startswith(("postgresql", "postgres")):
        raise ValueError("--listing measures PostgreSQL: give --database-url postgresql://user@host:port/db")
    import asyncpg

    parts = urlsplit(database_url)
    admin = f"postgresql://{parts.netloc}/postgres"
    scratch = f"runbell_bench_listing_{uuid.uuid4().hex[:8]}"
    scratch_url = normalize_database_url(f"postgresql://{parts.netloc}/{scratch}")

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(admin_sql(f'CREATE DATABASE "{scratch}"'))
    report: dict[str, Any] = {"database": f"{parts.hostname}:{parts.port or 5432} (scratch database {scratch})",
                              "limit": limit, "pages_followed": pages, "rounds": rounds}
    try:
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
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
    (out / "listing.json").write_text(json.dumps(report, indent=2))
    return report
