"""Scheduled verification: a slice a day covers every point within the period (oldest verification
first); a damaged pack fails the day's job, is notified to a real webhook and marks the points."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from helpers import PASSPHRASE, Cli, vault_files, wait_for
from test_notify import Hooks, webhook  # noqa: F401 (fixture)

MiB = 1 << 20


def test_slices_follow_the_oldest_verification() -> None:
    from vmvault.service.verify_schedule import next_slice

    points = [("a", "2026-01-01", None), ("b", "2026-01-02", "2026-02-01"), ("c", "2026-01-03", None),
              ("d", "2026-01-04", "2026-01-15")]  # fmt: skip
    assert next_slice(points, 30) == ["a"]  # ceil(4 / 30) = 1 a day, never verified first
    assert next_slice(points, 2) == ["a", "c"]
    assert next_slice(points, 1) == ["a", "c", "d", "b"]
    assert next_slice([], 30) == [] and next_slice(points, 0) == []


def test_a_slice_a_day_then_a_damaged_pack_fails_and_is_notified(
    cli: Cli, tmp_path: Path, webhook: tuple[str, Hooks]  # noqa: F811
) -> None:
    from vmvault.service import verify_schedule
    from vmvault.service.context import context
    from vmvault.settings import Settings

    url, hooks = webhook
    disk = tmp_path / "d.raw"
    storage = tmp_path / "v1"
    cli.vault_create("v1", storage)
    cli.ok("vault", "notify", "add", "v1", "--webhook", url)  # failed jobs only
    for _ in range(3):  # three points, each with new data
        disk.write_bytes(os.urandom(MiB) + bytes(MiB))
        if not cli.vms():
            assert cli.vm_add("vm1", disk).ok
            assert cli.protection_enable("vm1", "v1").ok
        cli.ok(*cli.backup_args("vm1"))
    points = {p["name"] for p in cli.points("vm1")}
    assert len(points) == 3

    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert verify_schedule.due_vaults(ctx) == ["v1"]
        (first,) = verify_schedule.run_due(ctx, period_days=2)  # ceil(3 / 2) = 2 points today
        assert verify_schedule.due_vaults(ctx) == [], "one slice a day"
        tomorrow = ctx.now() + timedelta(days=1)
        assert verify_schedule.due_vaults(ctx, tomorrow) == ["v1"]
        (second,) = verify_schedule.run_due(ctx, period_days=2, now=tomorrow)
    jobs = {j["name"]: j["properties"] for j in cli.jobs()}
    assert jobs[first]["status"] == jobs[second]["status"] == "Completed"
    shown = {p["name"]: p["properties"]["verification"] for p in cli.points("vm1")}
    assert all(v["state"] == "Passed" for v in shown.values()), shown  # all three within two days
    details = [cli.ok("job", "show", job_id).json()["properties"] for job_id in (first, second)]
    assert [d["extendedInfo"]["trigger"] for d in details] == ["Scheduled", "Scheduled"]
    assert [d["operation"] for d in details] == ["Verify", "Verify"]
    assert hooks.posts == []

    for pack in vault_files(storage, "data"):  # damage every data pack: each point reads one
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pack.write_bytes(bytes(data))
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        (third,) = verify_schedule.run_due(ctx, period_days=1, now=ctx.now() + timedelta(days=2))
    failed = cli.ok("job", "show", third).json()["properties"]
    assert failed["status"] == "Failed" and failed["errorDetails"][0]["errorCode"] == "integrity_error", failed
    wait_for(lambda: len(hooks.posts) >= 1, 30, "the failure notification")
    assert hooks.posts[0]["body"]["job"]["name"] == third
    shown = {p["name"]: p["properties"]["verification"] for p in cli.points("vm1")}
    assert all(v["state"] == "Failed" and v["problem"] for v in shown.values()), shown


def test_a_vault_has_its_own_period(cli: Cli, tmp_path: Path) -> None:
    from vmvault.service import verify_schedule
    from vmvault.service.context import context
    from vmvault.settings import Settings

    disk = tmp_path / "d.raw"
    disk.write_bytes(os.urandom(MiB))
    cli.vault_create("v1", tmp_path / "v1")
    cli.vault_create("v2", tmp_path / "v2")
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok
    cli.ok(*cli.backup_args("vm1"))
    assert cli.ok("vault", "verify-schedule", "v1").json()["verifyEveryDays"] is None
    assert cli.ok("vault", "verify-schedule", "v2", "--every", "0").json()["effect"] == "off"
    r = cli.fails("vault", "verify-schedule", "v1", "--every", "-3")
    assert r.returncode == 64 and "--every" in r.output, r
    assert cli.ok("vault", "verify-schedule", "v1").json()["verifyEveryDays"] is None  # unchanged
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert verify_schedule.due_vaults(ctx, default_days=30) == ["v1"]  # v2 is off
        assert verify_schedule.due_vaults(ctx, default_days=0) == []  # the service's period is off
    assert cli.ok("vault", "verify-schedule", "v1", "--every", "7").json()["verifyEveryDays"] == 7
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert verify_schedule.due_vaults(ctx, default_days=0) == ["v1"]  # its own period wins
        (job_id,) = verify_schedule.run_due(ctx, period_days=0)
    assert cli.ok("job", "show", job_id).json()["properties"]["status"] == "Completed"
    assert cli.ok("vault", "verify-schedule", "v1", "--default").json()["verifyEveryDays"] is None
