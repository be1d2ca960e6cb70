"""When a policy's backups run: its local times of day, read in its time zone, as UTC instants.

Daylight-saving rules (the same as Azure's and cron's usual choice):

- a local time that does not exist (the clock jumps over it) runs at the first instant after
  the gap: 02:30 on Europe/Berlin's spring-forward day runs at 03:00 CEST (01:00 UTC);
- a local time that happens twice (the clock falls back over it) runs once, at its first
  occurrence: 02:30 on Berlin's fall-back day runs at 02:30 CEST (00:30 UTC), not again an
  hour later.

Pure: the caller passes the instant to search after (no clock is read here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from vmvault.domain.policy import Policy, Schedule

# A Weekly schedule runs at least once in any 7 consecutive days; one more day covers the time
# zone's offset from UTC on either side.
_SEARCH_DAYS = 9


def local_instant(day: date, moment: time, tz: ZoneInfo) -> datetime:
    """The UTC instant at which the local wall time day+moment happens (first occurrence; gaps move to their end)."""
    wall = datetime.combine(day, moment)
    first = wall.replace(tzinfo=tz, fold=0)
    as_utc = first.astimezone(UTC)
    if as_utc.astimezone(tz).replace(tzinfo=None) == wall:
        return as_utc  # exists (fold=0 is the first of two occurrences when it repeats)
    return _end_of_gap(wall, tz)


def _end_of_gap(wall: datetime, tz: ZoneInfo) -> datetime:
    """The transition instant that skips over the wall time: the first instant after the gap.

    In a gap, fold=0 applies the offset before the transition (a UTC instant after it) and fold=1
    the offset after it (a UTC instant before it); the transition lies between the two.
    """
    low = int(wall.replace(tzinfo=tz, fold=1).astimezone(UTC).timestamp())  # before the transition
    high = int(wall.replace(tzinfo=tz, fold=0).astimezone(UTC).timestamp())  # after it
    target = datetime.fromtimestamp(high, tz).utcoffset()
    while high - low > 1:  # invariant: offset(low) != target == offset(high)
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == target:
            high = mid
        else:
            low = mid
    return datetime.fromtimestamp(high, UTC)


def _slots(schedule: Schedule, tz: ZoneInfo, first_day: date) -> Iterator[datetime]:
    for offset in range(_SEARCH_DAYS):
        day = first_day + timedelta(days=offset)
        if schedule.runs_on(day):
            for moment in schedule.run_times:
                yield local_instant(day, moment, tz)


def next_run(policy: Policy, after: datetime) -> datetime:
    """The first scheduled instant strictly later than `after` (an aware datetime), in UTC."""
    if after.tzinfo is None:
        raise ValueError("next_run needs an aware datetime")
    tz = policy.tzinfo
    start = after.astimezone(tz).date() - timedelta(days=1)
    return min(s for s in _slots(policy.schedule, tz, start) if s > after)


def slots_between(policy: Policy, start: datetime, end: datetime) -> list[datetime]:
    """Every scheduled instant in (start, end], in UTC, oldest first."""
    out: list[datetime] = []
    moment = start
    while True:
        moment = next_run(policy, moment)
        if moment > end:
            return out
        out.append(moment)


# A slot's starts are spread over at most this share of the gap to the next slot, whatever the
# jitter asked: the last VM still starts long before the next slot (which then is not skipped).
MAX_JITTER_SHARE = 0.1


def jitter_fraction(vm_id: str) -> float:
    """A VM's place in every slot's spread, in [0, 1): a hash of its id (stable across restarts and servers)."""
    digest = hashlib.sha256(f"vmvault-schedule-jitter:{vm_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def planned_start(policy: Policy, slot: datetime, vm_id: str, jitter_s: float) -> datetime:
    """When the scheduler queues the backup of `slot` for this VM: slot + an offset in
    [0, min(jitter_s, MAX_JITTER_SHARE of the gap to the next slot)), the same offset every slot.

    jitter_s 0: at the slot itself. Whole milliseconds, so the instant survives the catalog's ISO form.
    """
    if jitter_s <= 0:
        return slot
    gap = (next_run(policy, slot) - slot).total_seconds()
    window = min(jitter_s, gap * MAX_JITTER_SHARE)
    offset_ms = int(window * 1000 * jitter_fraction(vm_id))
    return slot + timedelta(milliseconds=offset_ms)
