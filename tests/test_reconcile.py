"""Issue 18 item 1: what a crash leaves half-recorded is reconciled at the next start.

The kills land at the product's own publishing steps (VMVAULT_TEST_KILL_AT, src/vmvault/testhooks.py):
- `backup:manifest-published`: the point is in the vault but not in the catalog, the job reaped as
  Failed. `vault verify`, the next backup of the VM and the start of `vmvault serve` each adopt it:
  the point is listed and restores byte-identical, the job reads Completed with a note.
- `retention:manifest-deleted`: the catalog still lists a point retention deleted; the next
  reconciliation removes the row and the vault verifies clean.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, Protected, assert_same_image, head_of_image
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def _killed_backup(prot: Protected, step: str) -> str:
    """Run a backup that SIGKILLs itself at `step`; returns its job id."""
    before = {j["name"] for j in prot.cli.jobs()}
    doomed = Cli(home=prot.cli.home, extra_env={"VMVAULT_TEST_KILL_AT": step})
    r = doomed.backup_now(prot.vm)
    assert r.returncode == -signal.SIGKILL, str(r)
    (job,) = [j for j in prot.cli.jobs() if j["name"] not in before]
    return str(job["name"])


def _job(cli: Cli, job_id: str) -> dict[str, Any]:
    """The job's properties (Azure shape)."""
    return dict(cli.ok("job", "show", job_id).json()["properties"])


@pytest.fixture
def killed_in_manifest_window(small_image: Path, tmp_path: Path) -> tuple[Protected, str, str]:
    disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    job_id = _killed_backup(prot, "backup:manifest-published")
    (manifest,) = list((prot.storage / "points").iterdir())
    assert prot.cli.point_ids(prot.vm) == [], "the catalog recorded the point before the kill"
    job = _job(prot.cli, job_id)
    assert job["status"] == "Failed", job  # reaped: its process is gone
    return prot, job_id, manifest.name


def _assert_adopted(prot: Protected, job_id: str, rp: str, tmp_path: Path) -> None:
    assert rp in prot.cli.point_ids(prot.vm)
    job = _job(prot.cli, job_id)
    assert job["status"] == "Completed" and job["errorDetails"] == [], job
    info = job["extendedInfo"]
    assert isinstance(info, dict) and info["recoveryPoint"] == rp and "reconciled" in str(info["reconciled"]), job
    r = prot.cli.restore_disks(prot.vm, rp, tmp_path / "out")
    assert r.ok, str(r)
    (restored,) = list((tmp_path / "out").iterdir())
    assert_same_image(restored, prot.disk)


def test_verify_adopts_a_point_whose_backup_died_before_the_catalog(
    killed_in_manifest_window: tuple[Protected, str, str], tmp_path: Path
) -> None:
    prot, job_id, rp = killed_in_manifest_window
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)
    assert [p["recoveryPoint"] for p in r.json()["adoptedPoints"]] == [rp], str(r)
    _assert_adopted(prot, job_id, rp, tmp_path)


def test_the_next_backup_adopts_it_first(killed_in_manifest_window: tuple[Protected, str, str], tmp_path: Path) -> None:
    prot, job_id, rp = killed_in_manifest_window
    assert prot.cli.backup_now(prot.vm).ok
    assert len(prot.cli.point_ids(prot.vm)) == 2
    _assert_adopted(prot, job_id, rp, tmp_path)


def test_serve_adopts_it_at_start(killed_in_manifest_window: tuple[Protected, str, str], tmp_path: Path) -> None:
    prot, job_id, rp = killed_in_manifest_window
    serve = prot.cli.popen("serve", "--listen", "127.0.0.1:0", "--retention-every", "0", json_output=False)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()  # announced after the reconciliation at start
        assert "listening on" in line, line
        assert rp in prot.cli.point_ids(prot.vm)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
    _assert_adopted(prot, job_id, rp, tmp_path)


def test_a_point_retention_deleted_before_a_kill_leaves_the_catalog(small_image: Path, tmp_path: Path) -> None:
    disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    assert prot.cli.backup_now(prot.vm, retain_until=tomorrow).ok
    assert prot.cli.backup_now(prot.vm).ok
    first, second = prot.cli.point_ids(prot.vm)
    later = {"VMVAULT_TEST_CLOCK_OFFSET_S": str(3 * 24 * 3600)}
    doomed = Cli(home=prot.cli.home, extra_env={**later, "VMVAULT_TEST_KILL_AT": "retention:manifest-deleted"})
    r = doomed.run("retention", "run", "--vault", prot.vault, "--no-gc")
    assert r.returncode == -signal.SIGKILL, str(r)
    assert not (prot.storage / "points" / first).exists()
    assert prot.cli.point_ids(prot.vm) == [first, second]  # the window the kill left

    r = Cli(home=prot.cli.home, extra_env=later).run("vault", "verify", prot.vault)
    assert r.ok, str(r)
    assert [p["recoveryPoint"] for p in r.json()["droppedPoints"]] == [first], str(r)
    assert prot.cli.point_ids(prot.vm) == [second]
