"""The gateway's settings: environment variables, overridden by command-line flags.

SETTINGS_DOC is the one description of every gateway setting; settings_table() adds the hook's
(runbell.listeners.config.HOOK_SETTINGS_DOC), the client's and the test tools' into the one table the
README holds (`python -m runbell.service.settings --markdown` prints it; a test keeps them equal).
`runbell serve` takes its flags from SETTINGS_DOC too: one per setting, except ENV_ONLY.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from runbell.bus.keys import DEFAULT_NAMESPACE, DEFAULT_PARTITIONS, PARTITIONS_RANGE
from runbell.listeners import connect
from runbell.listeners.config import EVENT_MAX_BYTES, EVENT_MAX_BYTES_RANGE, HOOK_SETTINGS_DOC, RESULT_MAX_BYTES
from runbell.service.core.redaction import without_password
from runbell.service.core.roles import Grant, parse_tokens
from runbell.service.store.dead_letters import MAX_ROWS, MAX_ROWS_RANGE, RAW_MAX_BYTES, RAW_MAX_BYTES_RANGE
from runbell.service.webhooks.dispatcher import (
    DEFAULT_WEBHOOK_SCHEDULE,
    webhook_schedule_seconds,
)
from runbell.service.webhooks.target_guard import TargetPolicy


class Settings(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)  # a bad RUNBELL_TOKENS must not print every token

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    redis_url: str | None = None  # None: Redis on localhost if it answers, else the embedded broker
    database_url: str = "sqlite:///runbell.db"
    namespace: str = DEFAULT_NAMESPACE
    stream_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=PARTITIONS_RANGE[0], le=PARTITIONS_RANGE[1])
    tokens: dict[str, Grant] = Field(default_factory=dict, repr=False)
    no_auth: bool = False
    token_secret: SecretStr | None = None  # signs run-scoped tokens; None: random per process
    scoped_token_ttl: float = Field(default=3600.0, gt=0)
    airflow_url: str | None = None
    airflow_token: SecretStr | None = None
    airflow_username: str | None = None
    airflow_password: SecretStr | None = None
    airflow_timeout: float = Field(default=10.0, gt=0)
    idempotency_ttl: float = Field(default=24 * 3600.0, gt=0)
    reconcile_after: float = Field(default=30.0, gt=0)
    long_poll_default: float = Field(default=25.0, gt=0)
    long_poll_max: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    sse_retry_ms: int = Field(default=3000, ge=0)
    subscriber_buffer: int = Field(default=1000, ge=1)
    max_subscribers: int = Field(default=20_000, ge=1)
    send_timeout: float = Field(default=10.0, gt=0)
    header_timeout: float = Field(default=10.0, gt=0)
    listen_backlog: int = Field(default=65535, ge=1, le=65535)
    shutdown_grace: float = Field(default=5.0, ge=0)
    readiness_grace: float = Field(default=5.0, ge=0, le=3600)
    readiness_max_backlog: int = Field(default=1000, ge=0, le=10**9)
    readiness_max_catch_up: float = Field(default=300.0, gt=0, le=86400)
    recorder: bool = True
    webhooks: bool = True
    webhook_allowed_hosts: str | None = None  # hosts or CIDRs webhooks may reach despite being private
    webhook_secret_grace: float = Field(default=24 * 3600.0, ge=0)
    callback_ttl: float = Field(default=7 * 24 * 3600.0, gt=0)
    cancel_grace: float = Field(default=10.0, ge=0, le=3600)
    otlp_endpoint: str | None = None  # OpenTelemetry spans exported over OTLP/HTTP there (the otlp extra); None: not exported
    webhook_attempt_timeout: float = Field(default=15.0, gt=0)
    webhook_connect_timeout: float = Field(default=5.0, gt=0)
    webhook_read_timeout: float = Field(default=10.0, gt=0)
    webhook_max_in_flight: int = Field(default=256, ge=1, le=100_000)
    webhook_per_endpoint: int = Field(default=4, ge=1, le=1000)
    webhook_breaker_failures: int = Field(default=5, ge=1)
    webhook_breaker_open: float = Field(default=10.0, gt=0)
    webhook_breaker_max_open: float = Field(default=600.0, gt=0)
    webhook_schedule: str = DEFAULT_WEBHOOK_SCHEDULE
    spool_flush_interval: float = Field(default=5.0, gt=0)
    stale_after: float = Field(default=360.0, gt=0)  # a running run silent this long is listed as stale
    airflow_database_url: SecretStr | None = None  # Airflow's metadata DB, read-only: backfill slots
    body_max_bytes: int = Field(default=1024 * 1024, ge=1024)  # every request body but an event's
    event_max_bytes: int = Field(default=EVENT_MAX_BYTES, ge=EVENT_MAX_BYTES_RANGE[0], le=EVENT_MAX_BYTES_RANGE[1])
    result_max_bytes: int = Field(default=RESULT_MAX_BYTES, ge=0)
    dead_letter_raw_max_bytes: int = Field(default=RAW_MAX_BYTES, ge=RAW_MAX_BYTES_RANGE[0], le=RAW_MAX_BYTES_RANGE[1])
    dead_letters_max: int = Field(default=MAX_ROWS, ge=MAX_ROWS_RANGE[0], le=MAX_ROWS_RANGE[1])

    @model_validator(mode="after")
    def _result_fits_an_event(self) -> Settings:
        if self.result_max_bytes >= self.event_max_bytes:
            raise ValueError("result_max_bytes must be smaller than event_max_bytes: a result travels inside an event")
        return self

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            connect.check(value)  # BadRedisUrl names the accepted shapes, never the password
        return value

    @field_validator("webhook_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        webhook_schedule_seconds(value)
        return value

    log_level: str = "info"

    @field_validator("tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, value):
        return parse_tokens(value) if isinstance(value, str) else value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value):
        TargetPolicy.from_setting(value)  # ValueError names the bad entry
        return value

    @property
    def unacked_timeout(self) -> float:
        """Seconds sent data may stay unacknowledged (a client that stopped reading) before the kernel
        drops the connection: twice send_timeout, so that the gateway's own cut comes first."""
        return 2 * self.send_timeout

    def check(self) -> None:
        """Refuse settings that would be unsafe: auth off on a non-loopback address, or no tokens."""
        if self.no_auth:
            if not is_loopback(self.host):
                raise ValueError(f"--no-auth is only allowed when bound to loopback, not {self.host!r}")
        elif not self.tokens:
            raise ValueError(
                "no tokens configured: set RUNBELL_TOKENS='token:role,...' (roles: read, publish, respond, trigger, admin;"
                " token:role@etl_*|billing limits a token to those DAGs),"
                " or pass --no-auth on a loopback address for local development"
            )
        if self.token_secret is not None and len(self.token_secret.get_secret_value().encode()) < 32:
            raise ValueError("RUNBELL_TOKEN_SECRET must be at least 32 bytes (it signs HS256 tokens)")
        if self.long_poll_default > self.long_poll_max:
            raise ValueError("long_poll_default must not exceed long_poll_max")
        if self.webhook_breaker_open > self.webhook_breaker_max_open:
            raise ValueError("webhook_breaker_open must not exceed webhook_breaker_max_open")


