"""The file a restore writes: direct I/O where the file system takes it, the page cache elsewhere.

A restored disk is written once, in large aligned pieces, and not read back by the restore: the
page cache only costs here. Each buffered byte is copied into a newly allocated page, written
back later and then fsynced, and concurrent writers of one file contend for its inode lock. On
this project's 2-core machine a buffered write of 1 GiB plus fdatasync takes 2.4 s of system CPU,
a direct one 0.6 s; a 4 GiB restore from moto spent 9-10 s of system CPU with buffered writes
against 1.8 s with direct ones (docs/performance.md, session 8).

So pieces whose offset and length are multiples of ALIGN are copied, neighbours together, into
page-aligned buffers and written with O_DIRECT by WRITERS threads of their own: a direct write
waits for the device, and the decoders should not (with a vault on the same disk, its reads
queue there too). BUFFERS bounds the bytes waiting to be written; a decoder that finds none free
waits, so a slow disk slows the restore rather than growing its memory. Any other piece (a
disk's short last chunk) goes through a second, buffered descriptor of the same file. A file
system that refuses O_DIRECT (at open, or at the first write: a stacked file system) gets
buffered writes only. The first failed write is raised by the next call and by `sync`; one fsync
of either descriptor makes both kinds durable (it is per inode).
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

ALIGN = 4096  # every common logical block size (512 or 4096) divides it
MAX_DIRECT = 4 << 20  # the largest single direct write, and the size of each buffer
WRITERS = 2  # direct writes in flight: enough to keep a device queue busy beside the reads
BUFFERS = 6  # 24 MiB: every writer busy, and the decoders filling the next ones

Piece = tuple[int, bytes | memoryview]  # (offset in the file, bytes)


class RestoredFile:
    """A new sparse file of `size` bytes at `path` (created here, refused if it exists)."""

    def __init__(self, path: Path, size: int, *, direct: bool = True) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._direct_fd: int | None = None
        self._use_direct = False  # cleared for good when a direct write is refused
        self.direct_writes = 0  # how many writes went direct (for the tests and the curious)
        self._failure: BaseException | None = None
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        self._work: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
        self._writers: list[threading.Thread] = []
        try:
            os.ftruncate(self.fd, size)  # sparse: pieces of zeros are never written
            if direct:
                self._direct_fd = _open_direct(path)
                self._use_direct = self._direct_fd is not None
        except BaseException:
            os.close(self.fd)
            raise
        if self._direct_fd is not None:
            for _ in range(BUFFERS):
                self._free.put(mmap.mmap(-1, MAX_DIRECT))
            for n in range(WRITERS):
                writer = threading.Thread(target=self._write_queued, name=f"vmv-restore-write-{n}", daemon=True)
                writer.start()
                self._writers.append(writer)

    @property
    def direct(self) -> bool:
        return self._use_direct

    def write_many(self, pieces: Sequence[Piece]) -> None:
        """Write all of each (offset, data) (a short write is continued; a full disk raises);
        pieces that follow each other on the disk are one direct write. Returns once the bytes
        are queued (direct) or written (buffered)."""
        self._raise_failure()
        run: list[Piece] = []
        for offset, data in sorted(_split(pieces), key=lambda piece: piece[0]):
            if not self._writers or offset % ALIGN or len(data) % ALIGN or not data:
                _write_all(self.fd, data, offset)
                continue
            if run and (run[-1][0] + len(run[-1][1]) != offset or _size(run) + len(data) > MAX_DIRECT):
                self._queue(run)
                run = []
            run.append((offset, data))
        if run:
            self._queue(run)

    def sync(self) -> None:
        """Every queued write done (the first failure raised), then the file made durable."""
        self._work.join()
        self._raise_failure()
        os.fsync(self.fd)

    def close(self) -> None:
        """Stop the writers (what is queued is still written or fails) and close the file."""
        for _ in self._writers:
            self._work.put(None)
        for writer in self._writers:
            writer.join()
        self._writers = []
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        os.close(self.fd)

    def _queue(self, run: list[Piece]) -> None:
        buffer = self._free.get()  # waits while every buffer is being written: the back-pressure
        at = 0
        for _offset, data in run:
            buffer[at : at + len(data)] = data
            at += len(data)
        self._work.put((buffer, at, run[0][0]))

    def _write_queued(self) -> None:
        while (item := self._work.get()) is not None:
            buffer, size, offset = item
            try:
                if self._failure is None:
                    self._write_direct(memoryview(buffer)[:size], offset)
            except BaseException as exc:  # raised to the decoders by their next call, and by sync
                self._failure = self._failure or exc
            finally:
                self._free.put(buffer)
                self._work.task_done()
        self._work.task_done()

    def _write_direct(self, data: memoryview, offset: int) -> None:
        if self._use_direct and self._direct_fd is not None:
            try:
                _write_all(self._direct_fd, data, offset)
                self.direct_writes += 1  # a count for the tests, never a decision
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._use_direct = False  # refused after all (a stacked file system): buffered from now on
        _write_all(self.fd, data, offset)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _split(pieces: Sequence[Piece]) -> list[Piece]:
    """Pieces longer than one direct write cut into MAX_DIRECT parts (it is a multiple of ALIGN,
    so aligned pieces stay aligned)."""
    out: list[Piece] = []
    for offset, data in pieces:
        view = memoryview(data)
        if len(view) <= MAX_DIRECT:
            out.append((offset, data))
            continue
        out.extend((offset + at, view[at : at + MAX_DIRECT]) for at in range(0, len(view), MAX_DIRECT))
    return out


def _open_direct(path: Path) -> int | None:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _size(run: list[Piece]) -> int:
    return sum(len(data) for _offset, data in run)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
