"""`vm list` of plain QEMU VMs and disk-only VMs: power state from QMP, agent reachability, protection in words.

(libvirt domains: tests/test_libvirt_backup.py and tests/test_libvirt_restore.py.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from helpers import Cli, HostKeyCli  # HostKeyCli: not about passphrases (no scrypt)
from vm.live import backup, protect_running
from vm.machine import Guest, ext4_disk

MiB = 1 << 20


def _listed(cli: Cli) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in cli.ok("vm", "list").json()}


def test_vm_list_follows_a_qemu_vm_and_its_protection(tmp_path: Path) -> None:
    cli = HostKeyCli(home=tmp_path / "home")
    guest = Guest(tmp_path, [ext4_disk(tmp_path, "data0", 16 * MiB)]).start()
    try:
        protect_running(cli, tmp_path / "vault", "q1", guest.vmvault_qmp, guest.agent_socket)
        plain = ext4_disk(tmp_path, "plain0", 4 * MiB, fmt="raw")
        cli.ok("vm", "add", "d1", "--disk", str(plain.path))
        vms = _listed(cli)
        assert (vms["q1"]["powerState"], vms["q1"]["agent"]) == ("running", "answers"), vms["q1"]
        assert vms["q1"]["protection"] == "protected in vault v1 (initial backup pending)"
        assert (vms["d1"]["powerState"], vms["d1"]["protection"]) == ("unknown", "not protected"), vms["d1"]
        backup(cli, "q1")
        guest.qmp("stop")  # paused: QMP answers, the VM does not run
        assert _listed(cli)["q1"]["powerState"] == "paused"
        guest.qmp("cont")
        table = cli.ok("vm", "list", json_output=False).stdout
        (line,) = [x for x in table.splitlines() if x.startswith("q1 ")]
        assert line.split()[:3] == ["q1", "qmp", "running"] and "protected in vault v1" in line, table
    finally:
        guest.close()
    cli.ok("protection", "disable", "q1")
    started = time.monotonic()
    vms = _listed(cli)
    assert time.monotonic() - started < 10, "vm list waited on a stopped VM"
    assert (vms["q1"]["powerState"], vms["q1"]["agent"]) == ("stopped", "not running"), vms["q1"]
    assert vms["q1"]["protection"] == "stopped with data in vault v1"
