"""deploy/redis/users.acl against a real redis-server started here: the hook publishes with its user and
the gateway delivers with its own; neither can read other keys, run other commands or reach another
namespace. The ACL file is rendered by the README's own command (the "Redis ACL" section)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, Heartbeat
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import PUBLISH_LUA, Publisher, emit, emit_asset
from tests.conftest import ADMIN_TOKEN, READ_TOKEN, TRIGGER_TOKEN, free_port
from tests.engines import RedisServer
from tests.readme_blocks import code_blocks, commands
from tests.test_gateway import until, waiting

REPO = Path(__file__).resolve().parent.parent
ACL_TEMPLATE = "deploy/redis/users.acl"
ACL_TARGET = "/etc/redis/users.acl"  # where the README's command writes it
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOOK_PASSWORD, GATEWAY_PASSWORD = "hook p@ss/word:1", "gateway-secret-2"  # a URL must percent-encode the first
ADMIN = "user rbtest-admin on >admin-pw ~* &* +@all"  # the test's own operator, to look at what landed


@dataclass
class AclRedis:
    server: RedisServer
    namespace: str

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, user: str, password: str) -> str:
        return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/0"

    @property
    def hook_url(self) -> str:
        return self.url("runbell-hook", HOOK_PASSWORD)

    @property
    def gateway_url(self) -> str:
        return self.url("runbell-gateway", GATEWAY_PASSWORD)

    def admin(self) -> redis.Redis:
        return self.server.client(decode_responses=False)


def render_acl(namespace: str, target: Path) -> str:
    """The README's render command, run as written (only its output path differs)."""
    (block,) = [b for b in code_blocks("sh") if ACL_TEMPLATE in b]
    (command,) = commands(block)[:1]
    env = {**os.environ, "RUNBELL_NAMESPACE": namespace, "HOOK_PASSWORD": HOOK_PASSWORD, "GATEWAY_PASSWORD": GATEWAY_PASSWORD}
    assert ACL_TARGET in command
    subprocess.run(["bash", "-c", command.replace(ACL_TARGET, str(target))], cwd=REPO, env=env, check=True, timeout=30)
    return target.read_text()


@pytest.fixture
def acl_redis(namespace, tmp_path):
    """A redis-server of this test's own on a free port, with the rendered ACL file (plus an admin user)."""
    acl_file = tmp_path / "users.acl"
    rendered = render_acl(namespace, acl_file)
    assert "HOOK_PASSWORD_SHA256" not in rendered and f"~{namespace}:*" in rendered and "~runbell:" not in rendered
    acl_file.write_text(rendered + ADMIN + "\n")
    server = RedisServer(
        tmp_path / "redis", persistent=False, args=["--aclfile", str(acl_file)], username="rbtest-admin", password="admin-pw"
    )
    server.start()
    try:
        yield AclRedis(server, namespace)
    finally:
        server.ensure_stopped()  # by its PID: this test's server only


def hook_publisher(server: AclRedis, tmp_path: Path, namespace: str | None = None) -> Publisher:
    config = PublisherConfig(redis_url=server.hook_url, namespace=namespace or server.namespace, spool_dir=tmp_path / "hook-spool")
    return Publisher(config)


