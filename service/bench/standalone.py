"""A real Airflow 3 (`airflow standalone`, LocalExecutor) on loopback, for the Airflow bench and the
end-to-end tests (tests/airflow/conftest.py), which both start it from here. Its metadata database
is a SQLite file in its home, or a PostgreSQL database given by URL (the end-to-end tests' choice:
on SQLite the scheduler, dag processor, triggerer, api-server and task processes queue for one write
lock, and on a loaded machine a REST call waited past its bound).

Each tested version (AIRFLOW_VERSIONS) has its own virtualenv, ~/.cache/runbell/airflow-VERSION
(tests/run creates them), with this repo's hook installed there as a package (the `airflow.plugins`
entry point; the plugins folder stays empty), publishing to the given Redis under the given namespace.
$RUNBELL_AIRFLOW_VENV names one virtualenv to use instead (the bench's default is the newest version's).
The settings are the ones /work/shared/airflow-notes.md found to work.

All admins, no password (SimpleAuthManager's all-admins mode): from 3.2 the api-server lets a
tokenless request in as admin; 3.1 answers it 401 and only hands out an admin token without
credentials (GET /auth/token). So a token is fetched once the API is up and sent with every request,
on every version.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote
from urllib.request import Request, urlopen

import runbell.bus
import runbell.listeners
from runbell.service.bench.measure import free_port

# The versions the end-to-end suite runs on (tests/run installs each; keep its list in step).
AIRFLOW_VERSIONS = ("3.1.8", "3.2.2", "3.3.2")
VENV_CACHE = Path.home() / ".cache" / "runbell"
DEFAULT_VENV = VENV_CACHE / f"airflow-{AIRFLOW_VERSIONS[-1]}"
# Bounds against hangs, sized for a busy 2-core machine (one shared by parallel test runs), where the
# api-server on SQLite once took more than 10 s to answer one request.
START_TIMEOUT = 300.0  # standalone is ready in ~11 s idle; a cold first start migrates the database too
HEALTH_TIMEOUT = 10.0  # one readiness probe; a slow answer still counts, a hung one is retried
HTTP_TIMEOUT = 60.0  # one REST request
PARSE_TIMEOUT = 180.0  # a DAG file is parsed within the 5 s refresh interval when idle
# How long one of Airflow's SQLite connections waits for another's write lock before it fails with
# "database is locked" (sqlite3's default: 5 s). The scheduler, dag processor, triggerer and api-server
# share one file; on a loaded machine a write waited longer, and `airflow backfill create`, which
# commits the backfill and then its runs, failed between the two, leaving a backfill without runs.
SQLITE_BUSY_TIMEOUT = 120


class AirflowError(RuntimeError):
    """The Airflow could not be started or used (a stale hook, a crashed or unready standalone)."""


class AirflowUnavailable(AirflowError):
    """There is no Airflow virtualenv to start one from."""


def airflow_venv() -> Path:
    """The one Airflow virtualenv (the bench's): $RUNBELL_AIRFLOW_VENV, else the newest version's."""
    return checked_venv(Path(os.environ.get("RUNBELL_AIRFLOW_VENV") or DEFAULT_VENV))


def matrix_venvs() -> dict[str, Path]:
    """version -> virtualenv, for the end-to-end suite: $RUNBELL_AIRFLOW_VENV alone when set (its
    version read from it), else ~/.cache/runbell/airflow-V for each V of $RUNBELL_AIRFLOW_VERSIONS
    (comma-separated; default AIRFLOW_VERSIONS). Not checked here: a missing one fails its own tests."""
    single = os.environ.get("RUNBELL_AIRFLOW_VENV")
    if single:
        return {installed_version(Path(single)) or "unknown": Path(single)}
    listed = os.environ.get("RUNBELL_AIRFLOW_VERSIONS") or ",".join(AIRFLOW_VERSIONS)
    return {v.strip(): VENV_CACHE / f"airflow-{v.strip()}" for v in listed.split(",") if v.strip()}


def checked_venv(venv: Path) -> Path:
    if not (venv / "bin" / "airflow").is_file():
        raise AirflowUnavailable(
            f"no Airflow virtualenv at {venv}: run tests/run (it creates one per version in "
            f"{', '.join(AIRFLOW_VERSIONS)} with the hook), or point RUNBELL_AIRFLOW_VENV at a virtualenv "
            "with apache-airflow and runbell installed"
        )
    return venv


def installed_version(venv: Path) -> str | None:
    """apache-airflow's version in the virtualenv, from its dist-info folder's name (no subprocess)."""
    found = sorted(venv.glob("lib/python*/site-packages/apache_airflow-*.dist-info"))
    return found[0].name.removeprefix("apache_airflow-").removesuffix(".dist-info") if found else None


@functools.cache
def listener_hookspecs(venv: Path) -> frozenset[str]:
    """The listener hook names the virtualenv's Airflow defines (the specs its listener manager has)."""
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _HOOKSPECS_PROBE],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        raise AirflowError(f"reading the listener hook specs in {venv} failed: {probe.stderr.strip()[-300:]}")
    lines = [line.split()[1:] for line in probe.stdout.splitlines() if line.startswith("hooks:")]  # not Airflow's log lines
    return frozenset(name for names in lines for name in names)


