"""The scheduler: queues each protected item's backup when its policy's next slot comes.

Every item keeps a *schedule anchor* (UTC): the scheduler's next slot for it is the policy's
first slot after the anchor (domain.schedule.next_run). When that slot is due, one transaction
(BEGIN IMMEDIATE) moves the anchor to now and queues a Backup job for the workers. So:

- after downtime a missed backup runs once: the first missed slot is due, the anchor jumps to
  now, and the next slot is the next one in the future;
- two schedulers (two `serve` on one home are refused, but still) cannot queue one slot twice:
  the second sees the moved anchor;
- an item whose backup is already running (on demand, or a slow previous one) gets no second
  one: the slot is counted as covered (the unique index on running backups backs this up);
- several `serve` on one PostgreSQL catalog: only the leader (service/leader.py) ticks; the
  compare-and-set of the anchor still holds if two ever do.

Jitter (serve --schedule-jitter J): so that 200 VMs of one policy do not all start at 20:30:00,
each VM's backup of a slot is queued at its *planned start*, slot + a fixed per-VM offset in
[0, J) (domain.schedule.planned_start: a hash of the VM id; never more than a tenth of the gap
to the next slot). Only when a slot is due changes: the anchor moves the same way (to the
moment it is queued, after the slot, before the next slot), so no slot runs twice and none is
lost. The job records both: details.scheduledFor (the slot) and details.plannedStart.

The clock is ctx.now(), which honours the test-only VMVAULT_TEST_CLOCK_OFFSET_S.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso
from vmvault.catalog.models import JobRow, PolicyRow
from vmvault.domain.policy import WEEKLY, Policy
from vmvault.domain.schedule import next_run, planned_start
from vmvault.service.context import Context
from vmvault.service.hosts import HEARTBEAT_S
from vmvault.service.jobs import Operation, Status, disk_tasks
from vmvault.service.leader import Leadership
from vmvault.service.policies import policy_of
from vmvault.service.protection import ACTIVE_STATES
from vmvault.service.views import empty_progress
from vmvault.testhooks import crash_point

log = logging.getLogger("vmvault")

RPO_CHECK_S = 10.0  # seconds between two looks for missed backups (the first at the start)


@dataclass(frozen=True)
class Due:
    vm_id: str
    anchor: str | None
    slot: datetime
    start: datetime  # the planned start: slot + this VM's jitter offset


def provisional_expiry(policy: Policy, slot: datetime) -> str:
    """retain-until of a scheduled point before retention looks at it: the daily (or weekly) rule's span."""
    local_day = slot.astimezone(policy.tzinfo).date()
    ret = policy.retention
    if policy.enhanced and slot.astimezone(policy.tzinfo).time() != policy.schedule.run_times[0]:
        # Not the day's first slot: the daily rule keeps only the first (retention decides for real).
        return (local_day + timedelta(days=policy.instant_rp_days)).isoformat()
    if policy.schedule.frequency == WEEKLY and ret.weekly is not None:
        return (local_day + timedelta(weeks=ret.weekly.duration.count)).isoformat()
    days = ret.daily.duration.count if ret.daily is not None else 30
    return (local_day + timedelta(days=days)).isoformat()


def next_slot(policy: Policy, anchor: str | None, now: datetime) -> datetime:
    """The next slot the scheduler will act on (it may be in the past: then it is due)."""
    return next_run(policy, from_iso(anchor) if anchor else now)


def due_items(ctx: Context, now: datetime, jitter_s: float = 0.0) -> list[Due]:
    """Active items whose next slot's planned start (the slot, plus this VM's jitter) is at or before now."""
    out: list[Due] = []
    with ctx.catalog.read() as s:
        policies: dict[int, Policy] = {}
        for item in repos.list_protected_items(s):
            if item.protection_state not in ACTIVE_STATES or item.policy_id is None:
                continue
            if item.policy_id not in policies:
                policies[item.policy_id] = policy_of(repos.policy_by_id(s, item.policy_id))
            if item.schedule_anchor is None:
                out.append(Due(item.vm_id, None, now, now))  # no anchor yet: start counting from now
                continue
            policy = policies[item.policy_id]
            slot = next_slot(policy, item.schedule_anchor, now)
            start = planned_start(policy, slot, item.vm_id, jitter_s)
            if start <= now:
                out.append(Due(item.vm_id, item.schedule_anchor, slot, start))
    return out


