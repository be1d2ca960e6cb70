"""Notifications: tell a vault's targets (webhook, e-mail) when its jobs end.

Alerts (service/rpo.py: an item's missed backup; service/space.py: a vault short of space;
service/replication.py: a GRS vault whose replication lags; raised and resolved) go to every target of
the vault through the same outbox (rows with alert_id instead of a job).

Each vault has targets; a target hears of Failed jobs (events "failed", the default) or of every
ended job (events "all"). Delivery goes through an outbox so nothing is lost to a crash:

1. the transaction that ends a job adds one pending notification per interested target;
2. right after it commits, the process that ended the job delivers them (HTTP POST of the job
   as JSON; an e-mail over SMTP), each under a lease so two processes never send one twice;
3. what could not be delivered is retried by `vmvault serve` with a growing delay, up to
   MAX_ATTEMPTS times, then marked failed (shown by `vault notify list`).
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import socket
import urllib.error
import urllib.request
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso, to_iso, utc_now
from vmvault.catalog.models import AlertRow, NotificationRow, NotificationTargetRow
from vmvault.errors import InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.views import JsonDict, job_view

log = logging.getLogger("vmvault")

KIND_WEBHOOK, KIND_EMAIL = "webhook", "email"
EVENTS = ("failed", "all")
NOTIFY_STATUSES = {"failed": ("Failed",)}
MAX_ATTEMPTS = 5
LEASE_S = 60
RETRY_BASE_S = 30
TIMEOUT_S = 10
_EMAIL_RE = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")


# ---- targets ------------------------------------------------------------------------------------


def _target_view(row: NotificationTargetRow, vault_name: str, stats: dict[str, int] | None = None) -> JsonDict:
    return {
        "id": row.id,
        "vault": vault_name,
        "kind": row.kind,
        "address": row.address,
        "smtp": row.smtp,
        "sender": row.sender,
        "events": row.events,
        "created": row.created,
        **({"delivered": 0, "pending": 0, "failedDeliveries": 0} if stats is None else stats),
    }


def check_webhook(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"'{url}' is not an http(s) URL", hint="e.g. --webhook https://hooks.example.com/vmvault")
    return url


def check_smtp(server: str) -> str:
    """HOST:PORT (PORT defaults to 25)."""
    host, sep, port = server.rpartition(":")
    if not sep:
        host, port = server, "25"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"'{server}' is not an SMTP server HOST:PORT", hint="e.g. --smtp mail.example.com:25")
    return f"{host}:{int(port)}"


def check_email(address: str, what: str = "e-mail address") -> str:
    if not _EMAIL_RE.fullmatch(address):
        raise InvalidInput(f"'{address}' is not an {what}", hint="e.g. --email ops@example.com")
    return address


def add_target(
    ctx: Context,
    vault_name: str,
    *,
    webhook: str | None = None,
    email: str | None = None,
    smtp: str | None = None,
    sender: str | None = None,
    events: str = "failed",
) -> JsonDict:
    """Add a webhook or an e-mail target to a vault."""
    if (webhook is None) == (email is None):
        raise InvalidInput("give exactly one of --webhook URL or --email ADDRESS", hint="one target per command")
    events = events.lower()
    if events not in EVENTS:
        raise InvalidInput(f"unknown events '{events}'", hint="use --on failed (default) or --on all")
    if webhook is not None:
        if smtp or sender:
            raise InvalidInput("--smtp and --from are for e-mail targets", hint="leave them out with --webhook")
        kind, address, server, from_ = KIND_WEBHOOK, check_webhook(webhook), None, None
    else:
        if not smtp:
            raise InvalidInput("an e-mail target needs an SMTP server", hint="add --smtp HOST:PORT")
        kind, address, server = KIND_EMAIL, check_email(email or ""), check_smtp(smtp)
        from_ = check_email(sender, "e-mail address for --from") if sender else f"vmvault@{socket.gethostname()}"
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        row = NotificationTargetRow(
            vault_id=vault.id, kind=kind, address=address, smtp=server, sender=from_, events=events, created=now_iso()
        )
        repos.add_notification_target(s, row)
        return _target_view(row, vault.name)


def list_targets(ctx: Context, vault_name: str) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, vault_name)
        out = []
        for row in repos.notification_targets(s, vault.id):
            out.append(_target_view(row, vault.name, _stats(s, row.id)))
        return out


def _stats(s: Session, target_id: int) -> dict[str, int]:
    from sqlalchemy import func, select

    query = select(NotificationRow.status, func.count()).where(NotificationRow.target_id == target_id)
    counts = dict(s.execute(query.group_by(NotificationRow.status)).tuples().all())
    return {
        "delivered": int(counts.get("sent", 0)),
        "pending": int(counts.get("pending", 0)),
        "failedDeliveries": int(counts.get("failed", 0)),
    }


def remove_target(ctx: Context, vault_name: str, target_id: int) -> None:
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        if not any(t.id == target_id for t in repos.notification_targets(s, vault.id)):
            raise NotFound(
                f"notification target {target_id} not found in vault '{vault_name}'",
                hint=f"list them with: vmvault vault notify list {vault_name}",
            )
        repos.delete_notification_target(s, target_id)


# ---- the outbox ---------------------------------------------------------------------------------


def enqueue_for_job(s: Session, job_id: str) -> int:
    """Inside the transaction that ended a job: one pending notification per interested target."""
    job = repos.find_job(s, job_id)
    if job is None or job.vault is None:
        return 0
    vault = repos.find_vault(s, job.vault)
    if vault is None:
        return 0
    added = 0
    for target in repos.notification_targets(s, vault.id):
        wanted = NOTIFY_STATUSES.get(target.events)
        if wanted is not None and job.status not in wanted:
            continue
        repos.add_notification(
            s, NotificationRow(target_id=target.id, job_id=job.id, status="pending", attempts=0, created=now_iso())
        )
        added += 1
    return added


def enqueue_for_alert(s: Session, alert: AlertRow, event: str) -> int:
    """Inside the transaction that raised or resolved an alert: one notification per target of its vault.

    Every target hears of alerts, whatever its events: a missed backup is a failure.
    """
    added = 0
    for target in repos.notification_targets(s, alert.vault_id):
        row = NotificationRow(
            target_id=target.id, job_id="", alert_id=alert.id, alert_event=event, status="pending", attempts=0,
            created=now_iso(),
        )  # fmt: skip
        repos.add_notification(s, row)
        added += 1
    return added


def deliver_pending(ctx: Context, *, job_id: str | None = None) -> int:
    """Send what is due (only this job's, if given); returns how many were delivered."""
    with ctx.catalog.read() as s:
        due = [row.id for row in repos.due_notifications(s, now_iso(), job_id)]
    return sum(1 for row_id in due if _deliver_one(ctx, row_id))


def _deliver_one(ctx: Context, row_id: int) -> bool:
    now = utc_now()
    with ctx.catalog.write() as s:
        if not repos.lease_notification(s, row_id, to_iso(now), to_iso(now + timedelta(seconds=LEASE_S))):
            return False
        row = s.get_one(NotificationRow, row_id)
        target = s.get_one(NotificationTargetRow, row.target_id)
        message = _Message(target.kind, target.address, target.smtp, target.sender, _event_of(s, row))
        attempts = row.attempts + 1
    try:
        message.send()
    except (OSError, smtplib.SMTPException, urllib.error.URLError, ValueError) as exc:
        _failed(ctx, row_id, attempts, f"{type(exc).__name__}: {exc}")
        return False
    with ctx.catalog.write() as s:
        repos.update_notification(s, row_id, status="sent", attempts=attempts, sent=now_iso(), last_error=None)
    return True


def _event_of(s: Session, row: NotificationRow) -> JsonDict:
    """What the notification tells: a job (its view), or an alert ({"alert": ..., "event": raised|resolved})."""
    if row.alert_id is None:
        from vmvault.service.jobs import extended_info  # jobs imports this module

        job = repos.get_job(s, row.job_id)
        return {**job_view(job), "extendedInfo": extended_info(job)}  # as `job show` prints it
    from vmvault.service.rpo import alert_view

    alert = s.get_one(AlertRow, row.alert_id)
    return {"alert": alert_view(alert, repos.vault_by_id(s, alert.vault_id).name), "event": row.alert_event}


def _failed(ctx: Context, row_id: int, attempts: int, error: str) -> None:
    log.warning("notification %s failed (attempt %s): %s", row_id, attempts, error)
    retry = to_iso(utc_now() + timedelta(seconds=RETRY_BASE_S * 2 ** (attempts - 1)))
    status = "failed" if attempts >= MAX_ATTEMPTS else "pending"
    with ctx.catalog.write() as s:
        repos.update_notification(s, row_id, status=status, attempts=attempts, lease_until=retry, last_error=error)


# ---- sending ------------------------------------------------------------------------------------


def payload(job: JsonDict) -> JsonDict:
    """The JSON a webhook receives: an alert, or the job as `vmvault job show -o json` prints it (Azure's shape)."""
    if "alert" in job:
        alert = job["alert"]
        event = _RESOLVED_EVENT.get(alert["kind"], "AlertResolved") if job["event"] == "resolved" else alert["kind"]
        return {"source": "vmvault", "event": event, "vault": alert["vault"], "alert": alert}
    from vmvault.service import azure_shape

    return {"source": "vmvault", "event": "JobEnded", "vault": job.get("vault"), "job": azure_shape.job(job)}


def subject(job: JsonDict) -> str:
    if "alert" in job and job["alert"]["kind"] == "ReplicationLagging":
        state = "caught up" if job["event"] == "resolved" else "lagging"
        return f"[vmvault] Replication {state}: {job['alert']['vault']}"
    if "alert" in job and job["alert"]["kind"] == "VaultSpaceLow":
        state = "space back" if job["event"] == "resolved" else "space low"
        return f"[vmvault] Vault {state}: {job['alert']['vault']}"
    if "alert" in job:
        state = "resolved" if job["event"] == "resolved" else "breached"
        return f"[vmvault] RPO {state}: {job['alert']['vm']}"
    about = job.get("vm") or job.get("vault") or ""
    return f"[vmvault] {job['operation']} {job['status']}: {about}".rstrip(": ")


def body(job: JsonDict) -> str:
    if "alert" in job:
        return _alert_body(job["alert"], job["event"])
    lines = [
        f"{job['operation']} job {job['id']} ended {job['status']}.",
        f"VM: {job.get('vm') or '-'}   vault: {job.get('vault') or '-'}",
        f"started {job['startTime']}, ended {job.get('endTime') or '-'} ({job.get('durationSeconds')} s)",
    ]
    error = job.get("error")
    if error:
        lines += [f"error [{error.get('code')}]: {error.get('message')}"]
        if error.get("recommendedAction"):
            lines.append(f"recommended action: {error['recommendedAction']}")
    from vmvault.service import azure_shape

    lines += ["", "The job as JSON:", json.dumps(azure_shape.job(job), indent=2)]
    return "\n".join(lines) + "\n"


_RESOLVED_EVENT = {"RpoBreached": "RpoResolved", "VaultSpaceLow": "VaultSpaceResolved",
                   "ReplicationLagging": "ReplicationCaughtUp"}  # fmt: skip


def _lag_body(alert: JsonDict, event: str) -> str:
    if event == "resolved":
        now: JsonDict = alert.get("resolvedWith") or {}
        first = f"Vault {alert['vault']}'s secondary copy has caught up (lag {now.get('lagSeconds')} s)."
    else:
        first = (
            f"Vault {alert['vault']}'s secondary copy lags {alert.get('lagSeconds')} s behind the primary "
            f"(threshold {alert.get('thresholdSeconds')} s): a restore from the secondary would miss the newest "
            f"points. Last error: {alert.get('lastError') or 'none'}."
        )
    action = f"check the secondary is reachable, then run: vmvault vault replicate {alert['vault']} --wait"
    return _body(alert, event, first, action)


def _space_body(alert: JsonDict, event: str) -> str:
    now: JsonDict = (alert.get("resolvedWith") or {}) if event == "resolved" else alert
    free, percent = int(now.get("freeBytes", 0)) >> 20, now.get("freePercent")
    if event == "resolved":
        first = f"Vault {alert['vault']} has room again: {free} MiB free ({percent}%)."
    else:
        first = (
            f"Vault {alert['vault']} is running out of space: {free} MiB free ({percent}% of its file system), "
            f"under the {alert.get('thresholdPercent')}% threshold; backups fail when it is full."
        )
    action = ("free space on that file system, or delete what is no longer needed: "
              f"vmvault retention run; vmvault vault gc {alert['vault']}")  # fmt: skip
    return _body(alert, event, first, action)


def _alert_body(alert: JsonDict, event: str) -> str:
    if alert["kind"] == "VaultSpaceLow":
        return _space_body(alert, event)
    if alert["kind"] == "ReplicationLagging":
        return _lag_body(alert, event)
    if event == "resolved":
        first = f"VM {alert['vm']} (vault {alert['vault']}) has a good recovery point again: {alert.get('resolvedBy')}."
    else:
        first = (
            f"VM {alert['vm']} (vault {alert['vault']}) missed its backup: its newest good recovery point "
            f"({alert.get('lastGoodTime') or 'none yet'}) is older than policy {alert.get('policy')} allows "
            f"(deadline {alert.get('deadline')})."
        )
    action = f"see why with: vmvault job list --vm {alert['vm']}; then run: vmvault backup now --vm {alert['vm']}"
    return _body(alert, event, first, action)


def _body(alert: JsonDict, event: str, first: str, action: str) -> str:
    """An alert's mail: what happened, when, the action to take (while it is open), the alert as JSON."""
    lines = [first, f"alert {alert['id']} raised {alert['raised']}, resolved {alert.get('resolved') or '-'}"]
    if event != "resolved":
        lines.append(f"recommended action: {action}")
    return "\n".join([*lines, "", "The alert as JSON:", json.dumps(alert, indent=2)]) + "\n"


class _Message:
    def __init__(self, kind: str, address: str, smtp: str | None, sender: str | None, job: JsonDict) -> None:
        self.kind, self.address, self.smtp, self.sender, self.job = kind, address, smtp, sender, job

    def send(self) -> None:
        if self.kind == KIND_WEBHOOK:
            send_webhook(self.address, payload(self.job))
        else:
            send_email(self.smtp or "localhost:25", self.sender or "vmvault@localhost", self.address, self.job)


def send_webhook(url: str, data: Any) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "vmvault"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        response.read()


def send_email(server: str, sender: str, to: str, job: JsonDict) -> None:
    host, _, port = server.rpartition(":")
    msg = EmailMessage()
    msg["Subject"] = subject(job)
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = formatdate(localtime=False)
    msg.set_content(body(job))
    with smtplib.SMTP(host, int(port), timeout=TIMEOUT_S) as client:
        client.send_message(msg)
