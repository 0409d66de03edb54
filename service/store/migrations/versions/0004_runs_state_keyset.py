"""Runs listing: the status filter in keyset order, (state, run_after, dag_id, run_id).

A rare state (running, queued) among many finished runs was found by scanning ix_runs_keyset and
discarding the rest: 16,000 rows and ~38 ms per page over 100,000 runs (runbell bench --listing);
with this index, under a millisecond.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_runs_state_keyset", "runs", ["state", "run_after", "dag_id", "run_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_state_keyset", table_name="runs")
