"""The store's tables: runs, task_instances, events.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(250)
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("dag_id", ID, primary_key=True),
        sa.Column("run_id", ID, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("run_type", sa.String(64), nullable=True),
        sa.Column("logical_date", TIME, nullable=True),
        sa.Column("run_after", TIME, nullable=False),
        sa.Column("backfill_id", ID, nullable=True),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("ended_at", TIME, nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("last_event_at", TIME, nullable=False),
        sa.Column("outcome_status", sa.String(16), nullable=False),
        sa.Column("outcome", JSON, nullable=False),
        sa.Column("result_task", JSON, nullable=True),
        sa.Column("first_failure", JSON, nullable=True),
    )
    op.create_index("ix_runs_run_after", "runs", ["run_after"])
    op.create_index("ix_runs_dag_id_run_after", "runs", ["dag_id", "run_after"])
    op.create_table(
        "task_instances",
        sa.Column("dag_id", ID, primary_key=True),
        sa.Column("run_id", ID, primary_key=True),
        sa.Column("task_id", ID, primary_key=True),
        sa.Column("map_index", sa.Integer(), primary_key=True),
        sa.Column("try_number", sa.Integer(), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("ended_at", TIME, nullable=True),
    )
    op.create_table(
        "events",
        sa.Column("dag_id", ID, primary_key=True),
        sa.Column("run_id", ID, primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("task_id", ID, nullable=True),
        sa.Column("ts", TIME, nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("task_instances")
    op.drop_index("ix_runs_dag_id_run_after", table_name="runs")
    op.drop_index("ix_runs_run_after", table_name="runs")
    op.drop_table("runs")
