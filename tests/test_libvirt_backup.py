"""libvirt-managed domains: discover and add, quiesced pull backups, incrementals through checkpoints,
`virsh destroy` (stale checkpoints dropped, a new chain), on a real libvirt guest (tests/vm/libvirtd.py).

One domain for the module; its finalizer destroys and undefines it with its checkpoint metadata and
asserts nothing is left (domain, checkpoint metadata, scratch files, backup job).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli, far_time_zone, files_equal, rp_id
from vm.libvirtd import Domain, libvirtd  # noqa: F401  (the session fixture)
from vm.live import (
    backup,
    ext4_file,
    fell_back,
    latest_point,
    restore_raw,
    wait_for_line,
    warning_codes,
    warnings,
)
from vm.machine import Disk, ext4_disk

MiB = 1 << 20
VM = "lv1"


@dataclass
class Lab:
    workdir: Path
    domain: Domain
    cli: Cli
    data: Disk

    def scratch_files(self) -> list[Path]:
        root = self.cli.home / "scratch"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def assert_clean(self) -> None:
        """No backup job, no scratch file, and only the latest point's checkpoint."""
        assert self.domain.job_type() == "None", self.domain.virsh("domjobinfo", self.domain.name).stdout
        assert not self.scratch_files(), self.scratch_files()
        assert len(self.domain.checkpoints()) <= 1, self.domain.checkpoints()

    def definition(self, point: dict[str, Any]) -> dict[str, Any]:
        """The point's manifest vm_definition."""
        from vmvault.catalog import repos
        from vmvault.service.context import context
        from vmvault.service.vaultio import opened_vault
        from vmvault.settings import load_settings

        with context(load_settings(str(self.cli.home))) as ctx:
            with ctx.catalog.read() as s:
                (row,) = repos.list_vaults(s)
            with opened_vault(ctx, row) as vault:
                return dict(vault.read_manifest(rp_id(point)).vm_definition)

    def live_image(self, out: Path) -> Path:
        """The disk as it is now (the domain paused while it is read, when running)."""
        dom = self.domain.dom()
        running = dom.isActive()
        if running:
            dom.suspend()
        try:
            subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(self.data.path), str(out)],
                           check=True)  # fmt: skip
        finally:
            if running:
                dom.resume()
        return out


@pytest.fixture(scope="module")
def lab(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("libvirt")
    data = ext4_disk(workdir, "data0", 512 * MiB)
    domain = Domain(f"vmvtest-{secrets.token_hex(4)}", workdir, [data])
    domain.define()
    try:
        domain.start()
        yield Lab(workdir, domain, HostKeyCli(home=workdir / "home"), data)
    finally:
        domain.close()


def test_discover_then_add(lab: Lab) -> None:
    names = [d["name"] for d in lab.cli.ok("vm", "discover").json()]
    assert lab.domain.name in names
    vm = lab.cli.ok("vm", "add", VM, "--libvirt", lab.domain.name).json()
    assert [d["name"] for d in vm["disks"]] == ["vda"], vm
    assert lab.domain.name not in [d["name"] for d in lab.cli.ok("vm", "discover").json()]
    # DefaultPolicy's slot hours away from this module's run (minutes under TCG): run across 20:30 UTC,
    # the serve of test_serve_start_reconciles_what_a_killed_backup_left queued a scheduled backup of
    # the domain beside the reconciliation it checks (a checkpoint and scratch files more).
    lab.cli.vault_create("v1", lab.workdir / "vault", time_zone=far_time_zone())
    r = lab.cli.protection_enable(VM, "v1")
    assert r.ok, str(r)


def test_a_quiesced_live_backup_holds_what_was_written_before_and_not_after(lab: Lab, tmp_path: Path) -> None:
    lab.domain.sh("echo before > /mnt/data0/before && sync")
    held = HostKeyCli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "6"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=120)  # backupBegin done, guest thawed
        lab.domain.sh("echo after > /mnt/data0/after && sync")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "FileSystemConsistent", (point, out)
    disks = restore_raw(lab.cli, VM, point, tmp_path / "out")
    assert ext4_file(disks["vda"], "/before") == b"before\n"
    assert ext4_file(disks["vda"], "/after") is None, "a file written after the instant is in the point"
    lab.assert_clean()
    definition = lab.definition(point)
    assert f"<name>{lab.domain.name}</name>" in definition["domainXml"], definition
    assert lab.domain.checkpoints() == [definition["checkpoint"]]


