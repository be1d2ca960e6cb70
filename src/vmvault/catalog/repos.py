"""Small query and update functions over the catalog; callers own the transaction (Session)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import JobRow, ProtectedItemRow, RecoveryPointRow, VaultRow, VmRow
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


def add_job(s: Session, row: JobRow) -> JobRow:
    s.add(row)
    s.flush()
    return row


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


def list_jobs(
    s: Session, *, vm: str | None = None, status: str | None = None, operation: str | None = None, limit: int = 0
) -> Sequence[JobRow]:
    query = select(JobRow)
    if vm is not None:
        query = query.where(JobRow.vm == vm)
    if status is not None:
        query = query.where(JobRow.status == status)
    if operation is not None:
        query = query.where(JobRow.operation == operation)
    query = query.order_by(JobRow.start_time.desc())
    if limit > 0:
        query = query.limit(limit)
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
