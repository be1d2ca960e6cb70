"""Small query and update functions over the catalog; callers own the transaction (Session)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import (
    ApiTokenRow,
    FileRecoverySecretRow,
    FileRecoverySessionRow,
    JobRow,
    NotificationRow,
    NotificationTargetRow,
    PolicyRow,
    ProtectedItemRow,
    RecoveryPointRow,
    VaultRow,
    VmRow,
)
from vmvault.errors import NotFound

IN_PROGRESS = "InProgress"

# ---- vaults -------------------------------------------------------------------------------------


def find_vault(s: Session, name: str) -> VaultRow | None:
    return s.scalars(select(VaultRow).where(VaultRow.name == name)).first()


def get_vault(s: Session, name: str) -> VaultRow:
    row = find_vault(s, name)
    if row is None:
        raise NotFound(f"vault '{name}' not found", hint="list vaults with: vmvault vault list")
    return row


def vault_by_id(s: Session, vault_id: int) -> VaultRow:
    return s.get_one(VaultRow, vault_id)


def find_vault_by_uuid(s: Session, uuid: str) -> VaultRow | None:
    return s.scalars(select(VaultRow).where(VaultRow.uuid == uuid)).first()


def list_vaults(s: Session) -> Sequence[VaultRow]:
    return s.scalars(select(VaultRow).order_by(VaultRow.name)).all()


def add_vault(s: Session, row: VaultRow) -> VaultRow:
    s.add(row)
    s.flush()
    return row


# ---- vms ----------------------------------------------------------------------------------------


def find_vm(s: Session, name: str) -> VmRow | None:
    return s.scalars(select(VmRow).where(VmRow.name == name)).first()


def get_vm(s: Session, name: str) -> VmRow:
    row = find_vm(s, name)
    if row is None:
        raise NotFound(
            f"VM '{name}' not found",
            hint=f"list VMs with: vmvault vm list (or add it with: vmvault vm add {name} --disk PATH)",
        )
    return row


def find_vm_by_id(s: Session, vm_id: str) -> VmRow | None:
    return s.get(VmRow, vm_id)


def list_vms(s: Session) -> Sequence[VmRow]:
    return s.scalars(select(VmRow).order_by(VmRow.name)).all()


def add_vm(s: Session, row: VmRow) -> VmRow:
    s.add(row)
    s.flush()
    return row


# ---- protected items ----------------------------------------------------------------------------


def protected_item(s: Session, vm_id: str) -> ProtectedItemRow | None:
    return s.scalars(select(ProtectedItemRow).where(ProtectedItemRow.vm_id == vm_id)).first()


def add_protected_item(s: Session, vm_id: str, vault_id: int, state: str) -> ProtectedItemRow:
    row = ProtectedItemRow(vm_id=vm_id, vault_id=vault_id, protection_state=state, created=now_iso())
    s.add(row)
    s.flush()
    return row


def set_protection_state(s: Session, vm_id: str, state: str) -> None:
    s.execute(update(ProtectedItemRow).where(ProtectedItemRow.vm_id == vm_id).values(protection_state=state))


def count_protected_items(s: Session, vault_id: int) -> int:
    query = select(func.count()).select_from(ProtectedItemRow).where(ProtectedItemRow.vault_id == vault_id)
    return int(s.scalar(query) or 0)


# ---- recovery points ----------------------------------------------------------------------------


def recovery_points_for_vm(s: Session, vm_id: str) -> Sequence[RecoveryPointRow]:
    """Oldest first."""
    query = select(RecoveryPointRow).where(RecoveryPointRow.vm_id == vm_id).order_by(RecoveryPointRow.time)
    return s.scalars(query).all()


def latest_recovery_point(s: Session, vm_id: str, vault_id: int | None = None) -> RecoveryPointRow | None:
    query = select(RecoveryPointRow).where(RecoveryPointRow.vm_id == vm_id)
    if vault_id is not None:
        query = query.where(RecoveryPointRow.vault_id == vault_id)
    return s.scalars(query.order_by(RecoveryPointRow.time.desc()).limit(1)).first()


def find_recovery_point(s: Session, rp_id: str) -> RecoveryPointRow | None:
    return s.get(RecoveryPointRow, rp_id)


def count_recovery_points(s: Session, vault_id: int) -> int:
    query = select(func.count()).select_from(RecoveryPointRow).where(RecoveryPointRow.vault_id == vault_id)
    return int(s.scalar(query) or 0)


def add_recovery_point(s: Session, row: RecoveryPointRow) -> RecoveryPointRow:
    s.add(row)
    s.flush()
    return row


# ---- jobs ---------------------------------------------------------------------------------------


JOBS_CHANNEL = "vmvault_jobs"  # PostgreSQL: NOTIFY'd when a job is queued (workers LISTEN; service/wakeup.py)


def add_job(s: Session, row: JobRow) -> JobRow:
    s.add(row)
    s.flush()
    if row.owner_pid == 0 and row.status == IN_PROGRESS:
        notify_queued(s, row.id)
    return row


def notify_queued(s: Session, job_id: str) -> None:
    """PostgreSQL: wake the workers of every server when this transaction commits (NOTIFY is
    transactional: a rolled-back queueing wakes nobody). SQLite: nothing, its workers poll."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :job)"), {"channel": JOBS_CHANNEL, "job": job_id})


