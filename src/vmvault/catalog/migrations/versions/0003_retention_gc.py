"""retention and soft delete: per-point rules and expiry, soft-deleted items and points

Revision ID: 0003
Revises: 0002
Create Date: 2026-01-21

Existing points were all taken by `backup now`: they stay on-demand points kept until their
retain_until date (their expiry is filled in from it here); the next Retention job or backup
records their rules.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.add_column(sa.Column("on_demand", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.add_column(sa.Column("retention_rules", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("expiry_time", sa.String(32), nullable=True))
        batch.add_column(sa.Column("soft_deleted", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("protected_items") as batch:
        batch.add_column(sa.Column("deferred_delete_time", sa.String(32), nullable=True))
    # retain_until is a UTC date kept through its end: the expiry is the next midnight UTC.
    # Only SQLite catalogs predate this revision (a PostgreSQL catalog starts empty at 0001).
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        "UPDATE recovery_points SET expiry_time = strftime('%Y-%m-%dT%H:%M:%S.000000Z', date(retain_until, '+1 day')), "
        "retention_rules = '[\"RetainUntil\"]' WHERE retain_until GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'"
    )


def downgrade() -> None:
    with op.batch_alter_table("protected_items") as batch:
        batch.drop_column("deferred_delete_time")
    with op.batch_alter_table("recovery_points") as batch:
        batch.drop_column("soft_deleted")
        batch.drop_column("expiry_time")
        batch.drop_column("retention_rules")
        batch.drop_column("on_demand")
