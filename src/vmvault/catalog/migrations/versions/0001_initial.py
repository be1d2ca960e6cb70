"""initial catalog: vaults, vms, protected_items, recovery_points, jobs

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "vaults",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("storage_dir", sa.String(), nullable=False),
        sa.Column("uuid", sa.String(64), nullable=False, unique=True),
        sa.Column("redundancy", sa.String(8), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("disks", sa.JSON(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
    )
    op.create_table(
        "protected_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False, unique=True),
        sa.Column("vault_id", sa.Integer(), sa.ForeignKey("vaults.id"), nullable=False),
        sa.Column("protection_state", sa.String(32), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
    )
    op.create_table(
        "recovery_points",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
        sa.Column("vault_id", sa.Integer(), sa.ForeignKey("vaults.id"), nullable=False),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("consistency", sa.String(32), nullable=False),
        sa.Column("retain_until", sa.String(32), nullable=False),
        sa.Column("disks", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
    )
    op.create_index("ix_recovery_points_vm_time", "recovery_points", ["vm_id", "time"])
    op.create_index("ix_recovery_points_vault_id", "recovery_points", ["vault_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("vm", sa.String(128), nullable=True),
        sa.Column("vault", sa.String(64), nullable=True),
        sa.Column("start_time", sa.String(32), nullable=False),
        sa.Column("end_time", sa.String(32), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("owner_pid", sa.Integer(), nullable=False),
        sa.Column("owner_boot_id", sa.String(64), nullable=False),
        sa.Column("heartbeat", sa.String(32), nullable=False),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_start_time", "jobs", ["start_time"])


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("recovery_points")
    op.drop_table("protected_items")
    op.drop_table("vms")
    op.drop_table("vaults")