def find_job(s: Session, job_id: str) -> JobRow | None:
    row = s.get(JobRow, job_id)
    if row is not None or len(job_id) < 8:
        return row
    matches = s.scalars(select(JobRow).where(JobRow.id.startswith(job_id, autoescape=True)).limit(2)).all()
    return matches[0] if len(matches) == 1 else None


def get_job(s: Session, job_id: str) -> JobRow:
    row = find_job(s, job_id)
    if row is None:
        raise NotFound(f"job '{job_id}' not found", hint="list jobs with: vmvault job list")
    return row


def lock_job(s: Session, job_id: str) -> JobRow:
    """get_job, with the row locked until the transaction ends (PostgreSQL: SELECT ... FOR UPDATE,
    so a worker's claim (which does not take the write lock) is either seen or waits; SQLite:
    the write transaction already excludes it)."""
    row = get_job(s, job_id)
    locked = s.scalars(select(JobRow).where(JobRow.id == row.id).with_for_update()).first()
    if locked is None:
        raise NotFound(f"job '{job_id}' not found", hint="list jobs with: vmvault job list")
    s.refresh(locked)
    return locked


def list_jobs(
    s: Session,
    *,
    vm: str | None = None,
    status: str | None = None,
    operation: str | None = None,
    limit: int = 0,
    since: str | None = None,
    vault: str | None = None,
    cancelling: bool = False,
    offset: int = 0,
) -> Sequence[JobRow]:
    """Jobs newest first; limit and offset go into the SQL (a page of a 100,000-job catalog reads one
    page of ix_jobs_start_time, not the table: docs/performance.md, Scale-out)."""
    query = select(JobRow)
    if since is not None:
        query = query.where(JobRow.start_time >= since)
    if vm is not None:
        query = query.where(JobRow.vm == vm)
    if status is not None:
        query = query.where(JobRow.status == status)
    if operation is not None:
        query = query.where(JobRow.operation == operation)
    if vault is not None:
        query = query.where(JobRow.vault == vault)
    if cancelling:
        query = query.where(JobRow.cancel_requested.is_(True))
    # id breaks ties of equal start times, so pages neither repeat nor skip a job.
    query = query.order_by(JobRow.start_time.desc(), JobRow.id.desc())
    if limit > 0:
        query = query.limit(limit)
    if offset > 0:
        query = query.offset(offset)
    return s.scalars(query).all()


def running_jobs(s: Session) -> Sequence[JobRow]:
    return s.scalars(select(JobRow).where(JobRow.status == IN_PROGRESS)).all()


def running_job_for_vm(s: Session, vm: str, operation: str) -> JobRow | None:
    query = select(JobRow).where(JobRow.status == IN_PROGRESS, JobRow.vm == vm, JobRow.operation == operation)
    return s.scalars(query.limit(1)).first()


def update_job_progress(s: Session, job_id: str, progress: dict[str, Any]) -> None:
    values = {"progress": progress, "heartbeat": now_iso()}
    s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == IN_PROGRESS).values(**values))


def finish_job(
    s: Session, job_id: str, status: str, *, error: dict[str, Any] | None = None, progress: dict[str, Any] | None = None
) -> None:
    now = now_iso()
    values: dict[str, Any] = {"status": status, "end_time": now, "heartbeat": now, "error": error}
    if progress is not None:
        values["progress"] = progress
    s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


# ---- policies (0002) ----------------------------------------------------------------------------


def find_policy(s: Session, vault_id: int, name: str) -> PolicyRow | None:
    return s.scalars(select(PolicyRow).where(PolicyRow.vault_id == vault_id, PolicyRow.name == name)).first()


def get_policy(s: Session, vault: VaultRow, name: str) -> PolicyRow:
    row = find_policy(s, vault.id, name)
    if row is None:
        raise NotFound(
            f"policy '{name}' not found in vault '{vault.name}'",
            hint=f"list policies with: vmvault policy list --vault {vault.name}",
        )
    return row