def test_with_a_pre_script_the_point_is_app_consistent(lab: Lab) -> None:
    config = (b'{"pluginName": "ScriptRunner", "preScriptLocation": "/etc/vmvault/pre.sh", '
              b'"postScriptLocation": "/etc/vmvault/post.sh", "timeoutInSeconds": 30, '
              b'"continueBackupOnFailure": true, "fsFreezeEnabled": true}')  # fmt: skip
    lab.domain.write_file("/etc/vmvault/pre.sh", b"#!/bin/sh\necho pre >> /tmp/scripts.log\n", "700")
    lab.domain.write_file("/etc/vmvault/post.sh", b"#!/bin/sh\necho post >> /tmp/scripts.log\n", "700")
    lab.domain.write_file("/etc/vmvault/VMSnapshotScriptPluginConfig.json", config, "600")
    try:
        job = backup(lab.cli, VM)
        assert job["properties"]["status"] == "Completed", job
        assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "AppConsistent"
        assert lab.domain.sh("cat /tmp/scripts.log").stdout == "pre\npost\n"
    finally:
        lab.domain.sh("rm -rf /etc/vmvault /tmp/scripts.log")
    lab.assert_clean()


def test_an_incremental_reads_only_what_the_guest_wrote(lab: Lab) -> None:
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/big bs=1M count=32 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert 32 * MiB <= job["properties"]["extendedInfo"]["bytesRead"] <= 40 * MiB, job["properties"]["extendedInfo"]
    lab.assert_clean()


def test_a_backup_begin_past_the_frozen_window_is_undone_and_retried_once(lab: Lab, tmp_path: Path) -> None:
    # testhooks.py: the first attempt holds the guest frozen 6 s past backupBegin, twice the 3 s window.
    lab.domain.sh("echo between > /mnt/data0/between && sync")
    env = {"VMVAULT_FROZEN_WINDOW": "3", "VMVAULT_TEST_SLOW_SNAPSHOT": "6:1"}
    job = backup(HostKeyCli(home=lab.cli.home, extra_env=env), VM)
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "FileSystemConsistent", point
    shown = lab.cli.ok("job", "show", str(job["name"])).json()
    assert shown["properties"]["extendedInfo"]["quiesce"]["snapshotAttempts"] == 2, shown
    with lab.domain.agent_client().connect(timeout=30) as agent:
        assert agent.guest_fsfreeze_status() == "thawed"
    lab.assert_clean()  # the undone attempt's backup job, scratch files and checkpoint are gone
    # The undone checkpoint was merged back: the retried incremental holds what was written before it.
    assert ext4_file(restore_raw(lab.cli, VM, point, tmp_path / "out")["vda"], "/between") == b"between\n"


def test_a_killed_backup_leaves_a_job_that_the_next_backup_reconciles(lab: Lab) -> None:
    held = HostKeyCli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "60"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=120)
        assert lab.domain.job_type() != "None" and lab.scratch_files()
    finally:
        proc.kill()  # SIGKILL: no clean-up at all
        proc.communicate(timeout=60)
    job = backup(lab.cli, VM)
    assert "leftovers_reconciled" in warning_codes(job), job
    assert not fell_back(job), job
    lab.assert_clean()


def test_serve_start_reconciles_what_a_killed_backup_left(lab: Lab) -> None:
    kept = lab.definition(latest_point(lab.cli, VM))["checkpoint"]
    held = HostKeyCli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "60"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=120)
        assert lab.domain.job_type() != "None" and lab.scratch_files()
        assert len(lab.domain.checkpoints()) == 2  # the latest point's and the killed run's
    finally:
        proc.kill()  # SIGKILL: no clean-up at all
        proc.communicate(timeout=60)
    serve = lab.cli.popen("serve", "--listen", "none", json_output=False)
    try:
        deadline = time.monotonic() + 120
        while lab.domain.checkpoints() != [kept] and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # reconciliation's last step: the killed run's checkpoint deleted
    finally:
        serve.send_signal(signal.SIGTERM)
        _out, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err
    assert "reconciled: deleted failed checkpoint" in err and "reconciled: aborted the backup job" in err, err
    assert lab.domain.job_type() == "None", lab.domain.virsh("domjobinfo", lab.domain.name).stdout
    assert not lab.scratch_files(), lab.scratch_files()
    assert lab.domain.checkpoints() == [kept]
    job = backup(lab.cli, VM)  # an incremental from the kept checkpoint, nothing left to reconcile
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert "leftovers_reconciled" not in warning_codes(job), job
    lab.assert_clean()


