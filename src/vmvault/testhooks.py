"""Test-only crash points (docs/testing.md): inert unless VMVAULT_TEST_KILL_AT names the step.

`crash_point("backup:manifest-published")` makes this process SIGKILL itself right there when
VMVAULT_TEST_KILL_AT is exactly that step name, so crash tests hit the windows between the
product's own publishing steps instead of racing them with sleeps. Steps:
- pack:published              a pack is in the vault, its index file not yet (vault/store.py)
- backup:manifest-published   the manifest is in the vault, the catalog row not yet (engine/backup.py)
- retention:manifest-deleted  the manifest is deleted, the catalog row not yet (service/retention.py)
"""

from __future__ import annotations

import os
import signal

KILL_AT = "VMVAULT_TEST_KILL_AT"


def crash_point(step: str) -> None:
    if os.environ.get(KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)
