"""Verify: authenticate everything a point (or the whole vault) holds, and name what is bad.

Vault-wide: every file in the vault directory is checked (config, key file, pack index files,
packs blob by blob, manifests, disk indexes), then every point's disk index is walked to check
that each chunk it references exists and was authenticated.

Every damaged object (a pack, a pack index file, a manifest, a chunk missing from every pack) is
reported once, with the recovery points that depend on it: per point the disks and the byte
ranges that cannot be restored. Damage to a pack as a whole (its header, its trailer, its index
file, the file itself missing or cut short) counts against every blob it holds, because a restore
authenticates a pack's header, trailer and index file before it trusts any blob of it
(Vault.authenticate_pack). With a point ID: its manifest, its disk index and every chunk it
references, each read and authenticated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vmvault.engine.progress import ProgressCallback, ProgressTracker
from vmvault.errors import IntegrityError, VmvaultError
from vmvault.vault import keyfile
from vmvault.vault.chunkindex import Location
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import LeafReader, Root
from vmvault.vault.lock import holding_shared
from vmvault.vault.manifest import RecoveryPointManifest
from vmvault.vault.packs import BlobRef, decode_blob, read_trailer
from vmvault.vault.sealed import unseal
from vmvault.vault.store import CONFIG_COPY, CONFIG_NAME, CONFIG_NAMES, Vault, index_name_for, parse_index_payload

# locks and pins: vault/lock.py; settings: service/vaultsettings.py
_KNOWN_TOP = {"config", "config.2", "keys", "index", "data", "tree", "points", "locks", "pins", "settings", "seq"}
SETTINGS = "settings/catalog"  # the vault's configuration (service/vaultsettings.py), sealed
MISSING = "missing chunks"  # the object named for chunks found in no pack and no index file


@dataclass
class Affected:
    """What one damaged object takes from one point: per disk, the byte ranges [start, end)."""

    vm: str | None
    disks: dict[str, list[list[int]]] = field(default_factory=dict)

    def add(self, disk: str, start: int, end: int) -> None:
        ranges = self.disks.setdefault(disk, [])
        if ranges and ranges[-1][1] >= start:  # walked in offset order: merge touching ranges
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([start, end])


@dataclass
class Damaged:
    """One damaged object, what is wrong with it, and the points that depend on it."""

    name: str
    problem: str
    points: dict[str, Affected] = field(default_factory=dict)
    healed: bool = False  # every blob it held has a good copy elsewhere: nothing depends on it

    def summary(self) -> str:
        if self.healed:
            return (
                f"{self.name}: {self.problem}; every blob it held has a good copy in another pack, "
                "so no point depends on it (garbage collection drops it)"
            )
        if not self.points:
            return f"{self.name}: {self.problem}; no recovery point uses it"
        described = "; ".join(
            f"{rp} (VM {a.vm or '?'}"
            + "".join(f", disk {d} bytes " + ",".join(f"{s}-{e}" for s, e in r) for d, r in a.disks.items())
            + ")"
            for rp, a in sorted(self.points.items())
        )
        return f"{self.name}: {self.problem}; recovery points that cannot be restored: {described}"


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
    damaged: dict[str, Damaged] = field(default_factory=dict)  # object name -> what depends on it

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def damage(self, name: str, problem: str) -> Damaged:
        """Record a damaged object (the first problem found in it is the one reported)."""
        if name not in self.damaged:
            self.damaged[name] = Damaged(name, problem)
        return self.damaged[name]

    def affects(
        self, name: str, problem: str, rp_id: str, vm: str | None, disk: str | None, span: tuple[int, int]
    ) -> None:
        entry = self.damage(name, problem).points.setdefault(rp_id, Affected(vm))
        if disk is not None:
            entry.add(disk, *span)
        if self.points.get(rp_id) is None:
            self.points[rp_id] = f"{name} is damaged: {problem}"

    def finish(self) -> None:
        """One problem line per damaged object, naming the points that depend on it (a note for
        one whose every blob was stored again elsewhere: self-healed)."""
        for d in self.damaged.values():
            if d.healed and not d.points:
                self.notes.append(d.summary())
            else:
                self.problem(d.summary())


class _Bad(Exception):
    """A blob a point needs lives in a damaged object (or in none)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(problem)
        self.name, self.problem = name, problem