def policy_by_id(s: Session, policy_id: int) -> PolicyRow:
    return s.get_one(PolicyRow, policy_id)


def list_policies(s: Session, vault_id: int) -> Sequence[PolicyRow]:
    return s.scalars(select(PolicyRow).where(PolicyRow.vault_id == vault_id).order_by(PolicyRow.name)).all()


def add_policy(s: Session, row: PolicyRow) -> PolicyRow:
    s.add(row)
    s.flush()
    return row


def items_with_policy(s: Session, policy_id: int) -> Sequence[ProtectedItemRow]:
    return s.scalars(select(ProtectedItemRow).where(ProtectedItemRow.policy_id == policy_id)).all()


# ---- protected items (0002) ---------------------------------------------------------------------


def list_protected_items(s: Session, vault_id: int | None = None) -> Sequence[ProtectedItemRow]:
    query = select(ProtectedItemRow)
    if vault_id is not None:
        query = query.where(ProtectedItemRow.vault_id == vault_id)
    return s.scalars(query.order_by(ProtectedItemRow.id)).all()


def update_protected_item(s: Session, vm_id: str, **values: Any) -> None:
    s.execute(update(ProtectedItemRow).where(ProtectedItemRow.vm_id == vm_id).values(**values))


def mark_protected_after_backup(s: Session, vm_id: str) -> None:
    """IRPending -> Protected once a point exists; any other state (stopped, ...) stays."""
    query = update(ProtectedItemRow).where(
        ProtectedItemRow.vm_id == vm_id, ProtectedItemRow.protection_state == "IRPending"
    )
    s.execute(query.values(protection_state="Protected"))


def recovery_point_stats(s: Session, vm_id: str | None = None) -> dict[tuple[str, int], tuple[int, str, str | None]]:
    """Per (VM id, vault id): how many points, the newest one's time, the oldest kept (not soft-deleted)
    one's time; one query for every item (or one VM's) instead of three per item."""
    kept = func.min(case((RecoveryPointRow.soft_deleted.is_(False), RecoveryPointRow.time)))
    query = select(RecoveryPointRow.vm_id, RecoveryPointRow.vault_id, func.count(), func.max(RecoveryPointRow.time),
                   kept).group_by(RecoveryPointRow.vm_id, RecoveryPointRow.vault_id)
    if vm_id is not None:
        query = query.where(RecoveryPointRow.vm_id == vm_id)
    return {(str(v), int(w)): (int(n), str(newest), oldest) for v, w, n, newest, oldest in s.execute(query)}


def running_jobs_by_vm(s: Session, operation: str, vm: str | None = None) -> dict[str, str]:
    """VM name -> the id of its running job of this operation (running_job_for_vm for every VM at once)."""
    query = select(JobRow.vm, JobRow.id).where(JobRow.status == IN_PROGRESS, JobRow.operation == operation)
    if vm is not None:
        query = query.where(JobRow.vm == vm)
    return {str(name): str(job_id) for name, job_id in s.execute(query) if name is not None}


# ---- job queue (0002): owner_pid 0 = queued, claimed by a conditional update --------------------


def _on_host(host: str | None, server: str | None) -> list[Any]:
    """host: only jobs of VMs of that host (its agent claims them). server: not the jobs of VMs of
    another host (a server runs the VMs without a host and those of its own host)."""
    where: list[Any] = []
    if host is not None:
        where.append(JobRow.vm.in_(select(VmRow.name).where(VmRow.host == host)))
    if server is not None:
        elsewhere = select(VmRow.name).where(VmRow.host.is_not(None), VmRow.host != server)
        where.append(or_(JobRow.vm.is_(None), JobRow.vm.not_in(elsewhere)))
    return where


def queued_jobs(
    s: Session, operations: Sequence[str], *, host: str | None = None, server: str | None = None
) -> Sequence[JobRow]:
    """Unclaimed InProgress jobs of these operations, oldest first (host/server: see _on_host)."""
    query = select(JobRow).where(
        JobRow.status == IN_PROGRESS, JobRow.owner_pid == 0, JobRow.operation.in_(list(operations)),
        *_on_host(host, server),
    )  # fmt: skip
    return s.scalars(query.order_by(JobRow.start_time)).all()


