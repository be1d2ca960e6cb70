"""restore replace-disks on a real two-disk guest (tests/vm): all or nothing, only while stopped."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli, HostKeyCli, rp_id  # HostKeyCli: not about passphrases (no scrypt)
from vm.live import backup, latest_point, protect_running
from vm.machine import Guest, ext4_disk

MiB = 1 << 20
VM = "twodisk"


@dataclass
class Lab:
    workdir: Path
    guest: Guest
    cli: Cli
    rp: str


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("rrep")
    disks = [ext4_disk(workdir, "data0", 32 * MiB), ext4_disk(workdir, "data1", 32 * MiB)]
    guest = Guest(workdir, disks).start()
    try:
        cli = HostKeyCli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        guest.sh("echo a > /mnt/data0/a && echo b > /mnt/data1/b && sync")
        backup(cli, VM)
        guest.sh("echo after0 > /mnt/data0/after && echo after1 > /mnt/data1/after && sync")
        yield Lab(workdir, guest, cli, rp_id(latest_point(cli, VM)))
    finally:
        guest.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(lab: Lab) -> list[str]:
    return sorted(p.name for p in lab.workdir.iterdir() if ".vmvault-" in p.name)


def _bitmaps(path: Path) -> list[str]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    data = (json.loads(out).get("format-specific") or {}).get("data") or {}
    return [str(b["name"]) for b in data.get("bitmaps") or []]


def test_refused_while_the_vm_runs(lab: Lab) -> None:
    r = lab.cli.fails("restore", "replace-disks", VM, "--rp", lab.rp)
    assert "running" in r.output
    assert lab.guest.sh("cat /mnt/data0/after").stdout == "after0\n"
    assert _leftovers(lab) == []


def test_a_failure_after_the_first_swap_puts_every_original_back(lab: Lab) -> None:
    lab.guest.quit()
    originals = [_digest(d.path) for d in lab.guest.disks]
    failing = HostKeyCli(home=lab.cli.home, extra_env={"VMVAULT_TEST_FAIL_AFTER_SWAP": "1"})
    r = failing.fails("restore", "replace-disks", VM, "--rp", lab.rp)
    assert "injected failure after the first swap" in r.output
    assert [_digest(d.path) for d in lab.guest.disks] == originals
    assert _leftovers(lab) == []
    lab.guest.start()
    assert lab.guest.sh("cat /mnt/data0/after /mnt/data1/after").stdout == "after0\nafter1\n"


def test_replace_disks_brings_the_point_back_and_resets_tracking(lab: Lab) -> None:
    lab.guest.quit()
    assert any(b.startswith("vmv-") for b in _bitmaps(lab.guest.disks[0].path)), "no tracking bitmap to reset"
    job = lab.cli.ok("restore", "replace-disks", VM, "--rp", lab.rp).json()
    assert job["properties"]["status"] == "Completed" and job["properties"]["operation"] == "Restore", job
    assert _leftovers(lab) == []
    for d in lab.guest.disks:
        assert not [b for b in _bitmaps(d.path) if b.startswith("vmv-")]
    lab.guest.start()
    assert lab.guest.sh("cat /mnt/data0/a /mnt/data1/b").stdout == "a\nb\n"
    assert not lab.guest.sh("ls /mnt/data0/after", check=False).ok
    assert not lab.guest.sh("ls /mnt/data1/after", check=False).ok
    # the next backup does not trust the old chain, and its point is the disks as they are now
    lab.guest.sh("echo new > /mnt/data1/new && sync")
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] in ("Completed", "CompletedWithWarnings"), job
    out = lab.workdir / "check"
    lab.cli.ok("restore", "disks", VM, "--rp", rp_id(latest_point(lab.cli, VM)), "--target-dir", str(out),
               "--format", "raw")  # fmt: skip
    from vm.live import ext4_file

    assert ext4_file(out / "data1.raw", "/new") == b"new\n"
    assert ext4_file(out / "data0.raw", "/after") is None
