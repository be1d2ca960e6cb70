"""Retention: which recovery points a policy keeps, by which rules, and until when. Pure.

The rules are Azure's LongTermRetentionPolicy (`retentionPolicy` of a backup policy):

- ``dailySchedule``: every scheduled point is kept ``retentionDuration`` after its time; in an
  Enhanced (V2) policy, which may back up several times a day, only the first point of each day
  (Azure: "the first successful backup of the day"), and the day's other points are kept
  ``instantRpRetentionRangeInDays`` (rule ``Hourly``; Azure keeps them as snapshots that long).
- ``weeklySchedule`` ``{daysOfTheWeek}``: the first point of each selected weekday.
- ``monthlySchedule`` / ``yearlySchedule`` (``monthsOfYear``): the first point of each selected
  day, chosen by ``retentionScheduleFormatType`` ``Daily`` (``retentionScheduleDaily.daysOfTheMonth``:
  ``{date, isLast}``) or ``Weekly`` (``retentionScheduleWeekly``: ``daysOfTheWeek`` x
  ``weeksOfTheMonth`` First..Fourth, Last).

Dates are the point's calendar date in the policy's time zone, and durations are added in that
zone's wall time (180 days after 20:30 is 20:30, across a DST change; a month after 31 January is
the last day of February; a year after 29 February is 28 February). A point selected by several
rules expires at the latest of their expiries. "First point of the day" keeps old decisions
stable: a later backup never takes a rule away from an earlier point.

On-demand points (``retain_until`` given) are kept until the end of that UTC date and nothing
else, as Azure's `backup-now --retain-until`. With ``keep_latest`` the newest point is never
deleted (rule ``Latest``), so a VM whose backups keep failing still has its last good point.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from vmvault.domain.policy import Policy, to_properties
from vmvault.domain.timezones import UnknownTimeZone, zone
from vmvault.errors import InvalidInput

DAILY = "Daily"
WEEKLY = "Weekly"
MONTHLY = "Monthly"
YEARLY = "Yearly"
HOURLY = "Hourly"  # the points of an Enhanced policy's day after its first
RETAIN_UNTIL = "RetainUntil"
LATEST = "Latest"
NO_POLICY = "NoPolicy"  # a scheduled point of an item without a policy: nothing expires it

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = tuple(calendar.month_name)[1:]
WEEKS_OF_MONTH = ("First", "Second", "Third", "Fourth", "Last")
DURATION_TYPES = ("Days", "Weeks", "Months", "Years")
_SCHEDULES = (("dailySchedule", DAILY), ("weeklySchedule", WEEKLY), ("monthlySchedule", MONTHLY),
              ("yearlySchedule", YEARLY))  # fmt: skip


@dataclass(frozen=True)
class Duration:
    count: int
    unit: str  # Days | Weeks | Months | Years

    def after(self, moment: datetime, tz: ZoneInfo) -> datetime:
        """moment + this duration in tz's wall time, as UTC."""
        local = moment.astimezone(tz).replace(tzinfo=None)
        if self.unit == "Days":
            later = local + timedelta(days=self.count)
        elif self.unit == "Weeks":
            later = local + timedelta(weeks=self.count)
        else:
            later = _add_months(local, self.count * (12 if self.unit == "Years" else 1))
        # fold=0: a repeated wall time is its first occurrence; a skipped one maps past the gap.
        return later.replace(tzinfo=tz).astimezone(UTC)


def _add_months(moment: datetime, months: int) -> datetime:
    year, month = divmod(moment.month - 1 + months, 12)
    year += moment.year
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


