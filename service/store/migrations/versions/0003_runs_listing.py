"""Runs listing: indexes for keyset paging on (run_after, dag_id, run_id), per DAG and per backfill.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The keyset order itself: newest (or oldest) first, ties broken by dag_id then run_id.
    op.create_index("ix_runs_keyset", "runs", ["run_after", "dag_id", "run_id"])
    # One DAG's runs in keyset order (replaces dag_id, run_after: same prefix, plus the tie-break).
    op.create_index("ix_runs_dag_keyset", "runs", ["dag_id", "run_after", "run_id"])
    op.drop_index("ix_runs_dag_id_run_after", table_name="runs")
    # The plain run_after index is a prefix of ix_runs_keyset.
    op.drop_index("ix_runs_run_after", table_name="runs")
    op.create_index("ix_runs_backfill_id", "runs", ["backfill_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_backfill_id", table_name="runs")
    op.create_index("ix_runs_run_after", "runs", ["run_after"])
    op.create_index("ix_runs_dag_id_run_after", "runs", ["dag_id", "run_after"])
    op.drop_index("ix_runs_dag_keyset", table_name="runs")
    op.drop_index("ix_runs_keyset", table_name="runs")
