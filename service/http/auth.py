"""Bearer tokens with roles and DAG scopes (runbell.service.core.roles), checked on every endpoint.

Each endpoint says what it touches: one DAG (`dag_id=`, or `run=` for one run), several that it
checks or filters itself (`per_dag=True`, then `Principal.check_dag` or `Principal.dags`), or, by
default, every DAG: then only a token whose scope is every DAG passes. A request outside the token's
scope is a 403 `token_scope`, which says nothing about whether the DAG exists.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt
from starlette.requests import Request

from runbell.service.core import clock
from runbell.service.core.roles import EVERY_DAG, DagScope, Grant, Role
from runbell.service.http.errors import ApiError

QUERY_TOKEN_PARAM = "access_token"  # EventSource cannot send headers


@dataclass(frozen=True)
class Principal:
    role: Role | None  # None when auth is off
    run: tuple[str, str] | None = None  # set for a run-scoped token: the one run it may read
    dags: DagScope = EVERY_DAG  # the DAGs the token may act on

    def check_dag(self, dag_id: str) -> None:
        """403 token_scope unless the token may act on this DAG."""
        if not self.dags.allows(dag_id) or (self.run is not None and self.run[0] != dag_id):
            raise out_of_scope()


def out_of_scope() -> ApiError:
    return ApiError(403, "token_scope", "this token is not allowed to act on this DAG (see its @patterns in RUNBELL_TOKENS)")


def authorize(
    request: Request,
    needed: Role,
    *,
    dag_id: str | None = None,
    run: tuple[str, str] | None = None,
    per_dag: bool = False,
    query_token: bool = False,
) -> Principal:
    """Check the caller's token against the needed role and the DAGs the endpoint touches.

    `dag_id`: the one DAG it acts on. `run`: the one run (endpoints of one run also take the token as
    ?access_token=, since EventSource cannot send headers, and accept a run-scoped token of that run,
    for reading). `per_dag`: the caller checks each DAG itself (Principal.check_dag) or filters by
    Principal.dags. None of them: the endpoint spans every DAG, so the token's scope must be every DAG.
    Other streaming endpoints pass `query_token` to take ?access_token= too.
    """
    settings = request.app.state.settings
    if settings.no_auth:
        return Principal(role=None)
    presented = _presented_token(request, allow_query_token=run is not None or query_token)
    if presented is None:
        raise ApiError(401, "missing_token", "send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    grant = _lookup(settings.tokens, presented)
    if grant is None and presented.count(".") == 2:  # a run-scoped token (JWT)
        return _authorize_scoped(request.app.state.token_secret, presented, needed, run)
    if grant is None:
        raise ApiError(401, "bad_token", "the token is not valid", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if not grant.role.grants(needed):
        raise ApiError(403, "forbidden", f"this endpoint needs the {needed.value} role; the token has {grant.role.value}")
    principal = Principal(role=grant.role, dags=grant.dags)
    if run is not None:
        dag_id = run[0]
    if dag_id is not None:
        principal.check_dag(dag_id)
    elif not per_dag and not grant.dags.every_dag:
        raise ApiError(403, "token_scope", "this endpoint spans every DAG; this token is limited to some DAGs")
    return principal


# -- run-scoped tokens (JWT) ------------------------------------------------------------------------

SCOPED_ISSUER = "runbell"
SCOPED_SCOPE = "run:read"


def issue_run_token(secret: str, dag_id: str, run_id: str, ttl: float) -> tuple[str, datetime]:
    """A short-lived token that may read one run's result and events, and nothing else."""
    now = clock.now()
    expires = now + timedelta(seconds=ttl)
    claims = {
        "iss": SCOPED_ISSUER,
        "scope": SCOPED_SCOPE,
        "dag_id": dag_id,
        "run_id": run_id,
        "iat": int(now.timestamp()),
        "exp": int(expires.timestamp()),
    }
    return jwt.encode(claims, secret, algorithm="HS256"), expires


def _authorize_scoped(secret: str, presented: str, needed: Role, run: tuple[str, str] | None) -> Principal:
    try:
        claims = jwt.decode(presented, secret, algorithms=["HS256"], issuer=SCOPED_ISSUER, options={"require": ["exp", "iss"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "token_expired", "the run-scoped token has expired") from None
    except jwt.InvalidTokenError:
        raise ApiError(401, "bad_token", "the token is not valid", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    if claims.get("scope") != SCOPED_SCOPE or run is None or (claims.get("dag_id"), claims.get("run_id")) != run:
        raise ApiError(403, "token_scope", "this token may read one run's result and events, nothing else")
    if needed is not Role.READ:
        raise ApiError(403, "forbidden", f"a run-scoped token can only read; this endpoint needs {needed.value}")
    return Principal(role=Role.READ, run=run)


def _presented_token(request: Request, allow_query_token: bool) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "bad_token", "the Authorization header must be 'Bearer <token>'")
        return value.strip()
    if allow_query_token:
        return request.query_params.get(QUERY_TOKEN_PARAM) or None
    return None


def _lookup(tokens: dict[str, Grant], presented: str) -> Grant | None:
    # Compare against every token in constant time, so timing does not reveal a prefix.
    found: Grant | None = None
    for token, grant in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = grant
    return found
