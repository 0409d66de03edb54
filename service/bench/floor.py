"""The floor: raw Redis PUBLISH → a redis-py subscriber receives it, nothing else in between.

The subscriber runs in a process of its own (`python -c`, main()), reads as
the gateway's hub does (redis.asyncio, get_message with a timeout, uvloop) and stamps each arrival
with time.perf_counter(), which is CLOCK_MONOTONIC on Linux: the same clock in every process of the
machine, so the parent's publish time can be subtracted from it. What the gateway adds is measured
against this.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import redis
import redis.asyncio as aioredis

from service.bench.loadgen import run_loop

STOP = b"stop"
SUBSCRIBER = "import sys; from service.bench.floor import main; main(sys.argv[1], sys.argv[2])"


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
    proc = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, redis_url, channel],
                            stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the floor subscriber did not start")
        client = redis.Redis.from_url(redis_url)
        client.ping()  # connected before the first timed publish
        sent: dict[int, float] = {}
        for i in range(count):
            sent[i] = time.perf_counter()
            client.publish(channel, i)
            time.sleep(gap)
        client.publish(channel, STOP)
        arrivals = json.loads(proc.stdout.readline())
        client.close()
    finally:
        proc.wait(10)
    return [t - sent[i] for i, t in arrivals]


def main(url: str, channel: str) -> None:
    run_loop(subscribe(url, channel))
