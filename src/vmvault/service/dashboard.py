"""The overview the portal shows at /: one glance at what is healthy, what failed, what is late.

Every number comes with the filter that lists its rows (the portal links each count to it). An
item is late when its RPO is breached: service/rpo.py's item_rpos() decides that, the same rule as
the alerts, the metrics and the reports.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from vmvault.service import items, jobs, rpo, vaults
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

# last backup status -> the dashboard's bucket
BUCKETS = ("healthy", "warning", "failed", "never")


def backup_bucket(item: JsonDict) -> str:
    """healthy (last backup completed), warning (completed with warnings), failed (failed or cancelled),
    never (no backup yet); a backup running now leaves the item where its previous one put it."""
    status = str(item.get("lastBackupStatus") or "")
    if status in ("Failed", "Cancelled"):
        return "failed"
    if not item.get("lastRecoveryPoint"):
        return "never"
    if status == "CompletedWithWarnings" or status.startswith("Warning"):
        return "warning"
    return "healthy"


def overview(ctx: Context, vault: str | None = None) -> JsonDict:
    """Items by last backup status, RPO breaches first, jobs of the last 24 h, running jobs, vaults;
    with vault, only that vault's (what a vault-scoped token may see)."""
    now = ctx.now()
    listed = [i for i in items.list_items(ctx) if vault is None or i["vault"] == vault]
    for item in listed:
        item["bucket"] = backup_bucket(item)
    breached = [r for r in rpo.item_rpos(ctx, now) if r.breached and (vault is None or r.vault == vault)]
    since = (now - timedelta(hours=24)).isoformat(timespec="seconds")
    recent = [j for j in jobs.list_jobs(ctx, since=since) if vault is None or j["vault"] == vault]
    return {
        "items": listed,
        "itemsByBucket": {b: sum(1 for i in listed if i["bucket"] == b) for b in BUCKETS},
        "rpoBreached": [_late(r) for r in sorted(breached, key=lambda r: r.deadline)],
        "jobsLast24h": dict(Counter(j["status"] for j in recent)),
        "jobsLast24hTotal": len(recent),
        "running": [j for j in recent if j["status"] == jobs.Status.IN_PROGRESS],
        "vaults": [_vault_health(ctx, v) for v in vaults.list_vaults(ctx) if vault is None or v["name"] == vault],
    }


def _late(r: rpo.ItemRpo) -> JsonDict:
    last = r.last_good.isoformat(timespec="seconds") if r.last_good else None
    return {"vm": r.vm, "vault": r.vault, "policy": r.policy, "deadline": r.deadline.isoformat(timespec="seconds"),
            "lastGood": last}  # fmt: skip


def _vault_health(ctx: Context, vault: JsonDict) -> JsonDict:
    from vmvault.catalog import repos

    with ctx.catalog.read() as s:
        row = repos.get_vault(s, vault["name"])
        points = repos.recovery_points_in_vault(s, row.id)
        failed = sum(1 for p in points if p.verify_state == "Failed")
        stored = sum(int(d.get("storedBytes") or 0) for p in points for d in p.disks)
    return {**vault, "failedVerification": failed, "storedBytes": stored}
