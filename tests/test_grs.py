"""GRS: a vault replicated to a secondary region, and cross-region restore while the primary is down.

Two Azurite instances with different accounts stand for two regions. A GRS vault gets a full and
an incremental backup; `vault replicate --wait` catches up (lag 0); the primary Azurite is stopped;
both points restore byte-identical `--from-secondary`, a file-recovery mount works from it and
`vault verify --secondary` passes; the primary comes back and replication resumes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import objstores
from helpers import Cli, assert_same_image, copy_image, mutate_image, rp_id

pytestmark = pytest.mark.slow


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[tuple[objstores.Server, objstores.Server]]:
    primary = objstores.start_azurite(tmp_path / "region-1")
    secondary = objstores.start_azurite(tmp_path / "region-2")
    try:
        yield primary, secondary
    finally:
        primary.stop()
        secondary.stop()


def test_grs_replicates_and_restores_from_the_secondary_while_the_primary_is_down(
    regions: tuple[objstores.Server, objstores.Server], small_image: Path, tmp_path: Path
) -> None:
    primary, secondary = regions
    first_var, second_var = (f"VMVAULT_AZURE_{a.upper()}" for a in (objstores.DEV_ACCOUNT, objstores.SECOND_ACCOUNT))
    env = {first_var: primary.env[first_var], second_var: secondary.env[second_var]}
    cli = Cli(home=tmp_path / "home", extra_env=env)
    main = objstores.fresh_azure_url(objstores.DEV_ACCOUNT)
    copy = objstores.fresh_azure_url(objstores.SECOND_ACCOUNT)

    refused = cli.fails("vault", "create", "v0", "--storage", str(tmp_path / "v0"), "--redundancy", "GRS")
    assert "--secondary" in refused.output and not (tmp_path / "v0").exists()
    made = cli.ok("vault", "create", "v1", "--storage", main, "--redundancy", "GRS", "--secondary", copy).json()
    assert made["properties"]["secondaryStorage"] == copy
    assert made["properties"]["redundancySettings"]["crossRegionRestore"] == "Enabled"
    lrs = cli.ok("vault", "create", "v2", "--storage", str(tmp_path / "v2")).json()["properties"]
    assert lrs["redundancy"] == "LRS" and lrs["replication"] is None

    disk = copy_image(small_image, tmp_path / "disk.raw")
    assert cli.vm_add("vm1", disk).ok and cli.protection_enable("vm1", "v1").ok
    expected = [copy_image(disk, tmp_path / "expected-0.raw")]
    assert cli.backup_now("vm1").ok
    mutate_image(disk, seed=11, fraction=0.05)
    expected.append(copy_image(disk, tmp_path / "expected-1.raw"))
    assert cli.backup_now("vm1").ok
    points = cli.point_ids("vm1")

    state = cli.ok("vault", "replicate", "v1", "--wait").json()
    assert state["state"] == "Healthy" and state["lagSeconds"] == 0 and state["lagBytes"] == 0, state
    assert state["lastReplicatedPoint"] == points[-1], state
    shown = cli.ok("vault", "show", "v1").json()["properties"]["replication"]
    assert shown["lastReplicatedPoint"] == points[-1] and shown["lastError"] is None, shown

    primary.stop()  # region 1 is down
    for n, rp in enumerate(points):
        out = tmp_path / f"out-{n}"
        r = cli.run("restore", "disks", "vm1", "--rp", rp, "--target-dir", str(out), "--from-secondary")
        assert r.ok, str(r)
        (restored,) = [p for p in out.iterdir() if p.is_file() and p.suffix == ".raw"]
        assert_same_image(restored, expected[n])
        shutil.rmtree(out)
    session = cli.ok("files", "mount", "vm1", "--rp", points[-1], "--from-secondary").json()
    try:
        mounted = [v for v in session["volumes"] if v["status"] == "mounted"]
        assert mounted and mounted[0]["fileSystem"] == "ext4", session
        assert any(Path(str(mounted[0]["path"])).iterdir()), "the secondary's mount shows no files"
    finally:
        cli.run("files", "unmount", "vm1")
    verify = cli.run("vault", "verify", "v1", "--secondary")
    assert verify.ok, str(verify)
    impatient = Cli(home=cli.home, extra_env={**env, "VMVAULT_STORAGE_ATTEMPTS": "2"})
    down = impatient.fails("backup", "now", "--vm", "vm1", timeout=300)  # backups write to the primary
    assert "v1" in down.output or main in down.output, down.output

    # Region 1 comes back: backups and replication resume.
    primary.proc = objstores.start_azurite(primary.where, port=primary.port).proc  # stopped by the fixture
    assert cli.backup_now("vm1").ok
    newest = rp_id(cli.points("vm1")[-1])
    state = cli.ok("vault", "replicate", "v1", "--wait").json()
    assert state["lastReplicatedPoint"] == newest and state["lagBytes"] == 0, state
