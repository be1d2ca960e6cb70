"""Files, logs, names (issue 14, item 5): through the real CLI and the real API app.

- the home 0700, the catalog 0600, restored disks (raw and qcow2) 0600, mount points 0700;
- names matched in full ("vm1\\n" is not a name);
- a guest's file name in Content-Disposition, RFC 6266/5987-encoded (non-ASCII, quotes);
- failed sign-ins logged without the token and slowed per client;
- /health says up only, /healthz needs a token; absurd token expiries are 422.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_support import PASSPHRASE, make_ext4_image, sandbox
from helpers import Cli, crossable_dir, rp_id
from vmvault.service import backups, files, protection, vaults, vms

API = "/api/v1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_catalog_and_restored_disks_are_private(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    disk = make_ext4_image(tmp_path / "vm1.raw", 8, {"a.txt": b"guest data\n"})
    cli.vault_create("v1", tmp_path / "vault")
    cli.ok("vm", "add", "vm1", "--disk", str(disk))
    assert _mode(tmp_path / "home") == 0o700
    assert _mode(tmp_path / "home" / "catalog.db") == 0o600
    cli.ok("protection", "enable", "--vm", "vm1", "--vault", "v1")
    cli.ok("backup", "now", "--vm", "vm1")
    (point,) = cli.points("vm1")
    for fmt in ("raw", "qcow2"):
        target = tmp_path / f"restored-{fmt}"
        cli.ok("restore", "disks", "--vm", "vm1", "--rp", rp_id(point), "--target-dir", str(target), "--format", fmt)
        (restored,) = list(target.iterdir())
        assert _mode(restored) == 0o600, (fmt, oct(_mode(restored)))


def test_an_existing_home_is_made_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    Cli(home=home).ok("vm", "list")
    assert _mode(home) == 0o700 and _mode(home / "catalog.db") == 0o600


@pytest.mark.parametrize("name", ["nl\n", "vm1\n", "a\r", "x\x00"])
def test_names_are_matched_in_full(tmp_path: Path, name: str) -> None:
    disk = make_ext4_image(tmp_path / "vm1.raw", 8)
    with sandbox(tmp_path / "home") as box:
        owner = box.token("Owner")
        r = box.call("POST", f"{API}/vms", owner, json={"name": name, "disks": [str(disk)]})
        assert r.status_code == 422 and "invalid VM name" in r.json()["message"], r.text
        r = box.call("POST", f"{API}/vaults", owner, json={"name": name, "passphrase": PASSPHRASE})
        assert r.status_code == 422, r.text
        assert box.call("GET", f"{API}/vms", owner).json()["value"] == []


@pytest.mark.parametrize("expires", ["99999999999d", "999999999w", "9999-12-31T23:59:59-23:59", "5000000h"])
def test_absurd_token_expiry_is_422(tmp_path: Path, expires: str) -> None:
    with sandbox(tmp_path / "home") as box:
        r = box.call("POST", f"{API}/tokens", box.token("Owner"), json={"role": "BackupReader", "expires": expires})
        assert r.status_code == 422 and "--expires" in r.json()["message"], r.text


def test_health_is_anonymous_and_bare_healthz_needs_a_token(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        assert box.call("GET", "/health", None).json() == {"status": "ok"}
        r = box.call("GET", "/healthz", None)
        assert r.status_code == 401 and "pid" not in r.text and str(box.home) not in r.text, r.text
        r = box.call("GET", "/healthz", box.token("BackupReader"))
        assert r.status_code == 200, r.text


def test_failed_sign_ins_are_logged_without_the_token_and_slowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "vmv_0123456789abcdef_" + "Q" * 43
    with sandbox(tmp_path / "home") as box, caplog.at_level(logging.WARNING, logger="vmvault"):
        reader = box.token("BackupReader")
        times = []
        for _ in range(7):
            start = time.monotonic()
            assert box.call("GET", f"{API}/vms", wrong).status_code == 401
            times.append(time.monotonic() - start)
        failures = [r.getMessage() for r in caplog.records if "sign-in failed" in r.getMessage()]
        assert len(failures) == 7 and "API sign-in failed from testclient" in failures[0], failures
        assert not any(wrong in r.getMessage() or "Q" * 20 in r.getMessage() for r in caplog.records)
        assert times[-1] >= 0.9, times  # the 7th attempt waited (0.5 s, then 1 s)
        # the portal's form counts for the same client; a good token still signs in, and clears the record
        assert box.call("GET", f"{API}/vms", reader).status_code == 200
        start = time.monotonic()
        assert box.call("GET", f"{API}/vms", reader).status_code == 200
        assert time.monotonic() - start < 0.5


def test_download_names_are_rfc6266_encoded(tmp_path: Path) -> None:
    names = {"文件.txt": b"non-ascii\n", 'say "hi"; x=1.txt': b"quotes\n"}
    disk = make_ext4_image(tmp_path / "vm1.raw", 16, names)
    with sandbox(tmp_path / "home") as box:
        vaults.create_vault(box.ctx, "main")
        vms.add_vm(box.ctx, "vm1", [disk])
        protection.enable_protection(box.ctx, "vm1", "main")
        backups.backup_now(box.ctx, "vm1")
        operator = box.token("BackupOperator")
        outcome = files.mount_point(box.ctx, "vm1", _latest(box, operator))
        assert outcome.result is not None, outcome.job
        try:
            mountpoint = Path(str(outcome.result["mountpoint"]))
            assert _mode(mountpoint) == 0o700
            (volume,) = box.call("GET", f"{API}/items/vm1/files/browse", operator).json()["value"]
            for name, data in names.items():
                r = box.call("GET", f"{API}/items/vm1/files/download", operator,
                             params={"path": f"{volume['name']}/{name}"})  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.content == data
                header = r.headers["content-disposition"]
                assert header.isascii() and "\n" not in header and "\r" not in header, header
                encoded = header.split("filename*=UTF-8''", 1)[1]
                assert urllib.parse.unquote(encoded) == name, header
                fallback = header.split('filename="', 1)[1].split('"', 1)[0]
                assert '"' not in fallback and ";" not in fallback, header
        finally:
            files.unmount(box.ctx, "vm1")


def _latest(box: object, token: str) -> str:
    points = box.call("GET", f"{API}/items/vm1/recoverypoints", token).json()  # type: ignore[attr-defined]
    return str(points["value"][0]["name"])  # newest first; its name is what --rp takes


@pytest.fixture
def crossable_base() -> Iterator[Path]:
    """A folder every user can cross (pytest's tmp_path lies in a 0700 folder: libvirt-qemu could not)."""
    with crossable_dir("vmv-home-") as base:
        yield base


def test_restored_libvirt_vms_default_outside_the_private_home(crossable_base: Path) -> None:
    """The home stays 0700 (catalog, host keys) and libvirt's QEMU user still reaches a restored VM's
    disks in the default target, even under `serve`'s systemd UMask=0077. The old default,
    /var/lib/vmvault/restores, lay inside the root home: once `serve` had made it 0700, QEMU as
    libvirt-qemu could not open the disks of a VM restored there."""
    from vmvault.connectors.registry import connector_for
    from vmvault.service.paths import DEFAULT_RESTORES, Rule, build_policy
    from vmvault.service.restore_vm import default_target, make_target_dir
    from vmvault.settings import ROOT_HOME, Settings

    root = Settings(home=ROOT_HOME)
    assert str(root.restores_dir) == DEFAULT_RESTORES[0] == "/var/lib/vmvault-restores"
    assert not default_target(root, True, "new1").is_relative_to(ROOT_HOME)

    home = crossable_base / "vmvault"
    Cli(home=home).ok("vm", "list")  # opens the catalog: the home is made 0700
    assert _mode(home) == 0o700
    settings = Settings(home=home)
    target = default_target(settings, True, "new1")
    assert target == crossable_base / "vmvault-restores" / "vms" / "new1"
    assert build_policy(settings).roots[Rule.RESTORES] == (crossable_base / "vmvault-restores",)
    agent = build_policy(settings, default_restores=DEFAULT_RESTORES)  # `agent run`: the server's default target
    assert agent.roots[Rule.RESTORES] == (Path("/var/lib/vmvault-restores"),)
    assert default_target(settings, False, "new1") == home / "vms" / "new1"  # vmvault's own QEMU: root

    old = os.umask(0o077)
    try:
        assert make_target_dir(connector_for("libvirt"), target)
    finally:
        os.umask(old)
    disk = target / "vda.qcow2"
    disk.write_bytes(b"guest data")
    disk.chmod(0o600)
    qemu = subprocess.run(["id", "-u", "libvirt-qemu"], capture_output=True, text=True)
    if qemu.returncode != 0 or os.geteuid() != 0:
        pytest.skip("no libvirt-qemu user, or not root: nothing is shared")
    os.chown(disk, int(qemu.stdout), -1)  # what libvirt's dynamic_ownership does when the domain starts
    read = subprocess.run(["runuser", "-u", "libvirt-qemu", "--", "cat", str(disk)], capture_output=True, timeout=30)
    assert read.returncode == 0 and read.stdout == b"guest data", read.stderr
    for made in (target.parent.parent, target.parent, target):  # 0710, QEMU's group: others cannot list
        assert _mode(made) == 0o710 and made.stat().st_gid == grp.getgrnam("libvirt-qemu").gr_gid, made
    nobody = subprocess.run(["runuser", "-u", "nobody", "--", "ls", str(target)], capture_output=True, timeout=30)
    assert nobody.returncode != 0
    assert _mode(home) == 0o700
