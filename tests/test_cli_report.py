"""Issue 22's CLI additions: `--rp latest`, `job show` recording what a restore did, `vmvault report`
(-o json|csv), and `files browse VM PATH` beside the older `files browse PATH --vm VM`."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from api_support import make_ext4_image
from helpers import Cli
from vmvault.cli.files import _browse_args
from vmvault.errors import InvalidInput


def test_restore_latest_is_recorded_and_reported(cli: Cli, tmp_path: Path) -> None:
    disk = make_ext4_image(tmp_path / "web1.raw", 8, {"a.txt": b"report\n"})
    cli.ok("vault", "create", "main")
    cli.ok("vm", "add", "web1", "--disk", str(disk))
    cli.ok("protection", "enable", "web1", "--vault", "main")
    refused = cli.run("restore", "disks", "web1", "--rp", "latest", "--target-dir", str(tmp_path / "none"))
    assert refused.returncode != 0 and "has no recovery point to restore" in refused.output
    cli.ok("backup", "now", "web1")
    newest = cli.ok("recoverypoint", "list", "web1").json()[0]["name"]
    target = tmp_path / "restored"
    job = cli.ok("restore", "disks", "web1", "--rp", "LATEST", "--target-dir", str(target)).json()
    shown = cli.ok("job", "show", job["name"]).json()
    record = shown["properties"]["extendedInfo"]["restore"]
    assert record["recoveryPoint"] == newest and record["targetDir"] == str(target)
    assert record["files"] == [str(target / "disk0.raw")]
    assert (target / "disk0.raw").read_bytes() == disk.read_bytes()

    report = cli.ok("report", "--days", "7").json()
    item = next(r for r in report["rows"] if r["scope"] == "item")
    assert (item["item"], item["vault"], item["backups"], item["successRate"]) == ("web1", "main", 1, 1.0)
    assert item["bytesTransferred"] > 0 and item["storedGrowthBytes"] > 0
    assert next(r for r in report["rows"] if r["scope"] == "vault")["backups"] == 1
    rows = list(csv.DictReader(io.StringIO(cli.ok("report", "--days", "7", "-o", "csv").stdout)))
    assert [(r["scope"], r["item"]) for r in rows] == [("item", "web1"), ("vault", "")]
    assert cli.run("report", "--days", "0").returncode != 0


def test_files_browse_takes_the_vm_first_and_keeps_the_older_form() -> None:
    assert _browse_args("web1", "vol1/etc", None) == ("web1", "vol1/etc")
    assert _browse_args("web1", "", None) == ("web1", "")
    assert _browse_args("vol1/etc", "", "web1") == ("web1", "vol1/etc")  # files browse PATH --vm VM
    assert _browse_args("", "", "web1") == ("web1", "")
    assert _browse_args("web1", "vol1", "web1") == ("web1", "vol1")
    with pytest.raises(InvalidInput):
        _browse_args("", "", None)
    with pytest.raises(InvalidInput):
        _browse_args("web2", "vol1", "web1")


def test_a_restore_record_reaches_the_restore_jobs_created_in_its_block(tmp_path: Path) -> None:
    """How restore_as_new_vm records a restore whose job is created deep inside restore_vm/restore_libvirt."""
    from api_support import sandbox
    from vmvault.service import jobs

    with sandbox(tmp_path / "home") as box:
        with jobs.recording_restore({"mode": "vm", "recoveryPoint": "rp1", "newVm": "web1-copy"}):
            restore = jobs.create_job(
                box.ctx, jobs.Operation.RESTORE, vm=None, vault=None, details={"restore": {"state": "Starting"}}
            )
            backup = jobs.create_job(box.ctx, jobs.Operation.BACKUP, vm=None, vault=None)
        after = jobs.create_job(box.ctx, jobs.Operation.RESTORE, vm=None, vault=None)
        jobs.add_restore_record(box.ctx, restore.id, {"definitionFile": "/srv/web1-copy.json"})
        info = jobs.describe_job(box.ctx, restore.id)["extendedInfo"]["restore"]
        assert info == {"mode": "vm", "recoveryPoint": "rp1", "newVm": "web1-copy", "state": "Starting",
                        "definitionFile": "/srv/web1-copy.json"}  # fmt: skip
        assert jobs.describe_job(box.ctx, backup.id)["extendedInfo"]["restore"] is None
        assert jobs.describe_job(box.ctx, after.id)["extendedInfo"]["restore"] is None
