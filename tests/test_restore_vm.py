"""Restore as a new VM, and restore disks plus a template, on the real test guest (tests/vm).

One guest for the module: an ext4 OS disk it boots from (vmv.root=/dev/vda: the initramfs mounts it
and switch_roots to it), an ext4 data disk and a NIC. It is backed up live once; the copy restored
from that point boots beside the original.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli, rp_id
from vm.live import backup, latest_point, protect_running
from vm.machine import Guest, ext4_disk
from vm.osdisk import SWITCH_ROOT_INIT as SWITCH_ROOT_INIT  # the OS-disk guest, importable from here too
from vm.osdisk import OsImage as OsImage
from vm.osdisk import boot_args as boot_args
from vm.osdisk import os_disk as os_disk
from vm.osdisk import os_image as os_image
from vmvault.connectors.guest_agent import GuestAgent
from vmvault.connectors.qemu.qmp import QmpClient
from vmvault.errors import StorageError

MiB = 1 << 20
VM = "orig"


# ---- the module's guest ----------------------------------------------------------------------------------


@dataclass
class Lab:
    workdir: Path
    guest: Guest
    cli: Cli
    rp: str


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("rvm")
    image = os_image(workdir)
    disks = [os_disk(workdir, image), ext4_disk(workdir, "data0", 32 * MiB)]
    nic = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:01"]
    guest = Guest(workdir, disks, image=image.image, extra=boot_args() + nic).start()
    try:
        cli = HostKeyCli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        root = guest.sh("grep ' / ' /proc/mounts").stdout
        assert root.startswith("/dev/vda / ext4"), f"the guest did not boot from its OS disk: {root!r}"
        guest.sh("echo before > /only-on-os-disk && sync")
        backup(cli, VM)
        guest.sh("echo after > /written-after && sync")
        yield Lab(workdir, guest, cli, rp_id(latest_point(cli, VM)))
    finally:
        guest.close()


def _agent_sh(socket: str, script: str) -> Any:
    with GuestAgent(socket).connect(timeout=30) as agent:
        return agent.run("/bin/sh", ["-c", script], timeout=60)


def _qmp(socket: str, command: str) -> Any:
    with QmpClient(socket).connect() as qmp:
        return qmp.execute(command)


def _pid(template: dict[str, Any]) -> int:
    try:
        return int(Path(template["pidFile"]).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0  # QEMU removes its pid file when it exits


def _stop(template: dict[str, Any]) -> None:
    pid = _pid(template)
    with contextlib.suppress(Exception):
        _qmp(template["sockets"]["qmp"], "quit")
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _remove_run_dir(template)


def _remove_run_dir(template: dict[str, Any]) -> None:
    run_dir = Path(template["sockets"]["qmp"]).parent
    for leftover in run_dir.glob("*.sock"):
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _original_paths(lab: Lab) -> list[str]:
    return [str(d.path) for d in lab.guest.disks] + [str(lab.guest.sockets), str(lab.guest.console)]


# ---- restore vm ------------------------------------------------------------------------------------------


def test_a_restored_vm_boots_from_its_restored_os_disk(lab: Lab) -> None:
    target = lab.workdir / "copy1"
    r = lab.cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", "copy1", "--target-dir", str(target), "--start",
                    timeout=600)  # fmt: skip
    template = json.loads((target / "copy1.json").read_text()) if (target / "copy1.json").exists() else {}
    try:
        assert r.ok and r.json()["properties"]["status"] == "Completed", str(r)
        agent = template["sockets"]["guestAgent"]
        root = _agent_sh(agent, "grep ' / ' /proc/mounts").stdout
        assert root.startswith("/dev/vda / ext4"), f"the copy did not boot from its OS disk: {root!r}"
        assert _agent_sh(agent, "cat /only-on-os-disk").stdout == "before\n"
        assert not _agent_sh(agent, "cat /written-after").ok, "a file written after the backup is in the copy"
        # new identity: UUID, MAC, name; the original runs on, untouched
        copy_uuid = _qmp(template["sockets"]["qmp"], "query-uuid")["UUID"]
        orig_uuid = lab.guest.qmp("query-uuid")["UUID"]
        assert copy_uuid == template["uuid"] and copy_uuid != orig_uuid
        copy_macs = {n["main-mac"] for n in _qmp(template["sockets"]["qmp"], "query-rx-filter")}
        orig_macs = {n["main-mac"] for n in lab.guest.qmp("query-rx-filter")}
        assert copy_macs and orig_macs and not copy_macs & orig_macs, (copy_macs, orig_macs)
        assert _qmp(template["sockets"]["qmp"], "query-name")["name"] == "copy1"
        assert lab.guest.sh("cat /written-after").stdout == "after\n"
        # its files are its own
        text = json.dumps(template)
        for path in _original_paths(lab):
            assert path not in text, f"the copy uses {path} of the original"
        assert all(Path(d["path"]).parent == target for d in template["disks"])
        # registered as a vmvault VM
        vm = lab.cli.ok("vm", "show", "copy1").json()
        assert vm["name"] == "copy1"
        # the job says what it restored (issue 22: extendedInfo.restore)
        record = lab.cli.ok("job", "show", r.json()["name"]).json()["properties"]["extendedInfo"]["restore"]
        assert (record["mode"], record["recoveryPoint"], record["newVm"]) == ("vm", lab.rp, "copy1")
        assert record["definitionFile"] == str(target / "copy1.json") and record["started"] is True
    finally:
        if template:
            _stop(template)


def test_restore_vm_refusals_change_nothing(lab: Lab, tmp_path: Path) -> None:
    before = sorted(v["name"] for v in lab.cli.vms())
    # the name is taken
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", VM, "--target-dir", str(tmp_path / "a"))
    assert "already exists" in r.output
    assert not (tmp_path / "a").exists()
    # files in the way
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "os0.qcow2").write_text("mine")
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", "copy2", "--target-dir", str(tmp_path / "b"))
    assert "in the way" in r.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["os0.qcow2"]
    assert (tmp_path / "b" / "os0.qcow2").read_text() == "mine"
    # a disk-only VM has no definition
    raw = tmp_path / "plain.raw"
    subprocess.run(["truncate", "-s", str(MiB), str(raw)], check=True)
    lab.cli.ok("vm", "add", "plain", "--disk", str(raw))
    lab.cli.ok("protection", "enable", "--vm", "plain", "--vault", "v1")
    lab.cli.ok(*lab.cli.backup_args("plain"))
    plain_rp = rp_id(latest_point(lab.cli, "plain"))
    c = str(tmp_path / "c")
    r = lab.cli.fails("restore", "vm", "plain", "--rp", plain_rp, "--name", "copy3", "--target-dir", c)
    assert "no VM definition: use restore disks" in r.output
    assert not (tmp_path / "c").exists()
    assert sorted(v["name"] for v in lab.cli.vms()) == sorted([*before, "plain"])


def test_not_enough_free_space_is_refused_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from vmvault.service import restore_vm

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10 * MiB, 10 * MiB, MiB))  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="not enough free space"):
        restore_vm._check_space(tmp_path / "new" / "dir", 10 * MiB)
    assert not (tmp_path / "new").exists()


# ---- restore disks + template -------------------------------------------------------------------------------


def test_restore_disks_writes_a_template_pointing_only_inside_the_target(lab: Lab) -> None:
    target = lab.workdir / "disks-only-os"
    r = lab.cli.ok("restore", "disks", VM, "--rp", lab.rp, "--target-dir", str(target), "--disk", "os0")
    assert r.json()["properties"]["status"] == "Completed"
    assert sorted(p.name for p in target.iterdir()) == ["orig-template.json", "os0.qcow2"]
    template = json.loads((target / "orig-template.json").read_text())
    assert [d["name"] for d in template["disks"]] == ["os0"]
    assert [d["name"] for d in template["excludedDisks"]] == ["data0"]
    for d in template["disks"]:
        assert Path(d["path"]).parent == target
    text = json.dumps(template)
    for path in _original_paths(lab):
        assert path not in text, f"the template still names {path} of the original VM"
    cmdline = template["qemu"]["cmdline"]
    assert not any("data0" in a for a in cmdline), "an unselected disk is still in the template's command line"
    assert str(target / "os0.qcow2") in " ".join(cmdline)
    # the template boots as it is (the original keeps running beside it)
    script = target / "boot.sh"
    run_dir = Path(template["sockets"]["qmp"]).parent
    script.write_text(f"mkdir -p {run_dir}\nexec " + " ".join(f"'{a}'" for a in cmdline) + "\n")
    log = open(target / "qemu.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(["/bin/sh", str(script)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (target / "qemu.log").read_text()
            with contextlib.suppress(Exception):
                root = _agent_sh(template["sockets"]["guestAgent"], "grep ' / ' /proc/mounts").stdout
                break
            assert time.monotonic() < deadline, "the template's VM did not come up"
            time.sleep(0.5)
        assert root.startswith("/dev/vda / ext4")
    finally:
        with contextlib.suppress(Exception):
            _qmp(template["sockets"]["qmp"], "quit")
        proc.wait(60)
        log.close()
        _remove_run_dir(template)


def test_restore_disks_of_a_disk_only_vm_writes_no_template(lab: Lab, tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    subprocess.run(["truncate", "-s", str(MiB), str(raw)], check=True)
    lab.cli.ok("vm", "add", "plain2", "--disk", str(raw))
    lab.cli.ok("protection", "enable", "--vm", "plain2", "--vault", "v1")
    lab.cli.ok(*lab.cli.backup_args("plain2"))
    lab.cli.ok("restore", "disks", "plain2", "--rp", rp_id(latest_point(lab.cli, "plain2")), "--target-dir",
               str(tmp_path / "out"))  # fmt: skip
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["disk0.raw"]


def test_a_soft_deleted_point_is_refused(lab: Lab, tmp_path: Path) -> None:
    """Last: soft deletes the module VM's backup data."""
    lab.cli.ok("protection", "disable", VM, "--delete-data")
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", "copy9", "--target-dir", str(tmp_path / "x"))
    assert "soft deleted" in r.output
    assert not (tmp_path / "x").exists()
