"""The gateway's side of the spool: POST /v1/events answers 202 only once the event is on disk (503
otherwise), and the gateway sends its namespace's spool at start-up and periodically, whoever spooled
it (a gateway before a restart, `runbell emit`), with no new publish. Redis is a redis-server of the
test's own, killed and started again on the same port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import decode_envelope
from tests.conftest import PUBLISH_TOKEN
from tests.test_spool import unwritable_dir

DAG = "spooled"
WAIT = 30.0  # the bound on waits that succeed in well under a second when it works
EVENT = {"kind": "run", "dag_id": DAG, "run_id": "r1", "state": "running"}


def logged_states(redis_url: str, namespace: str, run_id: str) -> list[str]:
    with redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as client:
        entries = client.xrange(keys.run_keys(namespace, DAG, run_id).log)
    return [decode_envelope(fields[b"env"]).event.state for _, fields in entries]


async def until(condition, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


def emit_with_redis_down(namespace: str, spool_dir: str, run_id: str, state: str) -> None:
    """`runbell emit` in a process of its own that finds Redis down, spools, and exits."""
    env = {"RUNBELL_REDIS_URL": "redis://127.0.0.1:1/0", "RUNBELL_NAMESPACE": namespace, "RUNBELL_SPOOL_DIR": spool_dir}
    done = subprocess.run(
        [sys.executable, "-m", "runbell.service.client.cli", "emit", "--dag", DAG, "--run", run_id, "--state", state],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and '"spooled": true' in done.stdout, done.stderr


async def test_an_event_the_spool_cannot_keep_is_refused_with_503_not_accepted_with_202(gateway_factory, own_redis, tmp_path, monkeypatch):
    spool_dir = unwritable_dir(tmp_path)  # even root cannot make it: its parent is a regular file
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", str(spool_dir))
    gateway = await gateway_factory(redis_url=own_redis.url)
    own_redis.kill()
    async with gateway.client(PUBLISH_TOKEN) as client:
        refused = await client.post("/v1/events", json=EVENT)
    assert refused.status_code == 503
    body = refused.json()
    assert body["error"] == "spool_unavailable"
    assert str(spool_dir) in body["message"] and "Not a directory" in body["message"]
    assert refused.headers["retry-after"].isdigit()


async def test_an_event_spooled_is_on_disk_before_202_and_sent_when_redis_is_back(
    gateway_factory, own_redis, namespace, tmp_path, monkeypatch
):
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", str(tmp_path / "spool"))
    gateway = await gateway_factory(redis_url=own_redis.url, spool_flush_interval=0.2)
    own_redis.kill()
    async with gateway.client(PUBLISH_TOKEN) as client:
        spooled = await client.post("/v1/events", json=EVENT)
    assert spooled.status_code == 202 and spooled.json()["spooled"] is True
    assert len(gateway.app.state.publisher.spool.pending()) == 1
    own_redis.start()  # the same port and data
    await until(lambda: logged_states(own_redis.url, namespace, "r1") == ["running"])


async def test_events_spooled_by_another_process_are_sent_periodically_once_redis_is_back(
    gateway_factory, own_redis, namespace, tmp_path, monkeypatch
):
    """Nothing is published after Redis returns, and the process that spooled is gone: the gateway's
    loop, not a next publish, sends them."""
    spool_dir = str(tmp_path / "spool")
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", spool_dir)
    await gateway_factory(redis_url=own_redis.url, spool_flush_interval=0.2)
    own_redis.kill()
    for state in ("queued", "running"):
        await asyncio.to_thread(emit_with_redis_down, namespace, spool_dir, "r2", state)
    await asyncio.sleep(0.5)  # a few of the loop's rounds against the dead Redis: nothing is lost by them
    own_redis.start()
    await until(lambda: logged_states(own_redis.url, namespace, "r2") == ["queued", "running"])


async def test_events_spooled_before_a_restart_are_sent_at_start_up_without_a_new_publish(
    gateway_factory, redis_url, namespace, tmp_path, monkeypatch
):
    spool_dir = str(tmp_path / "spool")
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", spool_dir)
    for state in ("queued", "running", "success"):
        await asyncio.to_thread(emit_with_redis_down, namespace, spool_dir, "r3", state)
    assert logged_states(redis_url, namespace, "r3") == []
    await gateway_factory(spool_flush_interval=3600)  # only the start-up flush can send them in time
    await until(lambda: logged_states(redis_url, namespace, "r3") == ["queued", "running", "success"])


@pytest.mark.parametrize("flushes_first", ["mine", "theirs"])
async def test_a_gateway_never_sends_another_namespaces_spooled_events(
    gateway_factory, redis_url, namespace, tmp_path, monkeypatch, flushes_first
):
    spool_dir = str(tmp_path / "spool")
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", spool_dir)
    other = namespace + "-other"
    await asyncio.to_thread(emit_with_redis_down, other, spool_dir, "theirs", "running")
    await asyncio.to_thread(emit_with_redis_down, namespace, spool_dir, "mine", "running")
    try:
        if flushes_first == "theirs":
            await gateway_factory(namespace=other, spool_flush_interval=3600)
            await until(lambda: logged_states(redis_url, other, "theirs") == ["running"])
        await gateway_factory(spool_flush_interval=3600)
        await until(lambda: logged_states(redis_url, namespace, "mine") == ["running"])
        await asyncio.sleep(0.5)
        assert logged_states(redis_url, namespace, "theirs") == []
        assert logged_states(redis_url, other, "mine") == []
    finally:
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{other}:*"):
                client.delete(key)
