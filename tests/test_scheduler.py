"""The scheduler: missed slots run once (injected clock), and a real `vmvault serve` runs a backup on time.

The real run uses the documented test-only clock offset VMVAULT_TEST_CLOCK_OFFSET_S: the service
(and the CLI calls that set the item up) read a clock that is 25 s before a half-hour slot: time for
serve to start, not much more, as the test waits for the slot in real time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from helpers import PASSPHRASE, Cli, HostKeyCli, wait_for

MiB = 1 << 20


def ext4_image(path: Path, random_mib: int) -> Path:
    """A 64 MiB raw disk with an ext4 file system holding random_mib MiB of random data."""
    stage = path.parent / f"{path.stem}-stage"
    stage.mkdir()
    (stage / "data.bin").write_bytes(os.urandom(random_mib * MiB))
    (stage / "notes.txt").write_text("vmvault scheduler test\n" * 100)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(stage), "-F", str(path), "64M"], check=True)
    return path


def policy_file(tmp_path: Path, hhmm: str, tz: str) -> Path:
    doc = {
        "properties": {
            "schedulePolicy": {"scheduleRunFrequency": "Daily", "scheduleRunTimes": [f"2020-01-01T{hhmm}:00Z"]},
            "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
            "timeZone": tz,
        }
    }
    path = tmp_path / f"policy-{hhmm.replace(':', '')}.json"
    path.write_text(json.dumps(doc))
    return path


class Serve:
    """`vmvault serve` as a child process on its own home."""

    def __init__(self, cli: Cli, *extra: str) -> None:
        # Jitter 0 (unless a test gives its own): these tests wait for a backup at its exact slot.
        jitter = () if "--schedule-jitter" in extra else ("--schedule-jitter", "0")
        self.proc = cli.popen("serve", "--listen", "127.0.0.1:0", "--tick", "0.5", *jitter, *extra, json_output=False)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, f"serve did not start: {line!r} {self.stderr()}"
        self.announce = line

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("serve did not stop in time") from None
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode


# ---- missed slots (in process, injected clock) --------------------------------------------------


def test_missed_slots_run_once_and_a_running_backup_covers_its_slot(tmp_path: Path, catalog_url: str | None) -> None:
    from vmvault.catalog import repos
    from vmvault.service import backups, policies, protection, scheduler, vaults, vms
    from vmvault.service.context import context
    from vmvault.settings import Settings

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB) + b"x" * MiB)
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE, catalog_url=catalog_url)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "vm1", [disk])
        policies.create_policy(
            ctx, "v1", "Night", json.loads(policy_file(tmp_path, "02:30", "Europe/Berlin").read_text())
        )
        protection.enable_protection(ctx, "vm1", "v1", policy="Night")
        with ctx.catalog.write() as s:  # last looked at on 2026-03-26 12:00 UTC, then the service was down
            vm = repos.get_vm(s, "vm1")
            repos.update_protected_item(s, vm.id, schedule_anchor="2026-03-26T12:00:00.000000Z")

        def at(text: str) -> datetime:
            return datetime.fromisoformat(text).astimezone(UTC)

        # Not due yet: the first slot after the anchor is 2026-03-27 02:30 CET = 01:30 UTC.
        assert scheduler.tick(ctx, at("2026-03-27T01:29:59+00:00")) == []
        # Back after three missed slots (27, 28 and 29 March): one backup, not three.
        queued = scheduler.tick(ctx, at("2026-03-29T09:00:00+00:00"))
        assert len(queued) == 1
        assert scheduler.tick(ctx, at("2026-03-29T09:00:01+00:00")) == []
        (job,) = [j for j in repos_jobs(ctx) if j.id == queued[0]]
        assert job.owner_pid == 0 and job.details["trigger"] == "Scheduled"
        assert job.details["scheduledFor"] == "2026-03-27T01:30:00.000000Z"  # the first missed slot
        assert job.details["retainUntil"] == "2026-04-03"  # 27 March (local) + 7 days
        # The next slot counts from the restart: 30 March 02:30 CEST = 00:30 UTC. The queued backup
        # still holds the VM then, so that slot is covered, not queued twice.
        assert scheduler.tick(ctx, at("2026-03-30T00:29:00+00:00")) == []
        assert scheduler.tick(ctx, at("2026-03-30T00:30:00+00:00")) == []
        assert len([j for j in repos_jobs(ctx) if j.operation == "Backup"]) == 1
        # Once it ran, the following night's slot queues again.
        claimed = run_queued(ctx, backups)
        assert claimed == queued[0]
        assert [p["consistency"] for p in backups.list_recovery_points(ctx, "vm1")] == ["CrashConsistent"]
        assert len(scheduler.tick(ctx, at("2026-03-31T00:30:00+00:00"))) == 1
        # A stopped item is never queued.
        protection.disable_protection(ctx, "vm1")
        assert scheduler.tick(ctx, at("2026-04-05T00:30:00+00:00")) == []


def repos_jobs(ctx: Any) -> list[Any]:
    from vmvault.catalog import repos

    with ctx.catalog.read() as s:
        return list(repos.list_jobs(s))


def run_queued(ctx: Any, backups: Any) -> str:
    from vmvault.service.worker import claim_next

    job = claim_next(ctx)
    assert job is not None and job.owner_pid == os.getpid()
    outcome = backups.run_claimed_backup(ctx, job)
    assert outcome.job["status"] == "Completed", outcome.job
    return str(job.id)


# ---- the real service ---------------------------------------------------------------------------


# How far ahead of the slot the service's clock starts: the test waits that long in real time.
LEAD_S = 25


def next_half_hour(moment: datetime) -> datetime:
    base = moment.replace(second=0, microsecond=0)
    minutes = 30 - base.minute % 30
    return base + timedelta(minutes=minutes)


@pytest.mark.timeout(300)
@pytest.mark.xdist_group("realtime")  # real-time budgets: never beside another of them (docs/testing.md)
def test_serve_runs_the_scheduled_backup_on_time(tmp_path: Path) -> None:
    # The policy runs at a half-hour slot a few hours ahead (in Kolkata time); the service then
    # reads a clock set LEAD_S before that slot.
    slot = next_half_hour(datetime.now(UTC) + timedelta(hours=3))
    kolkata = slot.astimezone(ZoneInfo("Asia/Kolkata"))
    setup = HostKeyCli(home=tmp_path / "home")
    disk = ext4_image(tmp_path / "disk.raw", 8)
    setup.vault_create("v1", tmp_path / "v1")
    assert setup.vm_add("vm1", disk).ok
    setup.ok("policy", "create", "Soon", "--vault", "v1", "--file",
             str(policy_file(tmp_path, kolkata.strftime("%H:%M"), "Asia/Kolkata")))  # fmt: skip
    setup.ok("protection", "enable", "vm1", "--vault", "v1", "--policy", "Soon")

    offset = (slot - timedelta(seconds=LEAD_S) - datetime.now(UTC)).total_seconds()
    due_real = time.time() + LEAD_S
    cli = HostKeyCli(home=setup.home, extra_env={"VMVAULT_TEST_CLOCK_OFFSET_S": f"{offset:.3f}"})
    shown = cli.ok("item", "show", "vm1").json()["properties"]
    assert shown["nextScheduledBackup"] == kolkata.isoformat(timespec="seconds")
    assert due_real - time.time() <= 90
    serve = Serve(cli)
    try:
        # serve waits for the slot: it is not a missed slot run late
        assert time.time() < due_real - 1, f"serve started {time.time() - due_real:+.1f} s from the slot"

        def backups() -> list[dict[str, Any]]:
            return [j for j in cli.jobs() if j["properties"]["operation"] == "Backup"]

        wait_for(lambda: bool(backups()), 150, "the scheduled backup to start", interval=0.5)
        (job,) = backups()
        started = datetime.fromisoformat(job["properties"]["startTime"].replace("Z", "+00:00")).timestamp()
        assert due_real - 1 <= started <= due_real + 15, f"started {started - due_real:+.1f} s from its slot"
        final = cli.ok("job", "wait", job["name"], "--timeout", "120").json()
        assert final["properties"]["status"] == "Completed", final
        info = cli.ok("job", "show", job["name"]).json()["properties"]["extendedInfo"]
        assert info["trigger"] == "Scheduled" and info["policy"] == "Soon"
        assert info["scheduledFor"] == slot.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        assert info["owner"]["pid"] == serve.proc.pid
        assert [t["status"] for t in info["tasksList"]] == ["Completed"]
        (point,) = cli.points("vm1")
        assert point["name"] == info["recoveryPoint"]
        after = cli.ok("item", "show", "vm1").json()["properties"]
        assert after["lastBackupStatus"] == "Completed" and after["protectionState"] == "Protected"
        assert after["nextScheduledBackup"] == (kolkata + timedelta(days=1)).isoformat(timespec="seconds")

        # With the service running, `backup now` goes to its queue and waits for the job.
        r = cli.ok(*cli.backup_args("vm1"))
        assert "queued to vmvault serve" in r.stderr
        assert r.json()["properties"]["status"] == "Completed"
        shown_job = cli.ok("job", "show", r.json()["name"]).json()
        assert shown_job["properties"]["extendedInfo"]["owner"]["pid"] == serve.proc.pid
        # A second service on the same home is refused.
        second = cli.run("serve", "--listen", "none")
        assert second.returncode == 75 and "already running" in second.stderr, second
    finally:
        code = serve.stop()
    assert code == 0


def test_the_service_runs_retention_when_it_is_due(tmp_path: Path) -> None:
    from vmvault.service import scheduler, vaults
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        maintenance = scheduler.Maintenance(ctx, every_s=3600, first_delay_s=0)
        assert maintenance.due()
        maintenance.start()
        try:
            wait_for(
                lambda: any(j.operation == "Retention" and j.status != "InProgress" for j in repos_jobs(ctx)),
                60,
                "a Retention job to end",
            )
            assert not maintenance.due()
        finally:
            maintenance.stop()
        (job,) = [j for j in repos_jobs(ctx) if j.operation == "Retention"]
        assert job.status == "Completed"


def test_an_enhanced_hourly_policy_queues_each_backup_of_its_window(tmp_path: Path, catalog_url: str | None) -> None:
    from vmvault.catalog import repos
    from vmvault.service import backups, policies, protection, scheduler, vaults, vms
    from vmvault.service.context import context
    from vmvault.settings import Settings

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB) + b"h" * MiB)
    doc = {
        "properties": {
            "policyType": "V2",
            "instantRpRetentionRangeInDays": 2,
            "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicyV2", "scheduleRunFrequency": "Hourly",
                               "hourlySchedule": {"interval": 4, "scheduleWindowStartTime": "2020-01-01T08:00:00Z",
                                                  "scheduleWindowDuration": 12}},
            "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
            "timeZone": "Pacific Standard Time",
        }
    }  # fmt: skip
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE, catalog_url=catalog_url)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "vm1", [disk])
        policies.create_policy(ctx, "v1", "Hourly", doc)
        protection.enable_protection(ctx, "vm1", "v1", policy="Hourly")
        with ctx.catalog.write() as s:  # 1 June 2026, 07:00 PDT
            repos.update_protected_item(s, repos.get_vm(s, "vm1").id, schedule_anchor="2026-06-01T14:00:00.000000Z")

        def at(text: str) -> datetime:
            return datetime.fromisoformat(text).astimezone(UTC)

        # 08:00, 12:00, 16:00 and 20:00 PDT (UTC-7); nothing between them, nothing after 20:00.
        slots = ["2026-06-01T15:00:00", "2026-06-01T19:00:00", "2026-06-01T23:00:00", "2026-06-02T03:00:00"]
        queued: list[str] = []
        for slot in slots:
            assert scheduler.tick(ctx, at(slot + "+00:00") - timedelta(seconds=1)) == [], slot
            jobs = scheduler.tick(ctx, at(slot + "+00:00"))
            assert len(jobs) == 1, slot
            queued += jobs
            assert run_queued(ctx, backups) == jobs[0]
        assert scheduler.tick(ctx, at("2026-06-02T14:59:00+00:00")) == []  # the night: no backup
        assert len(scheduler.tick(ctx, at("2026-06-02T15:00:00+00:00"))) == 1  # 08:00 PDT the next day
        details = {j.id: j.details for j in repos_jobs(ctx)}
        assert [details[j]["scheduledFor"][:16] for j in queued] == [s[:16] for s in slots]
        # The first backup of the (local) day takes the daily rule (7 days), the others instant-RP days (2).
        assert [details[j]["retainUntil"] for j in queued] == ["2026-06-08", "2026-06-03", "2026-06-03", "2026-06-03"]
        assert len(backups.list_recovery_points(ctx, "vm1")) == 4


def test_jitter_queues_each_vm_at_its_planned_start_once_per_slot(tmp_path: Path) -> None:
    """Three VMs of one 20:30 policy, jitter 300 s: each is queued at slot + its own offset, no
    earlier, once; the job records the slot and the planned start; the next slot comes again."""
    from vmvault.catalog import repos
    from vmvault.catalog.clock import from_iso
    from vmvault.domain.schedule import planned_start
    from vmvault.service import policies, protection, scheduler, vaults, vms
    from vmvault.service.context import context
    from vmvault.service.policies import policy_of
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        policies.create_policy(ctx, "v1", "Evening", json.loads(policy_file(tmp_path, "20:30", "UTC").read_text()))
        starts: dict[str, datetime] = {}
        slot = datetime(2026, 6, 1, 20, 30, tzinfo=UTC)
        for name in ("a", "b", "c"):
            disk = tmp_path / f"{name}.raw"
            disk.write_bytes(bytes(MiB))
            vms.add_vm(ctx, name, [disk])
            protection.enable_protection(ctx, name, "v1", policy="Evening")
            with ctx.catalog.write() as s:
                vm = repos.get_vm(s, name)
                repos.update_protected_item(s, vm.id, schedule_anchor="2026-06-01T12:00:00.000000Z")
                policy = policy_of(repos.policy_by_id(s, repos.protected_item(s, vm.id).policy_id))
                starts[name] = planned_start(policy, slot, vm.id, 300)
        assert all(slot <= t < slot + timedelta(seconds=300) for t in starts.values())
        assert len(set(starts.values())) == 3

        queued: dict[str, str] = {}  # VM -> job
        for name, start in sorted(starts.items(), key=lambda kv: kv[1]):
            assert scheduler.tick(ctx, start - timedelta(milliseconds=1), jitter_s=300) == [], name
            (job_id,) = scheduler.tick(ctx, start, jitter_s=300)
            assert scheduler.tick(ctx, start + timedelta(seconds=1), jitter_s=300) == []
            queued[name] = job_id
        jobs = {j.id: j for j in repos_jobs(ctx)}
        for name, job_id in queued.items():
            assert jobs[job_id].vm == name
            assert jobs[job_id].details["scheduledFor"] == "2026-06-01T20:30:00.000000Z"
            assert from_iso(jobs[job_id].details["plannedStart"]) == starts[name]
        # Long after the window: nothing more for this slot (none runs twice).
        assert scheduler.tick(ctx, slot + timedelta(hours=3), jitter_s=300) == []
        # The scheduler-delay metric counts from the planned start: the spread is no delay.
        from prometheus_client.parser import text_string_to_metric_families

        from vmvault.service import metrics, worker

        claimed = worker.claim_next(ctx)
        assert claimed is not None
        text, _ = metrics.render(ctx)
        (delay,) = [s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples
                    if s.name == "vmvault_scheduler_delay_seconds"]  # fmt: skip
        planned = from_iso(claimed.details["plannedStart"])
        assert delay == (from_iso(claimed.details["claimedAt"]) - planned).total_seconds()
