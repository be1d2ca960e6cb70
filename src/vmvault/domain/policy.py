"""Backup policies in Azure's shape (AzureIaasVM): parse, validate and print back.

A policy file holds `az backup policy show`'s JSON (``{"id", "name", "properties": {...}, ...}``,
nulls and all) or the bare properties. ``parse_policy`` checks every field and raises
``PolicyError`` naming the field (``schedulePolicy.scheduleRunDays``) and the rule it breaks;
``to_properties`` prints the canonical form, which ``parse_policy`` reads back unchanged, and
``policy_notes`` says which of the given fields vmvault keeps without acting on them.
docs/policies.md has the table of shapes and fields.

Rules (Azure's, for VM policies):

- Standard (``policyType`` V1, ``SimpleSchedulePolicy``): ``scheduleRunFrequency`` Daily or
  Weekly (with ``scheduleRunDays``), one ``scheduleRunTimes`` entry.
- Enhanced (``policyType`` V2, ``SimpleSchedulePolicyV2``, either one says it): Hourly
  (``hourlySchedule {interval 4/6/8/12, scheduleWindowStartTime, scheduleWindowDuration}``),
  Daily (``dailySchedule.scheduleRunTimes``) or Weekly (``weeklySchedule {scheduleRunDays,
  scheduleRunTimes}``).
- A time is a datetime whose date (and offset) are ignored: its time of day, on the hour or
  half-hour, is read in ``timeZone`` (an IANA name, e.g. Europe/Berlin, or a Windows name as
  Azure writes it, e.g. W. Europe Standard Time: domain/timezones.py).
- Field names match case-insensitively (``instantRPDetails`` = ``instantRpDetails``); a null
  is the same as a missing field. Unknown fields are refused inside ``schedulePolicy`` and
  ``retentionPolicy`` (vmvault computes times from them: guessing would misplace backups) and
  kept with a note at the top level of the properties.
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
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from vmvault.domain.timezones import UnknownTimeZone, iana_name, is_windows_name, zone
from vmvault.errors import InvalidInput

DAILY, WEEKLY, HOURLY = "Daily", "Weekly", "Hourly"
FREQUENCIES = (DAILY, WEEKLY, HOURLY)
V1, V2 = "V1", "V2"  # Standard, Enhanced
SIMPLE, SIMPLE_V2 = "SimpleSchedulePolicy", "SimpleSchedulePolicyV2"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # date.weekday()
WEEKS_OF_MONTH = ("First", "Second", "Third", "Fourth", "Last")
MONTHS = tuple(calendar.month_name[1:])  # January .. December
LAST_WEEK = 5  # index of "Last" + 1
# What Azure's REST schema lets through (it has no minimum): daily 1-9999 days, weekly 1-5163
# weeks, monthly 1-1188 months, yearly 1-99 years. Azure's service wants at least 7 days of
# daily retention for VMs; a shorter one is accepted and policy_notes says so.
RETENTION_LIMITS = {"Days": (1, 9999), "Weeks": (1, 5163), "Months": (1, 1188), "Years": (1, 99)}
AZURE_MIN_DAILY_DAYS = 7
HOURLY_INTERVALS = (4, 6, 8, 12)  # hours, as documented for hourlySchedule.interval
WINDOW_HOURS = (1, 24)
INSTANT_RP_DAYS = (1, 9999)
AZURE_INSTANT_RP_MAX = {V1: 5, V2: 30}  # Standard keeps snapshots up to 5 days, Enhanced up to 30
CRASH_CONSISTENT = "OnlyCrashConsistent"
SNAPSHOT_CONSISTENCY = ("Default", CRASH_CONSISTENT)
DEFAULT_POLICY_NAME = "DefaultPolicy"
DEFAULT_RUN_TIME = time(20, 30)
DEFAULT_DAILY_DAYS = 180
# scheduleRunTimes are datetimes whose date is ignored; this one is printed (as Azure prints some date).
PRINTED_DATE = "2020-01-01"
MAX_DOCUMENT_BYTES = 64 * 1024  # a policy is a few KiB; the rest would be stored for nothing

_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.0+)?)?$")
_PROPERTY_KEYS = (
    "backupManagementType", "instantRPDetails", "instantRpRetentionRangeInDays", "schedulePolicy", "retentionPolicy",
    "timeZone", "protectedItemsCount", "policyType", "tieringPolicy", "snapshotConsistencyType",
    "resourceGuardOperationRequests",
)  # fmt: skip
# Documented properties vmvault keeps as given without acting on them (docs/policies.md).
_KEPT_KEYS = ("instantRPDetails", "tieringPolicy", "resourceGuardOperationRequests")
_SCHEDULE_V1_KEYS = (
    "schedulePolicyType", "scheduleRunFrequency", "scheduleRunDays", "scheduleRunTimes", "scheduleWeeklyFrequency",
    "hourlySchedule",
)  # fmt: skip
_SCHEDULE_V2_KEYS = ("schedulePolicyType", "scheduleRunFrequency", "hourlySchedule", "dailySchedule", "weeklySchedule")
_V2_PARTS = {HOURLY: "hourlySchedule", DAILY: "dailySchedule", WEEKLY: "weeklySchedule"}
_RETENTION_KEYS = ("retentionPolicyType", "dailySchedule", "weeklySchedule", "monthlySchedule", "yearlySchedule")
_RULE_KEYS = {
    "dailySchedule": (("retentionTimes", "retentionDuration"), "Days"),
    "weeklySchedule": (("daysOfTheWeek", "retentionTimes", "retentionDuration"), "Weeks"),
    "monthlySchedule": (
        ("retentionScheduleFormatType", "retentionScheduleDaily", "retentionScheduleWeekly", "retentionTimes",
         "retentionDuration"),
        "Months",
    ),
    "yearlySchedule": (
        ("retentionScheduleFormatType", "monthsOfYear", "retentionScheduleDaily", "retentionScheduleWeekly",
         "retentionTimes", "retentionDuration"),
        "Years",
    ),
}  # fmt: skip
# Other kinds of Azure Backup policy, by backupManagementType, and what they protect.
OTHER_KINDS = {
    "azurestorage": "Azure Files shares", "azureworkload": "SQL Server / SAP HANA databases in VMs",
    "azuresql": "Azure SQL databases", "mab": "the MARS agent", "dpm": "System Center DPM",
    "azurebackupserver": "Azure Backup Server", "azureiaasclassiccompute": "classic VMs",
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
    frequency: str  # Daily | Weekly | Hourly
    run_days: tuple[int, ...]  # date.weekday() numbers; empty unless Weekly
    run_times: tuple[time, ...]  # local times of day, in the policy's time zone (Hourly: the window's)
    interval_hours: int = 0  # Hourly only
    window_start: time | None = None  # Hourly only
    window_hours: int = 0  # Hourly only

    def runs_on(self, day: date) -> bool:
        return self.frequency != WEEKLY or day.weekday() in self.run_days


def window_times(start: time, interval: int, hours: int) -> tuple[time, ...]:
    """The local times of an hourly window: start, start+interval, ... up to start+hours.

    The window's end is included (a 12-hour window from 08:00 every 4 hours runs at 08, 12, 16
    and 20), except a time that is the start again one day later (a 24-hour window). Times
    are wall-clock times, so on a DST change day the gap between two of them is an hour
    longer or shorter, like Azure's policy times.
    """
    first = datetime.combine(date(2000, 1, 1), start)
    out = {(first + timedelta(hours=h)).time() for h in range(0, hours + 1, interval) if h < 24}
    return tuple(sorted(out))


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
    time_zone: str = "UTC"  # as the user gave it: an IANA or a Windows name
    instant_rp_days: int = 2
    policy_type: str = V1
    snapshot_consistency_type: str | None = None  # OnlyCrashConsistent: no guest freeze (the backup path acts on it)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # top-level fields kept as given

    @property
    def tzinfo(self) -> ZoneInfo:
        return zone(self.time_zone)

    @property
    def iana_zone(self) -> str:
        return iana_name(self.time_zone)

    @property
    def enhanced(self) -> bool:
        return self.policy_type == V2


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
    """The properties of a policy file: az's show output (a resource with properties) or bare.

    The resource's own fields (id, name, type, eTag, location, tags, resourceGroup, ...) are
    not the policy: the name is the one given to create/set, and the rest is Azure's.
    """
    if not isinstance(document, Mapping):
        raise PolicyError("(file)", "a policy must be a JSON object", hint='write {"properties": {...}}')
    props = document.get("properties")
    if isinstance(props, Mapping):
        return props
    if "properties" in document and props is not None:
        raise PolicyError("properties", "must be a JSON object")
    return document


def parse_policy(document: Any) -> Policy:
    """A validated Policy from a policy file's JSON; PolicyError names the first bad field."""
    _check_size(document)
    props, given, unknown = _fields(unwrap(document), _PROPERTY_KEYS, "", keep_unknown=True)
    _check_kind(props.get("backupManagementType"))
    time_zone = check_time_zone(props.get("timeZone") or "UTC", "timeZone")
    declared = _policy_type(props.get("policyType"))
    schedule_obj = _object(props, "schedulePolicy", "schedulePolicy", required=True)
    assert schedule_obj is not None
    schedule, policy_type = _parse_schedule(schedule_obj, declared)
    retention = _parse_retention(_object(props, "retentionPolicy", "retentionPolicy", required=True), schedule)
    instant = _instant_rp_days(props.get("instantRpRetentionRangeInDays"), schedule, policy_type)
    consistency = _snapshot_consistency(props.get("snapshotConsistencyType"))
    _check_kept(props)
    extra = {given[k]: props[k] for k in _KEPT_KEYS if props.get(k) is not None}
    extra.update(unknown)
    return Policy(schedule, retention, time_zone, instant, policy_type, consistency, extra)




