"""`vault usage`: what each protected instance and the vault's storage cost per month.

- Protected-instance size: the non-zero bytes of the disks of the item's newest recovery point
  (manifest DiskEntry.stored_bytes, indexed in the catalog as disks[].storedBytes), not the
  provisioned size. An item is billed from its first backup on, while any of its data is kept
  (also when protection is stopped); a VM whose points remain without an item is billed too.
  A soft-deleted item is not billed during its 14 days (Azure's rule; domain.usage.is_billed).
- Storage consumed: the bytes of the vault's files (after dedup and compression).
- Prices: domain.usage.Prices, overridden by HOME/prices.json (a JSON object of Prices fields)
  and then by the caller's overrides (`vault usage --price-...`).
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.models import RecoveryPointRow, VaultRow
from vmvault.domain.usage import GB, SOFT_DELETED_TIER, Prices, instance_fee, is_billed, money, storage_fee
from vmvault.errors import InvalidInput, VmvaultError
from vmvault.service.context import Context
from vmvault.service.vaultio import opened_vault, read_manifest_or_none
from vmvault.service.views import NOT_PROTECTED, JsonDict

NOT_BILLED = "not billed (no backup yet)"


def load_prices(ctx: Context, overrides: dict[str, Any] | None = None) -> Prices:
    """Default prices, then HOME/prices.json, then overrides (None values are ignored)."""
    prices = Prices()
    path = ctx.settings.prices_path
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("it is not a JSON object")
            prices = prices.with_overrides(data)
        except (OSError, ValueError) as exc:
            raise InvalidInput(
                f"price file {path} is not usable: {exc}",
                hint='write a JSON object such as {"storage_lrs": 0.02, "instance_small": 4.5}',
            ) from None
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return prices.with_overrides(given)
    except ValueError as exc:
        raise InvalidInput(str(exc), hint="prices are numbers >= 0, e.g. --price-lrs 0.02") from None


def storage_bytes(storage_dir: Path | str) -> int:
    """Bytes of the files under the vault's directory (of its objects, for an azure:// or s3:// vault)."""
    from vmvault.vault.backends import is_url, open_backend

    if is_url(storage_dir):
        try:
            return sum(info.size for info in open_backend(storage_dir).inventory())
        except VmvaultError:
            return 0  # unreachable: usage reports the catalog's side anyway
    total = 0
    for root, _dirs, files in os.walk(storage_dir):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def vault_usage(ctx: Context, vault_name: str, overrides: dict[str, Any] | None = None) -> JsonDict:
    prices = load_prices(ctx, overrides)
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, vault_name)
        entries = _instances(s, vault)
    _fill_missing_sizes(ctx, vault, entries)
    items = [_item_line(e, prices) for e in entries]
    stored = storage_bytes(vault.storage_dir)
    rate = prices.storage_rate(vault.redundancy)
    storage_cost = storage_fee(stored, vault.redundancy, prices)
    instance_total = sum((e["_fee"] for e in items), start=Decimal(0))
    for line in items:
        del line["_fee"]
    return {
        "vault": vault.name,
        "redundancy": vault.redundancy,
        "currency": prices.currency,
        "items": items,
        "storage": {
            "bytes": stored,
            "gb": round(stored / GB, 6),
            "pricePerGBMonth": float(rate),
            "monthlyFee": money(storage_cost, 4),
        },
        "totals": {
            "protectedInstances": sum(1 for line in items if line["billed"]),
            "instanceFees": money(instance_total),
            "storageFee": money(storage_cost, 4),
            "monthly": money(instance_total + storage_cost),
        },
    }


def _instances(s: Session, vault: VaultRow) -> list[dict[str, Any]]:
    """One entry per VM with an item or points in the vault: its state and newest point."""
    by_vm: dict[str, dict[str, Any]] = {}
    for item in repos.list_protected_items(s, vault.id):
        by_vm[item.vm_id] = {"vm_id": item.vm_id, "state": item.protection_state}
    vm_ids = s.scalars(select(RecoveryPointRow.vm_id).where(RecoveryPointRow.vault_id == vault.id).distinct()).all()
    for vm_id in vm_ids:
        by_vm.setdefault(vm_id, {"vm_id": vm_id, "state": NOT_PROTECTED})
    out = []
    for entry in by_vm.values():
        vm = repos.find_vm_by_id(s, entry["vm_id"])
        point = repos.latest_recovery_point(s, entry["vm_id"], vault.id)
        entry["name"] = vm.name if vm is not None else entry["vm_id"]
        entry["point"] = point.id if point is not None else None
        entry["pointTime"] = point.time if point is not None else None
        entry["size"] = _point_size(point) if point is not None else 0
        out.append(entry)
    return sorted(out, key=lambda e: str(e["name"]))


def _point_size(point: RecoveryPointRow) -> int | None:
    """Sum of storedBytes of the point's disks, None when the catalog row predates that field."""
    sizes = [d.get("storedBytes") for d in point.disks]
    if any(v is None for v in sizes):
        return None
    return sum(int(v) for v in sizes if v is not None)


def _fill_missing_sizes(ctx: Context, vault: VaultRow, entries: list[dict[str, Any]]) -> None:
    """Read the manifests of points whose catalog rows have no storedBytes (older catalogs)."""
    missing = [e for e in entries if e["size"] is None]
    if not missing:
        return
    with opened_vault(ctx, vault) as opened:
        for entry in missing:
            manifest = read_manifest_or_none(opened, entry["point"])
            entry["size"] = sum(d.stored_bytes for d in manifest.disks) if manifest is not None else 0


def _item_line(entry: dict[str, Any], prices: Prices) -> dict[str, Any]:
    billed = is_billed(entry["state"], entry["point"] is not None)
    size = int(entry["size"] or 0)
    fee = instance_fee(size, prices) if billed else None
    unbilled = SOFT_DELETED_TIER if entry["point"] is not None else NOT_BILLED
    return {
        "name": entry["name"],
        "protectionState": entry["state"],
        "lastRecoveryPoint": entry["pointTime"],
        "protectedInstanceBytes": size,
        "protectedInstanceGB": round(size / GB, 6),
        "billed": billed,
        "tier": fee.tier if fee is not None else unbilled,
        "monthlyFee": money(fee.fee) if fee is not None else 0.0,
        "_fee": fee.fee if fee is not None else Decimal(0),
    }
