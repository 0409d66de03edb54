"""A real Airflow 3.3.2 (`airflow standalone`, SQLite, LocalExecutor) on loopback, for the Airflow
bench and the end-to-end tests (tests/airflow/conftest.py), which both start it from here.

It runs from the virtualenv at $RUNBELL_AIRFLOW_VENV (default ~/.cache/runbell/airflow-3.3.2; tests/run
creates it) with this repo's hook installed there as a package (the `airflow.plugins` entry point; the
plugins folder stays empty), publishing to the given Redis under the given namespace. The settings are
the ones /work/shared/airflow-notes.md found to work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import Request, urlopen

import runbell.bus
import runbell.listeners
from runbell.service.bench.measure import free_port

DEFAULT_VENV = Path.home() / ".cache" / "runbell" / "airflow-3.3.2"
# Bounds against hangs, sized for a busy 2-core machine (one shared by parallel test runs), where the
# api-server on SQLite once took more than 10 s to answer one request.
START_TIMEOUT = 300.0  # standalone is ready in ~11 s idle; a cold first start migrates the database too
HEALTH_TIMEOUT = 10.0  # one readiness probe; a slow answer still counts, a hung one is retried
HTTP_TIMEOUT = 60.0  # one REST request
PARSE_TIMEOUT = 180.0  # a DAG file is parsed within the 5 s refresh interval when idle


class AirflowError(RuntimeError):
    """The Airflow could not be started or used (a stale hook, a crashed or unready standalone)."""


class AirflowUnavailable(AirflowError):
    """There is no Airflow virtualenv to start one from."""


def airflow_venv() -> Path:
    """The Airflow virtualenv: $RUNBELL_AIRFLOW_VENV, else the one tests/run creates."""
    venv = Path(os.environ.get("RUNBELL_AIRFLOW_VENV") or DEFAULT_VENV)
    if not (venv / "bin" / "airflow").is_file():
        raise AirflowUnavailable(
            f"no Airflow virtualenv at {venv}: run tests/run (it creates one with Airflow 3.3.2 and the hook), "
            "or point RUNBELL_AIRFLOW_VENV at a virtualenv with apache-airflow and runbell installed"
        )
    return venv


def check_hook_installed(venv: Path) -> None:
    """The hook side in the Airflow virtualenv (runbell.listeners and runbell.bus) must be the installed
    package and match what this process imports (in a checkout: this tree)."""
    packages = {"runbell.listeners": runbell.listeners, "runbell.bus": runbell.bus}
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import runbell.listeners, runbell.bus; print(runbell.listeners.__path__[0]); print(runbell.bus.__path__[0])",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    sources = [Path(package.__path__[0]) for package in packages.values()]
    checkout = sources[0].parent if (sources[0].parent / "pyproject.toml").is_file() else None
    fix = f"run tests/run, or: {venv}/bin/pip install --no-deps --force-reinstall {checkout or 'runbell'}"
    if probe.returncode != 0:
        raise AirflowError(f"runbell is not installed in {venv} ({probe.stderr.strip()[-300:]}); {fix}")
    stale = [
        f"{name}: {src.name}"
        for name, source, installed in zip(packages, sources, (Path(p) for p in probe.stdout.split()))
        for src in source.glob("*")  # each package's own files: runbell.bus sits in listeners/bus/ in a checkout
        if src.suffix in (".py", ".lua") and _digest(src) != _digest(installed / src.name)
    ]
    if stale:
        raise AirflowError(f"the runbell hook in {venv} does not match {checkout or 'this runbell'} ({', '.join(stale)}); {fix}")


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_path(dag_id: str, run_id: str) -> str:
    return f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"


@dataclass
class WaitLine:
    at: float  # time.time() when the line arrived
    data: dict[str, Any]


@dataclass
class Airflow:
    """A running standalone's REST API (all admins: no token needed)."""

    base_url: str
    namespace: str
    redis_url: str
    home: Path

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")

    def unpause(self, dag_id: str, timeout: float = PARSE_TIMEOUT) -> None:
        """Unpause a DAG, waiting (bounded) until the dag-processor has parsed it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
                return
            except HTTPError as exc:
                if exc.code != 404:
                    raise
                if time.monotonic() > deadline:
                    raise AirflowError(f"the dag-processor had not parsed {dag_id} after {timeout:g} s") from exc
            time.sleep(0.5)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
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

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return self.request("GET", f"{run_path(dag_id, run_id)}/taskInstances/{quote(task_id, safe='')}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state of every (unmapped) task instance of the run (Airflow pages by 100)."""
        states: dict[str, str | None] = {}
        while True:
            page = self.request("GET", f"{run_path(dag_id, run_id)}/taskInstances?limit=100&offset={len(states)}")
            states.update((ti["task_id"], ti["state"]) for ti in page["task_instances"])
            if not page["task_instances"] or len(states) >= page["total_entries"]:
                return states

    def wait_endpoint(
        self,
        dag_id: str,
        run_id: str,
        interval: float = 1,
        result: list[str] | None = None,
        timeout: float = 120.0,
    ) -> list[WaitLine]:
        """Read Airflow's own /wait stream to its end; each line with the time it arrived."""
        query = f"interval={interval}" + "".join(f"&result={t}" for t in result or [])
        url = f"{self.base_url}{run_path(dag_id, run_id)}/wait?{query}"
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