def only_crash_consistent(properties: Mapping[str, Any]) -> bool:
    """snapshotConsistencyType: OnlyCrashConsistent (Azure's) makes live backups skip the guest's quiesce."""
    inner = properties.get("properties")
    props = inner if isinstance(inner, Mapping) else properties
    # Field names match in any case, as parse_policy reads them.
    for key, value in props.items():
        if isinstance(key, str) and key.lower() == "snapshotconsistencytype":
            return isinstance(value, str) and value.lower() == "onlycrashconsistent"
    return False




def check_time_zone(value: Any, path: str) -> str:
    """A time zone name: IANA (tzdata) or Windows (CLDR's table); returned as given (stripped)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise PolicyError(path, f"{value!r} is not a time zone; give a name such as UTC, Europe/Berlin "
                          "or W. Europe Standard Time")  # fmt: skip
    name = value.strip()
    try:
        iana_name(name)
    except UnknownTimeZone:
        if name.startswith(("/", ".")) or ".." in name:
            raise PolicyError(path, f"{value!r} is not a time zone; give an IANA name such as Europe/Berlin") from None
        raise PolicyError(
            path,
            f"unknown time zone '{value}'",
            hint="give an IANA name (UTC, Europe/Berlin, Asia/Kolkata) or a Windows name (Pacific Standard Time)",
        ) from None
    return name


def _check_size(document: Any) -> None:
    try:
        size = len(json.dumps(document))
    except (TypeError, ValueError, RecursionError):
        raise PolicyError("(file)", "is not plain JSON") from None
    if size > MAX_DOCUMENT_BYTES:
        raise PolicyError("(file)", f"is {size} bytes; a policy is at most {MAX_DOCUMENT_BYTES}",
                          hint="remove what is not Azure's policy (see docs/policies.md)")  # fmt: skip


def _check_kind(management: Any) -> None:
    if management is None or (isinstance(management, str) and management.lower() == "azureiaasvm"):
        return
    what = OTHER_KINDS.get(management.lower()) if isinstance(management, str) else None
    kind = f"'{management}' is a policy for {what}" if what else f"'{management}' is not a VM policy kind"
    raise PolicyError(
        "backupManagementType",
        f"{kind}; vmvault backs up VMs and takes only AzureIaasVM policies",
        hint='use an Azure VM policy ("backupManagementType": "AzureIaasVM")',
    )


def _policy_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.upper() in (V1, V2):
        return value.upper()
    raise PolicyError("policyType", f"{value!r} is not V1 (Standard) or V2 (Enhanced)")


def _snapshot_consistency(value: Any) -> str | None:
    if value is None:
        return None
    for known in SNAPSHOT_CONSISTENCY:
        if isinstance(value, str) and value.lower() == known.lower():
            return known
    raise PolicyError("snapshotConsistencyType", f"{value!r} is not one of {', '.join(SNAPSHOT_CONSISTENCY)}")


def _check_kept(props: Mapping[str, Any]) -> None:
    """Kept fields are only stored and shown, but they are still untrusted: check their types."""
    details = props.get("instantRPDetails")
    if details is not None:
        if not isinstance(details, Mapping):
            raise PolicyError("instantRPDetails", "must be a JSON object")
        for key, value in details.items():
            if value is not None and not isinstance(value, str):
                raise PolicyError(f"instantRPDetails.{key}", f"{value!r} is not a string")
    if props.get("tieringPolicy") is not None and not isinstance(props["tieringPolicy"], Mapping):
        raise PolicyError("tieringPolicy", "must be a JSON object")
    requests = props.get("resourceGuardOperationRequests")
    if requests is not None and (not isinstance(requests, list) or not all(isinstance(r, str) for r in requests)):
        raise PolicyError("resourceGuardOperationRequests", "must be a JSON list of strings")


def _fields(
    obj: Mapping[str, Any], known: Sequence[str], prefix: str, *, keep_unknown: bool = False
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """An object's fields by their canonical names (matched case-insensitively), as given, unknown.

    A null field is as good as a missing one. An unknown field is refused naming it, or
    returned (keep_unknown) when it is not null.
    """
    by_lower = {k.lower(): k for k in known}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    unknown: dict[str, Any] = {}
    for key, value in obj.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        canonical = by_lower.get(str(key).lower())
        if canonical is None:
            if value is None:
                continue
            if not keep_unknown:
                raise PolicyError(where, "unknown field", hint=f"known fields here: {', '.join(sorted(known))}")
            unknown[str(key)] = value
            continue
        if canonical in given:
            raise PolicyError(where, f"is given twice (also as {given[canonical]})")
        given[canonical] = str(key)
        if value is not None:
            values[canonical] = value
    return values, given, unknown


def _known(obj: Mapping[str, Any], known: Sequence[str], prefix: str) -> dict[str, Any]:
    return _fields(obj, known, prefix)[0]


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
    if not isinstance(value, str) or len(value) > 64:
        raise PolicyError(path, f"{value!r} is not a time; write a datetime such as {PRINTED_DATE}T20:30:00+00:00")
    text = value.strip()
    m = _TIME_RE.fullmatch(text)
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


def _parse_schedule(obj: Mapping[str, Any], declared: str | None) -> tuple[Schedule, str]:
    """The schedule and the policy type (V1/V2) that the schedule's shape and policyType agree on."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    kind = lowered.get("schedulepolicytype")
    if kind is None:  # say V2 when policyType or a part only V2 has says so
        v2_parts = any(lowered.get(k.lower()) is not None for k in _V2_PARTS.values())
        kind = SIMPLE_V2 if declared == V2 or v2_parts else SIMPLE
    if not isinstance(kind, str) or kind.lower() not in (SIMPLE.lower(), SIMPLE_V2.lower()):
        raise PolicyError(
            "schedulePolicy.schedulePolicyType",
            f"{kind!r} is not a VM schedule (SimpleSchedulePolicy, or SimpleSchedulePolicyV2 for Enhanced policies)",
        )
    policy_type = V2 if kind.lower() == SIMPLE_V2.lower() else V1
    if declared is not None and declared != policy_type:
        raise PolicyError(
            "policyType",
            f"{declared} does not match schedulePolicyType {SIMPLE_V2 if policy_type == V2 else SIMPLE}",
            hint="an Enhanced policy is policyType V2 with SimpleSchedulePolicyV2; a Standard one V1 with "
            "SimpleSchedulePolicy",
        )
    if policy_type == V2:
        return _parse_schedule_v2(_known(obj, _SCHEDULE_V2_KEYS, "schedulePolicy")), V2
    return _parse_schedule_v1(_known(obj, _SCHEDULE_V1_KEYS, "schedulePolicy")), V1