def tick(ctx: Context, now: datetime | None = None, jitter_s: float = 0.0) -> list[str]:
    """Queue the backups that are due; returns the ids of the jobs queued."""
    moment = now or ctx.now()
    queued: list[str] = []
    for due in due_items(ctx, moment, jitter_s):
        job_id = _queue(ctx, due, moment)
        if job_id is not None:
            queued.append(job_id)
            crash_point("schedule:queued")  # test-only: the scheduling server dies mid-slot
    return queued


def _queue(ctx: Context, due: Due, now: datetime) -> str | None:
    with ctx.catalog.write() as s:
        item = repos.protected_item(s, due.vm_id)
        if item is None or item.schedule_anchor != due.anchor or item.protection_state not in ACTIVE_STATES:
            return None  # changed since we looked (another scheduler, protection update)
        item.schedule_anchor = to_iso(now)
        if due.anchor is None or item.policy_id is None:
            return None
        vm = repos.find_vm_by_id(s, item.vm_id)
        if vm is None:
            return None
        vault = repos.vault_by_id(s, item.vault_id)
        running = repos.running_job_for_vm(s, vm.name, Operation.BACKUP)
        if running is not None:
            log.info("slot %s of VM %s: backup job %s is still running; skipped", to_iso(due.slot), vm.name, running.id)
            return None
        policy_row: PolicyRow = repos.policy_by_id(s, item.policy_id)
        policy = policy_of(policy_row)
        excluded = set(item.excluded_disks or [])
        disks = [str(d["name"]) for d in vm.disks if str(d["name"]) not in excluded]
        job = JobRow(
            id=str(uuid.uuid4()),
            operation=Operation.BACKUP,
            status=Status.IN_PROGRESS,
            vm=vm.name,
            vault=vault.name,
            start_time=now_iso(),
            end_time=None,
            progress=empty_progress(),
            error=None,
            owner_pid=0,
            owner_boot_id="",
            heartbeat=now_iso(),
            cancel_requested=False,
            details={
                "trigger": "Scheduled",
                "policy": policy_row.name,
                "scheduledFor": to_iso(due.slot),
                "plannedStart": to_iso(due.start),
                "retainUntil": provisional_expiry(policy, due.slot),
                "tasks": disk_tasks(disks),
            },
        )
        repos.add_job(s, job)
        log.info("queued scheduled backup of VM %s (slot %s, job %s)", vm.name, to_iso(due.slot), job.id)
        return job.id


