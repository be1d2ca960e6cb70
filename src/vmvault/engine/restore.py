"""Restore a recovery point's disks to files: parallel chunk fetch, sparse output, verified reads.

Each disk is written to a hidden temporary name in the target directory and renamed only when
every disk of the request is complete; any error removes the temporaries, so a failed restore
leaves nothing under the final names.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vmvault.engine.outfile import RestoredFile
from vmvault.engine.progress import ProgressCallback, ProgressTracker
from vmvault.engine.readplan import Read, plan_reads
from vmvault.errors import Cancelled, IntegrityError, InvalidInput
from vmvault.testhooks import crash_point
from vmvault.vault.chunkindex import Location
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import LeafReader, Root
from vmvault.vault.manifest import DiskEntry, RecoveryPointManifest
from vmvault.vault.packs import FetchedEnds
from vmvault.vault.store import Vault

FETCHERS = 6  # ranged GETs at once: a request to an object store is mostly waiting (about 10 ms here)
# Decrypt, decompress, hash and pwrite: CPU-bound, but a pwrite may wait on writeback, so more
# threads than cores (the 4 GiB local restore took 11 % longer with 3 workers than with 6).
DECODERS = min(8, max(4, os.cpu_count() or 2))
CHECKERS = 2  # pack checks (three small GETs each) beside the data reads
DECODE_PIECE = 1 << 20  # stored bytes per decode task
# Reads (engine/readplan.py: at most MAX_READ each, or a whole pack) submitted and not yet
# written: the stored bytes a restore holds are at most IN_FLIGHT_BYTES (or one read, if that is
# larger), plus each decoder's decoded piece and its direct-write buffer (engine/outfile.py, up
# to 4 MiB), and twice a read for a moment while the Azure SDK hands over a download it assembled.
IN_FLIGHT_BYTES = 48 << 20
# Leaves planned together: 64 MiB of disk with 64 KiB chunks; 1 GiB from a remote store, where a
# pack is then rarely cut between two plans and is read whole once (engine/readplan.py).
BATCH_LEAVES = 4
REMOTE_BATCH_LEAVES = 64
LEAF_PREFETCH = 64  # leaves fetched together (about 8 KiB each)
FORMATS = ("raw", "qcow2")
Converter = Callable[[Path, Path], None]  # raw image -> qcow2 image
_T = TypeVar("_T")


def run_restore(
    vault: Vault,
    manifest: RecoveryPointManifest,
    target_dir: Path,
    *,
    fmt: str | None = None,
    force: bool = False,
    disks: list[str] | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    partial_tag: str | None = None,
    convert: Converter | None = None,
) -> list[Path]:
    """Restore into target_dir; partial files are named `.<final>.vmvault-partial-<tag>*` (the tag a
    caller gives is recorded in its job, so a killed restore's partial files can be found and removed).

    The engine writes raw images; a qcow2 one is `convert`ed from it (the disk-image connector's
    qemu-img convert, connectors/registry.py images()), which every qcow2 target needs."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format {fmt!r}", hint="use --format raw or --format qcow2")
    chosen = _choose_disks(manifest, disks)
    target_dir = Path(target_dir).absolute()
    finals = [target_dir / f"{d.name}.{fmt or d.source_format}" for d in chosen]
    if convert is None and any(f.suffix == ".qcow2" for f in finals):
        raise InvalidInput("a qcow2 disk is to be restored and no converter was given", hint="pass convert=")
    existing = [str(p) for p in finals if p.exists()]
    if existing and not force:
        raise InvalidInput(
            f"the target already holds {', '.join(existing)}",
            hint="choose another --target-dir or add --force to overwrite",
        )
    target_dir.mkdir(parents=True, exist_ok=True)
    tracker = ProgressTracker(on_progress)
    tracker.state.total_bytes = sum(d.stored_bytes for d in chosen)
    cancel = cancel or threading.Event()
    temps: list[Path] = []
    try:
        for disk, final in zip(chosen, finals, strict=True):
            tracker.state.current_disk = disk.name
            temps.append(_restore_one(vault, manifest, disk, final, tracker, cancel, partial_tag, convert))
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
        _fsync_dir(target_dir)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    tracker.report(force=True)
    return finals


def _choose_disks(manifest: RecoveryPointManifest, names: list[str] | None) -> list[DiskEntry]:
    if not names:
        return list(manifest.disks)
    known = {d.name: d for d in manifest.disks}
    missing = [n for n in names if n not in known]
    if missing:
        raise InvalidInput(
            f"recovery point {manifest.rp_id} has no disk {', '.join(missing)}",
            hint=f"its disks are {', '.join(known)}",
        )
    return [known[n] for n in names]