def _parse_schedule_v1(obj: Mapping[str, Any]) -> Schedule:
    frequency = _frequency(obj.get("scheduleRunFrequency"), "schedulePolicy.scheduleRunFrequency")
    if frequency == HOURLY or obj.get("hourlySchedule") is not None:
        raise PolicyError(
            "schedulePolicy.scheduleRunFrequency" if frequency == HOURLY else "schedulePolicy.hourlySchedule",
            "hourly backups need an Enhanced policy",
            hint='write "policyType": "V2" and "schedulePolicyType": "SimpleSchedulePolicyV2" (docs/policies.md)',
        )
    return _days_and_time(obj, frequency, "schedulePolicy")


def _days_and_time(obj: Mapping[str, Any], frequency: str, prefix: str) -> Schedule:
    """scheduleRunDays and the one scheduleRunTimes entry of a V1 schedule or a V2 daily/weekly part."""
    days_path = f"{prefix}.scheduleRunDays"
    days = _names(_list(obj, "scheduleRunDays", days_path), WEEKDAYS, days_path)
    if frequency == WEEKLY and not days:
        raise PolicyError(
            days_path, "a Weekly schedule needs at least one day", hint='e.g. "scheduleRunDays": ["Sunday"]'
        )
    if frequency == DAILY and days:
        raise PolicyError(days_path, "days are only for a Weekly schedule (a Daily one runs every day)")
    times_path = f"{prefix}.scheduleRunTimes"
    raw_times = _list(obj, "scheduleRunTimes", times_path)
    if len(raw_times) != 1:
        raise PolicyError(
            times_path,
            f"give exactly one time (got {len(raw_times)})",
            hint=f'e.g. "scheduleRunTimes": ["{PRINTED_DATE}T20:30:00+00:00"]',
        )
    times = tuple(parse_time_of_day(t, f"{times_path}[{i}]") for i, t in enumerate(raw_times))
    return Schedule(frequency, tuple(sorted(days)), times)


