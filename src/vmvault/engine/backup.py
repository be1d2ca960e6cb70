"""Backup of a VM's disks into a vault (docs/format.md for what is written, in which order).

Per disk: the allocation map decides what to read (holes are never read); reads of up to 4 MiB
go to worker threads that split them into chunks, hash them (keyed BLAKE3), skip chunks equal to
the previous point's or already in the vault, and compress + encrypt the rest into packs. The
main thread assembles leaves in disk order; at most a few reads are in flight, so memory stays
flat whatever the disk size. The manifest is published last.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.engine.chunking import Geometry, data_chunk_runs, reads_per_leaf
from vmvault.engine.nbd import STATE_HOLE, STATE_ZERO
from vmvault.engine.progress import ProgressCallback, ProgressTracker
from vmvault.engine.rawfile import DiskReader, open_reader
from vmvault.errors import Cancelled
from vmvault.testhooks import crash_point
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import Leaf, LeafReader, Root, encode_leaf
from vmvault.vault.journal import PackJournal
from vmvault.vault.lock import holding_shared
from vmvault.vault.manifest import DiskEntry, RecoveryPointManifest
from vmvault.vault.packs import TYPE_DATA, TYPE_TREE, encode_body
from vmvault.vault.store import PackWriter, Vault

WORKERS = max(2, min(4, os.cpu_count() or 2))
IN_FLIGHT = 2 * WORKERS


@dataclass(frozen=True)
class ExportedDisk:
    """A disk already exported over NBD at one point in time (by a snapshot session or qemu-nbd).

    `changed_extents` lists the (offset, length) ranges that may differ from the previous point's
    disk of the same name (a dirty bitmap); None means unknown: read everything allocated and
    compare hashes.
    """

    name: str
    uri: str
    size: int
    format: str
    source_path: str
    changed_extents: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class PointSpec:
    """What a new recovery point records besides its disks (the manifest's other fields)."""

    vm_name: str
    vm_id: str
    rp_id: str
    time: str
    retain_until: str
    consistency: str
    vm_definition: dict[str, Any]
    job_id: str


@dataclass
class DiskStats:
    name: str
    mode: str = "hash-compare"  # or "changed-blocks"
    bytes_read: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Disk:
    source: ExportedDisk
    geo: Geometry
    plan: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    previous: Root | None = None
    tracked: bool = False  # chunks outside the plan are unchanged since `previous`
    stats: DiskStats = field(default_factory=lambda: DiskStats(""))


class _Readers:
    """A pool of NBD connections to one export, one per worker at a time."""

    def __init__(self, uri: str, size: int) -> None:
        self._uri = uri
        self._size = size
        self._free: queue.SimpleQueue[DiskReader] = queue.SimpleQueue()
        self._all: list[DiskReader] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reader(self) -> Iterator[DiskReader]:
        try:
            r = self._free.get_nowait()
        except queue.Empty:
            r = open_reader(self._uri, self._size)
            with self._lock:
                self._all.append(r)
        try:
            yield r
        finally:
            self._free.put(r)

    def close(self) -> None:
        for r in self._all:
            r.close()


class BackupRun:
    def __init__(self, vault: Vault, progress: ProgressTracker, cancel: threading.Event, job_id: str = "") -> None:
        self.vault = vault
        self.progress = progress
        self.cancel = cancel
        # The job's pack journal (vault/journal.py): if this job dies, GC knows which packs were its.
        self.journal = PackJournal(vault, job_id) if job_id else None
        self.data = PackWriter(vault, TYPE_DATA, self.journal)
        self.tree = PackWriter(vault, TYPE_TREE, self.journal)
        self._zero = bytes(vault.chunk_size)
        self.leaves = LeafReader(vault.get_blob)
        # Chunks verify found bad with no good copy: stored again even where the previous point
        # has them (self-healing), instead of trusting the bad copy through the previous leaf.
        self.bad = vault.index.unhealed_bad_ids()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("the backup was cancelled; no recovery point was created")

    # ---- one read of up to READ_SIZE, in a worker thread ------------------------------------------
    def process_read(
        self, readers: _Readers, disk: _Disk, first: int, count: int, previous: list[bytes] | None
    ) -> tuple[int, list[bytes], int]:
        self.check_cancel()
        geo = disk.geo
        start = first * geo.chunk_size
        length = min(count * geo.chunk_size, geo.disk_size - start)
        with readers.reader() as r:
            buf = r.pread(length, start)
        ids: list[bytes] = []
        nonzero = 0
        candidates: dict[bytes, bytes] = {}  # chunks that differ from the previous point
        for k in range(count):
            piece = bytes(buf[k * geo.chunk_size : (k + 1) * geo.chunk_size])
            if piece == (self._zero if len(piece) == geo.chunk_size else bytes(len(piece))):
                ids.append(ZERO_ID)
                continue
            nonzero += len(piece)
            cid = self.vault.keys.chunk_id(piece)
            ids.append(cid)
            if previous is None or previous[(first + k) % geo.leaf_span] != cid or cid in self.bad:
                candidates[cid] = piece
        written = self.store_new(candidates)
        self.progress.add(read=length, written=written)
        return first, ids, nonzero

    def store_new(self, candidates: dict[bytes, bytes]) -> int:
        """Store the chunks the vault does not hold yet (one index query per read)."""
        present = self.vault.index.contains_many(list(candidates)) if candidates else set()
        written = 0
        for cid, piece in candidates.items():
            if cid in present:
                _test_pause_after_dedup(cid)  # test-only hook, a no-op unless its variable is set
                continue
            if self.data.pending(cid):
                continue
            body, flags = encode_body(piece)
            written += len(body) if self.data.add(cid, body, flags, len(piece)) else 0
        return written

    def store_tree(self, plain: bytes) -> bytes:
        tid = self.vault.keys.chunk_id(plain)
        if not self.tree.pending(tid) and not self.vault.index.contains(tid):
            self.tree.add(tid, plain, 0, len(plain))
        return tid

    # ---- one disk ---------------------------------------------------------------------------
    def backup_disk(self, pool: ThreadPoolExecutor, disk: _Disk) -> tuple[str, int]:
        geo = disk.geo
        readers = _Readers(disk.source.uri, disk.source.size)
        leaf_ids: list[bytes] = []
        stored = 0
        window: deque[tuple[int, list[Future[tuple[int, list[bytes], int]]]]] = deque()
        in_flight = 0
        try:
            for leaf in range(geo.leaf_count):
                self.check_cancel()
                prev_leaf, _ = self._previous_leaf(disk, leaf)
                prev_ids = (
                    prev_leaf.ids
                    if prev_leaf is not None and len(prev_leaf.ids) == len(geo.leaf_chunks(leaf))
                    else None
                )
                futures = [
                    pool.submit(self.process_read, readers, disk, f, n, prev_ids) for f, n in disk.plan.get(leaf, [])
                ]
                window.append((leaf, futures))
                in_flight += len(futures)
                while window and (in_flight > IN_FLIGHT or len(window) > 8):
                    in_flight -= len(window[0][1])
                    stored += self._finish_leaf(disk, window.popleft(), leaf_ids)
            while window:
                stored += self._finish_leaf(disk, window.popleft(), leaf_ids)
        finally:
            for _leaf, futures in window:
                for fut in futures:
                    fut.cancel()
            readers.close()
        root = Root(geo.disk_size, geo.chunk_size, geo.leaf_span, leaf_ids)
        return self.store_tree(root.encode()).hex(), stored

    def _previous_leaf(self, disk: _Disk, leaf: int) -> tuple[Leaf | None, bytes | None]:
        prev = disk.previous
        if prev is None or leaf >= len(prev.leaves):
            return None, None
        return self.leaves.read(prev.leaves[leaf]), prev.leaves[leaf]

    def _finish_leaf(
        self, disk: _Disk, item: tuple[int, list[Future[tuple[int, list[bytes], int]]]], leaf_ids: list[bytes]
    ) -> int:
        leaf, futures = item
        chunks = disk.geo.leaf_chunks(leaf)
        prev_leaf, prev_id = self._previous_leaf(disk, leaf)
        if disk.tracked and prev_leaf is not None and len(prev_leaf.ids) == len(chunks):
            ids = list(prev_leaf.ids)  # unchanged since the previous point unless read below
        else:
            ids = [ZERO_ID] * len(chunks)  # not allocated: a hole
        for fut in futures:
            first, got, _nonzero = fut.result()
            ids[first - chunks.start : first - chunks.start + len(got)] = got
        stored = self._nonzero_bytes(disk, chunks, ids)
        leaf_ids.append(self.store_tree(encode_leaf(ids, prev_leaf, prev_id)))
        self.progress.report()
        return stored

    @staticmethod
    def _nonzero_bytes(disk: _Disk, chunks: range, ids: list[bytes]) -> int:
        """Bytes of the leaf's non-zero chunks at this point (the protected-instance size)."""
        return sum(disk.geo.chunk_range(chunks.start + i)[1] for i, cid in enumerate(ids) if cid != ZERO_ID)


def _allocation_plan(disk: _Disk) -> None:
    """Full read: every chunk holding allocated data (holes and zero extents are never read)."""
    reader = open_reader(disk.source.uri, disk.source.size)
    try:
        extents = (
            (off, min(ln, disk.geo.disk_size - off))
            for off, ln, flags in reader.extents()
            if not flags & (STATE_HOLE | STATE_ZERO) and off < disk.geo.disk_size
        )
        disk.plan = reads_per_leaf(data_chunk_runs(extents, disk.geo), disk.geo)
    finally:
        reader.close()


def _plan_disk(vault: Vault, disk: _Disk) -> int:
    """Decide what to read; returns the bytes to read. Changed blocks only when they can be trusted."""
    src, stats = disk.source, disk.stats
    if src.changed_extents is not None:
        reason = _untrusted_reason(disk)
        if reason is None:
            reason = _sample_mismatch(vault, disk)
        if reason is None:
            reason = _bad_chunks_reason(vault, disk)
        if reason is None:
            disk.tracked = True
            stats.mode = "changed-blocks"
            disk.plan = reads_per_leaf(data_chunk_runs(sorted(src.changed_extents), disk.geo), disk.geo)
        else:
            stats.warnings.append(
                f"disk {src.name}: changed-block tracking not used ({reason}); reading all data and comparing hashes"
            )
    if not disk.tracked:
        _allocation_plan(disk)
    return sum(n for reads in disk.plan.values() for _f, n in reads) * disk.geo.chunk_size


def _untrusted_reason(disk: _Disk) -> str | None:
    prev = disk.previous
    if prev is None:
        return "no previous point of this disk"
    if prev.disk_size != disk.geo.disk_size:
        return f"the disk was resized from {prev.disk_size} to {disk.geo.disk_size} bytes"
    return None


def _bad_chunks_reason(vault: Vault, disk: _Disk) -> str | None:
    """Changed blocks alone would keep chunks verify found bad (never re-read): read it all then."""
    bad = vault.index.unhealed_bad_ids()
    if not bad or disk.previous is None:
        return None
    leaves = LeafReader(vault.get_blob)
    for leaf_id in disk.previous.leaves:
        if bad.intersection(leaves.read(leaf_id).ids):
            return "the previous point uses chunks that verify found damaged; they are stored again"
    return None


SAMPLE_CHUNKS = 100  # misses a change to 5 % of the chunks with p = 0.95**100 < 0.6 %


def _sample_mismatch(vault: Vault, disk: _Disk) -> str | None:
    """Re-read a few chunks the tracking calls clean; any difference means it cannot be trusted."""
    import random

    assert disk.previous is not None
    geo = disk.geo
    dirty = data_chunk_runs(sorted(disk.source.changed_extents or []), geo)
    dirty_set: set[int] = set()
    for first, end in dirty:
        if len(dirty_set) > 1_000_000:
            break
        dirty_set.update(range(first, end))
    rng = random.Random()
    leaves = LeafReader(vault.get_blob)
    reader = open_reader(disk.source.uri, disk.source.size)
    try:
        for _ in range(SAMPLE_CHUNKS):
            chunk = rng.randrange(geo.chunk_count)
            if chunk in dirty_set:
                continue
            leaf = leaves.read(disk.previous.leaves[chunk // geo.leaf_span])
            start, length = geo.chunk_range(chunk)
            data = bytes(reader.pread(length, start))
            cid = ZERO_ID if data == bytes(length) else vault.keys.chunk_id(data)
            if cid != leaf.ids[chunk % geo.leaf_span]:
                return f"chunk at offset {start} changed although the dirty bitmap calls it clean"
    finally:
        reader.close()
    return None


# The vault lock, shared, for the whole backup (vault/lock.py): garbage collection sweeps only
# under the exclusive lock, so nothing this backup deduplicates against can be deleted before its
# manifest is published; the chunk index is re-read once the lock is held.
@holding_shared
def backup_exported(
    vault: Vault,
    spec: PointSpec,
    disks: list[ExportedDisk],
    previous: RecoveryPointManifest | None,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> tuple[RecoveryPointManifest, list[DiskStats]]:
    """Back up disks exported at one point in time; publishes the manifest last."""
    tracker = ProgressTracker(on_progress)
    run = BackupRun(vault, tracker, cancel or threading.Event(), spec.job_id)
    opened = [_prepare(vault, d, previous) for d in disks]
    tracker.state.total_bytes = sum(_plan_disk(vault, d) for d in opened)
    tracker.report(force=True)
    entries = []
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="vmv-backup") as pool:
            for disk in opened:
                tracker.state.current_disk = disk.source.name
                before = tracker.state.bytes_read
                root_hex, stored = run.backup_disk(pool, disk)
                disk.stats.bytes_read = tracker.state.bytes_read - before
                src = disk.source
                entries.append(DiskEntry(src.name, disk.geo.disk_size, src.format, root_hex, stored, src.source_path))
        run.data.flush()  # every pack and index file is durable before the manifest names them
        run.tree.flush()
    finally:
        run.data.close()
        run.tree.close()
    manifest = RecoveryPointManifest(
        rp_id=spec.rp_id,
        vm_name=spec.vm_name,
        vm_id=spec.vm_id,
        time=spec.time,
        consistency=spec.consistency,
        retain_until=spec.retain_until,
        disks=tuple(entries),
        vm_definition=spec.vm_definition,
        job_id=spec.job_id,
    )
    run.check_cancel()
    vault.publish_manifest(manifest)  # last: until here no recovery point exists
    crash_point("backup:manifest-published")
    if run.journal is not None:
        run.journal.discard()  # the manifest names what this job wrote and kept
    tracker.report(force=True)
    return manifest, [d.stats for d in opened]


def _previous_root(vault: Vault, previous: RecoveryPointManifest | None, name: str, geo: Geometry) -> Root | None:
    if previous is None:
        return None
    try:
        entry = previous.disk(name)
    except KeyError:
        return None
    root = Root.decode(vault.get_blob(bytes.fromhex(entry.index_root)), f"disk {name} of point {previous.rp_id}")
    # Another chunk size or leaf span cannot line up; a resized disk reuses the leaves that still do.
    return root if root.chunk_size == geo.chunk_size and root.leaf_span == geo.leaf_span else None


def _prepare(vault: Vault, src: ExportedDisk, previous: RecoveryPointManifest | None) -> _Disk:
    geo = Geometry(src.size, vault.chunk_size, vault.leaf_span)
    return _Disk(src, geo, previous=_previous_root(vault, previous, src.name, geo), stats=DiskStats(src.name))


_dedup_pause = threading.Lock()
_dedup_paused = False


def _test_pause_after_dedup(cid: bytes) -> None:
    """Test-only (tests/test_gc.py): VMVAULT_TEST_PAUSE_AFTER_DEDUP=DIR pauses the first dedup hit.

    The backup has just found chunk `cid` already in the vault and will reference it without
    storing it. It writes DIR/paused (the chunk ID in hex) and waits until DIR/resume exists
    (at most 10 minutes), so a test can delete points and collect garbage at exactly that moment.
    """
    global _dedup_paused
    where = os.environ.get("VMVAULT_TEST_PAUSE_AFTER_DEDUP")
    if not where:
        return
    with _dedup_pause:
        if _dedup_paused:
            return
        _dedup_paused = True
        import time

        (Path(where) / "paused").write_text(cid.hex())
        deadline = time.monotonic() + 600
        while not (Path(where) / "resume").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
