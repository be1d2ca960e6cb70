"""GRS between two directories, through the CLI (fast: a 2 MiB disk): a configured default
secondary makes new vaults GRS, replication copies a complete vault, and a restore
`--from-secondary` works with the primary gone."""

from __future__ import annotations

import random
from pathlib import Path

from helpers import Cli, assert_same_image


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
    state = cli.ok("vault", "replicate", "v1", "--wait").json()
    assert state["state"] == "Healthy" and state["lastReplicatedPoint"] == rp and state["copied"] > 0, state
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
    lrs_only = cli.fails("restore", "disks", "vm2", "--rp", rp2, "--target-dir", str(tmp_path / "o3"),
                         "--from-secondary")  # fmt: skip
    assert "has no secondary (LRS)" in lrs_only.output, lrs_only.output
    assert not list((tmp_path / "o3").glob("*")) if (tmp_path / "o3").exists() else True
