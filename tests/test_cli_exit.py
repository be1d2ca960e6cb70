"""The CLI's quick exit (cli/main.py _exit): a finished command skips the interpreter's teardown,
but its output, its exit code, its atexit handlers and any non-daemon thread still running are
kept as an ordinary exit keeps them. Each case runs in a Python child, since _exit ends the
process."""

from __future__ import annotations

import os
import subprocess
import sys

_CHILD = """
import atexit, sys, threading, time
from vmvault.cli.main import _exit
atexit.register(lambda: print("atexit handler ran", flush=False))
sys.stdout.write("x" * 200000)  # more than a pipe buffer, not flushed yet
{extra}
_exit(3)
"""

_LATE_THREAD = """
def late():
    time.sleep(0.3)
    print("late thread finished")
threading.Thread(target=late).start()
"""


def _run(extra: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD.format(extra=extra)], capture_output=True, text=True, timeout=60, env=env
    )


def test_output_exit_code_and_atexit_handlers_survive_the_quick_exit() -> None:
    p = _run()
    assert p.returncode == 3, p.stderr
    assert p.stdout.startswith("x" * 200000), p.stdout[-200:]
    assert p.stdout.endswith("atexit handler ran\n"), p.stdout[-200:]


def test_a_non_daemon_thread_still_running_is_waited_for() -> None:
    p = _run(_LATE_THREAD)
    assert p.returncode == 3, p.stderr
    assert "late thread finished" in p.stdout, "the quick exit killed a running non-daemon thread"
    assert "atexit handler ran" in p.stdout


def test_vmvault_full_exit_takes_the_ordinary_exit() -> None:
    p = _run(env={**os.environ, "VMVAULT_FULL_EXIT": "1"})
    assert p.returncode == 3, p.stderr
    assert p.stdout.endswith("atexit handler ran\n"), p.stdout[-200:]
