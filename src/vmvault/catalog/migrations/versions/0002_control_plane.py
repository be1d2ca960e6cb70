"""control plane: backup policies, item policy/exclusions/schedule anchor, job queue fields, notifications

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-20

Every existing vault gets a DefaultPolicy (daily 20:30 UTC, daily points kept 180 days) and
every existing protected item follows it. One Backup job per VM at a time is enforced by a
partial unique index on jobs(vm) over the InProgress Backup rows.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copy of the DefaultPolicy of this revision (the code's copy may change later).
_RUN_TIME = "2020-01-01T20:30:00+00:00"
_DEFAULT_POLICY = {
    "backupManagementType": "AzureIaasVM",
    "instantRpRetentionRangeInDays": 2,
    "schedulePolicy": {
        "schedulePolicyType": "SimpleSchedulePolicy",
        "scheduleRunFrequency": "Daily",
        "scheduleRunDays": None,
        "scheduleRunTimes": [_RUN_TIME],
        "scheduleWeeklyFrequency": 0,
    },
    "retentionPolicy": {
        "retentionPolicyType": "LongTermRetentionPolicy",
        "dailySchedule": {"retentionTimes": [_RUN_TIME], "retentionDuration": {"count": 180, "durationType": "Days"}},
        "weeklySchedule": None,
        "monthlySchedule": None,
        "yearlySchedule": None,
    },
    "timeZone": "UTC",
}
_ONE_BACKUP_WHERE = "status = 'InProgress' AND operation = 'Backup'"
_SUPERSEDED = {
    "code": "process_died",
    "message": "another backup of this VM was started after this one; this one did not finish",
    "recommendedAction": "run the backup again if no later recovery point exists",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vault_id", sa.Integer(), sa.ForeignKey("vaults.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("modified", sa.String(32), nullable=False),
        sa.UniqueConstraint("vault_id", "name", name="uq_policies_vault_name"),
    )
    with op.batch_alter_table("protected_items") as batch:
        batch.add_column(sa.Column("policy_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("excluded_disks", sa.JSON(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("schedule_anchor", sa.String(32), nullable=True))
        batch.create_foreign_key("fk_protected_items_policy_id", "policies", ["policy_id"], ["id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_vm_operation", "jobs", ["vm", "operation", "start_time"])
    op.create_table(
        "notification_targets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vault_id", sa.Integer(), sa.ForeignKey("vaults.id"), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("smtp", sa.String(), nullable=True),
        sa.Column("sender", sa.String(), nullable=True),
        sa.Column("events", sa.String(16), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("target_id", sa.Integer(), sa.ForeignKey("notification_targets.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lease_until", sa.String(32), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("sent", sa.String(32), nullable=True),
    )  # fmt: skip
    op.create_index("ix_notifications_status", "notifications", ["status"])
    _data_upgrade()
    op.create_index(
        "ux_jobs_one_backup_per_vm", "jobs", ["vm"], unique=True,
        sqlite_where=sa.text(_ONE_BACKUP_WHERE), postgresql_where=sa.text(_ONE_BACKUP_WHERE),
    )


def _data_upgrade() -> None:
    conn = op.get_bind()
    now = _now()
    properties = json.dumps(_DEFAULT_POLICY)
    for (vault_id,) in conn.execute(sa.text("SELECT id FROM vaults")).all():
        conn.execute(
            sa.text(
                "INSERT INTO policies (vault_id, name, properties, created, modified) "
                "VALUES (:v, 'DefaultPolicy', :p, :now, :now)"
            ),
            {"v": vault_id, "p": properties, "now": now},
        )
    conn.execute(
        sa.text(
            "UPDATE protected_items SET schedule_anchor = :now, policy_id = (SELECT p.id FROM policies p "
            "WHERE p.vault_id = protected_items.vault_id AND p.name = 'DefaultPolicy')"
        ),
        {"now": now},
    )
    # Older catalogs could hold two InProgress backups of one VM (a dead one not yet reaped):
    # keep the newest so the unique index can be built; the reaper fails the rest's owners later.
    # Only SQLite catalogs predate this revision (a PostgreSQL catalog starts empty at 0001).
    if conn.dialect.name != "sqlite":
        return
    conn.execute(
        sa.text(
            "UPDATE jobs SET status = 'Failed', end_time = :now, error = :err WHERE "
            + _ONE_BACKUP_WHERE
            + " AND rowid NOT IN (SELECT MAX(rowid) FROM jobs WHERE "
            + _ONE_BACKUP_WHERE
            + " GROUP BY vm)"
        ),
        {"now": now, "err": json.dumps(_SUPERSEDED)},
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_one_backup_per_vm", table_name="jobs")
    op.drop_table("notifications")
    op.drop_table("notification_targets")
    op.drop_index("ix_jobs_vm_operation", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("details")
        batch.drop_column("cancel_requested")
    with op.batch_alter_table("protected_items") as batch:
        batch.drop_constraint("fk_protected_items_policy_id", type_="foreignkey")
        batch.drop_column("schedule_anchor")
        batch.drop_column("excluded_disks")
        batch.drop_column("policy_id")
    op.drop_table("policies")