def lock_next_queued(
    s: Session, operations: Sequence[str], *, host: str | None = None, server: str | None = None
) -> JobRow | None:
    """The oldest queued job of these operations, row-locked for this transaction.

    PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, so workers of several servers each lock a
    different job without waiting for each other. SQLite: the clause is not rendered; the caller's
    write transaction (BEGIN IMMEDIATE) is already the only writer.
    """
    query = (
        select(JobRow)
        .where(JobRow.status == IN_PROGRESS, JobRow.owner_pid == 0, JobRow.operation.in_(list(operations)))
        .where(*_on_host(host, server))
        .order_by(JobRow.start_time)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return s.scalars(query).first()


def claim_job(s: Session, job_id: str, pid: int, boot_id: str, details: dict[str, Any] | None) -> bool:
    """Take a queued job for this process; False when someone else took (or ended) it first."""
    query = update(JobRow).where(JobRow.id == job_id, JobRow.status == IN_PROGRESS, JobRow.owner_pid == 0)
    result = s.execute(query.values(owner_pid=pid, owner_boot_id=boot_id, heartbeat=now_iso(), details=details))
    return bool(getattr(result, "rowcount", 0))


def request_job_cancel(s: Session, job_id: str) -> None:
    s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == IN_PROGRESS).values(cancel_requested=True))


def job_cancel_requested(s: Session, job_id: str) -> bool:
    return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))


def update_job_details(s: Session, job_id: str, details: dict[str, Any]) -> None:
    s.execute(update(JobRow).where(JobRow.id == job_id).values(details=details))


def touch_jobs(s: Session, job_ids: Sequence[str]) -> None:
    """Heartbeat of jobs this process runs."""
    query = update(JobRow).where(JobRow.id.in_(list(job_ids)), JobRow.status == IN_PROGRESS)
    s.execute(query.values(heartbeat=now_iso()))


def last_ended_job(s: Session, vm: str, operation: str, vault: str, since: str) -> JobRow | None:
    query = select(JobRow).where(
        JobRow.vm == vm,
        JobRow.operation == operation,
        JobRow.vault == vault,
        JobRow.status != IN_PROGRESS,
        JobRow.start_time >= since,
    )
    return s.scalars(query.order_by(JobRow.start_time.desc()).limit(1)).first()


# ---- notifications (0002) -----------------------------------------------------------------------


def add_notification_target(s: Session, row: NotificationTargetRow) -> NotificationTargetRow:
    s.add(row)
    s.flush()
    return row


def notification_targets(s: Session, vault_id: int) -> Sequence[NotificationTargetRow]:
    query = select(NotificationTargetRow).where(NotificationTargetRow.vault_id == vault_id)
    return s.scalars(query.order_by(NotificationTargetRow.id)).all()


def delete_notification_target(s: Session, target_id: int) -> None:
    s.execute(delete(NotificationRow).where(NotificationRow.target_id == target_id))
    s.execute(delete(NotificationTargetRow).where(NotificationTargetRow.id == target_id))


def add_notification(s: Session, row: NotificationRow) -> NotificationRow:
    s.add(row)
    s.flush()
    return row


def due_notifications(s: Session, now: str, job_id: str | None = None, limit: int = 20) -> Sequence[NotificationRow]:
    query = select(NotificationRow).where(
        NotificationRow.status == "pending",
        (NotificationRow.lease_until.is_(None)) | (NotificationRow.lease_until <= now),
    )
    if job_id is not None:
        query = query.where(NotificationRow.job_id == job_id)
    return s.scalars(query.order_by(NotificationRow.id).limit(limit)).all()


def lease_notification(s: Session, row_id: int, now: str, until: str) -> bool:
    """Take a pending notification until `until`; False if another process holds it."""
    query = update(NotificationRow).where(
        NotificationRow.id == row_id,
        NotificationRow.status == "pending",
        (NotificationRow.lease_until.is_(None)) | (NotificationRow.lease_until <= now),
    )
    return bool(getattr(s.execute(query.values(lease_until=until)), "rowcount", 0))


def update_notification(s: Session, row_id: int, **values: Any) -> None:
    s.execute(update(NotificationRow).where(NotificationRow.id == row_id).values(**values))


# ---- retention and soft delete (0003) -----------------------------------------------------------


def recovery_points_of_item(s: Session, vm_id: str, vault_id: int) -> Sequence[RecoveryPointRow]:
    """A VM's points in one vault (soft deleted or not), oldest first."""
    query = select(RecoveryPointRow).where(RecoveryPointRow.vm_id == vm_id, RecoveryPointRow.vault_id == vault_id)
    return s.scalars(query.order_by(RecoveryPointRow.time)).all()


def set_point_retention(s: Session, rp_id: str, rules: list[str], expiry_time: str | None) -> None:
    query = update(RecoveryPointRow).where(RecoveryPointRow.id == rp_id)
    s.execute(query.values(retention_rules=rules, expiry_time=expiry_time))


