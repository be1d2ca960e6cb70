"""Instant restore (restore vm --instant) on the real test guest: boots from the vault, moves to local disks.

One guest for the module, booting from its ext4 OS disk (vmv.root=/dev/vda, built as in
test_restore_vm.py), backed up live once and then stopped. The copy boots on qcow2 overlays whose
backing is vmvault's NBD export of the point; the stream is throttled (VMVAULT_INSTANT_STREAM_SPEED)
so that the export can be killed while the copy is under way.
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
from vm.live import backup, ext4_file, latest_point, protect_running
from vm.machine import Guest, ext4_disk
from vm.osdisk import boot_args, os_disk, os_image
from vmvault.connectors.guest_agent import GuestAgent
from vmvault.connectors.qemu.qmp import QmpClient, QmpError
from vmvault.proc import pid_alive

MiB = 1 << 20
VM = "orig"
RETRY_S = 8  # the owner restarts a dead export after this long: the test sees the pause before


@dataclass
class Lab:
    workdir: Path
    cli: Cli
    rp: str


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("instant")
    image = os_image(workdir)
    disks = [os_disk(workdir, image), ext4_disk(workdir, "data0", 16 * MiB)]
    guest = Guest(workdir, disks, image=image.image, extra=boot_args()).start()
    try:
        cli = HostKeyCli(home=workdir / "home")
        cli.extra_env.update({"VMVAULT_INSTANT_RETRY_S": str(RETRY_S), "VMVAULT_INSTANT_STREAM_SPEED": str(2 * MiB)})
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        guest.sh("echo before > /only-on-os-disk && sync")
        backup(cli, VM)
        rp = rp_id(latest_point(cli, VM))
    finally:
        guest.close()  # the copy runs alone: 2 shared cores
    yield Lab(workdir, cli, rp)


def _sh(agent: str, script: str, timeout: float = 60) -> Any:
    with GuestAgent(agent).connect(timeout=30) as ga:
        return ga.run("/bin/sh", ["-c", script], timeout=timeout)


def _qmp(socket: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    with QmpClient(socket).connect() as qmp:
        return qmp.execute(command, arguments)


def _wait(what: str, check: Any, timeout: float = 60, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _job(cli: Cli, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = cli.ok("job", "show", job_id).json()
    return job


def _backing(path: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    backing = info.get("backing-filename")
    return str(backing) if backing else None


def _check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", *extra, str(path)], capture_output=True, text=True)


def _check_overlay_alone(path: Path) -> subprocess.CompletedProcess[str]:
    """qemu-img check of the overlay itself, its backing (the dead export) not opened, QEMU still holding it."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    return _check(Path("json:" + json.dumps(spec)), "-U")


