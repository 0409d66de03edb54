"""Settings of the publishing side, read from the environment (the hook has no command line)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runbell.bus.keys import DEFAULT_NAMESPACE, DEFAULT_PARTITIONS, partitions

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Sizes on the bus, bytes of JSON. An event must stay far below Redis' pub/sub output buffer limit
# (32 MiB at once, or 8 MiB for 60 s, by default): past it Redis drops the gateway's subscription.
RESULT_MAX_BYTES = 256 * 1024  # a larger result travels as a reference to its XCom
EVENT_MAX_BYTES = 1024 * 1024  # a larger event is never published (gateways read up to the range's top)
EVENT_MAX_BYTES_RANGE = (64 * 1024, 8 * 1024 * 1024)  # what either may be set to: room for every bounded field, under Redis' limit

# (env var, meaning) of every setting read below: the README's settings table is generated from it
# (runbell.service.settings.settings_table), and a test holds it to the names from_env reads.
HOOK_SETTINGS_DOC: list[tuple[str, str]] = [
    (
        "RUNBELL_REDIS_URL",
        "where to publish (default redis://127.0.0.1:6379/0; also `redis+cluster://HOST:PORT[,HOST:PORT…]` and `redis+sentinel://HOST:PORT[,…]/MASTER[/DB]`); set it on every Airflow component that "
        "runs the hook: scheduler, api-server, dag-processor, triggerer and every worker",
    ),
    ("RUNBELL_NAMESPACE", "key prefix; the gateway's must be the same (default runbell)"),
    ("RUNBELL_SPOOL_DIR", "where events wait while Redis is unreachable (default `$AIRFLOW_HOME/runbell-spool`)"),
    (
        "RUNBELL_RESULT_MAX_BYTES",
        "results (and asset extras) larger than this, bytes of JSON, are published as a reference to their XCom (default 262144)",
    ),
    (
        "RUNBELL_EVENT_MAX_BYTES",
        "largest event published, bytes of JSON, 65536 to 8388608 (default 1048576): a larger one carries its result as a reference, "
        "else it is dropped and logged; not above the gateway's",
    ),
    ("RUNBELL_PUBLISH_TIMEOUT", "connect and command timeout of a publish, seconds (default 0.25)"),
    ("RUNBELL_LOG_TTL_SECONDS", "replay log lifetime after a run's last event, seconds (default 604800)"),
    ("RUNBELL_STREAM_MAXLEN", "approximate cap of each stream partition (default 1000000)"),
    (
        "RUNBELL_STREAM_PARTITIONS",
        "stream partitions, 1 to 1024 (default 16): the first hook or gateway stores it in Redis and that value wins "
        "(a different one is logged as an error)",
    ),
    (
        "RUNBELL_METAFLOW_HEARTBEAT_SECONDS",
        "while a Metaflow step runs, its `@runbell` decorator sends its run's heartbeat this often, seconds "
        "(default 60; keep it well under the gateway's `RUNBELL_STALE_AFTER`; 0 turns it off)",
    ),
    (
        "RUNBELL_PROGRESS_RATE",
        "progress events a task attempt sends at most per second, 1 to 1000 (default 20, with a burst of as many); "
        "values offered faster go out together in the next one (`runbell.listeners.progress`)",
    ),
    ("RUNBELL_HOOK_ENABLED", "`false` turns the hook off on that host (default true)"),
    ("RUNBELL_HOOK_SKIP_DAGS", "comma-separated DAG ids the hook stays silent about (the reconciler still sees them)"),
]


@dataclass(frozen=True)
class PublisherConfig:
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)  # may carry a password: never in a repr
    namespace: str = DEFAULT_NAMESPACE
    log_ttl_seconds: int = 7 * 24 * 3600  # how long a run's replay log lives after its last event
    stream_maxlen: int = 1_000_000  # cap of each partition's stream (approximate trimming)
    stream_partitions: int = DEFAULT_PARTITIONS  # what to store when the namespace has no count yet
    result_max_bytes: int = RESULT_MAX_BYTES  # larger results are published as a reference
    event_max_bytes: int = EVENT_MAX_BYTES  # larger events are never published
    timeout_seconds: float = 0.25  # connect and command timeout of every publish
    spool_dir: Path = Path(".")
    enabled: bool = True
    metaflow_heartbeat_seconds: float = 60.0  # a running Metaflow step's heartbeat interval; 0: none
    skip_dags: frozenset[str] = frozenset()  # DAGs the hook stays silent about (the reconciler still sees them)
    progress_rate: float = 20.0  # progress events per second per task attempt (runbell.listeners.partial_output)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PublisherConfig:
        env = os.environ if env is None else env
        return cls(
            redis_url=env.get("RUNBELL_REDIS_URL") or DEFAULT_REDIS_URL,
            namespace=env.get("RUNBELL_NAMESPACE") or DEFAULT_NAMESPACE,
            log_ttl_seconds=int(env.get("RUNBELL_LOG_TTL_SECONDS") or cls.log_ttl_seconds),
            stream_maxlen=int(env.get("RUNBELL_STREAM_MAXLEN") or cls.stream_maxlen),
            stream_partitions=partitions(int(env.get("RUNBELL_STREAM_PARTITIONS") or cls.stream_partitions)),
            result_max_bytes=int(env.get("RUNBELL_RESULT_MAX_BYTES") or cls.result_max_bytes),
            event_max_bytes=event_max_bytes(int(env.get("RUNBELL_EVENT_MAX_BYTES") or cls.event_max_bytes)),
            timeout_seconds=float(env.get("RUNBELL_PUBLISH_TIMEOUT") or cls.timeout_seconds),
            spool_dir=Path(env.get("RUNBELL_SPOOL_DIR") or _default_spool_dir(env)),
            metaflow_heartbeat_seconds=float(env.get("RUNBELL_METAFLOW_HEARTBEAT_SECONDS") or cls.metaflow_heartbeat_seconds),
            enabled=(env.get("RUNBELL_HOOK_ENABLED", "true").lower() not in ("0", "false", "no")),
            progress_rate=progress_rate(float(env.get("RUNBELL_PROGRESS_RATE") or cls.progress_rate)),
            skip_dags=frozenset(d.strip() for d in (env.get("RUNBELL_HOOK_SKIP_DAGS") or "").split(",") if d.strip()),
        )


def event_max_bytes(value: int) -> int:
    """The event cap, if within EVENT_MAX_BYTES_RANGE; else ValueError saying the range."""
    low, high = EVENT_MAX_BYTES_RANGE
    if not low <= value <= high:
        raise ValueError(f"the event cap must be {low} to {high} bytes, not {value}")
    return value


PROGRESS_RATE_RANGE = (1.0, 1000.0)


def progress_rate(value: float) -> float:
    """The progress rate, if within PROGRESS_RATE_RANGE; else ValueError saying the range."""
    low, high = PROGRESS_RATE_RANGE
    if not low <= value <= high:
        raise ValueError(f"the progress rate must be {low:g} to {high:g} events a second, not {value:g}")
    return value


def _default_spool_dir(env: Mapping[str, str]) -> Path:
    home = env.get("AIRFLOW_HOME")
    base = Path(home) if home else Path.home() / ".runbell"
    return base / "runbell-spool"
