"""Prometheus metrics, computed from the catalog (and the vaults' storage) at scrape time.

A custom collector rather than in-process counters: every process reading one catalog (two
servers, a restarted one, the CLI's jobs) reports the same numbers, and nothing is lost to a
restart. Served by GET /metrics (api/routes/metrics.py) and by `serve --metrics-address`.

Series (labels in braces):
- vmvault_jobs_total{operation,status}: jobs recorded in the catalog (queued ones are InProgress);
- vmvault_job_duration_seconds{operation} (histogram): ended jobs, end minus start;
- vmvault_job_read_bytes_total / vmvault_job_written_bytes_total{operation}: the jobs' progress;
- vmvault_item_last_successful_backup_timestamp_seconds{vm,vault,policy}: the newest good point
  (absent while there is none), vmvault_item_rpo_deadline_timestamp_seconds and
  vmvault_item_rpo_breached (0/1) from service/rpo.py (the same rule as the alerts);
- vmvault_vault_stored_bytes{vault}: bytes of the vault's files; vmvault_vault_logical_bytes: the
  non-zero bytes of all its points' disks (what was protected, before dedup and compression);
  vmvault_vault_unique_bytes / vmvault_vault_compressed_bytes: the distinct objects' plain and
  stored sizes (from this host's chunk index cache); vmvault_vault_dedup_ratio = logical / unique,
  vmvault_vault_compression_ratio = unique / compressed; vmvault_vault_objects{vault,type},
  vmvault_vault_packs, vmvault_vault_recovery_points; vmvault_vault_free_bytes and
  vmvault_vault_filesystem_bytes: the file system holding the vault (free-space alerts);
- vmvault_scheduler_delay_seconds{vm}: how late the newest scheduled backup of a VM was claimed
  after its slot; vmvault_jobs_queued: backups waiting for a worker.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from vmvault.catalog.clock import from_iso
from vmvault.catalog.models import JobRow, RecoveryPointRow, VaultRow
from vmvault.errors import VmvaultError
from vmvault.service.context import Context
from vmvault.service.replication import current_lag
from vmvault.service.rpo import item_rpos
from vmvault.service.space import storage_space
from vmvault.service.usage import storage_bytes
from vmvault.vault.backends import is_url, open_backend

# Backups of a few seconds (tests, tiny VMs) to a day.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)
_OBJECT_TYPES = {1: "data", 2: "tree"}  # vault.packs TYPE_DATA, TYPE_TREE


@dataclass(frozen=True)
class _Objects:
    count_by_type: dict[str, int]
    unique: int
    compressed: int
    packs: int


class CatalogCollector(Collector):
    """Reads the catalog on every collect(); vault=NAME limits it to one vault (a vault-scoped token)."""

    def __init__(self, ctx: Context, vault: str | None = None) -> None:
        self.ctx = ctx
        self.vault = vault

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._items()
        yield from self._vaults()

    def _jobs(self) -> Iterator[Metric]:
        with self.ctx.catalog.read() as s:
            query = select(JobRow.operation, JobRow.status, JobRow.vault, JobRow.vm, JobRow.start_time,
                           JobRow.end_time, JobRow.progress, JobRow.details, JobRow.owner_pid)  # fmt: skip
            rows = [r for r in s.execute(query).all() if self.vault is None or r.vault == self.vault]
        yield _job_counts(rows)
        yield _durations(rows)
        read = CounterMetricFamily("vmvault_job_read_bytes", "Bytes read by jobs", labels=["operation"])
        written = CounterMetricFamily("vmvault_job_written_bytes", "Bytes written by jobs", labels=["operation"])
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            progress = r.progress if isinstance(r.progress, dict) else {}
            totals[r.operation][0] += _int(progress.get("bytesRead"))
            totals[r.operation][1] += _int(progress.get("bytesWritten"))
        for operation, (r_bytes, w_bytes) in sorted(totals.items()):
            read.add_metric([operation], r_bytes)
            written.add_metric([operation], w_bytes)
        yield read
        yield written
        yield from _scheduler(rows)

    def _items(self) -> Iterator[Metric]:
        labels = ["vm", "vault", "policy"]
        last = GaugeMetricFamily(
            "vmvault_item_last_successful_backup_timestamp_seconds",
            "Time of the item's newest good recovery point (Unix seconds)",
            labels=labels,
        )
        deadline = GaugeMetricFamily(
            "vmvault_item_rpo_deadline_timestamp_seconds",
            "Instant after which the item's RPO is breached (the policy's next slot after its last good point + grace)",
            labels=labels,
        )
        breached = GaugeMetricFamily("vmvault_item_rpo_breached", "1 when the item's RPO is breached", labels=labels)
        for rpo in item_rpos(self.ctx):
            if self.vault is not None and rpo.vault != self.vault:
                continue
            values = [rpo.vm, rpo.vault, rpo.policy]
            if rpo.last_good is not None:
                last.add_metric(values, rpo.last_good.timestamp())
            deadline.add_metric(values, rpo.deadline.timestamp())
            breached.add_metric(values, 1.0 if rpo.breached else 0.0)
        yield last
        yield deadline
        yield breached

    def _vaults(self) -> Iterator[Metric]:
        with self.ctx.catalog.read() as s:
            vaults = [v for v in s.scalars(select(VaultRow)).all() if self.vault is None or v.name == self.vault]
            query = select(RecoveryPointRow.vault_id, func.count()).group_by(RecoveryPointRow.vault_id)
            points = {int(vault_id): int(n) for vault_id, n in s.execute(query).all()}
            logical = {v.id: _logical_bytes(s, v.id) for v in vaults}
            now = self.ctx.now()  # the lag aged to now, the rule of the lag alerts (replication.current_lag)
            lags = {v.id: float(current_lag(s, v, now)["lagSeconds"]) for v in vaults if v.secondary_storage}
        families = _VaultFamilies()
        for vault in vaults:
            objects = self._objects(vault)
            families.add(vault, int(points.get(vault.id, 0)), logical[vault.id], objects, lags.get(vault.id))
        yield from families.all()

    def _objects(self, vault: VaultRow) -> _Objects | None:
        return chunk_index_objects(self.ctx.settings.home / "cache" / vault.uuid / "chunks.db")


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _job_counts(rows: list[Any]) -> Metric:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        counts[(r.operation, r.status)] += 1
    family = CounterMetricFamily("vmvault_jobs", "Jobs recorded in the catalog", labels=["operation", "status"])
    for (operation, status), n in sorted(counts.items()):
        family.add_metric([operation, status], n)
    return family


def _durations(rows: list[Any]) -> Metric:
    by_op: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r.end_time:
            by_op[r.operation].append(max(0.0, (from_iso(r.end_time) - from_iso(r.start_time)).total_seconds()))
    family = HistogramMetricFamily(
        "vmvault_job_duration_seconds", "Duration of ended jobs (end minus start)", labels=["operation"]
    )
    for operation, values in sorted(by_op.items()):
        buckets = [(_le(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(values)))
        family.add_metric([operation], buckets, sum_value=sum(values))
    return family


def _le(bound: float) -> str:
    return repr(bound)


def _scheduler(rows: list[Any]) -> Iterator[Metric]:
    """How late the newest scheduled backup of each VM was claimed, and how many wait now."""
    newest: dict[str, tuple[str, float]] = {}
    queued = 0
    for r in rows:
        details = r.details if isinstance(r.details, dict) else {}
        if r.status == "InProgress" and r.owner_pid == 0:
            queued += 1
        slot, claimed = details.get("scheduledFor"), details.get("claimedAt")
        if not (isinstance(slot, str) and isinstance(claimed, str) and r.vm):
            continue
        # From the planned start (slot + the VM's jitter, serve --schedule-jitter): the spread is no delay.
        planned = details.get("plannedStart")
        start = planned if isinstance(planned, str) else slot
        if r.vm not in newest or newest[r.vm][0] < slot:
            newest[r.vm] = (slot, max(0.0, (from_iso(claimed) - from_iso(start)).total_seconds()))
    delay = GaugeMetricFamily(
        "vmvault_scheduler_delay_seconds",
        "Seconds from the newest scheduled backup's planned start (slot + jitter) to its job's start",
        labels=["vm"],
    )
    for vm, (_slot, seconds) in sorted(newest.items()):
        delay.add_metric([vm], seconds)
    yield delay
    yield GaugeMetricFamily("vmvault_jobs_queued", "Jobs queued for a worker of vmvault serve", value=queued)


def _logical_bytes(s: Any, vault_id: int) -> int:
    total = 0
    for (disks,) in s.execute(select(RecoveryPointRow.disks).where(RecoveryPointRow.vault_id == vault_id)).all():
        total += sum(_int(d.get("storedBytes")) for d in disks or [] if isinstance(d, dict))
    return total


def chunk_index_objects(path: Path) -> _Objects | None:
    """The distinct objects of a vault as this host's chunk index cache knows them (None: no cache yet)."""
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            by_type = db.execute("SELECT type, count(*), sum(plain), sum(length) FROM blobs GROUP BY type").fetchall()
            (packs,) = db.execute("SELECT count(*) FROM packs").fetchone()
    except sqlite3.Error:
        return None
    counts = {_OBJECT_TYPES.get(int(t), str(t)): int(n) for t, n, _p, _l in by_type}
    unique = sum(int(p or 0) for t, _n, p, _l in by_type if int(t) == 1)
    compressed = sum(int(ln or 0) for t, _n, _p, ln in by_type if int(t) == 1)
    return _Objects(counts, unique, compressed, int(packs))


