"""Shared fixtures: the real Redis and PostgreSQL of the machine, each test isolated.

Where a server is not reachable, tests fall back to fakeredis / SQLite on a laptop, but under
CI=true a missing server fails the run instead: CI always proves the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import itertools
import os
import signal
import socket
import sys
import uuid
from urllib.parse import urlparse

import pytest

REDIS_URL = os.environ.get("RUNBELL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("RUNBELL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# No test (its set-up and tear-down included) runs longer: one that hangs fails, showing where, and
# the run goes on rather than spending CI's whole budget on it. The slowest test takes about 3 minutes.
TEST_TIME_LIMIT = float(os.environ.get("RUNBELL_TEST_TIME_LIMIT", "600"))


class TimeLimitExceeded(Exception):
    """Raised in a test that ran past TEST_TIME_LIMIT."""


def _time_is_up(signum: int, frame: object) -> None:
    """Show every thread's stack and every asyncio task's (a hang in an event loop shows only the
    loop's select otherwise), then fail the test where it stands."""
    sys.stderr.write(f"\n*** the test ran past its {TEST_TIME_LIMIT:.0f} s; threads:\n")
    faulthandler.dump_traceback(sys.stderr)
    loop = asyncio._get_running_loop()
    for task in asyncio.all_tasks(loop) if loop is not None else ():
        sys.stderr.write(f"--- task {task.get_name()}, awaiting (outermost first):\n")
        awaiting = task.get_coro()
        while awaiting is not None:  # each coroutine's await, down to the future it waits on
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is not None:
                sys.stderr.write(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
    raise TimeLimitExceeded(f"the test ran past its {TEST_TIME_LIMIT:.0f} s (RUNBELL_TEST_TIME_LIMIT); stacks above")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    previous = signal.signal(signal.SIGALRM, _time_is_up)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=0.5):
            return True
    except OSError:
        return False


def require_server(url: str, what: str) -> bool:
    """True when the server answers. Without it: fail under CI, else tell the caller to fall back."""
    if reachable(url):
        return True
    if IN_CI:
        pytest.fail(f"{what} at {url} is not reachable and CI=true forbids falling back", pytrace=False)
    return False


@pytest.fixture
def namespace() -> str:
    """A key prefix of this test's own."""
    return f"rbtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url() -> str:
    """URL of a Redis for this test: the machine's, or an in-process fake server off CI."""
    if require_server(REDIS_URL, "Redis"):
        yield REDIS_URL
        return
    import threading

    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"redis://{host}:{port}/0"
    server.shutdown()


@pytest.fixture
async def redis_cleanup(redis_url, namespace):
    """Deletes the test's keys afterwards."""
    import redis.asyncio as aioredis

    yield
    client = aioredis.Redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request, tmp_path):
    """An empty database of this test's own, once on PostgreSQL and once on SQLite."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'runbell.db'}"
        return
    yield from scratch_postgres("the SQLite variant covers the store")


@pytest.fixture
def postgres_url():
    """An empty PostgreSQL database of this test's own, for several gateway processes sharing one store."""
    yield from scratch_postgres("processes sharing a store need it")


def scratch_postgres(why_skip: str):
    """Yields the postgresql+asyncpg:// URL of a database made on the test server, dropped afterwards
    (off CI, without the server: the test is skipped, saying why_skip)."""
    import asyncio

    import asyncpg

    if not require_server(POSTGRES_URL, "PostgreSQL"):
        pytest.skip(f"PostgreSQL not reachable (off CI): {why_skip}")
    name = f"rbtest_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{urlparse(POSTGRES_URL).netloc}/{name}"
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def store(database_url):
    """A started store on the test's own database (PostgreSQL and SQLite)."""
    from runbell.service.store.store import Store

    store = Store(database_url)
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def stand_in_airflow():
    """A stand-in for Airflow's REST API on a free loopback port (tests/stand_in_airflow.py)."""
    from tests.stand_in_airflow import StandInAirflow, serve_stand_in

    async with serve_stand_in(StandInAirflow()) as stand_in:
        yield stand_in


READ_TOKEN, PUBLISH_TOKEN, ADMIN_TOKEN = "test-read-token", "test-publish-token", "test-admin-token"
TRIGGER_TOKEN = "test-trigger-token"
TOKENS = f"{READ_TOKEN}:read,{PUBLISH_TOKEN}:publish,{TRIGGER_TOKEN}:trigger,{ADMIN_TOKEN}:admin"


HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this run handed out before (the kernel may offer
    a closed port again at once, and an engine takes several before starting any process)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in HANDED_OUT_PORTS:
            HANDED_OUT_PORTS.add(port)
            return port


