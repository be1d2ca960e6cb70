"""`vmvault doctor`: passes on this machine; fails naming the fix for a read-only vault storage
(a real read-only bind mount) and for a libvirt VM without a guest agent channel (real libvirtd)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import Cli
from vm.libvirtd import Domain, libvirtd  # noqa: F401  (the session fixture)
from vm.machine import ext4_disk

MiB = 1 << 20


def checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_passes_here_then_names_the_fix_for_a_read_only_vault(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB) + b"vmvault" * 100)
    storage = tmp_path / "v1"
    cli.vault_create("v1", storage)
    assert cli.vm_add("vm1", disk).ok

    report = cli.ok("doctor").json()
    assert report["ok"] is True and report["failed"] == [], report
    found = checks(report)
    for name in ("qemu-img", "qemu-nbd", "qemu-storage-daemon", "libnbd", "fuse", "loop", "vault v1 storage",
                 "vm vm1 disk disk0", "fleece space"):  # fmt: skip
        assert found[name]["status"] == "pass", found.get(name)
    assert "raw" in found["vm vm1 disk disk0"]["detail"]
    text = cli.ok("doctor", json_output=False).stdout
    assert "PASS  vault v1 storage" in text and "all checks passed" in text

    with read_only(storage):
        r = cli.run("doctor")
        assert r.returncode == 1, r
        report = r.json()
        assert report["ok"] is False and report["failed"] == ["vault v1 storage"], report
        check = checks(report)["vault v1 storage"]
        assert check["status"] == "fail" and str(storage) in check["detail"] and "Read-only" in check["detail"]
        assert "remount" in check["fix"] and "rw" in check["fix"], check
        text = cli.run("doctor", json_output=False).stdout
        assert f"FAIL  vault v1 storage: {storage} is not writable" in text and "fix: remount" in text, text
    assert list(storage.glob(".vmvault-doctor-*")) == []  # the probe leaves nothing behind
    assert cli.ok("doctor").json()["ok"] is True


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """A read-only bind mount of path onto itself (root bypasses chmod, not a read-only mount)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_doctor_names_the_fix_for_a_vm_without_agent_channel(
    cli: Cli, tmp_path: Path, libvirtd: str  # noqa: F811
) -> None:
    disk = ext4_disk(tmp_path, "noagent0", 16 * MiB)
    domain = Domain(f"vmvdoc-{secrets.token_hex(4)}", tmp_path, [disk], agent=False).define()
    try:
        cli.ok("vm", "add", "noagent", "--libvirt", domain.name)
        r = cli.run("doctor", "--vm", "noagent")
        assert r.returncode == 1, r
        report = r.json()
        assert report["failed"] == ["vm noagent guest agent"], report
        check = checks(report)["vm noagent guest agent"]
        assert "no org.qemu.guest_agent.0 channel" in check["detail"], check
        assert "vmvault vm enable-agent noagent" in check["fix"], check
        assert checks(report)["libvirt backup API"]["status"] == "pass"
        cli.ok("vm", "enable-agent", "noagent")
        fixed = checks(cli.run("doctor", "--vm", "noagent").json())["vm noagent guest agent"]
        assert fixed["status"] == "pass", fixed  # a shut-off domain gets the channel at once
    finally:
        domain.close()


def test_doctor_against_a_server_checks_the_clock_skew(cli: Cli, tmp_path: Path) -> None:
    from test_scheduler import Serve

    serve = Serve(cli, "--retention-every", "0", "--verify-every", "0")
    try:
        base = serve.announce.split("listening on ", 1)[1].split(" ", 1)[0]
        remote = Cli(home=tmp_path / "elsewhere")
        report = remote.ok("--server", base, "doctor").json()
        skew = checks(report)["clock skew"]
        assert skew["status"] == "pass" and base in skew["detail"], skew
        assert "vault v1 storage" not in checks(report) and report["ok"] is True
        r = remote.fails("--server", base, "doctor", "--vm", "x")
        assert "--vm" in r.output, r
    finally:
        assert serve.stop() == 0


def test_doctor_fails_on_a_server_clock_ten_minutes_off(tmp_path: Path) -> None:
    """The server's clock cannot be moved here: a local HTTP server answers /health with a Date
    header ten minutes behind (the only thing doctor reads from it)."""
    import threading
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def date_time_string(self, timestamp: float | None = None) -> str:
            return format_datetime(datetime.now(UTC) - timedelta(minutes=10), usegmt=True)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = Cli(home=tmp_path / "home").run("--server", url, "doctor")
        assert r.returncode == 1, r
        skew = checks(r.json())["clock skew"]
        assert skew["status"] == "fail" and " s ahead of " in skew["detail"], skew
        assert 595 <= int(skew["detail"].split("clock is ")[1].split(" s ")[0]) <= 605, skew
        assert "NTP" in skew["fix"]
    finally:
        server.shutdown()
        server.server_close()