def _parse_schedule_v2(obj: Mapping[str, Any]) -> Schedule:
    frequency = _frequency(obj.get("scheduleRunFrequency"), "schedulePolicy.scheduleRunFrequency")
    part_key = _V2_PARTS[frequency]
    for other in _V2_PARTS.values():
        if other != part_key and obj.get(other) is not None:
            raise PolicyError(
                f"schedulePolicy.{other}",
                f"does not go with scheduleRunFrequency {frequency}",
                hint=f"give only schedulePolicy.{part_key} (or null the others)",
            )
    prefix = f"schedulePolicy.{part_key}"
    part = _object(obj, part_key, prefix, required=True)
    assert part is not None
    if frequency == HOURLY:
        return _hourly(_known(part, ("interval", "scheduleWindowStartTime", "scheduleWindowDuration"), prefix), prefix)
    known = ("scheduleRunTimes",) if frequency == DAILY else ("scheduleRunDays", "scheduleRunTimes")
    return _days_and_time(_known(part, known, prefix), frequency, prefix)


def _hourly(part: Mapping[str, Any], prefix: str) -> Schedule:
    interval = part.get("interval")
    if interval not in HOURLY_INTERVALS or isinstance(interval, bool):
        raise PolicyError(f"{prefix}.interval", f"{interval!r} is not one of {', '.join(map(str, HOURLY_INTERVALS))}"
                          " (hours between two backups)")  # fmt: skip
    start_value = part.get("scheduleWindowStartTime")
    if start_value is None:
        raise PolicyError(f"{prefix}.scheduleWindowStartTime", "is required (the window's first backup)",
                          hint=f'e.g. "scheduleWindowStartTime": "{PRINTED_DATE}T08:00:00+00:00"')  # fmt: skip
    start = parse_time_of_day(start_value, f"{prefix}.scheduleWindowStartTime")
    hours = part.get("scheduleWindowDuration")
    low, high = WINDOW_HOURS
    if not isinstance(hours, int) or isinstance(hours, bool) or not low <= hours <= high:
        raise PolicyError(f"{prefix}.scheduleWindowDuration", f"{hours!r} is not a number of hours {low}-{high}")
    return Schedule(HOURLY, (), window_times(start, int(interval), hours), int(interval), start, hours)


