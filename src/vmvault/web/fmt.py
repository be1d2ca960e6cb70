"""How the portal prints values: times, sizes, policy summaries, status colours (Jinja filters)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import Environment

from vmvault.catalog.clock import from_iso
from vmvault.web.wording import label, portal_fix, portal_message

_STATUS_CLASS = {
    "Completed": "ok",
    "CompletedWithWarnings": "warn",
    "InProgress": "busy",
    "Failed": "bad",
    "Cancelled": "bad",
    "Protected": "ok",
    "IRPending": "warn",
    "ProtectionStopped": "warn",
    "NotProtected": "muted",
    "SoftDeleted": "bad",
    "mounted": "ok",
    "Online": "ok",  # hosts (service/hosts.py)
    "Offline": "bad",
}


def when(value: Any) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM UTC' (or with the offset it was given in); '' for None."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        try:
            moment = from_iso(str(value))
        except ValueError:
            return str(value)
    if moment.tzinfo is None or moment.utcoffset() is None or moment.utcoffset().total_seconds() == 0:  # type: ignore[union-attr]
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.strftime("%Y-%m-%d %H:%M (UTC%z)")


def size(value: Any) -> str:
    if value is None:
        return ""
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def policy_text(summary: dict[str, Any]) -> str:
    """policy_summary() as a sentence: 'Daily at 20:30 UTC, retain 180 days'."""
    days = f" on {summary['days']}" if summary.get("days") else ""
    retention = str(summary.get("retention") or "")
    # "daily 180 days, weekly 12 weeks" -> "180 days (daily), 12 weeks (weekly)"; a single daily rule reads plainly
    parts = [p.strip() for p in retention.split(",") if p.strip()]
    if len(parts) == 1 and parts[0].startswith("daily "):
        kept = parts[0].removeprefix("daily ")
    else:
        kept = ", ".join(f"{p.split(' ', 1)[1]} ({p.split(' ', 1)[0]})" if " " in p else p for p in parts)
    return f"{summary['frequency']}{days} at {summary['time']} {summary['timeZone']}, retain {kept}"


def status_class(value: Any) -> str:
    text = str(value or "")
    if text.startswith("Warning") or text == "Initial backup pending":
        return "warn"
    return _STATUS_CLASS.get(text, "muted")


def install_filters(env: Environment) -> None:
    env.filters["when"] = when
    env.filters["size"] = size
    env.filters["policy_text"] = policy_text
    env.filters["status_class"] = status_class
    env.filters["label"] = label
    env.filters["fix"] = portal_fix
    env.filters["portal_message"] = portal_message
