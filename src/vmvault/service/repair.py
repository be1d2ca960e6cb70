"""`vmvault vault repair V [--apply]`: rebuild or drop pack index files, then say what stays damaged.

The work is vault/repair.py's; afterwards a vault-wide verify names every point that remains
damaged (and records it in the catalog, so restores refuse those points and accept the healed).
"""

from __future__ import annotations

from vmvault.catalog import repos
from vmvault.service.context import Context
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict


def repair_vault(ctx: Context, name: str, *, apply: bool = False) -> JsonDict:
    from vmvault.engine.verify import run_verify
    from vmvault.service.vaults import _record_verification, _vm_name, damaged_view
    from vmvault.vault.repair import repair_index

    with ctx.catalog.read() as s:
        row = repos.get_vault(s, name)
        listed = {p.id: _vm_name(s, p.vm_id) for p in repos.recovery_points_in_vault(s, row.id)}
    with opened_vault(ctx, row) as vault:
        report = repair_index(vault, apply=apply)
        verified = run_verify(vault, expected_points=listed)
    _record_verification(ctx, verified.points)
    return {
        "vault": name,
        "applied": apply,
        "actions": [
            {"action": a.action, "indexFile": a.index_file, "pack": a.pack or None, "reason": a.reason}
            for a in report.actions
        ],
        "unrepairable": list(report.unrepairable),
        "damagedObjects": damaged_view(verified, listed),
        "damagedPoints": sorted(rp for rp, problem in verified.points.items() if problem),
        "ok": verified.ok,
    }
