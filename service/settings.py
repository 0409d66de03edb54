"""The gateway's settings: environment variables, overridden by command-line flags.

SETTINGS_DOC is the one description of every setting: a test holds the README table to it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping

from pydantic import BaseModel, Field, SecretStr, field_validator

from runbell.bus.keys import DEFAULT_NAMESPACE
from runbell.service.core.roles import Role, parse_tokens
from runbell.service.webhooks.dispatcher import (
    DEFAULT_WEBHOOK_SCHEDULE,
    webhook_schedule_seconds,
)
from runbell.service.webhooks.target_guard import TargetPolicy


class Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    redis_url: str | None = None  # None: Redis on localhost if it answers, else the embedded broker
    database_url: str = "sqlite:///runbell.db"
    namespace: str = DEFAULT_NAMESPACE
    tokens: dict[str, Role] = Field(default_factory=dict, repr=False)
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
    shutdown_grace: float = Field(default=5.0, ge=0)
    recorder: bool = True
    webhooks: bool = True
    webhook_allowed_hosts: str | None = None  # hosts or CIDRs webhooks may reach despite being private
    webhook_secret_grace: float = Field(default=24 * 3600.0, ge=0)
    webhook_attempt_timeout: float = Field(default=15.0, gt=0)
    webhook_schedule: str = DEFAULT_WEBHOOK_SCHEDULE
    stale_after: float = Field(default=360.0, gt=0)  # a running run silent this long is listed as stale
    airflow_database_url: SecretStr | None = None  # Airflow's metadata DB, read-only: backfill slots

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
                "no tokens configured: set RUNBELL_TOKENS='token:role,...' (roles: read, publish, admin),"
                " or pass --no-auth on a loopback address for local development"
            )
        if self.token_secret is not None and len(self.token_secret.get_secret_value().encode()) < 32:
            raise ValueError("RUNBELL_TOKEN_SECRET must be at least 32 bytes (it signs HS256 tokens)")
        if self.long_poll_default > self.long_poll_max:
            raise ValueError("long_poll_default must not exceed long_poll_max")


ENV_PREFIX = "RUNBELL_"

# (field, env var, meaning) for the README table and --help.
SETTINGS_DOC: list[tuple[str, str]] = [
    ("host", "address to bind (default 127.0.0.1)"),
    ("port", "port to bind (default 8080)"),
    ("redis_url", "Redis URL; unset: localhost:6379 if it answers, else an embedded development broker"),
    ("database_url", "SQLAlchemy URL of the store (postgresql://... in production; default sqlite:///runbell.db)"),
    ("namespace", "prefix of every Redis key; hook and gateway must agree (default runbell)"),
    ("tokens", "bearer tokens as comma-separated token:role pairs; roles read, publish, admin"),
    ("no_auth", "turn auth off (only allowed when bound to loopback)"),
    ("token_secret", "secret that signs run-scoped tokens; replicas must share it (default: random per process)"),
    ("scoped_token_ttl", "lifetime of a run-scoped token, seconds (default 3600)"),
    ("airflow_url", "Airflow's base URL, for triggering and reconciling (unset: neither)"),
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
    ("shutdown_grace", "seconds given to clients to leave on SIGTERM (default 5)"),
    ("recorder", "run the recorder (global stream -> store) in this process (default true)"),
    ("webhooks", "run the webhook dispatcher (outbox -> receivers) in this process (default true)"),
    (
        "webhook_allowed_hosts",
        "comma-separated hosts or CIDRs webhooks may reach although they resolve to "
        "private, loopback or link-local addresses (default: none)",
    ),
    ("webhook_secret_grace", "seconds the old secret still signs, beside the new one, after a rotation (default 86400)"),
    (
        "webhook_schedule",
        "webhook attempts: comma-separated seconds before each, after the previous one failed, "
        "each ±20% (default 0,5,300,1800,7200,18000,36000,36000); after the last, the message is dead-lettered",
    ),
    (
        "webhook_attempt_timeout",
        "seconds one delivery attempt may take (default 15); the attempts of a gateway killed "
        "mid-delivery are taken over after twice that plus 5",
    ),
    ("stale_after", "a run still running after this many seconds without an event is listed with stale: true (default 360)"),
    (
        "airflow_database_url",
        "SQLAlchemy URL of Airflow's metadata database, read only, for backfill slots (GET /v1/backfills/...; unset: those answer 503)",
    ),
    ("log_level", "debug, info, warning, error (default info)"),
]


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


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
