"""Protected items as `az backup item list/show` shows them: state, last backup, next backup.

lastBackupStatus uses Azure's words: "Warning (Initial backup pending)" from protection until
the first backup ends, then the status of the newest ended Backup job of the item (Completed,
CompletedWithWarnings, Failed, Cancelled). nextScheduledBackup is printed in the policy's time
zone (with its UTC offset); it is empty while protection is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.models import PolicyRow, ProtectedItemRow, VaultRow, VmRow
from vmvault.domain.policy import Policy
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


@dataclass
class Lookups:
    """What item views need besides the item, read for all items in a few queries: GET /items with
    200 VMs was eight queries per item (docs/performance.md, Scale-out)."""

    points: dict[tuple[str, int], tuple[int, str, str | None]]  # (vm id, vault id) -> count, newest, oldest kept
    running: dict[str, str]  # VM name -> its running backup's job id
    policies: dict[int, tuple[PolicyRow, Policy]] = field(default_factory=dict)

    @classmethod
    def read(cls, s: Session, vm: VmRow | None = None) -> Lookups:
        """For every item (or the one of vm)."""
        return cls(
            repos.recovery_point_stats(s, vm.id if vm is not None else None),
            repos.running_jobs_by_vm(s, Operation.BACKUP, vm.name if vm is not None else None),
        )

    def policy(self, s: Session, policy_id: int) -> tuple[PolicyRow, Policy]:
        if policy_id not in self.policies:
            row = repos.policy_by_id(s, policy_id)
            self.policies[policy_id] = (row, policy_of(row))
        return self.policies[policy_id]


def item_view(
    s: Session, item: ProtectedItemRow, vm: VmRow, vault: VaultRow, now: datetime, found: Lookups | None = None
) -> JsonDict:
    found = found or Lookups.read(s, vm)
    policy_row, policy = found.policy(s, item.policy_id) if item.policy_id is not None else (None, None)
    last_job = repos.last_ended_job(s, vm.name, Operation.BACKUP, vault.name, item.created)
    count, last_point, oldest_kept = found.points.get((vm.id, vault.id), (0, None, None))
    if last_job is not None:
        status = last_job.status
    elif item.protection_state == IR_PENDING:
        status = INITIAL_BACKUP_PENDING
    else:
        status = ""
    next_backup = None
    time_zone = None
    if policy is not None:
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
        "lastRecoveryPoint": last_point,
        "recoveryPoints": count,
        "nextScheduledBackup": next_backup,
        "timeZone": time_zone,
        "excludedDisks": list(item.excluded_disks or []),
        "backupInProgress": found.running.get(vm.name),
        "protectedSince": item.created,
        "deferredDeleteTime": item.deferred_delete_time,
        "oldestRecoveryPoint": oldest_kept,
    }


def list_items(ctx: Context, vault_name: str | None = None) -> list[JsonDict]:
    now = ctx.now()
    with ctx.catalog.read() as s:
        vault_id = repos.get_vault(s, vault_name).id if vault_name else None
        vms = {vm.id: vm for vm in repos.list_vms(s)}
        vaults = {vault.id: vault for vault in repos.list_vaults(s)}
        found = Lookups.read(s)
        out = []
        for item in repos.list_protected_items(s, vault_id):
            vm = vms.get(item.vm_id)
            if vm is not None:
                out.append(item_view(s, item, vm, vaults[item.vault_id], now, found))
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