def test_vm_list_shows_power_state_disks_agent_and_protection(lab: Lab) -> None:
    (vm,) = [v for v in lab.cli.ok("vm", "list").json() if v["name"] == VM]
    assert vm["powerState"] == "running" and vm["agent"] == "answers", vm
    assert [d["name"] for d in vm["disks"]] == ["vda"]
    assert vm["protection"] == "protected in vault v1", vm
    table = lab.cli.ok("vm", "list", json_output=False).stdout
    (line,) = [x for x in table.splitlines() if x.startswith(f"{VM} ")]
    assert line.split()[:5] == [VM, "libvirt", "running", "vda", "answers"], table


def test_without_an_agent_channel_item_show_gives_the_fix_and_enable_agent_adds_it(lab: Lab) -> None:
    disk = ext4_disk(lab.workdir, "noagent0", 32 * MiB)
    other = Domain(f"vmvnoag-{secrets.token_hex(4)}", lab.workdir, [disk], agent=False).define()
    try:
        lab.cli.ok("vm", "add", "noagent", "--libvirt", other.name)
        assert lab.cli.protection_enable("noagent", "v1").ok
        advice = lab.cli.ok("item", "show", "noagent").json()["properties"]["guestAgent"]
        assert "no org.qemu.guest_agent.0 channel" in advice and "vmvault vm enable-agent noagent" in advice, advice
        assert "effective at next boot" in advice and "CrashConsistent" in advice, advice
        assert lab.cli.ok("vm", "enable-agent", "noagent").json()["added"] is True
        assert lab.cli.ok("vm", "enable-agent", "noagent").json()["added"] is False  # idempotent
        xml = other.virsh("dumpxml", "--inactive", other.name).stdout
        assert xml.count("org.qemu.guest_agent.0") == 1, xml
        shown = lab.cli.ok("item", "show", "noagent").json()["properties"]
        assert shown["guestAgent"] == "org.qemu.guest_agent.0 channel present"
        other.agent = True
        other.start()  # the channel works at the next boot: the agent answers through libvirt
        (vm,) = [v for v in lab.cli.ok("vm", "list").json() if v["name"] == "noagent"]
        assert vm["powerState"] == "running" and vm["agent"] == "answers", vm
        r = lab.cli.fails("vm", "enable-agent", "nosuchvm")
        assert "nosuchvm" in r.output
    finally:
        other.close()


def test_a_cancelled_backup_deletes_its_checkpoint(lab: Lab) -> None:
    before, points = lab.domain.checkpoints(), len(lab.cli.points(VM))
    held = HostKeyCli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "4"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=120)
        assert len(lab.domain.checkpoints()) == len(before) + 1  # the run's own checkpoint
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the job is cancelled once the read starts
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    statuses = [j["properties"]["status"] for j in lab.cli.jobs() if j["properties"]["entityFriendlyName"] == VM]
    assert statuses.count("Cancelled") == 1, (statuses, out, err)
    assert len(lab.cli.points(VM)) == points, "a cancelled backup left a point"
    assert lab.domain.checkpoints() == before
    lab.assert_clean()


def test_a_checkpoint_left_behind_by_a_migration_gives_a_hash_compared_point_and_a_new_chain(
    lab: Lab, tmp_path: Path
) -> None:
    """What a live migration leaves on the new host: the domain runs, the latest point's checkpoint is
    not there (deleted here, on the same host). The backup says why and that a new chain starts,
    stores only the changes, restores byte-identical; the next one is incremental again."""
    (old,) = lab.domain.checkpoints()
    lab.domain.virsh("checkpoint-delete", lab.domain.name, old)
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/moved bs=64k count=16 conv=fsync 2>/dev/null")
    lab.domain.sh("sync; mount -o remount,ro /mnt/data0")  # nothing writes after the instant
    try:
        job = backup(lab.cli, VM)
        (why,) = [w["message"] for w in warnings(job) if w["code"] == "cbt_fallback"]
        assert f"checkpoint {old} of the latest point is not on this host" in why and "live-migrated" in why, why
        assert "a new chain starts" in why, why
        info = job["properties"]["extendedInfo"]
        assert info["bytesWritten"] <= 4 * MiB, info  # read in full, but only the changed chunks stored
        point = latest_point(lab.cli, VM)
        (new,) = lab.domain.checkpoints()
        assert new != old and lab.definition(point)["checkpoint"] == new
        restored = restore_raw(lab.cli, VM, point, tmp_path / "out")
        assert files_equal(restored["vda"], lab.live_image(tmp_path / "live.raw")), "the point differs"
    finally:
        lab.domain.sh("mount -o remount,rw /mnt/data0")
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/after bs=64k count=16 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)
    assert not fell_back(job) and job["properties"]["extendedInfo"]["bytesRead"] <= 12 * MiB, job
    lab.assert_clean()


