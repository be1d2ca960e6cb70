"""Test-only crash points (docs/testing.md): inert unless VMVAULT_TEST_KILL_AT names the step.

`crash_point("backup:manifest-published")` makes this process SIGKILL itself right there when
VMVAULT_TEST_KILL_AT is exactly that step name, so crash tests hit the windows between the
product's own publishing steps instead of racing them with sleeps. Steps:
- pack:published              a pack is in the vault, its index file not yet (vault/store.py)
- backup:manifest-published   the manifest is in the vault, the catalog row not yet (engine/backup.py)
- retention:manifest-deleted  the manifest is deleted, the catalog row not yet (service/retention.py)

`slow_snapshot(attempt)` makes a live backup's snapshot outlast the frozen window: with
VMVAULT_TEST_SLOW_SNAPSHOT=SECONDS every snapshot attempt holds the guest frozen that much longer,
with SECONDS:N only the first N attempts (connectors/consistency.py snapshot_in_window).
"""

from __future__ import annotations

import os
import signal
import sys
import time

KILL_AT = "VMVAULT_TEST_KILL_AT"
SLOW_SNAPSHOT = "VMVAULT_TEST_SLOW_SNAPSHOT"


def crash_point(step: str) -> None:
    if os.environ.get(KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def slow_snapshot(attempt: int) -> None:
    raw = os.environ.get(SLOW_SNAPSHOT)
    if not raw:
        return
    seconds, _, first = raw.partition(":")
    if first and attempt > int(first):
        return
    print(f"vmvault-test: {SLOW_SNAPSHOT}: attempt {attempt} holds {seconds} s", file=sys.stderr, flush=True)
    time.sleep(float(seconds))
