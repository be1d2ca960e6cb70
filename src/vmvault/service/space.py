"""Vault storage free-space alerts: raised before a backup fails for lack of space.

A vault whose storage file system has less than `min_free_percent` of its size free gets one
open alert (kind VaultSpaceLow, catalog table alerts) and one notification per target of the
vault; when space is back above the threshold the alert is resolved and notified again. Checked
by the scheduler loop of `vmvault serve` with the RPO alerts (service/rpo.py); the same numbers
are the metrics vmvault_vault_free_bytes / vmvault_vault_filesystem_bytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog.clock import to_iso
from vmvault.catalog.models import AlertRow, VaultRow
from vmvault.service.context import Context
from vmvault.service.rpo import open_alerts

log = logging.getLogger("vmvault")

SPACE_LOW = "VaultSpaceLow"
DEFAULT_MIN_FREE_PERCENT = 10.0


@dataclass(frozen=True)
class Space:
    free: int  # bytes available to vmvault (f_bavail)
    total: int  # size of the file system

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free / self.total if self.total else 0.0


def storage_space(storage_dir: str | Path) -> Space | None:
    """Free and total bytes of the file system holding a vault; None when it is not reachable."""
    try:
        st = os.statvfs(storage_dir)
    except OSError:
        return None
    return Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def check_space_alerts(
    ctx: Context, min_free_percent: float = DEFAULT_MIN_FREE_PERCENT, now: datetime | None = None
) -> list[int]:
    """Raise alerts for vaults short of space, resolve those with room again; returns the alert ids touched."""
    moment = to_iso(now or ctx.now())
    with ctx.catalog.read() as s:
        vaults = [(v.id, v.name, v.storage_dir) for v in s.scalars(select(VaultRow)).all()]
    spaces = {vault_id: (name, storage_space(storage)) for vault_id, name, storage in vaults}
    touched: list[int] = []
    with ctx.catalog.write() as s:
        raised = {row.vault_id: row for row in open_alerts(s, SPACE_LOW)}
        for vault_id, (name, space) in spaces.items():
            if space is None:
                continue  # unreachable storage: doctor and the metrics say so; no change here
            low = space.free_percent < min_free_percent
            if low and vault_id not in raised:
                touched.append(_raise(s, vault_id, name, space, min_free_percent, moment))
            elif not low and vault_id in raised:
                touched.append(_resolve(s, raised[vault_id], space, moment))
        for vault_id, alert in raised.items():
            if vault_id not in spaces:  # the vault was deleted (with its targets): close, nobody to tell
                alert.resolved = moment
                alert.details = {**alert.details, "reason": "the vault was deleted"}
    return touched


def _details(space: Space, threshold: float) -> dict[str, object]:
    return {"freeBytes": space.free, "totalBytes": space.total, "freePercent": round(space.free_percent, 2),
            "thresholdPercent": threshold}  # fmt: skip


def _raise(s: Session, vault_id: int, name: str, space: Space, threshold: float, now: str) -> int:
    from vmvault.service.notify import enqueue_for_alert

    row = AlertRow(kind=SPACE_LOW, vm_id="", vm_name="", vault_id=vault_id, raised=now,
                   details=_details(space, threshold))  # fmt: skip
    s.add(row)
    s.flush()
    log.warning("vault %s: only %.1f%% of its storage is free (threshold %s%%)", name, space.free_percent, threshold)
    enqueue_for_alert(s, row, "raised")
    return row.id


def _resolve(s: Session, alert: AlertRow, space: Space, now: str) -> int:
    from vmvault.service.notify import enqueue_for_alert

    alert.resolved = now
    threshold = float(str(alert.details.get("thresholdPercent", DEFAULT_MIN_FREE_PERCENT)))
    alert.details = {**alert.details, "resolvedWith": _details(space, threshold)}
    s.flush()
    enqueue_for_alert(s, alert, "resolved")
    return alert.id
