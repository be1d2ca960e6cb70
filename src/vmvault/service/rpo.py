"""Each protected item's RPO (domain.rpo) from the catalog, and the missed-backup alerts built on it.

- item_rpos(): per active item with a policy, its last good point, deadline and whether it is
  breached; read by the /metrics collector (service/metrics.py) and by check_alerts().
- check_alerts(): run by the scheduler loop of `vmvault serve`. An item whose RPO is breached
  gets one open alert (catalog table alerts) and one "raised" notification per target of its
  vault; when a good point makes the item healthy again (or protection stops) the alert is
  resolved and a "resolved" notification goes out. The open alert lives in the catalog, so a
  restarted service (or a second process) does not raise it twice.

A good point: a recovery point of the item's VM in its vault, not soft deleted, whose last
verification did not fail (a point that cannot be restored protects nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, to_iso
from vmvault.catalog.models import AlertRow, ProtectedItemRow, RecoveryPointRow
from vmvault.domain.policy import Policy
from vmvault.domain.rpo import DEFAULT_GRACE, rpo_deadline
from vmvault.service.context import Context
from vmvault.service.policies import policy_of
from vmvault.service.protection import ACTIVE_STATES

log = logging.getLogger("vmvault")

RPO_BREACHED = "RpoBreached"
RAISED, RESOLVED = "raised", "resolved"


@dataclass(frozen=True)
class ItemRpo:
    vm_id: str
    vm: str
    vault: str
    vault_id: int
    policy: str
    last_good: datetime | None
    last_good_point: str | None
    deadline: datetime
    breached: bool


def last_good_point(s: Session, vm_id: str, vault_id: int) -> RecoveryPointRow | None:
    query = select(RecoveryPointRow).where(
        RecoveryPointRow.vm_id == vm_id,
        RecoveryPointRow.vault_id == vault_id,
        RecoveryPointRow.soft_deleted.is_(False),
        (RecoveryPointRow.verify_state.is_(None)) | (RecoveryPointRow.verify_state != "Failed"),
    )
    return s.scalars(query.order_by(RecoveryPointRow.time.desc()).limit(1)).first()


def item_rpos(ctx: Context, now: datetime | None = None, grace: timedelta = DEFAULT_GRACE) -> list[ItemRpo]:
    """The RPO of every active item that follows a policy (others have no schedule, so no RPO)."""
    moment = now or ctx.now()
    out: list[ItemRpo] = []
    with ctx.catalog.read() as s:
        policies: dict[int, tuple[str, Policy]] = {}
        for item in repos.list_protected_items(s):
            if item.protection_state not in ACTIVE_STATES or item.policy_id is None:
                continue
            if item.policy_id not in policies:
                row = repos.policy_by_id(s, item.policy_id)
                policies[item.policy_id] = (row.name, policy_of(row))
            out.append(_item_rpo(s, item, *policies[item.policy_id], moment, grace))
    return out


def _item_rpo(
    s: Session, item: ProtectedItemRow, policy_name: str, policy: Policy, now: datetime, grace: timedelta
) -> ItemRpo:
    vm = repos.find_vm_by_id(s, item.vm_id)
    vault = repos.vault_by_id(s, item.vault_id)
    point = last_good_point(s, item.vm_id, item.vault_id)
    last = from_iso(point.time) if point is not None else None
    deadline = rpo_deadline(policy, last, from_iso(item.created), grace)
    return ItemRpo(
        vm_id=item.vm_id,
        vm=vm.name if vm is not None else item.vm_id,
        vault=vault.name,
        vault_id=vault.id,
        policy=policy_name,
        last_good=last,
        last_good_point=point.id if point is not None else None,
        deadline=deadline,
        breached=now > deadline,
    )


# ---- alerts -------------------------------------------------------------------------------------


def alert_view(row: AlertRow, vault: str) -> dict[str, object]:
    return {
        "id": row.id,
        "kind": row.kind,
        "vm": row.vm_name,
        "vault": vault,
        "raised": row.raised,
        "resolved": row.resolved,
        **row.details,
    }


def open_alerts(s: Session, kind: str = RPO_BREACHED) -> list[AlertRow]:
    query = select(AlertRow).where(AlertRow.kind == kind, AlertRow.resolved.is_(None))
    return list(s.scalars(query).all())


def check_alerts(ctx: Context, now: datetime | None = None, grace: timedelta = DEFAULT_GRACE) -> list[int]:
    """Raise alerts for newly breached items, resolve those of healthy ones; returns the alert ids touched.

    The notifications are queued in the same transaction (the outbox); the scheduler delivers them.
    """
    moment = now or ctx.now()
    rpos = {r.vm_id: r for r in item_rpos(ctx, moment, grace)}
    touched: list[int] = []
    with ctx.catalog.write() as s:
        raised = {row.vm_id: row for row in open_alerts(s)}
        for rpo in rpos.values():
            if rpo.breached and rpo.vm_id not in raised:
                touched.append(_raise(s, rpo, moment))
        for vm_id, alert in raised.items():
            current = rpos.get(vm_id)
            if current is None or not current.breached:
                touched.append(_resolve(s, alert, current, moment))
    return touched


def _raise(s: Session, rpo: ItemRpo, now: datetime) -> int:
    details = {
        "policy": rpo.policy,
        "lastGoodPoint": rpo.last_good_point,
        "lastGoodTime": to_iso(rpo.last_good) if rpo.last_good is not None else None,
        "deadline": to_iso(rpo.deadline),
    }
    row = AlertRow(
        kind=RPO_BREACHED, vm_id=rpo.vm_id, vm_name=rpo.vm, vault_id=rpo.vault_id, raised=to_iso(now), details=details
    )
    s.add(row)
    s.flush()
    log.warning("RPO breached for VM %s: no good point since %s (deadline %s)", rpo.vm, details["lastGoodTime"],
                details["deadline"])  # fmt: skip
    _enqueue(s, row, RAISED)
    return row.id


def _resolve(s: Session, alert: AlertRow, rpo: ItemRpo | None, now: datetime) -> int:
    alert.resolved = to_iso(now)
    if rpo is not None:
        alert.details = {**alert.details, "resolvedBy": rpo.last_good_point,
                         "resolvedByTime": to_iso(rpo.last_good) if rpo.last_good else None}  # fmt: skip
    else:
        alert.details = {**alert.details, "resolvedBy": None, "reason": "the item is no longer protected on a schedule"}
    s.flush()
    log.info("RPO of VM %s is met again (alert %s resolved)", alert.vm_name, alert.id)
    _enqueue(s, alert, RESOLVED)
    return alert.id


def _enqueue(s: Session, alert: AlertRow, event: str) -> None:
    from vmvault.service.notify import enqueue_for_alert

    enqueue_for_alert(s, alert, event)
