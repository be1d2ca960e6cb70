"""GRS replication as a use case: `vault replicate`, the state `vault show` reports.

The copying is vault/replicate.py; here: one replicator per vault (lock.only_replicator, a lease on
object storage), the state recorded in the catalog (so `vault show` never touches the storage),
and `--wait` (passes until the secondary holds every published point).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso
from vmvault.catalog.models import AlertRow, RecoveryPointRow, VaultRow
from vmvault.errors import InvalidInput, VmvaultError
from vmvault.service.context import Context
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")
LAG_ALERT_SECONDS = 3600.0  # default lag_alert_seconds(): above it, Lagging (metric, alert, dashboard)
REPLICATION_LAGGING = "ReplicationLagging"  # the alert's kind (catalog table alerts)


def lag_alert_seconds() -> float:
    """lagSeconds above this: the vault is Lagging, an alert is raised (VMVAULT_GRS_LAG_ALERT, seconds)."""
    try:
        return max(0.0, float(os.environ.get("VMVAULT_GRS_LAG_ALERT", LAG_ALERT_SECONDS)))
    except ValueError:
        return LAG_ALERT_SECONDS


def delete_delay() -> float:
    """Seconds a deletion on the primary waits before it is mirrored (VMVAULT_GRS_DELETE_DELAY)."""
    from vmvault.vault.replicate import DEFAULT_DELETE_DELAY_S

    try:
        return max(0.0, float(os.environ.get("VMVAULT_GRS_DELETE_DELAY", DEFAULT_DELETE_DELAY_S)))
    except ValueError:
        return DEFAULT_DELETE_DELAY_S


def replicate(ctx: Context, name: str, *, wait: bool = False, timeout: float = 3600.0) -> JsonDict:
    """One replication pass now (with wait: passes until the secondary has every published point)."""
    from vmvault.vault import lock
    from vmvault.vault.backends import open_backend
    from vmvault.vault.replicate import replicate_once

    with ctx.catalog.read() as s:
        row = repos.get_vault(s, name)
    if not row.secondary_storage:
        raise InvalidInput(f"vault '{name}' has no secondary ({row.redundancy})",
                           hint="create it with --redundancy GRS --secondary LOCATION")  # fmt: skip
    deadline = time.monotonic() + timeout
    with opened_vault(ctx, row) as vault, lock.only_replicator(vault):
        secondary = open_backend(row.secondary_storage)
        secondary.ensure_container()
        note = ctx.settings.home / "cache" / row.uuid / "replication-missing.json"
        while True:
            try:
                report = replicate_once(vault, secondary, note, delete_delay=delete_delay())
            except VmvaultError as exc:
                _record(ctx, name, {"state": "Failed", "lastError": exc.message})
                raise
            state = _state(ctx, row, report.points_secondary, report.lag_bytes)
            state.update(copied=report.copied, copiedBytes=report.copied_bytes, deleted=report.deleted,
                         pendingDeletes=report.pending_deletes)  # fmt: skip
            _record(ctx, name, state)
            caught_up = not state["lagBytes"] and set(report.points_primary) <= set(report.points_secondary)
            if not wait or caught_up or time.monotonic() >= deadline:
                return state
            time.sleep(1.0)


def _state(ctx: Context, row: VaultRow, on_secondary: list[str], lag_bytes: int) -> JsonDict:
    with ctx.catalog.read() as s:
        points = s.execute(
            select(RecoveryPointRow.id, RecoveryPointRow.time).where(RecoveryPointRow.vault_id == row.id)
        ).all()
    there = set(on_secondary)
    replicated = sorted((t, i) for i, t in points if i in there)
    waiting = sorted(t for i, t in points if i not in there)
    lag = max(0.0, time.time() - from_iso(waiting[0]).timestamp()) if waiting else 0.0
    healthy = "Healthy" if not waiting and not lag_bytes else "CatchingUp"
    return {
        "state": "Lagging" if lag > lag_alert_seconds() else healthy,
        "lastReplicatedPoint": replicated[-1][1] if replicated else None,
        "lagSeconds": round(lag, 1),
        "lagBytes": int(lag_bytes),
        "lastError": None,
        "lastRun": now_iso(),
    }


def current_lag(s: Session, row: VaultRow, now: datetime) -> JsonDict:
    """A GRS vault's replication state from the catalog alone, aged to now (no storage touched).

    The state recorded by the last pass is stale as soon as a backup publishes a point after it:
    a point newer than lastReplicatedPoint is not on the secondary yet, so the lag is at least its
    age; a lag recorded by the last pass keeps growing until the next one. Read by the lag
    alerts (check_lag_alerts) and the dashboard, so both flag the same vaults.
    """
    recorded = row.replication or {}
    threshold = lag_alert_seconds()
    last_run = recorded.get("lastRun")
    lag = float(recorded.get("lagSeconds") or 0)
    if lag and last_run:
        lag += max(0.0, (now - from_iso(str(last_run))).total_seconds())
    since = _replicated_until(s, row.id, recorded.get("lastReplicatedPoint"), last_run)
    query = select(RecoveryPointRow.time).where(RecoveryPointRow.vault_id == row.id)
    if since is not None:
        query = query.where(RecoveryPointRow.time > since)
    oldest = s.scalars(query.order_by(RecoveryPointRow.time).limit(1)).first()
    if oldest is not None:
        lag = max(lag, (now - from_iso(oldest)).total_seconds())
    state = str(recorded.get("state") or "NotStarted")
    if lag > threshold:
        state = "Lagging"
    elif state == "Lagging" or (oldest is not None and state == "Healthy"):
        state = "CatchingUp"
    return {**recorded, "state": state, "lagSeconds": round(lag, 1), "lagging": lag > threshold,
            "thresholdSeconds": threshold}  # fmt: skip


def _replicated_until(s: Session, vault_id: int, point_id: object, last_run: object) -> str | None:
    """The time of the newest point on the secondary (every older one is there too, as of the last
    pass); the last pass's own time if retention deleted that point; None: nothing replicated yet."""
    if point_id:
        found = s.scalars(
            select(RecoveryPointRow.time).where(RecoveryPointRow.vault_id == vault_id, RecoveryPointRow.id == point_id)
        ).first()
        if found is not None:
            return str(found)
        return str(last_run) if last_run else None
    return None


