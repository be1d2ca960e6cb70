"""UTC timestamps as vmvault stores and prints them: ISO 8601 with microseconds and a Z."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def now_iso() -> str:
    return to_iso(utc_now())


def later_than(previous: str | None, moment: datetime | None = None) -> str:
    """Now (or moment), nudged to be strictly later than previous by at least one microsecond."""
    current = moment or utc_now()
    if previous is not None:
        floor = from_iso(previous) + timedelta(microseconds=1)
        current = max(current, floor)
    return to_iso(current)


def seconds_between(start: str, end: str | None) -> float:
    finish = from_iso(end) if end else utc_now()
    return round((finish - from_iso(start)).total_seconds(), 3)
