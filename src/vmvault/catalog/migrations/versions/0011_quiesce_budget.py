"""A VM's quiesce budget: seconds its freeze call (guest fsfreeze hooks included) may take

NULL: the service's setting (VMVAULT_QUIESCE_TIMEOUT, default 60 s).

Revision ID: 0011
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0014"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("quiesce_timeout_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("quiesce_timeout_s")
