"""Input checks shared by the use cases: all raise InvalidInput naming the value and the fix."""

from __future__ import annotations

import os
import re
from datetime import date, timedelta
from pathlib import Path

from vmvault.catalog.clock import utc_now
from vmvault.errors import InvalidInput, NotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DEFAULT_RETENTION_DAYS = 30
MIN_PASSPHRASE_LEN = 12


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} name '{name}'",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def today_utc() -> date:
    return utc_now().date()


def parse_retain_until(text: str | None) -> str:
    """YYYY-MM-DD, not in the past (UTC); default today + 30 days."""
    if text is None:
        return (today_utc() + timedelta(days=DEFAULT_RETENTION_DAYS)).isoformat()
    try:
        if not DATE_RE.fullmatch(text):
            raise ValueError(text)
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"invalid retain-until date '{text}'", hint="give a date as YYYY-MM-DD, e.g. --retain-until 2030-01-31"
        ) from None
    if day < today_utc():
        raise InvalidInput(
            f"retain-until date {text} is in the past",
            hint=f"give a date on or after today ({today_utc().isoformat()}), as YYYY-MM-DD",
        )
    return day.isoformat()


def check_passphrase(passphrase: str | None, vault_name: str) -> str:
    """A new passphrase: 12+ characters, not a common password (the stolen-vault attacker tries those first)."""
    if not passphrase:
        raise InvalidInput(
            f"a passphrase is required to create vault '{vault_name}'",
            hint="set VMVAULT_PASSPHRASE or pass --passphrase-file FILE",
        )
    if len(passphrase) < MIN_PASSPHRASE_LEN:
        raise InvalidInput(
            f"the passphrase for vault '{vault_name}' is too short ({len(passphrase)} characters)",
            hint=f"use at least {MIN_PASSPHRASE_LEN} characters, e.g. four or five random words",
        )
    if _is_common_password(passphrase):
        raise InvalidInput(
            f"the passphrase for vault '{vault_name}' is in a list of common passwords",
            hint="an attacker with a copy of the vault tries those first: choose one that is not, "
            "e.g. four or five random words",
        )
    return passphrase


def _is_common_password(passphrase: str) -> bool:
    """In zxcvbn's list of the 30,000 most common passwords (case and spaces ignored)."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # large: imported only when needed

    common = _common_passwords(FREQUENCY_LISTS)
    folded = passphrase.lower()
    return folded in common or "".join(folded.split()) in common


_COMMON: frozenset[str] | None = None


def _common_passwords(lists: dict[str, list[str]]) -> frozenset[str]:
    global _COMMON
    if _COMMON is None:
        _COMMON = frozenset(lists["passwords"])
    return _COMMON


def read_passphrase_file(path: str | Path) -> str:
    """The passphrase in a file, without its trailing newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"passphrase file {path} not found", hint="pass an existing file to --passphrase-file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            f"cannot read passphrase file {path}: {exc}", hint="pass a readable UTF-8 text file"
        ) from None
    return text.rstrip("\r\n")


def absolute(path: str | Path) -> Path:
    """An absolute path without resolving symlinks (a /dev/vg/lv link stays as given)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))
