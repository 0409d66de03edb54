"""Epochs: an event's place is (epoch, seq), not seq alone.

Redis that lost a run's state (a restart without persistence, a fail-over to a replica without the
last writes) numbers the run's events from 1 again, in a new epoch (runbell.bus.schema). Keyed by
seq alone, the store took them for the events it had and dropped them, outcome included. Events are
now keyed by (dag_id, run_id, epoch, seq); a run's row keeps the epoch of its last_seq; a webhook
message is one per (endpoint, run, epoch, seq, kind). Rows from before have the legacy epoch "".

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EPOCH_MAX = 32  # runbell.bus.schema.EPOCH_MAX (a migration does not import the code it migrates)
UNIQUE_MESSAGE = "uq_webhook_messages_event"
ID = sa.String(250)  # as migration 0001 made them
TIME = sa.DateTime(timezone=True)


def _epoch() -> sa.Column:
    return sa.Column("epoch", sa.String(EPOCH_MAX), nullable=False, server_default="")


def upgrade() -> None:
    op.add_column("runs", _epoch())
    if op.get_bind().dialect.name == "sqlite":  # SQLite cannot alter a key: the tables are copied
        _copy_events_with_epoch()
        with op.batch_alter_table("webhook_messages", recreate="always") as batch:
            batch.add_column(_epoch())
            batch.drop_constraint(UNIQUE_MESSAGE, type_="unique")
            batch.create_unique_constraint(UNIQUE_MESSAGE, ["endpoint_id", "dag_id", "run_id", "epoch", "seq", "kind"])
        return
    op.add_column("events", _epoch())
    op.drop_constraint("events_pkey", "events", type_="primary")
    op.create_primary_key("events_pkey", "events", ["dag_id", "run_id", "epoch", "seq"])
    op.add_column("webhook_messages", _epoch())
    op.drop_constraint(UNIQUE_MESSAGE, "webhook_messages", type_="unique")
    op.create_unique_constraint(UNIQUE_MESSAGE, "webhook_messages", ["endpoint_id", "dag_id", "run_id", "epoch", "seq", "kind"])


def _copy_events_with_epoch() -> None:
    """SQLite: the events table again, keyed with the epoch, its rows copied over (legacy epoch)."""
    op.create_table(
        "events_with_epoch",
        sa.Column("dag_id", ID, primary_key=True),
        sa.Column("run_id", ID, primary_key=True),
        sa.Column("epoch", sa.String(EPOCH_MAX), primary_key=True, server_default=""),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("task_id", ID, nullable=True),
        sa.Column("ts", TIME, nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
    )
    columns = "dag_id, run_id, seq, kind, state, task_id, ts, envelope"
    op.execute(f"INSERT INTO events_with_epoch ({columns}) SELECT {columns} FROM events")
    op.drop_table("events")
    op.rename_table("events_with_epoch", "events")


def downgrade() -> None:
    raise NotImplementedError("events of two epochs can share a seq: they cannot be keyed by seq again")
