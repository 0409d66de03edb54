"""The README's shell snippets and Python blocks, run as written against a real `runbell serve`.

Only the address differs: the gateway of a test listens on a free port, not 8080, so
http://127.0.0.1:8080 is replaced by its URL (and `runbell` finds it through RUNBELL_URL). The
Airflow DAG block is loaded by Airflow itself in tests/airflow/test_readme.py, the EventSource block
runs in Chromium in tests/browser/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import Event, envelope_json
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit, emit_asset
from tests.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS
from tests.readme_blocks import code_blocks, commands

README_URL = "http://127.0.0.1:8080"
REPO = Path(__file__).resolve().parent.parent
RUN_ID = "manual__2026-05-01T12:00:00+00:00_readme01"
ASSET = "s3://lake/orders"


def block_with(lang: str, text: str) -> list[str]:
    (block,) = [b for b in code_blocks(lang) if text in b]
    return commands(block) if lang == "sh" else [block]


@pytest.fixture
def shell(served_gateway, redis_url, namespace, tmp_path):
    """Runs a README command with bash in the environment its snippets assume; returns (exit code, stdout)."""
    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS, RUNBELL_WEBHOOK_ALLOWED_HOSTS="hooks.example.com")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the `runbell` of this venv
        "TOKEN": READ_TOKEN,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "RUN_ID": RUN_ID,
        "RUNBELL_URL": gateway.url,
        "RUNBELL_REDIS_URL": redis_url,
        "RUNBELL_NAMESPACE": namespace,
        "RUNBELL_SPOOL_DIR": str(tmp_path / "emit-spool"),
    }

    def run(command: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
        assert README_URL in command or command.startswith("runbell "), command
        argv = ["bash", "-c", command.replace(README_URL, gateway.url)]
        if popen:
            return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    run.gateway = gateway
    return run


@pytest.fixture
def publisher(redis_url, namespace, tmp_path):
    return Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "pub-spool"))


def test_the_quickstart_snippets_emit_then_wait_and_tail(shell):
    emits = block_with("sh", "runbell emit")
    assert len(emits) == 3
    for seq, command in enumerate(emits, 1):
        done = shell(command)
        assert (done.returncode, json.loads(done.stdout)) == (0, {"seq": seq}), done.stderr

    curl, wait, tail = block_with("sh", "runbell wait")
    done = shell(curl)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert (outcome["status"], outcome["result"], outcome["run_id"], outcome["decided_by"]) == (
        "success",
        {"answer": 42},
        RUN_ID,
        "result_task",
    )
    done = shell(wait)
    assert done.returncode == 0 and json.loads(done.stdout)["result"] == {"answer": 42}, done.stderr
    done = shell(tail)
    assert done.returncode == 0, done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines()] == ["run", "task", "outcome", "run", "end"]


def test_the_webhook_subscription_snippet(shell):
    (subscribe,) = block_with("sh", "/v1/webhooks")
    done = shell(subscribe)
    assert done.returncode == 0, done.stderr
    endpoint = json.loads(done.stdout)
    assert endpoint["id"].startswith("ep_") and endpoint["secret"].startswith("whsec_"), endpoint
    assert (endpoint["url"], endpoint["dag_ids"], endpoint["kinds"], endpoint["enabled"]) == (
        "https://hooks.example.com/runbell",
        ["answer_question"],
        ["outcome"],
        True,
    )


def test_the_runs_listing_snippet(shell, publisher):
    emit("etl", "broken", "failed", publisher=publisher)
    emit("etl", "fine", "success", publisher=publisher)
    (listing,) = block_with("sh", "/v1/runs?")
    deadline = time.monotonic() + 20
    while True:  # the recorder stores the runs shortly after they are published
        done = shell(listing)
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        if body["runs"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r["dag_id"], r["run_id"], r["state"]) for r in body["runs"]] == [("etl", "broken", "failed")]
    assert body["next_cursor"] is None


def test_the_asset_snippets(shell, publisher):
    next_update, after_seven = block_with("sh", "/v1/assets/")
    waiting = shell(next_update, popen=True)
    published = 0
    deadline = time.monotonic() + 30
    while waiting.poll() is None and time.monotonic() < deadline:  # until the waiter, once attached, hears one
        published += 1
        emit_asset(ASSET, uri=ASSET, extra={"rows": published}, publisher=publisher)
        time.sleep(0.1)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    event = json.loads(out)
    assert (event["kind"], event["asset"]["name"]) == ("asset", ASSET) and 1 <= event["seq"] <= published
    while published < 8:
        published += 1
        emit_asset(ASSET, uri=ASSET, extra={"rows": published}, publisher=publisher)
    done = shell(after_seven)
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["seq"], json.loads(done.stdout)["extra"]) == (8, {"rows": 8})


def test_the_dead_letters_snippet(shell, redis_url, namespace):
    """An entry no store can hold (seq 2**63: no event, as the schema reads it) is dead-lettered; it is
    listed, and refused again."""
    raw = envelope_json(2**63, Event(kind="run", dag_id="etl", run_id="poison", state="running").to_json())
    client = redis.Redis.from_url(redis_url)
    client.xadd(keys.global_stream(namespace), {"env": raw})
    client.close()
    listing, redrive = block_with("sh", "runbell dead-letters")
    deadline = time.monotonic() + 20
    while True:  # the recorder dead-letters it shortly after
        done = shell(listing)
        assert done.returncode == 0, done.stderr
        letters = json.loads(done.stdout)["dead_letters"]
        if letters or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(d["reason"], d["run_id"], d["envelope"]["seq"]) for d in letters] == [("schema", None, 2**63)]
    done = shell(redrive)
    assert (done.returncode, json.loads(done.stdout)) == (1, {"recorded": 0, "failed": 1, "remaining": 1}), done.stderr


def test_the_webhook_verification_block_accepts_a_signed_delivery():
    from runbell.service.webhooks.signing import new_secret, signature_header

    (block,) = block_with("python", "standardwebhooks")
    secret = new_secret()
    raw_body = b'{"type": "run.outcome", "data": {"status": "success"}}'
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signature_header([secret], "msg_1", now, raw_body),
    }
    names = {"secret": secret, "raw_body": raw_body, "request": SimpleNamespace(headers=headers)}
    exec(compile(block, "README.md", "exec"), names)
    assert names["payload"] == json.loads(raw_body)
    from standardwebhooks import WebhookVerificationError

    names["raw_body"] = raw_body.replace(b"success", b"failed")
    with pytest.raises(WebhookVerificationError):
        exec(compile(block, "README.md", "exec"), names)


async def test_the_python_client_block(gateway_factory, stand_in_airflow, capsys):
    """The client block, against a gateway whose (stand-in) Airflow runs answer_question: each run it
    triggers gets its result task's success and then its end, as the hook would publish them."""
    import asyncio

    from tests.conftest import TRIGGER_TOKEN

    (block,) = block_with("python", "RunbellClient(")
    stand_in_airflow.dags["answer_question"] = {"dag_id": "answer_question", "is_paused": False}
    gateway = await gateway_factory(airflow_url=stand_in_airflow.url)
    publisher = gateway.publisher()
    stop = threading.Event()

    def airflow_runs_them() -> None:
        done: set[str] = set()
        while not stop.is_set():
            for _, run_id in list(stand_in_airflow.runs):
                if run_id not in done:
                    done.add(run_id)
                    emit(
                        "answer_question", run_id, "success", task_id="answer", result_task=True, result={"answer": 42}, publisher=publisher
                    )
                    emit("answer_question", run_id, "success", publisher=publisher)
            time.sleep(0.05)

    names = {"TOKEN": TRIGGER_TOKEN}
    runner = threading.Thread(target=airflow_runs_them, daemon=True)
    runner.start()
    try:
        code = compile(block.replace(README_URL, gateway.url), "README.md", "exec")
        await asyncio.wait_for(asyncio.to_thread(exec, code, names), 60)
    finally:
        stop.set()
        runner.join(5)
    assert names["answer"] == {"answer": 42} and len(stand_in_airflow.runs) == 2
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert printed[-2:] == ["run", "end"] and "outcome" in printed


