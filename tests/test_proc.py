"""Process identity: jobs, vault pins and file-recovery owners agree that a zombie owner is dead.

A zombie has exited and holds nothing; it only waits for its parent to collect its status. A pin
held by one must not keep garbage collection from sweeping, and a job owned by one is failed.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from vmvault import proc
from vmvault.recovery.session import process_matches
from vmvault.vault.lock import Pin


def _zombie() -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat", encoding="ascii") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not become a zombie")


def _pin(pid: int) -> Pin:
    now = datetime.now(UTC)
    return Pin("p1", "rp1", [], "test", socket.gethostname(), pid, proc.boot_id(), now.isoformat(),
               (now + timedelta(hours=1)).isoformat())


def test_a_zombie_owner_is_dead_for_jobs_pins_and_sessions() -> None:
    child = _zombie()
    try:
        assert not proc.pid_alive(child.pid)
        assert not _pin(child.pid).is_valid()
        assert not process_matches(child.pid, "sleep")
        assert proc.process_start_ticks(child.pid) is not None  # still listed until reaped
    finally:
        child.wait()


def test_a_live_owner_is_alive_and_named_by_its_start_time() -> None:
    assert proc.pid_alive(os.getpid())
    assert _pin(os.getpid()).is_valid()
    assert proc.process_start_ticks(os.getpid()) == proc.process_start_ticks(os.getpid()) is not None
    # this interpreter's own arguments (not "pytest": a pytest-xdist worker runs as `python -c ...`)
    assert proc.process_cmdline(os.getpid()) == [a for a in sys.orig_argv if a]
    assert proc.boot_id()


def test_a_pin_from_another_boot_is_not_valid() -> None:
    assert not dataclasses.replace(_pin(os.getpid()), boot_id="another-boot").is_valid()
    assert not proc.pid_alive(0) and not proc.pid_alive(-1)