def _restore_one(
    vault: Vault,
    manifest: RecoveryPointManifest,
    disk: DiskEntry,
    final: Path,
    tracker: ProgressTracker,
    cancel: threading.Event,
    partial_tag: str | None = None,
    convert: Converter | None = None,
) -> Path:
    tag = partial_tag or secrets.token_hex(4)
    raw_tmp = final.parent / f".{final.name}.vmvault-partial-{tag}.raw"
    try:
        # Direct writes only while nothing else uses the disks (a remote vault), and not for a raw
        # image qemu-img convert reads back at once (the page cache helps there).
        direct = vault.backend.remote and final.suffix != ".qcow2"
        _restore_raw(vault, manifest, disk, raw_tmp, tracker, cancel, direct=direct)
        crash_point("restore:partial-written")
        if final.suffix == ".qcow2":
            qcow_tmp = final.parent / f".{final.name}.vmvault-partial-{tag}"
            try:
                assert convert is not None  # checked by run_restore
                convert(raw_tmp, qcow_tmp)
            except BaseException:
                qcow_tmp.unlink(missing_ok=True)
                raise
            raw_tmp.unlink()
            return qcow_tmp
        return raw_tmp
    except BaseException:
        raw_tmp.unlink(missing_ok=True)
        raise


class _WriteBehind:
    """Flushes the restored file while it is being written, so the final fsync finds little left.

    Without it every byte sits in the page cache until the end and the closing fsync alone takes
    about a fifth of a restore; a thread calling fdatasync each FLUSH_EVERY bytes overlaps the
    disk writes with the decoding instead.
    """

    FLUSH_EVERY = 128 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = 0
        self._wake = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="vmv-restore-flush", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        with self._wake:
            self._pending += n
            if self._pending >= self.FLUSH_EVERY:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._done and self._pending < self.FLUSH_EVERY:
                    self._wake.wait()
                if self._done:
                    return
                self._pending = 0
            os.fdatasync(self._fd)

    def close(self) -> None:
        with self._wake:
            self._done = True
            self._wake.notify()
        self._thread.join()


class _DiskWriter:
    """Writes one disk's chunks: plans the reads of a batch of leaves; decodes (authenticates) and
    writes the blobs of a fetched read."""

    def __init__(
        self,
        vault: Vault,
        manifest: RecoveryPointManifest,
        disk: DiskEntry,
        out: RestoredFile,
        root: Root,
        tracker: ProgressTracker,
        flusher: _WriteBehind,
    ) -> None:
        self.vault, self.manifest, self.disk, self.out, self.root = vault, manifest, disk, out, root
        self.tracker, self.flusher = tracker, flusher

    def plan(self, batch: list[tuple[int, list[bytes]]]) -> tuple[list[Read], dict[bytes, list[int]]]:
        """The reads of a batch of leaves (first chunk, chunk ids), and where each chunk goes."""
        positions: dict[bytes, list[int]] = {}
        for first_chunk, ids in batch:
            for i, cid in enumerate(ids):
                if cid != ZERO_ID:
                    positions.setdefault(cid, []).append(first_chunk + i)
        locations = self.vault.index.lookup_many(list(positions))
        pack_ends = None  # whole-pack reads save requests to a store; from a local disk, bytes
        if self.vault.backend.remote:
            pack_ends = self.vault.index.pack_ends(list({loc.pack for loc in locations.values()}))
        for cid, chunks in positions.items():
            if cid not in locations:
                raise IntegrityError(
                    f"chunk {cid.hex()} is missing from the vault (disk {self.disk.name}, offset "
                    f"{chunks[0] * self.root.chunk_size}, recovery point {self.manifest.rp_id})",
                    hint="run 'vmvault vault verify' to list every affected point",
                )
        return plan_reads(locations.values(), pack_ends=pack_ends), positions

    def write_blobs(self, piece: _Piece, stop: Callable[[], None]) -> None:
        """Decode each blob of a piece of a fetched read and write it wherever the disk has it.

        Each blob is a slice of the read without copying, handed to AES-GCM, which authenticates
        it before anything is written (a short read from a damaged store gives a short slice,
        refused the same way); then its ID is re-hashed from the plaintext."""
        read, view, positions = piece.read, piece.view, piece.positions
        written = 0
        writes: list[tuple[int, bytes | memoryview]] = []
        for loc in piece.blobs:
            stop()
            stored = view[loc.ref.offset - read.offset : loc.ref.offset - read.offset + loc.ref.length]
            plain = self._decode(loc, stored)
            for chunk in positions[loc.ref.blob_id]:
                writes.append((chunk * self.root.chunk_size, plain))
                written += len(plain)
            if not self.out.direct:  # buffered: one chunk at a time, nothing held for a longer write
                self.out.write_many(writes)
                writes.clear()
        stop()
        self.out.write_many(writes)  # direct: neighbouring chunks in one write
        self.flusher.wrote(written)
        self.tracker.add(read=written, written=written)
        self.tracker.report()

    def _decode(self, loc: Location, stored: memoryview) -> bytes:
        try:
            return self.vault.decode_fetched(loc, stored)  # the pack's check: _Pipeline.finish
        except IntegrityError as exc:
            # Marked: the next backup stores this data again rather than trusting this copy.
            self.vault.index.add_bad_copy(loc.ref.blob_id, loc.pack, exc.message)
            raise IntegrityError(
                f"{exc.message} (disk {self.disk.name}, recovery point {self.manifest.rp_id})",
                hint="run 'vmvault vault verify' to list every affected point",
            ) from exc


