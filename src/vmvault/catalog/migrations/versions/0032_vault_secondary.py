"""GRS: a vault's secondary location and the state of its replication (vault/replicate.py)

Revision ID: 0032
Revises: 0030
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0032"
down_revision: str | None = "0030"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("vaults") as batch:
        batch.add_column(sa.Column("secondary_storage", sa.String(), nullable=True))
        batch.add_column(sa.Column("replication", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vaults") as batch:
        batch.drop_column("replication")
        batch.drop_column("secondary_storage")
