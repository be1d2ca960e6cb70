"""The block export: real NBD clients read a recovery point's disks byte for byte, reads are verified.

nbdinfo, nbdcopy and qemu-img talk to the export of a file-recovery session: on its unix socket,
and over TCP with TLS (the session's CA, a password from `vmvault files script` as the export
name). Partition tables are parsed on images built for the purpose.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from files_support import TwoPoints
from helpers import files_equal


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwoPoints, dict[str, Any], Path]]:
    """Point 1 served (no local mounts), its CA in a tls-certificates directory, and a password."""
    vm = TwoPoints(tmp_path_factory.mktemp("files-nbd"))
    made: dict[str, Any] = vm.cli.ok("files", "script", "vm1", "--rp", vm.points[0], "-f", str(vm.work / "s.sh")).json()
    config = json.loads(
        Path(made["script"]).read_text().split("\n#### vmvault:config\n", 1)[1].split("\n#### vmvault:", 1)[0]
    )
    ca_dir = vm.work / "client-tls"
    ca_dir.mkdir()
    (ca_dir / "ca-cert.pem").write_text(config["ca_pem"])
    try:
        yield vm, made, ca_dir
    finally:
        vm.unmount_all()


def _session(vm: TwoPoints) -> dict[str, Any]:
    sessions: list[dict[str, Any]] = vm.cli.ok("files", "list").json()
    return sessions[0]


def _tls_uri(made: dict[str, Any], ca_dir: Path, disk: str, password: str | None = None) -> str:
    return f"nbds://{made['address']}/{password or made['password']}/{disk}?tls-certificates={ca_dir}"


def test_unix_socket_export_lists_read_only_disks(served: tuple[TwoPoints, dict[str, Any], Path]) -> None:
    vm, _made, _ca = served
    sock = _session(vm)["export"]["unixSocket"]
    info = json.loads(
        subprocess.run(
            ["nbdinfo", "--json", "--list", f"nbd+unix:///?socket={sock}"], check=True, capture_output=True, text=True
        ).stdout
    )
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"disk0", "disk1"}
    for name, export in exports.items():
        assert export["is_read_only"] is True and export["export-size"] == vm.sources[name][0].stat().st_size


def test_nbdcopy_and_qemu_img_read_every_byte_over_tls(served: tuple[TwoPoints, dict[str, Any], Path]) -> None:
    vm, made, ca_dir = served
    for disk in ("disk0", "disk1"):
        out = vm.work / f"{disk}.copy"
        subprocess.run(["nbdcopy", _tls_uri(made, ca_dir, disk), str(out)], check=True, capture_output=True)
        assert files_equal(out, vm.sources[disk][0]), f"{disk} read over TLS differs from the backed-up image"
        out.unlink()
    host, port = made["address"].rsplit(":", 1)
    opts = (
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
        f"export={made['password']}/disk0,tls-creds=tls0"
    )
    r = subprocess.run(
        [
            "qemu-img",
            "compare",
            "--object",
            f"tls-creds-x509,id=tls0,dir={ca_dir},endpoint=client",
            "--image-opts",
            opts,
            "--image-opts",
            f"driver=raw,file.filename={vm.sources['disk0'][0]}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_tcp_needs_tls_and_the_password(served: tuple[TwoPoints, dict[str, Any], Path]) -> None:
    _vm, made, ca_dir = served
    plain = subprocess.run(
        ["nbdinfo", f"nbd://{made['address']}/{made['password']}/disk0"], capture_output=True, text=True
    )
    assert plain.returncode != 0
    wrong = subprocess.run(
        ["nbdinfo", _tls_uri(made, ca_dir, "disk0", "wrongpassword")], capture_output=True, text=True
    )
    assert wrong.returncode != 0
    listing = subprocess.run(
        ["nbdinfo", "--list", f"nbds://{made['address']}/?tls-certificates={ca_dir}"], capture_output=True, text=True
    )
    assert listing.returncode != 0 and "disk0" not in listing.stdout


def test_a_damaged_chunk_fails_the_read_instead_of_returning_wrong_bytes(
    served: tuple[TwoPoints, dict[str, Any], Path], tmp_path: Path
) -> None:
    from vmvault.errors import IntegrityError
    from vmvault.recovery.reader import DiskReader
    from vmvault.vault.store import Vault

    vm, _made, _ca = served
    copy = tmp_path / "vault"
    shutil.copytree(vm.vault_dir, copy)
    vault = Vault.open(copy, vm.home)
    try:
        manifest = vault.read_manifest(vm.points[0])
        disk = manifest.disk("disk0")
        reader = DiskReader(vault, manifest.rp_id, disk, cache_bytes=1 << 20)
        source = vm.sources["disk0"][0].read_bytes()
        for offset, length in ((0, 4096), (65536 - 100, 300), (1 << 20, 3 << 16), (len(source) - 777, 777)):
            assert reader.pread(length, offset) == source[offset : offset + length]
        packs = sorted((copy / "data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
        with open(packs[-1], "r+b") as f:  # flip a byte in the middle of the biggest data pack
            f.seek(f.seek(0, 2) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        damaged = DiskReader(vault, manifest.rp_id, disk, cache_bytes=1 << 20)
        with pytest.raises(IntegrityError, match="disk disk0"):
            for offset in range(0, disk.size, 1 << 20):
                damaged.pread(min(1 << 20, disk.size - offset), offset)
    finally:
        vault.close()


# ---- partition tables ----------------------------------------------------------------------------


def test_partition_tables_gpt_backup_mbr_logical_and_whole_disk(
    served: tuple[TwoPoints, dict[str, Any], Path], tmp_path: Path
) -> None:
    from vmvault.recovery.mount import read_partitions

    vm, _made, _ca = served
    scheme, parts = read_partitions(str(vm.sources["disk0"][0]))
    assert scheme == "gpt" and [p.number for p in parts] == [1, 2, 3, 4, 5]
    assert [p.name for p in parts] == ["root", "data", "win", "esp", "junk"]
    assert parts[0].start == 1 << 20 and parts[0].size == 24 << 20
    damaged = tmp_path / "primary-gpt-damaged.raw"
    subprocess.run(["cp", "--sparse=always", str(vm.sources["disk0"][0]), str(damaged)], check=True)
    with open(damaged, "r+b") as f:
        f.seek(512 + 24)
        f.write(struct.pack("<Q", 12345))  # breaks the primary header's CRC: the backup header is used
    assert read_partitions(str(damaged)) == (scheme, parts)
    scheme, parts = read_partitions(str(vm.sources["disk1"][0]))
    assert scheme == "mbr" and [(p.number, p.type) for p in parts] == [(1, "0x0e"), (5, "0x83")]
    whole = tmp_path / "whole.raw"
    with open(whole, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(whole)], check=True)
    scheme, parts = read_partitions(str(whole))
    assert scheme == "none" and len(parts) == 1 and parts[0].number == 0 and parts[0].size == 8 << 20