@holding_shared  # no garbage collection sweeps while we read (it would look like missing data)
def run_verify(
    vault: Vault,
    rp_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    expected_points: Iterable[str] = (),
) -> VerifyReport:
    """Verify the vault (or one point). expected_points: the points the catalog lists in this
    vault, so a point whose manifest is gone is reported as damaged too."""
    report = VerifyReport()
    tracker = ProgressTracker(on_progress)
    if rp_id is not None:
        _Walker(vault, report, tracker, _Scan(), deep=True).point(rp_id)
        report.finish()
        return report
    files = {info.name: info.size for info in vault.backend.inventory()}
    tracker.state.total_bytes = sum(files.values())
    scan = _verify_files(vault, files, report, tracker)
    # Remembered in the local chunk index: backups store such data again instead of deduplicating
    # against the bad copy, and readers prefer a good copy (self-healing).
    vault.index.replace_bad_copies((blob, pack, problem) for (blob, pack), (_o, problem) in scan.copies.items())
    walker = _Walker(vault, report, tracker, scan, deep=False)
    present = vault.list_recovery_points()
    for point in present:
        walker.point(point)
    for point in sorted(set(expected_points) - set(present)):
        name = vault.manifest_name(point)
        report.affects(name, "the manifest is missing from the vault", point, None, None, (0, 0))
    _mark_healed(vault, report, scan)
    for pack in sorted(scan.unindexed_packs - scan.unindexed_used):
        report.notes.append(
            f"pack {pack} has no index file and no point uses it: data of an interrupted backup "
            "(garbage collection removes it)"
        )
    _verify_chain(vault, report)
    report.finish()
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


_Indexed = dict[str, tuple[bytes, list[BlobRef]]]
BadBlobs = dict[bytes, tuple[str, str]]  # blob id -> (damaged object, its problem)


@dataclass
class _Scan:
    """What the file pass found, for the point walk."""

    bad: BadBlobs = field(default_factory=dict)
    copies: dict[tuple[bytes, str], tuple[str, str]] = field(default_factory=dict)  # (blob, pack) -> damage
    unindexed: dict[bytes, str] = field(default_factory=dict)  # blob id -> pack with no index file
    unindexed_used: set[str] = field(default_factory=set)  # of those packs, the ones a point uses
    unindexed_packs: set[str] = field(default_factory=set)


def _verify_files(vault: Vault, files: dict[str, int], report: VerifyReport, tracker: ProgressTracker) -> _Scan:
    """Check every file; returns the blobs that live in a damaged object or an unindexed pack."""
    indexed: _Indexed = {}
    bad_index: dict[str, str] = {}
    scan = _Scan()
    bad = scan.bad
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
        elif top == "settings" and name != SETTINGS:
            report.problem(f"unexpected file {name} in the vault directory")
        elif name == SETTINGS:
            _check(report, name, _check_settings, vault)
        elif top == "index":
            problem = _read_index(vault, name, indexed)
            if problem is not None:
                bad_index[name] = problem
        report.objects_checked += 1
    for name in sorted(n for n in files if n.split("/", 1)[0] in ("data", "tree") and ".tmp-" not in n):
        _verify_pack(vault, name, indexed.pop(name, None), bad_index, report, scan)
        tracker.add(read=files[name])
        tracker.report()
    for pack, (_salt, entries) in indexed.items():
        problem = f"the pack is missing from the vault (its index file {index_name_for(pack)} lists it)"
        report.damage(pack, problem)
        for ref in entries:
            bad[ref.blob_id] = scan.copies[(ref.blob_id, pack)] = (pack, problem)
    for index_name, problem in bad_index.items():
        report.damage(index_name, problem)  # named even when its pack is gone too
    return scan


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