def test_every_shell_and_python_block_is_run_by_a_test():
    """A block added to the README without a test here (or in tests/airflow) fails this."""
    tested = {
        "runbell emit",
        "runbell wait",
        "/v1/webhooks",
        "/v1/runs?",
        "/v1/assets/",
        "runbell dead-letters",
        "deploy/redis/users.acl",  # tests/test_redis_acl.py
    }
    assert all(sum(text in block for text in tested) >= 1 for block in code_blocks("sh")), code_blocks("sh")
    tested_python = {"@dag", "standardwebhooks", "RunbellClient("}
    assert all(sum(text in block for text in tested_python) == 1 for block in code_blocks("python"))
    assert len(code_blocks("sh")) == 7 and len(code_blocks("python")) == 3
    assert len(code_blocks("js")) == 1  # run in Chromium by tests/browser/test_dashboard_browser.py
    assert not code_blocks("bash") and not code_blocks("")  # unlabelled fences would escape the check


def test_the_files_and_functions_the_readme_names_exist():
    import importlib
    import re

    readme = (REPO / "README.md").read_text()
    named = re.findall(r"[`(]((?:deploy|listeners|service|tests)(?:/[\w.-]+)+)[`)]", readme)
    # source files, scripts, folders and the screenshot; generated ones (openapi.json, artifacts) come from commands
    paths = {p for p in named if Path(p).suffix in ("", ".py", ".lua", ".png")}
    assert {"deploy/serve", "listeners/bus/schema.py", "tests/run", "tests/browser/dashboard.png"} <= paths  # the pattern still finds them
    assert sorted(p for p in paths if not (REPO / p).exists()) == []
    module, _, name = "runbell.service.core.outcome.decide".rpartition(".")
    assert "`runbell.service.core.outcome.decide`" in readme and callable(getattr(importlib.import_module(module), name))
