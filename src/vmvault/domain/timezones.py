"""Time-zone names of policies: IANA names (Europe/Berlin) and Windows names (W. Europe Standard Time).

Azure writes a policy's ``timeZone`` as a Windows name (``Pacific Standard Time``, ``India
Standard Time``); vmvault computes times with IANA zones (zoneinfo + tzdata). A Windows name is
mapped to its IANA zone through Unicode CLDR's windowsZones table (the "001" territory, the zone
Windows itself uses for that name), which the ``tzlocal`` package ships as
``tzlocal.windows_tz.win_tz``, generated from CLDR (pinned in requirements.lock). The name the
user gave is what a policy keeps and prints; only the computation uses the IANA zone.

Windows names match case-insensitively (Azure's own matching); IANA names as zoneinfo does.
"""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo

from tzlocal.windows_tz import win_tz

_WINDOWS = {name.lower(): iana for name, iana in win_tz.items()}


class UnknownTimeZone(ValueError):
    """Neither an IANA zone that tzdata knows nor a Windows zone name of the CLDR table."""


@cache
def iana_name(name: str) -> str:
    """The IANA zone a policy's timeZone names; UnknownTimeZone when there is none."""
    windows = _WINDOWS.get(name.strip().lower())
    if windows is not None:
        return windows
    if not name or name.startswith(("/", ".", "\\")) or ".." in name or "\x00" in name:
        raise UnknownTimeZone(name)
    try:
        ZoneInfo(name)
    except (ValueError, OSError, LookupError):  # ZoneInfoNotFoundError is a KeyError
        raise UnknownTimeZone(name) from None
    return name


def zone(name: str) -> ZoneInfo:
    """The ZoneInfo of a policy's timeZone (IANA or Windows name)."""
    return ZoneInfo(iana_name(name))


def is_windows_name(name: str) -> bool:
    return name.strip().lower() in _WINDOWS
