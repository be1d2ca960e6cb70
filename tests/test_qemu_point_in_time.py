"""A running guest backed up live: one instant for all disks, changed blocks only, never left frozen.

One real guest (tests/vm) for the module: a 1 GiB ext4 data disk and two small raw-written counter
disks, its guest agent, and vmvault's own QMP socket.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli
from vm.live import (
    backup,
    ext4_file,
    fell_back,
    latest_point,
    protect_running,
    restore_raw,
    wait_for_line,
    warning_codes,
)
from vm.machine import Disk, Guest, blank_disk, ext4_disk, read_live

pytestmark = pytest.mark.xdist_group("realtime")  # real-time budgets: never beside another of them (docs/testing.md)

MiB = 1 << 20
VM = "live"
COUNTER = "printf '%016d' $k | dd of=$D bs=16 count=1 conv=notrunc,fsync 2>/dev/null"


@dataclass
class Lab:
    workdir: Path
    guest: Guest
    cli: Cli
    data: Disk
    ctr_a: Disk
    ctr_b: Disk


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("pit")
    data = ext4_disk(workdir, "data0", 1024 * MiB)
    ctr_a, ctr_b = blank_disk(workdir, "ctra", 16 * MiB), blank_disk(workdir, "ctrb", 16 * MiB)
    guest = Guest(workdir, [data, ctr_a, ctr_b]).start()
    try:
        cli = Cli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        yield Lab(workdir, guest, cli, data, ctr_a, ctr_b)
    finally:
        guest.close()


def _device(name: str) -> str:
    """Shell: the guest's /dev/vdX whose serial is name."""
    return f"/dev/$(basename $(dirname $(grep -l '^{name}$' /sys/block/vd*/serial)))"


def test_incremental_reads_only_what_the_guest_wrote(lab: Lab) -> None:
    first = backup(lab.cli, VM)
    assert first["properties"]["status"] == "Completed", first
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "FileSystemConsistent"

    lab.guest.sh("dd if=/dev/urandom of=/mnt/data0/big bs=1M count=32 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 40 * MiB, job["properties"]["extendedInfo"]
    assert job["properties"]["extendedInfo"]["bytesRead"] >= 32 * MiB, job["properties"]["extendedInfo"]


def test_a_file_written_after_the_instant_is_absent(lab: Lab, tmp_path: Path) -> None:
    lab.guest.sh("echo before > /mnt/data0/before && sync")
    held = Cli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "8"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=120)  # snapshot taken, guest thawed
        lab.guest.sh("echo after > /mnt/data0/after && sync")
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    disks = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "out")
    assert ext4_file(disks["data0"], "/before") == b"before\n"
    assert ext4_file(disks["data0"], "/after") is None, "a file written after the instant is in the point"
    assert lab.guest.sh("cat /mnt/data0/after").stdout == "after\n"


def test_two_disks_are_read_at_one_instant(lab: Lab, tmp_path: Path) -> None:
    """A guest loop writes k to disk A, then k to disk B (each synced): in the point B <= A <= B + 1."""
    loop = (f"A={_device('ctra')}; B={_device('ctrb')}; k=0; rm -f /tmp/stop; "
            f"while [ ! -e /tmp/stop ]; do k=$((k+1)); D=$A; {COUNTER}; D=$B; {COUNTER}; done")  # fmt: skip
    agent_pid = _start_in_guest(lab.guest, loop)
    try:
        time.sleep(2)
        held = Cli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "3"})
        job = backup(held, VM)
    finally:
        lab.guest.sh("touch /tmp/stop")
    assert agent_pid > 0
    disks = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "out")
    a, b = _counter(disks["ctra"]), _counter(disks["ctrb"])
    assert b >= 1, f"the loop never ran before the backup (A={a}, B={b}): {job}"
    assert b <= a <= b + 1, f"disks A and B are not from one instant: A={a}, B={b}"
    time.sleep(1)
    live_a = _counter(read_live(lab.ctr_a, tmp_path / "ctra.live"))
    assert live_a > a, f"the guest kept writing after the instant, yet the point has A={a} and the disk {live_a}"


def test_the_point_is_the_disk_at_the_instant_byte_for_byte(lab: Lab, tmp_path: Path) -> None:
    # ext4 rewrites its superblock when thawed (needs_recovery, write time): keep the file system
    # read-only so that nothing at all writes after the instant, then compare every byte.
    lab.guest.sh("sync; mount -o remount,ro /mnt/data0")
    try:
        backup(lab.cli, VM)
        lab.guest.qmp("stop")
        try:
            live = {d.name: read_live(d, tmp_path / f"{d.name}.live") for d in (lab.data, lab.ctr_a, lab.ctr_b)}
        finally:
            lab.guest.qmp("cont")
    finally:
        lab.guest.sh("mount -o remount,rw /mnt/data0")
    restored = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "out")
    for name, path in live.items():
        r = subprocess.run(["cmp", str(restored[name]), str(path)], capture_output=True, text=True)
        assert r.returncode == 0, f"disk {name}: the point differs from the disk: {r.stdout}{r.stderr}"


def test_kill_9_between_freeze_and_thaw_thaws_the_guest_within_15_s(lab: Lab, tmp_path: Path) -> None:
    held = Cli(home=lab.cli.home, extra_env={"VMVAULT_TEST_HOLD_FROZEN": "120"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_FROZEN", timeout=120)
        assert lab.guest.freeze_status() == "frozen"
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    while lab.guest.freeze_status() != "thawed":
        assert time.monotonic() - killed < 15, "the guest is still frozen 15 s after vmvault was killed"
        time.sleep(0.2)
    lab.guest.sh("echo alive > /mnt/data0/after-kill && sync", timeout=max(1, 15 - (time.monotonic() - killed)))
    assert time.monotonic() - killed < 15, "the guest could not write within 15 s of the kill"

    # The next backup clears what the killed one left in QEMU, keeps its chain, and is correct.
    job = backup(lab.cli, VM)
    assert "leftovers_reconciled" in warning_codes(job), job
    assert not fell_back(job), job
    nodes = lab.guest.qmp("query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vmv-")]
    assert not lab.guest.qmp("query-block-jobs") and not lab.guest.qmp("query-block-exports")
    disks = restore_raw(lab.cli, VM, latest_point(lab.cli, VM), tmp_path / "out")
    assert ext4_file(disks["data0"], "/after-kill") == b"alive\n"


def _start_in_guest(guest: Guest, script: str) -> int:
    from vmvault.connectors.guest_agent import GuestAgent

    with GuestAgent(guest.agent_socket).connect(timeout=30) as agent:
        return agent.guest_exec("/bin/sh", ["-c", script])


def _counter(image: Path) -> int:
    with open(image, "rb") as f:
        raw = f.read(16)
    return int(raw) if raw.strip(b"\0") else 0
