"""Roles a bearer token may carry, and the RUNBELL_TOKENS syntax that assigns them."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    READ = "read"
    PUBLISH = "publish"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Role.READ: 0, Role.PUBLISH: 1, Role.ADMIN: 2}


def parse_tokens(raw: str) -> dict[str, Role]:
    """'tok1:read,tok2:admin' -> {token: role}. Raises ValueError naming the bad pair (never the token)."""
    tokens: dict[str, Role] = {}
    for index, pair in enumerate(p.strip() for p in raw.split(",")):
        if not pair:
            continue
        token, sep, role = pair.rpartition(":")
        if not sep or not token:
            raise ValueError(f"RUNBELL_TOKENS entry #{index + 1} is not token:role")
        try:
            tokens[token] = Role(role.strip())
        except ValueError:
            accepted = ", ".join(r.value for r in Role)
            raise ValueError(f"RUNBELL_TOKENS entry #{index + 1} has unknown role (accepted: {accepted})") from None
    return tokens