class Scheduler:
    """A thread that ticks every `interval` seconds until stopped.

    It also retries notifications, raises and resolves missed-backup alerts, and reaps dead jobs.
    """

    def __init__(
        self,
        ctx: Context,
        interval: float = 1.0,
        min_free_percent: float | None = None,
        leadership: Leadership | None = None,
        heartbeat: Callable[[], object] | None = None,
        jitter_s: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.interval = interval
        self.jitter_s = jitter_s  # spread of one slot's starts (domain.schedule.planned_start)
        self.leadership = leadership or Leadership(ctx.catalog)
        self.heartbeat = heartbeat  # this server's host heartbeat (service/hosts.py), every HEARTBEAT_S
        self.min_free_percent = min_free_percent  # vault free-space alerts below this (None: the default)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmvault-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.leadership.release()

    def _check_alerts(self) -> None:
        """Missed backups (service/rpo.py), vaults short of space (service/space.py) and GRS vaults whose
        replication lags (service/replication.py): queued, delivered next tick."""
        from vmvault.service.replication import check_lag_alerts
        from vmvault.service.rpo import check_alerts
        from vmvault.service.space import DEFAULT_MIN_FREE_PERCENT, check_space_alerts

        threshold = DEFAULT_MIN_FREE_PERCENT if self.min_free_percent is None else self.min_free_percent
        checks: list[Callable[[], list[int]]] = [
            lambda: check_alerts(self.ctx),
            lambda: check_space_alerts(self.ctx, threshold),
            lambda: check_lag_alerts(self.ctx),
        ]
        for check in checks:
            try:
                check()
            except Exception:
                log.exception("checking alerts failed; retrying later")

    def _loop(self) -> None:
        from vmvault.service import notify
        from vmvault.service.agentwork import fail_lost_agents, lease_s
        from vmvault.service.jobs import reap_dead_jobs

        rounds, started = 0, time.monotonic()
        while not self._stop.is_set():
            # Only the leader queues slots and raises alerts; notifications (leased) and dead jobs
            # are safe to handle from every server.
            leader = self.leadership.check()
            steps: list[Callable[[], object]] = [lambda: notify.deliver_pending(self.ctx)]
            if self.heartbeat is not None and rounds % max(1, int(HEARTBEAT_S / self.interval)) == 0:
                steps.append(self.heartbeat)
            if leader:
                steps.insert(0, lambda: tick(self.ctx, jitter_s=self.jitter_s))
                if time.monotonic() - started > lease_s():  # agents had a lease to beat since this server started
                    steps.append(lambda: fail_lost_agents(self.ctx))  # silent agents: their jobs end agent_lost
            for step in steps:
                try:
                    step()
                except Exception:
                    log.exception("scheduler step failed; retrying next tick")
            if leader and rounds % max(1, int(RPO_CHECK_S / self.interval)) == 0:
                self._check_alerts()
            rounds += 1
            if rounds % max(1, int(30 / self.interval)) == 0:
                try:
                    reap_dead_jobs(self.ctx)
                except Exception:
                    log.exception("reaping dead jobs failed")
            self._stop.wait(self.interval)


class Maintenance:
    """Runs the Retention job (with garbage collection after it) every `every_s` seconds, and each
    day a slice of every vault's scheduled verification (verify_days > 0).

    Due when the newest Retention job of the catalog (whoever ran it) started `every_s` ago or
    more; the first look comes `first_delay_s` after the service starts. A no-op in a build
    without service/retention.py.
    """

    def __init__(
        self,
        ctx: Context,
        every_s: float,
        first_delay_s: float = 600.0,
        verify_days: int = 0,
        leadership: Leadership | None = None,
    ) -> None:
        self.ctx = ctx
        self.leadership = leadership  # several servers: only the leader runs maintenance
        self.every_s = every_s
        self.verify_days = verify_days  # scheduled verification period (service/verify_schedule.py); 0: off
        self.first_delay_s = first_delay_s
        self.cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmvault-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()  # retention (every_s > 0) and scheduled verification (per vault or verify_days)

    def stop(self, timeout: float = 120.0) -> None:
        self.cancel.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def due(self) -> bool:
        from vmvault.catalog.clock import utc_now

        with self.ctx.catalog.read() as s:
            (last,) = repos.list_jobs(s, operation=Operation.RETENTION, limit=1) or (None,)
        return last is None or (utc_now() - from_iso(last.start_time)).total_seconds() >= self.every_s

    def _verify(self) -> None:
        """Vaults with their own period (vault verify-schedule) run even when the service's is 0."""
        from vmvault.service import verify_schedule

        try:
            verify_schedule.run_due(self.ctx, self.verify_days, self.cancel)
        except Exception:
            log.exception("scheduled verification failed to start; retrying later")

    def _loop(self) -> None:
        import importlib

        if self.cancel.wait(self.first_delay_s):
            return
        while not self.cancel.is_set():
            if self.leadership is not None and not self.leadership.is_leader:
                self.cancel.wait(60.0)
                continue
            self._verify()
            try:
                if self.every_s > 0 and self.due():
                    retention = importlib.import_module("vmvault.service.retention")
                    outcome = retention.apply_retention(self.ctx, cancel=self.cancel)
                    log.info("retention job %s ended %s", outcome.job["id"], outcome.job["status"])
            except ModuleNotFoundError:
                return
            except Exception:
                log.exception("the retention job failed to start; retrying later")
            self.cancel.wait(60.0)
