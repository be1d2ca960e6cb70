"""The recovery script (`vmvault files script`): mounts a point on "another machine" over TLS.

"Another machine" is simulated as strictly as one host allows: the script runs with a different
VMVAULT_HOME, the system python3 (no vmvault installed), and without the capabilities that let
root ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH dropped with setpriv) while
the vault directory is mode 000, so it can only have read the point through the network export.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from files_support import TwoPoints, check_volume_files, loops_under, mounts_under, processes_mentioning

NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
CLIENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoPoints]:
    points = TwoPoints(tmp_path_factory.mktemp("files-script"))
    try:
        yield points
    finally:
        points.unmount_all()


def _script(vm: TwoPoints, name: str, *extra: str) -> dict[str, Any]:
    path = vm.work / name
    data: dict[str, Any] = vm.cli.ok("files", "script", "vm1", "--rp", vm.points[0], "-f", str(path), *extra).json()
    assert Path(data["script"]) == path and os.access(path, os.X_OK)
    return data


def _run_script(vm: TwoPoints, script: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": CLIENT_PATH, "VMVAULT_HOME": str(vm.work / "another-home"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [*NO_DAC, "sh", script, *args],
        input=password + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=vm.work,
    )


def _embedded_config(script: str) -> dict[str, Any]:
    import json

    text = Path(script).read_text()
    section = text.split("\n#### vmvault:config\n", 1)[1].split("\n#### vmvault:", 1)[0]
    data: dict[str, Any] = json.loads(section)
    return data


def test_script_mounts_reads_and_unmounts_through_the_network_export_only(vm: TwoPoints) -> None:
    made = _script(vm, "recover.sh")
    assert made["password"] not in Path(made["script"]).read_text()
    target = vm.work / "client-mnt"
    os.chmod(vm.vault_dir, 0)
    try:
        denied = subprocess.run([*NO_DAC, "ls", str(vm.vault_dir)], capture_output=True, text=True)
        assert denied.returncode != 0, "the client's privileges must not reach the vault directory"
        r = _run_script(vm, made["script"], made["password"], "--dir", str(target))
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        layout = {
            "disk0-part1": "ext4",
            "disk0-part2": "xfs",
            "disk0-part3": "ntfs",
            "disk0-part4": "vfat",
            "disk1-part1": "vfat",
            "disk1-part5": "ext4",
        }
        for name, fs in layout.items():
            assert str(target / name) in r.stdout, r.stdout
            check_volume_files(target / name, fs, version=1)
        assert "no file system vmvault recognises" in r.stdout  # disk0 partition 5, listed and skipped
        with pytest.raises(OSError):
            os.close(os.open(target / "disk0-part1" / "new", os.O_WRONLY | os.O_CREAT, 0o644))
    finally:
        os.chmod(vm.vault_dir, 0o700)
    run_dir = Path("/run/vmvault-recover") / made["session"]
    assert loops_under(run_dir), "the client's volumes sit on loop devices over its own FUSE files"
    r = _run_script(vm, made["script"], "", "--unmount")
    assert r.returncode == 0 and "unmounted" in r.stdout, f"{r.stdout}\n{r.stderr}"
    assert not mounts_under(target) and not mounts_under(run_dir) and not loops_under(run_dir)
    assert not target.exists() and not run_dir.exists()
    # this script's processes only (another pytest-xdist worker may have a script running); not the
    # session id, which the host's session owner (alive until the session ends) names too
    ours = (str(run_dir), str(target), made["script"])
    deadline = time.monotonic() + 10
    while processes_mentioning(*ours) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_mentioning(*ours)


def test_wrong_password_is_refused_and_nothing_is_mounted(vm: TwoPoints) -> None:
    made = _script(vm, "wrong.sh")
    target = vm.work / "wrong-mnt"
    r = _run_script(vm, made["script"], "not-the-password", "--dir", str(target))
    assert r.returncode == 2 and "wrong password" in r.stderr, f"{r.stdout}\n{r.stderr}"
    assert not target.exists()


def _connect_with(config: dict[str, Any], password: str) -> None:
    """The script's own client code path, straight against the export (the server's decision)."""
    from vmvault.recovery import nbdproto

    tls = ssl.create_default_context(cadata=config["ca_pem"])
    sock = socket.create_connection((config["host"], config["port"]), timeout=10)
    try:
        conn, size, _flags = nbdproto.connect_export(
            sock, f"{password}/disk0", tls=tls, server_hostname=config["server_name"]
        )
        assert size > 0
        conn.close()
    finally:
        sock.close()


def test_expired_password_is_refused_by_the_server(vm: TwoPoints) -> None:
    from vmvault.recovery import nbdproto

    _script(vm, "long.sh")  # keeps the session (and its export) up well past the short password
    short = _script(vm, "short.sh", "--duration", "2s")
    config = _embedded_config(short["script"])
    _connect_with(config, short["password"])  # valid for now
    time.sleep(2.5)
    with pytest.raises(nbdproto.Refused, match="expired"):
        _connect_with(config, short["password"])
    r = _run_script(vm, short["script"], short["password"], "--dir", str(vm.work / "expired-mnt"))
    assert r.returncode == 2 and "expired" in r.stderr, f"{r.stdout}\n{r.stderr}"


def test_each_script_mints_a_new_password_stored_only_as_a_hash(vm: TwoPoints) -> None:
    import sqlite3

    first, second = _script(vm, "a.sh"), _script(vm, "b.sh")
    assert first["password"] != second["password"] and re.fullmatch(r"[a-z2-7]{24}", first["password"])
    conn = sqlite3.connect(vm.home / "catalog.db")
    try:
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert first["password"] not in dump and second["password"] not in dump


def test_the_script_unmounts_by_itself_at_expiry(vm: TwoPoints) -> None:
    _script(vm, "keep.sh")  # the host session outlives this script's password
    made = _script(vm, "brief.sh", "--duration", "5s")
    target = vm.work / "brief-mnt"
    r = _run_script(vm, made["script"], made["password"], "--dir", str(target))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert mounts_under(target)
    run_dir = Path("/run/vmvault-recover") / made["session"]
    deadline = time.monotonic() + 20
    while (mounts_under(target) or loops_under(run_dir) or target.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not mounts_under(target) and not loops_under(run_dir) and not mounts_under(run_dir)
    assert not target.exists() and not run_dir.exists()


def _move_vm(vm: TwoPoints, host: str | None) -> None:
    from vmvault.catalog import repos
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=vm.home)) as ctx, ctx.catalog.write() as s:
        repos.get_vm(s, "vm1").host = host


def test_the_script_of_a_vm_of_another_host_is_served_by_this_server_from_the_vault(vm: TwoPoints) -> None:
    """A VM of another host (vm add --host): the script is made and served here, from the vault (its
    host takes no part); a files mount queued for that host is not in its way; files unmount ends it
    here."""
    from vmvault.service import files, jobs
    from vmvault.service.context import context
    from vmvault.settings import Settings

    _move_vm(vm, "h2")
    queued = None
    try:
        made = _script(vm, "other-host.sh")
        _connect_with(_embedded_config(made["script"]), made["password"])  # served here, from the vault
        sessions = vm.cli.ok("files", "list", "vm1").json()
        assert any(x["id"] == made["session"] and x["state"] == "Active" for x in sessions), sessions
        with context(Settings(home=vm.home)) as ctx:
            queued = files.mount_point(ctx, "vm1", vm.points[0]).job
        assert queued["status"] == "InProgress", queued  # queued for h2's agent, not refused
        ended = vm.cli.ok("files", "unmount", "vm1").json()
        assert [x["id"] for x in ended] == [made["session"]], ended  # ended here, not queued for h2
        live = [x["id"] for x in vm.cli.ok("files", "list", "vm1").json() if x["state"] != "Ended"]
        assert made["session"] not in live, live
    finally:
        if queued is not None:
            with context(Settings(home=vm.home)) as ctx:
                jobs.cancel_job(ctx, queued["id"])
        _move_vm(vm, None)


def test_kernel_nbd_path_of_the_script() -> None:
    pytest.skip(
        "the script's kernel-nbd path (nbd-client + /dev/nbdX, used when nbdfuse is missing) cannot be "
        "tested here: these machines have no nbd kernel module (docs/file-recovery.md)"
    )
