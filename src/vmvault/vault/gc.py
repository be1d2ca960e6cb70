"""Garbage collection: delete packed data that no recovery point or pin can reach.

Vault-level (no catalog): the manifests in ``points/`` are the truth, so a point that is soft
deleted in the catalog still has its manifest and keeps its data, and points written by another
host sharing the vault are seen too.

**Mark** (no lock, backups keep running): walk every manifest's disk indexes and every valid
pin's roots: root -> leaves, each leaf resolved over its delta bases (diskindex.LeafReader). Kept:
the roots, every leaf and base read on the way, and the chunks each leaf reads as, recorded in an
SQLite file beside the chunk index cache (never all IDs in memory). A leaf already resolved is
not read again: points share unchanged leaves, so marking costs the vault's distinct metadata,
not points x disk size. Chunks a base holds but a live delta patched over stay unmarked, so delta
chains do not keep old versions of rewritten data alive.

**Sweep** (the vault lock held exclusive, see vault/lock.py): re-read the chunk index and mark
the manifests and pins that appeared while marking (a backup that finished meanwhile), then per
pack older than the grace window: every blob dead -> delete the index file, then the pack; some
dead (at least ``repack_threshold`` of its bytes) -> copy the live blobs into new packs, publish
them with their index files, then delete the old index file, then the old pack. A crash at any
step leaves either duplicate blobs (collected next time) or a pack without index file, never an
index entry without its data.

**Packs without a readable index file** (a backup that died between the two writes, or an index
file lost or damaged) are never deleted for that alone: before marking, each is listed again
from its own authenticated trailer (its index file rewritten when missing) and then swept like
any other pack, i.e. deleted only when no point or pin references its blobs. One whose trailer
cannot be read either is kept and reported. `.tmp-*` files of writes that died are deleted once
older than the grace window.

If a point's disk index cannot be read the collection stops before deleting anything: what it
would have referenced is unknown. (A pin whose disk index cannot be read is reported and skipped:
its reader cannot use it either.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.errors import Cancelled, IntegrityError, NotFound, ObjectNotFound, VmvaultError
from vmvault.vault import lock
from vmvault.vault.backends.local import dead_writer
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import LeafReader, Root
from vmvault.vault.packs import TYPE_DATA, TYPE_TREE, BlobRef, decode_blob, encode_body
from vmvault.vault.store import PackWriter, Vault, index_name_for

DEFAULT_GRACE_SECONDS = 24 * 3600
DEFAULT_REPACK_THRESHOLD = 0.2  # repack a pack once a fifth of its bytes is dead
LEAF_CACHE = 256  # resolved leaves kept while marking (delta chains share their bases)

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class GcReport:
    points: int = 0  # manifests marked
    pins: int = 0  # valid pins marked
    stale_pins_removed: int = 0
    tree_blobs_live: int = 0
    chunks_live: int = 0
    packs_checked: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_too_young: int = 0  # inside the grace window: left alone
    packs_pinned: int = 0  # holding data a pin reaches: left alone
    orphan_packs_deleted: int = 0  # re-indexed packs (no index file) then deleted as unreferenced
    packs_reindexed: int = 0  # packs without a readable index file, listed again from their trailer
    packs_unreadable_kept: int = 0  # no readable index file nor trailer: kept, reported in problems
    temporaries_deleted: int = 0  # .tmp-* files of writes that died
    blobs_deleted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    lock_wait_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after


class MarkSet:
    """Reachable blobs, on disk. `owner` records which pack's copy of a blob is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.executescript(
            """
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
            CREATE TABLE trees (id BLOB PRIMARY KEY, owner INTEGER) WITHOUT ROWID;
            CREATE TABLE resolved (id BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE pinned (id BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE pin_resolved (id BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE chunks (id BLOB PRIMARY KEY, owner INTEGER) WITHOUT ROWID;
            CREATE TABLE points (rp_id TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE plan (n INTEGER PRIMARY KEY, pack TEXT NOT NULL, index_name TEXT NOT NULL,
                               action TEXT NOT NULL, dead INTEGER NOT NULL);
            """
        )

    def close(self) -> None:
        self.conn.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def has_tree(self, blob_id: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM trees WHERE id = ?", (blob_id,)).fetchone() is not None

    def add_tree(self, blob_id: bytes) -> None:
        self.conn.execute("INSERT OR IGNORE INTO trees (id) VALUES (?)", (blob_id,))

    def is_resolved(self, leaf_id: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM resolved WHERE id = ?", (leaf_id,)).fetchone() is not None

    def add_resolved(self, leaf_id: bytes) -> None:
        self.conn.execute("INSERT OR IGNORE INTO resolved VALUES (?)", (leaf_id,))

    def is_pinned(self, blob_id: bytes, *, resolved: bool = False) -> bool:
        table = "pin_resolved" if resolved else "pinned"
        return self.conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (blob_id,)).fetchone() is not None

    def add_pinned(self, ids: Iterable[bytes], *, resolved: bool = False) -> None:
        table = "pin_resolved" if resolved else "pinned"
        self.conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?)", ((i,) for i in ids if i != ZERO_ID))

    def add_chunks(self, ids: Iterable[bytes]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO chunks (id) VALUES (?)", ((i,) for i in ids if i != ZERO_ID))

    def has_point(self, rp_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM points WHERE rp_id = ?", (rp_id,)).fetchone() is not None

    def add_point(self, rp_id: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO points VALUES (?)", (rp_id,))

    def claim(self, ref: BlobRef, owner: int) -> bool:
        """True when the blob is reachable and this pack's copy is the one kept (first claim wins)."""
        table = "trees" if ref.type == TYPE_TREE else "chunks"
        cur = self.conn.execute(f"UPDATE {table} SET owner = ? WHERE id = ? AND owner IS NULL", (owner, ref.blob_id))
        if cur.rowcount:
            return True
        row = self.conn.execute(f"SELECT owner FROM {table} WHERE id = ?", (ref.blob_id,)).fetchone()
        return row is not None and row[0] == owner

    def counts(self) -> tuple[int, int]:
        trees = self.conn.execute("SELECT count(*) FROM trees").fetchone()[0]
        chunks = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return int(trees), int(chunks)

    def plan(self, action: str) -> Iterator[tuple[int, str, str, int]]:
        query = "SELECT n, pack, index_name, dead FROM plan WHERE action = ? ORDER BY n"
        yield from self.conn.execute(query, (action,))


class _Collector:
    def __init__(
        self,
        vault: Vault,
        marks: MarkSet,
        report: GcReport,
        progress: ProgressFn | None,
        cancel: threading.Event,
    ) -> None:
        self.vault, self.marks, self.report, self.cancel = vault, marks, report, cancel
        self._progress = progress
        self.leaves = LeafReader(self._fetch_tree, cache_size=LEAF_CACHE)
        self.pin_leaves = LeafReader(self._fetch_pinned, cache_size=LEAF_CACHE)
        self.unreadable: set[str] = set()  # packs kept because nothing says what they hold
        self.reindexed: set[str] = set()  # packs listed again from their trailer by this collection
        # Packs whose writer is known to have died (service/gc.py, from the jobs' pack journals):
        # exempt from the grace window, which protects running writers.
        self.dead_packs: frozenset[str] = frozenset()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("garbage collection was cancelled; what it deleted so far was unreferenced")

    def progress(self, phase: str, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(phase, done, total)

    # ---- mark -------------------------------------------------------------------------------------
    def mark_points(self) -> None:
        """Mark every manifest not marked yet (all of them the first time, the new ones under the lock)."""
        todo = [rp for rp in self.vault.list_recovery_points() if not self.marks.has_point(rp)]
        for n, rp_id in enumerate(todo):
            self.check_cancel()
            try:
                manifest = self.vault.read_manifest(rp_id)
            except (NotFound, ObjectNotFound):
                continue  # deleted by retention meanwhile
            for disk in manifest.disks:
                self.mark_root(disk.index_root, f"disk {disk.name} of point {rp_id}")
            self.marks.add_point(rp_id)
            self.report.points += 1
            self.progress("mark", n + 1, len(todo))

    def mark_pins(self) -> None:
        """Everything a valid pin reaches is live, and also *pinned*: its pack is neither deleted
        nor repacked, because the pin's reader (a mount) holds no lock and may be reading it now."""
        self.report.pins = 0
        for pin in lock.valid_pins(self.vault):
            try:
                for root in pin.roots:
                    what = f"a disk pinned by {pin.purpose} (point {pin.rp_id})"
                    self.mark_root(root, what)
                    self.pin_root(root, what)
            except IntegrityError as exc:
                # What this pin reaches cannot be read, so its reader cannot use it either: note it
                # and go on (the points' own disk indexes were all read, or we would not be here).
                self.report.problems.append(f"pin {pin.pin_id}: {exc.message}")
                continue
            self.report.pins += 1

    def pin_root(self, root_hex: str, what: str) -> None:
        root_id = bytes.fromhex(root_hex)
        if self.marks.is_pinned(root_id):
            return
        try:
            root = Root.decode(self.vault.get_blob(root_id), what)
            for leaf_id in root.leaves:
                if not self.marks.is_pinned(leaf_id, resolved=True):
                    self.marks.add_pinned(self.pin_leaves.read(leaf_id).ids)
                    self.marks.add_pinned([leaf_id], resolved=True)
            self.marks.add_pinned([root_id])
        except VmvaultError as exc:
            raise IntegrityError(
                f"garbage collection stopped before deleting anything: cannot read the disk index of {what}: "
                f"{exc.message}",
                hint="run 'vmvault vault verify' to see what is damaged",
            ) from exc

    def _fetch_pinned(self, blob_id: bytes) -> bytes:
        self.marks.add_pinned([blob_id])  # a pinned leaf or one of its bases
        return self.vault.get_blob(blob_id)

    def mark_root(self, root_hex: str, what: str) -> None:
        root_id = bytes.fromhex(root_hex)
        if self.marks.has_tree(root_id):
            return
        try:
            root = Root.decode(self.vault.get_blob(root_id), what)
            self.marks.add_tree(root_id)
            for leaf_id in root.leaves:
                self.mark_leaf(leaf_id)
        except VmvaultError as exc:
            raise IntegrityError(
                f"garbage collection stopped before deleting anything: cannot read the disk index of {what}: "
                f"{exc.message}",
                hint="run 'vmvault vault verify' to see what is damaged",
            ) from exc

    def mark_leaf(self, leaf_id: bytes) -> None:
        """A leaf a root names: its chunks as they read at that point (delta resolved), once.

        Every leaf read on the way (the leaf, its delta bases) is kept: decoding needs them. The
        chunks a base holds but a live delta patched over are not marked through the delta, so a
        chain of deltas does not keep old versions of rewritten data alive.
        """
        if self.marks.is_resolved(leaf_id):
            return
        self.marks.add_chunks(self.leaves.read(leaf_id).ids)
        self.marks.add_resolved(leaf_id)

    def _fetch_tree(self, blob_id: bytes) -> bytes:
        self.marks.add_tree(blob_id)  # fetched by the leaf reader: the leaf or one of its bases
        return self.vault.get_blob(blob_id)

    # ---- sweep ------------------------------------------------------------------------------------
    def classify(self, grace_seconds: float, threshold: float) -> None:
        """Decide per indexed pack: keep, delete or repack (written to the plan table)."""
        now = time.time()
        order = {pack: n for n, (pack, _index) in enumerate(self.vault.index.iter_packs())}
        total = len(order)
        self.claim_good_copies(order)
        bad_packs = {pack for _blob, pack in self.vault.index.bad_copies()}
        for n, (pack, index_name) in enumerate(self.vault.index.iter_packs()):  # streamed, not listed
            self.check_cancel()
            self.report.packs_checked += 1
            self.progress("sweep", n + 1, total)
            age = self._age(pack, index_name, now)
            found = self.vault.index.pack_entries(pack)
            if age is None or found is None:
                continue  # the pack file is missing: verify reports it; nothing to free
            if age < grace_seconds and pack not in self.dead_packs:
                self.report.packs_too_young += 1
                continue
            _salt, entries = found
            live = [self.marks.claim(ref, n) for ref in entries]
            if any(self.marks.is_pinned(ref.blob_id) for ref in entries):
                self.report.packs_pinned += 1
                continue  # a mount may be reading it: not moved, not deleted, while the pin lasts
            dead_bytes = sum(ref.length for ref, alive in zip(entries, live, strict=True) if not alive)
            size = sum(ref.length for ref in entries)
            if not any(live):
                action = "delete"
            elif dead_bytes and (dead_bytes >= threshold * size or pack in bad_packs):
                action = "repack"  # (a bad copy whose data is stored again: dropped whatever its size)
            else:
                continue
            self.marks.conn.execute(
                "INSERT INTO plan VALUES (?, ?, ?, ?, ?)", (n, pack, index_name, action, live.count(False))
            )

    def claim_good_copies(self, order: dict[str, int]) -> None:
        """A blob verify found bad in one pack and a backup stored again in another: the good copy
        is the one kept (claimed first), so the bad copy counts as dead and its pack is repacked
        or deleted. A bad copy with no good one stays claimable: it may be all there is."""
        index = self.vault.index
        for blob, bad_pack in index.bad_copies():
            loc = index.lookup(blob)  # a good copy when there is one
            if loc is not None and loc.pack != bad_pack and loc.pack in order and not index.is_bad_copy(blob, loc.pack):
                self.marks.claim(loc.ref, order[loc.pack])

    def _age(self, pack: str, index_name: str, now: float) -> float | None:
        # A re-indexed pack's index file is new: its age is the pack's own.
        names = (pack,) if pack in self.reindexed else (pack, index_name)
        try:
            newest = max(os.stat(self.vault.storage_dir / name).st_mtime for name in names)
        except FileNotFoundError:
            return None
        return now - newest

    def delete_pack(self, pack: str, index_name: str) -> None:
        """Index file first, then the pack: an index entry must never name missing data."""
        with contextlib.suppress(ObjectNotFound):
            self.vault.backend.delete(index_name)
        self.vault.index.forget_index_files([index_name])
        with contextlib.suppress(ObjectNotFound):
            self.vault.backend.delete(pack)

    def repack(self) -> list[tuple[str, str]]:
        """Copy each planned pack's kept blobs into new packs; returns the packs now safe to delete."""
        writers = {TYPE_DATA: PackWriter(self.vault, TYPE_DATA), TYPE_TREE: PackWriter(self.vault, TYPE_TREE)}
        done: list[tuple[str, str]] = []
        for n, pack, index_name, dead in list(self.marks.plan("repack")):
            self.check_cancel()
            found = self.vault.index.pack_entries(pack)
            if found is None:
                continue
            salt, entries = found
            try:
                blobs = self._live_blobs(n, pack, salt, entries)
            except IntegrityError as exc:
                self.report.problems.append(f"pack {pack} was not repacked: {exc.message}")
                continue
            for ref, plain in blobs:
                body, flags = encode_body(plain)
                writers[ref.type].add(ref.blob_id, body, flags, len(plain))
            done.append((pack, index_name))
            self.report.blobs_deleted += dead
        for writer in writers.values():
            writer.flush()  # new packs and their index files are durable before any old one goes
            writer.close()
            self.report.packs_written += writer.packs_published
        return done

    def _live_blobs(self, n: int, pack: str, salt: bytes, entries: list[BlobRef]) -> list[tuple[BlobRef, bytes]]:
        data = self.vault.backend.get(pack)
        out = []
        for ref in entries:
            if self.marks.claim(ref, n):  # already claimed by this pack in classify: True again
                stored = data[ref.offset : ref.offset + ref.length]
                out.append((ref, decode_blob(self.vault.keys, salt, ref, stored, f"pack {pack}")))
        return out

    def reindex_unindexed(self) -> None:
        """Packs that no index file lists, re-indexed from their own trailer before anything is
        marked or swept: a lost or damaged index file must never make an intact pack look like
        garbage (issue 18: GC deleted such packs and the points using them were lost).

        A pack whose index file is missing gets it rewritten (same name, so a backup publishing
        it meanwhile writes an equivalent file); one whose index file exists but is damaged is
        listed locally only, so `vault verify` still names the damaged file until `vault repair
        --apply` rewrites it. From then on the sweep treats the pack like any other: deleted or
        repacked only when no point or pin references its blobs. A pack whose trailer cannot be
        read either is kept untouched (what it holds is unknown) and reported.
        """
        for pack in self.vault.unindexed_packs():
            self.check_cancel()
            index_name = index_name_for(pack)
            rewrite = not self.vault.backend.exists(index_name)
            try:
                self.vault.reindex_pack(pack, write_index_file=rewrite)
            except IntegrityError as exc:
                self.unreadable.add(pack)
                self.report.problems.append(
                    f"pack {pack} was kept: it has no readable index file and {exc.message}; "
                    "run 'vmvault vault verify' to see the points that use it"
                )
                continue
            self.reindexed.add(pack)
            self.report.packs_reindexed += 1

    def delete_temporaries(self, grace_seconds: float) -> None:
        """`.tmp-*` files of writes that died before their rename, once older than the grace
        window (a younger one may be a write in progress of another process), or at once when
        they are the write of a dead job's pack or its index file (`.tmp-<pack id>.<random>`) or
        their writer, a process of this boot, is gone (backends/local.py names it)."""
        now = time.time()
        dead_ids = {pack.rsplit("/", 1)[-1] for pack in self.dead_packs}
        for dirpath, _dirs, names in os.walk(self.vault.storage_dir):
            for name in names:
                if not name.startswith(".tmp-"):
                    continue
                path = Path(dirpath) / name
                dead = name.removeprefix(".tmp-").split(".", 1)[0] in dead_ids or dead_writer(name)
                with contextlib.suppress(FileNotFoundError):
                    if dead or now - path.stat().st_mtime >= grace_seconds:
                        path.unlink()
                        self.report.temporaries_deleted += 1


def _stored_bytes(vault: Vault) -> int:
    return sum(size for top in ("data", "tree", "index") for _name, size in vault.backend.list(top))


def collect_garbage(
    vault: Vault,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    repack_threshold: float = DEFAULT_REPACK_THRESHOLD,
    lock_timeout: float | None = None,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    dead_packs: Collection[str] = (),
) -> GcReport:
    """Mark, then sweep under the exclusive vault lock (waiting up to lock_timeout for it).

    dead_packs: packs written by jobs known to have died (their pack journals, vault/journal.py);
    they, and the `.tmp-` files of their writes, are collected (when unreferenced) without waiting
    for the grace window."""
    report = GcReport()
    cancel = cancel or threading.Event()
    with lock.only_collector(vault):
        return _collect(vault, report, grace_seconds, repack_threshold, lock_timeout, on_progress, cancel, dead_packs)


def _collect(
    vault: Vault,
    report: GcReport,
    grace_seconds: float,
    repack_threshold: float,
    lock_timeout: float | None,
    on_progress: ProgressFn | None,
    cancel: threading.Event,
    dead_packs: Collection[str] = (),
) -> GcReport:
    cache = vault.home / "cache" / vault.uuid
    cache.mkdir(parents=True, exist_ok=True)
    for leftover in cache.glob("gc-marks-*"):  # of a collection that died (we hold the GC lock)
        leftover.unlink(missing_ok=True)
    marks = MarkSet(cache / f"gc-marks-{os.getpid()}-{secrets.token_hex(4)}.db")
    gc = _Collector(vault, marks, report, on_progress, cancel)
    gc.dead_packs = frozenset(dead_packs)
    try:
        vault.sync_index()
        gc.reindex_unindexed()
        gc.mark_points()
        gc.mark_pins()
        gc.progress("waiting for the vault lock", 0, 0)
        started = time.monotonic()
        with lock.exclusive(vault, timeout=lock_timeout, cancel=cancel):
            report.lock_wait_seconds = round(time.monotonic() - started, 3)
            vault.sync_index()  # packs written and deleted since the mark began
            gc.reindex_unindexed()  # e.g. a pack whose backup died before its index file
            report.bytes_before = _stored_bytes(vault)  # measured under the lock: nobody else writes now
            gc.mark_points()  # manifests published meanwhile (a backup that was running)
            gc.mark_pins()
            report.stale_pins_removed = lock.remove_stale_pins(vault)
            report.tree_blobs_live, report.chunks_live = marks.counts()
            gc.classify(grace_seconds, repack_threshold)
            for _n, pack, index_name, dead in list(marks.plan("delete")):
                gc.check_cancel()
                gc.delete_pack(pack, index_name)
                report.packs_deleted += 1
                report.orphan_packs_deleted += pack in gc.reindexed
                report.blobs_deleted += dead
            for pack, index_name in gc.repack():
                gc.delete_pack(pack, index_name)
                report.packs_repacked += 1
            gc.delete_temporaries(grace_seconds)
            report.packs_unreadable_kept = len(gc.unreadable)
            report.bytes_after = _stored_bytes(vault)
    finally:
        marks.close()
    return report
