"""Consistency of live backups, in Azure's words, on a real guest with qemu-guest-agent.

Pre/post scripts are configured inside the guest as in Azure's Linux framework
(/etc/vmvault/VMSnapshotScriptPluginConfig.json). A second agent port nobody serves stands for a
guest whose agent does not answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli, files_equal
from vm.live import (
    add_running_vm,
    backup,
    ext4_file,
    latest_point,
    protect_running,
    restore_raw,
    warning_codes,
    warnings,
)
from vm.machine import Disk, Guest, ext4_disk, read_live

MiB = 1 << 20
VM = "app"
CONFIG = "/etc/vmvault/VMSnapshotScriptPluginConfig.json"
PRE = "/etc/vmvault/pre.sh"
POST = "/etc/vmvault/post.sh"
FREEZE_LOG = "/run/freeze-hook.log"


@dataclass
class Lab:
    workdir: Path
    guest: Guest
    cli: Cli
    data: Disk

    def configure(self, *, pre: str, post: str = "echo post > /mnt/data0/post-marker; sync", **config: object) -> None:
        self.guest.write_file(PRE, f"#!/bin/sh\n{pre}\n".encode(), mode="700")
        self.guest.write_file(POST, f"#!/bin/sh\n{post}\n".encode(), mode="700")
        settings = {"pluginName": "ScriptRunner", "preScriptLocation": PRE, "postScriptLocation": POST,
                    "preScriptParams": ["alpha"], "postScriptParams": [], "timeoutInSeconds": 30,
                    "continueBackupOnFailure": True, "fsFreezeEnabled": True, **config}  # fmt: skip
        self.guest.write_file(CONFIG, json.dumps(settings).encode(), mode="600")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("consistency")
    data = ext4_disk(workdir, "data0", 256 * MiB)
    guest = Guest(workdir, [data])
    dead = guest.sockets / "dead.sock"  # an agent port no agent listens on
    guest.extra += ["-chardev", f"socket,path={dead},server=on,wait=off,id=dead0",
                    "-device", "virtserialport,chardev=dead0,name=org.qemu.guest_agent.1"]  # fmt: skip
    guest.start()
    try:
        # Record every freeze/thaw the agent's hook sees.
        guest.write_file("/etc/qemu/fsfreeze-hook.d/log", f'#!/bin/sh\necho "$1" >> {FREEZE_LOG}\n'.encode(), "755")
        cli = Cli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        yield Lab(workdir, guest, cli, data)
    finally:
        guest.close()


def _freezes(lab: Lab) -> int:
    out = lab.guest.sh(f"touch {FREEZE_LOG}; grep -c '^freeze' {FREEZE_LOG} || true").stdout.strip()
    return int(out or 0)


def test_scripts_and_freeze_make_an_app_consistent_point(lab: Lab, tmp_path: Path) -> None:
    lab.configure(pre='echo "pre $1" > /mnt/data0/pre-marker; sync')
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed", job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "AppConsistent", point
    disks = restore_raw(lab.cli, VM, point, tmp_path / "out")
    assert ext4_file(disks["data0"], "/pre-marker") == b"pre alpha\n", "the pre-script's marker is not in the point"
    assert ext4_file(disks["data0"], "/post-marker") is None, "the post-script ran before the snapshot"
    assert lab.guest.sh("cat /mnt/data0/post-marker").stdout == "post\n", "the post-script did not run"

    from vmvault.service.agents import agent_status
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    with context(load_settings(str(lab.cli.home))) as ctx:
        status = agent_status(ctx, VM)
    assert status["state"] == "Ready" and status["version"] and status["fsFreeze"] and status["guestExec"], status


def test_a_failing_pre_script_gives_a_file_system_consistent_point_with_a_warning(lab: Lab) -> None:
    lab.configure(pre="echo 'database is busy' >&2; exit 3")
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings", job
    assert "pre_script_failed" in warning_codes(job), job
    (failed,) = [w for w in warnings(job) if w["code"] == "pre_script_failed"]
    assert "exited with code 3" in failed["message"] and "database is busy" in failed["message"], failed
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "FileSystemConsistent"


def test_a_script_others_can_write_is_not_run(lab: Lab) -> None:
    lab.configure(pre="echo ran > /mnt/data0/unsafe-ran")
    lab.guest.sh(f"chmod 777 {PRE}")
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings", job
    (failed,) = [w for w in warnings(job) if w["code"] == "pre_script_failed"]
    assert "writable by group or others" in failed["message"], failed
    assert lab.guest.sh("test -e /mnt/data0/unsafe-ran", check=False).exit_code != 0
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "FileSystemConsistent"


def test_a_failing_pre_script_fails_the_job_when_told_not_to_continue(lab: Lab) -> None:
    lab.configure(pre="echo 'not now'; exit 7", continueBackupOnFailure=False)
    points = lab.cli.point_ids(VM)
    freezes = _freezes(lab)
    r = lab.cli.run(*lab.cli.backup_args(VM), timeout=600)
    assert not r.ok and "Traceback" not in r.output, str(r)
    job = r.json()
    (error,) = job["properties"]["errorDetails"]
    assert job["properties"]["status"] == "Failed" and error["errorCode"] == "pre_script_failed", job
    assert "exited with code 7" in error["errorString"] and "not now" in error["errorString"], job
    assert lab.cli.point_ids(VM) == points, "a failed job created a recovery point"
    assert _freezes(lab) == freezes, "the guest was frozen although the job failed before the snapshot"
    assert lab.guest.freeze_status() == "thawed"
    lab.guest.sh(f"rm -f {CONFIG}")


def test_a_vm_without_agent_gives_crash_consistent_points(lab: Lab) -> None:
    add_running_vm(lab.cli, "noagent", lab.guest.vmvault_qmp)
    assert lab.cli.protection_enable("noagent", "v1").ok
    job = backup(lab.cli, "noagent")
    assert "agent_not_configured" in warning_codes(job), job
    assert latest_point(lab.cli, "noagent")["properties"]["recoveryPointType"] == "CrashConsistent"

    add_running_vm(lab.cli, "deadagent", lab.guest.vmvault_qmp, lab.guest.sockets / "dead.sock")
    assert lab.cli.protection_enable("deadagent", "v1").ok
    job = backup(lab.cli, "deadagent")
    assert "agent_not_reachable" in warning_codes(job), job
    assert latest_point(lab.cli, "deadagent")["properties"]["recoveryPointType"] == "CrashConsistent"


def test_a_stopped_vm_is_read_offline_as_crash_consistent(lab: Lab, tmp_path: Path) -> None:
    lab.guest.quit()
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed", job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "CrashConsistent", point
    disks = restore_raw(lab.cli, VM, point, tmp_path / "out")
    live = read_live(lab.data, tmp_path / "data0.raw")
    assert files_equal(disks["data0"], live), "the offline point differs from the stopped VM's disk"
