"""GRS: copy a vault to its secondary location (any backend), asynchronously and in dependency order.

One pass (``replicate_once``):

1. List the primary's ``seq/`` and ``points/`` first, then everything else: a manifest listed
   was published after its packs and index files, so they are in the later listing.
2. Copy what the secondary lacks (or holds in another size; the small mutable objects -- config,
   key files, settings -- when their bytes differ) in phases: key files, packs, pack index files,
   records, manifests and vault settings, then the config last. A secondary therefore never holds
   a manifest whose data it lacks, and is a vault only once its config is there.
3. Verify each copy: its size on the secondary, sealed objects (index files, records, manifests)
   authenticated on read-back, and one pack in PACK_SAMPLE read back whole with its trailer
   authenticated.
4. Objects gone from the primary (retention, GC) are deleted from the secondary only after
   ``delete_delay`` seconds of being gone (first seen missing: a host-local note), manifests before
   the packs they use: a mistake on the primary can still be recovered from the secondary meanwhile.

Locks, pins and leftovers are not copied: they coordinate the primary's users.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.errors import IntegrityError, ObjectNotFound, StorageError
from vmvault.vault.backends.base import Backend, ObjectInfo
from vmvault.vault.packs import read_trailer
from vmvault.vault.sealed import unseal
from vmvault.vault.store import Vault

log = logging.getLogger("vmvault")
PARALLEL = 4
PACK_SAMPLE = 8  # one pack in 8 is read back whole and its trailer authenticated
DEFAULT_DELETE_DELAY_S = 7 * 86400.0
_SKIP = ("locks/", "pins/", "doctor/")
_MUTABLE = ("config", "config.2", "keys/", "settings/")
_SEALED = ("index/", "seq/", "points/")


def _phase(name: str) -> int:
    """Copy order: key files, packs, index files, records, manifests and settings, config."""
    if name.startswith("keys/"):
        return 0
    if name.startswith(("data/", "tree/")):
        return 1
    if name.startswith("index/"):
        return 2
    if name.startswith("seq/"):
        return 3
    if name in ("config", "config.2"):
        return 5
    return 4


@dataclass
class PassReport:
    copied: int = 0
    copied_bytes: int = 0
    deleted: int = 0
    pending_deletes: int = 0
    verified_packs: int = 0
    points_primary: list[str] = field(default_factory=list)
    points_secondary: list[str] = field(default_factory=list)
    lag_bytes: int = 0  # bytes on the primary the secondary still lacks (0 after a full pass)


def _listing(backend: Backend) -> dict[str, ObjectInfo]:
    return {i.name: i for i in backend.list() if not i.name.startswith(_SKIP) and ".tmp-" not in i.name}


def replicate_once(
    vault: Vault,
    secondary: Backend,
    missing_note: Path,
    *,
    delete_delay: float = DEFAULT_DELETE_DELAY_S,
    on_copy: Callable[[str], None] | None = None,
) -> PassReport:
    report = PassReport()
    primary = vault.backend
    first = {i.name: i for top in ("seq", "points") for i in primary.list(top)}
    source = {**_listing(primary), **first}
    target = _listing(secondary)
    todo = [i for name, i in source.items() if _needs_copy(primary, secondary, i, target.get(name))]
    for phase in sorted({_phase(i.name) for i in todo}):
        batch = [i for i in todo if _phase(i.name) == phase]
        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="vmv-replicate") as pool:
            for done in pool.map(lambda info: _copy(vault, secondary, info, report), batch):
                if done and on_copy is not None:
                    on_copy(done)
    _mirror_deletions(secondary, source, target, missing_note, delete_delay, report)
    after = _listing(secondary)
    report.points_primary = sorted(n.split("/", 1)[1] for n in source if n.startswith("points/"))
    report.points_secondary = sorted(n.split("/", 1)[1] for n in after if n.startswith("points/"))
    report.lag_bytes = sum(i.size for n, i in _listing(primary).items() if n not in after)
    return report


def _needs_copy(primary: Backend, secondary: Backend, src: ObjectInfo, dst: ObjectInfo | None) -> bool:
    if dst is None or dst.size != src.size:
        return True
    if src.name.startswith(_MUTABLE):  # small and rewritten in place: compare the bytes
        try:
            return primary.get(src.name) != secondary.get(src.name)
        except ObjectNotFound:
            return False
    return False


def _copy(vault: Vault, secondary: Backend, info: ObjectInfo, report: PassReport) -> str | None:
    try:
        data = vault.backend.get(info.name)
    except ObjectNotFound:
        return None  # deleted meanwhile (GC, retention): nothing to copy
    secondary.put(info.name, data)
    _verify_copy(vault, secondary, info.name, data, report)
    report.copied += 1
    report.copied_bytes += len(data)
    return info.name


def _verify_copy(vault: Vault, secondary: Backend, name: str, data: bytes, report: PassReport) -> None:
    if secondary.stat(name).size != len(data):
        raise StorageError(f"the copy of {name} on the secondary {secondary.location} has the wrong size")
    if name.startswith(_SEALED):
        unseal(vault.keys, name, secondary.get(name))  # IntegrityError if the copy is not authentic
    elif name.startswith(("data/", "tree/")) and int(name.rsplit("/", 1)[-1][:4], 16) % PACK_SAMPLE == 0:
        back = secondary.get(name)
        if back != data:
            raise IntegrityError(f"the copy of pack {name} on the secondary {secondary.location} differs")
        read_trailer(vault.keys, name, back)
        report.verified_packs += 1


def _mirror_deletions(
    secondary: Backend,
    source: dict[str, ObjectInfo],
    target: dict[str, ObjectInfo],
    note: Path,
    delay: float,
    report: PassReport,
) -> None:
    """Delete what the primary lost `delay` seconds ago or more: manifests first, packs last."""
    try:
        seen: dict[str, float] = json.loads(note.read_text())
    except (OSError, ValueError):
        seen = {}
    now = time.time()
    gone = [n for n in target if n not in source]
    seen = {n: float(seen.get(n, now)) for n in gone}
    for name in sorted((n for n in gone if now - seen[n] >= delay), key=_phase, reverse=True):
        with contextlib.suppress(ObjectNotFound):
            secondary.delete(name)
        seen.pop(name)
        report.deleted += 1
    report.pending_deletes = len(seen)
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps(seen))
