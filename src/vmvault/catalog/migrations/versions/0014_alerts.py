"""Alerts (an item's RPO breach, a vault short of space) and each vault's verification period

Revision ID: 0014
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("vm_name", sa.String(128), nullable=False),
        sa.Column("vault_id", sa.Integer(), nullable=False),
        sa.Column("raised", sa.String(32), nullable=False),
        sa.Column("resolved", sa.String(32), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_alerts_open", "alerts", ["kind", "vm_id", "resolved"])
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("alert_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("alert_event", sa.String(16), nullable=True))
    with op.batch_alter_table("vaults") as batch:
        batch.add_column(sa.Column("verify_every_days", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vaults") as batch:
        batch.drop_column("verify_every_days")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("alert_event")
        batch.drop_column("alert_id")
    op.drop_index("ix_alerts_open", table_name="alerts")
    op.drop_table("alerts")
