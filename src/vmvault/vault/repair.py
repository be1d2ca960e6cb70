"""Repair a vault's pack index files (as restic's `repair index`): `vmvault vault repair V [--apply]`.

- A pack whose index file is missing or damaged gets it rebuilt from the pack's own trailer
  (authenticated: what it lists is what the pack holds).
- An index file whose pack is gone is dropped: its entries name data that no longer exists, so a
  backup must store that data again instead of deduplicating against it.
- A pack with neither a readable index file nor a readable trailer cannot be repaired: reported.
Dry run unless `apply`. It holds the GC lock and the vault lock exclusive while it plans and
changes, so no collection or backup sees a half-repaired index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from vmvault.errors import IntegrityError, ObjectNotFound, VmvaultError
from vmvault.vault import lock
from vmvault.vault.sealed import unseal
from vmvault.vault.store import Vault, index_name_for, parse_index_payload


@dataclass
class RepairAction:
    action: str  # "rebuild-index" or "drop-index"
    index_file: str
    pack: str
    reason: str


@dataclass
class RepairReport:
    applied: bool = False
    actions: list[RepairAction] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)


def repair_index(vault: Vault, *, apply: bool, lock_timeout: float | None = 600.0) -> RepairReport:
    report = RepairReport(applied=apply)
    with lock.only_collector(vault), lock.exclusive(vault, timeout=lock_timeout):
        vault.sync_index()
        damaged = _damaged_index_files(vault)
        _plan_rebuilds(vault, damaged, report)
        _plan_drops(vault, damaged, report)
        if apply:
            for act in report.actions:
                _apply(vault, act)
    return report


def _damaged_index_files(vault: Vault) -> dict[str, str]:
    """Every index file read afresh (the local cache may hold one that was damaged since)."""
    out: dict[str, str] = {}
    for name, _size, _mtime in vault.backend.list("index"):
        try:
            pack, _salt, _entries = parse_index_payload(unseal(vault.keys, name, vault.backend.get(name)))
        except VmvaultError as exc:
            out[name] = exc.message
            continue
        except (ValueError, UnicodeDecodeError) as exc:
            out[name] = f"vault file {name} is damaged ({exc})"
            continue
        if pack.count("/") != 2 or index_name_for(pack) != name:
            out[name] = f"vault file {name} names pack {pack!r}, not its own"
    return out


def _pack_of(vault: Vault, index_name: str) -> str | None:
    tail = index_name.split("/", 1)[1]
    for top in ("data", "tree"):
        if vault.backend.exists(f"{top}/{tail}"):
            return f"{top}/{tail}"
    return None


def _plan_rebuilds(vault: Vault, damaged: dict[str, str], report: RepairReport) -> None:
    candidates = set(vault.unindexed_packs())
    candidates.update(p for p in (_pack_of(vault, name) for name in damaged) if p is not None)
    for pack in sorted(candidates):
        index_name = index_name_for(pack)
        why = damaged.get(index_name) or "the index file is missing"
        try:
            vault.pack_trailer(pack)
        except IntegrityError as exc:
            report.unrepairable.append(f"pack {pack}: {why}, and {exc.message}")
            continue
        report.actions.append(RepairAction("rebuild-index", index_name, pack, why))


def _plan_drops(vault: Vault, damaged: dict[str, str], report: RepairReport) -> None:
    seen = set()
    for pack, index_name in list(vault.index.iter_packs()):
        if not vault.backend.exists(pack):
            seen.add(index_name)
            report.actions.append(RepairAction("drop-index", index_name, pack, "its pack is missing from the vault"))
    for index_name in sorted(set(damaged) - seen):
        if _pack_of(vault, index_name) is None:
            report.actions.append(
                RepairAction("drop-index", index_name, "", f"{damaged[index_name]}, and no pack of that name exists")
            )


def _apply(vault: Vault, act: RepairAction) -> None:
    if act.action == "rebuild-index":
        vault.reindex_pack(act.pack, write_index_file=True)
        return
    with contextlib.suppress(ObjectNotFound):
        vault.backend.delete(act.index_file)
    vault.index.forget_index_files([act.index_file])
    vault.damaged_index_files.pop(act.index_file, None)
