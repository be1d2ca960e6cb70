"""Protected items as `az backup item list/show` shows them: state, last backup, next backup.

lastBackupStatus uses Azure's words: "Warning (Initial backup pending)" from protection until
the first backup ends, then the status of the newest ended Backup job of the item (Completed,
CompletedWithWarnings, Failed, Cancelled). nextScheduledBackup is printed in the policy's time
zone (with its UTC offset); it is empty while protection is stopped.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.models import ProtectedItemRow, VaultRow, VmRow
from vmvault.errors import NotFound
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, Status
from vmvault.service.policies import policy_of
from vmvault.service.protection import ACTIVE_STATES, IR_PENDING
from vmvault.service.scheduler import next_slot
from vmvault.service.views import JsonDict

INITIAL_BACKUP_PENDING = "Warning (Initial backup pending)"
ITEM_COLUMNS = (
    "name", "vault", "policy", "protectionState", "lastBackupStatus", "lastBackupTime", "nextScheduledBackup",
    "recoveryPoints",
)  # fmt: skip


def item_view(s: Session, item: ProtectedItemRow, vm: VmRow, vault: VaultRow, now: datetime) -> JsonDict:
    policy_row = repos.policy_by_id(s, item.policy_id) if item.policy_id is not None else None
    last_job = repos.last_ended_job(s, vm.name, Operation.BACKUP, vault.name, item.created)
    last_point = repos.latest_recovery_point(s, vm.id, vault.id)
    running = repos.running_job_for_vm(s, vm.name, Operation.BACKUP)
    if last_job is not None:
        status = last_job.status
    elif item.protection_state == IR_PENDING:
        status = INITIAL_BACKUP_PENDING
    else:
        status = ""
    next_backup = None
    time_zone = None
    if policy_row is not None:
        policy = policy_of(policy_row)
        time_zone = policy.time_zone
        if item.protection_state in ACTIVE_STATES:
            slot = max(next_slot(policy, item.schedule_anchor, now), now)
            next_backup = slot.astimezone(policy.tzinfo).isoformat(timespec="seconds")
    return {
        "name": vm.name,
        "vault": vault.name,
        "policy": policy_row.name if policy_row is not None else None,
        "protectionState": item.protection_state,
        "healthStatus": "ActionRequired" if status == Status.FAILED else "Passed",
        "lastBackupStatus": status,
        "lastBackupTime": last_job.start_time if last_job is not None else None,
        "lastBackupJob": last_job.id if last_job is not None else None,
        "lastBackupError": last_job.error if last_job is not None and last_job.error else None,
        "lastRecoveryPoint": last_point.time if last_point is not None else None,
        "recoveryPoints": repos.count_recovery_points_for_vm(s, vm.id, vault.id),
        "nextScheduledBackup": next_backup,
        "timeZone": time_zone,
        "excludedDisks": list(item.excluded_disks or []),
        "backupInProgress": running.id if running is not None else None,
        "protectedSince": item.created,
        "deferredDeleteTime": item.deferred_delete_time,
        "oldestRecoveryPoint": _oldest_point_time(s, vm.id, vault.id),
    }


def _oldest_point_time(s: Session, vm_id: str, vault_id: int) -> str | None:
    points = [p for p in repos.recovery_points_for_vm(s, vm_id) if p.vault_id == vault_id and not p.soft_deleted]
    return points[0].time if points else None


def list_items(ctx: Context, vault_name: str | None = None) -> list[JsonDict]:
    now = ctx.now()
    with ctx.catalog.read() as s:
        vault_id = repos.get_vault(s, vault_name).id if vault_name else None
        out = []
        for item in repos.list_protected_items(s, vault_id):
            vm = repos.find_vm_by_id(s, item.vm_id)
            if vm is not None:
                out.append(item_view(s, item, vm, repos.vault_by_id(s, item.vault_id), now))
        return sorted(out, key=lambda v: (v["vault"], v["name"]))


def show_item(ctx: Context, vm_name: str) -> JsonDict:
    now = ctx.now()
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        item = repos.protected_item(s, vm.id)
        if item is None:
            raise NotFound(
                f"VM '{vm_name}' is not a protected item",
                hint=f"protect it with: vmvault protection enable {vm_name} --vault NAME",
            )
        view = item_view(s, item, vm, repos.vault_by_id(s, item.vault_id), now)
        s.expunge(vm)
    from vmvault.service.agents import agent_advice

    advice = agent_advice(vm)  # whether the point can be quiesced, and the fix when not (a libvirt domain's)
    if advice is not None:
        view["guestAgent"] = advice["message"] or "org.qemu.guest_agent.0 channel present"
    return view
