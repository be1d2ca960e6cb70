"""`vmvault --server URL`: the CLI driving a real `vmvault serve` (uvicorn) prints what it prints locally.

One server on a sandboxed home; the "remote" CLI runs with another, empty home and only a token,
so whatever it does can only have gone through the API. Read commands are compared byte for
byte with the local CLI on the server's home (JSON and table); writes made remotely are checked
from the local side; errors keep their code, message, hint and exit code; commands and options
without an API refuse --server clearly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from api_support import make_ext4_image
from helpers import Cli, HostKeyCli, Result, far_time_zone, files_equal
from test_api_flows import served


def test_the_cli_drives_a_remote_server_with_the_same_output(tmp_path: Path) -> None:
    cli = HostKeyCli(home=tmp_path / "home")
    disk = make_ext4_image(tmp_path / "web1.raw", 16, {"a.txt": b"remote\n"})
    cli.ok("vault", "create", "main", "--timezone", far_time_zone())
    with served(cli) as (address, token):
        remote = Cli(home=tmp_path / "elsewhere", passphrase=None, extra_env={"VMVAULT_TOKEN": token})

        def there(*args: str, json_output: bool = True) -> Result:
            return remote.ok("--server", address, *args, json_output=json_output)

        def both(*args: str, json_output: bool = True) -> None:
            here = cli.ok(*args, json_output=json_output).stdout
            assert there(*args, json_output=json_output).stdout == here, args

        # writes made through the server
        assert there("vm", "add", "web1", "--disk", str(disk)).json() == cli.ok("vm", "show", "web1").json()
        enabled = there("protection", "enable", "web1", "--vault", "main").json()["properties"]
        assert enabled["operation"] == "ConfigureBackup" and enabled["status"] == "Completed"
        backup = there("backup", "now", "web1", "--retain-until", "2099-01-01")
        job = backup.json()
        assert job["properties"]["status"] == "Completed" and job["properties"]["operation"] == "Backup"
        assert "recovery point" in backup.stderr
        rp = cli.ok("recoverypoint", "list", "web1").json()[0]["name"]

        restored = there("restore", "disks", "web1", "--rp", rp, "--target-dir", str(tmp_path / "out")).json()
        restored = restored["properties"]
        assert (restored["operation"], restored["status"]) == ("Restore", "Completed")
        assert files_equal(tmp_path / "out" / "disk0.raw", disk)

        try:
            _file_recovery(cli, there, rp, tmp_path)
            _recovery_script(cli, there, rp, tmp_path)
        finally:  # a failed check must not leave the point mounted
            remote.run("--server", address, "files", "unmount", "web1")
        _policies(cli, there, tmp_path)
        _protection(cli, there)
        spare = there("vault", "create", "spare").json()
        assert cli.ok("vault", "show", "spare").json() == spare
        assert there("vault", "delete", "spare", "--keep-storage").json()["properties"]["storageDeleted"] is False
        assert cli.fails("vault", "show", "spare").returncode == 66
        spare_dir = spare["properties"]["storageDir"]
        assert there("vault", "import", spare_dir).json()["properties"]["uuid"] == spare["properties"]["uuid"]
        assert there("vault", "delete", "spare").json()["properties"]["storageDeleted"] is True
        assert not Path(spare_dir).exists()
        verified = there("vault", "verify", "main").json()["properties"]
        assert (verified["operation"], verified["status"]) == ("Verify", "Completed")

        # reads: the same bytes, as JSON and as tables
        for args in (("vault", "list"), ("vault", "show", "main"), ("vm", "list"), ("vm", "show", "web1"),
                     ("item", "list"), ("item", "show", "web1"), ("recoverypoint", "list", "web1"),
                     ("policy", "list", "--vault", "main"), ("policy", "show", "DefaultPolicy", "--vault", "main"),
                     ("job", "show", job["name"]), ("vault", "usage", "main"), ("files", "list", "web1", "--all"),
                     ("job", "list", "--operation", "Backup")):  # fmt: skip
            both(*args)
            both(*args, json_output=False)
        both("job", "list", "--query", "[?properties.status=='Completed'].name", "-o", "tsv")
        both("recoverypoint", "list", "--item-name", "web1", "--query", "[0].name", "-o", "tsv")
        assert there("job", "wait", job["name"]).json()["name"] == job["name"]

        # errors: the same code, message, hint and exit code
        failing: list[tuple[str, ...]] = [
            ("vm", "show", "nope"), ("vm", "enable-agent", "web1"), ("files", "browse", "--vm", "web1"),
            ("restore", "vm", "web1", "--rp", "0000", "--name", "copy"),
            ("restore", "replace-disks", "web1", "--rp", "0000"),
        ]  # fmt: skip
        for command in failing:
            here, far = cli.fails(*command), remote.fails("--server", address, *command)
            assert (far.returncode, far.stderr) == (here.returncode, here.stderr), command

        _tokens(cli, there)
        _notifications(cli, there, remote, address)
        _refusals(remote, address, rp, tmp_path)
        _host_vms(cli, there, remote, address)
        forged = Cli(home=tmp_path / "elsewhere", passphrase=None, extra_env={"VMVAULT_TOKEN": "vmv_x"})
        assert forged.fails("--server", address, "vault", "list").returncode == 77
    gone = remote.fails("--server", address, "vault", "list")  # the server has stopped
    assert (
        gone.returncode == 69
        and f"error [server_unreachable]: cannot reach the vmvault server at {address}" in gone.stderr
    )
    assert not (tmp_path / "elsewhere").exists()


def _file_recovery(cli: Cli, there: Callable[..., Result], rp: str, tmp_path: Path) -> None:
    """Mount on the server, browse and download through it, unmount: as the local commands see it."""
    session = there("files", "mount", "web1", "--rp", rp).json()
    assert session["recoveryPoint"] == rp and session["state"] == "Active", session
    assert [s["id"] for s in cli.ok("files", "list", "web1").json()] == [session["id"]]
    volumes = there("files", "browse", "--vm", "web1").json()
    assert volumes == cli.ok("files", "browse", "--vm", "web1").json() and len(volumes) == 1
    volume = volumes[0]["name"]
    names = {e["name"] for e in there("files", "browse", volume, "--vm", "web1").json()}
    assert "a.txt" in names, names
    assert {e["name"] for e in there("files", "browse", "web1", volume).json()} == names  # VM first, as elsewhere
    copied = tmp_path / "a.txt"
    assert "wrote 7 bytes" in there("files", "download", f"{volume}/a.txt", "--vm", "web1", "--to", str(copied)).stderr
    assert copied.read_bytes() == b"remote\n"
    streamed = there("files", "download", f"{volume}/a.txt", "--vm", "web1", "--to", "-", json_output=False)
    assert streamed.stdout == "remote\n"
    ended = there("files", "unmount", "web1").json()
    assert [(s["id"], s["state"]) for s in ended] == [(session["id"], "Ended")], ended
    assert cli.ok("files", "list", "web1").json() == []


def _recovery_script(cli: Cli, there: Callable[..., Result], rp: str, tmp_path: Path) -> None:
    """The server makes the script (and serves the point); it is written on this side, password shown once."""
    made = there("files", "script", "web1", "--rp", rp, "--file", str(tmp_path / "recover.sh")).json()
    script = tmp_path / "recover.sh"
    assert made["script"] == str(script) and len(made["password"]) >= 16, made
    assert os.access(script, os.X_OK) and made["session"] in script.read_text()
    served_session = {s["id"]: s for s in cli.ok("files", "list", "web1").json()}[made["session"]]
    assert served_session["recoveryPoint"] == rp


def _policies(cli: Cli, there: Callable[..., Result], tmp_path: Path) -> None:
    document = cli.ok("policy", "show", "DefaultPolicy", "--vault", "main").json()
    document["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] = 30
    path = tmp_path / "monthly.json"
    path.write_text(json.dumps(document))
    created = there("policy", "create", "Short", "--vault", "main", "--file", str(path)).json()
    assert created == cli.ok("policy", "show", "Short", "--vault", "main").json()
    document["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] = 40
    path.write_text(json.dumps(document))
    there("policy", "set", "Short", "--vault", "main", "--file", str(path))
    shown = cli.ok("policy", "show", "Short", "--vault", "main").json()
    assert shown["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] == 40
    assert "deleted" in there("policy", "delete", "Short", "--vault", "main").stderr
    assert cli.fails("policy", "show", "Short", "--vault", "main").returncode == 66


def _protection(cli: Cli, there: Callable[..., Result]) -> None:
    def state() -> str:
        return str(cli.ok("item", "show", "web1").json()["properties"]["protectionState"])

    updated = there("protection", "update", "web1", "--policy", "DefaultPolicy").json()
    assert updated["properties"]["status"] == "Completed"
    there("protection", "disable", "web1")
    assert state() == "ProtectionStopped"
    there("protection", "resume", "web1")
    assert state() == "Protected"


def _tokens(cli: Cli, there: Callable[..., Result]) -> None:
    made = there("token", "create", "--role", "BackupReader", "--vault", "main").json()
    assert made["token"].startswith("vmv_") and made["role"] == "BackupReader"
    listed = {t["id"]: t for t in cli.ok("token", "list").json()}
    assert listed[made["id"]]["vault"] == "main"
    assert there("token", "revoke", made["id"]).json()["revoked"] is not None
    assert made["id"] not in {t["id"] for t in there("token", "list").json()}


def _notifications(cli: Cli, there: Callable[..., Result], remote: Cli, address: str) -> None:
    target = there("vault", "notify", "add", "main", "--webhook", "http://127.0.0.1:9/hook", "--on", "all").json()
    assert (target["kind"], target["address"], target["events"]) == ("webhook", "http://127.0.0.1:9/hook", "all")
    for output in (True, False):
        assert (
            there("vault", "notify", "list", "main", json_output=output).stdout
            == cli.ok("vault", "notify", "list", "main", json_output=output).stdout
        )
    bad = ("vault", "notify", "add", "main", "--webhook", "http://x/", "--on", "sometimes")
    here, far = cli.fails(*bad), remote.fails("--server", address, *bad)
    assert (far.returncode, far.stderr) == (here.returncode, here.stderr)
    assert "removed" in there("vault", "notify", "remove", "main", str(target["id"])).stderr
    assert cli.ok("vault", "notify", "list", "main").json() == []


def _host_vms(cli: Cli, there: Callable[..., Result], remote: Cli, address: str) -> None:
    """vm add --host through the server: the service function `vm add --host` runs on the server itself
    (paths are paths on that host, sent as given; nothing is opened here or there)."""
    added = there("vm", "add", "far1", "--host", "h2", "--qmp", "/run/h2/far1.qmp", "--guest-agent", "/run/h2/ga")
    assert added.json() == cli.ok("vm", "show", "far1").json() and added.json()["host"] == "h2", added
    disks = there("vm", "add", "far2", "--host", "h2", "--disk", "/var/lib/h2/a.qcow2", "--format", "qcow2").json()
    assert [(d["path"], d["format"]) for d in disks["disks"]] == [("/var/lib/h2/a.qcow2", "qcow2")], disks
    assert there("vm", "add", "far3", "--host", "h2", "--libvirt", "web").json()["kind"] == "libvirt"
    for bad in (("vm", "add", "x", "--host", "h2", "--disk", "rel.raw"),
                ("vm", "add", "x", "--host", "h2", "--disk", "/a.raw", "--qmp", "/q.sock"),
                ("vm", "add", "x", "--host", "h2", "--libvirt", "web", "--guest-agent", "/ga")):  # fmt: skip
        here, far = cli.fails(*bad), remote.fails("--server", address, *bad)
        assert (far.returncode, far.stderr) == (here.returncode, here.stderr), bad
    assert cli.fails("vm", "show", "x").returncode == 66


def _refusals(remote: Cli, address: str, rp: str, tmp_path: Path) -> None:
    local_only: list[tuple[str, ...]] = [
        ("vault", "gc", "main"), ("vm", "add", "x", "--qmp", "/tmp/qmp.sock"), ("vm", "discover"),
        ("vault", "usage", "main", "--price-lrs", "1"),
        ("retention", "run"),
    ]  # fmt: skip
    for args in local_only:
        refused = remote.fails("--server", address, *args)
        assert refused.returncode == 64 and "does not run against a server" in refused.stderr, args
    # A mount point through the API is a server path inside its allowed restore folders.
    outside = remote.fails("--server", address, "files", "mount", "web1", "--rp", rp, "--mountpoint", "/etc/vmv-mnt")
    assert "path_not_allowed" in outside.output and "/etc/vmv-mnt" in outside.output, outside.output
    assert not Path("/etc/vmv-mnt").exists()
    relative = remote.fails("--server", address, "vm", "add", "x", "--disk", "x.raw")  # read from the server's cwd?
    assert relative.returncode == 64 and "--disk is a path on the server and must be absolute: x.raw" in relative.stderr