_HOOKSPECS_PROBE = """
from airflow.listeners.listener import get_listener_manager
callers = vars(get_listener_manager().pm.hook).items()  # a plugin's hook without a spec has a caller too
print("hooks:", *(name for name, caller in callers if getattr(caller, "spec", None) is not None))
"""


def version_tuple(version: str) -> tuple[int, ...]:
    """(3, 1, 8) for "3.1.8"; the leading numeric parts only (a pre-release suffix is dropped)."""
    parts: list[int] = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


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

    @property
    def says_failed(self) -> bool:
        """A failed run's last line: {"state": "failed"}, on 3.1 with an empty "results" as well."""
        return self.data.get("state") == "failed" and not self.data.get("results")


@dataclass
class Airflow:
    """A running standalone's REST API (all admins: an admin token without credentials)."""

    base_url: str
    namespace: str
    redis_url: str
    home: Path
    venv: Path = DEFAULT_VENV
    version: str = ""  # apache-airflow's version, e.g. "3.1.8"; see version_tuple
    database_url: str = ""  # the metadata database, as Airflow's sql_alchemy_conn takes it
    token: str | None = field(default=None, repr=False)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The version as numbers, e.g. (3, 1, 8): `airflow.version_tuple >= (3, 2)`."""
        return version_tuple(self.version)

    def has_listener_hook(self, name: str) -> bool:
        """Whether this Airflow defines the listener hook `name` (e.g. on_asset_event_emitted, 3.2+):
        for tests that branch on what the version offers."""
        return name in listener_hookspecs(self.venv)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def gateway_env(self) -> dict[str, str]:
        """What a gateway needs to reach this Airflow's API as a user would configure it: the URL and a
        login (all-admins mode answers POST /auth/token with an admin token whatever the credentials)."""
        return {"RUNBELL_AIRFLOW_URL": self.base_url, "RUNBELL_AIRFLOW_USERNAME": "admin", "RUNBELL_AIRFLOW_PASSWORD": "admin"}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = Request(self.base_url + path, data=data, method=method, headers=self.headers())
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
        with urlopen(Request(url, headers=self.headers()), timeout=max(30.0, 3 * interval)) as resp:
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
    venv: Path | None = None,
    database_url: str | None = None,
) -> Iterator[Standalone]:
    """Start `airflow standalone` from `venv` (default: airflow_venv()) in `workdir` with the DAG files
    `dags` (files, or folders whose contents are copied), stop its whole process group on the way out.
    Its metadata database: `database_url` (an empty PostgreSQL database), else a SQLite file in its home."""
    venv = checked_venv(venv) if venv is not None else airflow_venv()
    check_hook_installed(venv)
    if database_url is not None:
        database_url = postgres_metadata_url(database_url)
        check_postgres_drivers(venv)
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
    env = {**airflow_env(venv, home, port, namespace, redis_url, database_url), **(extra_env or {})}
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
    database_url = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    airflow = Airflow(base_url, namespace, redis_url, home, venv, installed_version(venv) or "", database_url)
    started = Standalone(airflow, log_path, 0.0)
    try:
        began = time.monotonic()
        _wait_ready(base_url, proc, log_path)
        airflow.token = _admin_token(base_url)
        started.ready_seconds = time.monotonic() - began
        yield started
    finally:
        started.stopped_seconds = _stop(proc)


def postgres_metadata_url(url: str) -> str:
    """A PostgreSQL URL (any driver) as Airflow's sql_alchemy_conn takes it: postgresql+psycopg2://
    (named: SQLAlchemy 2.1 makes psycopg 3 the default), whence Airflow derives its async URL,
    postgresql+asyncpg://."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise AirflowError(f"Airflow's metadata database here is SQLite (the default) or PostgreSQL, not {url!r}")
    return f"postgresql+psycopg2://{rest}"


def check_postgres_drivers(venv: Path) -> None:
    """Airflow on PostgreSQL needs psycopg2 (sync) and asyncpg (async) in its virtualenv."""
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import psycopg2, asyncpg"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise AirflowError(
            f"Airflow in {venv} cannot reach PostgreSQL: {probe.stderr.strip()[-300:]}; "
            f"install the drivers: {venv / 'bin' / 'pip'} install psycopg2-binary asyncpg (tests/run does)"
        )


def airflow_env(venv: Path, home: Path, port: int, namespace: str, redis_url: str, database_url: str | None = None) -> dict[str, str]:
    """What an Airflow component of the harness runs with; its metadata database `database_url`
    (as sql_alchemy_conn takes it), else a SQLite file in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "RUNBELL"))}
    env.pop("VIRTUAL_ENV", None)
    base = f"http://127.0.0.1:{port}"
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=database_url or f"sqlite:///{home / 'airflow.db'}?timeout={SQLITE_BUSY_TIMEOUT}",
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


def _admin_token(base_url: str) -> str | None:
    """An admin JWT from all-admins mode's credential-free token route (every Airflow 3 has it); None
    when this auth manager has no such route (then requests go tokenless, as they may from 3.2)."""
    try:
        with urlopen(Request(f"{base_url}/auth/token"), timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read())["access_token"]
    except HTTPError as exc:
        if exc.code in (403, 404, 405):
            return None
        raise AirflowError(f"GET {base_url}/auth/token: {exc.code} {exc.reason}") from exc


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