@dataclass
class _Piece:
    """Some neighbouring blobs of a fetched read: one decode task."""

    read: Read
    view: memoryview
    positions: dict[bytes, list[int]]
    blobs: list[Location]


def _pieces(read: Read, view: memoryview, positions: dict[bytes, list[int]]) -> list[_Piece]:
    """The read's blobs cut into runs of about DECODE_PIECE stored bytes, so the reads that arrive
    last are decoded by every decoder rather than one each."""
    pieces: list[_Piece] = []
    run: list[Location] = []
    size = 0
    for loc in read.blobs:
        run.append(loc)
        size += loc.ref.length
        if size >= DECODE_PIECE:
            pieces.append(_Piece(read, view, positions, run))
            run, size = [], 0
    if run:
        pieces.append(_Piece(read, view, positions, run))
    return pieces


class _Pipeline:
    """Fetches and decodes as two stages, so the wall time approaches the longer of the two rather
    than their sum: FETCHERS threads make the ranged GETs (waiting on the store), DECODERS threads
    decrypt, decompress, re-hash and pwrite (CPU, most of it in C libraries), and CHECKERS
    threads check each pack (header, table of contents, index file) beside the data reads.

    Memory: the reads submitted and not yet written are at most IN_FLIGHT_BYTES of stored bytes
    (a whole-pack read counts its blob bytes), retired in submission order; plus one decoded
    piece per decoder. A blob is written only once AES-GCM and its ID authenticated it. A pack's
    check is not waited for before its blobs are decoded (it is a small request queued behind
    the large ones, and the blobs authenticate themselves): the restore succeeds only once every
    check passed, else the partial file goes. A pack read whole is checked from its header and
    trailer as that read found them, queued by its fetcher beside its decodes.

    The first failure stops every stage and is the one raised, even when an earlier read, retired
    first, was stopped because of it; a cancel raises Cancelled.
    """

    def __init__(self, writer: _DiskWriter, cancel: threading.Event) -> None:
        self.writer, self.cancel = writer, cancel
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._failed = threading.Event()
        self._checks: dict[str, Future[None]] = {}  # submitted with a pack's first ranged read
        self._whole_checks: list[Future[None]] = []  # submitted by the fetchers of whole-pack reads
        self._whole_checks_lock = threading.Lock()
        self._window: deque[tuple[Future[list[Future[None]]], int]] = deque()
        self._in_flight = 0
        self._check_pool = ThreadPoolExecutor(CHECKERS, thread_name_prefix="vmv-restore-check")
        self._fetch_pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="vmv-restore-fetch")
        self._decode_pool = ThreadPoolExecutor(DECODERS, thread_name_prefix="vmv-restore-decode")

    def submit(self, read: Read, positions: dict[bytes, list[int]]) -> None:
        if self._failure is not None:  # no more work once a task failed
            raise self._failure
        while self._window and self._in_flight + read.length > IN_FLIGHT_BYTES:
            self._retire_oldest()
        if not read.whole and read.pack not in self._checks:  # a whole read's fetcher submits its own
            self._checks[read.pack] = self._check_pool.submit(
                self._guarded, self.writer.vault.authenticate_pack, read.pack
            )
        fetched = self._fetch_pool.submit(self._guarded, self._fetch, read, positions)
        self._window.append((fetched, read.length))
        self._in_flight += read.length

    def finish(self) -> None:
        """Every read written and every pack checked (or the first failure raised)."""
        while self._window:
            self._retire_oldest()
        with self._whole_checks_lock:  # every fetch is done: no more are added
            checks = [*self._checks.values(), *self._whole_checks]
        for check in checks:
            self._result(check)

    def close(self, failed: bool) -> None:
        """Stop (when failed) and wait for every thread; queued work is dropped."""
        if failed:
            self._failed.set()
        for pool in (self._fetch_pool, self._check_pool, self._decode_pool):  # fetches submit decodes
            pool.shutdown(wait=True, cancel_futures=True)

    def stop(self) -> None:
        """Raise Cancelled in a task once the restore is cancelled or another task failed."""
        if self._failed.is_set() or self.cancel.is_set():
            raise Cancelled("the restore was cancelled")

    def _guarded(self, work: Callable[..., _T], *args: Any) -> _T:
        try:
            return work(*args)
        except BaseException as exc:
            if not isinstance(exc, Cancelled):
                with self._failure_lock:  # two tasks may fail at once: the first one is reported
                    if self._failure is None:
                        self._failure = exc
                self._failed.set()
            raise

    def _fetch(self, read: Read, positions: dict[bytes, list[int]]) -> list[Future[None]]:
        self.stop()
        vault = self.writer.vault
        if read.whole:
            view = memoryview(vault.backend.get(read.pack))
        else:
            view = memoryview(vault.backend.get(read.pack, read.offset, read.length))
        self.stop()
        decodes = [
            self._decode_pool.submit(self._guarded, self.writer.write_blobs, piece, self.stop)
            for piece in _pieces(read, view, positions)
        ]
        if read.whole:  # checked beside the decoders, from this read's header and trailer
            ends = FetchedEnds.of(view)
            check = self._check_pool.submit(self._guarded, vault.authenticate_pack, read.pack, ends)
            with self._whole_checks_lock:
                self._whole_checks.append(check)
        return decodes

    def _retire_oldest(self) -> None:
        fetched, size = self._window.popleft()
        for decoded in self._result(fetched):
            self._result(decoded)
        self._in_flight -= size

    def _result(self, future: Future[_T]) -> _T:
        try:
            return future.result()
        except BaseException:
            if self._failure is not None:  # stopped because another task failed: report that one
                raise self._failure from None
            raise


