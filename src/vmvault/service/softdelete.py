"""Soft delete, as Azure's: `protection disable VM --delete-data` and `protection undelete VM`.

Deleting an item's backup data stops its protection and moves the item and all its points into
soft delete (a DeleteBackupData job): nothing is deleted from the vault yet, the points are hidden
from `recoverypoint list` (unless --include-deleted), cannot be restored and do not expire. After
SOFT_DELETE_DAYS the Retention job purges them (manifests, catalog rows, then the item); until then
`protection undelete` brings the item back in state ProtectionStopped with every point, as Azure
does; `protection resume` then starts backups again. Garbage collection keeps the data of
soft-deleted points: their manifests are still in the vault.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, to_iso
from vmvault.catalog.models import ProtectedItemRow, RecoveryPointRow, VmRow
from vmvault.errors import Busy, Cancelled, InvalidInput, NotFound, PointFailedVerification
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, Status, end_job, record_completed_job
from vmvault.service.views import JsonDict, job_view

SOFT_DELETE_DAYS = 14
SOFT_DELETED = "SoftDeleted"  # protectionState of a soft-deleted item
PROTECTION_STOPPED = "ProtectionStopped"  # state after undelete, as in Azure


def _item(s: Session, vm_name: str) -> tuple[VmRow, ProtectedItemRow]:
    vm = repos.get_vm(s, vm_name)
    item = repos.protected_item(s, vm.id)
    if item is None:
        raise NotFound(
            f"VM '{vm_name}' is not protected: it has no backup data to delete",
            hint="list protected VMs with: vmvault item list",
        )
    return vm, item


def is_soft_deleted(item: ProtectedItemRow | None) -> bool:
    return item is not None and item.deferred_delete_time is not None


def delete_backup_data(ctx: Context, vm_name: str) -> JsonDict:
    """Stop protection and soft delete the item and its points for SOFT_DELETE_DAYS (a DeleteBackupData job).

    Returns the job, with the item's deferred delete time. Refused while a backup of the VM runs.
    """
    purge_at = to_iso(ctx.now() + timedelta(days=SOFT_DELETE_DAYS))
    with ctx.catalog.write() as s:
        _vm, item = _item(s, vm_name)
        vault = repos.vault_by_id(s, item.vault_id)
        if is_soft_deleted(item):
            raise InvalidInput(
                f"the backup data of VM '{vm_name}' is already soft deleted (purged after {item.deferred_delete_time})",
                hint=f"bring it back with: vmvault protection undelete {vm_name}",
            )
        running = repos.running_job_for_vm(s, vm_name, Operation.BACKUP)
        if running is not None and running.owner_pid > 0:
            raise Busy(
                f"a backup of VM '{vm_name}' is running (job {running.id})",
                hint=f"wait for it (vmvault job wait {running.id}) or cancel it (vmvault job cancel {running.id})",
            )
        item.protection_state = SOFT_DELETED
        item.deferred_delete_time = purge_at
        repos.set_points_soft_deleted(s, item.vm_id, item.vault_id, True)
        job = record_completed_job(s, Operation.DELETE_BACKUP_DATA, vm=vm_name, vault=vault.name)
        queued = [j.id for j in repos.queued_jobs(s, [Operation.BACKUP]) if j.vm == vm_name]
        view = job_view(job)
    for job_id in queued:
        end_job(ctx, job_id, Status.CANCELLED, Cancelled(f"the backup data of VM '{vm_name}' was deleted"))
    return {**view, "deferredDeleteTimeInUTC": purge_at}


def undelete(ctx: Context, vm_name: str) -> JsonDict:
    """Bring a soft-deleted item and its points back (ProtectionStopped); returns an Undelete job."""
    from vmvault.service.retention import refresh_item

    now = ctx.now()
    with ctx.catalog.write() as s:
        _vm, item = _item(s, vm_name)
        if not is_soft_deleted(item):
            raise InvalidInput(
                f"VM '{vm_name}' is not soft deleted (its protection is {item.protection_state})",
                hint=f"see it with: vmvault item show {vm_name}",
            )
        if item.deferred_delete_time is not None and from_iso(item.deferred_delete_time) <= now:
            raise InvalidInput(
                f"the backup data of VM '{vm_name}' was soft deleted more than {SOFT_DELETE_DAYS} days ago "
                f"({item.deferred_delete_time} has passed): it is being purged and cannot be undeleted",
                hint="the next Retention job removes it (vmvault retention run)",
            )
        vault = repos.vault_by_id(s, item.vault_id)
        item.protection_state = PROTECTION_STOPPED
        item.deferred_delete_time = None
        repos.set_points_soft_deleted(s, item.vm_id, item.vault_id, False)
        s.flush()
        refresh_item(s, item.vm_id, item.vault_id, now)
        job = record_completed_job(s, Operation.UNDELETE, vm=vm_name, vault=vault.name)
        return job_view(job)


def due_for_purge(s: Session, vault_id: int, now: datetime) -> list[tuple[ProtectedItemRow, str]]:
    """Soft-deleted items of a vault whose deferred delete time has passed, with their VM names."""
    due = []
    for item in repos.soft_deleted_items(s, vault_id):
        if item.deferred_delete_time is not None and from_iso(item.deferred_delete_time) <= now:
            vm = repos.find_vm_by_id(s, item.vm_id)
            due.append((item, vm.name if vm else item.vm_id))
    return due


LATEST = "latest"


def resolve_point(ctx: Context, vm_name: str, rp_id: str) -> str:
    """rp_id as given, or for "latest" the id of the VM's newest point that can be restored (not soft
    deleted, not failed verification): every face accepts `--rp latest` / "rp": "latest"."""
    if rp_id.strip().lower() != LATEST:
        return rp_id
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        usable = [
            p for p in repos.recovery_points_for_vm(s, vm.id) if not p.soft_deleted and p.verify_state != "Failed"
        ]
    if not usable:
        raise NotFound(
            f"VM '{vm_name}' has no recovery point to restore (none, or all soft deleted or failed verification)",
            hint=f"back it up first: vmvault backup now {vm_name}",
        )
    return usable[-1].id  # oldest first


def usable_point(s: Session, vm_name: str, rp_id: str) -> tuple[VmRow, RecoveryPointRow]:
    """The VM and its point, for a restore or a mount: unknown, soft-deleted or failed points refused."""
    vm = repos.get_vm(s, vm_name)
    point = repos.find_recovery_point(s, rp_id)
    if point is None or point.vm_id != vm.id:
        raise NotFound(
            f"recovery point '{rp_id}' not found for VM '{vm_name}'",
            hint=f"list them with: vmvault recoverypoint list {vm_name}",
        )
    refuse_unusable_point(point, vm_name)
    return vm, point


def refuse_unusable_point(point: RecoveryPointRow, vm_name: str) -> None:
    """A point that is soft deleted or failed its last verify cannot be restored (nor mounted)."""
    refuse_soft_deleted_point(point, vm_name)
    if point.verify_state == "Failed":
        raise PointFailedVerification(
            f"recovery point '{point.id}' of VM '{vm_name}' failed verification on {point.verify_time}: "
            f"{point.verify_problem}",
            hint=f"restore another point (vmvault recoverypoint list {vm_name}); if the vault's storage was "
            "repaired, run vmvault vault verify VAULT again to clear this",
        )


def refuse_soft_deleted_point(point: RecoveryPointRow, vm_name: str) -> None:
    """A soft-deleted point cannot be restored (nor mounted): say so and how to get it back."""
    if point.soft_deleted:
        raise InvalidInput(
            f"recovery point '{point.id}' of VM '{vm_name}' is soft deleted "
            "(its backup data was deleted with protection disable --delete-data): it cannot be restored",
            hint=f"undelete it first: vmvault protection undelete {vm_name}",
        )
