"""Webhook delivery: outcome published → receiver got it, and deliveries per second."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import anyio
import httpx

from runbell.listeners.publisher import Publisher, emit
from runbell.service.bench.measure import percentiles

PROFILED_SHARE = 5  # the profiled burst is this much smaller than the measured one


class FastReceiver:
    """A bare HTTP/1.1 receiver on loopback (keep-alive, 204 at once) that notes each webhook and
    when the first one for a run arrived, so the dispatcher, not the receiver, is what gets measured.
    While `hold` is set it answers nothing (a delivery in progress, for tests)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}  # run_id -> perf_counter at its first webhook
        self.hits: list[dict[str, str]] = []  # webhook-id and run_id of every request, in order
        self.answered: list[dict[str, str]] = []  # those answered 204 (not held): the deliveries made
        self.hold = asyncio.Event()
        self.changed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    def stop(self) -> None:
        self.hold.clear()
        self.server.close()  # type: ignore[union-attr]  # stop() follows start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():  # the request line; empty at EOF
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                run_id = json.loads(body)["data"]["run_id"]
                hit = {"id": headers.get("webhook-id", ""), "run_id": run_id}
                self.hits.append(hit)
                self.arrivals.setdefault(run_id, time.perf_counter())
                self.changed.set()
                if self.hold.is_set():
                    await asyncio.sleep(3600)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                self.answered.append(hit)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # The loop is ending (the gateway keeps its connection open). Ended, not cancelled: Python
            # 3.11's start_server callback calls exception() on a cancelled handler and logs the error.
            pass
        finally:
            writer.close()

    async def until(self, run_ids: set[str], timeout: float = 120.0) -> None:
        """Until a webhook for each of these runs has arrived (others may come too: earlier runs)."""
        with anyio.fail_after(timeout):  # anyio: asyncio.timeout is Python 3.11+, and requires-python allows 3.10
            while not run_ids <= self.arrivals.keys():
                self.changed.clear()
                await self.changed.wait()


async def bench_webhooks(
    url: str, publisher: Publisher, rounds: int, burst: int, profile: Callable[[], AbstractContextManager[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """Outcome published -> webhook received, one run at a time; then a burst of outcomes, to count
    deliveries per second to a fast local receiver. `profile`: a recorder of the gateway (runbell.
    service.bench.profile.sampled) around one more burst, not measured: its summary is "profile"."""
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
        seconds = await burst_of(publisher, receiver, "burst", burst)
        profiled = None
        if profile is not None:
            # A fifth of the burst: under py-spy's sampling the whole one did not arrive within the
            # receiver's 120 s on SQLite. One that does not arrive still has its profile, and it never
            # costs the measured burst its figures.
            profiled_burst = max(1, burst // PROFILED_SHARE)
            with profile() as profiled:
                try:
                    await burst_of(publisher, receiver, "profiled", profiled_burst)
                except TimeoutError:
                    unfinished = True
                else:
                    unfinished = False
            profiled["burst"] = profiled_burst
            if unfinished:
                profiled["unfinished"] = "the profiled burst's webhooks did not all arrive within 120 s"
    receiver.stop()
    return {
        "latency": percentiles(latencies),
        "burst": burst,
        "burst_seconds": round(seconds, 3),
        "deliveries_per_second": round(burst / seconds, 1),
        **({"profile": profiled} if profiled is not None else {}),
    }


async def burst_of(publisher: Publisher, receiver: FastReceiver, label: str, burst: int) -> float:
    """`burst` runs' outcomes published at once: seconds from the first publish until the receiver had
    a webhook for each."""
    run_ids = {f"{label}-{r}-{uuid.uuid4().hex[:6]}" for r in range(burst)}
    start = time.perf_counter()
    for run_id in run_ids:
        emit("bench", run_id, "success", publisher=publisher)
    await receiver.until(run_ids)
    return max(receiver.arrivals[run_id] for run_id in run_ids) - start
