"""Job list pages: an index in the list's order (start_time, id), so a page is read from the index

GET /api/v1/jobs asks for `ORDER BY start_time DESC, id DESC LIMIT n OFFSET m` (id breaks ties of
equal start times); with this index the catalog reads the page's entries only, with 100,000 jobs
too (docs/performance.md, Scale-out: the plans before and after).

Revision ID: 0042
Revises: 0032
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision: str = "0042"
down_revision: str | None = "0032"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_start_time_id", "jobs", ["start_time", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_start_time_id", table_name="jobs")