@dataclass
class Standalone:
    """What `standalone` started: the API, and how long the start and the stop took."""

    airflow: Airflow
    log_path: Path
    ready_seconds: float
    stopped_seconds: float | None = None


@contextmanager
def standalone(
    workdir: Path,
    dags: list[Path],
    redis_url: str,
    namespace: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Standalone]:
    """Start `airflow standalone` in `workdir` with the DAG files `dags` (files, or folders whose
    contents are copied), stop its whole process group on the way out."""
    venv = airflow_venv()
    check_hook_installed(venv)
    home = workdir / "home"
    (home / "plugins").mkdir(parents=True)
    (home / "dags").mkdir()
    for source in dags:
        if source.is_dir():
            shutil.copytree(source, home / "dags", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, home / "dags" / source.name)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = workdir / "standalone.log"
    env = {**airflow_env(venv, home, port, namespace, redis_url), **(extra_env or {})}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "airflow"), "standalone"],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, stopped as one at the end
        )
    started = Standalone(Airflow(base_url, namespace, redis_url, home), log_path, 0.0)
    try:
        began = time.monotonic()
        _wait_ready(base_url, proc, log_path)
        started.ready_seconds = time.monotonic() - began
        yield started
    finally:
        started.stopped_seconds = _stop(proc)


def airflow_env(venv: Path, home: Path, port: int, namespace: str, redis_url: str) -> dict[str, str]:
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
        # Own log-server ports, so that two instances on one machine do not collide on 8793/8794.
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        RUNBELL_REDIS_URL=redis_url,
        RUNBELL_NAMESPACE=namespace,
    )
    return env


def _wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path) -> None:
    url, parts = f"{base_url}/api/v2/monitor/health", ("metadatabase", "scheduler", "dag_processor")
    deadline = time.monotonic() + START_TIMEOUT
    last: object = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AirflowError(f"airflow standalone exited ({proc.returncode}):\n{_tail(log_path)}")
        try:
            with urlopen(url, timeout=HEALTH_TIMEOUT) as resp:
                last = health = json.loads(resp.read())
            if all((health.get(part) or {}).get("status") == "healthy" for part in parts):
                return
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise AirflowError(
        f"airflow standalone not ready after {START_TIMEOUT:g} s: {url} did not report {', '.join(parts)} healthy "
        f"(last: {last}):\n{_tail(log_path)}"
    )


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
