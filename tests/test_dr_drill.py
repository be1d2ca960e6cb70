"""Issue 18 item 4: the disaster-recovery drill. A server with two vaults, three protected VMs
and a custom policy loses its whole home; a new home imports both vaults with their passphrase
and gets back the same protection (vault, policy, excluded disks), the next backups deduplicate
against the old data, and every point restores byte-identical.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, assert_same_image, far_time_zone, head_of_image


def _items(cli: Cli) -> list[dict[str, Any]]:
    """Each item's name and, in Azure's shape, what protection it has."""
    keys = ("vaultName", "policyName", "protectionState", "excludedDisks", "timeZone", "nextScheduledBackup")
    shown = ({"name": i["name"], **{k: i["properties"][k] for k in keys}} for i in cli.ok("item", "list").json())
    return sorted(shown, key=lambda i: i["name"])


def _vault_bytes(storage: Path) -> int:
    return sum(p.stat().st_size for p in (storage / "data").rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_lost_server_is_rebuilt_from_its_vaults(small_image: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cli = Cli(home=home)
    disks = {
        "vm1": [head_of_image(small_image, tmp_path / "vm1-disk0.raw", 8 << 20)],
        "vm2": [tmp_path / "vm2-disk0.raw", tmp_path / "vm2-disk1.raw"],
        "vm3": [tmp_path / "vm3-disk0.raw"],
    }
    for n, path in enumerate(disks["vm2"] + disks["vm3"]):
        path.write_bytes(random.Random(n).randbytes(2 << 20))
    stores = {"v1": tmp_path / "store1", "v2": tmp_path / "store2"}
    # DefaultPolicy's slot (and nightly's, its copy) hours away: across 20:30 UTC the next scheduled
    # backup compared below moved between the two homes (today's slot, overdue, shows as "now").
    zone = far_time_zone()
    for vault, storage in stores.items():
        cli.vault_create(vault, storage, time_zone=zone)
    policy = cli.ok("policy", "show", "DefaultPolicy", "--vault", "v1").json()
    policy["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] = 30
    (tmp_path / "nightly.json").write_text(json.dumps(policy))
    cli.ok("policy", "create", "nightly", "--vault", "v1", "--file", str(tmp_path / "nightly.json"))
    for vm, paths in disks.items():
        assert cli.vm_add(vm, *paths).ok
    cli.ok("protection", "enable", "vm1", "--vault", "v1", "--policy", "nightly")
    cli.ok("protection", "enable", "vm2", "--vault", "v1", "--exclude-disk", "disk1")
    cli.ok("protection", "enable", "vm3", "--vault", "v2")
    for vm in disks:
        assert cli.backup_now(vm).ok
    before = _items(cli)
    nightly = cli.ok("policy", "show", "nightly", "--vault", "v1").json()["properties"]
    points = {vm: cli.point_ids(vm) for vm in disks}
    stored = {v: _vault_bytes(s) for v, s in stores.items()}

    shutil.rmtree(home)  # the server is lost; its vaults survive
    new = Cli(home=tmp_path / "new-home")
    for vault, storage in stores.items():
        r = new.vault_import(storage, name=vault)
        assert r.ok and r.json()["properties"]["notImported"] == [], str(r)
    assert _items(new) == before
    assert new.ok("policy", "show", "nightly", "--vault", "v1").json()["properties"] == nightly
    assert {v["name"]: v["kind"] for v in new.vms()} == {"vm1": "disks", "vm2": "disks", "vm3": "disks"}

    for vm in disks:
        r = new.backup_now(vm)
        assert r.ok, str(r)
    for vault, storage in stores.items():  # the unchanged disks were deduplicated, not stored again
        assert _vault_bytes(storage) - stored[vault] < stored[vault] // 10, vault
    for vm, paths in disks.items():
        for rp in points[vm] + new.point_ids(vm)[len(points[vm]) :]:
            target = tmp_path / f"restore-{rp}"
            r = new.restore_disks(vm, rp, target)
            assert r.ok, str(r)
            for restored in sorted(target.iterdir()):
                assert_same_image(restored, paths[int(restored.stem.removeprefix("disk"))])
    assert new.vault_verify("v1").ok and new.vault_verify("v2").ok
