"""QEMU-compatible image locks for offline reads.

QEMU (file-posix) expresses each block permission as an OFD lock on one byte of the image file:
byte 100+bit means "I use this permission", byte 200+bit means "I do not share it". For raw
images a read-only `qemu-nbd` shares WRITE, so on its own it neither notices a running VM nor
stops one from starting. vmvault therefore checks that nobody holds WRITE and holds "does not
share WRITE" itself for the whole read: a VM started mid-backup fails to get its write lock
instead of producing a torn recovery point.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from types import TracebackType

from vmvault.errors import VmRunning

_PERM_WRITE_BIT = 1  # BLK_PERM_WRITE = 0x02
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_FLOCK = "hhxxxxqqixxxx"  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid


def _flock(kind: int, byte: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)


def _held_by_other(fd: int, byte: int) -> bool:
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    lock_type: int = struct.unpack(_FLOCK, reply)[0]
    return lock_type != fcntl.F_UNLCK


class ImageLock:
    """Refuses an image a running QEMU writes to, and keeps writers out while held."""

    def __init__(self, path: Path, *, nofollow: bool = False) -> None:
        """nofollow: the path must be the image itself, not a symlink (registered disks, engine/backup.py)."""
        self.path = Path(path)
        self._flags = os.O_RDONLY | (os.O_NOFOLLOW if nofollow else 0)
        self._fd: int | None = None

    @property
    def fd_path(self) -> Path:
        """/proc/self/fd/N: the very file this lock holds, even if its path is swapped afterwards."""
        assert self._fd is not None, "only while the lock is held"
        return Path(f"/proc/self/fd/{self._fd}")

    def __enter__(self) -> ImageLock:
        fd = os.open(self.path, self._flags)
        try:
            if _held_by_other(fd, _LOCK_PERM_BASE + _PERM_WRITE_BIT):
                raise VmRunning(
                    f"VM is running: add it with --libvirt or --qmp (disk {self.path} is open for writing by QEMU)",
                    hint="stop the VM first, or add it as a running VM with --libvirt or --qmp",
                )
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, _LOCK_SHARED_BASE + _PERM_WRITE_BIT))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops its OFD locks
            self._fd = None