def _check_settings(vault: Vault) -> None:
    unseal(vault.keys, SETTINGS, vault.backend.get(SETTINGS))


def _check_keyfile(vault: Vault, name: str = keyfile.KEYFILE_NAME) -> None:
    keyfile.check_keyfile(vault.backend.get(name), vault.keys, name)


def _read_index(vault: Vault, name: str, indexed: _Indexed) -> str | None:
    """Read one index file into `indexed`; its problem when it is damaged."""
    try:
        pack, salt, entries = parse_index_payload(unseal(vault.keys, name, vault.backend.get(name)))
    except VmvaultError as exc:
        return exc.message
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"vault file {name} is damaged ({exc})"
    if pack.count("/") != 2 or index_name_for(pack) != name:
        return f"vault file {name} names pack {pack!r}, not its own"
    indexed[pack] = (salt, entries)
    return None


def _verify_pack(
    vault: Vault,
    name: str,
    index: tuple[bytes, list[BlobRef]] | None,
    bad_index: dict[str, str],
    report: VerifyReport,
    scan: _Scan,
) -> None:
    bad = scan.bad
    data = vault.backend.get(name)
    report.bytes_checked += len(data)
    index_name = index_name_for(name)
    whole: tuple[str, str] | None = None  # (object, problem) that takes every blob of the pack
    try:
        salt, entries = read_trailer(vault.keys, name, data)
    except IntegrityError as exc:
        whole = (name, exc.message)
        cached = vault.index.pack_entries(name)  # what this home listed before the damage
        salt, entries = index or cached or (b"", [])
    if whole is None and index_name in bad_index:
        whole = (index_name, bad_index[index_name])
    elif whole is None and index is None:
        # Kept apart: harmless leftovers of a died backup unless a point uses a blob of it.
        scan.unindexed_packs.add(name)
        scan.unindexed.update((ref.blob_id, name) for ref in entries)
    elif index is not None and (salt, sorted(e.pack_entry() for e in entries)) != (
        index[0],
        sorted(e.pack_entry() for e in index[1]),
    ):
        whole = (name, f"the pack does not match its index file {index_name}")
    if whole is not None:
        report.damage(*whole)
        for ref in entries:
            bad[ref.blob_id] = scan.copies[(ref.blob_id, name)] = whole
    for ref in entries:
        stored = data[ref.offset : ref.offset + ref.length]
        try:
            decode_blob(vault.keys, salt, ref, stored, f"pack {name}")
        except IntegrityError as exc:
            report.damage(name, exc.message)
            bad.setdefault(ref.blob_id, (name, exc.message))
            scan.copies.setdefault((ref.blob_id, name), (name, exc.message))
        report.objects_checked += 1


