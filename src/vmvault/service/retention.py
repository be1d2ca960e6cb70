"""Retention: record why each recovery point is kept and until when; delete expired points.

The decisions are domain/retention.py's pure function, applied per protected item with its
policy (retentionPolicy + timeZone). Points that `backup now` made are on-demand (kept until
their retain-until date); points the scheduler made follow the policy. Every point records its
rules and expiry (catalog columns retention_rules, expiry_time), refreshed after each backup,
when a policy changes (`recompute_expiry`, called by `policy set`) and by each Retention job.

A Retention job per run (`apply_retention`):
- an expired point is deleted from the vault (its manifest) first, then from the catalog, so a
  crash in between leaves a row whose manifest is gone, which the next run removes;
- a point held by a pin (file-recovery session, running restore) is left for a later run;
- points of soft-deleted items are not expired: the whole item is purged once its deferred
  delete time has passed (service/softdelete.py);
- a VM's newest point is kept (rule Latest), so failing backups never leave a VM with nothing.
Then a GarbageCollect job per vault that lost points frees their unshared data (service/gc.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, to_iso
from vmvault.catalog.models import PolicyRow, ProtectedItemRow, RecoveryPointRow, VaultRow
from vmvault.domain.policy import parse_policy
from vmvault.domain.retention import PointRetention, RetentionPolicy, compute_retention, policy_retention
from vmvault.errors import NotFound, ObjectNotFound
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict
from vmvault.testhooks import crash_point

log = logging.getLogger("vmvault")


# ---- the rules of one item ----------------------------------------------------------------------


def item_policy(s: Session, item: ProtectedItemRow | None) -> RetentionPolicy | None:
    """The parsed retention rules of an item's policy; None without an item or policy."""
    if item is None or item.policy_id is None:
        return None
    return policy_rules(repos.policy_by_id(s, item.policy_id))


def policy_rules(row: PolicyRow) -> RetentionPolicy:
    """The rules of a stored policy (stored rows are canonical: domain.policy parses them)."""
    return policy_retention(parse_policy(row.properties))


def _retain_until(row: RecoveryPointRow) -> date | None:
    try:
        return date.fromisoformat(row.retain_until[:10])
    except ValueError:
        return None


def decide(points: Sequence[RecoveryPointRow], policy: RetentionPolicy | None, now: datetime) -> list[PointRetention]:
    """compute_retention over catalog rows: on-demand points by their retain-until date."""
    overrides: dict[str, date] = {}
    for p in points:
        until = _retain_until(p)
        if p.on_demand and until is not None:
            overrides[p.id] = until
        elif p.on_demand:  # no readable date: treat as kept (never guess a deletion)
            log.warning("recovery point %s has no readable retain-until date (%r)", p.id, p.retain_until)
    unreadable = {p.id for p in points if p.on_demand and p.id not in overrides}
    results = compute_retention(
        [(p.id, from_iso(p.time)) for p in points if p.id not in unreadable], policy, retain_until=overrides, now=now
    )
    kept = [PointRetention(p.id, from_iso(p.time), True, ("RetainUntil",), None) for p in points if p.id in unreadable]
    return results + kept


def refresh_item(s: Session, vm_id: str, vault_id: int, now: datetime) -> list[PointRetention]:
    """Recompute and record the rules and expiry of a VM's points in one vault."""
    item = repos.protected_item(s, vm_id)
    if item is not None and item.vault_id != vault_id:
        item = None
    points = repos.recovery_points_of_item(s, vm_id, vault_id)
    results = decide(points, item_policy(s, item), now)
    for r in results:
        repos.set_point_retention(s, r.rp_id, list(r.rules), to_iso(r.expires) if r.expires else None)
    return results


def record_new_point(s: Session, rp_id: str, *, scheduled: bool, now: datetime) -> None:
    """Called in the transaction that records a backup's point: its kind, then everyone's rules.

    A new point can take the rule Latest from the previous one, so the whole item is refreshed.
    """
    row = repos.find_recovery_point(s, rp_id)
    if row is None:
        return
    row.on_demand = not scheduled
    s.flush()
    refresh_item(s, row.vm_id, row.vault_id, now)


def recompute_expiry(ctx: Context, vault: str | VaultRow, policy: str | PolicyRow) -> int:
    """After `policy set`: recompute the points of every item that follows the policy.

    Nothing is deleted here (the next Retention job does that). Returns the number of points.
    """
    vault_name = vault if isinstance(vault, str) else vault.name
    policy_name = policy if isinstance(policy, str) else policy.name
    now = ctx.now()
    count = 0
    with ctx.catalog.write() as s:
        vault_row = repos.get_vault(s, vault_name)
        row = repos.get_policy(s, vault_row, policy_name)
        for item in repos.items_with_policy(s, row.id):
            count += len(refresh_item(s, item.vm_id, item.vault_id, now))
    return count


# ---- the Retention job --------------------------------------------------------------------------


@dataclass
class VaultRetention:
    vault: str
    deleted: list[JsonDict] = field(default_factory=list)  # {id, vm, time, expired}
    deferred: list[JsonDict] = field(default_factory=list)  # {id, vm, reason}
    purged_items: list[str] = field(default_factory=list)  # VM names

    def view(self) -> JsonDict:
        return {
            "vault": self.vault,
            "deletedPoints": self.deleted,
            "deferredPoints": self.deferred,
            "purgedItems": self.purged_items,
        }