def test_after_virsh_destroy_a_crash_consistent_point_then_a_new_chain(lab: Lab, tmp_path: Path) -> None:
    before = lab.domain.checkpoints()
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/lost bs=64k count=16 conv=fsync 2>/dev/null")
    lab.domain.virsh("destroy", lab.domain.name)

    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings" and fell_back(job), job
    assert "vm_stopped" in warning_codes(job), job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "CrashConsistent", point
    assert lab.domain.checkpoints() == [], "stale checkpoints were not dropped"
    assert lab.definition(point)["checkpoint"] is None
    restored = restore_raw(lab.cli, VM, point, tmp_path / "off")
    assert files_equal(restored["vda"], lab.live_image(tmp_path / "off.raw")), "the offline point differs"

    lab.domain.start()
    lab.domain.sh("sync; mount -o remount,ro /mnt/data0")  # nothing writes after the instant
    try:
        job = backup(lab.cli, VM)
        assert job["properties"]["status"] in ("Completed", "CompletedWithWarnings"), job
        now = lab.domain.checkpoints()
        assert len(now) == 1 and now[0] not in before, (before, now)  # a new chain under a fresh name
        point = latest_point(lab.cli, VM)
        assert point["properties"]["recoveryPointType"] == "FileSystemConsistent", point
        restored = restore_raw(lab.cli, VM, point, tmp_path / "live")
        assert files_equal(restored["vda"], lab.live_image(tmp_path / "live.raw")), "the live point differs"
    finally:
        lab.domain.sh("mount -o remount,rw /mnt/data0")
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/next bs=1M count=4 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)  # the new chain works: an incremental again
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 12 * MiB, job["properties"]["extendedInfo"]
    assert lab.domain.checkpoints() == [lab.definition(latest_point(lab.cli, VM))["checkpoint"]]
    lab.assert_clean()


def test_after_a_clean_shutdown_the_offline_point_keeps_the_chain(lab: Lab, tmp_path: Path) -> None:
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/clean bs=1M count=2 conv=fsync 2>/dev/null")
    (kept,) = lab.domain.checkpoints()
    lab.domain.virsh("shutdown", lab.domain.name)
    _wait_off(lab)
    job = backup(lab.cli, VM)
    assert not fell_back(job) and "vm_stopped" in warning_codes(job), job
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "CrashConsistent"
    assert lab.domain.checkpoints() == [kept]
    restored = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "off")
    assert files_equal(restored["vda"], lab.live_image(tmp_path / "off.raw")), "the offline point differs"

    lab.domain.start()
    lab.domain.sh("dd if=/dev/urandom of=/mnt/data0/later bs=1M count=4 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)  # an incremental from the checkpoint the offline point carried
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 12 * MiB, job["properties"]["extendedInfo"]
    lab.assert_clean()


def test_after_qemu_is_killed_the_live_backup_starts_a_new_chain(lab: Lab, tmp_path: Path) -> None:
    before = lab.domain.checkpoints()
    pid = int(Path(f"/run/libvirt/qemu/{lab.domain.name}.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)  # a host crash, as far as QEMU's bitmaps go
    _wait_off(lab)
    lab.domain.start()
    lab.domain.sh("sync; mount -o remount,ro /mnt/data0")
    try:
        job = backup(lab.cli, VM)
        assert job["properties"]["status"] == "CompletedWithWarnings" and fell_back(job), job
        now = lab.domain.checkpoints()
        assert len(now) == 1 and now[0] not in before, (before, now)
        restored = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "live")
        assert files_equal(restored["vda"], lab.live_image(tmp_path / "live.raw")), "the live point differs"
    finally:
        lab.domain.sh("mount -o remount,rw /mnt/data0")
    lab.assert_clean()


def _wait_off(lab: Lab, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while lab.domain.dom().isActive():
        assert time.monotonic() < deadline, f"domain {lab.domain.name} did not stop"
        time.sleep(0.2)
