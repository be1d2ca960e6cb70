"""Scheduling against a hand-written table of UTC instants (the clock is passed in: `after`).

Every expected instant below was worked out by hand from the zone's rules, never by the code:
- Europe/Berlin 2026: CET (+01) -> CEST (+02) on Sun 29 March at 01:00 UTC (02:00 -> 03:00 local);
  CEST -> CET on Sun 25 October at 01:00 UTC (03:00 -> 02:00 local, so 02:00-03:00 happens twice).
- America/New_York 2026: EST (-05) -> EDT (-04) on Sun 8 March at 07:00 UTC (02:00 -> 03:00 local);
  EDT -> EST on Sun 1 November at 06:00 UTC (02:00 -> 01:00 local, so 01:00-02:00 happens twice).
- Asia/Kolkata: +05:30 all year.
Rules: a local time that does not exist runs at the first instant after the gap; a repeated one
runs once, at its first occurrence.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmvault.domain.policy import parse_policy
from vmvault.domain.schedule import next_run, slots_between


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def policy(tz: str, at: str, days: list[str] | None = None) -> Any:
    schedule: dict[str, Any] = {"scheduleRunFrequency": "Weekly" if days else "Daily", "scheduleRunTimes": [at]}
    retention: dict[str, Any]
    if days:
        schedule["scheduleRunDays"] = days
        retention = {
            "weeklySchedule": {"daysOfTheWeek": days, "retentionDuration": {"count": 4, "durationType": "Weeks"}}
        }
    else:
        retention = {"dailySchedule": {"retentionDuration": {"count": 30, "durationType": "Days"}}}
    return parse_policy({"schedulePolicy": schedule, "retentionPolicy": retention, "timeZone": tz})


# (time zone, local run time, weekly days or None, after, expected next run in UTC, why)
TABLE = [
    # Europe/Berlin, spring forward (2026-03-29): 02:30 does not exist -> 03:00 CEST = 01:00 UTC
    ("Europe/Berlin", "02:30", None, "2026-03-27T12:00:00Z", "2026-03-28T01:30:00Z", "02:30 CET the day before"),
    ("Europe/Berlin", "02:30", None, "2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z", "gap: first instant after it"),
    ("Europe/Berlin", "02:30", None, "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z", "02:30 CEST the day after"),
    ("Europe/Berlin", "02:30", ["Sunday"], "2026-03-23T00:00:00Z", "2026-03-29T01:00:00Z", "weekly, on the gap"),
    ("Europe/Berlin", "02:30", ["Sunday"], "2026-03-29T01:00:00Z", "2026-04-05T00:30:00Z", "weekly, next Sunday"),
    ("Europe/Berlin", "20:30", None, "2026-03-29T12:00:00Z", "2026-03-29T18:30:00Z", "evening, already CEST"),
    # Europe/Berlin, fall back (2026-10-25): 02:30 happens twice -> once, at 02:30 CEST = 00:30 UTC
    ("Europe/Berlin", "02:30", None, "2026-10-24T12:00:00Z", "2026-10-25T00:30:00Z", "first of the two 02:30s"),
    ("Europe/Berlin", "02:30", None, "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z", "not again at 01:30 UTC"),
    ("Europe/Berlin", "02:30", None, "2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z", "just before the first"),
    ("Europe/Berlin", "02:30", ["Sunday"], "2026-10-24T00:00:00Z", "2026-10-25T00:30:00Z", "weekly, first 02:30"),
    ("Europe/Berlin", "02:30", ["Sunday"], "2026-10-25T00:30:00Z", "2026-11-01T01:30:00Z", "weekly, once only"),
    # America/New_York, spring forward (2026-03-08): 02:30 does not exist -> 03:00 EDT = 07:00 UTC
    ("America/New_York", "02:30", None, "2026-03-07T12:00:00Z", "2026-03-08T07:00:00Z", "gap: first instant after it"),
    ("America/New_York", "02:30", None, "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z", "02:30 EDT the day after"),
    ("America/New_York", "01:30", None, "2026-03-07T12:00:00Z", "2026-03-08T06:30:00Z", "01:30 EST, before the gap"),
    ("America/New_York", "03:00", None, "2026-03-07T12:00:00Z", "2026-03-08T07:00:00Z", "03:00 EDT, just after"),
    # America/New_York, fall back (2026-11-01): 01:30 happens twice -> once, at 01:30 EDT = 05:30 UTC
    ("America/New_York", "01:30", None, "2026-10-31T12:00:00Z", "2026-11-01T05:30:00Z", "first of the two 01:30s"),
    ("America/New_York", "01:30", None, "2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z", "not again at 06:30 UTC"),
    ("America/New_York", "02:30", None, "2026-10-31T12:00:00Z", "2026-11-01T07:30:00Z", "02:30 exists once (EST)"),
    ("America/New_York", "01:30", ["Sunday"], "2026-10-26T00:00:00Z", "2026-11-01T05:30:00Z", "weekly, first 01:30"),
    ("America/New_York", "01:30", ["Sunday"], "2026-11-01T05:30:00Z", "2026-11-08T06:30:00Z", "weekly, once only"),
    # Asia/Kolkata, +05:30: the local day starts at 18:30 UTC the day before
    ("Asia/Kolkata", "20:30", None, "2026-06-01T12:00:00Z", "2026-06-01T15:00:00Z", "20:30 IST = 15:00 UTC"),
    ("Asia/Kolkata", "20:30", None, "2026-06-01T15:00:00Z", "2026-06-02T15:00:00Z", "strictly after"),
    ("Asia/Kolkata", "00:00", None, "2026-06-01T12:00:00Z", "2026-06-01T18:30:00Z", "midnight IST"),
    ("Asia/Kolkata", "05:30", None, "2026-06-01T00:00:00Z", "2026-06-02T00:00:00Z", "05:30 IST = 00:00 UTC"),
    ("Asia/Kolkata", "02:00", ["Monday"], "2026-06-01T00:00:00Z", "2026-06-07T20:30:00Z", "Mon 02:00 IST = Sun UTC"),
    # UTC itself: no surprises, including the turn of the year
    ("UTC", "20:30", None, "2026-12-31T20:30:00Z", "2027-01-01T20:30:00Z", "across the new year"),
]


@pytest.mark.parametrize(("tz", "at", "days", "after", "expected", "why"), TABLE, ids=[f"{r[0]}-{r[3]}" for r in TABLE])
def test_next_run_matches_the_table(
    tz: str, at: str, days: list[str] | None, after: str, expected: str, why: str
) -> None:
    got = next_run(policy(tz, at, days), utc(after))
    assert got == utc(expected), f"{tz} {at} after {after}: {why}"
    assert got.tzinfo is not None and got.utcoffset() is not None and not got.utcoffset()


def test_the_fall_back_day_runs_once_and_the_spring_day_runs_once() -> None:
    berlin = policy("Europe/Berlin", "02:30")
    autumn = slots_between(berlin, utc("2026-10-24T12:00:00Z"), utc("2026-10-26T12:00:00Z"))
    assert autumn == [utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]
    spring = slots_between(berlin, utc("2026-03-28T00:00:00Z"), utc("2026-03-30T12:00:00Z"))
    assert spring == [utc("2026-03-28T01:30:00Z"), utc("2026-03-29T01:00:00Z"), utc("2026-03-30T00:30:00Z")]
    new_york = policy("America/New_York", "01:30")
    autumn_ny = slots_between(new_york, utc("2026-10-31T12:00:00Z"), utc("2026-11-02T12:00:00Z"))
    assert autumn_ny == [utc("2026-11-01T05:30:00Z"), utc("2026-11-02T06:30:00Z")]


def test_weekly_runs_only_on_its_days() -> None:
    p = policy("UTC", "10:00", ["Tuesday", "Friday"])
    # 2026-06-01 is a Monday.
    got = slots_between(p, utc("2026-06-01T00:00:00Z"), utc("2026-06-14T00:00:00Z"))
    assert got == [
        utc("2026-06-02T10:00:00Z"),
        utc("2026-06-05T10:00:00Z"),
        utc("2026-06-09T10:00:00Z"),
        utc("2026-06-12T10:00:00Z"),
    ]


def test_naive_after_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_run(policy("UTC", "10:00"), datetime(2026, 1, 1))


# ---- Enhanced (V2) hourly windows: literal instants worked out by hand -----------------------------
# America/Los_Angeles 2026 ("Pacific Standard Time", CLDR): PDT (-07) -> PST (-08) on Sun 1 November
# at 09:00 UTC (02:00 PDT -> 01:00 PST, so 01:00-02:00 happens twice).


def hourly(tz: str, start: str, interval: int, hours: int) -> Any:
    return parse_policy({
        "policyType": "V2",
        "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicyV2", "scheduleRunFrequency": "Hourly",
                           "hourlySchedule": {"interval": interval, "scheduleWindowDuration": hours,
                                              "scheduleWindowStartTime": f"2020-01-01T{start}:00Z"}},
        "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
        "timeZone": tz,
    })  # fmt: skip


def iso(slots: list[datetime]) -> list[str]:
    return [s.strftime("%Y-%m-%dT%H:%MZ") for s in slots]


def test_hourly_window_on_berlins_spring_forward_day_keeps_its_wall_times() -> None:
    # 01:00 CET = 00:00 UTC; then the clock jumps: 05:00 CEST = 03:00 UTC (3 hours later, not 4).
    p = hourly("Europe/Berlin", "01:00", 4, 24)
    slots = slots_between(p, utc("2026-03-28T23:00:00Z"), utc("2026-03-29T22:00:00Z"))
    assert iso(slots) == ["2026-03-29T00:00Z", "2026-03-29T03:00Z", "2026-03-29T07:00Z", "2026-03-29T11:00Z",
                          "2026-03-29T15:00Z", "2026-03-29T19:00Z"]  # fmt: skip


def test_hourly_window_starting_in_berlins_gap_starts_after_it() -> None:
    # 02:00 does not exist on 29 March: the first backup runs at 03:00 CEST = 01:00 UTC, the next at 06:00 CEST.
    p = hourly("Europe/Berlin", "02:00", 4, 8)
    slots = slots_between(p, utc("2026-03-28T23:00:00Z"), utc("2026-03-29T22:00:00Z"))
    assert iso(slots) == ["2026-03-29T01:00Z", "2026-03-29T04:00Z", "2026-03-29T08:00Z"]
    # the day before, the same window in CET: 02:00, 06:00, 10:00 = 01:00, 05:00, 09:00 UTC
    before = slots_between(p, utc("2026-03-27T23:00:00Z"), utc("2026-03-28T22:00:00Z"))
    assert iso(before) == ["2026-03-28T01:00Z", "2026-03-28T05:00Z", "2026-03-28T09:00Z"]


def test_hourly_window_on_the_pacific_fall_back_day_runs_the_repeated_hour_once() -> None:
    # 01:00 happens at 08:00 UTC (PDT) and again at 09:00 UTC (PST): one backup, at the first.
    p = hourly("Pacific Standard Time", "01:00", 4, 8)
    assert p.time_zone == "Pacific Standard Time" and p.iana_zone == "America/Los_Angeles"
    slots = slots_between(p, utc("2026-11-01T06:00:00Z"), utc("2026-11-02T06:00:00Z"))
    assert iso(slots) == ["2026-11-01T08:00Z", "2026-11-01T13:00Z", "2026-11-01T17:00Z"]
    assert next_run(p, utc("2026-11-01T08:00:00Z")) == utc("2026-11-01T13:00:00Z")  # not 09:00 again


def test_hourly_window_across_midnight_and_its_end_included() -> None:
    # 22:00 + 8 hours every 4: 22:00, 02:00 and 06:00 (the window's end is a backup).
    p = hourly("UTC", "22:00", 4, 8)
    slots = slots_between(p, utc("2026-01-01T12:00:00Z"), utc("2026-01-02T12:00:00Z"))
    assert iso(slots) == ["2026-01-01T22:00Z", "2026-01-02T02:00Z", "2026-01-02T06:00Z"]
    # a 24-hour window every 6 hours from 22:00: four backups, the 22:00 of the next day not doubled
    whole_day = hourly("UTC", "22:00", 6, 24)
    assert [t.strftime("%H:%M") for t in whole_day.schedule.run_times] == ["04:00", "10:00", "16:00", "22:00"]
    # a window shorter than the interval: one backup a day
    assert [t.strftime("%H:%M") for t in hourly("UTC", "08:30", 12, 4).schedule.run_times] == ["08:30"]


DAYS_7 = {"count": 7, "durationType": "Days"}
WEEKS_4 = {"count": 4, "durationType": "Weeks"}


def test_enhanced_daily_and_weekly_forms_run_like_standard_ones() -> None:
    daily = parse_policy({"schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicyV2",
                                             "scheduleRunFrequency": "Daily",
                                             "dailySchedule": {"scheduleRunTimes": ["2020-01-01T02:30:00Z"]}},
                          "retentionPolicy": {"dailySchedule": {"retentionDuration": DAYS_7}},
                          "timeZone": "W. Europe Standard Time"})  # fmt: skip
    assert next_run(daily, utc("2026-03-28T12:00:00Z")) == utc("2026-03-29T01:00:00Z")  # the gap, as V1
    weekly = parse_policy({"policyType": "V2",
                           "schedulePolicy": {"scheduleRunFrequency": "Weekly",
                                              "weeklySchedule": {"scheduleRunDays": ["Sunday"],
                                                                 "scheduleRunTimes": ["2020-01-01T01:30:00Z"]}},
                           "retentionPolicy": {"weeklySchedule": {"daysOfTheWeek": ["Sunday"],
                                                                  "retentionDuration": WEEKS_4}},
                           "timeZone": "Eastern Standard Time"})  # fmt: skip
    assert weekly.policy_type == "V2" and weekly.schedule.run_days == (6,)
    assert next_run(weekly, utc("2026-10-26T00:00:00Z")) == utc("2026-11-01T05:30:00Z")  # first 01:30 EDT


# ---- jitter: one slot's starts spread per VM (domain.schedule.planned_start) -------------------


def test_jitter_spreads_200_vms_over_the_window_the_same_way_every_slot() -> None:
    from vmvault.domain.schedule import planned_start

    p = policy("Europe/Berlin", "20:30")
    slot, tomorrow = utc("2026-06-01T18:30:00Z"), utc("2026-06-02T18:30:00Z")
    vm_ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(200)]
    offsets = [(planned_start(p, slot, vm, 300) - slot).total_seconds() for vm in vm_ids]
    assert all(0 <= o < 300 for o in offsets)
    # Spread, not bunched: every minute of the 5 holds some of them, none holds half.
    per_minute = [sum(1 for o in offsets if m * 60 <= o < (m + 1) * 60) for m in range(5)]
    assert min(per_minute) >= 20 and max(per_minute) <= 70, per_minute
    assert len(set(offsets)) >= 195
    # Deterministic per VM: the next slot (and another server's scheduler) plans the same offset.
    again = [(planned_start(p, tomorrow, vm, 300) - tomorrow).total_seconds() for vm in vm_ids]
    assert again == offsets
    assert [planned_start(p, slot, vm, 0) for vm in vm_ids[:5]] == [slot] * 5  # 0: jitter off


def test_jitter_never_reaches_the_next_slot() -> None:
    """A jitter bigger than the policy's gap is capped to a tenth of it: 4-hourly slots spread over 24 minutes."""
    from vmvault.domain.schedule import next_run, planned_start

    doc = {
        "policyType": "V2",
        "instantRpRetentionRangeInDays": 2,
        "schedulePolicy": {"schedulePolicyType": "SimpleSchedulePolicyV2", "scheduleRunFrequency": "Hourly",
                           "hourlySchedule": {"interval": 4, "scheduleWindowStartTime": "2020-01-01T08:00:00Z",
                                              "scheduleWindowDuration": 12}},
        "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
        "timeZone": "UTC",
    }  # fmt: skip
    hourly = parse_policy(doc)
    slot = utc("2026-06-01T08:00:00Z")
    assert next_run(hourly, slot) == utc("2026-06-01T12:00:00Z")
    starts = [planned_start(hourly, slot, f"vm-{i}", 86400) for i in range(100)]
    assert all(slot <= s < slot + timedelta(minutes=24) for s in starts)
    assert max(starts) - slot > timedelta(minutes=20)  # the cap is used, not a smaller window
    # The evening's last slot (20:00) spreads over a tenth of the night's gap to 08:00: 72 minutes.
    last = utc("2026-06-01T20:00:00Z")
    night = [planned_start(hourly, last, f"vm-{i}", 86400) - last for i in range(100)]
    assert max(night) < timedelta(minutes=72) and max(night) > timedelta(minutes=60)
