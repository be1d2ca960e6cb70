"""bound_native_heap really reaches glibc: mallopt accepts both settings in a fresh process."""

from __future__ import annotations

import subprocess
import sys


def test_the_native_heap_is_bounded_in_a_fresh_process() -> None:
    code = "from vmvault.memory import bound_native_heap; print(bound_native_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
