"""file recovery: sessions (served/mounted recovery points) and script passwords

Revision ID: 0004
Revises: 0003
Create Date: 2026-01-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "file_recovery_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("vm_name", sa.String(128), nullable=False),
        sa.Column("rp_id", sa.String(32), nullable=False),
        sa.Column("vault_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mountpoint", sa.String(), nullable=True),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("expires", sa.String(32), nullable=False),
        sa.Column("ended", sa.String(32), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("owner_pid", sa.Integer(), nullable=False),
        sa.Column("owner_boot_id", sa.String(64), nullable=False),
        sa.Column("run_dir", sa.String(), nullable=False),
        sa.Column("tcp_address", sa.String(128), nullable=True),
        sa.Column("ca_cert", sa.String(), nullable=True),
        sa.Column("volumes", sa.JSON(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_file_recovery_sessions_state", "file_recovery_sessions", ["state"])
    op.create_index("ix_file_recovery_sessions_rp_id", "file_recovery_sessions", ["rp_id"])
    op.create_table(
        "file_recovery_secrets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("expires", sa.String(32), nullable=False),
    )
    op.create_index("ix_file_recovery_secrets_session_id", "file_recovery_secrets", ["session_id"])


def downgrade() -> None:
    op.drop_table("file_recovery_secrets")
    op.drop_table("file_recovery_sessions")
