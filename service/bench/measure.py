"""What every benchmark shares: percentiles, a gateway in its own process, raw HTTP callers."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from runbell.service.bench.loadgen import raise_fd_limit
from runbell.service.core.redaction import without_password


def percentiles(samples: list[float], context: str = "") -> dict[str, Any]:
    """p50/p99/max in milliseconds. No samples is a failed measurement, said as such ({"n": 0, "error":
    ...}, with `context`: why there could be none), never an exception: the rest of the bench goes on."""
    if not samples:
        return {"n": 0, "error": f"no samples: {context}" if context else "no samples"}
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.5) * 1e3, 3),
        "p99_ms": round(pick(0.99) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(redis_url: str, namespace: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    process = spawn_gateway(redis_url, namespace, port, workdir, extra_env)
    wait_ready(process, port)
    return process


def spawn_gateway(redis_url: str, namespace: str, port: int, workdir: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`runbell serve` in its own process, not waited for (several start side by side)."""
    env = {
        **os.environ,
        "RUNBELL_REDIS_URL": redis_url,
        "RUNBELL_NAMESPACE": namespace,
        "RUNBELL_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "RUNBELL_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    return subprocess.Popen([sys.executable, "-m", "runbell.service.client.cli", "serve", "--no-auth", "--port", str(port)], env=env)


def wait_ready(process: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until the gateway's /readyz answers 200; killed and raised after the timeout, saying its last
    answer (or that it exited)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline and process.poll() is None:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:300]}"
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # not listening yet, or 503 (its recorder's first pass)
    if process.poll() is not None:
        raise RuntimeError(f"the gateway exited with code {process.returncode} before it was ready")
    process.kill()
    raise RuntimeError(f"the gateway did not become ready in {timeout:g} s (its /readyz: {last})")


# The callers speak raw HTTP/1.1 over asyncio streams: httpx costs about a millisecond per response on
# this machine, which would be measured as gateway latency.


async def raw_get(host: str, port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_content_length(reader: asyncio.StreamReader) -> int:
    """Read a response's headers up to the blank line; its Content-Length (0 without one)."""
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return length


async def await_outcome_long_poll(host: str, port: int, run_id: str, dag_id: str = "bench", timeout: int = 30) -> bytes:
    """The outcome's JSON body, read by Content-Length as soon as it is there."""
    reader, writer = await raw_get(host, port, f"/v1/dags/{dag_id}/runs/{run_id}/result?timeout={timeout}")
    status = await reader.readline()
    assert b" 200 " in status, status
    body = await reader.readexactly(await read_content_length(reader))
    writer.close()
    return body


async def await_outcome_sse(host: str, port: int, run_id: str, dag_id: str = "bench") -> bytes:
    """The outcome event's data, read as soon as its event ends."""
    reader, writer = await raw_get(host, port, f"/v1/dags/{dag_id}/runs/{run_id}/events")
    while (line := await reader.readline()) and not line.startswith(b"event: outcome"):
        pass
    data = b""
    while (line := await reader.readline()).strip():
        if line.startswith(b"data:"):
            data += line[5:].strip()
    writer.close()
    return data


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
        return status, await self.reader.readexactly(await read_content_length(self.reader))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


STARTED = time.monotonic()


def say(what: str) -> None:
    """Progress, on stderr, with the seconds since the bench started: the summary goes to stdout at the end."""
    print(f"runbell bench [{time.monotonic() - STARTED:6.1f} s]: {what}", file=sys.stderr, flush=True)


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


def report_head(out: Path, quick: bool, plan: Any, redis_url: str, database: str) -> dict[str, Any]:
    """Makes DIR and raises the open-file limit (the gateways and load generators inherit it); what every
    report of the bench opens with: its plan, the machine, the store (its URL's password masked: the
    report is a file to share)."""
    out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    return {"quick": quick, "plan": plan.__dict__, "machine": machine(redis_url), "database": without_password(database)}
