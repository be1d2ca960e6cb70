"""Point verification: the outcome of the last `vault verify` that checked a recovery point

A point whose verify failed is refused by restores and file recovery until a later verify passes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.add_column(sa.Column("verify_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("verify_time", sa.String(32), nullable=True))
        batch.add_column(sa.Column("verify_problem", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recovery_points") as batch:
        batch.drop_column("verify_problem")
        batch.drop_column("verify_time")
        batch.drop_column("verify_state")
