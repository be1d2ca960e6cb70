"""When an item's recovery point objective (RPO) is breached: one rule, used by metrics and alerts.

An item's newest good point must be followed by a newer one at its policy's next slot. The
deadline is that slot plus a grace (a backup takes time to run): for a daily policy whose
points are taken at their slots, that is one schedule interval plus the grace after the last
good point. An item with no good point yet counts from when its protection started.

Pure: the caller passes the instants (no clock is read here).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from vmvault.domain.policy import Policy
from vmvault.domain.schedule import next_run

DEFAULT_GRACE = timedelta(hours=1)


def rpo_deadline(policy: Policy, last_good: datetime | None, protected_since: datetime, grace: timedelta) -> datetime:
    """The instant after which the item is in breach (aware datetimes, UTC)."""
    start = last_good if last_good is not None else protected_since
    return next_run(policy, start) + grace


def rpo_breached(
    policy: Policy, last_good: datetime | None, protected_since: datetime, now: datetime, grace: timedelta
) -> bool:
    """True when now is past the deadline: the policy's next backup after the last good point is missing."""
    return now > rpo_deadline(policy, last_good, protected_since, grace)
