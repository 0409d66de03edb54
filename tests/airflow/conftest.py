"""A real Airflow 3.3.2 (`airflow standalone`, SQLite, LocalExecutor) for end-to-end tests.

One instance per test session, from the virtualenv at $RUNBELL_AIRFLOW_VENV, with this repo's hook
installed there as a package (the `airflow.plugins` entry point; the plugins folder stays empty).
It publishes to the test Redis under a namespace of this session's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import Request, urlopen

import pytest
import redis

from listeners.bus.keys import run_keys
from listeners.bus.schema import Envelope, decode_envelope

REPO = Path(__file__).resolve().parents[2]
DAGS = Path(__file__).resolve().parent / "dags"
DEFAULT_VENV = Path.home() / ".cache" / "runbell" / "airflow-3.3.2"
# As in tests/conftest.py (not importable from here): the machine's Redis; CI never skips.
REDIS_URL = os.environ.get("RUNBELL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
START_TIMEOUT = 120.0  # standalone is ready in ~11 s; a cold first start migrates the database too
HTTP_TIMEOUT = 30.0  # a bound against hangs; a loaded api-server on SQLite can stall for seconds


def _venv() -> Path:
    venv = Path(os.environ.get("RUNBELL_AIRFLOW_VENV") or DEFAULT_VENV)
    if not (venv / "bin" / "airflow").is_file():
        if IN_CI:
            pytest.fail(f"no Airflow virtualenv at {venv} and CI=true forbids skipping", pytrace=False)
        pytest.skip(f"no Airflow virtualenv at {venv} (tests/run creates it)")
    return venv


def _check_redis() -> None:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is not reachable: {exc}", pytrace=False)
        pytest.skip(f"the Airflow end-to-end tests need a real Redis ({REDIS_URL}: {exc})")


def _check_hook_installed(venv: Path) -> None:
    """The hook must come from the installed package and match this tree (tests/run installs it)."""
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import listeners; print(listeners.__path__[0])"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.fail(f"runbell is not installed in {venv}: {probe.stderr.strip()[-300:]}", pytrace=False)
    installed = Path(probe.stdout.strip())
    stale = [
        str(src.relative_to(REPO))
        for src in (REPO / "listeners").rglob("*")
        if src.suffix in (".py", ".lua")
        and _digest(src) != _digest(installed / src.relative_to(REPO / "listeners"))
    ]
    if stale:
        pytest.fail(
            f"the runbell package in {venv} does not match this tree ({', '.join(stale)}); run tests/run, "
            f"or: {venv}/bin/pip install --no-deps --force-reinstall {REPO}",
            pytrace=False,
        )


def _digest(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_path(dag_id: str, run_id: str) -> str:
    return f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"


@dataclass
class WaitLine:
    at: float  # time.time() when the line arrived
    data: dict[str, Any]


@dataclass
class Airflow:
    base_url: str
    namespace: str
    redis_url: str
    home: Path
    _redis: redis.Redis = field(repr=False)

    # -- REST -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")

    def unpause(self, dag_id: str, timeout: float = 60.0) -> None:
        """Unpause a DAG, waiting (bounded) until the dag-processor has parsed it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
                return
            except HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def trigger(self, dag_id: str, conf: Optional[dict[str, Any]] = None, run_id: Optional[str] = None) -> str:
        """Trigger with a run id of ours, so that a 500 (Airflow's SQLite briefly locked under load)
        can be retried safely: a 409 on the retry means the first attempt did create the run."""
        run_id = run_id or f"e2e__{uuid.uuid4().hex[:12]}"
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}, "dag_run_id": run_id}
        for attempt in range(3):
            try:
                self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
                return run_id
            except HTTPError as exc:
                if exc.code == 409 and attempt > 0:
                    return run_id
                if exc.code < 500 or attempt == 2:
                    raise
                time.sleep(0.5)
        return run_id

    def task_states(self, dag_id: str, run_id: str) -> dict[str, Optional[str]]:
        """task_id -> state of every (unmapped) task instance of the run (Airflow pages by 100)."""
        states: dict[str, Optional[str]] = {}
        while True:
            page = self.request("GET", f"{_run_path(dag_id, run_id)}/taskInstances?limit=100&offset={len(states)}")
            states.update((ti["task_id"], ti["state"]) for ti in page["task_instances"])
            if not page["task_instances"] or len(states) >= page["total_entries"]:
                return states

    def wait_endpoint(
        self,
        dag_id: str,
        run_id: str,
        interval: float = 1,
        result: Optional[list[str]] = None,
        timeout: float = 120.0,
    ) -> list[WaitLine]:
        """Read Airflow's own /wait stream to its end; each line with the time it arrived."""
        query = f"interval={interval}" + "".join(f"&result={t}" for t in result or [])
        url = f"{self.base_url}{_run_path(dag_id, run_id)}/wait?{query}"
        lines: list[WaitLine] = []
        deadline = time.monotonic() + timeout
        # The per-read socket timeout bounds each line (generous: a loaded api-server on SQLite can
        # stall for seconds); the deadline bounds the whole stream.
        with urlopen(Request(url), timeout=max(30.0, 3 * interval)) as resp:
            for raw in resp:
                if raw.strip():
                    lines.append(WaitLine(time.time(), json.loads(raw)))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"/wait of {dag_id}/{run_id} still streaming after {timeout} s")
        return lines

    # -- the run's replay log in Redis ------------------------------------------------------------

    def log(self, dag_id: str, run_id: str) -> list[Envelope]:
        entries = self._redis.xrange(run_keys(self.namespace, dag_id, run_id).log)
        return [decode_envelope(fields[b"env"]) for _, fields in entries]

    def watch(self, dag_id: str, run_id: str) -> "LogWatcher":
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
            envelopes = self.airflow.log(self.dag_id, self.run_id)
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

    def events(self) -> list[tuple[Optional[str], str]]:
        return [(env.event.task_id, env.event.state) for _, env in self.seen]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


