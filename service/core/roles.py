"""Roles a bearer token may carry, the DAGs it may act on, and the RUNBELL_TOKENS syntax.

RUNBELL_TOKENS is a comma-separated list of ``token:role`` or ``token:role@pattern|pattern...``
entries. The role is one of ``read``, ``publish``, ``respond``, ``trigger``, ``admin``; what each one may do:

- read: wait for outcomes, stream events, list and read runs, backfills, assets, metrics;
- publish: read, and publish events (POST /v1/events);
- respond: read, and answer a task waiting for a person (POST .../tasks/{task_id}/input), passed on to
  Airflow with the gateway's own Airflow identity;
- trigger: read and respond, and trigger runs through Airflow (and unpause a paused DAG on request);
- admin: all of the above, and the admin endpoints (webhooks, dead letters).

The patterns name the DAG ids the token may act on: ``*`` matches any characters (none included),
every other character matches itself, case-sensitively (``etl_*`` covers ``etl_daily`` but not
``ETL_daily``). A token without ``@`` is a token for every DAG, as if it said ``@*``: the syntax of
before scopes keeps its meaning. An admin token is every DAG's (an admin manages webhooks and dead
letters, which span DAGs): patterns on it other than ``*`` are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from runbell.bus.schema import ID_MAX

WILDCARD = "*"
SCOPE_SEPARATOR = "@"
PATTERN_SEPARATOR = "|"
MAX_TOKENS = 1000
MAX_PATTERNS = 64  # per token
MAX_PATTERN_LENGTH = ID_MAX  # a pattern without wildcards is a DAG id


class Role(str, Enum):
    READ = "read"
    PUBLISH = "publish"
    RESPOND = "respond"
    TRIGGER = "trigger"
    ADMIN = "admin"

    def grants(self, needed: Role) -> bool:
        """Whether a token of this role may do what `needed` allows (see the module's table)."""
        return needed in _GRANTS[self]


_GRANTS = {
    Role.READ: {Role.READ},
    Role.PUBLISH: {Role.PUBLISH, Role.READ},
    Role.RESPOND: {Role.RESPOND, Role.READ},
    Role.TRIGGER: {Role.TRIGGER, Role.RESPOND, Role.READ},  # who starts a run may answer what it asks
    Role.ADMIN: set(Role),
}


@dataclass(frozen=True)
class DagScope:
    """The DAG ids a token may act on: glob patterns where only ``*`` is special."""

    patterns: tuple[str, ...] = (WILDCARD,)

    @property
    def every_dag(self) -> bool:
        return WILDCARD in self.patterns

    def allows(self, dag_id: str) -> bool:
        return self.every_dag or any(_compiled(p).fullmatch(dag_id) is not None for p in self.patterns)


EVERY_DAG = DagScope()


@dataclass(frozen=True)
class Grant:
    """What one token may do: its role, on which DAGs."""

    role: Role
    dags: DagScope = EVERY_DAG


_COMPILED: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    found = _COMPILED.get(pattern)
    if found is None:
        parts = pattern.split(WILDCARD)
        found = _COMPILED[pattern] = re.compile(".*".join(re.escape(part) for part in parts), re.DOTALL)
    return found


def parse_tokens(raw: str) -> dict[str, Grant]:
    """'tok1:read,tok2:publish@etl_*|billing' -> {token: Grant}. Raises ValueError naming the bad
    entry by its position (never the token)."""
    tokens: dict[str, Grant] = {}
    entries = [p.strip() for p in raw.split(",")]
    if sum(1 for entry in entries if entry) > MAX_TOKENS:
        raise ValueError(f"RUNBELL_TOKENS holds more than {MAX_TOKENS} tokens")
    for index, entry in enumerate(entries):
        if not entry:
            continue
        where = f"RUNBELL_TOKENS entry #{index + 1}"
        token, sep, grant = entry.rpartition(":")
        if not sep or not token:
            raise ValueError(f"{where} is not token:role or token:role@patterns")
        role_name, scoped, patterns = grant.partition(SCOPE_SEPARATOR)
        try:
            role = Role(role_name.strip())
        except ValueError:
            accepted = ", ".join(r.value for r in Role)
            raise ValueError(f"{where} has an unknown role (accepted: {accepted})") from None
        dags = parse_scope(patterns, where) if scoped else EVERY_DAG
        if role is Role.ADMIN and not dags.every_dag:
            raise ValueError(f"{where}: an admin token is every DAG's (admin endpoints span DAGs); give it no patterns")
        tokens[token] = Grant(role, dags)
    return tokens


def parse_scope(raw: str, where: str) -> DagScope:
    """'etl_*|billing' -> DagScope; ValueError for an empty, too long or too many pattern(s)."""
    patterns = [p.strip() for p in raw.split(PATTERN_SEPARATOR)]
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"{where} has more than {MAX_PATTERNS} DAG patterns")
    for pattern in patterns:
        if not 1 <= len(pattern) <= MAX_PATTERN_LENGTH:
            raise ValueError(f"{where}: each DAG pattern must be 1 to {MAX_PATTERN_LENGTH} characters (patterns are separated by |)")
    return DagScope(tuple(dict.fromkeys(patterns)))