def check_lag_alerts(ctx: Context, now: datetime | None = None) -> list[int]:
    """Raise an alert (one notification per target of the vault) for each GRS vault whose lag
    passed lag_alert_seconds(), resolve it when the vault catches up; returns the alert ids touched.
    The open alert lives in the catalog (as the RPO and space alerts), so it is raised once."""
    from vmvault.service.notify import enqueue_for_alert
    from vmvault.service.rpo import open_alerts

    moment = now or ctx.now()
    touched: list[int] = []
    with ctx.catalog.write() as s:
        raised = {row.vault_id: row for row in open_alerts(s, REPLICATION_LAGGING)}
        grs = {v.id: v for v in s.scalars(select(VaultRow)).all() if v.secondary_storage}
        for vault_id, vault in grs.items():
            lag = current_lag(s, vault, moment)
            if lag["lagging"] and vault_id not in raised:
                alert = AlertRow(kind=REPLICATION_LAGGING, vm_id="", vm_name="", vault_id=vault_id,
                                 raised=to_iso(moment), details=_lag_details(lag))  # fmt: skip
                s.add(alert)
                s.flush()
                log.warning("vault %s: replication lags %.0f s behind (threshold %s s)", vault.name,
                            lag["lagSeconds"], lag["thresholdSeconds"])  # fmt: skip
                enqueue_for_alert(s, alert, "raised")
                touched.append(alert.id)
            elif not lag["lagging"] and vault_id in raised:
                alert = raised[vault_id]
                alert.resolved = to_iso(moment)
                alert.details = {**alert.details, "resolvedWith": _lag_details(lag)}
                s.flush()
                enqueue_for_alert(s, alert, "resolved")
                touched.append(alert.id)
        for vault_id, alert in raised.items():
            if vault_id not in grs:  # the vault was deleted (with its targets): close, nobody to tell
                alert.resolved = to_iso(moment)
                alert.details = {**alert.details, "reason": "the vault was deleted"}
    return touched


def _lag_details(lag: JsonDict) -> JsonDict:
    return {"lagSeconds": lag["lagSeconds"], "lagBytes": int(lag.get("lagBytes") or 0),
            "thresholdSeconds": lag["thresholdSeconds"], "lastReplicatedPoint": lag.get("lastReplicatedPoint"),
            "lastError": lag.get("lastError")}  # fmt: skip


def _record(ctx: Context, name: str, state: dict[str, Any]) -> None:
    with ctx.catalog.write() as s:
        row = repos.get_vault(s, name)
        row.replication = {**(row.replication or {}), **state}


def interval_seconds() -> float:
    """How often `vmvault serve` replicates each GRS vault (VMVAULT_GRS_INTERVAL, default 300 s)."""
    try:
        return max(1.0, float(os.environ.get("VMVAULT_GRS_INTERVAL", 300)))
    except ValueError:
        return 300.0


def replicate_all(ctx: Context, cancel: threading.Event | None = None) -> list[str]:
    """One pass over every GRS vault; returns the names replicated. A vault whose replication
    another process (an agent, `vault replicate`) is running is skipped; a failure is recorded
    in the vault's replication state (lastError) and the next vault goes on."""
    from vmvault.errors import Busy

    with ctx.catalog.read() as s:
        names = [row.name for row in s.scalars(select(VaultRow)).all() if row.secondary_storage]
    done = []
    for name in names:
        if cancel is not None and cancel.is_set():
            break
        try:
            replicate(ctx, name)
            done.append(name)
        except Busy:
            continue
        except VmvaultError as exc:
            log.warning("replication of vault %s failed: %s", name, exc.message)
        except Exception:
            log.exception("replication of vault %s failed", name)
    return done


class Replicator:
    """`vmvault serve`'s replicator: every interval_seconds(), a pass over the GRS vaults."""

    def __init__(self, ctx: Context, every_s: float | None = None) -> None:
        self.ctx = ctx
        self.every_s = every_s or interval_seconds()
        self.cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmvault-replicator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.cancel.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self.cancel.wait(self.every_s):
            replicate_all(self.ctx, self.cancel)
