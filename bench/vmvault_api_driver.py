"""Fallback for bench/run_bench.py: drive vmvault's engine API (docs/engine-contract.md) directly.

Used only when the `vmvault` CLI is not usable (`run_bench.py --vmvault-mode api`, or `auto` when
`vmvault --help` fails). Each call is one process so the benchmark times and measures it the same
way as a CLI call or a restic/borg run.

    vmvault_api_driver.py create  --storage DIR --home DIR
    vmvault_api_driver.py backup  --storage DIR --home DIR --image IMG     # prints {"rp": ID}
    vmvault_api_driver.py restore --storage DIR --home DIR --rp ID --target-dir DIR

The passphrase comes from VMVAULT_PASSPHRASE.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["create", "backup", "restore"])
    ap.add_argument("--storage", type=Path, required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--rp")
    ap.add_argument("--target-dir", type=Path)
    a = ap.parse_args()
    passphrase = os.environ.get("VMVAULT_PASSPHRASE", "")

    from vmvault.vault.store import Vault

    if a.action == "create":
        Vault.create(a.storage, a.home, passphrase).close()
        return 0
    vault = Vault.open(a.storage, a.home, passphrase)
    try:
        if a.action == "backup":
            from vmvault.connectors.diskimage.connector import DiskSource, exported_images
            from vmvault.engine.backup import PointSpec, backup_exported

            points = vault.list_recovery_points()
            previous = None
            if points:
                manifests = [vault.read_manifest(p) for p in points]
                previous = max(manifests, key=lambda m: m.time)
            now = datetime.now(UTC)
            rp_id = secrets.token_hex(8)
            with exported_images("vm", [DiskSource("disk0", a.image, "raw")]) as disks:
                backup_exported(
                    vault,
                    PointSpec(
                        vm_name="vm",
                        vm_id="bench-vm",
                        rp_id=rp_id,
                        time=now.isoformat(timespec="microseconds"),
                        retain_until=(now + timedelta(days=30)).date().isoformat(),
                        consistency="CrashConsistent",
                        vm_definition={},
                        job_id="bench",
                    ),
                    disks,
                    previous,
                    on_progress=None,
                    cancel=None,
                )
            print(json.dumps({"rp": rp_id}))
        else:
            from vmvault.engine.restore import run_restore

            paths = run_restore(vault, vault.read_manifest(a.rp), a.target_dir, on_progress=None, cancel=None)
            print(json.dumps({"paths": [str(p) for p in paths]}))
    finally:
        vault.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
