"""The policy form: the few fields a person edits, turned into Azure's policy document.

The service validates the document (domain/policy.py) and its InvalidInput names the field and
the rule, which the form shows as it is. Rules the form does not show (monthly, yearly) are kept
from the policy being edited, with their times moved to the new backup time.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from vmvault.domain.policy import WEEKDAYS
from vmvault.errors import InvalidInput

PRINTED_DATE = "2020-01-01"


@dataclass
class PolicyForm:
    name: str = ""
    frequency: str = "Daily"
    time: str = "20:30"
    days: list[str] = field(default_factory=list)
    time_zone: str = "UTC"
    daily_days: str = "180"
    weekly_weeks: str = ""
    weekdays: tuple[str, ...] = WEEKDAYS

    @classmethod
    def of(cls, name: str, properties: dict[str, Any]) -> PolicyForm:
        schedule = properties["schedulePolicy"]
        retention = properties["retentionPolicy"]
        daily, weekly = retention.get("dailySchedule"), retention.get("weeklySchedule")
        return cls(
            name=name,
            frequency=schedule["scheduleRunFrequency"],
            time=str(schedule["scheduleRunTimes"][0])[11:16],
            days=list(schedule.get("scheduleRunDays") or []),
            time_zone=properties.get("timeZone") or "UTC",
            daily_days=str(daily["retentionDuration"]["count"]) if daily else "",
            weekly_weeks=str(weekly["retentionDuration"]["count"]) if weekly else "",
        )

    def document(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The properties to store; InvalidInput for what the form itself can tell is wrong."""
        if not re.fullmatch(r"\d{1,2}:\d{2}", self.time):
            raise InvalidInput(f"backup time '{self.time}' is not HH:MM", hint="e.g. 20:30 (on the hour or half-hour)")
        run = f"{PRINTED_DATE}T{self.time}:00+00:00"
        props: dict[str, Any] = copy.deepcopy(base) if base else {"backupManagementType": "AzureIaasVM"}
        props["schedulePolicy"] = {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": self.frequency,
            "scheduleRunDays": list(self.days) if self.frequency == "Weekly" else None,
            "scheduleRunTimes": [run],
            "scheduleWeeklyFrequency": 0,
        }
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


def _rule(count: str, unit: str, run: str, label: str) -> dict[str, Any] | None:
    text = count.strip()
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput(f"{label} '{text}' is not a whole number", hint=f"give a number of {unit.lower()}")
    return {"retentionTimes": [run], "retentionDuration": {"count": int(text), "durationType": unit}}