@dataclass(frozen=True)
class DaySelector:
    """Which days of a month a monthly or yearly rule takes."""

    dates: frozenset[int] = frozenset()  # days of the month (Daily format)
    last_day: bool = False  # the month's last day (Daily format, isLast)
    weekdays: frozenset[int] = frozenset()  # 0 = Monday (Weekly format)
    weeks: frozenset[str] = frozenset()  # First..Fourth, Last (Weekly format)

    def selects(self, day: date) -> bool:
        length = calendar.monthrange(day.year, day.month)[1]
        if day.day in self.dates or (self.last_day and day.day == length):
            return True
        if day.weekday() not in self.weekdays:
            return False
        week = WEEKS_OF_MONTH[(day.day - 1) // 7] if day.day <= 28 else ""
        return week in self.weeks or ("Last" in self.weeks and day.day + 7 > length)


@dataclass(frozen=True)
class Rule:
    name: str  # Daily | Weekly | Monthly | Yearly
    duration: Duration
    weekdays: frozenset[int] | None = None  # Weekly rule
    months: frozenset[int] | None = None  # Yearly rule (1 = January)
    days: DaySelector | None = None  # Monthly and Yearly rules

    def selects(self, day: date) -> bool:
        if self.weekdays is not None and day.weekday() not in self.weekdays:
            return False
        if self.months is not None and day.month not in self.months:
            return False
        return self.days is None or self.days.selects(day)


@dataclass(frozen=True)
class RetentionPolicy:
    rules: tuple[Rule, ...]
    tz: ZoneInfo
    first_of_day_daily: bool = False  # Enhanced: the daily rule keeps only the first point of a day
    others_days: int | None = None  # Enhanced: the day's other points are kept this many days


@dataclass(frozen=True)
class PointRetention:
    rp_id: str
    time: datetime  # UTC
    keep: bool
    rules: tuple[str, ...]  # the rules keeping the point at `now` (empty when it expired)
    expires: datetime | None  # latest expiry of the rules selecting it (its time if none); None: NoPolicy


# ---- parsing (just the retention part of a policy; the policy module validates the rest) ----------


def parse_time_zone(name: object, field: str = "timeZone") -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{field}: a time zone name is required", hint="use an IANA name such as Europe/Berlin")
    try:
        return zone(name)
    except UnknownTimeZone:
        raise InvalidInput(
            f"{field}: unknown time zone '{name}'",
            hint="use an IANA name such as UTC or Europe/Berlin, or a Windows name such as Pacific Standard Time",
        ) from None


def policy_retention(policy: Policy) -> RetentionPolicy:
    """The retention rules of a parsed policy (Enhanced ones judge a day by its first point)."""
    rules = parse_retention_policy(to_properties(policy)["retentionPolicy"], policy.time_zone)
    if not policy.enhanced:
        return rules
    return replace(rules, first_of_day_daily=True, others_days=policy.instant_rp_days)


def parse_retention_policy(retention: Mapping[str, Any] | None, time_zone: str = "UTC") -> RetentionPolicy:
    """The rules of an Azure `retentionPolicy` object; InvalidInput names the bad field."""
    tz = parse_time_zone(time_zone)
    rules: list[Rule] = []
    for key, name in _SCHEDULES:
        block = (retention or {}).get(key)
        if block:
            rules.append(_parse_rule(f"retentionPolicy.{key}", name, _mapping(block, f"retentionPolicy.{key}")))
    return RetentionPolicy(tuple(rules), tz)


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{field}: must be an object", hint="see: vmvault policy show DefaultPolicy")
    return value


def _parse_rule(field: str, name: str, block: Mapping[str, Any]) -> Rule:
    duration = _parse_duration(f"{field}.retentionDuration", block.get("retentionDuration"))
    if name == DAILY:
        return Rule(name, duration)
    if name == WEEKLY:
        return Rule(name, duration, weekdays=_names(block, "daysOfTheWeek", WEEKDAYS, field))
    months = _names(block, "monthsOfYear", MONTHS, field, first=1) if name == YEARLY else None
    return Rule(name, duration, months=months, days=_parse_days(field, block))


def _parse_duration(field: str, value: object) -> Duration:
    block = _mapping(value, field)
    count, unit = block.get("count"), block.get("durationType")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidInput(f"{field}.count: must be a whole number of at least 1, not {count!r}")
    if unit not in DURATION_TYPES:
        raise InvalidInput(f"{field}.durationType: must be one of {', '.join(DURATION_TYPES)}, not {unit!r}")
    return Duration(count, str(unit))


def _names(block: Mapping[str, Any], key: str, allowed: Sequence[str], field: str, first: int = 0) -> frozenset[int]:
    values = block.get(key)
    if not isinstance(values, list) or not values:
        raise InvalidInput(f"{field}.{key}: must list at least one of {', '.join(allowed)}")
    lowered = [a.lower() for a in allowed]
    bad = [v for v in values if not isinstance(v, str) or v.lower() not in lowered]
    if bad:
        raise InvalidInput(f"{field}.{key}: unknown value {bad[0]!r}", hint=f"use {', '.join(allowed)}")
    return frozenset(lowered.index(v.lower()) + first for v in values)


def _parse_days(field: str, block: Mapping[str, Any]) -> DaySelector:
    kind = block.get("retentionScheduleFormatType")
    if kind == "Daily":
        daily = _mapping(block.get("retentionScheduleDaily"), f"{field}.retentionScheduleDaily")
        entries = daily.get("daysOfTheMonth")
        where = f"{field}.retentionScheduleDaily.daysOfTheMonth"
        if not isinstance(entries, list) or not entries:
            raise InvalidInput(f"{where}: must list at least one {{date, isLast}}")
        dates, last = set(), False
        for entry in entries:
            item = _mapping(entry, where)
            if item.get("isLast"):
                last = True
                continue
            day = item.get("date")
            if not isinstance(day, int) or isinstance(day, bool) or not 1 <= day <= 28:
                raise InvalidInput(f"{where}: date must be 1 to 28 (or isLast: true), not {day!r}")
            dates.add(day)
        return DaySelector(dates=frozenset(dates), last_day=last)
    if kind == "Weekly":
        weekly = _mapping(block.get("retentionScheduleWeekly"), f"{field}.retentionScheduleWeekly")
        where = f"{field}.retentionScheduleWeekly"
        weekdays = _names(weekly, "daysOfTheWeek", WEEKDAYS, where)
        weeks = _names(weekly, "weeksOfTheMonth", WEEKS_OF_MONTH, where)
        return DaySelector(weekdays=weekdays, weeks=frozenset(WEEKS_OF_MONTH[w] for w in weeks))
    raise InvalidInput(f"{field}.retentionScheduleFormatType: must be Daily or Weekly, not {kind!r}")


# ---- the function -------------------------------------------------------------------------------


def compute_retention(
    points: Sequence[tuple[str, datetime]],
    retention_policy: Mapping[str, Any] | RetentionPolicy | None,
    time_zone: str = "UTC",
    retain_until: Mapping[str, date] | None = None,
    *,
    now: datetime,
    keep_latest: bool = True,
) -> list[PointRetention]:
    """Keep or expire each point (in the order given).

    points: (id, time) with aware UTC times. retention_policy: Azure's `retentionPolicy` dict (or a
    parsed RetentionPolicy; None: no policy, scheduled points are kept). retain_until: the
    on-demand points and the UTC date each is kept through. now: aware.
    """
    policy = (
        retention_policy
        if isinstance(retention_policy, RetentionPolicy) or retention_policy is None
        else parse_retention_policy(retention_policy, time_zone)
    )
    overrides = retain_until or {}
    expiries: dict[str, list[tuple[str, datetime | None]]] = {rp_id: [] for rp_id, _ in points}
    for rp_id, until in overrides.items():
        if rp_id in expiries:
            end = datetime(until.year, until.month, until.day, tzinfo=UTC) + timedelta(days=1)
            expiries[rp_id].append((RETAIN_UNTIL, end))
    scheduled = sorted((t, rp_id) for rp_id, t in points if rp_id not in overrides)
    if policy is None:
        for _t, rp_id in scheduled:
            expiries[rp_id].append((NO_POLICY, None))
    else:
        _apply_rules(policy, scheduled, expiries)
    latest = max(points, key=lambda p: p[1])[0] if points and keep_latest else None
    return [_decide(rp_id, t, expiries[rp_id], now, rp_id == latest) for rp_id, t in points]


def _apply_rules(
    policy: RetentionPolicy, scheduled: list[tuple[datetime, str]], out: dict[str, list[tuple[str, datetime | None]]]
) -> None:
    first_of_day: set[str] = set()
    seen: set[date] = set()
    for t, rp_id in scheduled:
        day = t.astimezone(policy.tz).date()
        if day not in seen:
            seen.add(day)
            first_of_day.add(rp_id)
    for t, rp_id in scheduled:
        day = t.astimezone(policy.tz).date()
        first = rp_id in first_of_day
        for rule in policy.rules:
            every_point = rule.name == DAILY and not policy.first_of_day_daily
            if (every_point or first) and rule.selects(day):
                out[rp_id].append((rule.name, rule.duration.after(t, policy.tz)))
        if not first and policy.others_days is not None:
            out[rp_id].append((HOURLY, Duration(policy.others_days, "Days").after(t, policy.tz)))


def _decide(
    rp_id: str, t: datetime, expiries: list[tuple[str, datetime | None]], now: datetime, latest: bool
) -> PointRetention:
    timed = [e for _name, e in expiries if e is not None]
    # No rule at all selects it: it expired when it was taken. Only NoPolicy has no expiry.
    expires = max(timed) if timed else (None if expiries else t)
    keeping = [name for name, e in expiries if e is None or e > now]
    if latest:
        keeping.append(LATEST)
    rules = tuple(dict.fromkeys(keeping))  # de-duplicated, in rule order
    return PointRetention(rp_id, t, bool(rules), rules, expires)
