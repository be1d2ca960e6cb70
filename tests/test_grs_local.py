"""GRS between two directories, through the CLI (fast: a 2 MiB disk): a configured default
secondary makes new vaults GRS, replication copies a complete vault, and a restore
`--from-secondary` works with the primary gone."""

from __future__ import annotations

import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from helpers import PASSPHRASE, Cli, assert_same_image
from test_notify import Hooks, webhook  # noqa: F401 (fixture: a real local HTTP server)
from test_space_alerts import metric
from vmvault.catalog.db import Catalog
from vmvault.catalog.models import VaultRow
from vmvault.service.context import Context
from vmvault.service.replication import Replicator
from vmvault.settings import Settings


def _serve_replicates_once(home: Path) -> None:
    """The service's replicator thread, in this process on the CLI's home, until its first pass."""
    catalog = Catalog.open(home / "catalog.db")
    ctx = Context(settings=Settings(home=home, passphrase=PASSPHRASE), catalog=catalog)
    replicator = Replicator(ctx, every_s=0.2)
    replicator.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with ctx.catalog.read() as s:
                rows = [r.replication for r in s.scalars(select(VaultRow)) if r.secondary_storage]
            if rows and all((r or {}).get("lastRun") for r in rows):
                return
            time.sleep(0.2)
        raise AssertionError("the service's replicator made no pass")
    finally:
        replicator.stop()
        catalog.close()


