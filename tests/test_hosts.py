"""`vmvault host list|show|remove`: servers register their machine with a heartbeat (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from helpers import PASSPHRASE, Cli


def test_a_server_host_is_online_while_it_beats_then_offline_and_removable(
    tmp_path: Path, catalog_url: str | None
) -> None:
    from vmvault.catalog.clock import to_iso, utc_now
    from vmvault.catalog.models import HostRow, VmRow
    from vmvault.errors import Busy, InvalidInput, NotFound
    from vmvault.service import hosts
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE, catalog_url=catalog_url)) as ctx:
        assert hosts.list_hosts(ctx) == []
        hosts.heartbeat_server(ctx, "http://127.0.0.1:8080")
        hosts.heartbeat_server(ctx, "http://127.0.0.1:8080")  # a second beat updates, never duplicates
        (me,) = hosts.list_hosts(ctx)
        name = hosts.local_host_name()
        assert me["name"] == name and me["role"] == "Server" and me["state"] == "Online"
        assert me["runningJobs"] == 0 and me["vms"] == 0 and me["version"] == hosts.version()
        with pytest.raises(Busy, match=f"host '{name}' is Online"):
            hosts.remove_host(ctx, name)
        # No heartbeat for longer than the lease: Offline.
        with ctx.catalog.write() as s:
            row = s.get(HostRow, name)
            assert row is not None
            row.last_heartbeat = to_iso(utc_now() - timedelta(seconds=hosts.HOST_LEASE_S + 1))
            s.add(VmRow(id="vm-on-host", name="db1", kind="disks", disks=[], definition={},
                        created=to_iso(utc_now()), host=name))  # fmt: skip
        shown = hosts.show_host(ctx, name)
        assert shown["state"] == "Offline" and shown["vms"] == 1 and shown["vmNames"] == ["db1"]
        with pytest.raises(InvalidInput, match="still has 1 VM"):
            hosts.remove_host(ctx, name)  # its VMs would have nobody to run their jobs
        with ctx.catalog.write() as s:
            s.delete(s.get(VmRow, "vm-on-host"))
        assert hosts.remove_host(ctx, name)["removed"] is True
        assert hosts.list_hosts(ctx) == []
        with pytest.raises(NotFound, match="host 'nosuch' not found"):
            hosts.show_host(ctx, "nosuch")


def test_host_cli(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    assert cli.ok("host", "list").json() == []
    r = cli.fails("host", "remove", "nosuch")
    assert "host 'nosuch' not found" in r.stderr and "vmvault host list" in r.stderr


def test_hosts_over_the_api_with_version_mismatch_and_vault_scoped_names(tmp_path: Path) -> None:
    """GET/DELETE /api/v1/hosts over service/hosts.py; an old agent version is flagged; a vault-scoped
    token sees the host but only its own vault's VM names; `host list` flags the version in its table."""
    from api_support import make_ext4_image, sandbox
    from vmvault.catalog.clock import to_iso, utc_now
    from vmvault.catalog.models import HostRow, VmRow
    from vmvault.service import hosts, protection, vaults, vms

    with sandbox(tmp_path / "home") as box:
        ctx = box.ctx
        vaults.create_vault(ctx, "v1")
        vaults.create_vault(ctx, "v2")
        vms.add_vm(ctx, "a", [make_ext4_image(tmp_path / "a.raw", 8)])
        vms.add_vm(ctx, "b", [make_ext4_image(tmp_path / "b.raw", 8)])
        protection.enable_protection(ctx, "a", "v1")
        protection.enable_protection(ctx, "b", "v2")
        long_ago = to_iso(utc_now() - timedelta(seconds=hosts.HOST_LEASE_S + 5))
        with ctx.catalog.write() as s:
            s.add(HostRow(name="h1", role="Agent", registered=long_ago, last_heartbeat=long_ago, version="0.0.1",
                          boot_id="", details={}))  # fmt: skip
            for vm in s.query(VmRow).all():
                vm.host = "h1"
        owner, reader, scoped = box.token("Owner"), box.token("BackupReader"), box.token("BackupReader", "v1")

        page = box.call("GET", "/api/v1/hosts", reader).json()
        (h1,) = page["value"]
        assert (h1["name"], h1["role"], h1["state"], h1["vms"]) == ("h1", "Agent", "Offline", 2)
        assert h1["version"] == "0.0.1" and h1["versionMismatch"] is True
        assert box.call("GET", "/api/v1/hosts/h1", owner).json()["vmNames"] == ["a", "b"]
        assert box.call("GET", "/api/v1/hosts/h1", scoped).json()["vmNames"] == ["a"]  # not v2's VM
        missing = box.call("GET", "/api/v1/hosts/nosuch", reader)
        assert missing.status_code == 404 and "host 'nosuch' not found" in missing.json()["message"]
        assert box.call("DELETE", "/api/v1/hosts/h1", reader).status_code == 403  # Owner only
        busy = box.call("DELETE", "/api/v1/hosts/h1", owner)  # its VMs still belong to it: nothing changes
        assert busy.status_code == 422 and "still has 2 VM(s)" in busy.json()["message"]
        with ctx.catalog.write() as s:
            for vm in s.query(VmRow).all():
                vm.host = None
        assert box.call("DELETE", "/api/v1/hosts/h1", owner).json()["removed"] is True
        assert box.call("GET", "/api/v1/hosts", reader).json()["value"] == []

        with ctx.catalog.write() as s:
            s.add(HostRow(name="old", role="Agent", registered=long_ago, last_heartbeat=long_ago, version="0.0.1",
                          boot_id="", details={}))  # fmt: skip
        table = Cli(home=tmp_path / "home").ok("host", "list", json_output=False).stdout
        assert "0.0.1 (not the server's)" in table


def test_running_jobs_are_counted_on_the_host_that_runs_them(tmp_path: Path, catalog_url: str | None) -> None:
    """An agent's running jobs are its VMs' (agents sharing a machine's boot id are told apart); the
    server's do not include them."""
    from vmvault.proc import boot_id
    from vmvault.service import agentwork, backups, hosts, protection, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.settings import Settings

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE, catalog_url=catalog_url)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        hosts.heartbeat_server(ctx, "http://127.0.0.1:8080")
        for host in ("h1", "h2"):  # both "hosts" are this machine: the same boot id as the server
            agentwork.register(ctx, host, {"version": hosts.version(), "apiVersion": agentwork.API_VERSION,
                                           "bootId": boot_id(), "pid": 1})  # fmt: skip
        add_host_vm(ctx, "a1", "h1", [str(disk)])
        protection.enable_protection(ctx, "a1", "v1")
        queued = backups.backup_now(ctx, "a1").job
        package = agentwork.claim(ctx, "h1", 4242)
        assert package is not None and package["jobId"] == queued["id"]
        counts = {h["name"]: h["runningJobs"] for h in hosts.list_hosts(ctx)}
        assert counts == {"h1": 1, "h2": 0, hosts.local_host_name(): 0}, counts
        assert hosts.show_host(ctx, "h1")["runningJobIds"] == [queued["id"]]
