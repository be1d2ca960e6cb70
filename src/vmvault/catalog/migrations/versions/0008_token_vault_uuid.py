"""Token scopes bound to the vault's UUID, not its name

A vault deleted and re-created under the same name is another vault: tokens scoped to the old one
must not reach it. Existing scoped tokens get the UUID of the vault their name names today; a
token whose vault no longer exists keeps none and is refused (service/tokens.py).

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("vault_uuid", sa.String(64), nullable=True))
    op.execute(
        "UPDATE api_tokens SET vault_uuid = (SELECT uuid FROM vaults WHERE vaults.name = api_tokens.vault) "
        "WHERE vault IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("vault_uuid")
