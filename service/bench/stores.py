"""The stores the bench runs the gateway on: SQLite always, PostgreSQL where a server answers.

Every gateway of the bench gets a store of its own, empty, so the two databases start equal: a fresh
SQLite file, or a scratch database made on the PostgreSQL server (and dropped after). Where the
server's user may not create databases, the database of the URL itself is used, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from runbell.service.bench.measure import say
from runbell.service.core.redaction import without_password

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"  # the local server a developer runs
CONNECT_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class StoreKind:
    """One column of the matrix: "sqlite" or "postgresql", the server's URL (PostgreSQL), and why it
    cannot be measured (not reachable), if so."""

    name: str
    server_url: str | None = None
    unreachable: str | None = None

    @property
    def described(self) -> str:
        if self.name == "sqlite":
            return "sqlite (a fresh file per gateway)"
        return f"{without_password(self.server_url or '')} (a scratch database per gateway)"


def store_matrix(database_url: str | None) -> list[StoreKind]:
    """SQLite, and PostgreSQL at `database_url` (default: the local server), the latter marked
    unreachable (a failed measurement, not a crash) where it does not answer."""
    url = database_url or DEFAULT_POSTGRES_URL
    if not url.startswith(("postgresql", "postgres")):
        raise ValueError(f"the bench always runs SQLite on fresh files; --database-url names the PostgreSQL server, not {url!r}")
    return [StoreKind("sqlite"), StoreKind("postgresql", url, postgres_unreachable(url))]


def admin_url(url: str, database: str = "postgres") -> str:
    """The plain postgresql:// URL of `database` on the server of `url` (asyncpg takes no +driver)."""
    return f"postgresql://{urlsplit(url).netloc}/{database}"


async def admin_sql(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def postgres_unreachable(url: str) -> str | None:
    """None when the server of `url` answers a query; else why not (with the URL, its password masked)."""
    try:
        asyncio.run(admin_sql(admin_url(url, urlsplit(url).path.lstrip("/") or "postgres"), "SELECT 1"))
    except Exception as exc:  # any failure to connect is the answer, not an error of the bench
        return f"PostgreSQL at {without_password(url)} not reachable: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def scratch_postgres(url: str, label: str = "bench", fallback: bool = True) -> Iterator[str]:
    """A database of its own on the server of `url`, dropped afterwards: its SQLAlchemy URL. Where
    it cannot be created (the user lacks CREATEDB): `url` itself with `fallback`, else the error."""
    from runbell.service.store.store import normalize_database_url

    name = f"runbell_{label}_{uuid.uuid4().hex[:8]}"
    admin = admin_url(url)
    try:
        asyncio.run(admin_sql(admin, f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no CREATEDB: the given database it is, not fresh (said)
        if not fallback:
            raise
        say(f"no scratch database on {without_password(url)} ({type(exc).__name__}): the gateway uses that database as it is")
        yield normalize_database_url(admin_url(url, urlsplit(url).path.lstrip("/") or "postgres"))
        return
    try:
        yield normalize_database_url(admin_url(url, name))
    finally:
        asyncio.run(admin_sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def fresh_store(kind: StoreKind, label: str = "bench") -> Iterator[str]:
    """An empty store of this kind for one gateway: its URL."""
    if kind.name == "sqlite":
        yield f"sqlite:///{Path(tempfile.mkdtemp()) / f'{label}.db'}"
        return
    assert kind.server_url is not None
    with scratch_postgres(kind.server_url, label) as url:
        yield url
