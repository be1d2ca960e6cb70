"""A disk held open by a running QEMU is refused: it must be backed up through QMP or libvirt.

The "running VM" is a real qemu-system-x86_64, started paused (-S: no guest code runs) with the
image attached as a virtio disk, so QEMU holds its usual image locks exactly as for a live guest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import Cli, copy_image, protect, to_qcow2, tree_digest, wait_for

MESSAGE = "VM is running: add it with --libvirt or --qmp"
QEMU = shutil.which("qemu-system-x86_64")


def _locked(path: Path) -> bool:
    dev_ino = os.stat(path)
    key = f"{os.major(dev_ino.st_dev):02x}:{os.minor(dev_ino.st_dev):02x}:{dev_ino.st_ino}"
    with open("/proc/locks") as f:
        return any(key in line for line in f)


@contextmanager
def running_qemu(disk: Path, fmt: str, workdir: Path) -> Iterator[None]:
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is missing: run 'make deps' (Debian package qemu-system-x86)")
    pidfile = workdir / "qemu.pid"
    subprocess.run(
        [QEMU, "-M", "q35", "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "64",
         "-drive", f"file={disk},format={fmt},if=virtio", "-pidfile", str(pidfile), "-daemonize"],
        check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )
    pid = int(pidfile.read_text())
    try:
        wait_for(lambda: _locked(disk), timeout=10, what=f"QEMU to lock {disk}")
        yield
    finally:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


@pytest.fixture(params=["raw", "qcow2"])
def disk(request: pytest.FixtureRequest, small_image: Path, tmp_path: Path) -> tuple[Path, str]:
    fmt: str = request.param
    raw = copy_image(small_image, tmp_path / "disk.raw")
    if fmt == "raw":
        return raw, fmt
    return to_qcow2(raw, tmp_path / "disk.qcow2"), fmt


def test_vm_add_refuses_a_disk_in_use(disk: tuple[Path, str], cli: Cli, tmp_path: Path) -> None:
    path, fmt = disk
    with running_qemu(path, fmt, tmp_path):
        r = cli.vm_add("live", path)
        assert not r.ok, f"vm add accepted a disk held by a running QEMU:\n{r}"
        assert "Traceback" not in r.output, str(r)
        assert MESSAGE in r.stderr, str(r)
    assert cli.vms() == []


def test_backup_refuses_a_disk_in_use(disk: tuple[Path, str], tmp_path: Path) -> None:
    path, fmt = disk
    prot = protect(Cli(home=tmp_path / "home"), path, tmp_path / "vault")
    before = tree_digest(prot.storage)
    with running_qemu(path, fmt, tmp_path):
        r = prot.cli.backup_now(prot.vm)
        assert not r.ok, f"backup read a disk held by a running QEMU:\n{r}"
        assert "Traceback" not in r.output, str(r)
        assert MESSAGE in r.stderr, str(r)
    assert prot.cli.point_ids(prot.vm) == []
    assert tree_digest(prot.storage) == before, "a refused backup changed vault files"
    # Once the VM is stopped the same disk backs up.
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
