"""Instant restore of a libvirt VM (restore vm --instant): a new domain boots from the vault, then is pulled local.

One domain for the module, booting from its ext4 OS disk (vmv.root=/dev/vda) with a data disk and a
NIC, backed up live once and then destroyed (the copy runs alone: 2 shared cores). The copy's disks
are qcow2 overlays on vmvault's NBD export of the point; the pulls are throttled
(VMVAULT_INSTANT_STREAM_SPEED) so that the export can be killed while they run. Every domain a test
defines is destroyed and undefined with its checkpoint metadata in a finalizer that asserts nothing
is left, no export process included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli, rp_id
from vm.libvirtd import Domain, leftovers, libvirtd  # noqa: F401  (the session fixture)
from vm.live import backup, ext4_file, latest_point
from vm.machine import ext4_disk
from vm.osdisk import os_disk, os_image
from vmvault.errors import VmvaultError
from vmvault.proc import pid_alive

MiB = 1 << 20
VM = "lvinst"
RETRY_S = 8  # the owner restarts a dead export after this long: the test sees the pause before
VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR, VIR_DOMAIN_RUNNING = 3, 5, 1


@dataclass
class Lab:
    workdir: Path
    cli: Cli
    rp: str
    original: str


@pytest.fixture(scope="module")
def lab(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("lvinstant")
    image = os_image(workdir)
    disks = [os_disk(workdir, image), ext4_disk(workdir, "data0", 16 * MiB)]
    domain = Domain(f"vmvis-{secrets.token_hex(4)}", workdir, disks, image=image.image, cmdline="vmv.root=/dev/vda",
                    nic=True).define()  # fmt: skip
    try:
        domain.start()
        domain.sh("mount -t tmpfs -o mode=755 tmpfs /run")  # qemu-ga's frozen marker off the OS disk
        cli = HostKeyCli(home=workdir / "home")
        cli.extra_env.update({"VMVAULT_INSTANT_RETRY_S": str(RETRY_S), "VMVAULT_INSTANT_STREAM_SPEED": str(2 * MiB)})
        cli.ok("vm", "add", VM, "--libvirt", domain.name)
        cli.vault_create("v1", workdir / "vault")
        assert cli.protection_enable(VM, "v1").ok
        domain.sh("echo before > /only-on-os-disk && sync")
        backup(cli, VM)
        rp = rp_id(latest_point(cli, VM))
        domain.virsh("destroy", domain.name)
        yield Lab(workdir, cli, rp, domain.name)
    finally:
        domain.close()


@contextlib.contextmanager
def defined(lab: Lab, name: str) -> Iterator[Domain]:
    """The domain the restore defines: the job ended, destroyed and undefined at the end, nothing left."""
    dom = Domain(name, Path("/nonexistent"), [])
    try:
        yield dom
    finally:
        job_id = getattr(dom, "job_id", None)
        export_pid = getattr(dom, "export_pid", None)
        if job_id and _job(lab.cli, job_id)["properties"]["status"] == "InProgress":
            lab.cli.run("job", "cancel", job_id)
            with contextlib.suppress(Exception):
                lab.cli.run("job", "wait", job_id, "--timeout", "60", timeout=90)
        dom.virsh("destroy", name, check=False)
        dom.virsh("undefine", name, "--checkpoints-metadata", "--nvram", check=False)
        left = list(leftovers(name))
        assert not left, f"left behind: {left}"
        assert not (export_pid and pid_alive(export_pid)), f"the export (pid {export_pid}) still runs"


def _job(cli: Cli, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = cli.ok("job", "show", job_id).json()
    return job


def _backing(path: Path) -> str | None:
    import json

    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    backing = info.get("backing-filename")
    return str(backing) if backing else None


def _wait(what: str, check: Any, timeout: float = 60, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _disks(xml: str) -> dict[str, ET.Element]:
    return {str(d.find("target").get("dev")): d for d in ET.fromstring(xml).iter("disk")}  # type: ignore[union-attr]


def _exec_status(copy: Domain, pid: int) -> dict[str, Any] | None:
    """guest-exec-status once it exited; None while it runs or the domain is paused (the agent cannot answer)."""
    try:
        with copy.agent_client().connect(timeout=5) as ga:
            status: dict[str, Any] = ga.guest_exec_status(pid)
    except VmvaultError:  # paused: libvirt refuses agent commands
        return None
    return status if status.get("exited") else None


def _sh_eventually(copy: Domain, script: str, timeout: float = 60) -> Any:
    """Run script in the guest, again while the domain is paused (libvirt refuses agent commands then)."""

    def attempt() -> Any:
        try:
            result = copy.agent_client().run("/bin/sh", ["-c", script], timeout=20)
        except VmvaultError:
            return None
        return result if result.ok else None

    return _wait(f"the guest to run {script!r}", attempt, timeout, 1)


def _full_speed_until_done(lab: Lab, copy: Domain, job_id: str, targets: list[str]) -> dict[str, Any]:
    """Lift the throttle of every pull (the owner may start one again) until the job ends."""
    deadline = time.monotonic() + 300
    while (job := _job(lab.cli, job_id))["properties"]["status"] == "InProgress":
        assert time.monotonic() < deadline, f"the copy did not finish: {job}"
        for dev in targets:
            copy.virsh("blockjob", copy.name, dev, "--bandwidth", "0", check=False)
        time.sleep(1)
    return job


def test_instant_restore_of_a_libvirt_vm_boots_from_the_vault_and_is_pulled_local(lab: Lab) -> None:
    name, target = f"vmvinst-{secrets.token_hex(3)}", lab.workdir / "fast"
    vda, vdb = target / "vda.qcow2", target / "vdb.qcow2"
    with defined(lab, name) as copy:
        r = lab.cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", name, "--target-dir", str(target), "--instant",
                        timeout=600)  # fmt: skip
        assert r.ok, str(r)
        job_id = copy.job_id = r.json()["name"]  # type: ignore[attr-defined]
        status = r.json()["properties"]["status"]
        assert status == "InProgress", "the command returns while the disks are still being pulled"
        state = _job(lab.cli, job_id)["properties"]["extendedInfo"]["restore"]
        copy.export_pid = export_pid = int(state["exportPid"])  # type: ignore[attr-defined]

        # boots from the vault: overlays on the NBD export, stop on errors, root on it, the backed-up file there
        assert (_backing(vda) or "").startswith("nbd+unix:///vda?socket="), _backing(vda)
        live = _disks(copy.virsh("dumpxml", name).stdout)
        store = live["vda"].find("backingStore/source")
        assert store is not None and store.get("protocol") == "nbd", ET.tostring(live["vda"])
        for disk in live.values():
            assert disk.find("driver").get("error_policy") == "stop"  # type: ignore[union-attr]
            assert disk.find("driver").get("rerror_policy") == "stop"  # type: ignore[union-attr]
        assert copy.sh("grep ' / ' /proc/mounts").stdout.startswith("/dev/vda / ext4")
        assert copy.sh("cat /only-on-os-disk").stdout == "before\n"
        copy.sh("echo during > /written-during && sync")
        assert state["state"] == "Copying" and state["vmRunning"] and pid_alive(export_pid)
        assert _job(lab.cli, job_id)["properties"]["status"] == "InProgress"
        progress = _wait(
            "the pull's progress in the job",
            lambda: _job(lab.cli, job_id)["properties"]["extendedInfo"]["progressPercentage"],
        )
        assert progress < 100

        # the pulls finish: job Completed, the export gone, the disks local (image headers and domain XML)
        job = _full_speed_until_done(lab, copy, job_id, ["vda", "vdb"])
        assert job["properties"]["status"] == "Completed", job
        assert job["properties"]["extendedInfo"]["progressPercentage"] == 100, job["properties"]["extendedInfo"]
        state = job["properties"]["extendedInfo"]["restore"]
        assert state["exportClosed"] and state["disks"] == [str(vda), str(vdb)], state
        assert not pid_alive(int(state["exportPid"])) and not Path(state["exportSocket"]).exists()
        assert _backing(vda) is None and _backing(vdb) is None
        for flags in ((), ("--inactive",)):
            xml = copy.virsh("dumpxml", *flags, name).stdout
            assert "nbd" not in xml, xml
            for dev, disk in _disks(xml).items():
                assert disk.find("backingStore/source") is None, f"{dev} still has a backing store: {xml}"
        assert copy.sh("echo local > /after-switch && sync").ok

        # after shutdown the disk holds the backed-up file and the guest's writes
        copy.virsh("shutdown", name)
        _wait("the domain to shut down", lambda: not copy.dom().isActive(), 120, 0.5)
        assert subprocess.run(["qemu-img", "check", str(vda)], capture_output=True).returncode == 0
        raw = lab.workdir / "fast-vda.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(vda), str(raw)], check=True)
        assert ext4_file(raw, "/only-on-os-disk") == b"before\n"
        assert ext4_file(raw, "/written-during") == b"during\n"
        assert ext4_file(raw, "/after-switch") == b"local\n"
        raw.unlink()


def test_instant_restore_of_a_libvirt_vm_refuses_a_taken_domain_name(lab: Lab, tmp_path: Path) -> None:
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", lab.original, "--target-dir",
                      str(tmp_path / "x"), "--instant")  # fmt: skip
    assert f"libvirt already has a domain named '{lab.original}'" in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_a_lost_export_pauses_the_domain_and_its_restart_resumes_it_cancel_removes_the_copy(lab: Lab) -> None:
    """Killing the export mid-pull pauses the domain (I/O error, not the guest's error); the owner's restart
    resumes it. Ends with job cancel: the domain destroyed and undefined, the copy and the export gone."""
    name, target = f"vmvlost-{secrets.token_hex(3)}", lab.workdir / "lost"
    # slower than the other test: the pull must still be running when the test cancels it (a pull that completes
    # after a lost export can crash QEMU 7.2, docs/restore.md), and the guest's read must need the export
    cli = HostKeyCli(home=lab.cli.home)
    cli.extra_env.update({**lab.cli.extra_env, "VMVAULT_INSTANT_STREAM_SPEED": str(MiB)})
    with defined(lab, name) as copy:
        r = cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", name, "--target-dir", str(target), "--instant",
                        timeout=600)  # fmt: skip
        assert r.ok and r.json()["properties"]["status"] == "InProgress", str(r)
        job_id = copy.job_id = r.json()["name"]  # type: ignore[attr-defined]
        state = _job(lab.cli, job_id)["properties"]["extendedInfo"]["restore"]
        copy.export_pid = export_pid = int(state["exportPid"])  # type: ignore[attr-defined]
        assert copy.sh("cat /only-on-os-disk").stdout == "before\n"
        copy.sh("echo during > /written-during && sync")

        # the export dies mid-pull: the domain pauses (I/O error) on its next read of data not pulled yet
        os.kill(export_pid, signal.SIGKILL)
        agent = copy.agent_client()
        with agent.connect(timeout=30) as ga:  # not waited for: it blocks while the domain is paused
            dd = ga.guest_exec("/bin/sh", ["-c", "dd if=/dev/vda of=/dev/null bs=1M skip=64 count=32"])
        paused = [VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR]
        _wait("the domain to pause on the lost export", lambda: copy.dom().state() == paused)
        error = _wait(
            "the job to report the lost export", lambda: _job(lab.cli, job_id)["properties"]["errorDetails"], 10
        )
        assert error[0]["errorCode"] == "export_lost", error

        # the owner restarts the export: the domain goes on and the guest's read succeeds without an I/O error
        # (it may pause again a few times until QEMU's NBD client, which backs off up to 16 s, has reconnected)
        status = _wait("dd to finish", lambda: _exec_status(copy, dd), RETRY_S + 60, 1)
        assert status.get("exitcode") == 0, status
        assert "I/O error" not in _sh_eventually(copy, "dmesg").stdout
        assert _job(lab.cli, job_id)["properties"]["errorDetails"] == []
        copy.export_pid = new_pid = int(_job(lab.cli, job_id)["properties"]["extendedInfo"]["restore"]["exportPid"])  # type: ignore[attr-defined]

        assert _sh_eventually(copy, "cat /written-during").stdout == "during\n"

        # cancel: the domain destroyed and undefined, the copy, its definition and the export gone
        lab.cli.ok("job", "cancel", job_id)
        done = lab.cli.run("job", "wait", job_id, "--timeout", "120", timeout=200)
        assert done.json()["properties"]["status"] == "Cancelled", str(done)
        assert "destroyed and undefined" in done.json()["properties"]["errorDetails"][0]["errorString"]
        assert copy.virsh("dominfo", name, check=False).returncode != 0, "the cancelled copy is still defined"
        assert not pid_alive(new_pid)
        assert name not in [v["name"] for v in lab.cli.vms()]
        assert not list(target.glob("*.qcow2")) and not (target / f"{name}.xml").exists()
        assert not Path(state["exportSocket"]).parent.exists()
