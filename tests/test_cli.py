"""The `runbell` command as a user runs it: serve (and SIGTERM), emit, wait, tail, embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import decode_envelope
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit
from tests.conftest import READ_TOKEN, TOKENS, free_port

RUNBELL = [sys.executable, "-m", "runbell.service.client.cli"]


def cli_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RUNBELL_REDIS_URL": redis_url, "RUNBELL_NAMESPACE": namespace, **extra}
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(RUNBELL + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(redis_url, namespace, tmp_path):
    """`runbell serve` in a subprocess, ready to answer; yields (url, process, env)."""
    port = free_port()
    env = cli_env(
        redis_url,
        namespace,
        RUNBELL_TOKENS=TOKENS,
        RUNBELL_DATABASE_URL=f"sqlite:///{tmp_path / 'rb.db'}",
        RUNBELL_SHUTDOWN_GRACE="2",
        RUNBELL_SPOOL_DIR=str(tmp_path / "spool"),
    )
    process = subprocess.Popen(RUNBELL + ["serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("runbell serve did not become ready")
    yield url, process, env
    if process.poll() is None:
        process.kill()
        process.wait(10)


def publisher_for(redis_url: str, namespace: str, tmp_path: Path) -> Publisher:
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "pub-spool"))


def test_emit_publishes_what_the_hook_would(redis_url, namespace, tmp_path, redis_cleanup):
    env = cli_env(redis_url, namespace, RUNBELL_SPOOL_DIR=str(tmp_path / "spool"))
    done = run_cli(
        ["emit", "--dag", "d", "--run", "r", "--task", "answer", "--state", "success", "--result", '{"rows": 3}', "--result-task"], env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"seq": 1}
    entries = redis.Redis.from_url(redis_url).xrange(keys.run_keys(namespace, "d", "r").log)
    event = decode_envelope(entries[0][1][b"env"]).event
    assert (event.task_id, event.state, event.result_task, event.critical) == ("answer", "success", True, True)
    assert event.result.value == {"rows": 3} and event.source.value == "emit"


def test_emit_rejects_bad_input_clearly(redis_url, namespace, tmp_path):
    env = cli_env(redis_url, namespace, RUNBELL_SPOOL_DIR=str(tmp_path / "spool"))
    bad_state = run_cli(["emit", "--dag", "d", "--run", "r", "--state", "exploded"], env)
    bad_json = run_cli(["emit", "--dag", "d", "--run", "r", "--task", "t", "--state", "success", "--result", "{"], env)
    assert bad_state.returncode == 64 and "not a run state" in bad_state.stderr
    assert bad_json.returncode == 64 and "not JSON" in bad_json.stderr


def test_emit_progress_publishes_one_value_as_the_hook_would(redis_url, namespace, tmp_path, redis_cleanup):
    env = cli_env(redis_url, namespace, RUNBELL_SPOOL_DIR=str(tmp_path / "spool"))
    chunk = run_cli(["emit", "--dag", "d", "--run", "r", "--task", "answer", "--progress", '"Hel"'], env)
    keyed = run_cli(["emit", "--dag", "d", "--run", "r", "--task", "answer", "--progress", '{"pct": 40}', "--key", "percent"], env)
    assert chunk.returncode == 0 and keyed.returncode == 0, chunk.stderr + keyed.stderr
    assert [json.loads(done.stdout) for done in (chunk, keyed)] == [{"seq": 1}, {"seq": 2}]
    entries = redis.Redis.from_url(redis_url).xrange(keys.run_keys(namespace, "d", "r").log)
    events = [decode_envelope(fields[b"env"]).event for _, fields in entries]
    assert [(e.kind.value, e.state, e.task_id, e.source.value) for e in events] == [("progress", "running", "answer", "emit")] * 2
    assert [[(i.key, i.value) for i in e.progress.items] for e in events] == [[(None, "Hel")], [("percent", {"pct": 40})]]


@pytest.mark.parametrize(
    "args,says",
    [
        (["--progress", "1"], "needs --task"),
        (["--task", "t", "--progress", "1", "--state", "success"], "takes no --state"),
        (["--task", "t", "--progress", "{"], "not JSON"),
        (["--task", "t", "--progress", "1", "--key", "k" * 65], "at most 64 characters"),
        (["--task", "t", "--state", "running", "--key", "k"], "give --state (or --progress"),
        (["--task", "t"], "give --state"),
    ],
)
def test_emit_progress_refuses_what_it_cannot_publish(args, says, redis_url, namespace, tmp_path):
    env = cli_env(redis_url, namespace, RUNBELL_SPOOL_DIR=str(tmp_path / "spool"))
    done = run_cli(["emit", "--dag", "d", "--run", "r", *args], env)
    assert done.returncode == 64 and says in done.stderr, done.stderr


def test_emit_spools_when_redis_is_down_and_a_later_publish_flushes_in_order(namespace, tmp_path, redis_url, redis_cleanup):
    spool = str(tmp_path / "spool")
    down = cli_env("redis://127.0.0.1:1/0", namespace, RUNBELL_SPOOL_DIR=spool)
    for state in ("queued", "running"):
        done = run_cli(["emit", "--dag", "d", "--run", "sp", "--state", state], down)
        assert json.loads(done.stdout) == {"spooled": True}
    up = cli_env(redis_url, namespace, RUNBELL_SPOOL_DIR=spool)
    assert json.loads(run_cli(["emit", "--dag", "d", "--run", "sp", "--state", "success"], up).stdout) == {"seq": 3}
    entries = redis.Redis.from_url(redis_url).xrange(keys.run_keys(namespace, "d", "sp").log)
    assert [decode_envelope(f[b"env"]).event.state for _, f in entries] == ["queued", "running", "success"]


def test_serve_refuses_unsafe_settings(redis_url, namespace):
    no_tokens = run_cli(["serve"], {**cli_env(redis_url, namespace), "RUNBELL_TOKENS": ""})
    open_auth = run_cli(["serve", "--no-auth", "--host", "0.0.0.0"], cli_env(redis_url, namespace))
    assert no_tokens.returncode == 64 and "RUNBELL_TOKENS" in no_tokens.stderr
    assert open_auth.returncode == 64 and "loopback" in open_auth.stderr
    short_secret = run_cli(["serve", "--no-auth"], {**cli_env(redis_url, namespace), "RUNBELL_TOKEN_SECRET": "too-short"})
    assert short_secret.returncode == 64 and "RUNBELL_TOKEN_SECRET must be at least 32 bytes" in short_secret.stderr


def test_wait_and_tail_against_a_served_gateway(served, redis_url, namespace, tmp_path, redis_cleanup):
    url, _, env = served
    env = {**env, "RUNBELL_URL": url, "RUNBELL_TOKEN": READ_TOKEN}
    publisher = publisher_for(redis_url, namespace, tmp_path)
    emit("d", "ok", "success", task_id="answer", result_task=True, result=7, publisher=publisher)
    emit("d", "ok", "success", publisher=publisher)
    emit("d", "bad", "failed", task_id="t", critical=True, error="nope", publisher=publisher)
    emit("d", "slow", "running", publisher=publisher)

    ok = run_cli(["wait", "d", "ok"], env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["result"] == 7
    bad = run_cli(["wait", "d", "bad"], env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["failure"]["error"]["message"] == "nope"
    slow = run_cli(["wait", "d", "slow", "--timeout", "0.5"], env)
    assert slow.returncode == 2 and json.loads(slow.stdout)["status"] == "pending"

    tail = run_cli(["tail", "d", "ok"], env)
    assert tail.returncode == 0
    assert [line.split()[1] for line in tail.stdout.splitlines()] == ["task", "outcome", "run", "end"]


def test_sigterm_drains_clients_cleanly(served, redis_url, namespace):
    url, process, _ = served
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    results: dict[str, object] = {}

    def long_poll() -> None:
        results["poll"] = httpx.get(url + "/v1/dags/d/runs/term/result", params={"timeout": 30}, headers=headers, timeout=40)

    def sse() -> None:
        lines = []
        with httpx.stream("GET", url + "/v1/dags/d/runs/term/events", headers=headers, timeout=40) as response:
            for line in response.iter_lines():
                lines.append(line)
        results["sse"] = lines

    threads = [threading.Thread(target=long_poll), threading.Thread(target=sse)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # both attached?
        metrics = httpx.get(url + "/metrics", headers=headers).text
        if "runbell_waiters 1.0" in metrics and "runbell_sse_clients 1.0" in metrics:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(15)
    for thread in threads:
        thread.join(15)
    stderr = process.stderr.read()
    assert exit_code in (0, -signal.SIGTERM), stderr  # uvicorn re-raises the signal once it is done
    assert results["poll"].status_code == 202
    assert "event: shutdown" in results["sse"] and "retry: 3000" in results["sse"]
    assert "ASGI callable returned without completing response" not in stderr
    assert "Traceback" not in stderr


def test_embedded_broker_carries_publish_and_pubsub(tmp_path):
    """The development broker speaks what publish.lua and the hub need (Lua, streams, sharded pub/sub)."""
    from runbell.service.live.broker import start_embedded

    broker = start_embedded("127.0.0.1", free_port())
    try:
        client = redis.Redis.from_url(broker.url)
        pubsub = client.pubsub()
        k = keys.run_keys("emb", "d", "r")
        pubsub.ssubscribe(k.live)
        publisher = Publisher(PublisherConfig(redis_url=broker.url, namespace="emb", spool_dir=tmp_path))
        assert emit("d", "r", "success", publisher=publisher) == 1
        deadline = time.monotonic() + 5
        message = None
        while message is None or message["type"] != "smessage":
            assert time.monotonic() < deadline
            message = pubsub.get_message(timeout=0.5)
        route, _, envelope = message["data"].partition(keys.ROUTE_END)
        assert route.decode() == k.route and decode_envelope(envelope).seq == 1
        assert client.xlen(k.stream) == 1
    finally:
        broker.stop()


def test_run_reports_a_refusal_with_its_code(served):
    url, _, env = served
    from tests.conftest import TRIGGER_TOKEN

    done = run_cli(["run", "etl", "--conf", '{"x": 1}', "--url", url, "--token", TRIGGER_TOKEN], env)
    assert done.returncode == 64
    assert "airflow_not_configured" in done.stderr
    bad_conf = run_cli(["run", "etl", "--conf", "{", "--url", url], env)
    assert bad_conf.returncode == 64 and "not JSON" in bad_conf.stderr


async def test_run_unpauses_a_paused_dag_only_when_asked(gateway_factory, stand_in_airflow):
    import asyncio

    from tests.conftest import TRIGGER_TOKEN

    stand_in_airflow.dags["sleepy"] = {"dag_id": "sleepy", "is_paused": True}
    gateway = await gateway_factory(airflow_url=stand_in_airflow.url)
    env = {**os.environ, "RUNBELL_URL": gateway.url, "RUNBELL_TOKEN": TRIGGER_TOKEN}

    refused = await asyncio.to_thread(run_cli, ["run", "sleepy", "--timeout", "1"], env)
    assert refused.returncode == 64 and "dag_paused" in refused.stderr and "--unpause" in refused.stderr
    assert stand_in_airflow.posts == [] and stand_in_airflow.dags["sleepy"]["is_paused"] is True

    unpaused = await asyncio.to_thread(run_cli, ["run", "sleepy", "--timeout", "1", "--unpause"], env)
    assert unpaused.returncode == 2, unpaused.stderr  # triggered, and still pending at the timeout
    assert json.loads(unpaused.stdout)["status"] == "pending"
    assert stand_in_airflow.dags["sleepy"]["is_paused"] is False and len(stand_in_airflow.posts) == 1


def test_the_parser_loads_the_settings_model_only_for_serve():
    """`runbell emit` runs on a hook-only install, which lacks what the settings model imports."""
    probe = (
        "import sys; from runbell.service.client import cli; "
        "cli.build_parser().parse_args(['emit', '--dag', 'd', '--run', 'r', '--state', 'queued']); "
        "assert 'runbell.service.settings' not in sys.modules and 'sqlalchemy' not in sys.modules; "
        "cli.build_parser().parse_args(['serve', '--no-recorder']); assert 'runbell.service.settings' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