async def test_the_hook_publishes_and_the_gateway_delivers_with_their_own_users(acl_redis, gateway_factory, stand_in_airflow, tmp_path):
    gateway = await gateway_factory(redis_url=acl_redis.gateway_url, airflow_url=stand_in_airflow.url)
    hook = hook_publisher(acl_redis, tmp_path)
    async with gateway.client(READ_TOKEN) as reader:
        # SSUBSCRIBE allowed, and what readiness asks of the recorder's groups (XINFO GROUPS, XPENDING)
        await until(lambda: gateway.app.state.readiness.report().ready)
        assert (await reader.get("/readyz")).status_code == 200
        waiter = asyncio.create_task(reader.get("/v1/dags/etl/runs/r1/result", params={"timeout": 30}))
        await until(waiting(gateway))
        seqs = [
            await asyncio.to_thread(emit, "etl", "r1", "running", publisher=hook),
            await asyncio.to_thread(emit, "etl", "r1", "success", task_id="answer", result_task=True, result={"a": 42}, publisher=hook),
        ]
        assert seqs == [1, 2]  # published, not spooled
        answer = await waiter
        assert answer.status_code == 200 and answer.json()["result"] == {"a": 42}
        # A Metaflow step's heartbeat: XADD MAXLEN ~ to the partition stream (then recorded, below).
        assert await asyncio.to_thread(hook.heartbeat, Heartbeat(dag_id="etl", run_id="r1", ts=time.time() + 60))
        # The spool's flush: a batch through a pipeline (EVALSHA each).
        for state in ("running", "success"):
            hook.spool.append(Event(kind=EventKind.RUN, dag_id="etl", run_id="r2", state=state).to_json())
        assert await asyncio.to_thread(hook.flush) == 2 and hook.spool.is_empty()
        events = await reader.get("/v1/dags/etl/runs/r2/events")  # the replay log (XRANGE), to the end
        assert events.status_code == 200 and events.text.count("event: run") == 2 and "event: end" in events.text
        assert await asyncio.to_thread(emit_asset, "s3://lake/orders", publisher=hook) == 1
        asset = await reader.get("/v1/assets/s3://lake/orders/next", params={"after": 0, "timeout": 5})  # GET seq, XRANGE
        assert asset.status_code == 200 and asset.json()["seq"] == 1
    async with gateway.client(ADMIN_TOKEN) as admin, gateway.client(TRIGGER_TOKEN) as trigger:
        # The gateway's own publishes, and an Idempotency-Key (SET NX, GET) kept in Redis.
        published = await admin.post("/v1/events", content=Event(kind=EventKind.RUN, dag_id="etl", run_id="r3", state="running").to_json())
        assert published.status_code == 201
        first = await trigger.post("/v1/dags/etl/runs", params={"wait": 0}, headers={"Idempotency-Key": "k1"})
        again = await trigger.post("/v1/dags/etl/runs", params={"wait": 0}, headers={"Idempotency-Key": "k1"})
        assert first.status_code == again.status_code == 202 and first.json()["run_id"] == again.json()["run_id"]
    store = gateway.app.state.store  # the recorder's consumer group (XGROUP CREATE, XREADGROUP, XACK)
    for run_id in ("r1", "r2", "r3"):
        await until_stored(store, "etl", run_id)
    await until_stored(store, "etl", "r1", heartbeat=True)
    log = acl_redis.admin().execute_command("ACL", "LOG")
    assert log == [], log  # nothing either side sent was refused


async def until_stored(store, dag_id: str, run_id: str, heartbeat: bool = False) -> None:
    """Until the run is recorded (and, with heartbeat, a heartbeat of it too)."""
    for _ in range(400):
        run = await store.get_run(dag_id, run_id)
        if run is not None and (run.heartbeat_at is not None or not heartbeat):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{dag_id}/{run_id} was not recorded" + (" with a heartbeat" if heartbeat else ""))


