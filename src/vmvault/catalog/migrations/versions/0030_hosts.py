"""Hosts of the deployment with their heartbeat, and the host each VM belongs to

Revision ID: 0030
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0030"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("address", sa.String(255), nullable=True),
        sa.Column("registered", sa.String(32), nullable=False),
        sa.Column("last_heartbeat", sa.String(32), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("host", sa.String(128), nullable=True))
        batch.create_index("ix_vms_host", ["host"])


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_host")
        batch.drop_column("host")
    op.drop_table("hosts")
