"""Alembic environment for the store, driven from code (there is no alembic.ini).

Give it, through ``Config.attributes`` (see ``runbell.service.store.store.alembic_config``), either
``connection``: a sync Connection inside an open transaction, as ``AsyncConnection.run_sync`` hands
out (what ``Store.start`` does, from within the running event loop); or ``engine``: an AsyncEngine,
used through ``asyncio.run`` when no event loop is running (scripts, ``alembic revision
--autogenerate`` driven by ``alembic.command``).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from runbell.service.store.models import Base

VERSION_TABLE = "runbell_alembic_version"  # not alembic_version: the database may be shared
MIGRATION_LOCK = 0x72756E62656C6C  # pg_advisory_xact_lock key ("runbell")

config = context.config


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Replicas starting together take turns; the later ones find the schema at head.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_engine(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()  # its connections belong to this short-lived event loop


def main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("runbell migrations run online only")
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("pass a 'connection' or an 'engine' in the Alembic config attributes")
    asyncio.run(run_with_engine(engine))


main()
