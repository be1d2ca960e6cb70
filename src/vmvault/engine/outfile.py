"""The file a restore writes: direct I/O where the file system takes it, the page cache elsewhere.

A restored disk is written once, in large aligned pieces, and not read back by the restore: the
page cache only costs here. Each buffered byte is copied into a newly allocated page, written
back later and then fsynced, and concurrent writers of one file contend for its inode lock. On
this project's 2-core machine a buffered write of 1 GiB plus fdatasync takes 2.4 s of system CPU,
a direct one 0.6 s (docs/performance.md, session 8). So a piece whose offset and length are
multiples of ALIGN is copied into an aligned buffer of its thread and written with O_DIRECT; any
other piece (a disk's short last chunk) goes through a second, buffered descriptor of the same
file. A file system that refuses O_DIRECT (tmpfs on older kernels, some FUSE file systems) gets
buffered writes only. One fsync of either descriptor makes both kinds durable (it is per inode).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

ALIGN = 4096  # every common logical block size (512 or 4096) divides it
MAX_DIRECT = 4 << 20  # the largest single direct write (and each writing thread's buffer)
BUFFER_STEP = 1 << 20  # a thread's buffer grows in these steps, up to MAX_DIRECT (or one larger piece)


class RestoredFile:
    """A new sparse file of `size` bytes at `path` (created here, refused if it exists)."""

    def __init__(self, path: Path, size: int, *, direct: bool = True) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._direct_fd: int | None = None
        self._local = threading.local()
        self.direct_writes = 0  # how many writes went direct (for the tests and the curious)
        try:
            os.ftruncate(self.fd, size)  # sparse: pieces of zeros are never written
            if direct:
                self._direct_fd = _open_direct(path)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of data at offset (a short write is continued; a full disk raises)."""
        self.write_many([(offset, data)])

    def write_many(self, pieces: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Write each (offset, data); pieces that follow each other on the disk are one direct
        write (a direct write waits for the device, so fewer and larger ones)."""
        run: list[tuple[int, bytes | memoryview]] = []
        for offset, data in sorted(pieces, key=lambda piece: piece[0]):
            if self._direct_fd is None or offset % ALIGN or len(data) % ALIGN or not data:
                _write_all(self.fd, data, offset)
                continue
            if run and (run[-1][0] + len(run[-1][1]) != offset or _size(run) + len(data) > MAX_DIRECT):
                self._write_direct(run)
                run = []
            run.append((offset, data))
        if run:
            self._write_direct(run)

    def _write_direct(self, run: list[tuple[int, bytes | memoryview]]) -> None:
        size = _size(run)
        buffer = self._aligned(size)
        at = 0
        for _offset, data in run:
            buffer[at : at + len(data)] = data
            at += len(data)
        direct_fd = self._direct_fd
        if direct_fd is not None:
            try:
                _write_all(direct_fd, memoryview(buffer)[:size], run[0][0])
                self.direct_writes += 1  # under the GIL; a count, never a decision
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_fd = None  # refused after all (a stacked file system): buffered from now on
                os.close(direct_fd)
        _write_all(self.fd, memoryview(buffer)[:size], run[0][0])

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        os.close(self.fd)

    def _aligned(self, size: int) -> mmap.mmap:
        """This thread's page-aligned buffer, reused: no fresh pages to fault in per piece."""
        buffer: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = mmap.mmap(-1, -(-size // BUFFER_STEP) * BUFFER_STEP)
            self._local.buffer = buffer
        return buffer


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


def _size(run: list[tuple[int, bytes | memoryview]]) -> int:
    return sum(len(data) for _offset, data in run)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
