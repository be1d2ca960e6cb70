"""bound_native_heap really reaches glibc: mallopt accepts both settings in a fresh process."""

from __future__ import annotations

import subprocess
import sys


def test_the_native_heap_is_bounded_in_a_fresh_process() -> None:
    code = "from vmvault.memory import bound_native_heap; print(bound_native_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_the_buffers_made_over_and_over_come_from_the_arena_and_packs_stay_mapped() -> None:
    """Restore reads and S3 parts (8 MiB) are under the fixed mmap threshold, so they are reused
    rather than mapped and faulted in for each read (a 128 KiB threshold cost a third of a
    restore's system time); 16 MiB pack buffers are over it, returned to the system on free."""
    from vmvault import memory
    from vmvault.engine.readplan import MAX_READ
    from vmvault.vault.backends.azure import BLOCK
    from vmvault.vault.backends.s3 import PART
    from vmvault.vault.packs import TARGET_PACK_SIZE

    assert max(MAX_READ, PART, BLOCK) < memory.MMAP_THRESHOLD < TARGET_PACK_SIZE
    assert memory.ARENAS <= 2 and memory.TRIM_THRESHOLD <= 64 * 1024 * 1024
