"""A libvirt domain on a raw disk: no checkpoints possible, full reads with hash comparison, said in the job."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import HostKeyCli, files_equal  # HostKeyCli: not about passphrases (no scrypt)
from vm.libvirtd import Domain, libvirtd  # noqa: F401  (the session fixture)
from vm.live import backup, latest_point, restore_raw, warning_codes
from vm.machine import ext4_disk

MiB = 1 << 20
VM = "lvraw"


@pytest.fixture(scope="module")
def domain(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("libvirt-raw")
    disk = ext4_disk(workdir, "data0", 128 * MiB, fmt="raw")
    dom = Domain(f"vmvraw-{secrets.token_hex(4)}", workdir, [disk]).define()
    try:
        dom.start()
        yield dom
    finally:
        dom.close()


def test_a_raw_disk_is_read_whole_and_compared_by_hash(domain: Domain, tmp_path: Path) -> None:
    cli = HostKeyCli(home=domain.workdir / "home")
    cli.ok("vm", "add", VM, "--libvirt", domain.name)
    cli.vault_create("v1", domain.workdir / "vault")
    assert cli.protection_enable(VM, "v1").ok
    job = backup(cli, VM)
    assert "cbt_unavailable" in warning_codes(job), job
    assert domain.checkpoints() == [], "a raw disk got a checkpoint"

    domain.sh("dd if=/dev/urandom of=/mnt/data0/f bs=1M count=3 conv=fsync 2>/dev/null")
    domain.sh("sync; mount -o remount,ro /mnt/data0")
    try:
        job = backup(cli, VM)
        assert job["properties"]["status"] == "CompletedWithWarnings" and "cbt_unavailable" in warning_codes(job), job
        assert latest_point(cli, VM)["properties"]["recoveryPointType"] == "FileSystemConsistent"
        restored = restore_raw(cli, VM, latest_point(cli, VM), tmp_path / "out")
        live = tmp_path / "live.raw"
        dom = domain.dom()
        dom.suspend()
        try:
            path = str(domain.disks[0].path)
            subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", path, str(live)], check=True)
        finally:
            dom.resume()
        assert files_equal(restored["vda"], live), "the point differs from the disk"
    finally:
        domain.sh("mount -o remount,rw /mnt/data0")
    assert domain.job_type() == "None"
    assert not list((cli.home / "scratch").rglob("*.qcow2")) if (cli.home / "scratch").exists() else True
