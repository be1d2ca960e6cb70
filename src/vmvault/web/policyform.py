"""The policy form: the few fields a person edits, turned into Azure's policy document.

The service validates the document (domain/policy.py) and its InvalidInput names the field and
the rule, which the form shows as it is. Rules the form does not show (monthly, yearly) and the
fields vmvault only keeps (tieringPolicy, instantRPDetails, ...) are kept from the policy being
edited, with their times moved to the new backup time. An Hourly schedule makes the policy an
Enhanced one (policyType V2), as in Azure's portal; an Enhanced policy stays Enhanced (Azure does
not turn one back into a Standard policy either).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from vmvault.domain.policy import HOURLY, HOURLY_INTERVALS, SIMPLE, SIMPLE_V2, V1, V2, WEEKDAYS, parse_policy
from vmvault.errors import InvalidInput

PRINTED_DATE = "2020-01-01"


@dataclass
class PolicyForm:
    name: str = ""
    frequency: str = "Daily"
    time: str = "20:30"  # the backup time, or an hourly window's start
    days: list[str] = field(default_factory=list)
    time_zone: str = "UTC"
    daily_days: str = "180"
    weekly_weeks: str = ""
    interval: str = "4"  # Hourly: hours between backups
    window_hours: str = "12"  # Hourly: the window's length
    enhanced: bool = False
    weekdays: tuple[str, ...] = WEEKDAYS
    intervals: tuple[int, ...] = HOURLY_INTERVALS

    @classmethod
    def of(cls, name: str, properties: dict[str, Any]) -> PolicyForm:
        policy = parse_policy(properties)
        schedule = policy.schedule
        retention = policy.retention
        start = schedule.window_start or schedule.run_times[0]
        return cls(
            name=name,
            frequency=schedule.frequency,
            time=start.strftime("%H:%M"),
            days=[WEEKDAYS[d] for d in schedule.run_days],
            time_zone=policy.time_zone,
            daily_days=str(retention.daily.duration.count) if retention.daily else "",
            weekly_weeks=str(retention.weekly.duration.count) if retention.weekly else "",
            interval=str(schedule.interval_hours or 4),
            window_hours=str(schedule.window_hours or 12),
            enhanced=policy.enhanced,
        )

    def document(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The properties to store; InvalidInput for what the form itself can tell is wrong."""
        if not re.fullmatch(r"\d{1,2}:\d{2}", self.time):
            raise InvalidInput(f"backup time '{self.time}' is not HH:MM", hint="e.g. 20:30 (on the hour or half-hour)")
        run = f"{PRINTED_DATE}T{self.time}:00+00:00"
        props: dict[str, Any] = copy.deepcopy(base) if base else {"backupManagementType": "AzureIaasVM"}
        enhanced = self.frequency == HOURLY or _is_enhanced(props)
        props["policyType"] = V2 if enhanced else V1
        props["schedulePolicy"] = self._schedule_v2(run) if enhanced else self._schedule_v1(run)
        retention = dict(props.get("retentionPolicy") or {"retentionPolicyType": "LongTermRetentionPolicy"})
        retention["dailySchedule"] = _rule(self.daily_days, "Days", run, "daily retention")
        weekly = _rule(self.weekly_weeks, "Weeks", run, "weekly retention")
        if weekly is not None:
            weekly["daysOfTheWeek"] = list(self.days) if self.frequency == "Weekly" and self.days else ["Sunday"]
        retention["weeklySchedule"] = weekly
        for key in ("monthlySchedule", "yearlySchedule"):
            if retention.get(key):
                retention[key] = {**retention[key], "retentionTimes": [run]}
            else:
                retention[key] = None
        props["retentionPolicy"] = retention
        props["timeZone"] = self.time_zone.strip() or "UTC"
        props.pop("protectedItemsCount", None)
        return props

    def _schedule_v1(self, run: str) -> dict[str, Any]:
        return {
            "schedulePolicyType": SIMPLE,
            "scheduleRunFrequency": self.frequency,
            "scheduleRunDays": list(self.days) if self.frequency == "Weekly" else None,
            "scheduleRunTimes": [run],
            "scheduleWeeklyFrequency": 0,
        }

    def _schedule_v2(self, run: str) -> dict[str, Any]:
        out: dict[str, Any] = {"schedulePolicyType": SIMPLE_V2, "scheduleRunFrequency": self.frequency}
        out["hourlySchedule"] = (
            {
                "interval": _number(self.interval, "hours between backups"),
                "scheduleWindowStartTime": run,
                "scheduleWindowDuration": _number(self.window_hours, "window length (hours)"),
            }
            if self.frequency == HOURLY
            else None
        )
        out["dailySchedule"] = {"scheduleRunTimes": [run]} if self.frequency == "Daily" else None
        weekly = {"scheduleRunDays": list(self.days), "scheduleRunTimes": [run]}
        out["weeklySchedule"] = weekly if self.frequency == "Weekly" else None
        return out


def _is_enhanced(props: dict[str, Any]) -> bool:
    schedule = props.get("schedulePolicy") or {}
    return str(props.get("policyType") or "").upper() == V2 or schedule.get("schedulePolicyType") == SIMPLE_V2


def _number(text: str, label: str) -> int:
    value = text.strip()
    if not value.isdigit():
        raise InvalidInput(f"{label} '{value}' is not a whole number", hint="give a number of hours")
    return int(value)


def _rule(count: str, unit: str, run: str, label: str) -> dict[str, Any] | None:
    text = count.strip()
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput(f"{label} '{text}' is not a whole number", hint=f"give a number of {unit.lower()}")
    return {"retentionTimes": [run], "retentionDuration": {"count": int(text), "durationType": unit}}