ENV_PREFIX = "RUNBELL_"

# (field, meaning) for the README table and `runbell serve --help`; the env var is env_name(field).
SETTINGS_DOC: list[tuple[str, str]] = [
    ("host", "address to bind (default 127.0.0.1)"),
    ("port", "port to bind (default 8080)"),
    (
        "redis_url",
        "Redis URL: `redis://`, `rediss://`, `unix://`, `redis+cluster://HOST:PORT[,HOST:PORT…]` or "
        "`redis+sentinel://HOST:PORT[,…]/MASTER[/DB]`; unset: localhost:6379 if it answers, else an embedded development broker",
    ),
    ("database_url", "SQLAlchemy URL of the store (postgresql://... in production; default sqlite:///runbell.db)"),
    ("namespace", "prefix of every Redis key; hook and gateway must agree (default runbell)"),
    (
        "stream_partitions",
        "stream partitions, 1 to 1024 (default 16): the first hook or gateway of a namespace stores its count in Redis, "
        "and that count wins (a different one configured is logged as an error)",
    ),
    (
        "tokens",
        "bearer tokens, comma-separated: token:role, or token:role@pattern to limit the token to the DAGs whose ids "
        "match (`*` any characters, case-sensitive; several patterns joined by a vertical bar; without @ a token is "
        "every DAG's). Roles: read; "
        "publish (read, and POST /v1/events); respond (read, and answer a task waiting for a person); "
        "trigger (read and respond, and trigger or unpause runs); admin (everything, every DAG). "
        "At most 1000 tokens, 64 patterns a token (see Roles and scopes; a `$TOKEN` of the README is one of these tokens)",
    ),
    ("no_auth", "turn auth off (only allowed when bound to loopback)"),
    (
        "token_secret",
        "secret that signs run-scoped tokens and list cursors, at least 32 bytes (the gateway refuses to "
        "start with a shorter one); replicas must share it (default: random per process)",
    ),
    ("scoped_token_ttl", "lifetime of a run-scoped token, seconds (default 3600)"),
    (
        "airflow_url",
        "Airflow's base URL, for triggering, answering tasks that wait for a person, reconciling and (Airflow 3.4+) backfill slots (unset: none of these)",
    ),
    ("airflow_token", "a fixed bearer token for Airflow's REST API"),
    ("airflow_username", "Airflow user, exchanged with the password for a JWT (refreshed before expiry)"),
    ("airflow_password", "that user's password"),
    ("airflow_timeout", "timeout of each call to Airflow, seconds (default 10)"),
    ("idempotency_ttl", "how long an Idempotency-Key is remembered, seconds (default 86400)"),
    ("reconcile_after", "a waited-on run silent this long is looked up in Airflow, seconds (default 30)"),
    ("long_poll_default", "long-poll timeout when the caller gives none, seconds (default 25)"),
    ("long_poll_max", "largest accepted long-poll timeout, seconds (default 60)"),
    ("heartbeat_seconds", "SSE comment heartbeat interval, seconds (default 15)"),
    ("sse_retry_ms", "SSE retry: hint sent to clients, milliseconds (default 3000)"),
    ("subscriber_buffer", "events buffered per waiter or SSE client before it is cut off (default 1000)"),
    ("max_subscribers", "concurrent waiters plus SSE clients per process; more get 503 (default 20000)"),
    ("send_timeout", "seconds an SSE write may take before the client is dropped (default 10)"),
    (
        "header_timeout",
        "seconds a connection may take to send a request's headers, from connecting or from its "
        "previous response, before it is closed (default 10)",
    ),
    (
        "listen_backlog",
        "connections the kernel holds for the gateway before it accepts them (default 65535; Linux caps "
        "it at net.core.somaxconn, 4096 by default): a crowd arriving at once waits there instead of "
        "being dropped (uvicorn's 2,048 dropped 4-9% of 10,000 callers connecting at once)",
    ),
    ("shutdown_grace", "seconds given to clients to leave on SIGTERM (default 5)"),
    (
        "readiness_grace",
        "once ready, seconds a failing check (a ping of Redis or the store, the shard subscriptions) is "
        "ridden out before `/readyz` answers 503, 0 to 3600 (default 5): a blip of what every replica "
        "shares does not take them all out of the load balancer at once",
    ),
    (
        "readiness_max_backlog",
        "stream entries a starting replica's recorder may still have to record when it first becomes "
        "ready, 0 to 10^9 (default 1000; see Running it for real)",
    ),
    (
        "readiness_max_catch_up",
        "seconds a starting replica waits for the streams' backlog to drop under readiness_max_backlog "
        "before it is ready anyway (default 300): under sustained overload, replicas added to scale out still join",
    ),
    ("recorder", "run the recorder (stream partitions -> store) in this process (default true)"),
    ("webhooks", "run the webhook dispatcher (outbox -> receivers) in this process (default true)"),
    (
        "webhook_allowed_hosts",
        "comma-separated hosts or CIDRs webhooks may reach although they resolve to "
        "private, loopback or link-local addresses (default: none)",
    ),
    ("webhook_secret_grace", "seconds the old secret still signs, beside the new one, after a rotation (default 86400)"),
    (
        "otlp_endpoint",
        "export the gateway's OpenTelemetry spans over OTLP/HTTP to this base URL, e.g. http://collector:4318 "
        "(needs the `otlp` extra; unset: none are exported)",
    ),
    (
        "cancel_grace",
        "a run triggered with `cancel_on_disconnect` whose caller went away is failed in Airflow after this long, seconds, "
        "0 to 3600 (default 10), unless its outcome is decided or someone else waits on it by then",
    ),
    (
        "callback_ttl",
        "a trigger's `callback` takes no new message this long after the trigger, seconds (default 604800, the replay log's lifetime); "
        "deliveries already due keep their retries",
    ),
    (
        "webhook_schedule",
        "webhook attempts: comma-separated seconds before each, after the previous one failed, "
        "each ±20% (default 0,5,300,1800,7200,18000,36000,36000); after the last, the message is dead-lettered",
    ),
    (
        "webhook_attempt_timeout",
        "seconds one delivery attempt may take in all, however the receiver trickles its answer (default 15); "
        "the attempts of a gateway killed mid-delivery are taken over after twice that plus 5",
    ),
    ("webhook_connect_timeout", "seconds a webhook delivery may take to connect to its receiver (default 5)"),
    ("webhook_read_timeout", "seconds a webhook delivery may wait for each read of the answer, or write of the request (default 10)"),
    ("webhook_max_in_flight", "webhook delivery attempts in flight in this process, all endpoints together (default 256)"),
    (
        "webhook_per_endpoint",
        "attempts in flight to one endpoint that answers (default 4); one not yet known to answer, or failing, "
        "gets one, and one whose breaker is open none",
    ),
    (
        "webhook_breaker_failures",
        "failed attempts in a row (no answer in time, a network error, 408, 429, 5xx) that open an endpoint's "
        "breaker: its messages wait in the outbox, unclaimed, until a probe gets an answer (default 5)",
    ),
    ("webhook_breaker_open", "seconds an endpoint's breaker stays open before the first probe (default 10)"),
    ("webhook_breaker_max_open", "the longest it stays open: the time doubles at each failed probe up to this (default 600)"),
    (
        "spool_flush_interval",
        "seconds between the gateway's sends of its spool (events POSTed while Redis was unreachable, "
        "also by an earlier run of the gateway; sent at start-up too) (default 5)",
    ),
    ("stale_after", "a run still running after this many seconds without an event is listed with stale: true (default 360)"),
    (
        "airflow_database_url",
        "SQLAlchemy URL of Airflow's metadata database, read only, for backfill slots (GET /v1/backfills/...) where Airflow's "
        "REST API does not list them (before 3.4) or fails (unset, with no such API: those answer 503)",
    ),
    (
        "body_max_bytes",
        "largest request body, bytes, of every endpoint but `POST /v1/events` (default 1048576); a larger one is "
        "answered 413 `body_too_large` before it is read in full",
    ),
    (
        "event_max_bytes",
        "largest event, bytes of JSON, 65536 to 8388608 (default 1048576): the largest body `POST /v1/events` takes "
        "(413 beyond), and a larger event on the bus is dropped as a bad event; the hook's must not be larger",
    ),
    (
        "result_max_bytes",
        "largest result value `POST /v1/events` takes inline, bytes of JSON, smaller than the event cap (default 262144; "
        "413 beyond: publish a reference to the XCom instead, as the hook does)",
    ),
    (
        "dead_letter_raw_max_bytes",
        f"of a bus entry that is no event, the bytes kept in its dead letter, {RAW_MAX_BYTES_RANGE[0]} to "
        f"{RAW_MAX_BYTES_RANGE[1]} (default {RAW_MAX_BYTES}); of a larger one, its first bytes and its size",
    ),
    (
        "dead_letters_max",
        f"dead letters kept, {MAX_ROWS_RANGE[0]} to {MAX_ROWS_RANGE[1]} (default {MAX_ROWS}); past it the oldest entries "
        "that are no event are deleted first, then the oldest events the store refused, each counted in "
        "`runbell_recorder_dead_letters_evicted_total`",
    ),
    ("log_level", "debug, info, warning, error (default info)"),
]


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


