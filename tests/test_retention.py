"""Retention as a pure function: the surviving dates below are written by hand, never computed.

Points are made at a fixed wall-clock time every day, like the scheduler makes them; each case
names the instants that must survive at `now`, and a few literal expiry instants.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from vmvault.domain.retention import RetentionPolicy, compute_retention, parse_retention_policy
from vmvault.errors import InvalidInput


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def daily_points(first: str, last: str, step_hours: int = 24) -> list[tuple[str, datetime]]:
    """Ids are the UTC instants themselves, so a failing assert shows dates."""
    out, t, end = [], utc(first), utc(last)
    while t <= end:
        out.append((t.strftime("%Y-%m-%dT%H:%MZ"), t))
        t += timedelta(hours=step_hours)
    return out


def survivors(result: Any) -> list[str]:
    return [r.rp_id for r in result if r.keep]


def by_id(result: Any) -> dict[str, Any]:
    return {r.rp_id: r for r in result}


def duration(count: int, unit: str) -> dict[str, Any]:
    return {"count": count, "durationType": unit}


# ---- 29 February and month ends ----------------------------------------------------------------

LEAP_POLICY = {
    "retentionPolicyType": "LongTermRetentionPolicy",
    "dailySchedule": {"retentionTimes": ["2020-01-01T20:30:00Z"], "retentionDuration": duration(7, "Days")},
    "monthlySchedule": {
        "retentionScheduleFormatType": "Daily",
        "retentionScheduleDaily": {"daysOfTheMonth": [{"date": 0, "isLast": True}]},
        "retentionDuration": duration(3, "Months"),
    },
    "yearlySchedule": {
        "retentionScheduleFormatType": "Daily",
        "monthsOfYear": ["February"],
        "retentionScheduleDaily": {"daysOfTheMonth": [{"date": 0, "isLast": True}]},
        "retentionDuration": duration(2, "Years"),
    },
}


def test_last_day_of_month_takes_29_february_and_31_january() -> None:
    points = daily_points("2024-01-25T20:30Z", "2024-03-05T20:30Z")
    result = compute_retention(points, LEAP_POLICY, "UTC", now=utc("2024-03-10T12:00Z"))
    assert survivors(result) == [
        "2024-01-31T20:30Z",  # monthly (last day of January)
        "2024-02-29T20:30Z",  # monthly + yearly (last day of a leap February; the 28th is not last)
        "2024-03-03T20:30Z",  # daily, 7 days
        "2024-03-04T20:30Z",
        "2024-03-05T20:30Z",
    ]
    points_by_id = by_id(result)
    leap = points_by_id["2024-02-29T20:30Z"]
    assert leap.rules == ("Monthly", "Yearly")
    assert leap.expires == utc("2026-02-28T20:30Z")  # two years after 29 February: 28 February
    january = points_by_id["2024-01-31T20:30Z"]
    assert january.rules == ("Monthly",)
    assert january.expires == utc("2024-04-30T20:30Z")  # three months after 31 January: 30 April
    assert points_by_id["2024-03-05T20:30Z"].rules == ("Daily", "Latest")
    assert not points_by_id["2024-02-28T20:30Z"].keep


def test_later_the_monthly_of_january_expires_and_the_leap_day_stays() -> None:
    points = daily_points("2024-01-25T20:30Z", "2024-03-05T20:30Z")
    result = compute_retention(points, LEAP_POLICY, "UTC", now=utc("2024-05-01T00:00Z"))
    # 2024-03-05 is kept only because it is the newest point (all daily points expired).
    assert survivors(result) == ["2024-02-29T20:30Z", "2024-03-05T20:30Z"]
    assert by_id(result)["2024-03-05T20:30Z"].rules == ("Latest",)
    result = compute_retention(points, LEAP_POLICY, "UTC", now=utc("2024-05-01T00:00Z"), keep_latest=False)
    assert survivors(result) == ["2024-02-29T20:30Z"]


def test_month_end_in_a_non_leap_year_is_28_february() -> None:
    points = daily_points("2025-02-26T20:30Z", "2025-03-02T20:30Z")
    result = compute_retention(points, LEAP_POLICY, "UTC", now=utc("2025-03-20T00:00Z"), keep_latest=False)
    assert survivors(result) == ["2025-02-28T20:30Z"]
    assert by_id(result)["2025-02-28T20:30Z"].expires == utc("2027-02-28T20:30Z")


# ---- a DST day -----------------------------------------------------------------------------------

BERLIN_POLICY = {
    "dailySchedule": {"retentionDuration": duration(3, "Days")},
    "weeklySchedule": {"daysOfTheWeek": ["Sunday"], "retentionDuration": duration(2, "Weeks")},
}

# Backups at 00:30 Berlin time: 23:30Z in winter (CET), 22:30Z from 29 March 2026 (CEST).
BERLIN_POINTS = [
    "2026-03-20T23:30Z",  # Sat 21 Mar
    "2026-03-21T23:30Z",  # Sun 22 Mar
    "2026-03-22T23:30Z",  # Mon 23 Mar
    "2026-03-23T23:30Z",
    "2026-03-24T23:30Z",
    "2026-03-25T23:30Z",
    "2026-03-26T23:30Z",  # Fri 27 Mar
    "2026-03-27T23:30Z",  # Sat 28 Mar
    "2026-03-28T23:30Z",  # Sun 29 Mar 00:30 CET: a Saturday in UTC, the DST day in Berlin
    "2026-03-29T22:30Z",  # Mon 30 Mar 00:30 CEST
]


def test_dst_day_is_judged_in_the_policy_time_zone() -> None:
    points = [(p, utc(p)) for p in BERLIN_POINTS]
    now = utc("2026-03-30T23:00Z")  # Tue 31 Mar 01:00 CEST
    result = compute_retention(points, BERLIN_POLICY, "Europe/Berlin", now=now)
    assert survivors(result) == ["2026-03-21T23:30Z", "2026-03-28T23:30Z", "2026-03-29T22:30Z"]
    points_by_id = by_id(result)
    dst_sunday = points_by_id["2026-03-28T23:30Z"]
    assert dst_sunday.rules == ("Daily", "Weekly")
    assert dst_sunday.expires == utc("2026-04-11T22:30Z")  # Sun 12 Apr 00:30 CEST
    # Three days of wall time after Sat 28 Mar 00:30 CET is Tue 31 Mar 00:30 CEST = 22:30Z, not 23:30Z.
    saturday = points_by_id["2026-03-27T23:30Z"]
    assert saturday.expires == utc("2026-03-30T22:30Z")
    assert not saturday.keep
    assert points_by_id["2026-03-21T23:30Z"].expires == utc("2026-04-04T22:30Z")  # Sun 5 Apr 00:30 CEST


def test_same_points_judged_in_utc_keep_other_days() -> None:
    points = [(p, utc(p)) for p in BERLIN_POINTS]
    result = compute_retention(points, BERLIN_POLICY, "UTC", now=utc("2026-03-30T23:00Z"))
    # In UTC the Sundays are 22 Mar 23:30Z and 29 Mar 22:30Z (not 21 Mar 23:30Z), and three days
    # after 27 Mar 23:30Z is 30 Mar 23:30Z, still ahead of `now`.
    assert survivors(result) == ["2026-03-22T23:30Z", "2026-03-27T23:30Z", "2026-03-28T23:30Z", "2026-03-29T22:30Z"]
    assert by_id(result)["2026-03-29T22:30Z"].rules == ("Daily", "Weekly", "Latest")


def test_expiry_on_the_autumn_change_is_the_first_occurrence() -> None:
    policy = {"dailySchedule": {"retentionDuration": duration(1, "Days")}}
    point = ("p", utc("2026-10-24T00:30Z"))  # Sat 24 Oct 02:30 CEST; 02:30 happens twice on the 25th
    (result,) = compute_retention([point], policy, "Europe/Berlin", now=utc("2026-10-24T12:00Z"))
    assert result.expires == utc("2026-10-25T00:30Z")  # 02:30 CEST, not 02:30 CET (01:30Z)


# ---- a policy change -----------------------------------------------------------------------------


def test_policy_change_applies_to_existing_points() -> None:
    points = daily_points("2026-01-01T20:30Z", "2026-01-31T20:30Z")
    points.append(("on-demand", utc("2026-01-10T10:00Z")))
    retain = {"on-demand": date(2026, 3, 1)}
    now = utc("2026-02-01T00:00Z")
    before = {"dailySchedule": {"retentionDuration": duration(30, "Days")}}
    after = {
        "dailySchedule": {"retentionDuration": duration(7, "Days")},
        "weeklySchedule": {"daysOfTheWeek": ["Sunday"], "retentionDuration": duration(4, "Weeks")},
    }
    kept_before = survivors(compute_retention(points, before, "UTC", retain, now=now))
    assert kept_before == [f"2026-01-{d:02d}T20:30Z" for d in range(2, 32)] + ["on-demand"]
    result = compute_retention(points, after, "UTC", retain, now=now)
    assert survivors(result) == [
        "2026-01-04T20:30Z",  # Sundays, four weeks
        "2026-01-11T20:30Z",
        "2026-01-18T20:30Z",
        "2026-01-25T20:30Z",  # also daily
        "2026-01-26T20:30Z",
        "2026-01-27T20:30Z",
        "2026-01-28T20:30Z",
        "2026-01-29T20:30Z",
        "2026-01-30T20:30Z",
        "2026-01-31T20:30Z",
        "on-demand",  # kept by its retain-until date whatever the policy says
    ]
    on_demand = by_id(result)["on-demand"]
    assert on_demand.rules == ("RetainUntil",)
    assert on_demand.expires == utc("2026-03-02T00:00Z")  # through the end of 1 March (UTC)
    assert by_id(result)["2026-01-04T20:30Z"].expires == utc("2026-02-01T20:30Z")


# ---- other selections ----------------------------------------------------------------------------


def test_weekly_format_fourth_and_last_weekday() -> None:
    policy = {
        "monthlySchedule": {
            "retentionScheduleFormatType": "Weekly",
            "retentionScheduleWeekly": {"daysOfTheWeek": ["Friday"], "weeksOfTheMonth": ["Last"]},
            "retentionDuration": duration(12, "Months"),
        },
        "yearlySchedule": {
            "retentionScheduleFormatType": "Weekly",
            "monthsOfYear": ["February"],
            "retentionScheduleWeekly": {"daysOfTheWeek": ["Monday"], "weeksOfTheMonth": ["Fourth"]},
            "retentionDuration": duration(5, "Years"),
        },
    }
    points = daily_points("2024-02-01T20:30Z", "2024-03-31T20:30Z")
    result = compute_retention(points, policy, "UTC", now=utc("2024-04-01T00:00Z"), keep_latest=False)
    assert survivors(result) == ["2024-02-23T20:30Z", "2024-02-26T20:30Z", "2024-03-29T20:30Z"]


def test_only_the_first_point_of_a_day_takes_a_weekly_rule_and_every_point_the_daily_one() -> None:
    points = [("a", utc("2026-01-04T08:00Z")), ("b", utc("2026-01-04T20:30Z"))]  # a Sunday
    policy = {
        "dailySchedule": {"retentionDuration": duration(1, "Days")},
        "weeklySchedule": {"daysOfTheWeek": ["Sunday"], "retentionDuration": duration(1, "Weeks")},
    }
    result = by_id(compute_retention(points, policy, "UTC", now=utc("2026-01-04T21:00Z"), keep_latest=False))
    assert result["a"].rules == ("Daily", "Weekly")
    assert result["b"].rules == ("Daily",)


def test_no_policy_keeps_scheduled_points_and_on_demand_ones_expire() -> None:
    points = [("s", utc("2026-01-01T00:00Z")), ("d", utc("2026-01-02T00:00Z"))]
    result = by_id(compute_retention(points, None, retain_until={"d": date(2026, 1, 3)},
                                     now=utc("2026-01-05T00:00Z"), keep_latest=False))  # fmt: skip
    assert (result["s"].keep, result["s"].rules, result["s"].expires) == (True, ("NoPolicy",), None)
    assert (result["d"].keep, result["d"].expires) == (False, utc("2026-01-04T00:00Z"))


@pytest.mark.parametrize(
    ("policy", "zone", "field"),
    [
        ({"dailySchedule": {"retentionDuration": duration(0, "Days")}}, "UTC", "dailySchedule.retentionDuration.count"),
        ({"weeklySchedule": {"retentionDuration": duration(1, "Weeks")}}, "UTC", "weeklySchedule.daysOfTheWeek"),
        ({"dailySchedule": {"retentionDuration": duration(1, "Days")}}, "Mars/Olympus", "timeZone"),
        ({"monthlySchedule": {"retentionScheduleFormatType": "Daily",
                              "retentionScheduleDaily": {"daysOfTheMonth": [{"date": 31, "isLast": False}]},
                              "retentionDuration": duration(1, "Months")}}, "UTC", "daysOfTheMonth"),
    ],
)  # fmt: skip
def test_bad_retention_names_the_field(policy: dict[str, Any], zone: str, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        parse_retention_policy(policy, zone)


# ---- Enhanced (V2) policies: several points a day ------------------------------------------------


def enhanced_hourly(instant_days: int) -> Any:
    from vmvault.domain.policy import parse_policy

    return parse_policy({
        "policyType": "V2",
        "instantRpRetentionRangeInDays": instant_days,
        "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicyV2", "scheduleRunFrequency": "Hourly",
                           "hourlySchedule": {"interval": 4, "scheduleWindowStartTime": "2020-01-01T08:00:00Z",
                                              "scheduleWindowDuration": 12}},
        "retentionPolicy": {
            "dailySchedule": {"retentionDuration": duration(3, "Days")},
            "weeklySchedule": {"daysOfTheWeek": ["Sunday"], "retentionDuration": duration(2, "Weeks")},
        },
        "timeZone": "UTC",
    })  # fmt: skip


def test_enhanced_daily_rule_keeps_the_first_point_of_a_day_and_the_others_instant_rp_days() -> None:
    from vmvault.domain.retention import policy_retention

    # 1-5 January 2026 (Thursday to Monday), backups at 08, 12, 16 and 20 UTC
    points = [p for day in range(1, 6) for p in daily_points(f"2026-01-0{day}T08:00Z", f"2026-01-0{day}T20:00Z", 4)]
    rules = policy_retention(enhanced_hourly(1))
    result = compute_retention(points, rules, now=utc("2026-01-05T21:00Z"), keep_latest=False)
    assert survivors(result) == [
        "2026-01-03T08:00Z",  # daily: 3 days after 08:00 on the 3rd is 08:00 on the 6th
        "2026-01-04T08:00Z",  # daily and weekly (a Sunday)
        "2026-01-05T08:00Z",
        "2026-01-05T12:00Z", "2026-01-05T16:00Z", "2026-01-05T20:00Z",  # the day's others: 1 day
    ]  # fmt: skip
    kept = by_id(result)
    assert kept["2026-01-04T08:00Z"].rules == ("Daily", "Weekly")
    assert kept["2026-01-04T08:00Z"].expires == utc("2026-01-18T08:00Z")
    assert kept["2026-01-05T12:00Z"].rules == ("Hourly",)
    assert kept["2026-01-05T12:00Z"].expires == utc("2026-01-06T12:00Z")
    assert kept["2026-01-04T12:00Z"].expires == utc("2026-01-05T12:00Z") and not kept["2026-01-04T12:00Z"].keep
    # The same rules read as a Standard policy's: every point takes the daily rule (3 days each).
    standard = compute_retention(points, RetentionPolicy(rules.rules, rules.tz), now=utc("2026-01-05T21:00Z"),
                                 keep_latest=False)  # fmt: skip
    assert survivors(standard) == [p for p, _ in points if p >= "2026-01-03"]


def test_enhanced_first_point_of_the_day_is_judged_in_the_policy_time_zone() -> None:
    from vmvault.domain.policy import parse_policy
    from vmvault.domain.retention import policy_retention

    doc = {
        "policyType": "V2",
        "instantRpRetentionRangeInDays": 2,
        "schedulePolicy": {"scheduleRunFrequency": "Hourly",
                           "hourlySchedule": {"interval": 6, "scheduleWindowStartTime": "2020-01-01T00:00:00Z",
                                              "scheduleWindowDuration": 24}},
        "retentionPolicy": {"dailySchedule": {"retentionDuration": duration(10, "Days")}},
        "timeZone": "Tokyo Standard Time",  # +09:00: the local day starts at 15:00 UTC
    }  # fmt: skip
    points = daily_points("2026-06-01T15:00Z", "2026-06-02T09:00Z", 6)  # 00, 06, 12, 18 JST on 2 June
    result = by_id(compute_retention(points, policy_retention(parse_policy(doc)), now=utc("2026-06-02T10:00Z"),
                                     keep_latest=False))  # fmt: skip
    assert result["2026-06-01T15:00Z"].rules == ("Daily",)  # 00:00 JST: the first of 2 June
    assert result["2026-06-01T15:00Z"].expires == utc("2026-06-11T15:00Z")
    assert [result[k].rules for k in ("2026-06-01T21:00Z", "2026-06-02T03:00Z", "2026-06-02T09:00Z")] == [
        ("Hourly",)
    ] * 3
    assert result["2026-06-02T09:00Z"].expires == utc("2026-06-04T09:00Z")