class _Walker:
    """Walks points' disk indexes and charges every unreadable part to the object it lives in."""

    def __init__(
        self, vault: Vault, report: VerifyReport, tracker: ProgressTracker, scan: _Scan, *, deep: bool
    ) -> None:
        self.vault, self.report, self.tracker, self.scan, self.deep = vault, report, tracker, scan, deep

    def point(self, rp_id: str) -> None:
        self.report.points.setdefault(rp_id, None)
        name = self.vault.manifest_name(rp_id)
        try:
            manifest = self.vault.read_manifest(rp_id)
        except VmvaultError as exc:
            self.report.affects(name, exc.message, rp_id, None, None, (0, 0))
            return
        self.report.objects_checked += 1
        for disk in manifest.disks:
            self.disk(manifest, disk.name, disk.size)

    def disk(self, manifest: RecoveryPointManifest, disk_name: str, size: int) -> None:
        what = f"disk {disk_name} of point {manifest.rp_id}"

        def charge(exc: _Bad, start: int, end: int) -> None:
            self.report.affects(
                exc.name, exc.problem, manifest.rp_id, manifest.vm_name, disk_name, (start, min(end, size))
            )

        try:
            root = Root.decode(self.fetch(bytes.fromhex(manifest.disk(disk_name).index_root)), what)
        except _Bad as exc:
            charge(exc, 0, size)
            return
        except VmvaultError as exc:
            charge(_Bad(self.vault.manifest_name(manifest.rp_id), exc.message), 0, size)
            return
        span = root.leaf_span * root.chunk_size
        leaves = LeafReader(self.fetch)
        for n, leaf_id in enumerate(root.leaves):
            try:
                ids = leaves.read(leaf_id).ids
            except _Bad as exc:
                charge(exc, n * span, (n + 1) * span)
                continue
            except VmvaultError as exc:
                charge(self.locate(leaf_id, exc.message), n * span, (n + 1) * span)
                continue
            found = self.vault.index.lookup_many([c for c in ids if c != ZERO_ID])  # one query per leaf
            for i, cid in enumerate(ids):
                if cid == ZERO_ID:
                    continue
                offset = n * span + i * root.chunk_size
                try:
                    self.chunk(cid, found.get(cid))
                except _Bad as exc:
                    charge(exc, offset, offset + root.chunk_size)
                self.report.objects_checked += 1
            self.tracker.report()

    def chunk(self, cid: bytes, found: Location | None) -> None:
        loc = self.resolve(cid, found)
        if self.deep:
            try:
                data = self.vault.read_blob(loc)
            except IntegrityError as exc:
                raise _Bad(loc.pack, exc.message) from exc
            self.report.bytes_checked += len(data)
            self.tracker.add(read=len(data))

    def check(self, blob_id: bytes) -> Location:
        return self.resolve(blob_id, self.vault.index.lookup(blob_id))

    def resolve(self, blob_id: bytes, loc: Location | None) -> Location:
        """The blob's location (`loc`: the index's, a good copy when there is one), or _Bad
        naming the damaged object it lives in (or MISSING)."""
        if loc is not None and (blob_id, loc.pack) not in self.scan.copies:
            return loc
        if blob_id in self.scan.bad:
            raise _Bad(*self.scan.bad[blob_id])
        if loc is not None:
            return loc
        pack = self.scan.unindexed.get(blob_id)
        if pack is not None:
            self.scan.unindexed_used.add(pack)
            raise _Bad(
                index_name_for(pack),
                f"the index file of pack {pack} is missing or unreadable "
                "(the pack is intact: 'vmvault vault repair VAULT --apply' rebuilds it)",
            )
        raise _Bad(MISSING, "chunks are in no pack of the vault (their pack is gone with its index file)")

    def fetch(self, blob_id: bytes) -> bytes:
        loc = self.check(blob_id)
        try:
            return self.vault.read_blob(loc)
        except IntegrityError as exc:
            raise _Bad(loc.pack, exc.message) from exc

    def locate(self, blob_id: bytes, problem: str) -> _Bad:
        loc = self.vault.index.lookup(blob_id)
        return _Bad(loc.pack if loc is not None else MISSING, problem)


def _mark_healed(vault: Vault, report: VerifyReport, scan: _Scan) -> None:
    """A damaged object no point depends on, whose every blob has a good copy elsewhere, is healed."""
    charged: dict[str, list[bytes]] = {}
    for (blob, _pack), (name, _problem) in scan.copies.items():
        charged.setdefault(name, []).append(blob)
    for name, damaged in report.damaged.items():
        blobs = charged.get(name)
        if damaged.points or not blobs:
            continue
        found = vault.index.lookup_many(blobs)
        damaged.healed = all(b in found and (b, found[b].pack) not in scan.copies for b in blobs)