def _frequency(value: Any, path: str) -> str:
    if value is None:
        raise PolicyError(path, "is required (Daily, Weekly, or Hourly in an Enhanced policy)")
    for known in FREQUENCIES:
        if isinstance(value, str) and value.lower() == known.lower():
            return known
    raise PolicyError(path, f"{value!r} is not Daily, Weekly or Hourly")


def _parse_retention(obj: Mapping[str, Any] | None, schedule: Schedule) -> Retention:
    assert obj is not None
    obj = _known(obj, _RETENTION_KEYS, "retentionPolicy")
    kind = obj.get("retentionPolicyType")
    if kind is not None and (not isinstance(kind, str) or kind.lower() != "longtermretentionpolicy"):
        raise PolicyError(
            "retentionPolicy.retentionPolicyType",
            f"{kind!r} is not a VM retention (SimpleRetentionPolicy is for other workloads)",
            hint="use LongTermRetentionPolicy",
        )
    rules: dict[str, Mapping[str, Any] | None] = {}
    for key in _RULE_KEYS:
        rule = _object(obj, key, f"retentionPolicy.{key}")
        if rule is not None:
            rule = _known(rule, _RULE_KEYS[key][0], f"retentionPolicy.{key}")
            _check_retention_times(rule, schedule, f"retentionPolicy.{key}.retentionTimes")
        rules[key] = rule
    if schedule.frequency != WEEKLY and rules["dailySchedule"] is None:
        raise PolicyError("retentionPolicy.dailySchedule", f"is required with a {schedule.frequency} schedule")
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
    found = _object(rule, "retentionDuration", path, required=True)
    assert found is not None
    obj = _known(found, ("count", "durationType"), path)
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
    found = _object(rule, "retentionScheduleWeekly", f"{base}.retentionScheduleWeekly", required=True)
    assert found is not None
    wpath = f"{base}.retentionScheduleWeekly"
    weekly = _known(found, ("daysOfTheWeek", "weeksOfTheMonth"), wpath)
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
    found = _object(rule, "retentionScheduleDaily", path, required=True)
    assert found is not None
    daily = _known(found, ("daysOfTheMonth",), path)
    entries = _list(daily, "daysOfTheMonth", f"{path}.daysOfTheMonth")
    if not entries:
        raise PolicyError(f"{path}.daysOfTheMonth", "selects nothing: list at least one day of the month")
    out: list[DayOfMonth] = []
    for i, entry in enumerate(entries):
        where = f"{path}.daysOfTheMonth[{i}]"
        if not isinstance(entry, Mapping):
            raise PolicyError(where, 'must be an object such as {"date": 1, "isLast": false}')
        entry = _known(entry, ("date", "isLast"), where)
        is_last = entry.get("isLast") is True
        day = entry.get("date")
        if not is_last and (not isinstance(day, int) or isinstance(day, bool) or not 1 <= day <= 28):
            raise PolicyError(f"{where}.date", f"{day!r} is not a day 1-28 (use isLast for the month's last day)")
        value = DayOfMonth(0 if is_last else int(day), is_last)  # type: ignore[arg-type]
        if value in out:
            raise PolicyError(where, "is listed twice")
        out.append(value)
    return tuple(out)


