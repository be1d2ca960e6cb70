"""Verify: authenticate everything a point (or the whole vault) holds, and name what is bad.

Vault-wide: every file in the vault directory is checked (config, key file, pack index files,
packs blob by blob, manifests, disk indexes), then every point's disk index is walked to check
that each chunk it references exists and was authenticated, naming the points that use a bad
chunk. With a point ID: its manifest, its disk index and every chunk it references.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.engine.progress import ProgressCallback, ProgressTracker
from vmvault.errors import IntegrityError, VmvaultError
from vmvault.vault import keyfile
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import LeafReader, Root
from vmvault.vault.lock import holding_shared
from vmvault.vault.manifest import RecoveryPointManifest
from vmvault.vault.packs import BlobRef, decode_blob, read_trailer
from vmvault.vault.sealed import unseal
from vmvault.vault.store import CONFIG_COPY, CONFIG_NAME, CONFIG_NAMES, Vault, parse_index_payload

_KNOWN_TOP = {"config", "config.2", "keys", "index", "data", "tree", "points", "locks", "pins", "seq"}  # vault/lock.py


@dataclass
class VerifyReport:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    objects_checked: int = 0
    bytes_checked: int = 0
    # Every point checked -> its first problem (None: it passed), so the catalog can refuse to
    # restore a point that failed until a later verify passes.
    points: dict[str, str | None] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)


@holding_shared  # no garbage collection sweeps while we read (it would look like missing data)
def run_verify(vault: Vault, rp_id: str | None = None, on_progress: ProgressCallback | None = None) -> VerifyReport:
    report = VerifyReport()
    tracker = ProgressTracker(on_progress)
    if rp_id is not None:
        _verify_point(vault, rp_id, report, tracker, deep=True)
        return report
    files = dict(_walk(vault.storage_dir))
    tracker.state.total_bytes = sum(files.values())
    bad_blobs = _verify_files(vault, files, report, tracker)
    for point in vault.list_recovery_points():
        _verify_point(vault, point, report, tracker, deep=False, bad_blobs=bad_blobs)
    _verify_chain(vault, report)
    tracker.report(force=True)
    return report


def _verify_chain(vault: Vault, report: VerifyReport) -> None:
    """Points deleted or added behind vmvault's back (vault/seqchain.py), and missing copies."""
    for name in (CONFIG_COPY, keyfile.KEYFILE_COPY):
        if not vault.backend.exists(name):
            report.notes.append(f"vault file {name} (second copy) is missing: it is written on the next write")
    audit = vault.audit_chain()
    for problem in audit.problems:
        report.problem(problem)
    report.notes.extend(audit.notes)


def _walk(root: Path) -> Iterator[tuple[str, int]]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            try:
                size = full.stat().st_size
            except FileNotFoundError:
                continue  # a pin or a temporary file removed meanwhile (restores run beside verify)
            yield full.relative_to(root).as_posix(), size


def _verify_files(
    vault: Vault, files: dict[str, int], report: VerifyReport, tracker: ProgressTracker
) -> dict[bytes, str]:
    """Check every file; returns {blob id: problem} for blobs that failed."""
    indexed: dict[str, tuple[bytes, list[BlobRef]]] = {}
    bad: dict[bytes, str] = {}
    for name in sorted(files):
        top = name.split("/", 1)[0]
        if name.rsplit("/", 1)[-1].startswith(".tmp-"):
            report.notes.append(f"leftover temporary file {name} from an interrupted write (harmless)")
        elif top not in _KNOWN_TOP or (top == "keys" and name not in keyfile.KEYFILE_NAMES):
            report.problem(f"unexpected file {name} in the vault directory")
        elif name in CONFIG_NAMES:
            _check(report, name, _check_config, vault, name)
        elif name in keyfile.KEYFILE_NAMES:
            _check(report, name, _check_keyfile, vault, name)
        elif top == "seq":
            pass  # the record chain: checked as a whole by _verify_chain
        elif top == "index":
            _check(report, name, _read_index, vault, name, indexed)
        elif top == "points":
            _check(report, name, vault.read_manifest, name.split("/", 1)[1])
        report.objects_checked += 1
    for name in sorted(n for n in files if n.split("/", 1)[0] in ("data", "tree") and ".tmp-" not in n):
        _verify_pack(vault, name, indexed.pop(name, None), report, bad)
        tracker.add(read=files[name])
        tracker.report()
    for pack in indexed:
        report.problem(f"pack {pack} is listed in an index file but missing from the vault")
    return bad


