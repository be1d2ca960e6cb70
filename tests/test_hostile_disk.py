"""A disk's content never chooses how vmvault opens it (issue 14, item 1).

A tenant controls every byte of their raw disk. Written as a qcow2 header whose backing file is a
host file (or a `json:` description of one), the disk must still be read as the raw bytes it is:
the recovery point holds the guest's bytes, a restore gives them back byte-identical, and no byte of
the host file reaches the restored disk or the vault. A qcow2 disk's backing chain is fixed at
`vm add`: a changed chain is refused, naming the file. Real qemu-img, real images, the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import Cli, files_equal, rp_id

MiB = 1024 * 1024
DISK_SIZE = 8 * MiB
MARKER = b"HOST-SECRET-0123456789-never-in-a-backup:"


def _secret(path: Path) -> Path:
    """A host file whose content is recognisable anywhere (1 MiB of a marker repeated)."""
    path.write_bytes((MARKER * (MiB // len(MARKER) + 1))[:MiB])
    os.chmod(path, 0o600)
    return path


def _guest_disk(path: Path) -> Path:
    """A raw disk with guest data: random bytes after the first MiB, zeros elsewhere."""
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
    return path


def _write_qcow2_header(disk: Path, backing: str, work: Path) -> None:
    """What a hostile guest writes into its own raw disk: a qcow2 header naming a host file."""
    header = work / "header.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, str(header),
                    str(DISK_SIZE)], check=True)  # fmt: skip
    data = header.read_bytes()
    assert len(data) < MiB, "the header must fit below the guest's data"
    with open(disk, "r+b") as f:
        f.write(data)
    header.unlink()
    probed = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], check=True,
                                       capture_output=True, text=True).stdout)  # fmt: skip
    assert probed["format"] == "qcow2" and probed.get("backing-filename"), probed  # QEMU would guess qcow2


def _backing_names(secret: Path) -> dict[str, str]:
    described = {"driver": "raw", "file": {"driver": "file", "filename": str(secret)}}
    return {"file": str(secret), "json": "json:" + json.dumps(described)}


def _restore_one(cli: Cli, vm: str, target: Path) -> Path:
    (point,) = cli.points(vm)
    cli.ok("restore", "disks", "--vm", vm, "--rp", rp_id(point), "--target-dir", str(target))
    (restored,) = [p for p in target.iterdir() if p.is_file()]
    return restored


def _assert_no_secret(*roots: Path) -> None:
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            assert MARKER[:24] not in f.read_bytes(), f"host secret bytes found in {f}"


@pytest.mark.parametrize("kind", ["file", "json"])
def test_guest_written_qcow2_header_is_backed_up_as_raw_bytes(tmp_path: Path, kind: str) -> None:
    """The classic attack: added as raw, then the guest writes a qcow2 header naming a host file."""
    cli = Cli(home=tmp_path / "home")
    secret = _secret(tmp_path / "shadow")
    disk = _guest_disk(tmp_path / "disk.raw")
    cli.vault_create("v1", tmp_path / "vault")
    added = cli.ok("vm", "add", "vm1", "--disk", str(disk)).json()
    assert added["disks"][0]["format"] == "raw", added  # guessed once, shown, recorded
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")

    _write_qcow2_header(disk, _backing_names(secret)[kind], tmp_path)
    cli.ok("backup", "now", "--vm", "vm1")

    restored = _restore_one(cli, "vm1", tmp_path / "restored")
    assert files_equal(restored, disk), "the restore must give the guest's raw bytes back, header included"
    _assert_no_secret(restored, tmp_path / "vault")


@pytest.mark.parametrize("kind", ["file", "json"])
def test_guessed_qcow2_with_backing_file_is_refused_at_vm_add(tmp_path: Path, kind: str) -> None:
    """A disk that already carries such a header at `vm add` gets no chain recorded from a guess."""
    cli = Cli(home=tmp_path / "home")
    secret = _secret(tmp_path / "shadow")
    disk = _guest_disk(tmp_path / "disk.raw")
    _write_qcow2_header(disk, _backing_names(secret)[kind], tmp_path)

    r = cli.fails("vm", "add", "vm1", "--disk", str(disk))
    assert "[disk_format_ambiguous]" in r.stderr, r
    assert "--format" in r.output and str(disk) in r.output, r
    assert cli.ok("vm", "list").json() == []  # nothing recorded

    # The admin says what it is: raw. Backed up and restored as the raw bytes.
    cli.vault_create("v1", tmp_path / "vault")
    added = cli.ok("vm", "add", "vm1", "--disk", str(disk), "--format", "raw").json()
    assert added["disks"][0]["format"] == "raw" and not added["disks"][0].get("backingChain"), added
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    cli.ok("backup", "now", "--vm", "vm1")
    restored = _restore_one(cli, "vm1", tmp_path / "restored")
    assert files_equal(restored, disk)
    _assert_no_secret(restored, tmp_path / "vault")

    # Said to be qcow2, its json: backing name is refused outright; a plain one needs a format in the header.
    if kind == "json":
        r = cli.fails("vm", "add", "vm2", "--disk", str(disk), "--format", "qcow2")
        assert "json:" in r.output and "protocol" in r.output, r


def test_replace_disks_writes_the_recorded_format(tmp_path: Path) -> None:
    """replace-disks restores a raw disk as raw even when the guest made it look like a qcow2 image."""
    cli = Cli(home=tmp_path / "home")
    secret = _secret(tmp_path / "shadow")
    disk = _guest_disk(tmp_path / "disk.raw")
    original = tmp_path / "original.raw"
    original.write_bytes(disk.read_bytes())
    cli.vault_create("v1", tmp_path / "vault")
    cli.ok("vm", "add", "vm1", "--disk", str(disk))
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    cli.ok("backup", "now", "--vm", "vm1")
    (point,) = cli.points("vm1")

    _write_qcow2_header(disk, str(secret), tmp_path)
    cli.ok("restore", "replace-disks", "--vm", "vm1", "--rp", rp_id(point))
    assert files_equal(disk, original), "replace-disks must write the point's raw bytes as a raw file"


def _qcow2_with_chain(tmp_path: Path) -> tuple[Path, Path]:
    base = _guest_disk(tmp_path / "base.raw")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(top)], check=True, capture_output=True)
    return base, top


def test_qcow2_chain_is_recorded_and_read_through_its_recorded_files(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    base, top = _qcow2_with_chain(tmp_path)
    cli.vault_create("v1", tmp_path / "vault")
    added = cli.ok("vm", "add", "vm1", "--disk", str(top), "--format", "qcow2").json()
    assert added["disks"][0]["format"] == "qcow2"
    assert added["disks"][0]["backingChain"] == [{"path": str(base.resolve()), "format": "raw"}], added
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    cli.ok("backup", "now", "--vm", "vm1")  # qemu-nbd with every node's driver named
    restored = _restore_one(cli, "vm1", tmp_path / "restored")
    expected = tmp_path / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(expected)], check=True)
    r = subprocess.run(["qemu-img", "compare", "-F", "raw", str(restored), str(expected)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("change", ["rebased", "json", "data-file"])
def test_changed_qcow2_chain_is_refused_naming_the_file(tmp_path: Path, change: str) -> None:
    cli = Cli(home=tmp_path / "home")
    secret = _secret(tmp_path / "shadow")
    _base, top = _qcow2_with_chain(tmp_path)
    cli.vault_create("v1", tmp_path / "vault")
    cli.ok("vm", "add", "vm1", "--disk", str(top), "--format", "qcow2")
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")

    if change == "data-file":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret}", str(top),
                        str(DISK_SIZE)], check=True)  # fmt: skip
    else:
        name = str(secret) if change == "rebased" else _backing_names(secret)["json"]
        subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", name, str(top)], check=True)
    r = cli.fails("backup", "now", "--vm", "vm1")
    assert str(top) in r.output, r
    expected = {"rebased": str(secret), "json": "json:", "data-file": "data file"}[change]
    assert expected in r.output, r
    assert cli.points("vm1") == []
    _assert_no_secret(tmp_path / "vault")


@pytest.mark.parametrize("kind", ["file", "json"])
def test_running_vm_whose_guest_writes_a_qcow2_header(tmp_path: Path, kind: str) -> None:
    """qemu-storage-daemon stands in for a VM running a raw disk (format=raw): the 'guest' writes a
    qcow2 header through it. The live backup reads through QEMU; once stopped, the offline backup
    opens the image as the raw format QEMU used, recorded at `vm add --qmp`."""
    from vm.live import backup, latest_point, protect_running, restore_raw
    from vm.machine import StorageDaemon, blank_disk

    secret = _secret(tmp_path / "shadow")
    qsd = StorageDaemon(tmp_path, [blank_disk(tmp_path, "d0", DISK_SIZE, "raw")]).start()
    cli = Cli(home=tmp_path / "home")
    try:
        protect_running(cli, tmp_path / "vault", "qsd", qsd.vmvault_qmp)
        assert [d["format"] for d in cli.ok("vm", "show", "qsd").json()["disks"]] == ["raw"]
        header_dir = tmp_path / "hdr"
        header_dir.mkdir()
        scratch = _guest_disk(header_dir / "scratch.raw")
        _write_qcow2_header(scratch, _backing_names(secret)[kind], header_dir)
        qsd.write(qsd.disks[0], [(0, scratch.read_bytes()[:MiB]), (2 * MiB, os.urandom(MiB))])
        backup(cli, "qsd")  # live: QEMU's NBD export of its raw node
        live = restore_raw(cli, "qsd", latest_point(cli, "qsd"), tmp_path / "live")["d0"]
    finally:
        qsd.close()
    disk = qsd.disks[0].path
    assert files_equal(live, disk), "the live point must be the guest's raw bytes"
    backup(cli, "qsd")  # stopped: read offline, as the recorded raw format
    offline = restore_raw(cli, "qsd", latest_point(cli, "qsd"), tmp_path / "offline")["d0"]
    assert files_equal(offline, disk), "the offline point must be the guest's raw bytes"
    _assert_no_secret(live, offline, tmp_path / "vault")


def test_set_format_records_a_deliberate_rebase(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    base, top = _qcow2_with_chain(tmp_path)
    cli.vault_create("v1", tmp_path / "vault")
    cli.ok("vm", "add", "vm1", "--disk", str(top), "--format", "qcow2")
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    moved = tmp_path / "base-moved.raw"
    os.rename(base, moved)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(moved), str(top)], check=True)
    r = cli.fails("backup", "now", "--vm", "vm1")
    assert "[disk_chain_changed]" in r.stderr and str(moved) in r.output, r

    shown = cli.ok("vm", "set-format", "vm1", "--disk", "disk0", "--format", "qcow2").json()
    assert shown["disks"][0]["backingChain"] == [{"path": str(moved.resolve()), "format": "raw"}], shown
    cli.ok("backup", "now", "--vm", "vm1")
    r = cli.fails("vm", "set-format", "vm1", "--disk", "disk9", "--format", "qcow2")
    assert "no disk 'disk9'" in r.output, r


def _forget_chain(home: Path) -> None:
    """The disk as a catalog migrated by 0007 has it: format from the old definition, no chain."""
    import sqlite3

    with sqlite3.connect(home / "catalog.db") as db:
        for vm_id, disks in db.execute("SELECT id, disks FROM vms").fetchall():
            old = [{k: v for k, v in d.items() if k != "chain"} for d in json.loads(disks)]
            db.execute("UPDATE vms SET disks = ? WHERE id = ?", (json.dumps(old), vm_id))


def test_a_migrated_qcow2_with_a_backing_file_waits_for_the_admin(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    _base, top = _qcow2_with_chain(tmp_path)
    cli.vault_create("v1", tmp_path / "vault")
    cli.ok("vm", "add", "vm1", "--disk", str(top), "--format", "qcow2")
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    _forget_chain(cli.home)
    r = cli.fails("backup", "now", "--vm", "vm1")
    assert "[disk_chain_unconfirmed]" in r.stderr and "vm set-format vm1 --disk disk0" in r.output, r
    cli.ok("vm", "set-format", "vm1", "--disk", "disk0", "--format", "qcow2")
    cli.ok("backup", "now", "--vm", "vm1")

    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), str(DISK_SIZE)], check=True)
    cli.ok("vm", "add", "vm2", "--disk", str(plain))
    cli.ok("protection", "enable", "--vm", "vm2", "--vault", "v1")
    _forget_chain(cli.home)
    cli.ok("vm", "set-format", "vm1", "--disk", "disk0", "--format", "qcow2")
    cli.ok("backup", "now", "--vm", "vm2")  # no backing file: its (empty) chain is recorded now
    assert cli.ok("vm", "show", "vm2").json()["disks"][0]["backingChain"] == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_disk_swapped_for_a_symlink_after_vm_add_is_refused(tmp_path: Path, fmt: str) -> None:
    """Whoever can write the disk's folder replaces the image by a symlink to a host secret: not followed."""
    cli = Cli(home=tmp_path / "home")
    secret = tmp_path / "host-key"  # binary, so it would pass for a raw disk
    secret.write_bytes((MARKER + bytes(64)) * 4096)
    disk = _guest_disk(tmp_path / "disk.raw")
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(tmp_path / "d.qcow2")],
                       check=True)  # fmt: skip
        disk.unlink()
        disk = tmp_path / "d.qcow2"
    link = tmp_path / "link.img"
    link.symlink_to(disk)
    cli.vault_create("v1", tmp_path / "vault")
    added = cli.ok("vm", "add", "vm1", "--disk", str(link), "--format", fmt).json()
    assert added["disks"][0]["path"] == str(disk), "a symlink given at `vm add` is resolved once, there"
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    cli.ok("backup", "now", "--vm", "vm1")

    disk.unlink()
    disk.symlink_to(secret)
    r = cli.fails("backup", "now", "--vm", "vm1")
    assert f"disk {disk} has become a symlink" in r.output and "re-add the VM" in r.output, r
    assert len(cli.points("vm1")) == 1
    _assert_no_secret(tmp_path / "vault")