def _instant_rp_days(value: Any, schedule: Schedule, policy_type: str) -> int:
    if value is None:  # Azure's defaults: Enhanced 7, Standard 2 (5 for a weekly schedule)
        return 7 if policy_type == V2 else 5 if schedule.frequency == WEEKLY else 2
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


def _schedule_json(policy: Policy) -> dict[str, Any]:
    sched = policy.schedule
    times = [format_time(t) for t in sched.run_times]
    days = [WEEKDAYS[d] for d in sched.run_days]
    if not policy.enhanced:
        return {
            "schedulePolicyType": SIMPLE,
            "scheduleRunFrequency": sched.frequency,
            "scheduleRunDays": days if sched.frequency == WEEKLY else None,
            "scheduleRunTimes": times,
            "scheduleWeeklyFrequency": 0,
        }
    out: dict[str, Any] = {"schedulePolicyType": SIMPLE_V2, "scheduleRunFrequency": sched.frequency}
    out["hourlySchedule"] = (
        {
            "interval": sched.interval_hours,
            "scheduleWindowStartTime": format_time(sched.window_start),
            "scheduleWindowDuration": sched.window_hours,
        }
        if sched.frequency == HOURLY and sched.window_start is not None
        else None
    )
    out["dailySchedule"] = {"scheduleRunTimes": times} if sched.frequency == DAILY else None
    out["weeklySchedule"] = {"scheduleRunDays": days, "scheduleRunTimes": times} if sched.frequency == WEEKLY else None
    return out