def delete_recovery_point(s: Session, rp_id: str) -> None:
    s.execute(delete(RecoveryPointRow).where(RecoveryPointRow.id == rp_id))


def set_points_soft_deleted(s: Session, vm_id: str, vault_id: int, soft_deleted: bool) -> int:
    query = update(RecoveryPointRow).where(RecoveryPointRow.vm_id == vm_id, RecoveryPointRow.vault_id == vault_id)
    return int(getattr(s.execute(query.values(soft_deleted=soft_deleted)), "rowcount", 0))


def soft_deleted_items(s: Session, vault_id: int | None = None) -> Sequence[ProtectedItemRow]:
    query = select(ProtectedItemRow).where(ProtectedItemRow.deferred_delete_time.is_not(None))
    if vault_id is not None:
        query = query.where(ProtectedItemRow.vault_id == vault_id)
    return s.scalars(query.order_by(ProtectedItemRow.id)).all()


def delete_protected_item(s: Session, vm_id: str) -> None:
    s.execute(delete(ProtectedItemRow).where(ProtectedItemRow.vm_id == vm_id))


def recovery_points_in_vault(s: Session, vault_id: int) -> Sequence[RecoveryPointRow]:
    """Every point of a vault, oldest first."""
    query = select(RecoveryPointRow).where(RecoveryPointRow.vault_id == vault_id)
    return s.scalars(query.order_by(RecoveryPointRow.time)).all()


# ---- file recovery sessions (0004) ----------------------------------------------------------------

FILE_SESSION_ENDED = "Ended"


def find_file_session(s: Session, session_id: str) -> FileRecoverySessionRow | None:
    return s.get(FileRecoverySessionRow, session_id)


def live_file_sessions(
    s: Session, *, vm_id: str | None = None, rp_id: str | None = None
) -> Sequence[FileRecoverySessionRow]:
    """Sessions not Ended, oldest first."""
    query = select(FileRecoverySessionRow).where(FileRecoverySessionRow.state != FILE_SESSION_ENDED)
    if vm_id is not None:
        query = query.where(FileRecoverySessionRow.vm_id == vm_id)
    if rp_id is not None:
        query = query.where(FileRecoverySessionRow.rp_id == rp_id)
    return s.scalars(query.order_by(FileRecoverySessionRow.created)).all()


def list_file_sessions(s: Session, *, vm_id: str | None = None, limit: int = 0) -> Sequence[FileRecoverySessionRow]:
    """Every session (ended ones too), newest first."""
    query = select(FileRecoverySessionRow)
    if vm_id is not None:
        query = query.where(FileRecoverySessionRow.vm_id == vm_id)
    query = query.order_by(FileRecoverySessionRow.created.desc())
    return s.scalars(query.limit(limit) if limit else query).all()


def add_file_session(s: Session, row: FileRecoverySessionRow) -> FileRecoverySessionRow:
    s.add(row)
    s.flush()
    return row


def update_file_session(s: Session, session_id: str, **values: Any) -> None:
    s.execute(update(FileRecoverySessionRow).where(FileRecoverySessionRow.id == session_id).values(**values))


def add_file_secret(s: Session, session_id: str, secret_hash: str, expires: str) -> FileRecoverySecretRow:
    row = FileRecoverySecretRow(session_id=session_id, secret_hash=secret_hash, created=now_iso(), expires=expires)
    s.add(row)
    s.flush()
    return row


def file_secrets(s: Session, session_id: str) -> Sequence[FileRecoverySecretRow]:
    query = select(FileRecoverySecretRow).where(FileRecoverySecretRow.session_id == session_id)
    return s.scalars(query).all()


# ---- API tokens (0005) --------------------------------------------------------------------------


def add_api_token(s: Session, row: ApiTokenRow) -> ApiTokenRow:
    s.add(row)
    s.flush()
    return row


def find_api_token_by_hash(s: Session, token_hash: str) -> ApiTokenRow | None:
    return s.scalars(select(ApiTokenRow).where(ApiTokenRow.token_hash == token_hash)).first()


def find_api_token(s: Session, token_id: str) -> ApiTokenRow | None:
    return s.get(ApiTokenRow, token_id)


def list_api_tokens(s: Session, *, include_revoked: bool = False) -> Sequence[ApiTokenRow]:
    query = select(ApiTokenRow)
    if not include_revoked:
        query = query.where(ApiTokenRow.revoked.is_(None))
    return s.scalars(query.order_by(ApiTokenRow.created)).all()


def count_api_tokens(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(ApiTokenRow)) or 0)


def update_api_token(s: Session, token_id: str, **values: Any) -> None:
    s.execute(update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(**values))
