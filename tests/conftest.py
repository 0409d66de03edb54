"""Shared fixtures: the real Redis and PostgreSQL of the machine, each test isolated.

Where a server is not reachable, tests fall back to fakeredis / SQLite on a laptop, but under
CI=true a missing server fails the run instead: CI always proves the real thing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from urllib.parse import urlparse

import pytest

REDIS_URL = os.environ.get("RUNBELL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("RUNBELL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """A factory: served_gateway(auth=False, **extra_env) starts `runbell serve` in its own process on a
    free port (tests.served.ServedGateway: stop, SIGKILL and start it again on the same port)."""
    import os
    import signal

    from tests.served import ServedGateway

    started: list[ServedGateway] = []

    def start(auth: bool = False, **extra: str) -> ServedGateway:
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
            **extra,
        }
        gateway = ServedGateway(env, free_port(), tmp_path / f"gateway-{len(started)}.log", no_auth=not auth)
        started.append(gateway)
        gateway.start()
        return gateway

    yield start
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop(signal.SIGKILL)
    for gateway in started:  # every start and stop, SIGKILL included, left no traceback behind
        assert "Traceback" not in gateway.log.read_text(), gateway.log.read_text()[-4000:]
