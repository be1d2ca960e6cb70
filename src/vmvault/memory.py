"""Bound the native heap of a vmvault process (glibc malloc), so peak memory does not grow with disks.

Backups and restores move 64 KiB chunks and 4-16 MiB buffers between worker threads. With
glibc's defaults each thread gets its own arena (up to 8 per core) and the mmap threshold rises
to the largest buffer ever freed, after which 16 MiB pack buffers come from the arenas and stay
there, fragmented: measured on a 64 GiB restore, 243 MiB peak against 177 MiB for 4 GiB. So the
threshold is fixed (it no longer rises) and the threads share one arena.

The fixed threshold sits just above the buffers a backup or a restore makes over and over (8 MiB
ranged reads, 8 MiB S3 parts, 4 MiB Azure blocks): those are reused from the arena instead of
being mapped, faulted in page by page and unmapped for each read. A 128 KiB threshold did that
and cost a third of a restore's system time (4 GiB from Azurite: 3.3-3.6 s of system CPU against
1.5-2.2 s; from moto 1.7-1.9 s against 1.2 s; a 1 GiB backup to moto 1.1 s against 0.6 s) for
20-40 MiB less peak memory (docs/performance.md, session 7). Pack buffers (16 MiB) stay above
it: mapped, and returned on free. The trim threshold keeps up to 32 MiB free at the top of the
arena rather than giving it back and faulting it in again at the next read.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 1
MMAP_THRESHOLD = 9 * 1024 * 1024  # above engine/readplan.py MAX_READ and the S3 part size (8 MiB)
TRIM_THRESHOLD = 32 * 1024 * 1024


def bound_native_heap() -> bool:
    """Call before starting threads; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_ARENA_MAX, ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(mallopt(option, value)) for option, value in settings])
