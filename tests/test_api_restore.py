"""Restore as a new VM and replace disks through the API (issue 8's routes), on a real QEMU.

The QEMU is started paused (-S: nothing runs in it, so its disk stays as written and no guest has
to boot under TCG); vmvault adds it by QMP and backs it up live like any running VM. The API then
restores that point as a new VM (202 + job, the new VM registered, its disk byte-identical) and,
once QEMU has stopped, replaces the VM's disk with the point's. BackupOperator may; BackupReader
gets 403.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_support import Sandbox, sandbox
from helpers import files_equal
from test_api_flows import API, wait_job
from vm.machine import Guest, ext4_disk
from vmvault.connectors.qemu.qmp import QmpClient
from vmvault.service import backups, protection, vaults, vms

MiB = 1 << 20


@pytest.fixture
def paused_guest(tmp_path: Path) -> Iterator[Guest]:
    guest = Guest(tmp_path, [ext4_disk(tmp_path, "data", 32 * MiB, fmt="raw")], agent=False, extra=["-S"])
    guest.proc = subprocess.Popen(guest.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception), QmpClient(str(guest.vmvault_qmp)).connect(greeting_timeout=1):
                break
            assert time.monotonic() < deadline and guest.proc.poll() is None, "QEMU did not come up"
            time.sleep(0.1)
        yield guest
    finally:
        guest.close()


def _point(box: Sandbox, guest: Guest) -> str:
    vaults.create_vault(box.ctx, "main")
    vms.add_qmp_vm(box.ctx, "orig", guest.vmvault_qmp)
    protection.enable_protection(box.ctx, "orig", "main")
    manifest = backups.backup_now(box.ctx, "orig").result
    assert manifest is not None
    return str(manifest.rp_id)


def test_restore_as_a_new_vm_and_replace_disks(tmp_path: Path, paused_guest: Guest) -> None:
    disk = paused_guest.disks[0].path
    original = tmp_path / "original.raw"
    original.write_bytes(disk.read_bytes())
    with sandbox(tmp_path / "home") as box:
        rp = _point(box, paused_guest)
        operator, reader = box.token("BackupOperator", vault="main"), box.token("BackupReader")
        body = {"rp": rp, "name": "copy", "targetDir": str(tmp_path / "copy"), "format": "raw"}
        for path in ("restore/vm", "restore/replace-disks"):
            denied = box.call("POST", f"{API}/items/orig/{path}", reader, json=body)
            assert denied.status_code == 403 and denied.json()["code"] == "forbidden", denied.text

        r = box.call("POST", f"{API}/items/orig/restore/vm", operator, json=body)
        assert r.status_code == 202 and r.json()["properties"]["operation"] == "Restore", r.text
        job = wait_job(box, reader, r.json()["name"])
        assert job["properties"]["status"] == "Completed", job
        copy = box.call("GET", f"{API}/vms/copy", reader).json()
        assert copy["kind"] == "qmp" and [d["name"] for d in copy["disks"]] == ["data"], copy
        assert files_equal(Path(copy["disks"][0]["path"]), original)

        running = box.call("POST", f"{API}/items/orig/restore/replace-disks", operator, json={"rp": rp})
        assert running.status_code == 423 and running.json()["code"] == "vm_running", running.text
        paused_guest.quit()
        with open(disk, "r+b") as f:  # the VM's disk damaged after the point
            f.seek(8 * MiB)
            f.write(b"\xff" * MiB)
        # "latest" is resolved by the service, so the API takes it as the CLI does (the only point here)
        r = box.call("POST", f"{API}/items/orig/restore/replace-disks", operator, json={"rp": "latest"})
        assert r.status_code == 202, r.text
        job = wait_job(box, reader, r.json()["name"])
        assert job["properties"]["status"] == "Completed", job
        assert files_equal(disk, original)
