"""Dead letters: stream entries the store refused on their own, kept with the error until re-driven.

One event the store could not hold used to stop the recorder for good (issue 11); the recorder now
moves such an entry here and goes on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(250)
KEY = sa.String(64)
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", KEY, nullable=False),
        sa.Column("stream_id", KEY, nullable=True),
        sa.Column("dag_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("dead_lettered_at", TIME, nullable=False),
        sa.Column("last_attempt_at", TIME, nullable=False),
        sa.UniqueConstraint("dag_id", "run_id", "event_id", name="uq_dead_letters_event"),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