def test_the_hook_user_reads_nothing_runs_nothing_else_and_stays_in_its_namespace(acl_redis, tmp_path):
    ns = acl_redis.namespace
    admin = acl_redis.admin()
    admin.set(keys.idempotency_key(ns, "k"), "the gateway's")
    admin.set("foreign:secret", "not runbell's")
    assert hook_publisher(acl_redis, tmp_path).publish(Event(kind=EventKind.RUN, dag_id="d", run_id="r", state="running")) == 1
    # publish.lua may read INFO's server section (the writer of a run: a new epoch when it changes).
    assert admin.get(keys.run_keys(ns, "d", "r").writer).decode() == admin.info("server")["run_id"]
    hook = redis.Redis.from_url(acl_redis.hook_url)
    refused = {
        "GET a gateway key": lambda: hook.get(keys.idempotency_key(ns, "k")),
        "GET a foreign key": lambda: hook.get("foreign:secret"),
        "XRANGE a partition stream": lambda: hook.xrange(keys.run_keys(ns, "d", "r").stream),
        "XRANGE a run's log": lambda: hook.xrange(keys.run_keys(ns, "d", "r").log),
        "XREADGROUP": lambda: hook.xreadgroup("recorder", "c", {keys.run_keys(ns, "d", "r").stream: ">"}),
        "SSUBSCRIBE": lambda: hook.execute_command("SSUBSCRIBE", keys.run_keys(ns, "d", "r").live),
        "SUBSCRIBE": lambda: hook.execute_command("SUBSCRIBE", keys.run_keys(ns, "d", "r").live),
        "PUBLISH (not sharded)": lambda: hook.publish(keys.run_keys(ns, "d", "r").live, "{}"),
        "XLEN the pre-partition stream": lambda: hook.xlen(keys.global_stream(ns)),
        "KEYS": lambda: hook.keys("*"),
        "SCAN": lambda: hook.scan(0),
        "FLUSHALL": lambda: hook.flushall(),
        "CONFIG GET": lambda: hook.config_get("*"),
        "DEL": lambda: hook.delete(keys.run_keys(ns, "d", "r").stream),
        "EVAL": lambda: hook.eval("return 1", 0),
        "SCRIPT FLUSH": lambda: hook.script_flush(),
        "ACL": lambda: hook.acl_list(),
        "INFO": lambda: hook.info(),  # every section: keyspace, clients, ... (only "server" is granted)
        "INFO keyspace": lambda: hook.info("keyspace"),
        "INFO clients": lambda: hook.info("clients"),
        "XADD another namespace": lambda: hook.xadd("other:events", {"env": "{}"}),
        "SPUBLISH another namespace": lambda: hook.spublish(keys.run_keys("other", "d", "r").live, "{}"),
    }
    outcomes = {}
    for what, call in refused.items():
        try:
            call()
            outcomes[what] = "allowed"
        except redis.exceptions.NoPermissionError:
            outcomes[what] = "NOPERM"
    assert outcomes == dict.fromkeys(refused, "NOPERM")

    # publish.lua itself cannot be turned on another namespace: its keys, nor its channel.
    sha = hook.script_load(PUBLISH_LUA)
    other = keys.run_keys("other", "d", "r")
    with pytest.raises(redis.exceptions.NoPermissionError):
        hook.evalsha(
            sha,
            6,
            other.seq,
            other.log,
            other.ids,
            other.epoch,
            other.writer,
            other.stream,
            "id",
            "{}",
            60,
            other.live,
            0,
            100,
            other.route,
        )
    mine = keys.run_keys(ns, "d", "r2")
    with pytest.raises(redis.exceptions.ResponseError, match="channel"):
        hook.evalsha(
            sha, 6, mine.seq, mine.log, mine.ids, mine.epoch, mine.writer, mine.stream, "id", "{}", 60, other.live, 0, 100, mine.route
        )
    # The real publisher of another namespace with the hook's user: refused, so it spools; nothing lands.
    elsewhere = hook_publisher(acl_redis, tmp_path / "elsewhere", namespace="other")
    assert elsewhere.publish(Event(kind=EventKind.RUN, dag_id="d", run_id="r", state="running")) is None
    assert len(elsewhere.spool.pending()) == 1
    for path in elsewhere.spool.pending():  # its retry thread then stops
        path.unlink()
    assert admin.keys("other:*") == [] and admin.keys("foreign:*") == [b"foreign:secret"]
    assert admin.get(keys.idempotency_key(ns, "k")) == b"the gateway's"

    # Without credentials, or with a wrong password: nothing.
    for url in (f"redis://127.0.0.1:{acl_redis.port}/0", acl_redis.url("runbell-hook", "wrong")):
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()


def test_the_gateway_user_stays_in_its_namespace_and_runs_no_admin_commands(acl_redis):
    gateway = redis.Redis.from_url(acl_redis.gateway_url)
    acl_redis.admin().set("foreign:secret", "x")
    for call in (
        lambda: gateway.get("foreign:secret"),
        lambda: gateway.set("other:idem:k", "x"),
        lambda: gateway.keys("*"),
        lambda: gateway.flushall(),
        lambda: gateway.config_set("appendonly", "no"),
        lambda: gateway.execute_command("SHUTDOWN"),
        lambda: gateway.acl_setuser("x"),
        lambda: gateway.eval("return 1", 0),
        lambda: gateway.info("keyspace"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()


def test_publish_lua_declares_every_key_it_touches():
    """Redis checks a script's declared KEYS before running it; every redis.call's key is one of them
    (SPUBLISH's first argument is a channel, ARGV[4], which the ACL's & patterns govern)."""
    calls = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", PUBLISH_LUA)
    assert len(calls) >= 10
    undeclared = [(command, first) for command, first in calls if not re.fullmatch(r"KEYS\[\d\]", first.strip())]
    assert undeclared == [("SPUBLISH", "ARGV[4]")]


def test_the_acl_file_as_shipped_does_not_start(tmp_path):
    """Unrendered, its password placeholders are not SHA-256 digests: Redis refuses the file."""
    done = subprocess.run(
        [REDIS_SERVER, "--port", str(free_port()), "--aclfile", str(REPO / ACL_TEMPLATE), "--save", "", "--appendonly", "no"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "password hash must be exactly 64 characters" in done.stdout + done.stderr


def test_a_password_in_the_url_is_taken_percent_decoded(acl_redis):
    assert httpx.URL(acl_redis.hook_url).password == HOOK_PASSWORD  # the URL carries user:password
    client = redis.Redis.from_url(acl_redis.hook_url)
    assert client.connection_pool.connection_kwargs["username"] == "runbell-hook"
    assert client.ping() is True