def _stop_copy(cli: Cli, job_id: str | None, template: dict[str, Any], test_qmp: Path) -> None:
    """Leave nothing running when the test failed half-way."""
    if job_id and _job(cli, job_id)["properties"]["status"] == "InProgress":
        cli.run("job", "cancel", job_id)
        with contextlib.suppress(Exception):
            cli.run("job", "wait", job_id, "--timeout", "60")
    with contextlib.suppress(Exception):
        _qmp(test_qmp, "quit")
    pid_file = Path(template.get("pidFile") or "/nonexistent")
    with contextlib.suppress(Exception):
        _wait("QEMU to exit", lambda: not pid_file.exists(), timeout=30)
    run_dir = test_qmp.parent  # QEMU leaves its sockets behind
    for leftover in run_dir.glob("*.sock"):
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def test_instant_restore_runs_from_the_vault_survives_a_lost_export_and_moves_to_local_disks(lab: Lab) -> None:
    target = lab.workdir / "fast"
    r = lab.cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", "fast", "--target-dir", str(target), "--instant",
                    timeout=600)  # fmt: skip
    template = json.loads((target / "fast.json").read_text()) if (target / "fast.json").exists() else {}
    job_id = r.json().get("name") if r.output.strip().startswith("{") else None
    test_qmp = Path(template["sockets"]["qmp"]).parent / "qmp.sock" if template else Path("/nonexistent")
    try:
        assert r.ok, str(r)
        status = r.json()["properties"]["status"]
        assert status == "InProgress", "the command returns while the disks are still being copied"
        agent = template["sockets"]["guestAgent"]
        os0, data0 = target / "os0.qcow2", target / "data0.qcow2"

        # boots from the vault: an overlay on the NBD export, root on it, the backed-up file there
        assert (_backing(os0) or "").startswith("nbd+unix:///os0?socket="), _backing(os0)
        assert _sh(agent, "grep ' / ' /proc/mounts").stdout.startswith("/dev/vda / ext4")
        assert _sh(agent, "cat /only-on-os-disk").stdout == "before\n"
        assert _sh(agent, "echo during > /written-during && sync").ok
        state = _job(lab.cli, job_id or "")["properties"]["extendedInfo"]["restore"]
        assert state["state"] == "Copying" and state["vmRunning"]
        export_pid = int(state["exportPid"])
        assert pid_alive(export_pid)

        # the export dies mid-way: the VM pauses on its next read of data not copied yet, no I/O error in the guest
        os.kill(export_pid, signal.SIGKILL)
        with GuestAgent(agent).connect(timeout=30) as ga:  # not waited for: it blocks while the VM is paused
            dd = ga.guest_exec("/bin/sh", ["-c", "dd if=/dev/vda of=/dev/null bs=1M skip=64 count=32"])
        _wait("the VM to pause on the lost export", lambda: _qmp(test_qmp, "query-status")["status"] == "io-error")
        assert _qmp(test_qmp, "query-status")["running"] is False
        error = _wait(
            "the job to report the lost export", lambda: _job(lab.cli, job_id or "")["properties"]["errorDetails"], 10
        )[0]
        assert error["errorCode"] == "export_lost" and "pauses (io-error)" in error["errorString"], error
        assert "restarts the export" in error["recommendations"][0]
        assert _job(lab.cli, job_id or "")["properties"]["status"] == "InProgress"
        checked = _check_overlay_alone(os0)
        assert checked.returncode == 0, f"the overlay is damaged while paused: {checked.stdout}{checked.stderr}"

        # the owner restarts the export: the VM goes on, the guest's read succeeds, nothing logged as an I/O error
        _wait("the VM to resume", lambda: _qmp(test_qmp, "query-status")["status"] == "running", RETRY_S + 60)
        with GuestAgent(agent).connect(timeout=30) as ga:
            status = _wait("dd to finish", lambda: (s := ga.guest_exec_status(dd))["exited"] and s, 60)
        assert status.get("exitcode") == 0, status
        assert "I/O error" not in _sh(agent, "dmesg").stdout
        assert _job(lab.cli, job_id or "")["properties"]["errorDetails"] == []
        assert _sh(agent, "cat /written-during").stdout == "during\n"

        # the rest of the copy at full speed; the job completes, the export is gone, the disks are local
        for job in _qmp(test_qmp, "query-block-jobs"):
            try:
                _qmp(test_qmp, "block-job-set-speed", {"device": job["device"], "speed": 0})
            except QmpError as exc:  # the small disk's stream may conclude between the query and this
                assert "concluded" in str(exc), exc
        done = lab.cli.run("job", "wait", job_id or "", "--timeout", "300", timeout=400)
        assert done.ok and done.json()["properties"]["status"] == "Completed", str(done)
        state = _job(lab.cli, job_id or "")["properties"]["extendedInfo"]["restore"]
        assert state["disks"] == [str(os0), str(data0)] and state["exportClosed"]
        assert not pid_alive(int(state["exportPid"])), "the export still runs after the switch-over"
        assert not Path(state["exportSocket"]).exists()
        assert _backing(os0) is None and _backing(data0) is None
        nodes = _qmp(test_qmp, "query-named-block-nodes", {"flat": True})
        assert not [n["node-name"] for n in nodes if n.get("backing_file") or n["drv"] == "nbd"], nodes
        assert _qmp(test_qmp, "query-status")["status"] == "running"
        assert _sh(agent, "echo local > /after-switch && sync").ok
        _qmp(test_qmp, "quit")
        _wait("QEMU to exit", lambda: not Path(template["pidFile"]).exists(), 30)

        # the final disk, read offline, holds the backed-up file and the guest's writes
        for disk in (os0, data0):
            assert _check(disk).returncode == 0, _check(disk).stdout
        raw = lab.workdir / "fast-os0.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(os0), str(raw)], check=True)
        assert ext4_file(raw, "/only-on-os-disk") == b"before\n"
        assert ext4_file(raw, "/written-during") == b"during\n"
        assert ext4_file(raw, "/after-switch") == b"local\n"
    finally:
        if template:
            _stop_copy(lab.cli, job_id, template, test_qmp)


