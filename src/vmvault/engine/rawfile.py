"""Reading raw images directly: the fastest path for stopped VMs with raw disks.

The caller holds QEMU's image lock (connectors/diskimage/imagelock.py) for the whole read, as qemu-nbd
would. Holes come from SEEK_DATA/SEEK_HOLE, so never-written areas are not read. Reads go into a
per-thread buffer that is reused: fresh multi-MiB buffers per read cost page faults on every call.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from vmvault.engine.nbd import STATE_HOLE, STATE_ZERO

URI_SCHEME = "file://"


def file_uri(path: Path) -> str:
    return URI_SCHEME + str(Path(path).absolute())


class RawFileReader:
    """The same interface as NbdReader, for a raw image file (size = QEMU's virtual size)."""

    _local = threading.local()

    def __init__(self, uri: str, size: int) -> None:
        self.path = uri.removeprefix(URI_SCHEME)
        self.size = size
        self._fd = os.open(self.path, os.O_RDONLY)
        self._file_size = os.fstat(self._fd).st_size

    def pread(self, length: int, offset: int) -> memoryview:
        """`length` bytes at `offset`; past the file's end (QEMU rounds raw sizes up to 512 B) reads zeros.

        The view is valid until this thread's next read.
        """
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = self._local.buf = bytearray(max(length, 4 << 20))
        view = memoryview(buf)[:length]
        got = os.preadv(self._fd, [view], offset) if offset < self._file_size else 0
        if got < length:
            view[got:] = bytes(length - got)
        return view

    def extents(self) -> Iterator[tuple[int, int, int]]:
        """(offset, length, flags) over the whole disk: data extents have flags 0."""
        offset = 0
        while offset < self.size:
            data = self._seek(offset, os.SEEK_DATA)
            if data > offset:
                yield offset, data - offset, STATE_HOLE | STATE_ZERO
            if data >= self.size:
                return
            hole = min(self._seek(data, os.SEEK_HOLE), self.size)
            yield data, hole - data, 0
            offset = hole

    def _seek(self, offset: int, whence: int) -> int:
        if offset >= self._file_size:
            return self.size
        try:
            return os.lseek(self._fd, offset, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                return self.size
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DiskReader(Protocol):
    """What the engine reads disks through: an NBD export or a raw file."""

    size: int

    def pread(self, length: int, offset: int) -> bytes | memoryview: ...

    def extents(self) -> Iterator[tuple[int, int, int]]: ...

    def close(self) -> None: ...


def open_reader(uri: str, size: int) -> DiskReader:
    """A reader for a `file://` raw image or an `nbd+unix://` export."""
    from vmvault.engine.nbd import NbdReader

    if uri.startswith(URI_SCHEME):
        return RawFileReader(uri, size)
    return NbdReader(uri)
