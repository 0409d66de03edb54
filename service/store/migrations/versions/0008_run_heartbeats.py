"""Run heartbeats: when a Metaflow run's task was last known alive.

The runs listing reads a Metaflow run still running as failed once its heartbeat is older than the
cutoff (Metaflow's own rule). A step's decorator sends heartbeats while it runs; the recorder keeps the
newest here. NULL: none received (every Airflow run), and the run's last event is its heartbeat.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("heartbeat_at")
