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
