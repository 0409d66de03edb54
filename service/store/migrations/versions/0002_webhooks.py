"""Webhooks: endpoints, the outbox of messages (one row per endpoint per message), attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(250)
KEY = sa.String(64)
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", KEY, primary_key=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("dag_ids", JSON, nullable=True),
        sa.Column("kinds", JSON, nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("previous_secret", sa.Text(), nullable=True),
        sa.Column("previous_secret_expires_at", TIME, nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("failing_since", TIME, nullable=True),
    )
    op.create_table(
        "webhook_messages",
        sa.Column("id", KEY, primary_key=True),
        sa.Column("endpoint_id", KEY, nullable=False),
        sa.Column("dag_id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("terminal", sa.Boolean(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIME, nullable=True),
        sa.Column("locked_by", sa.String(200), nullable=True),
        sa.Column("locked_until", TIME, nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("delivered_at", TIME, nullable=True),
        sa.UniqueConstraint("endpoint_id", "dag_id", "run_id", "seq", "kind", name="uq_webhook_messages_event"),
    )
    op.create_index("ix_webhook_messages_due", "webhook_messages", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_messages_endpoint_created", "webhook_messages", ["endpoint_id", "created_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_id", KEY, nullable=False),
        sa.Column("endpoint_id", KEY, nullable=False),
        sa.Column("attempted_at", TIME, nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
    )
    op.create_index("ix_webhook_attempts_message", "webhook_attempts", ["message_id", "id"])
    op.create_index("ix_webhook_attempts_endpoint", "webhook_attempts", ["endpoint_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_attempts_endpoint", table_name="webhook_attempts")
    op.drop_index("ix_webhook_attempts_message", table_name="webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_messages_endpoint_created", table_name="webhook_messages")
    op.drop_index("ix_webhook_messages_due", table_name="webhook_messages")
    op.drop_table("webhook_messages")
    op.drop_table("webhook_endpoints")
