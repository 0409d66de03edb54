"""Webhooks across gateway processes: a gateway SIGKILLed mid-delivery and restarted, and two
replicas on one database and Redis delivering each message exactly once per attempt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from runbell.service.bench import FastReceiver
from tests.conftest import ADMIN_TOKEN, TOKENS, free_port


@contextlib.asynccontextmanager
async def receiving():
    receiver = FastReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def serve(env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "runbell.service.client.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    process.kill()
    raise AssertionError("runbell serve did not become ready")


async def until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_a_gateway_killed_mid_delivery_delivers_after_restart(redis_url, namespace, tmp_path, redis_cleanup):
    port = free_port()
    env = {
        **os.environ,
        "RUNBELL_REDIS_URL": redis_url,
        "RUNBELL_NAMESPACE": namespace,
        "RUNBELL_TOKENS": TOKENS,
        "RUNBELL_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
        "RUNBELL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "RUNBELL_WEBHOOK_ATTEMPT_TIMEOUT": "1",
        "RUNBELL_SPOOL_DIR": str(tmp_path / "spool"),
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with receiving() as receiver:
        gateway = serve(env, port)
        try:
            created = httpx.post(f"http://127.0.0.1:{port}/v1/webhooks", json={"url": receiver.url}, headers=admin)
            assert created.status_code == 201, created.text
            receiver.hold.set()
            publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "pub"))
            await asyncio.to_thread(emit, "etl", "killed", "success", publisher=publisher)
            await until(lambda: receiver.hits)  # the delivery is in progress...
            gateway.send_signal(signal.SIGKILL)  # ...when the gateway dies
            gateway.wait(10)
            receiver.hold.clear()
            gateway = serve(env, port)  # same database and Redis: its pending attempt resumes
            await until(lambda: len(receiver.hits) >= 2)
        finally:
            gateway.kill()
            gateway.wait(10)
    first, again = receiver.hits[:2]
    assert first == again and first["run_id"] == "killed"  # the same message, the same webhook-id


@pytest.mark.parametrize("replicas", [2])
async def test_two_replicas_deliver_each_message_once(gateway_factory, database_url, replicas):
    async with receiving() as receiver:
        gateways = [await gateway_factory(database_url=database_url, webhook_allowed_hosts="127.0.0.1") for _ in range(replicas)]
        async with gateways[0].client(ADMIN_TOKEN) as client:
            assert (await client.post("/v1/webhooks", json={"url": receiver.url})).status_code == 201
        publisher = gateways[0].publisher()
        runs = [f"r{i}" for i in range(30)]
        for run_id in runs:
            await asyncio.to_thread(emit, "etl", run_id, "success", publisher=publisher)
        await until(lambda: {hit["run_id"] for hit in receiver.hits} >= set(runs))
        await asyncio.sleep(0.5)  # room for a duplicate to show up, were there one
    per_id = Counter(hit["id"] for hit in receiver.hits)
    assert len(per_id) == len(runs)
    assert set(per_id.values()) == {1}
