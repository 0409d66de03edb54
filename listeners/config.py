"""Settings of the publishing side, read from the environment (the hook has no command line)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runbell.bus.keys import DEFAULT_NAMESPACE

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# (env var, meaning) of every setting read below: the README's settings table is generated from it
# (runbell.service.settings.settings_table), and a test holds it to the names from_env reads.
HOOK_SETTINGS_DOC: list[tuple[str, str]] = [
    (
        "RUNBELL_REDIS_URL",
        "where to publish (default redis://127.0.0.1:6379/0); set it on every Airflow component that "
        "runs the hook: scheduler, api-server, dag-processor, triggerer and every worker",
    ),
    ("RUNBELL_NAMESPACE", "key prefix; the gateway's must be the same (default runbell)"),
    ("RUNBELL_SPOOL_DIR", "where events wait while Redis is unreachable (default `$AIRFLOW_HOME/runbell-spool`)"),
    ("RUNBELL_RESULT_MAX_BYTES", "results larger than this are published as a reference (default 262144)"),
    ("RUNBELL_PUBLISH_TIMEOUT", "connect and command timeout of a publish, seconds (default 0.25)"),
    ("RUNBELL_LOG_TTL_SECONDS", "replay log lifetime after a run's last event, seconds (default 604800)"),
    ("RUNBELL_STREAM_MAXLEN", "approximate cap of the global stream (default 1000000)"),
    ("RUNBELL_HOOK_ENABLED", "`false` turns the hook off on that host (default true)"),
    ("RUNBELL_HOOK_SKIP_DAGS", "comma-separated DAG ids the hook stays silent about (the reconciler still sees them)"),
]


@dataclass(frozen=True)
class PublisherConfig:
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    log_ttl_seconds: int = 7 * 24 * 3600  # how long a run's replay log lives after its last event
    stream_maxlen: int = 1_000_000  # cap of the global stream (approximate trimming)
    result_max_bytes: int = 256 * 1024  # larger results are published as a reference
    timeout_seconds: float = 0.25  # connect and command timeout of every publish
    spool_dir: Path = Path(".")
    enabled: bool = True
    skip_dags: frozenset[str] = frozenset()  # DAGs the hook stays silent about (the reconciler still sees them)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PublisherConfig:
        env = os.environ if env is None else env
        return cls(
            redis_url=env.get("RUNBELL_REDIS_URL") or DEFAULT_REDIS_URL,
            namespace=env.get("RUNBELL_NAMESPACE") or DEFAULT_NAMESPACE,
            log_ttl_seconds=int(env.get("RUNBELL_LOG_TTL_SECONDS") or cls.log_ttl_seconds),
            stream_maxlen=int(env.get("RUNBELL_STREAM_MAXLEN") or cls.stream_maxlen),
            result_max_bytes=int(env.get("RUNBELL_RESULT_MAX_BYTES") or cls.result_max_bytes),
            timeout_seconds=float(env.get("RUNBELL_PUBLISH_TIMEOUT") or cls.timeout_seconds),
            spool_dir=Path(env.get("RUNBELL_SPOOL_DIR") or _default_spool_dir(env)),
            enabled=(env.get("RUNBELL_HOOK_ENABLED", "true").lower() not in ("0", "false", "no")),
            skip_dags=frozenset(d.strip() for d in (env.get("RUNBELL_HOOK_SKIP_DAGS") or "").split(",") if d.strip()),
        )


def _default_spool_dir(env: Mapping[str, str]) -> Path:
    home = env.get("AIRFLOW_HOME")
    base = Path(home) if home else Path.home() / ".runbell"
    return base / "runbell-spool"
