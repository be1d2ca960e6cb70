"""Protection (enable, update, disable, resume), items as az shows them, job filters, vault delete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli

MiB = 1 << 20


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """Not about passphrases: only `vault create` gets one; the host key opens the vault (no scrypt)."""
    return HostKeyCli(home=tmp_path / "home")


def tiny_disk(path: Path, seed: int) -> Path:
    """An 8 MiB raw image: 2 MiB of seeded data in the middle, zeros elsewhere."""
    import random

    data = bytearray(8 * MiB)
    data[3 * MiB : 5 * MiB] = random.Random(seed).randbytes(2 * MiB)
    path.write_bytes(bytes(data))
    return path


def tasks(cli: Cli, job_id: str) -> list[str]:
    info = cli.ok("job", "show", job_id).json()["properties"]["extendedInfo"]
    return [t["disk"] for t in info["tasksList"]]


def item(cli: Cli, vm: str = "vm1") -> dict[str, Any]:
    """The item's properties (Azure's shape: id, name, type, properties)."""
    result: dict[str, Any] = cli.ok("item", "show", vm).json()
    assert (result["name"], result["id"]) == (vm, f"/vaults/v1/backupProtectedItems/{vm}"), result
    properties: dict[str, Any] = result["properties"]
    return properties


def test_item_life_cycle(cli: Cli, tmp_path: Path) -> None:
    d0, d1 = tiny_disk(tmp_path / "d0.raw", 1), tiny_disk(tmp_path / "d1.raw", 2)
    cli.vault_create("v1", tmp_path / "v1")
    assert cli.vm_add("vm1", d0, d1).ok

    r = cli.fails("protection", "enable", "vm1", "--vault", "v1", "--exclude-disk", "disk0", "--exclude-disk", "disk1")
    assert r.returncode == 64 and "nothing to back up" in r.stderr, r
    r = cli.fails("protection", "enable", "vm1", "--vault", "v1", "--exclude-disk", "disk7")
    assert r.returncode == 66 and "disk7" in r.stderr, r
    r = cli.fails("protection", "enable", "vm1", "--vault", "v1", "--policy", "NoSuchPolicy")
    assert r.returncode == 66, r
    assert cli.ok("item", "list").json() == [], "refused enables store nothing"

    job = cli.ok("protection", "enable", "vm1", "--vault", "v1", "--exclude-disk", "disk1").json()["properties"]
    assert (job["operation"], job["status"]) == ("ConfigureBackup", "Completed")
    first = item(cli)
    assert first["protectionState"] == "IRPending"
    assert first["lastBackupStatus"] == "Warning (Initial backup pending)"
    assert first["policyName"] == "DefaultPolicy" and first["timeZone"] == "UTC"
    assert first["policyId"] == "/vaults/v1/backupPolicies/DefaultPolicy"
    assert first["nextScheduledBackup"].endswith("T20:30:00+00:00")
    assert (first["extendedInfo"]["recoveryPointCount"], first["lastRecoveryPoint"], first["lastBackupTime"]) == (
        0, None, None
    )  # fmt: skip
    assert first["excludedDisks"] == ["disk1"]
    r = cli.fails("protection", "enable", "vm1", "--vault", "v1", "--policy", "DefaultPolicy", "--exclude-disk",
                  "disk0")  # fmt: skip
    assert "protection update" in r.stderr, r

    # A backup leaves the excluded disk out.
    b1 = cli.ok(*cli.backup_args("vm1")).json()
    assert tasks(cli, b1["name"]) == ["disk0"]
    (point,) = cli.points("vm1")
    after = item(cli)
    assert (after["protectionState"], after["lastBackupStatus"], after["healthStatus"]) == (
        "Protected", "Completed", "Passed"
    )  # fmt: skip
    assert after["lastRecoveryPoint"] == point["properties"]["recoveryPointTime"]
    assert after["extendedInfo"]["recoveryPointCount"] == 1
    assert after["lastBackupTime"] == b1["properties"]["startTime"] and after["lastBackupJobId"] == b1["name"]

    cli.ok("protection", "update", "vm1", "--all-disks")
    b2 = cli.ok(*cli.backup_args("vm1")).json()
    assert tasks(cli, b2["name"]) == ["disk0", "disk1"]

    # A failed backup shows as Failed in Azure's words.
    moved = tmp_path / "d0.moved"
    shutil.move(d0, moved)
    failed = cli.fails(*cli.backup_args("vm1"))
    shutil.move(moved, d0)
    bad = item(cli)
    assert (bad["lastBackupStatus"], bad["healthStatus"]) == ("Failed", "ActionRequired"), bad
    assert bad["lastBackupError"]["code"] == failed.json()["properties"]["errorDetails"][0]["errorCode"] == "not_found"
    assert (bad["protectionStatus"], bad["lastBackupJobId"]) == ("Unhealthy", cli.jobs()[0]["name"])

    # Disable: no more backups, the data stays.
    job = cli.ok("protection", "disable", "vm1").json()["properties"]
    assert (job["operation"], job["status"]) == ("DisableBackup", "Completed")
    stopped = item(cli)
    assert stopped["protectionState"] == "ProtectionStopped" and stopped["nextScheduledBackup"] is None
    assert stopped["extendedInfo"]["recoveryPointCount"] == 2
    r = cli.fails(*cli.backup_args("vm1"))
    assert r.returncode == 64 and "protection resume" in r.stderr, r
    r = cli.fails("protection", "disable", "vm1")
    assert "already ProtectionStopped" in r.stderr, r
    r = cli.fails("vault", "delete", "v1")
    assert r.returncode == 64 and "vm1 (ProtectionStopped)" in r.stderr, r
    assert (tmp_path / "v1" / "config").exists()

    cli.ok("protection", "resume", "vm1")
    resumed = item(cli)
    assert resumed["protectionState"] == "Protected" and resumed["nextScheduledBackup"] is not None

    # Job filters.
    backups = cli.ok("job", "list", "--item", "vm1", "--operation", "backup").json()
    assert [j["name"] for j in backups][-2:] == [b2["name"], b1["name"]] and len(backups) == 3
    failed_jobs = cli.ok("job", "list", "--status", "failed").json()
    assert [j["properties"]["status"] for j in failed_jobs] == ["Failed"]
    assert cli.ok("job", "list", "--since", "2999-01-01").json() == []
    assert len(cli.ok("job", "list", "--since", b2["properties"]["startTime"], "--operation", "Backup").json()) == 2
    r = cli.fails("job", "list", "--since", "yesterday")
    assert r.returncode == 64, r
    r = cli.fails("job", "list", "--status", "Sleeping")
    assert r.returncode == 64 and "InProgress" in r.stderr, r
    table = cli.ok("item", "list", json_output=False).stdout
    assert "vm1" in table and "Protected" in table


def test_vault_delete(cli: Cli, tmp_path: Path) -> None:
    cli.vault_create("empty", tmp_path / "empty")
    cli.ok("vault", "notify", "add", "empty", "--webhook", "http://127.0.0.1:9/x")
    deleted = cli.ok("vault", "delete", "empty").json()
    assert deleted["name"] == "empty" and deleted["properties"]["storageDeleted"] is True
    assert not (tmp_path / "empty").exists()
    assert cli.ok("vault", "list").json() == []
    # The name can be used again at once.
    cli.vault_create("empty", tmp_path / "empty2")
    assert [p["name"] for p in cli.ok("policy", "list", "--vault", "empty").json()] == ["DefaultPolicy"]
    r = cli.fails("vault", "delete", "nosuch")
    assert r.returncode == 66, r


def test_queued_backup_cancel_and_one_backup_per_vm(tmp_path: Path, catalog_url: str | None) -> None:
    """In-process: a queued job is cancelled at once; a second backup of the VM is refused by the catalog."""
    import pytest
    from sqlalchemy.exc import IntegrityError

    from vmvault.catalog.models import JobRow
    from vmvault.errors import Busy
    from vmvault.service import backups, jobs, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.settings import Settings

    settings = Settings(home=tmp_path / "home", passphrase="correct horse battery staple", catalog_url=catalog_url)
    with context(settings) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "vm1", [tiny_disk(tmp_path / "d.raw", 3)])
        protection.enable_protection(ctx, "vm1", "v1")
        queued = backups.backup_now(ctx, "vm1", queue=True).job
        assert queued["status"] == "InProgress"
        info = jobs.describe_job(ctx, queued["id"])["extendedInfo"]
        assert info["queued"] is True and info["owner"] is None and info["trigger"] == "OnDemand"
        with pytest.raises(Busy, match="queued for vmvault serve"):
            backups.backup_now(ctx, "vm1")
        # Even a writer that skips the check cannot insert a second running backup of the VM.
        row = JobRow(id="x" * 36, operation="Backup", status="InProgress", vm="vm1", vault="v1",
                     start_time="2026-01-01T00:00:00.000000Z", end_time=None, progress={}, error=None,
                     owner_pid=1, owner_boot_id="", heartbeat="2026-01-01T00:00:00.000000Z")  # fmt: skip
        with pytest.raises(IntegrityError), ctx.catalog.write() as s:
            s.add(row)
            s.flush()
        cancelled = jobs.cancel_job(ctx, queued["id"])
        assert cancelled["status"] == "Cancelled" and cancelled["error"]["code"] == "cancelled"
        outcome = backups.backup_now(ctx, "vm1")
        assert outcome.job["status"] == "Completed"
        with pytest.raises(Exception, match="already ended"):
            jobs.cancel_job(ctx, queued["id"])
        # A backup queued for a service that is not running (any more) is run by whoever follows it.
        orphan = backups.backup_now(ctx, "vm1", queue=True).job
        followed = backups.follow_backup(ctx, orphan["id"])
        assert followed.job["status"] == "Completed" and followed.job["id"] == orphan["id"]
        owner = jobs.describe_job(ctx, orphan["id"])["extendedInfo"]["owner"]
        assert owner is not None and owner["pid"] == os.getpid()
