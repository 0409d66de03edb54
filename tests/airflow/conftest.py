"""A real Airflow (`airflow standalone` on PostgreSQL, LocalExecutor) for end-to-end tests, on each version of
the matrix: 3.1.8, 3.2.2 and 3.3.2 (runbell.service.bench.standalone.matrix_venvs; RUNBELL_AIRFLOW_VERSIONS
or RUNBELL_AIRFLOW_VENV narrow it).

The session-scoped `airflow` fixture is parametrized by version: one standalone per version, started in
turn (pytest groups the tests by the session parameter, so each is started once and stopped before the
next starts). It is started by runbell.service.bench.standalone (the Airflow bench starts it the same
way), with this repo's hook installed in that version's virtualenv, and publishes to the test Redis
under a namespace of its own. The DAGs are tests/airflow/dags plus the bench's (service/bench/dags).
A test branches on what the version offers through `airflow.has_listener_hook(...)`, `airflow.version`
and `airflow.version_tuple`. Tests that do not use `airflow` run once; a test of `airflow` marked
`newest_airflow_only` runs on the newest version only (comparisons with Airflow's own /wait).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import redis

from runbell.bus.keys import run_keys
from runbell.bus.schema import Envelope, decode_envelope
from runbell.service.bench import free_port, standalone, start_gateway
from runbell.service.bench.airflow import BENCH_DAGS
from runbell.service.bench.stores import postgres_unreachable, scratch_postgres

DAGS = Path(__file__).resolve().parent / "dags"
# As in tests/conftest.py (not importable from here): the machine's Redis; CI never skips.
REDIS_URL = os.environ.get("RUNBELL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("RUNBELL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SILENT_DAG = "rb_sigkill_silent"


MATRIX = standalone.matrix_venvs()


def _require_airflow_and_redis(venv: Path | None = None) -> None:
    """Skip (fail under CI=true) without the Airflow virtualenv or the machine's Redis."""
    try:
        standalone.checked_venv(venv) if venv is not None else standalone.airflow_venv()
    except standalone.AirflowUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc} (and CI=true forbids skipping)", pytrace=False)
        pytest.skip(str(exc))
    try:
        with redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is not reachable: {exc}", pytrace=False)
        pytest.skip(f"the Airflow end-to-end tests need a real Redis ({REDIS_URL}: {exc})")


@dataclass
class Airflow(standalone.Airflow):
    """The standalone's REST API, plus the run's replay log in the test Redis."""

    _redis: redis.Redis | None = field(default=None, repr=False)

    def log(self, dag_id: str, run_id: str) -> list[Envelope]:
        assert self._redis is not None
        entries = self._redis.xrange(run_keys(self.namespace, dag_id, run_id).log)
        return [decode_envelope(entry[b"env"]) for _, entry in entries]

    def watch(self, dag_id: str, run_id: str) -> LogWatcher:
        return LogWatcher(self, dag_id, run_id)


class LogWatcher:
    """Polls a run's replay log in the background and notes when each entry first appeared."""

    def __init__(self, airflow: Airflow, dag_id: str, run_id: str, poll: float = 0.05):
        self.airflow, self.dag_id, self.run_id, self.poll = airflow, dag_id, run_id, poll
        self.seen: list[tuple[float, Envelope]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                envelopes = self.airflow.log(self.dag_id, self.run_id)
            except redis.RedisError:  # the shared Redis dropped the connection: the next poll reconnects
                envelopes = []
            now = time.time()
            self.seen.extend((now, env) for env in envelopes[len(self.seen) :])
            self._stop.wait(self.poll)

    def first(self, timeout: float = 60.0, **match: Any) -> tuple[float, Envelope]:
        """The first entry whose event has all the given field values (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, env in list(self.seen):
                if all(getattr(env.event, k) == v for k, v in match.items()):
                    return at, env
            time.sleep(self.poll)
        raise TimeoutError(f"no event {match} in the log of {self.dag_id}/{self.run_id}: {self.events()}")

    def events(self) -> list[tuple[str | None, str]]:
        return [(env.event.task_id, env.event.state) for _, env in self.seen]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked newest_airflow_only (a comparison with Airflow's own /wait, the same in substance on
    every version) runs with the newest Airflow of the matrix only: the others are deselected."""
    newest = max(MATRIX, key=standalone.version_tuple, default=None)
    dropped = [
        item
        for item in items
        if item.get_closest_marker("newest_airflow_only")
        and getattr(item, "callspec", None) is not None
        and item.callspec.params.get("airflow", newest) != newest  # type: ignore[attr-defined]
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture
def airflow_redis_url() -> str:
    """For a test that starts an Airflow of its own (the bench's): the Redis, once what it needs is here."""
    _require_airflow_and_redis()
    return REDIS_URL


@contextlib.contextmanager
def metadata_database(version: str) -> Iterator[str | None]:
    """Each standalone's metadata database: a scratch PostgreSQL database, dropped afterwards (on
    SQLite, Airflow's components queue for one write lock, and a loaded machine timed REST calls out).
    Without the test PostgreSQL: SQLite (None), except under CI=true, where that fails."""
    unreachable = postgres_unreachable(POSTGRES_URL)
    if unreachable is not None:
        if IN_CI:
            pytest.fail(f"{unreachable} (Airflow's metadata database in the end-to-end tests; CI=true forbids SQLite there)", pytrace=False)
        print(f"\n[airflow {version}] on SQLite: {unreachable}")
        yield None
        return
    with scratch_postgres(POSTGRES_URL, f"airflow_{version.replace('.', '')}", fallback=False) as url:
        yield url


@pytest.fixture(scope="session", params=list(MATRIX), ids=[f"airflow-{v}" for v in MATRIX])
def airflow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    version: str = request.param
    venv = MATRIX[version]
    _require_airflow_and_redis(venv)
    namespace = f"rbe2e-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    started: standalone.Standalone | None = None
    failure: str | None = None
    try:
        with (
            metadata_database(version) as database_url,
            standalone.standalone(
                tmp_path_factory.mktemp(f"airflow-{version}"),
                [DAGS, BENCH_DAGS],
                REDIS_URL,
                namespace,
                extra_env={"RUNBELL_HOOK_SKIP_DAGS": SILENT_DAG},  # only the reconciler can settle its runs
                venv=venv,
                database_url=database_url,
            ) as started,
        ):
            api = started.airflow
            database = api.database_url.partition("://")[0]
            print(
                f"\n[airflow {api.version}] standalone on {database} ready in {started.ready_seconds:.1f} s at {api.base_url}; log {started.log_path}"
            )
            yield Airflow(**{f.name: getattr(api, f.name) for f in fields(api)}, _redis=client)
    except standalone.AirflowError as exc:
        failure = str(exc)  # failed outside the except block: the message once, not chained
    finally:
        if started is not None and started.stopped_seconds is not None:
            print(f"\n[airflow {version}] standalone stopped in {started.stopped_seconds:.1f} s")
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            client.delete(key)
        client.close()
    if failure is not None:
        pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="module")
def gateway(airflow: Any) -> Iterator[str]:
    """A real `runbell serve` (its own process, no auth) on the Redis and namespace the hook publishes
    to; a module needing other settings defines its own."""
    port = free_port()
    process = start_gateway(airflow.redis_url, airflow.namespace, port, Path(tempfile.mkdtemp()))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
