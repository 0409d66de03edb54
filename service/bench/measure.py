"""What every benchmark shares: percentiles, a gateway in its own process, raw HTTP callers."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
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
    env = {
        **os.environ,
        "RUNBELL_REDIS_URL": redis_url,
        "RUNBELL_NAMESPACE": namespace,
        "RUNBELL_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "RUNBELL_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    process = subprocess.Popen([sys.executable, "-m", "runbell.service.client.cli", "serve", "--no-auth", "--port", str(port)], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the gateway did not become ready")


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
