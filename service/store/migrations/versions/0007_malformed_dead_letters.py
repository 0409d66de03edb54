"""Dead letters of entries that are no event: kept as bytes, with the bus schema's reason.

A malformed entry on the global stream (not JSON, not an envelope, a value no store holds, larger than
any publisher may send) used to be skipped and counted only: its bytes were gone. It is now a dead
letter keyed ("", "", stream id) under the existing unique constraint (no event has an empty dag_id),
its bytes in a binary column (PostgreSQL's text cannot hold NUL, and the entry may not be UTF-8).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN on both stores (SQLite too: nullable, or with a constant default); rows from before
    # are events the store refused.
    op.add_column("dead_letters", sa.Column("reason", sa.String(16), nullable=False, server_default="store"))
    op.add_column("dead_letters", sa.Column("raw", sa.LargeBinary(), nullable=True))
    op.add_column("dead_letters", sa.Column("raw_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM dead_letters WHERE reason <> 'store'")  # they have no event to keep
    op.drop_column("dead_letters", "raw_size")
    op.drop_column("dead_letters", "raw")
    op.drop_column("dead_letters", "reason")
