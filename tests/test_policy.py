"""Policies in Azure's shape: validation names the field and the rule; nothing is stored on error.

The pure checks run on domain.policy; the CLI part drives `vmvault policy ...` as a subprocess.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, protect
from vmvault.domain.policy import PolicyError, parse_policy, to_properties

T = "2020-08-03T04:30:00+00:00"  # az prints run times as datetimes whose date means nothing


def days(count: int) -> dict[str, Any]:
    return {"count": count, "durationType": "Days"}


# The composite of anchors.md §2.2 (az backup policy show + the REST sample's monthly/yearly).
AZURE_SHOW = {
    "name": "testing123",
    "id": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v/backupPolicies/testing123",
    "type": "Microsoft.RecoveryServices/vaults/backupPolicies",
    "properties": {
        "backupManagementType": "AzureIaasVM",
        "instantRpDetails": {"azureBackupRgNamePrefix": None, "azureBackupRgNameSuffix": None},
        "instantRpRetentionRangeInDays": 2,
        "schedulePolicy": {
            "schedulePolicyType": "SimpleSchedulePolicy",
            "scheduleRunFrequency": "Daily",
            "scheduleRunDays": None,
            "scheduleRunTimes": [T],
            "scheduleWeeklyFrequency": 0,
        },
        "retentionPolicy": {
            "retentionPolicyType": "LongTermRetentionPolicy",
            "dailySchedule": {"retentionTimes": [T], "retentionDuration": days(180)},
            "weeklySchedule": {
                "daysOfTheWeek": ["Sunday"],
                "retentionTimes": [T],
                "retentionDuration": {"count": 30, "durationType": "Weeks"},
            },
            "monthlySchedule": {
                "retentionScheduleFormatType": "Weekly",
                "retentionScheduleWeekly": {"daysOfTheWeek": ["Wednesday"], "weeksOfTheMonth": ["First", "Third"]},
                "retentionTimes": [T],
                "retentionDuration": {"count": 2, "durationType": "Months"},
            },
            "yearlySchedule": {
                "retentionScheduleFormatType": "Weekly",
                "monthsOfYear": ["February", "November"],
                "retentionScheduleWeekly": {"daysOfTheWeek": ["Monday"], "weeksOfTheMonth": ["Fourth"]},
                "retentionTimes": [T],
                "retentionDuration": {"count": 4, "durationType": "Years"},
            },
        },
        "timeZone": "UTC",
        "protectedItemsCount": 0,
    },
}


def props() -> dict[str, Any]:
    return copy.deepcopy(AZURE_SHOW["properties"])  # type: ignore[arg-type]


def weekly_props() -> dict[str, Any]:
    return {
        "schedulePolicy": {"scheduleRunFrequency": "Weekly", "scheduleRunDays": ["Sunday", "Wednesday"],
                           "scheduleRunTimes": ["2020-01-01T23:00:00Z"]},
        "retentionPolicy": {"weeklySchedule": {"daysOfTheWeek": ["Sunday"],
                                               "retentionDuration": {"count": 12, "durationType": "Weeks"}}},
        "timeZone": "Europe/Berlin",
    }  # fmt: skip


# ---- pure: accepted shapes ----------------------------------------------------------------------


def test_azure_show_output_is_accepted_wrapped_and_bare() -> None:
    wrapped = parse_policy(AZURE_SHOW)
    bare = parse_policy(props())
    assert wrapped == bare
    assert wrapped.schedule.frequency == "Daily"
    assert [t.isoformat() for t in wrapped.schedule.run_times] == ["04:30:00"]
    assert wrapped.retention.daily is not None and wrapped.retention.daily.duration.count == 180
    assert wrapped.retention.yearly is not None and wrapped.retention.yearly.months == (2, 11)


def test_printed_properties_read_back_unchanged() -> None:
    for source in (props(), weekly_props()):
        printed = to_properties(parse_policy(source))
        assert to_properties(parse_policy(printed)) == printed
        assert parse_policy(printed) == parse_policy(source)


def test_run_time_date_and_offset_are_ignored() -> None:
    p = props()
    p["schedulePolicy"]["scheduleRunTimes"] = ["1999-12-31T04:30:00-07:00"]
    p["timeZone"] = "Asia/Kolkata"
    parsed = parse_policy(p)
    assert [t.isoformat() for t in parsed.schedule.run_times] == ["04:30:00"]
    assert parsed.time_zone == "Asia/Kolkata"


def test_monthly_selector_picks_the_first_and_third_wednesday() -> None:
    from datetime import date

    rule = parse_policy(props()).retention.monthly
    assert rule is not None
    # January 2026: Wednesdays are the 7th, 14th, 21st and 28th.
    chosen = [d for d in range(1, 32) if rule.selects(date(2026, 1, d))]
    assert chosen == [7, 21]


# ---- pure: refused, naming the field ------------------------------------------------------------


def _break(mutate: Any, base: Any = props) -> dict[str, Any]:
    p = base()
    mutate(p)
    return p


BAD = [
    # (what, mutation, field named, words of the rule)
    ("unknown time zone", lambda p: p.update(timeZone="Mars/Olympus"), "timeZone", "unknown time zone"),
    ("time zone not a name", lambda p: p.update(timeZone="../etc/passwd"), "timeZone", "not a time zone"),
    ("weekly without days", lambda p: p["schedulePolicy"].update(scheduleRunFrequency="Weekly", scheduleRunDays=[]),
     "schedulePolicy.scheduleRunDays", "needs at least one day"),
    ("daily count zero", lambda p: p["retentionPolicy"]["dailySchedule"].update(retentionDuration=days(0)),
     "retentionPolicy.dailySchedule.retentionDuration.count", "out of range"),
    ("daily count too high", lambda p: p["retentionPolicy"]["dailySchedule"].update(retentionDuration=days(10000)),
     "retentionPolicy.dailySchedule.retentionDuration.count", "out of range"),
    ("yearly count too high", lambda p: p["retentionPolicy"]["yearlySchedule"]["retentionDuration"].update(count=100),
     "retentionPolicy.yearlySchedule.retentionDuration.count", "out of range"),
    ("count not a number", lambda p: p["retentionPolicy"]["weeklySchedule"]["retentionDuration"].update(count="3"),
     "retentionPolicy.weeklySchedule.retentionDuration.count", "not a whole number"),
    ("wrong duration type", lambda p: p["retentionPolicy"]["weeklySchedule"]["retentionDuration"].update(
        durationType="Days"), "retentionPolicy.weeklySchedule.retentionDuration.durationType", "must be Weeks"),
    ("monthly selects no week", lambda p: p["retentionPolicy"]["monthlySchedule"]["retentionScheduleWeekly"].update(
        weeksOfTheMonth=[]), "retentionPolicy.monthlySchedule.retentionScheduleWeekly.weeksOfTheMonth",
     "selects nothing"),
    ("monthly selects no day", lambda p: p["retentionPolicy"]["monthlySchedule"]["retentionScheduleWeekly"].update(
        daysOfTheWeek=[]), "retentionPolicy.monthlySchedule.retentionScheduleWeekly.daysOfTheWeek", "selects nothing"),
    ("yearly selects no month", lambda p: p["retentionPolicy"]["yearlySchedule"].update(monthsOfYear=[]),
     "retentionPolicy.yearlySchedule.monthsOfYear", "selects nothing"),
    ("yearly day-of-month list empty", lambda p: p["retentionPolicy"]["yearlySchedule"].update(
        retentionScheduleFormatType="Daily", retentionScheduleDaily={"daysOfTheMonth": []}),
     "retentionPolicy.yearlySchedule.retentionScheduleDaily.daysOfTheMonth", "selects nothing"),
    ("time at a quarter past", lambda p: p["schedulePolicy"].update(scheduleRunTimes=["2020-01-01T20:15:00Z"]),
     "schedulePolicy.scheduleRunTimes[0]", "not on the hour or half-hour"),
    ("time with seconds", lambda p: p["schedulePolicy"].update(scheduleRunTimes=["20:30:10"]),
     "schedulePolicy.scheduleRunTimes[0]", "not on the hour or half-hour"),
    ("time not a time", lambda p: p["schedulePolicy"].update(scheduleRunTimes=["half past eight"]),
     "schedulePolicy.scheduleRunTimes[0]", "not a datetime"),
    ("two run times", lambda p: p["schedulePolicy"].update(scheduleRunTimes=[T, "2020-01-01T10:00:00Z"]),
     "schedulePolicy.scheduleRunTimes", "exactly one time"),
    ("hourly in a Standard policy", lambda p: p["schedulePolicy"].update(scheduleRunFrequency="Hourly"),
     "schedulePolicy.scheduleRunFrequency", "hourly backups need an Enhanced policy"),
    ("frequency not known", lambda p: p["schedulePolicy"].update(scheduleRunFrequency="Monthly"),
     "schedulePolicy.scheduleRunFrequency", "not Daily, Weekly or Hourly"),
    ("unknown day", lambda p: p["retentionPolicy"]["weeklySchedule"].update(daysOfTheWeek=["Sundae"]),
     "retentionPolicy.weeklySchedule.daysOfTheWeek[0]", "not one of"),
    ("typo in a field name", lambda p: p["schedulePolicy"].update(scheduleRunTime=[T]),
     "schedulePolicy.scheduleRunTime", "unknown field"),
    ("no retention", lambda p: p.pop("retentionPolicy"), "retentionPolicy", "is required"),
    ("daily schedule without daily retention", lambda p: p["retentionPolicy"].update(dailySchedule=None),
     "retentionPolicy.dailySchedule", "required with a Daily schedule"),
    ("retention time differs from the schedule", lambda p: p["retentionPolicy"]["dailySchedule"].update(
        retentionTimes=["2020-01-01T05:00:00Z"]), "retentionPolicy.dailySchedule.retentionTimes[0]",
     "not the schedule's time"),
]  # fmt: skip

BAD_WEEKLY = [
    ("weekly rule on a day the schedule skips",
     lambda p: p["retentionPolicy"]["weeklySchedule"].update(daysOfTheWeek=["Monday"]),
     "retentionPolicy.weeklySchedule.daysOfTheWeek", "selects nothing on Monday"),
    ("monthly rule on a day the schedule skips", lambda p: p["retentionPolicy"].update(monthlySchedule={
        "retentionScheduleFormatType": "Weekly",
        "retentionScheduleWeekly": {"daysOfTheWeek": ["Friday"], "weeksOfTheMonth": ["Last"]},
        "retentionDuration": {"count": 6, "durationType": "Months"}}),
     "retentionPolicy.monthlySchedule.retentionScheduleWeekly.daysOfTheWeek", "selects nothing on Friday"),
    ("day-of-month rule with a weekly schedule", lambda p: p["retentionPolicy"].update(yearlySchedule={
        "retentionScheduleFormatType": "Daily", "monthsOfYear": ["March"],
        "retentionScheduleDaily": {"daysOfTheMonth": [{"date": 1, "isLast": False}]},
        "retentionDuration": {"count": 2, "durationType": "Years"}}),
     "retentionPolicy.yearlySchedule.retentionScheduleFormatType", "selects nothing reliably"),
    ("daily retention with a weekly schedule", lambda p: p["retentionPolicy"].update(
        dailySchedule={"retentionDuration": days(30)}), "retentionPolicy.dailySchedule", "not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "mutate", "field", "rule"), BAD, ids=[b[0] for b in BAD])
def test_bad_daily_policy_is_refused_naming_the_field(what: str, mutate: Any, field: str, rule: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_break(mutate))
    assert info.value.field == field, f"{what}: {info.value}"
    assert rule in str(info.value), f"{what}: {info.value}"
    assert field in str(info.value)


@pytest.mark.parametrize(("what", "mutate", "field", "rule"), BAD_WEEKLY, ids=[b[0] for b in BAD_WEEKLY])
def test_bad_weekly_policy_is_refused_naming_the_field(what: str, mutate: Any, field: str, rule: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_break(mutate, weekly_props))
    assert info.value.field == field, f"{what}: {info.value}"
    assert rule in str(info.value), f"{what}: {info.value}"


# ---- CLI ----------------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_policy_commands_and_nothing_stored_on_error(cli: Cli, tmp_path: Path, small_image: Path) -> None:
    cli.ok("vault", "create", "v1", "--storage", str(tmp_path / "v1"), "--timezone", "Europe/Berlin")
    listed = cli.ok("policy", "list", "--vault", "v1").json()
    assert [p["name"] for p in listed] == ["DefaultPolicy"]
    default = cli.ok("policy", "show", "DefaultPolicy", "--vault", "v1").json()
    assert default["name"] == "DefaultPolicy"
    schedule = default["properties"]["schedulePolicy"]
    assert schedule["scheduleRunFrequency"] == "Daily"
    assert schedule["scheduleRunTimes"] == ["2020-01-01T20:30:00+00:00"]
    assert default["properties"]["retentionPolicy"]["dailySchedule"]["retentionDuration"] == days(180)
    assert default["properties"]["timeZone"] == "Europe/Berlin"

    # The show output, wrapped as az prints it, is a valid file for create; bare properties too.
    cli.ok("policy", "create", "Copy", "--vault", "v1", "--file", str(write(tmp_path, "copy.json", default)))
    cli.ok("policy", "create", "Weekly", "--vault", "v1", "--file", str(write(tmp_path, "w.json", weekly_props())))
    weekly = cli.ok("policy", "show", "Weekly", "--vault", "v1").json()
    assert weekly["properties"]["schedulePolicy"]["scheduleRunDays"] == ["Wednesday", "Sunday"]

    bad = props()
    bad["timeZone"] = "Europe/Atlantis"
    r = cli.fails("policy", "create", "Bad", "--vault", "v1", "--file", str(write(tmp_path, "bad.json", bad)))
    assert r.returncode == 64 and "timeZone" in r.stderr and "unknown time zone" in r.stderr, r
    bad_set = props()
    bad_set["retentionPolicy"]["dailySchedule"]["retentionDuration"] = days(0)
    r = cli.fails("policy", "set", "Copy", "--vault", "v1", "--file", str(write(tmp_path, "bad2.json", bad_set)))
    assert "retentionPolicy.dailySchedule.retentionDuration.count" in r.stderr, r
    r = cli.fails("policy", "create", "Broken", "--vault", "v1", "--file", str(write(tmp_path, "x.json", "{")))
    assert r.returncode == 64, r
    names = [p["name"] for p in cli.ok("policy", "list", "--vault", "v1").json()]
    assert names == ["Copy", "DefaultPolicy", "Weekly"], "a refused policy must not be stored"
    assert cli.ok("policy", "show", "Copy", "--vault", "v1").json()["properties"] == {
        **default["properties"],
        "protectedItemsCount": 0,
    }, "a refused set must not change the policy"

    # set: items follow the new rules; delete: refused while an item uses the policy.
    disk = tmp_path / "disk.raw"
    disk.write_bytes(small_image.read_bytes()[: 4 << 20])
    assert cli.vm_add("vm1", disk).ok
    cli.ok("protection", "enable", "vm1", "--vault", "v1", "--policy", "Copy")
    changed = props()
    changed["schedulePolicy"]["scheduleRunTimes"] = ["2020-01-01T06:00:00Z"]
    for rule in changed["retentionPolicy"].values():
        if isinstance(rule, dict):
            rule["retentionTimes"] = ["2020-01-01T06:00:00Z"]  # must match the schedule's time (Azure's rule)
    changed["timeZone"] = "Asia/Kolkata"
    cli.ok("policy", "set", "Copy", "--vault", "v1", "--file", str(write(tmp_path, "c.json", changed)))
    item = cli.ok("item", "show", "vm1").json()["properties"]
    assert item["policyName"] == "Copy" and item["timeZone"] == "Asia/Kolkata"
    assert item["nextScheduledBackup"].endswith("T06:00:00+05:30"), item
    r = cli.fails("policy", "delete", "Copy", "--vault", "v1")
    assert "vm1" in r.stderr and r.returncode == 75, r
    cli.ok("protection", "update", "vm1", "--policy", "Weekly")
    cli.ok("policy", "delete", "Copy", "--vault", "v1")
    assert [p["name"] for p in cli.ok("policy", "list", "--vault", "v1").json()] == ["DefaultPolicy", "Weekly"]
    r = cli.fails("policy", "show", "Copy", "--vault", "v1")
    assert r.returncode == 66, r


def test_vault_create_refuses_an_unknown_time_zone_and_stores_nothing(cli: Cli, tmp_path: Path) -> None:
    r = cli.fails("vault", "create", "v1", "--storage", str(tmp_path / "v1"), "--timezone", "Nowhere/Special")
    assert "unknown time zone" in r.stderr, r
    assert not (tmp_path / "v1").exists()
    assert cli.ok("vault", "list").json() == []


def test_policy_of_another_vault_is_not_found(cli: Cli, tmp_path: Path, small_image: Path) -> None:
    prot = protect(cli, _tiny(small_image, tmp_path), tmp_path / "v1")
    cli.vault_create("v2", tmp_path / "v2")
    cli.ok("policy", "create", "OnlyInV2", "--vault", "v2", "--file", str(write(tmp_path, "p.json", props())))
    r = cli.fails("protection", "update", prot.vm, "--policy", "OnlyInV2")
    assert r.returncode == 66 and "OnlyInV2" in r.stderr, r


def _tiny(image: Path, tmp_path: Path) -> Path:
    disk = tmp_path / "tiny.raw"
    disk.write_bytes(image.read_bytes()[: 4 << 20])
    return disk
