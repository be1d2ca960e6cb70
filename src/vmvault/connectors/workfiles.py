"""Where connectors keep a backup's work files on this host, and the test-only holds of a live backup."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

BOOT_TIMEOUT = float(os.environ.get("VMVAULT_RESTORE_BOOT_TIMEOUT", "300"))  # a restored VM's agent answers
TEST_HOLD_FROZEN = "VMVAULT_TEST_HOLD_FROZEN"  # test-only: seconds to hold the guest frozen after the snapshot
TEST_HOLD_SNAPSHOT = "VMVAULT_TEST_HOLD_SNAPSHOT"  # test-only: seconds to wait after the thaw, before reading


def tag(vm_id: str) -> str:
    """A VM's short name in node, bitmap, checkpoint and directory names."""
    return vm_id.replace("-", "")[:8]


def run_dir(home: str | Path, vm_id: str) -> Path:
    """A short directory for unix sockets (108-byte limit), private to this home and VM."""
    key = hashlib.sha256(f"{home}\0{vm_id}".encode()).hexdigest()[:12]
    base = (
        Path("/run/vmvault") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / f"vmvault-{os.getuid()}"
    )
    return base / key  # created by the export, removed again when the backup ends


def copy_run_dir(anchor: str | Path, name: str) -> Path:
    """A short directory for a restored copy's unix sockets (108-byte limit): its QMP, agent, the vault's export."""
    key = hashlib.sha256(f"{anchor}\0{name}".encode()).hexdigest()[:12]
    base = (
        Path("/run/vmvault/vms")
        if os.access("/run", os.W_OK)
        else Path(tempfile.gettempdir()) / f"vmvault-{os.getuid()}"
    )
    return base / key


def test_hold(variable: str) -> None:
    # Test-only hooks (docs/running-vms.md): let a test act at an exact moment of a live backup.
    seconds = float(os.environ.get(variable) or 0)
    if seconds > 0:
        print(f"vmvault-test: {variable}: holding {seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(seconds)


def write_new(path: Path, text: str, *, force: bool = False, mode: int = 0o644) -> None:
    """Write a file of a restored VM; one in the way is refused unless force (never half written)."""
    from vmvault.errors import InvalidInput

    tmp = path.parent / f".{path.name}.vmvault-partial-{secrets.token_hex(4)}"
    tmp.write_text(text)
    tmp.chmod(mode)
    if not force and path.exists():
        tmp.unlink()
        raise InvalidInput(f"{path} is in the way", hint="remove it or choose another target directory")
    os.replace(tmp, path)
