"""When changed-block tracking cannot be trusted, the backup reads everything, says so, and is right.

A real guest whose QEMU is killed, then whose image is changed while it is off without the bitmap
seeing it. Before each compared backup the guest's file system is made read-only, so that nothing
writes after the instant (ext4 rewrites its superblock when thawed) and the point must equal the disk.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli, files_equal
from vm.live import backup, fell_back, latest_point, protect_running, restore_raw, warnings
from vm.machine import Disk, Guest, ext4_disk, read_live

MiB = 1 << 20
VM = "crashy"
CHUNK = 64 * 1024


@dataclass
class Lab:
    workdir: Path
    guest: Guest
    cli: Cli
    data: Disk

    def restart(self) -> None:
        self.guest.start()

    def assert_point_is_the_disk(self, tmp_path: Path) -> None:
        """Pause the guest, read its disk as it is, and compare with the latest point restored."""
        self.guest.qmp("stop")
        try:
            live = read_live(self.data, tmp_path / "live.raw")
        finally:
            self.guest.qmp("cont")
        restored = restore_raw(self.cli, VM, latest_point(self.cli, VM), tmp_path / "out")
        assert files_equal(restored["data0"], live), "the point differs from the disk"

    def read_only(self) -> None:
        self.guest.sh("sync; mount -o remount,ro /mnt/data0")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("crash")
    data = ext4_disk(workdir, "data0", 256 * MiB)
    guest = Guest(workdir, [data]).start()
    try:
        cli = Cli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        yield Lab(workdir, guest, cli, data)
    finally:
        guest.close()


def test_after_kill_9_of_qemu_the_next_backup_falls_back_and_says_so(lab: Lab, tmp_path: Path) -> None:
    backup(lab.cli, VM)
    lab.guest.sh("dd if=/dev/urandom of=/mnt/data0/one bs=64k count=16 conv=fsync 2>/dev/null")
    job = backup(lab.cli, VM)
    assert not fell_back(job), job

    lab.guest.kill9()
    lab.restart()
    lab.guest.sh("dd if=/dev/urandom of=/mnt/data0/two bs=64k count=16 conv=fsync 2>/dev/null")
    lab.read_only()
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings" and fell_back(job), job
    (why,) = [w["message"] for w in warnings(job) if w["code"] == "cbt_fallback"]
    assert "QEMU was restarted" in why and "reading all data and comparing hashes" in why, why
    lab.assert_point_is_the_disk(tmp_path)

    # A new chain: the next backup reads changed blocks again.
    lab.guest.sh("mount -o remount,rw /mnt/data0")
    job = backup(lab.cli, VM)
    assert not fell_back(job), job


def test_changes_behind_the_bitmaps_back_are_caught_by_the_sample_check(lab: Lab, tmp_path: Path) -> None:
    backup(lab.cli, VM)
    lab.guest.quit()  # a clean stop: QEMU stores the persistent bitmap in the qcow2
    (bitmap,) = [b for b in _bitmaps(lab.data.path) if b.startswith("vmv-")]
    # Another tool writes 10 % of the disk's chunks while the bitmap is disabled: the bitmap still
    # calls them clean. (qemu-io alone would be seen: it loads and updates persistent bitmaps.)
    # The writes land in block group 1's free blocks, past its superblock backup.
    _qemu_img("bitmap", "--disable", str(lab.data.path), bitmap)
    chunks = (256 * MiB // CHUNK) // 10 + 1
    start = 130 * MiB
    commands = [c for i in range(chunks) for c in ("-c", f"write -P {0x40 + i % 64} {start + i * CHUNK} {CHUNK}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(lab.data.path)], check=True, capture_output=True)
    _qemu_img("bitmap", "--enable", str(lab.data.path), bitmap)

    lab.restart()
    lab.read_only()
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings" and fell_back(job), job
    (why,) = [w["message"] for w in warnings(job) if w["code"] == "cbt_fallback"]
    assert "changed although the dirty bitmap calls it clean" in why, why
    lab.assert_point_is_the_disk(tmp_path)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _bitmaps(image: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], check=True, capture_output=True)
    info = json.loads(out.stdout)
    return [b["name"] for b in info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]
