"""Files, logs, names (issue 14, item 5): through the real CLI and the real API app.

- the home 0700, the catalog 0600, restored disks (raw and qcow2) 0600, mount points 0700;
- names matched in full ("vm1\\n" is not a name);
- a guest's file name in Content-Disposition, RFC 6266/5987-encoded (non-ASCII, quotes);
- failed sign-ins logged without the token and slowed per client;
- /health says up only, /healthz needs a token; absurd token expiries are 422.
"""

from __future__ import annotations

import logging
import stat
import time
import urllib.parse
from pathlib import Path

import pytest

from api_support import PASSPHRASE, make_ext4_image, sandbox
from helpers import Cli, rp_id
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
