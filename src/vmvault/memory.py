"""Bound the native heap of a vmvault process (glibc malloc), so peak memory does not grow with disks.

Backups and restores move 64 KiB chunks and 4-16 MiB buffers between worker threads. With
glibc's defaults each thread gets its own arena (up to 8 per core) and the mmap threshold rises
to the largest buffer ever freed, after which 16 MiB pack buffers come from the arenas and stay
there, fragmented: measured on a 64 GiB restore, 243 MiB peak against 177 MiB for 4 GiB. Two
arenas and a fixed 128 KiB threshold (big buffers always mapped, returned on free) bring the
64 GiB restore to 182 MiB (bench/memory_flatness.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 * 1024


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
    return bool(mallopt(M_ARENA_MAX, ARENAS)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