def apply_retention(
    ctx: Context,
    vault: str | None = None,
    now: datetime | None = None,
    *,
    collect_garbage: bool = True,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Delete expired points and purge soft-deleted items past their time, as a Retention job.

    Then, unless collect_garbage is False, a GarbageCollect job runs for each vault that lost points
    (their ids are in the result, "garbageCollectJobs").
    """
    moment = now or ctx.now()
    with ctx.catalog.read() as s:
        rows = [repos.get_vault(s, vault)] if vault is not None else list(repos.list_vaults(s))
    job = create_job(ctx, Operation.RETENTION, vm=None, vault=vault)

    def work(run: JobRun) -> JsonDict:
        done = [_apply_vault(ctx, row, moment, run).view() for row in rows]
        result: JsonDict = {"now": to_iso(moment), "vaults": done}
        run.details = {**(run.details or {}), "retention": result}
        return result

    outcome = run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)
    if collect_garbage and outcome.result is not None:
        outcome.result["garbageCollectJobs"] = _collect_after(ctx, outcome.result, cancel)
    return outcome


def _collect_after(ctx: Context, result: JsonDict, cancel: threading.Event | None) -> list[str]:
    from vmvault.service.gc import garbage_collect

    jobs = []
    for entry in result["vaults"]:
        if entry["deletedPoints"] or entry["purgedItems"]:
            jobs.append(garbage_collect(ctx, entry["vault"], cancel=cancel).job["id"])
    return jobs


def _apply_vault(ctx: Context, row: VaultRow, now: datetime, run: JobRun) -> VaultRetention:
    from vmvault.service.softdelete import due_for_purge

    out = VaultRetention(row.name)
    with ctx.catalog.write() as s:  # record everyone's rules; decide what goes
        expired = _expired_points(s, row, now)
        purge = due_for_purge(s, row.id, now)
    if not expired and not purge:
        return out
    from vmvault.vault.lock import pinned_points

    with opened_vault(ctx, row) as vault:
        pinned = pinned_points(vault)
        for point, vm_name in expired:
            if run.cancel.is_set():
                break
            if point.id in pinned:
                out.deferred.append({"id": point.id, "vm": vm_name, "reason": "in use (file recovery or restore)"})
                continue
            _delete_point(ctx, vault, point)
            out.deleted.append({"id": point.id, "vm": vm_name, "time": point.time, "expired": point.expiry_time})
        for item, vm_name in purge:
            if run.cancel.is_set():
                break
            _purge_item(ctx, vault, item, vm_name, pinned, out)
    return out


def _expired_points(s: Session, vault: VaultRow, now: datetime) -> list[tuple[RecoveryPointRow, str]]:
    """Refresh the rules of every VM with points in the vault; the expired points of live items."""
    soft_deleted = {i.vm_id for i in repos.soft_deleted_items(s, vault.id)}
    by_vm: dict[str, list[RecoveryPointRow]] = {}
    for point in repos.recovery_points_in_vault(s, vault.id):
        by_vm.setdefault(point.vm_id, []).append(point)
    expired: list[tuple[RecoveryPointRow, str]] = []
    for vm_id, points in by_vm.items():
        if vm_id in soft_deleted:
            continue  # frozen until purged or undeleted
        vm = repos.find_vm_by_id(s, vm_id)
        results = {r.rp_id: r for r in refresh_item(s, vm_id, vault.id, now)}
        expired.extend((p, vm.name if vm else vm_id) for p in points if not results[p.id].keep)
    s.flush()
    return expired


def delete_point_data(vault: Any, rp_id: str) -> None:
    """The vault side of deleting a point: its manifest (its data goes with garbage collection)."""
    # Already gone: a crash after this step last time.
    with contextlib.suppress(NotFound, ObjectNotFound, FileNotFoundError):
        vault.delete_manifest(rp_id)


def _delete_point(ctx: Context, vault: Any, point: RecoveryPointRow) -> None:
    delete_point_data(vault, point.id)  # the vault first: a row without manifest is retried next run
    crash_point("retention:manifest-deleted")
    with ctx.catalog.write() as s:
        repos.delete_recovery_point(s, point.id)


def _purge_item(
    ctx: Context, vault: Any, item: ProtectedItemRow, vm_name: str, pinned: set[str], out: VaultRetention
) -> None:
    with ctx.catalog.read() as s:
        current = repos.protected_item(s, item.vm_id)
        if current is None or current.deferred_delete_time is None:
            return  # undeleted meanwhile (undelete refuses once the deferred delete time has passed)
        points = list(repos.recovery_points_of_item(s, item.vm_id, item.vault_id))
    held = [p for p in points if p.id in pinned]
    for point in points:
        if point.id not in pinned:
            _delete_point(ctx, vault, point)
            purged = item.deferred_delete_time
            out.deleted.append({"id": point.id, "vm": vm_name, "time": point.time, "expired": purged})
    if held:
        for point in held:
            out.deferred.append({"id": point.id, "vm": vm_name, "reason": "in use (file recovery or restore)"})
        return
    with ctx.catalog.write() as s:
        repos.delete_protected_item(s, item.vm_id)
    out.purged_items.append(vm_name)
