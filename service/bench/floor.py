"""The floors: what the machine takes with nothing of the gateway in between.

- Redis: raw PUBLISH → a redis-py subscriber in a process of its own (`python -c`, main()), reading as
  the gateway's hub does (redis.asyncio, get_message with a timeout, uvloop);
- fan-out: one SSE frame written to N sockets by a bare uvloop server in a process of its own
  (fanout_server()), to the same load generator as the gateway's SSE clients: the kernel's share of
  a fan-out, one write per client;
- memory: uvicorn (as the gateway runs it: uvloop, httptools) serving a bare ASGI app that starts an
  SSE stream and holds it (hold_stream), in a process of its own: what a connection costs before any
  of the gateway's own state.

Arrivals are stamped with time.perf_counter(), which is CLOCK_MONOTONIC on Linux: the same clock in
every process of the machine, so a send in one process can be subtracted from an arrival in another.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
import uvicorn

from runbell.service.bench import procstats
from runbell.service.bench.loadgen import LoadGen, raise_fd_limit, run_loop
from runbell.service.bench.measure import free_port

STOP = b"stop"
MEMORY_FLOOR_SERVER = "import sys; from runbell.service.bench.floor import memory_floor_server; memory_floor_server(int(sys.argv[1]))"
SUBSCRIBER = "import sys; from runbell.service.bench.floor import main; main(sys.argv[1], sys.argv[2])"
FANOUT_SERVER = "from runbell.service.bench.floor import fanout_server; fanout_server()"
READY = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n: ready\r\n\r\n"


async def subscribe(url: str, channel: str) -> None:
    client = aioredis.Redis.from_url(url, socket_timeout=None)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=5)  # the subscribe confirmation: from here on nothing is missed
    print("ready", flush=True)
    arrivals: list[tuple[int, float]] = []
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is None:
            continue
        t = time.perf_counter()
        if message["data"] == STOP:
            break
        arrivals.append((int(message["data"]), t))
    await pubsub.aclose()
    await client.aclose()
    print(json.dumps(arrivals), flush=True)


def bench_floor(redis_url: str, count: int, gap: float = 0.001) -> list[float]:
    """Publish→receive latencies (seconds) of `count` messages, one every `gap` seconds."""
    channel = f"runbell-bench-floor-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, redis_url, channel], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]  # started with stdout=PIPE
            raise RuntimeError("the floor subscriber did not start")
        client = redis.Redis.from_url(redis_url)
        client.ping()  # connected before the first timed publish
        sent: dict[int, float] = {}
        for i in range(count):
            sent[i] = time.perf_counter()
            client.publish(channel, i)
            time.sleep(gap)
        client.publish(channel, STOP)
        arrivals = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        client.close()
    finally:
        proc.wait(10)
    return [t - sent[i] for i, t in arrivals]


def main(url: str, channel: str) -> None:
    run_loop(subscribe(url, channel))


async def serve_fanout() -> None:
    """Answer every connection with an SSE stream's start, then on each `go` line on stdin write one
    frame to all of them; print the perf_counter of the first write."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []

    class Stream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(READY)  # type: ignore[attr-defined]
            transports.append(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Stream, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    seq = 0
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
        seq += 1
        frame = b"id: %d\r\nevent: task\r\ndata: {}\r\n\r\n" % seq
        t = time.perf_counter()
        for transport in transports:
            transport.write(frame)
        print(t, flush=True)
    server.close()


def fanout_server() -> None:
    raise_fd_limit()
    run_loop(serve_fanout())


def bench_fanout_floor(clients: int, rounds: int) -> list[float]:
    """Seconds until the last of `clients` load-generator streams had a frame a bare server wrote to all."""
    proc = subprocess.Popen([sys.executable, "-c", FANOUT_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]  # started with stdin and stdout PIPEs
        with LoadGen.for_connections("127.0.0.1", port, clients) as gen:
            gen.open("sse", ["/"] * clients)
            sent = []
            for r in range(rounds):
                time.sleep(0.2)  # as the gateway's rounds: each event after a pause
                proc.stdin.write("go\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                sent.append(float(proc.stdout.readline()))  # type: ignore[union-attr]
                gen.await_events("task", r + 1)
            arrivals, _ = gen.collect(timeout=0)
        last: dict[int, float] = {}
        for a in arrivals:
            last[a.seq] = max(last.get(a.seq, 0.0), a.t)
        return [last[seq] - sent[seq - 1] for seq in sorted(last)]
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(10)


async def hold_stream(
    scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]]
) -> None:
    """A bare ASGI app: every request gets an SSE stream's start, then nothing until its client leaves."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b": ready\r\n\r\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


def memory_floor_server(port: int) -> None:
    raise_fd_limit()
    uvicorn.run(hold_stream, host="127.0.0.1", port=port, log_level="warning", lifespan="off", backlog=65535, server_header=False)


def bench_memory_floor(clients: int, warm: int = 100) -> dict[str, Any]:
    """Resident memory per idle stream of bare uvicorn (hold_stream): its growth from `warm` streams
    opened and closed (first-use costs) to `clients` held, over `clients`."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", MEMORY_FLOOR_SERVER, str(port)])
    try:
        with LoadGen.for_connections("127.0.0.1", port, clients) as gen:
            deadline = time.monotonic() + 30
            while gen.open("sse", ["/"] * warm)["failed"]:  # until it listens
                gen.collect(timeout=0)
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bare uvicorn did not serve on port {port}")
                time.sleep(0.1)
            gen.collect(timeout=0)
            procstats.wait_until_idle(proc.pid)
            before = procstats.rss_kib(proc.pid)
            opened = gen.open("sse", ["/"] * clients)
            if opened["failed"]:
                raise RuntimeError(f"bare uvicorn held {opened['opened']} of {clients} streams: {opened['error']}")
            procstats.wait_until_idle(proc.pid)
            after = procstats.rss_kib(proc.pid)
            gen.collect(timeout=0)
        return {
            "connections": clients,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_connection": round((after - before) / clients, 2),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a server that ignores SIGTERM is not left behind
            proc.kill()
            proc.wait()
