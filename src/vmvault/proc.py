"""Process identity on this host: boot id, liveness and start time of a pid, its command line.

Jobs, vault pins, file-recovery owners and running QEMU VMs all record "which process owns this";
they must agree on what a dead owner is. A zombie counts as dead: it has exited and holds nothing
(no open files, no locks), it only waits for its parent to collect its status.
"""

from __future__ import annotations

import os

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id ("" when unknown): a pid recorded under another boot names nothing."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True when pid names a live, non-zombie process (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    if not fields:
        return True  # exists but unreadable: assume alive rather than steal its work
    return fields[0] not in ("Z", "X")


def process_start_ticks(pid: int) -> int | None:
    """When pid started (clock ticks since boot, stat field 22): tells a reused pid apart."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def process_cmdline(pid: int) -> list[str]:
    """The arguments of pid ([] when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
