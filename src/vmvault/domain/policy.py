"""Backup policies in Azure's shape (AzureIaasVM): parse, validate and print back.

A policy file holds `az backup policy show`'s JSON (``{"properties": {...}}``) or the bare
properties. ``parse_policy`` checks every field and raises ``PolicyError`` naming the field
(``schedulePolicy.scheduleRunDays``) and the rule it breaks; ``to_properties`` prints the
canonical form, which ``parse_policy`` reads back unchanged.

Rules (Azure's, for VM policies):

- ``schedulePolicy.scheduleRunFrequency`` is Daily or Weekly; Weekly needs ``scheduleRunDays``.
- ``scheduleRunTimes`` holds one datetime whose date (and offset) are ignored: its time of day,
  on the hour or half-hour, is read in ``timeZone`` (an IANA name, e.g. Europe/Berlin).
- ``retentionPolicy`` has ``dailySchedule`` (Daily schedules only, and then required),
  ``weeklySchedule`` (required for Weekly schedules), ``monthlySchedule`` and ``yearlySchedule``;
  each has ``retentionDuration {count, durationType}`` with the durationType of its slot and a
  count in RETENTION_LIMITS, and the days/weeks/months that select the point it keeps.
- A rule must be able to select a backup: no empty lists, and with a Weekly schedule only days
  the schedule runs on (and no day-of-month rules).

Pure: no I/O; time zones come from the tzdata package through zoneinfo.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from vmvault.errors import InvalidInput

DAILY, WEEKLY = "Daily", "Weekly"
FREQUENCIES = (DAILY, WEEKLY)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # date.weekday()
WEEKS_OF_MONTH = ("First", "Second", "Third", "Fourth", "Last")
MONTHS = tuple(calendar.month_name[1:])  # January .. December
LAST_WEEK = 5  # index of "Last" + 1
# Azure's limits for VM policies (portal and REST): daily 7-9999 days, weekly 1-5163 weeks,
# monthly 1-1188 months, yearly 1-99 years.
RETENTION_LIMITS = {"Days": (7, 9999), "Weeks": (1, 5163), "Months": (1, 1188), "Years": (1, 99)}
INSTANT_RP_DAYS = (1, 5)
DEFAULT_POLICY_NAME = "DefaultPolicy"
DEFAULT_RUN_TIME = time(20, 30)
DEFAULT_DAILY_DAYS = 180
# scheduleRunTimes are datetimes whose date is ignored; this one is printed (as Azure prints some date).
PRINTED_DATE = "2020-01-01"

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.0+)?)?$")
_WRAPPER_KEYS = {"id", "name", "type", "properties", "eTag", "location", "tags", "resourceGroup", "vault"}
_PROPERTY_KEYS = {
    "backupManagementType", "instantRpDetails", "instantRpRetentionRangeInDays", "schedulePolicy",
    "retentionPolicy", "timeZone", "protectedItemsCount", "policyType", "tieringPolicy", "snapshotConsistencyType",
}  # fmt: skip
_SCHEDULE_KEYS = {
    "schedulePolicyType", "scheduleRunFrequency", "scheduleRunDays", "scheduleRunTimes", "scheduleWeeklyFrequency",
}  # fmt: skip
_RETENTION_KEYS = {"retentionPolicyType", "dailySchedule", "weeklySchedule", "monthlySchedule", "yearlySchedule"}
_RULE_KEYS = {
    "dailySchedule": ({"retentionTimes", "retentionDuration"}, "Days"),
    "weeklySchedule": ({"daysOfTheWeek", "retentionTimes", "retentionDuration"}, "Weeks"),
    "monthlySchedule": (
        {"retentionScheduleFormatType", "retentionScheduleDaily", "retentionScheduleWeekly", "retentionTimes",
         "retentionDuration"},
        "Months",
    ),
    "yearlySchedule": (
        {"retentionScheduleFormatType", "monthsOfYear", "retentionScheduleDaily", "retentionScheduleWeekly",
         "retentionTimes", "retentionDuration"},
        "Years",
    ),
}  # fmt: skip


class PolicyError(InvalidInput):
    """A policy field breaks a rule; ``field`` is its path inside the properties."""

    def __init__(self, field_path: str, rule: str, *, hint: str | None = None) -> None:
        super().__init__(
            f"invalid policy: {field_path}: {rule}",
            hint=hint or "fix that field; see a valid policy with: vmvault policy show DefaultPolicy --vault V",
        )
        self.field = field_path
        self.rule = rule


# ---- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Duration:
    count: int
    duration_type: str  # Days | Weeks | Months | Years


@dataclass(frozen=True)
class Schedule:
    frequency: str  # Daily | Weekly
    run_days: tuple[int, ...]  # date.weekday() numbers; empty for Daily
    run_times: tuple[time, ...]  # local times of day, in the policy's time zone

    def runs_on(self, day: date) -> bool:
        return self.frequency == DAILY or day.weekday() in self.run_days


@dataclass(frozen=True)
class DailyRule:
    duration: Duration


@dataclass(frozen=True)
class WeeklyRule:
    days_of_week: tuple[int, ...]
    duration: Duration

    def selects(self, day: date) -> bool:
        return day.weekday() in self.days_of_week


@dataclass(frozen=True)
class DayOfMonth:
    day: int  # 1..28; ignored when is_last
    is_last: bool = False

    def matches(self, d: date) -> bool:
        if self.is_last:
            return d.day == calendar.monthrange(d.year, d.month)[1]
        return d.day == self.day


@dataclass(frozen=True)
class LongTermRule:
    """A monthly (months empty) or yearly rule: which backup of the month (of those months) it keeps."""

    format_type: str  # Weekly (weekday + week of month) | Daily (day of month)
    duration: Duration
    days_of_week: tuple[int, ...] = ()
    weeks_of_month: tuple[int, ...] = ()  # 1..4, LAST_WEEK (5) = the last such weekday of the month
    days_of_month: tuple[DayOfMonth, ...] = ()
    months: tuple[int, ...] = ()  # 1..12; yearly rules only

    def selects(self, day: date) -> bool:
        """True when a backup taken on this local date is the one this rule keeps."""
        if self.months and day.month not in self.months:
            return False
        if self.format_type == DAILY:
            return any(d.matches(day) for d in self.days_of_month)
        if day.weekday() not in self.days_of_week:
            return False
        week = (day.day - 1) // 7 + 1
        is_last = day.day + 7 > calendar.monthrange(day.year, day.month)[1]
        return week in self.weeks_of_month or (is_last and LAST_WEEK in self.weeks_of_month)


@dataclass(frozen=True)
class Retention:
    daily: DailyRule | None = None
    weekly: WeeklyRule | None = None
    monthly: LongTermRule | None = None
    yearly: LongTermRule | None = None


@dataclass(frozen=True)
class Policy:
    schedule: Schedule
    retention: Retention
    time_zone: str = "UTC"
    instant_rp_days: int = 2
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # informational fields kept as given

    @property
    def tzinfo(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)


def default_policy(time_zone: str = "UTC") -> Policy:
    """The DefaultPolicy every vault gets: daily at 20:30, daily points kept 180 days."""
    check_time_zone(time_zone, "timeZone")
    return Policy(
        schedule=Schedule(DAILY, (), (DEFAULT_RUN_TIME,)),
        retention=Retention(daily=DailyRule(Duration(DEFAULT_DAILY_DAYS, "Days"))),
        time_zone=time_zone,
    )


# ---- parsing ------------------------------------------------------------------------------------


def unwrap(document: Any) -> Mapping[str, Any]:
    """The properties of a policy file: ``{"properties": {...}}`` (az's show output) or bare."""
    if not isinstance(document, Mapping):
        raise PolicyError("(file)", "a policy must be a JSON object", hint='write {"properties": {...}}')
    if isinstance(document.get("properties"), Mapping):
        _no_unknown(document, _WRAPPER_KEYS, "")
        return document["properties"]  # type: ignore[no-any-return]
    return document


def parse_policy(document: Any) -> Policy:
    """A validated Policy from a policy file's JSON; PolicyError names the first bad field."""
    props = unwrap(document)
    _no_unknown(props, _PROPERTY_KEYS, "")
    management = props.get("backupManagementType")
    if management not in (None, "AzureIaasVM"):
        raise PolicyError("backupManagementType", f"'{management}' is not supported; use AzureIaasVM (VM backups)")
    if props.get("policyType") not in (None, "V1"):
        raise PolicyError("policyType", "Enhanced (V2, hourly) policies are not supported; use V1 or leave it out")
    time_zone = props.get("timeZone", "UTC")
    check_time_zone(time_zone, "timeZone")
    schedule = _parse_schedule(_object(props, "schedulePolicy", "schedulePolicy", required=True))
    retention = _parse_retention(_object(props, "retentionPolicy", "retentionPolicy", required=True), schedule)
    instant = _instant_rp_days(props.get("instantRpRetentionRangeInDays"), schedule)
    _check_snapshot_consistency(props)
    extra = {k: props[k] for k in ("instantRpDetails", "tieringPolicy", "snapshotConsistencyType") if k in props}
    return Policy(schedule, retention, time_zone, instant, extra)


SNAPSHOT_CONSISTENCY_TYPES = ("Default", "OnlyCrashConsistent")


def only_crash_consistent(properties: Mapping[str, Any]) -> bool:
    """snapshotConsistencyType: OnlyCrashConsistent (Azure's) makes live backups skip the guest's quiesce."""
    inner = properties.get("properties")
    props = inner if isinstance(inner, Mapping) else properties
    return props.get("snapshotConsistencyType") == "OnlyCrashConsistent"


def _check_snapshot_consistency(props: Mapping[str, Any]) -> None:
    value = props.get("snapshotConsistencyType", "Default")
    if value not in SNAPSHOT_CONSISTENCY_TYPES:
        raise PolicyError("snapshotConsistencyType", f"{value!r} is not one of {', '.join(SNAPSHOT_CONSISTENCY_TYPES)}")


def check_time_zone(value: Any, path: str) -> str:
    """An IANA time zone name that tzdata knows."""
    if not isinstance(value, str) or not value or value.startswith(("/", ".")) or ".." in value:
        raise PolicyError(path, f"{value!r} is not a time zone; give an IANA name such as UTC or Europe/Berlin")
    try:
        ZoneInfo(value)
    except (ValueError, OSError, LookupError):  # ZoneInfoNotFoundError is a KeyError
        raise PolicyError(
            path, f"unknown time zone '{value}'", hint="give an IANA name such as UTC, Europe/Berlin or Asia/Kolkata"
        ) from None
    return value


def _no_unknown(obj: Mapping[str, Any], known: set[str], prefix: str) -> None:
    for key in obj:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            raise PolicyError(where, "unknown field", hint=f"known fields here: {', '.join(sorted(known))}")


def _object(parent: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> Mapping[str, Any] | None:
    value = parent.get(key)
    if value is None:
        if required:
            raise PolicyError(path, "is required")
        return None
    if not isinstance(value, Mapping):
        raise PolicyError(path, "must be a JSON object")
    return value


def _list(parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(path, "must be a JSON list")
    return value


def _names(values: Sequence[Any], allowed: Sequence[str], path: str) -> tuple[int, ...]:
    """Indexes of names in allowed (case-insensitive), in the order given; no duplicates."""
    lowered = [a.lower() for a in allowed]
    out: list[int] = []
    for i, value in enumerate(values):
        if not isinstance(value, str) or value.lower() not in lowered:
            raise PolicyError(f"{path}[{i}]", f"{value!r} is not one of {', '.join(allowed)}")
        index = lowered.index(value.lower())
        if index in out:
            raise PolicyError(f"{path}[{i}]", f"'{value}' is listed twice")
        out.append(index)
    return tuple(out)


def parse_time_of_day(value: Any, path: str) -> time:
    """The time of day of a scheduleRunTimes entry: a datetime (date ignored) or HH:MM."""
    if not isinstance(value, str):
        raise PolicyError(path, f"{value!r} is not a time; write a datetime such as {PRINTED_DATE}T20:30:00+00:00")
    text = value.strip()
    m = _TIME_RE.match(text)
    if m:
        hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise PolicyError(path, f"'{value}' is not a time of day")
        moment = time(hour, minute, second)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00")).time()
        except ValueError:
            raise PolicyError(path, f"'{value}' is not a datetime; write e.g. {PRINTED_DATE}T20:30:00+00:00") from None
    if moment.minute not in (0, 30) or moment.second or moment.microsecond:
        raise PolicyError(
            path,
            f"{moment.isoformat()} is not on the hour or half-hour",
            hint="backups start at HH:00 or HH:30 (in the policy's timeZone)",
        )
    return moment.replace(tzinfo=None)


def _parse_schedule(obj: Mapping[str, Any] | None) -> Schedule:
    assert obj is not None
    _no_unknown(obj, _SCHEDULE_KEYS, "schedulePolicy")
    kind = obj.get("schedulePolicyType")
    if kind not in (None, "SimpleSchedulePolicy"):
        raise PolicyError("schedulePolicy.schedulePolicyType", f"'{kind}' is not supported; use SimpleSchedulePolicy")
    frequency = _frequency(obj.get("scheduleRunFrequency"))
    days = _names(_list(obj, "scheduleRunDays", "schedulePolicy.scheduleRunDays"), WEEKDAYS,
                  "schedulePolicy.scheduleRunDays")  # fmt: skip
    if frequency == WEEKLY and not days:
        raise PolicyError(
            "schedulePolicy.scheduleRunDays",
            "a Weekly schedule needs at least one day",
            hint='e.g. "scheduleRunDays": ["Sunday"]',
        )
    if frequency == DAILY and days:
        raise PolicyError(
            "schedulePolicy.scheduleRunDays", "days are only for a Weekly schedule (a Daily one runs every day)"
        )
    raw_times = _list(obj, "scheduleRunTimes", "schedulePolicy.scheduleRunTimes")
    if len(raw_times) != 1:
        raise PolicyError(
            "schedulePolicy.scheduleRunTimes",
            f"give exactly one time (got {len(raw_times)})",
            hint=f'e.g. "scheduleRunTimes": ["{PRINTED_DATE}T20:30:00+00:00"]',
        )
    times = tuple(parse_time_of_day(t, f"schedulePolicy.scheduleRunTimes[{i}]") for i, t in enumerate(raw_times))
    return Schedule(frequency, tuple(sorted(days)), times)


def _frequency(value: Any) -> str:
    path = "schedulePolicy.scheduleRunFrequency"
    if value is None:
        raise PolicyError(path, "is required (Daily or Weekly)")
    for known in FREQUENCIES:
        if isinstance(value, str) and value.lower() == known.lower():
            return known
    raise PolicyError(path, f"{value!r} is not Daily or Weekly (hourly schedules are not supported)")


def _parse_retention(obj: Mapping[str, Any] | None, schedule: Schedule) -> Retention:
    assert obj is not None
    _no_unknown(obj, _RETENTION_KEYS, "retentionPolicy")
    kind = obj.get("retentionPolicyType")
    if kind not in (None, "LongTermRetentionPolicy"):
        raise PolicyError(
            "retentionPolicy.retentionPolicyType", f"'{kind}' is not supported; use LongTermRetentionPolicy"
        )
    rules = {k: _object(obj, k, f"retentionPolicy.{k}") for k in _RULE_KEYS}
    for key, rule in rules.items():
        if rule is not None:
            _no_unknown(rule, _RULE_KEYS[key][0], f"retentionPolicy.{key}")
            _check_retention_times(rule, schedule, f"retentionPolicy.{key}.retentionTimes")
    if schedule.frequency == DAILY and rules["dailySchedule"] is None:
        raise PolicyError("retentionPolicy.dailySchedule", "is required with a Daily schedule")
    if schedule.frequency == WEEKLY:
        if rules["dailySchedule"] is not None:
            raise PolicyError("retentionPolicy.dailySchedule", "is not allowed with a Weekly schedule")
        if rules["weeklySchedule"] is None:
            raise PolicyError("retentionPolicy.weeklySchedule", "is required with a Weekly schedule")
    daily = DailyRule(_duration(rules["dailySchedule"], "dailySchedule")) if rules["dailySchedule"] else None
    weekly = _weekly(rules["weeklySchedule"], schedule)
    monthly = _long_term(rules["monthlySchedule"], "monthlySchedule", schedule)
    yearly = _long_term(rules["yearlySchedule"], "yearlySchedule", schedule)
    return Retention(daily, weekly, monthly, yearly)


def _check_retention_times(rule: Mapping[str, Any], schedule: Schedule, path: str) -> None:
    for i, value in enumerate(_list(rule, "retentionTimes", path)):
        moment = parse_time_of_day(value, f"{path}[{i}]")
        if moment not in schedule.run_times:
            shown = ", ".join(t.strftime("%H:%M") for t in schedule.run_times)
            raise PolicyError(
                f"{path}[{i}]", f"{moment.strftime('%H:%M')} is not the schedule's time ({shown})",
                hint="use the time of schedulePolicy.scheduleRunTimes, or leave retentionTimes out",
            )  # fmt: skip


def _duration(rule: Mapping[str, Any] | None, key: str) -> Duration:
    assert rule is not None
    path = f"retentionPolicy.{key}.retentionDuration"
    obj = _object(rule, "retentionDuration", path, required=True)
    assert obj is not None
    _no_unknown(obj, {"count", "durationType"}, path)
    expected = _RULE_KEYS[key][1]
    kind = obj.get("durationType")
    if not isinstance(kind, str) or kind.lower() != expected.lower():
        raise PolicyError(f"{path}.durationType", f"{kind!r} must be {expected} in {key}")
    count = obj.get("count")
    low, high = RETENTION_LIMITS[expected]
    if not isinstance(count, int) or isinstance(count, bool):
        raise PolicyError(f"{path}.count", f"{count!r} is not a whole number ({low}-{high} {expected.lower()})")
    if not low <= count <= high:
        raise PolicyError(f"{path}.count", f"{count} is out of range ({low}-{high} {expected.lower()})")
    return Duration(count, expected)


def _weekly(rule: Mapping[str, Any] | None, schedule: Schedule) -> WeeklyRule | None:
    if rule is None:
        return None
    path = "retentionPolicy.weeklySchedule.daysOfTheWeek"
    days = _names(_list(rule, "daysOfTheWeek", path), WEEKDAYS, path)
    if not days:
        raise PolicyError(path, "selects nothing: list at least one day")
    _days_run(days, schedule, path)
    return WeeklyRule(tuple(sorted(days)), _duration(rule, "weeklySchedule"))


def _days_run(days: Sequence[int], schedule: Schedule, path: str) -> None:
    """With a Weekly schedule a rule may only name days the schedule runs on."""
    if schedule.frequency != WEEKLY:
        return
    for day in days:
        if day not in schedule.run_days:
            raise PolicyError(
                path,
                f"selects nothing on {WEEKDAYS[day]}: the Weekly schedule does not run that day",
                hint=f"use a day of schedulePolicy.scheduleRunDays ({_day_names(schedule.run_days)})",
            )


def _day_names(days: Sequence[int]) -> str:
    return ", ".join(WEEKDAYS[d] for d in days)


def _long_term(rule: Mapping[str, Any] | None, key: str, schedule: Schedule) -> LongTermRule | None:
    if rule is None:
        return None
    base = f"retentionPolicy.{key}"
    months: tuple[int, ...] = ()
    if key == "yearlySchedule":
        months = tuple(m + 1 for m in _names(_list(rule, "monthsOfYear", f"{base}.monthsOfYear"), MONTHS,
                                             f"{base}.monthsOfYear"))  # fmt: skip
        if not months:
            raise PolicyError(f"{base}.monthsOfYear", "selects nothing: list at least one month")
    format_type = rule.get("retentionScheduleFormatType")
    if not isinstance(format_type, str) or format_type.lower() not in ("weekly", "daily"):
        raise PolicyError(f"{base}.retentionScheduleFormatType", f"{format_type!r} is not Weekly or Daily")
    duration = _duration(rule, key)
    if format_type.lower() == "daily":
        dates = _days_of_month(rule, base, schedule)
        return LongTermRule(DAILY, duration, days_of_month=dates, months=tuple(sorted(months)))
    weekly = _object(rule, "retentionScheduleWeekly", f"{base}.retentionScheduleWeekly", required=True)
    assert weekly is not None
    wpath = f"{base}.retentionScheduleWeekly"
    _no_unknown(weekly, {"daysOfTheWeek", "weeksOfTheMonth"}, wpath)
    days = _names(_list(weekly, "daysOfTheWeek", f"{wpath}.daysOfTheWeek"), WEEKDAYS, f"{wpath}.daysOfTheWeek")
    weeks = _names(_list(weekly, "weeksOfTheMonth", f"{wpath}.weeksOfTheMonth"), WEEKS_OF_MONTH,
                   f"{wpath}.weeksOfTheMonth")  # fmt: skip
    if not days:
        raise PolicyError(f"{wpath}.daysOfTheWeek", "selects nothing: list at least one day")
    if not weeks:
        raise PolicyError(f"{wpath}.weeksOfTheMonth", "selects nothing: list at least one week (First..Last)")
    _days_run(days, schedule, f"{wpath}.daysOfTheWeek")
    return LongTermRule(
        WEEKLY,
        duration,
        days_of_week=tuple(sorted(days)),
        weeks_of_month=tuple(sorted(w + 1 for w in weeks)),
        months=tuple(sorted(months)),
    )


def _days_of_month(rule: Mapping[str, Any], base: str, schedule: Schedule) -> tuple[DayOfMonth, ...]:
    path = f"{base}.retentionScheduleDaily"
    if schedule.frequency == WEEKLY:
        raise PolicyError(
            f"{base}.retentionScheduleFormatType",
            "Daily (day of the month) selects nothing reliably with a Weekly schedule",
            hint="use retentionScheduleFormatType Weekly (a weekday and week of the month) with a Weekly schedule",
        )
    daily = _object(rule, "retentionScheduleDaily", path, required=True)
    assert daily is not None
    _no_unknown(daily, {"daysOfTheMonth"}, path)
    entries = _list(daily, "daysOfTheMonth", f"{path}.daysOfTheMonth")
    if not entries:
        raise PolicyError(f"{path}.daysOfTheMonth", "selects nothing: list at least one day of the month")
    out: list[DayOfMonth] = []
    for i, entry in enumerate(entries):
        where = f"{path}.daysOfTheMonth[{i}]"
        if not isinstance(entry, Mapping):
            raise PolicyError(where, 'must be an object such as {"date": 1, "isLast": false}')
        _no_unknown(entry, {"date", "isLast"}, where)
        is_last = entry.get("isLast") is True
        day = entry.get("date")
        if not is_last and (not isinstance(day, int) or isinstance(day, bool) or not 1 <= day <= 28):
            raise PolicyError(f"{where}.date", f"{day!r} is not a day 1-28 (use isLast for the month's last day)")
        value = DayOfMonth(0 if is_last else int(day), is_last)  # type: ignore[arg-type]
        if value in out:
            raise PolicyError(where, "is listed twice")
        out.append(value)
    return tuple(out)


def _instant_rp_days(value: Any, schedule: Schedule) -> int:
    if value is None:
        return 5 if schedule.frequency == WEEKLY else 2
    low, high = INSTANT_RP_DAYS
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PolicyError("instantRpRetentionRangeInDays", f"{value!r} is out of range ({low}-{high} days)")
    return value


# ---- printing -----------------------------------------------------------------------------------


def format_time(moment: time) -> str:
    """A scheduleRunTimes entry as Azure prints it (the date and offset mean nothing)."""
    return f"{PRINTED_DATE}T{moment.strftime('%H:%M:%S')}+00:00"


def _duration_json(d: Duration) -> dict[str, Any]:
    return {"count": d.count, "durationType": d.duration_type}


def _long_term_json(rule: LongTermRule, times: list[str], yearly: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"retentionScheduleFormatType": rule.format_type}
    if yearly:
        out["monthsOfYear"] = [MONTHS[m - 1] for m in rule.months]
    if rule.format_type == DAILY:
        days = [{"date": d.day, "isLast": d.is_last} for d in rule.days_of_month]
        out["retentionScheduleDaily"] = {"daysOfTheMonth": days}
        out["retentionScheduleWeekly"] = None
    else:
        out["retentionScheduleDaily"] = None
        out["retentionScheduleWeekly"] = {
            "daysOfTheWeek": [WEEKDAYS[d] for d in rule.days_of_week],
            "weeksOfTheMonth": [WEEKS_OF_MONTH[w - 1] for w in rule.weeks_of_month],
        }
    out["retentionTimes"] = times
    out["retentionDuration"] = _duration_json(rule.duration)
    return out


def to_properties(policy: Policy) -> dict[str, Any]:
    """The canonical Azure properties of a policy (what `policy show` prints under properties)."""
    sched = policy.schedule
    times = [format_time(t) for t in sched.run_times]
    ret = policy.retention
    retention: dict[str, Any] = {"retentionPolicyType": "LongTermRetentionPolicy"}
    retention["dailySchedule"] = (
        {"retentionTimes": times, "retentionDuration": _duration_json(ret.daily.duration)} if ret.daily else None
    )
    retention["weeklySchedule"] = (
        {
            "daysOfTheWeek": [WEEKDAYS[d] for d in ret.weekly.days_of_week],
            "retentionTimes": times,
            "retentionDuration": _duration_json(ret.weekly.duration),
        }
        if ret.weekly
        else None
    )
    retention["monthlySchedule"] = _long_term_json(ret.monthly, times, False) if ret.monthly else None
    retention["yearlySchedule"] = _long_term_json(ret.yearly, times, True) if ret.yearly else None
    return {
        "backupManagementType": "AzureIaasVM",
        "instantRpRetentionRangeInDays": policy.instant_rp_days,
        "schedulePolicy": {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": sched.frequency,
            "scheduleRunDays": [WEEKDAYS[d] for d in sched.run_days] if sched.frequency == WEEKLY else None,
            "scheduleRunTimes": times,
            "scheduleWeeklyFrequency": 0,
        },
        "retentionPolicy": retention,
        "timeZone": policy.time_zone,
        **policy.extra,
    }