class _Leaves:
    """The disk index's leaves, fetched LEAF_PREFETCH at a time with planned reads (a point's
    leaves sit side by side in its tree pack, so that is one GET instead of one each); each leaf
    is authenticated on decode like any blob. Delta bases come one by one, as before."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._fetched: dict[bytes, bytes] = {}
        self.reader = LeafReader(self._fetch)

    def _fetch(self, leaf_id: bytes) -> bytes:
        data = self._fetched.pop(leaf_id, None)
        return data if data is not None else self._vault.get_blob(leaf_id)

    def prefetch(self, leaf_ids: list[bytes]) -> None:
        self._fetched.clear()
        locations = self._vault.index.lookup_many(list(set(leaf_ids)))
        for read in plan_reads(locations.values()):
            self._vault.authenticate_pack(read.pack)
            view = memoryview(self._vault.backend.get(read.pack, read.offset, read.length))
            for loc in read.blobs:
                start = loc.ref.offset - read.offset
                self._fetched[loc.ref.blob_id] = self._vault.read_blob_from(loc, view[start : start + loc.ref.length])


def _batches(root: Root, leaves: _Leaves, size: int) -> Iterator[list[tuple[int, list[bytes]]]]:
    """The leaves in disk order, `size` at a time, as (first chunk, chunk ids)."""
    batch: list[tuple[int, list[bytes]]] = []
    for n, leaf_id in enumerate(root.leaves):
        if n % LEAF_PREFETCH == 0:
            leaves.prefetch(root.leaves[n : n + LEAF_PREFETCH])
        batch.append((n * root.leaf_span, leaves.reader.read(leaf_id).ids))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _restore_raw(
    vault: Vault,
    manifest: RecoveryPointManifest,
    disk: DiskEntry,
    path: Path,
    tracker: ProgressTracker,
    cancel: threading.Event,
    *,
    direct: bool = True,
) -> None:
    root = Root.decode(vault.get_blob(bytes.fromhex(disk.index_root)), f"disk {disk.name} of point {manifest.rp_id}")
    if root.disk_size != disk.size:
        raise IntegrityError(f"disk index of {disk.name} in point {manifest.rp_id} does not match the manifest size")
    leaves = _Leaves(vault)
    out = RestoredFile(path, root.disk_size, direct=direct)  # sparse: zero chunks are never written
    try:
        flusher = _WriteBehind(out.fd)
        try:
            _write_leaves(_DiskWriter(vault, manifest, disk, out, root, tracker, flusher), leaves, cancel)
        finally:
            flusher.close()
        out.sync()
    finally:
        out.close()


def _write_leaves(writer: _DiskWriter, leaves: _Leaves, cancel: threading.Event) -> None:
    """Plan each batch on this thread and feed its reads, in disk order, to the pipeline."""
    pipeline = _Pipeline(writer, cancel)
    failed = True
    try:
        size = REMOTE_BATCH_LEAVES if writer.vault.backend.remote else BATCH_LEAVES
        for batch in _batches(writer.root, leaves, size):
            if cancel.is_set():  # also between batches that need no read (sparse parts)
                raise Cancelled("the restore was cancelled")
            reads, positions = writer.plan(batch)
            for read in reads:
                pipeline.submit(read, positions)
        pipeline.finish()
        failed = False
    finally:
        pipeline.close(failed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