def test_default_secondary_makes_grs_and_the_secondary_alone_restores(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home", extra_env={"VMVAULT_DEFAULT_SECONDARY": str(tmp_path / "region2")})
    made = cli.ok("vault", "create", "v1", "--storage", str(tmp_path / "region1" / "v1")).json()["properties"]
    assert made["redundancy"] == "GRS" and made["secondaryStorage"] == str(tmp_path / "region2" / "v1"), made
    assert made["replication"]["state"] == "NotStarted"
    lrs = cli.ok("vault", "create", "v2", "--redundancy", "LRS").json()["properties"]
    assert lrs["redundancy"] == "LRS" and lrs["secondaryStorage"] is None
    refused = cli.fails("vault", "create", "v3", "--secondary", str(tmp_path / "x"), "--redundancy", "LRS")
    assert "--secondary is for GRS" in refused.output and not (tmp_path / "x").exists()

    disk = tmp_path / "disk.raw"
    disk.write_bytes(random.Random(5).randbytes(2 << 20))
    assert cli.vm_add("vm1", disk).ok and cli.protection_enable("vm1", "v1").ok
    assert cli.backup_now("vm1").ok
    (rp,) = cli.point_ids("vm1")
    _serve_replicates_once(cli.home)  # what `vmvault serve` does every VMVAULT_GRS_INTERVAL seconds
    state = cli.ok("vault", "show", "v1").json()["properties"]["replication"]
    assert state["state"] == "Healthy" and state["lastReplicatedPoint"] == rp and state["copied"] > 0, state
    assert state["lagSeconds"] == 0 and state["lagBytes"] == 0, state
    second = tmp_path / "region2" / "v1"
    assert (second / "config").is_file() and (second / "points" / rp).is_file()
    assert not (second / "locks").exists(), "locks are the primary's own: never replicated"
    again = cli.ok("vault", "replicate", "v1").json()
    assert again["copied"] == 0, again  # nothing new: nothing copied

    (tmp_path / "region1").rename(tmp_path / "region1-lost")  # the primary is gone
    r = cli.run("restore", "disks", "vm1", "--rp", rp, "--target-dir", str(tmp_path / "out"), "--from-secondary")
    assert r.ok, str(r)
    (restored,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".raw"]
    assert_same_image(restored, disk)
    primary_only = cli.run("restore", "disks", "vm1", "--rp", rp, "--target-dir", str(tmp_path / "out2"))
    assert not primary_only.ok
    cli.ok("vm", "add", "vm2", "--disk", str(disk))
    cli.ok("protection", "enable", "--vm", "vm2", "--vault", "v2")
    assert cli.backup_now("vm2").ok
    (rp2,) = cli.point_ids("vm2")
    jobs_before = cli.ok("job", "list").json()
    lrs_only = cli.fails("restore", "disks", "vm2", "--rp", rp2, "--target-dir", str(tmp_path / "o3"),
                         "--from-secondary")  # fmt: skip
    assert "vault 'v2' has no secondary (LRS)" in lrs_only.output, lrs_only.output
    assert not (tmp_path / "o3").exists(), "refused up front: no target directory created"
    as_vm = cli.fails("restore", "vm", "vm2", "--rp", rp2, "--name", "vm2b", "--from-secondary")
    mount = cli.fails("files", "mount", "vm2", "--rp", rp2, "--mountpoint", str(tmp_path / "m"), "--from-secondary")
    for refused in (as_vm, mount):
        assert "vault 'v2' has no secondary (LRS)" in refused.output, refused.output
    assert not (tmp_path / "m").exists() and not (cli.home / "vms" / "vm2b").exists()
    assert cli.ok("job", "list").json() == jobs_before, "refused up front: no Restore or mount job recorded"


def test_deletions_reach_the_secondary_only_after_the_delay_and_copies_are_checked(tmp_path: Path) -> None:
    """A pack GC deleted on the primary stays on the secondary for the delay (a mistake can be
    undone from there), then goes; a damaged copy is caught on read-back."""
    from vmvault.errors import IntegrityError
    from vmvault.vault.backends.local import LocalBackend
    from vmvault.vault.replicate import replicate_once
    from vmvault.vault.store import Vault

    vault = Vault.create(tmp_path / "primary", tmp_path / "home", PASSPHRASE)
    secondary = LocalBackend(tmp_path / "secondary")
    note = tmp_path / "home" / "missing.json"
    try:
        pack = "data/ab/ffff" + "0" * 28  # not one of the packs read back whole (1 in 8)
        vault.backend.put(pack, b"pack bytes")
        first = replicate_once(vault, secondary, note, delete_delay=3600)
        assert secondary.get(pack) == b"pack bytes" and secondary.exists("config") and first.copied >= 4
        vault.backend.delete(pack)
        kept = replicate_once(vault, secondary, note, delete_delay=3600)
        assert secondary.exists(pack) and kept.pending_deletes == 1 and kept.deleted == 0
        gone = replicate_once(vault, secondary, note, delete_delay=0)
        assert not secondary.exists(pack) and gone.deleted == 1 and gone.pending_deletes == 0

        # A record that does not authenticate (damaged on the primary, or in transit) is refused.
        vault.backend.put("seq/999999999999", b"not sealed")
        with pytest.raises(IntegrityError):
            replicate_once(vault, secondary, note, delete_delay=0)
    finally:
        vault.close()


def test_a_lagging_secondary_raises_one_alert_and_resolves_when_caught_up(
    tmp_path: Path, webhook: tuple[str, Hooks], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A point backed up and not replicated: once older than the threshold (VMVAULT_GRS_LAG_ALERT,
    here 10 s), one alert to the vault's real webhook; `vault replicate --wait` resolves it."""
    from vmvault.service import notify
    from vmvault.service.context import context
    from vmvault.service.replication import check_lag_alerts

    url, hooks = webhook
    cli = Cli(home=tmp_path / "home")
    cli.ok("vault", "create", "v1", "--storage", str(tmp_path / "r1"), "--redundancy", "GRS",
           "--secondary", str(tmp_path / "r2"))  # fmt: skip
    cli.ok("vault", "notify", "add", "v1", "--webhook", url)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(random.Random(7).randbytes(1 << 20))
    assert cli.vm_add("vm1", disk).ok and cli.protection_enable("vm1", "v1").ok and cli.backup_now("vm1").ok
    monkeypatch.setenv("VMVAULT_GRS_LAG_ALERT", "10")
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert check_lag_alerts(ctx, now=ctx.now() + timedelta(seconds=5)) == [], "under the threshold"
        late = ctx.now() + timedelta(seconds=30)
        (alert_id,) = check_lag_alerts(ctx, now=late)
        assert check_lag_alerts(ctx, now=late + timedelta(seconds=30)) == [], "raised once"
        assert notify.deliver_pending(ctx) == 1
        post: dict[str, Any] = hooks.posts[0]["body"]
        assert post["event"] == "ReplicationLagging" and post["vault"] == "v1", post
        assert post["alert"]["id"] == alert_id and post["alert"]["thresholdSeconds"] == 10.0
        assert post["alert"]["lagSeconds"] >= 30 and post["alert"]["lastReplicatedPoint"] is None, post
        assert notify.subject({"alert": {**post["alert"], "kind": "ReplicationLagging"}, "event": "raised"}) == (
            "[vmvault] Replication lagging: v1"
        )

        lag_metric = "vmvault_vault_replication_lag_seconds"
        assert metric(ctx, lag_metric) > 0, "the metric sees the point waiting, with no replication pass yet"

        state = cli.ok("vault", "replicate", "v1", "--wait").json()
        assert state["state"] == "Healthy", state
        assert metric(ctx, lag_metric) == 0
        assert check_lag_alerts(ctx, now=late + timedelta(seconds=60)) == [alert_id]
        assert notify.deliver_pending(ctx) == 1
        assert hooks.posts[1]["body"]["event"] == "ReplicationCaughtUp"
        assert check_lag_alerts(ctx, now=late + timedelta(seconds=90)) == []