class _VaultFamilies:
    def __init__(self) -> None:
        v = ["vault"]
        self.stored = GaugeMetricFamily("vmvault_vault_stored_bytes", "Bytes of the vault's files", labels=v)
        self.logical = GaugeMetricFamily(
            "vmvault_vault_logical_bytes", "Non-zero bytes of all recovery points' disks (before dedup)", labels=v
        )
        self.unique = GaugeMetricFamily("vmvault_vault_unique_bytes", "Plain bytes of the distinct chunks", labels=v)
        self.compressed = GaugeMetricFamily(
            "vmvault_vault_compressed_bytes", "Stored bytes of the distinct chunks", labels=v
        )
        self.dedup = GaugeMetricFamily("vmvault_vault_dedup_ratio", "Logical bytes / distinct chunk bytes", labels=v)
        self.compression = GaugeMetricFamily(
            "vmvault_vault_compression_ratio", "Distinct chunk bytes / their stored bytes", labels=v
        )
        self.objects = GaugeMetricFamily("vmvault_vault_objects", "Distinct objects", labels=["vault", "type"])
        self.packs = GaugeMetricFamily("vmvault_vault_packs", "Pack files", labels=v)
        self.points = GaugeMetricFamily("vmvault_vault_recovery_points", "Recovery points", labels=v)
        self.free = GaugeMetricFamily(
            "vmvault_vault_free_bytes", "Bytes free for vmvault on the vault's file system", labels=v
        )
        self.filesystem = GaugeMetricFamily(
            "vmvault_vault_filesystem_bytes", "Size of the file system holding the vault", labels=v
        )
        # GRS (service/replication.py), from the catalog: alert on lag_seconds > your RPO for the secondary.
        self.lag_seconds = GaugeMetricFamily(
            "vmvault_vault_replication_lag_seconds", "Age of the oldest point not yet on the secondary", labels=v
        )
        self.lag_bytes = GaugeMetricFamily(
            "vmvault_vault_replication_lag_bytes", "Bytes the secondary still lacks (at the last pass)", labels=v
        )

    def add(
        self, vault: VaultRow, points: int, logical: int, objects: _Objects | None, lag: float | None = None
    ) -> None:
        name = [vault.name]
        storage = Path(vault.storage_dir)
        if is_url(vault.storage_dir):  # object storage: a listing (no file system to measure)
            with contextlib.suppress(VmvaultError):  # unreachable: no sample, as for a directory
                self.stored.add_metric(name, sum(i.size for i in open_backend(vault.storage_dir).inventory()))
        elif os.path.isdir(storage):  # unreachable storage: no sample (an alert on absent() catches it)
            self.stored.add_metric(name, storage_bytes(storage))
            space = storage_space(storage)
            if space is not None:
                self.free.add_metric(name, space.free)
                self.filesystem.add_metric(name, space.total)
        self.logical.add_metric(name, logical)
        self.points.add_metric(name, points)
        if vault.secondary_storage and lag is not None:
            self.lag_seconds.add_metric(name, lag)
            self.lag_bytes.add_metric(name, float((vault.replication or {}).get("lagBytes") or 0))
        if objects is None:
            return
        self.unique.add_metric(name, objects.unique)
        self.compressed.add_metric(name, objects.compressed)
        if objects.unique:
            self.dedup.add_metric(name, logical / objects.unique)
        if objects.compressed:
            self.compression.add_metric(name, objects.unique / objects.compressed)
        for kind, count in sorted(objects.count_by_type.items()):
            self.objects.add_metric([vault.name, kind], count)
        self.packs.add_metric(name, objects.packs)

    def all(self) -> list[Metric]:
        return [self.stored, self.logical, self.unique, self.compressed, self.dedup, self.compression, self.objects,
                self.packs, self.points, self.free, self.filesystem, self.lag_seconds, self.lag_bytes]  # fmt: skip


def render(ctx: Context, vault: str | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx, vault))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def registry_for(ctx: Context) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx))
    return registry
