"""Run progress: the last value per key of each run's partial output (runbell.listeners.progress).

Progress events are no outcome: the store does not keep them as events (the replay log has every one
for as long as it lives), only each key's latest value, for a reader that comes late.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(250)
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "run_progress",
        sa.Column("dag_id", ID, primary_key=True),
        sa.Column("run_id", ID, primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("task_id", ID, nullable=False),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("value", JSON, nullable=True),
        sa.Column("ts", TIME, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("run_progress")