def test_instant_restore_refuses_a_raw_format_and_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", "raw1", "--target-dir", str(tmp_path / "x"),
                      "--instant", "--format", "raw")  # fmt: skip
    assert "qcow2" in r.output
    assert not (tmp_path / "x").exists()
    assert "raw1" not in [v["name"] for v in lab.cli.vms()]


def test_cancelling_an_instant_restore_stops_the_copy_and_removes_it(lab: Lab) -> None:
    target = lab.workdir / "gone"
    r = lab.cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", "gone", "--target-dir", str(target), "--instant",
                    timeout=600)  # fmt: skip
    assert r.ok and r.json()["properties"]["status"] == "InProgress", str(r)
    job_id = r.json()["name"]
    template = json.loads((target / "gone.json").read_text())
    state = _job(lab.cli, job_id)["properties"]["extendedInfo"]["restore"]
    qemu_pid = int(Path(template["pidFile"]).read_text())
    run_dir = Path(template["sockets"]["qmp"]).parent
    try:
        lab.cli.ok("job", "cancel", job_id)
        done = lab.cli.run("job", "wait", job_id, "--timeout", "120", timeout=200)
        assert done.json()["properties"]["status"] == "Cancelled", str(done)
        assert "stopped and removed" in done.json()["properties"]["errorDetails"][0]["errorString"]
        assert not pid_alive(qemu_pid) and not pid_alive(int(state["exportPid"]))
        assert "gone" not in [v["name"] for v in lab.cli.vms()]
        assert not list(target.glob("*.qcow2")) and not (target / "gone.json").exists()
        assert not (target / "gone.sh").exists() and not run_dir.exists()
    finally:
        _stop_copy(lab.cli, job_id, template, run_dir / "qmp.sock")


def test_disk_devices_stop_on_errors() -> None:
    """The guest devices of the restored disks (and only those) get werror=stop,rerror=stop."""
    from vmvault.connectors.qemu.instant import stop_on_errors

    blockdev = ["qemu-system-x86_64", "-blockdev", "driver=qcow2,node-name=os0,file=os0-file",
                "-device", "virtio-blk-pci,drive=os0,id=vd-os0", "-device", "virtio-net-pci,netdev=n0",
                "-device", "virtio-blk-pci,drive=cd,id=x"]  # fmt: skip
    out = stop_on_errors(blockdev, ["os0"])
    assert out[4] == "virtio-blk-pci,drive=os0,id=vd-os0,werror=stop,rerror=stop"
    assert out[6] == "virtio-net-pci,netdev=n0" and out[8] == "virtio-blk-pci,drive=cd,id=x"
    drives = ["qemu-system-x86_64", "-drive", "file=/d/os0.qcow2,format=qcow2,if=virtio",
              "-drive", "file=/d/cd.iso,media=cdrom", "-drive", "file=/d/x.qcow2,if=none,id=x",
              "-device", "virtio-blk-pci,drive=x"]  # fmt: skip
    out = stop_on_errors(drives, ["os0", "x"])
    assert out[2].endswith(",werror=stop,rerror=stop") and out[4] == "file=/d/cd.iso,media=cdrom"
    assert out[6] == "file=/d/x.qcow2,if=none,id=x" and out[8] == "virtio-blk-pci,drive=x,werror=stop,rerror=stop"
