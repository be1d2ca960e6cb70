"""Catalog tables: an index of vaults, VMs and jobs; manifests in the vaults stay the truth.

Times are stored as ISO 8601 UTC strings with microseconds (``2025-01-02T03:04:05.123456Z``):
they sort as text and round-trip exactly into manifests.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[dict[str, Any]]: JSON}


class VaultRow(Base):
    __tablename__ = "vaults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    storage_dir: Mapped[str] = mapped_column(String)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    redundancy: Mapped[str] = mapped_column(String(8))
    chunk_size: Mapped[int] = mapped_column(Integer)
    created: Mapped[str] = mapped_column(String(32))
    # 0014: days in which scheduled verification re-reads all its points (0: off; None: serve's --verify-every).
    verify_every_days: Mapped[int | None] = mapped_column(Integer, default=None)
    # 0032: GRS. The secondary's location (a directory or URL; no credentials) and the replication
    # state vault show reports ({state, lastReplicatedPoint, lagSeconds, lagBytes, lastError, ...}).
    secondary_storage: Mapped[str | None] = mapped_column(String, default=None)
    replication: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class VmRow(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "disks" | "imported"
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, path}]
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[str] = mapped_column(String(32))
    # 0011: seconds a live backup's freeze call may take (None: the service's setting)
    quiesce_timeout_s: Mapped[int | None] = mapped_column(Integer, default=None)
    # 0030: the host (hosts.name) whose disks these are and that runs its jobs; None: the servers' own
    host: Mapped[str | None] = mapped_column(String(128), default=None, index=True)


class ProtectedItemRow(Base):
    __tablename__ = "protected_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), unique=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    protection_state: Mapped[str] = mapped_column(String(32))  # IRPending | Protected | ProtectionStopped
    created: Mapped[str] = mapped_column(String(32))
    # 0002: the policy it follows, disks left out of its backups, and the instant after which the
    # scheduler looks for the next slot (moved to "now" whenever a scheduled backup is queued).
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), default=None)
    excluded_disks: Mapped[list[str]] = mapped_column(JSON, default=list)
    schedule_anchor: Mapped[str | None] = mapped_column(String(32), default=None)
    # 0003: soft delete (protection disable --delete-data): the instant after which the retention
    # job purges the item and its points; None while the item is not soft deleted.
    deferred_delete_time: Mapped[str | None] = mapped_column(String(32), default=None)


class RecoveryPointRow(Base):
    __tablename__ = "recovery_points"
    __table_args__ = (Index("ix_recovery_points_vm_time", "vm_id", "time"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"), index=True)
    time: Mapped[str] = mapped_column(String(32))
    consistency: Mapped[str] = mapped_column(String(32))
    retain_until: Mapped[str] = mapped_column(String(32))
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, size, sourceFormat}]
    job_id: Mapped[str] = mapped_column(String(64), default="")
    # 0003: retention (service/retention.py). An on-demand point is kept until retain_until; a
    # scheduled one (on_demand False) by its item's policy. retention_rules names the rules keeping
    # it (Daily, Weekly, Monthly, Yearly, RetainUntil, Latest, NoPolicy); expiry_time is the latest
    # of their expiries (ISO UTC; None: no rule expires it). soft_deleted: its item is soft deleted.
    on_demand: Mapped[bool] = mapped_column(Boolean, default=True)
    retention_rules: Mapped[list[str]] = mapped_column(JSON, default=list)
    expiry_time: Mapped[str | None] = mapped_column(String(32), default=None)
    soft_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    # 0006: the last `vault verify` that checked this point: "Passed" or "Failed" (None: never
    # verified), when (ISO UTC) and the first problem found. A Failed point is not restored or mounted.
    verify_state: Mapped[str | None] = mapped_column(String(16), default=None)
    verify_time: Mapped[str | None] = mapped_column(String(32), default=None)
    verify_problem: Mapped[str | None] = mapped_column(Text, default=None)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_start_time", "start_time"),
        Index("ix_jobs_start_time_id", "start_time", "id"),  # 0042: the job list's order (pages in SQL)
        Index("ix_jobs_vm_operation", "vm", "operation", "start_time"),
        # 0002: one Backup per VM at a time, whoever starts it (CLI, scheduler, worker).
        Index(
            "ux_jobs_one_backup_per_vm",
            "vm",
            unique=True,
            sqlite_where=text("status = 'InProgress' AND operation = 'Backup'"),
            postgresql_where=text("status = 'InProgress' AND operation = 'Backup'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    vm: Mapped[str | None] = mapped_column(String(128))
    vault: Mapped[str | None] = mapped_column(String(64))
    start_time: Mapped[str] = mapped_column(String(32))
    end_time: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)  # {percent, bytesRead, bytesWritten}
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {code, message, recommendedAction}
    owner_pid: Mapped[int] = mapped_column(Integer)
    owner_boot_id: Mapped[str] = mapped_column(String(64))
    heartbeat: Mapped[str] = mapped_column(String(32))
    # 0002: owner_pid 0 = queued, not claimed by any process yet; a worker claims it by a
    # conditional update. cancel_requested is polled by whoever runs the job.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class PolicyRow(Base):
    """A backup policy of a vault; properties are Azure's policy properties (domain.policy)."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("vault_id", "name", name="uq_policies_vault_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    name: Mapped[str] = mapped_column(String(64))
    properties: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[str] = mapped_column(String(32))
    modified: Mapped[str] = mapped_column(String(32))