def _check(report: VerifyReport, name: str, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except VmvaultError as exc:
        report.problem(f"{name}: {exc.message}")
    except (ValueError, KeyError, TypeError) as exc:
        report.problem(f"{name}: damaged ({exc})")


def _check_config(vault: Vault, name: str = CONFIG_NAME) -> None:
    import json

    config = json.loads(vault.backend.get(name))
    if not vault.keys.check_mac(keyfile.canonical(config), str(config.get("mac", ""))):
        raise IntegrityError(f"the vault config is damaged: its MAC does not match ({name})")


def _check_keyfile(vault: Vault, name: str = keyfile.KEYFILE_NAME) -> None:
    keyfile.check_keyfile(vault.backend.get(name), vault.keys, name)


def _read_index(vault: Vault, name: str, indexed: dict[str, tuple[bytes, list[BlobRef]]]) -> None:
    pack, salt, entries = parse_index_payload(unseal(vault.keys, name, vault.backend.get(name)))
    indexed[pack] = (salt, entries)


def _verify_pack(
    vault: Vault, name: str, index: tuple[bytes, list[BlobRef]] | None, report: VerifyReport, bad: dict[bytes, str]
) -> None:
    data = vault.backend.get(name)
    report.bytes_checked += len(data)
    try:
        salt, entries = read_trailer(vault.keys, name, data)
    except IntegrityError as exc:
        report.problem(exc.message)
        entries, salt = (index[1], index[0]) if index else ([], b"")
    if index is None:
        report.notes.append(
            f"pack {name} has no index file: data of an interrupted backup (garbage collection removes it)"
        )
    elif (salt, sorted(e.pack_entry() for e in entries)) != (index[0], sorted(e.pack_entry() for e in index[1])):
        report.problem(f"pack {name} does not match its index file")
    for ref in entries:
        stored = data[ref.offset : ref.offset + ref.length]
        try:
            decode_blob(vault.keys, salt, ref, stored, f"pack {name}")
        except IntegrityError as exc:
            report.problem(exc.message)
            bad[ref.blob_id] = f"pack {name}"
        report.objects_checked += 1


def _verify_point(
    vault: Vault,
    rp_id: str,
    report: VerifyReport,
    tracker: ProgressTracker,
    *,
    deep: bool,
    bad_blobs: dict[bytes, str] | None = None,
) -> None:
    before = len(report.problems)
    try:
        _verify_point_disks(vault, rp_id, report, tracker, deep, bad_blobs or {})
    finally:
        report.points[rp_id] = report.problems[before] if len(report.problems) > before else None


def _verify_point_disks(
    vault: Vault, rp_id: str, report: VerifyReport, tracker: ProgressTracker, deep: bool, bad_blobs: dict[bytes, str]
) -> None:
    try:
        manifest = vault.read_manifest(rp_id)
    except VmvaultError as exc:
        report.problem(f"recovery point {rp_id}: {exc.message}")
        return
    for disk in manifest.disks:
        try:
            _verify_disk(vault, manifest, disk.name, report, tracker, deep, bad_blobs)
        except VmvaultError as exc:
            report.problem(f"recovery point {rp_id} disk {disk.name}: {exc.message}")


def _verify_disk(
    vault: Vault,
    manifest: RecoveryPointManifest,
    disk_name: str,
    report: VerifyReport,
    tracker: ProgressTracker,
    deep: bool,
    bad_blobs: dict[bytes, str],
) -> None:
    disk = manifest.disk(disk_name)
    root = Root.decode(vault.get_blob(bytes.fromhex(disk.index_root)), f"disk {disk_name} of point {manifest.rp_id}")
    leaves = LeafReader(vault.get_blob)
    for n, leaf_id in enumerate(root.leaves):
        ids = leaves.read(leaf_id).ids
        wanted = [c for c in ids if c != ZERO_ID]
        found = vault.index.lookup_many(wanted)
        for i, cid in enumerate(ids):
            if cid == ZERO_ID:
                continue
            offset = (n * root.leaf_span + i) * root.chunk_size
            where = f"disk {disk_name}, offset {offset}, recovery point {manifest.rp_id}"
            if cid not in found:
                report.problem(f"chunk {cid.hex()} is missing ({where})")
            elif cid in bad_blobs:
                report.problem(f"chunk {cid.hex()} in {bad_blobs[cid]} is damaged ({where})")
            elif deep:
                try:
                    data = vault.read_blob(found[cid])
                    report.bytes_checked += len(data)
                    tracker.add(read=len(data))
                except IntegrityError as exc:
                    report.problem(f"{exc.message} ({where})")
            report.objects_checked += 1
        tracker.report()