SILENT_DAG = "rb_sigkill_silent"


def _airflow_env(venv: Path, home: Path, port: int, namespace: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "RUNBELL"))}
    env.pop("VIRTUAL_ENV", None)
    base = f"http://127.0.0.1:{port}"
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(home / "plugins"),  # empty: the hook comes by entry point
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=base,
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{base}/execution/",
        AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR="True",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        # Own log-server ports, so that two sessions on one machine do not collide on 8793/8794.
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port()),
        RUNBELL_REDIS_URL=redis_url,
        RUNBELL_NAMESPACE=namespace,
        RUNBELL_HOOK_SKIP_DAGS=SILENT_DAG,  # only the reconciler can settle its runs
    )
    return env


def _wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"airflow standalone exited ({proc.returncode}):\n{_tail(log_path)}", pytrace=False)
        try:
            with urlopen(f"{base_url}/api/v2/monitor/health", timeout=2) as resp:
                health = json.loads(resp.read())
            if all(
                (health.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "dag_processor")
            ):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(f"airflow standalone not ready after {START_TIMEOUT} s:\n{_tail(log_path)}", pytrace=False)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> float:
    """SIGTERM the whole process group (standalone, its components, task processes), wait until
    every member is gone, SIGKILL what is left after the grace time. Returns the seconds it took."""
    started = time.monotonic()
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.2)
        if not _group_alive(proc):
            break
    return time.monotonic() - started


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, else it lingers as a zombie member of the group
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="session")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    venv = _venv()
    _check_redis()
    _check_hook_installed(venv)
    home = tmp_path_factory.mktemp("airflow") / "home"
    (home / "plugins").mkdir(parents=True)
    shutil.copytree(DAGS, home / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    port = _free_port()
    namespace = f"rbe2e-{uuid.uuid4().hex[:12]}"
    log_path = home.parent / "standalone.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "airflow"), "standalone"],
            cwd=home.parent,
            env=_airflow_env(venv, home, port, namespace, REDIS_URL),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, stopped as one at the end
        )
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        base_url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        _wait_ready(base_url, proc, log_path)
        ready = time.monotonic() - started
        print(f"\n[airflow] standalone ready in {ready:.1f} s at {base_url}; log {log_path}")
        yield Airflow(base_url, namespace, REDIS_URL, home, client)
    finally:
        print(f"\n[airflow] standalone stopped in {_stop(proc):.1f} s")
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            client.delete(key)
        client.close()