class NotificationTargetRow(Base):
    """Where a vault's job notifications go: a webhook URL or an e-mail address (+ SMTP server)."""

    __tablename__ = "notification_targets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # webhook | email
    address: Mapped[str] = mapped_column(String)  # URL or e-mail address
    smtp: Mapped[str | None] = mapped_column(String, default=None)  # HOST:PORT (e-mail)
    sender: Mapped[str | None] = mapped_column(String, default=None)  # From: (e-mail)
    events: Mapped[str] = mapped_column(String(16))  # failed | all
    created: Mapped[str] = mapped_column(String(32))


class NotificationRow(Base):
    """The outbox: one row per (target, ended job), delivered by whoever gets the lease."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("notification_targets.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[str | None] = mapped_column(String(32), default=None)
    last_error: Mapped[str | None] = mapped_column(String, default=None)
    created: Mapped[str] = mapped_column(String(32))
    sent: Mapped[str | None] = mapped_column(String(32), default=None)
    # 0014: a notification about an alert (job_id ""): which alert, and "raised" or "resolved".
    alert_id: Mapped[int | None] = mapped_column(Integer, default=None)
    alert_event: Mapped[str | None] = mapped_column(String(16), default=None)


class FileRecoverySessionRow(Base):
    """0004: a file-recovery session: one recovery point served (and maybe mounted) until `expires`.

    No foreign keys on purpose: retention may delete the point's row while a session still holds
    it (a vault pin keeps its data until the session ends).
    """

    __tablename__ = "file_recovery_sessions"
    __table_args__ = (Index("ix_file_recovery_sessions_state", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(64))
    vm_name: Mapped[str] = mapped_column(String(128))
    rp_id: Mapped[str] = mapped_column(String(32), index=True)
    vault_id: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # Starting | Active | Ended
    mountpoint: Mapped[str | None] = mapped_column(String, default=None)  # None: served, not mounted here
    created: Mapped[str] = mapped_column(String(32))
    expires: Mapped[str] = mapped_column(String(32))
    ended: Mapped[str | None] = mapped_column(String(32), default=None)
    end_reason: Mapped[str | None] = mapped_column(String(32), default=None)  # Unmounted | Expired | ...
    owner_pid: Mapped[int] = mapped_column(Integer, default=0)
    owner_boot_id: Mapped[str] = mapped_column(String(64), default="")
    run_dir: Mapped[str] = mapped_column(String)
    tcp_address: Mapped[str | None] = mapped_column(String(128), default=None)  # host:port of the TLS export
    ca_cert: Mapped[str | None] = mapped_column(String, default=None)  # PEM the clients pin
    volumes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # mount.Volume dicts
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # disks, errors, created dirs


class FileRecoverySecretRow(Base):
    """0004: a password minted by `vmvault files script`, kept only as its SHA-256."""

    __tablename__ = "file_recovery_secrets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(32), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[str] = mapped_column(String(32))
    expires: Mapped[str] = mapped_column(String(32))


class ApiTokenRow(Base):
    """0005: a bearer token of the REST API, kept only as the SHA-256 of its secret.

    role is one of Owner, BackupContributor, BackupOperator, BackupReader (api/auth.py); vault
    (a vault name) scopes it to one vault, None: every vault. 0008: vault_uuid binds the scope to
    that vault's UUID (a vault re-created under the same name is another vault).
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    vault: Mapped[str | None] = mapped_column(String(64), default=None)
    created: Mapped[str] = mapped_column(String(32))
    expires: Mapped[str | None] = mapped_column(String(32), default=None)
    revoked: Mapped[str | None] = mapped_column(String(32), default=None)
    last_used: Mapped[str | None] = mapped_column(String(32), default=None)
    vault_uuid: Mapped[str | None] = mapped_column(String(64), default=None)
    host: Mapped[str | None] = mapped_column(String(128), default=None)  # 0040: a BackupAgent token's host


class AlertRow(Base):
    """0014: an alert about an item (kind RpoBreached): raised once, resolved once; notified both times."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_open", "kind", "vm_id", "resolved"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    vm_id: Mapped[str] = mapped_column(String(64))
    vm_name: Mapped[str] = mapped_column(String(128))
    vault_id: Mapped[int] = mapped_column(Integer)
    raised: Mapped[str] = mapped_column(String(32))
    resolved: Mapped[str | None] = mapped_column(String(32), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # lastGoodPoint, deadline, policy, ...


class HostRow(Base):
    """0030: a machine of the deployment, with its heartbeat: a server (each `vmvault serve`
    registers the machine it runs on) or, later, an agent on a hypervisor host.

    Online while last_heartbeat is younger than the lease (service/hosts.py); boot_id ties the
    jobs its processes own (jobs.owner_boot_id) to it.
    """

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # Server | Agent
    version: Mapped[str] = mapped_column(String(32))
    boot_id: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str | None] = mapped_column(String(255), default=None)  # a server's API URL
    registered: Mapped[str] = mapped_column(String(32))
    last_heartbeat: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # pids, hypervisors found, ...