class RunningGateway:
    """A gateway served by uvicorn inside the test's event loop, on a free loopback port."""

    def __init__(self, app, server, url: str, namespace: str, redis_url: str):
        self.app, self.server, self.url, self.namespace, self.redis_url = app, server, url, namespace, redis_url

    def client(self, token: str | None = READ_TOKEN, **kw):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **{"timeout": 30, **kw})

    def publisher(self):
        import tempfile
        from pathlib import Path

        from runbell.listeners.config import PublisherConfig
        from runbell.listeners.publisher import Publisher

        return Publisher(PublisherConfig(redis_url=self.redis_url, namespace=self.namespace, spool_dir=Path(tempfile.mkdtemp())))


@pytest.fixture
async def gateway_factory(redis_url, namespace, tmp_path, redis_cleanup):
    """Start gateways with settings overrides; all are stopped at the end of the test."""
    import asyncio

    import uvicorn

    from runbell.service.http.app import create_app
    from runbell.service.settings import Settings

    started = []

    async def start(**overrides) -> RunningGateway:
        port = free_port()
        values = dict(
            host="127.0.0.1",
            port=port,
            redis_url=redis_url,
            namespace=namespace,
            tokens=TOKENS,
            database_url=f"sqlite:///{tmp_path / f'gw-{port}.db'}",
            shutdown_grace=1.0,
        )
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # pytest owns the signals
        task = asyncio.create_task(server.serve())
        for _ in range(200):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        assert server.started, "gateway did not start"
        gateway = RunningGateway(app, server, f"http://127.0.0.1:{port}", namespace, redis_url)
        started.append((server, task))
        return gateway

    yield start
    for server, _task in started:
        if hasattr(server.config.app.state, "hub"):
            server.config.app.state.hub.drain()
        server.should_exit = True
    for _server, task in started:
        try:
            await asyncio.wait_for(task, 10)
        except Exception:
            task.cancel()


@pytest.fixture
async def gateway(gateway_factory):
    return await gateway_factory()


@pytest.fixture
def served_gateway(redis_url, namespace, tmp_path, redis_cleanup):
    """A factory (tests.served.ServedGateways): served_gateway(auth=False, **extra_env) starts `runbell
    serve` in its own process on a free port, ready; served_gateway.many(n, **extra_env) starts n side by
    side. Each is a tests.served.ServedGateway: kill(), stop(sig), hang(), resume(), restart(sig) on its
    port, wait_ready()."""
    import os

    from tests.served import ServedGateways

    env = {
        **os.environ,
        "RUNBELL_REDIS_URL": redis_url,
        "RUNBELL_NAMESPACE": namespace,
        "RUNBELL_DATABASE_URL": f"sqlite:///{tmp_path / 'rb.db'}",
        "RUNBELL_SPOOL_DIR": str(tmp_path / "spool"),
        "RUNBELL_SHUTDOWN_GRACE": "1",
        "RUNBELL_SSE_RETRY_MS": "300",
        "RUNBELL_WEBHOOKS": "false",
        "RUNBELL_LOG_LEVEL": "warning",
        "RUNBELL_TOKEN_SECRET": "served-test-secret-of-at-least-32-bytes!",
    }
    gateways = ServedGateways(env, tmp_path)
    yield gateways
    gateways.close()
    for gateway in gateways.started:  # every start and stop, SIGKILL included, left no traceback behind
        assert "Traceback" not in gateway.log.read_text(), gateway.log.read_text()[-4000:]


# -- engines started by the test (tests/engines.py): each stopped by PID after the test ---------------


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own (tests.engines.RedisServer: AOF, fsync always), killed after."""
    from tests.engines import start_own_redis

    yield from start_own_redis(tmp_path / "redis")


@pytest.fixture
def redis_cluster(tmp_path):
    """A Redis Cluster of 3 masters and 3 replicas, healthy (tests.engines.RedisCluster)."""
    from tests.engines import RedisCluster

    with RedisCluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def sentinel_group(tmp_path):
    """A master, a replica and 3 sentinels watching them as "runbell" (tests.engines.SentinelGroup)."""
    from tests.engines import SentinelGroup

    with SentinelGroup(tmp_path / "sentinel") as group:
        yield group


@pytest.fixture
def load_balancer(tmp_path):
    """A factory: load_balancer(backends, health_path=None) starts HAProxy round robin in front of
    "host:port" backends (tests.engines.LoadBalancer); all are stopped after the test."""
    from tests.engines import LoadBalancer

    started = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(backends, health_path: str | None = None) -> LoadBalancer:
            return stack.enter_context(LoadBalancer(tmp_path / f"lb-{next(started)}", backends, health_path))

        yield start
