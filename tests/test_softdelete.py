"""Soft delete as Azure's: disable --delete-data hides the points for 14 days, undelete brings them
back, and the Retention job purges them afterwards; garbage collection keeps soft-deleted data.

Time passes through the test-only clock offset (VMVAULT_TEST_CLOCK_OFFSET_S) of the Retention job.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import Cli, assert_same_image, rp_id
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)
from test_gc import vault_bytes, whole_mib_disk

DAY = 24 * 3600


def later(cli: Cli, days: float) -> Cli:
    offset = {"VMVAULT_TEST_CLOCK_OFFSET_S": str(int(days * DAY))}
    return Cli(home=cli.home, passphrase=cli.passphrase, extra_env=offset)


def listed(cli: Cli, vm: str, *extra: str) -> list[dict[str, Any]]:
    return list(cli.ok("recoverypoint", "list", vm, *extra).json())


def test_soft_delete_undelete_and_purge(small_image: Path, tmp_path: Path) -> None:
    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli, vm = prot.cli, prot.vm
    assert cli.backup_now(vm).ok
    (first,) = cli.point_ids(vm)

    job = cli.ok("protection", "disable", vm, "--delete-data").json()["properties"]
    assert (job["operation"], job["status"]) == ("DeleteBackupData", "Completed"), job
    deadline = job["deferredDeleteTimeInUTC"]
    assert deadline[:10] > job["startTime"][:10]
    # The item as Azure shows a soft-deleted one: stopped, scheduled for deferred delete.
    item = cli.ok("item", "show", vm).json()["properties"]
    assert (item["protectionState"], item["isScheduledForDeferredDelete"]) == ("ProtectionStopped", True), item
    assert item["deferredDeleteTimeInUTC"] == deadline

    # Hidden, listed on request, not restorable, no new backups.
    assert listed(cli, vm) == []
    (shown,) = listed(cli, vm, "--include-deleted")
    assert (rp_id(shown), shown["properties"]["recoveryPointProperties"]["isSoftDeleted"]) == (first, True)
    r = cli.fails(*["restore", "disks", vm, "--rp", first, "--target-dir", str(tmp_path / "nope")])
    assert "soft deleted" in r.stderr and "protection undelete" in r.stderr, r
    assert not (tmp_path / "nope").exists()
    cli.fails(*cli.backup_args(vm))
    assert cli.ok("vm", "show", vm).json()["protectionState"] == "SoftDeleted"

    # Garbage collection keeps soft-deleted data; retention neither expires nor purges it before 14 days.
    report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert report["packsDeleted"] == report["packsRepacked"] == 0 and report["pointsMarked"] == 1, report
    result = later(cli, 13).ok("retention", "run", "--no-gc").json()
    assert result["vaults"][0]["deletedPoints"] == [] and result["vaults"][0]["purgedItems"] == []

    # Undelete (Azure's Undelete operation): back, stopped, restorable; resume takes backups again.
    undone = cli.ok("protection", "undelete", vm).json()["properties"]
    assert (undone["operation"], undone["status"]) == ("Undelete", "Completed"), undone
    item = cli.ok("item", "show", vm).json()["properties"]
    assert (item["isScheduledForDeferredDelete"], item["deferredDeleteTimeInUTC"]) == (False, None), item
    assert [rp_id(p) for p in listed(cli, vm)] == [first]
    assert cli.ok("vm", "show", vm).json()["protectionState"] == "ProtectionStopped"
    r = cli.restore_disks(vm, first, tmp_path / "out")
    assert r.ok, str(r)
    assert_same_image(next((tmp_path / "out").iterdir()), disk)
    cli.ok("protection", "resume", vm)
    assert cli.backup_now(vm).ok
    points = cli.point_ids(vm)
    assert len(points) == 2 and points[0] == first

    # Delete again and let 15 days pass: the Retention job purges the item and its points.
    cli.ok("protection", "disable", vm, "--delete-data")
    r = later(cli, 15).fails("protection", "undelete", vm)  # too late: it is being purged
    assert "cannot be undeleted" in r.stderr, r
    before = vault_bytes(prot.storage)
    result = later(cli, 15).ok("retention", "run", "--no-gc").json()
    (entry,) = result["vaults"]
    assert sorted(p["id"] for p in entry["deletedPoints"]) == sorted(points)
    assert entry["purgedItems"] == [vm]
    assert listed(cli, vm, "--include-deleted") == []
    assert cli.ok("vm", "show", vm).json()["protectionState"] == "NotProtected"
    assert list((prot.storage / "points").iterdir()) == []
    cli.fails("protection", "undelete", vm)

    report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert report["pointsMarked"] == 0 and report["packsDeleted"] >= 1, report
    assert vault_bytes(prot.storage) < before // 10
    r = cli.vault_verify(prot.vault)
    assert r.ok, str(r)


def test_purge_time_is_fourteen_days_after_the_deletion(small_image: Path, tmp_path: Path) -> None:
    from datetime import datetime

    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    job = prot.cli.ok("protection", "disable", prot.vm, "--delete-data").json()["properties"]
    start = datetime.fromisoformat(job["startTime"].replace("Z", "+00:00"))
    deadline = datetime.fromisoformat(job["deferredDeleteTimeInUTC"].replace("Z", "+00:00"))
    assert abs(deadline - start - timedelta(days=14)) < timedelta(minutes=1)
