"""Run callbacks: a webhook endpoint bound to one run, made by a trigger's `callback`.

`run_id` NULL: a subscription (every run of its DAGs, as before). Set: the endpoint gets only that
run's events, with the caller's `headers`, and takes no new message after `expires_at`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("run_id", sa.String(250), nullable=True))
        batch.add_column(sa.Column("headers", JSON, nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_webhook_endpoints_run_id", "webhook_endpoints", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_endpoints_run_id", table_name="webhook_endpoints")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("headers")
        batch.drop_column("run_id")