def retention_times(schedule: Schedule) -> list[str]:
    """What retention rules print as retentionTimes: the schedule's time (an hourly window's start)."""
    first = schedule.window_start if schedule.window_start is not None else schedule.run_times[0]
    return [format_time(first)]


def to_properties(policy: Policy) -> dict[str, Any]:
    """The canonical Azure properties of a policy (what `policy show` prints under properties).

    timeZone is the name the user gave; kept fields (instantRPDetails, tieringPolicy, ...) are
    printed under the names and with the values given.
    """
    times = retention_times(policy.schedule)
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
    out: dict[str, Any] = {
        "backupManagementType": "AzureIaasVM",
        "policyType": policy.policy_type,
        "instantRpRetentionRangeInDays": policy.instant_rp_days,
        "schedulePolicy": _schedule_json(policy),
        "retentionPolicy": retention,
        "timeZone": policy.time_zone,
    }
    if policy.snapshot_consistency_type is not None:
        out["snapshotConsistencyType"] = policy.snapshot_consistency_type
    return {**out, **policy.extra}


# ---- notes: what vmvault does with what was given -----------------------------------------------


def policy_notes(policy: Policy) -> list[str]:
    """Sentences for `policy show`'s notes: fields kept but not enforced, Azure limits not applied."""
    notes: list[str] = []
    if is_windows_name(policy.time_zone):
        notes.append(f"timeZone '{policy.time_zone}' is a Windows name: times are computed in {policy.iana_zone} "
                     "(CLDR windowsZones)")  # fmt: skip
    notes += _schedule_notes(policy)
    daily = policy.retention.daily
    if daily is not None and daily.duration.count < AZURE_MIN_DAILY_DAYS:
        notes.append(
            f"retentionPolicy.dailySchedule keeps {daily.duration.count} day(s): honoured, though Azure's service "
            f"refuses fewer than {AZURE_MIN_DAILY_DAYS} days for VM policies"
        )
    if policy.snapshot_consistency_type == CRASH_CONSISTENT:
        notes.append("snapshotConsistencyType OnlyCrashConsistent: honoured: backups do not freeze the guest's "
                     "file systems (crash-consistent points)")  # fmt: skip
    notes += _kept_notes(policy)
    return notes


def _schedule_notes(policy: Policy) -> list[str]:
    sched = policy.schedule
    days = policy.instant_rp_days
    azure_max = AZURE_INSTANT_RP_MAX[policy.policy_type]
    notes: list[str] = []
    if sched.frequency == HOURLY:
        notes.append(
            f"hourly schedule: honoured: {len(sched.run_times)} backups a day at "
            f"{', '.join(t.strftime('%H:%M') for t in sched.run_times)} ({policy.time_zone}); the daily rule keeps "
            f"the first backup of each day and the others are kept instantRpRetentionRangeInDays ({days} days)"
        )
    else:
        notes.append(
            "instantRpRetentionRangeInDays: kept, not enforced: vmvault has no separate snapshot tier; every point is "
            "in the vault and restores from it"
        )
    if days > azure_max:
        kind = "Enhanced" if policy.enhanced else "Standard"
        notes.append(f"instantRpRetentionRangeInDays {days}: Azure's service allows at most {azure_max} for "
                     f"{kind} policies")  # fmt: skip
    return notes


def _kept_notes(policy: Policy) -> list[str]:
    reasons = {
        "instantrpdetails": "kept, not enforced: vmvault creates no resource groups for instant-restore snapshots",
        "tieringpolicy": "kept, not enforced: vmvault has no archive tier (points stay in the vault's storage)",
        "resourceguardoperationrequests": "kept, not enforced: vmvault has no Resource Guard (its own roles and "
        "tokens guard operations)",
    }
    notes = []
    for key in policy.extra:
        reason = reasons.get(key.lower(), "not a field of Azure's AzureIaasVM policy that vmvault knows: kept as "
                             "given, not acted on")  # fmt: skip
        notes.append(f"{key}: {reason}")
    return notes