# Settings that are environment variables only, never `runbell serve` flags: a flag's value is in the
# process's command line, which any user of the host can read (ps, /proc/PID/cmdline).
ENV_ONLY: dict[str, str] = {
    "tokens": "bearer tokens",
    "token_secret": "a signing key",
    "airflow_token": "a bearer token",
    "airflow_password": "a password",
    "airflow_database_url": "a database URL, usually with its password",
}


def flag_name(field: str) -> str | None:
    """The `runbell serve` flag of a setting (None: ENV_ONLY). A boolean is a switch away from its default."""
    if field in ENV_ONLY:
        return None
    name = field.replace("_", "-")
    if Settings.model_fields[field].annotation is bool and Settings.model_fields[field].default is True:
        return f"--no-{name}"
    return f"--{name}"


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (SETTINGS_DOC), dest the field; unset flags are None, so the environment holds."""
    for field, meaning in SETTINGS_DOC:
        flag = flag_name(field)
        if flag is None:
            continue
        info = Settings.model_fields[field]
        text = f"{meaning} [{env_name(field)}]".replace("%", "%%")  # argparse formats help with %
        if info.annotation is bool:
            action = "store_false" if info.default is True else "store_true"
            parser.add_argument(flag, dest=field, action=action, default=None, help=text)
        else:
            parser.add_argument(flag, dest=field, metavar=field.upper(), help=text)


def serve_overrides(args: argparse.Namespace) -> dict:
    """The flags given on the command line, for load_settings."""
    return {field: getattr(args, field) for field, _ in SETTINGS_DOC if flag_name(field) is not None}


# Read by `runbell run`, `wait` and `tail` (runbell.service.client.cli), besides their flags.
CLIENT_SETTINGS_DOC: list[tuple[str, str, str]] = [
    ("RUNBELL_URL", "--url", "the gateway's base URL (default http://127.0.0.1:8080)"),
    ("RUNBELL_TOKEN", "--token", "the bearer token they send (`runbell run` needs the trigger role, the others read)"),
]

# Read by tests/run, the test suite and `runbell bench` only (not by a deployed gateway or hook).
TOOLS_SETTINGS_DOC: list[tuple[str, str, str]] = [
    (
        "RUNBELL_AIRFLOW_VERSIONS",
        "tests/run, tests",
        "the Airflow versions the end-to-end suite runs on, comma-separated, each in ~/.cache/runbell/airflow-VERSION (default 3.1.8,3.2.2,3.3.2)",
    ),
    (
        "RUNBELL_AIRFLOW_VENV",
        "tests/run, tests, bench",
        "one existing Airflow virtualenv to use instead of the matrix (default for the bench: ~/.cache/runbell/airflow-3.3.2)",
    ),
    ("RUNBELL_METAFLOW_VENV", "tests/run, tests", "the Metaflow virtualenv (default ~/.cache/runbell/metaflow-2.19.39)"),
    ("RUNBELL_REDIS_URL", "`runbell bench`", "the Redis it measures (its --redis-url; default redis://127.0.0.1:6379/0)"),
    ("RUNBELL_TEST_REDIS_URL", "tests", "the Redis the tests use (default redis://127.0.0.1:6379/0)"),
    ("RUNBELL_TEST_POSTGRES_URL", "tests", "the PostgreSQL server the tests make their databases on"),
    (
        "RUNBELL_TEST_TIME_LIMIT",
        "tests",
        "seconds one test may take, its set-up and tear-down included, before it fails showing every thread's and task's stack (default 600)",
    ),
    ("RUNBELL_CHROMIUM", "tests/browser", "the Chromium binary (default /usr/bin/chromium)"),
    ("RUNBELL_CHROMEDRIVER", "tests/browser", "its chromedriver (default /usr/bin/chromedriver)"),
    (
        "RUNBELL_UPDATE_SCREENSHOT",
        "tests/browser",
        "set: the dashboard test also writes the README's screenshot (tests/browser/dashboard.png)",
    ),
]

TOKEN_DOC = (
    "not read by Runbell: what the README's snippets send as the bearer token. One of the tokens in "
    "`RUNBELL_TOKENS` (with the role the endpoint needs: read to wait), or the run-scoped token a "
    "trigger answers with; `$ADMIN_TOKEN` is one with the admin role"
)
GATEWAY_READERS = "gateway (`runbell serve`)"
HOOK_READERS = "hook, `runbell emit`"
CLIENT_READERS = "`runbell run`, `wait`, `tail`"


def settings_table() -> str:
    """The README's settings table, in Markdown: every RUNBELL_* variable, which side reads it, and its flag."""
    rows = [("`$TOKEN`", "—", "you", TOKEN_DOC)]
    for field, meaning in SETTINGS_DOC:
        flag = flag_name(field)
        rows.append((f"`{env_name(field)}`", f"`{flag}`" if flag else "env only", GATEWAY_READERS, meaning))
    rows += [(f"`{name}`", "—", HOOK_READERS, meaning) for name, meaning in HOOK_SETTINGS_DOC]
    rows += [(f"`{name}`", f"`{flag}`", CLIENT_READERS, meaning) for name, flag, meaning in CLIENT_SETTINGS_DOC]
    rows += [(f"`{name}`", "—", readers, meaning) for name, readers, meaning in TOOLS_SETTINGS_DOC]
    lines = ["| variable | flag | read by | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def startup_line(settings: Settings, redis_url: str, embedded: bool) -> str:
    """What this gateway runs on, for the one log line at start: Redis, database, auth. No secrets."""
    redis = f"the EMBEDDED development broker at {redis_url}" if embedded else f"Redis at {without_password(redis_url)}"
    if settings.no_auth:
        auth = "auth OFF (--no-auth)"
    else:
        scoped = sum(1 for grant in settings.tokens.values() if not grant.dags.every_dag)
        auth = f"auth on ({len(settings.tokens)} tokens, {scoped} limited to some DAGs)"
    return f"runbell gateway on {settings.host}:{settings.port}: {redis}; database {without_password(settings.database_url)}; {auth}"


def load_settings(overrides: dict | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from RUNBELL_* environment variables, then the non-None overrides (flags)."""
    env = os.environ if env is None else env
    values: dict = {}
    for field, _ in SETTINGS_DOC:
        raw = env.get(env_name(field))
        if raw not in (None, ""):
            values[field] = _parse_bool(raw) if Settings.model_fields[field].annotation is bool else raw
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return Settings(**values)


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_bool(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m runbell.service.settings --markdown  (prints the README's settings table)")
    print(settings_table(), end="")
