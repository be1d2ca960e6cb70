"""Settings: the only place vmvault reads its environment.

VMVAULT_HOME        where the catalog, host keys and default vaults live
                    (default /var/lib/vmvault for root, else ~/.local/share/vmvault)
VMVAULT_PASSPHRASE  the vault passphrase (create/import; a fallback when no host key exists)
VMVAULT_DEBUG       "1" shows tracebacks of unexpected errors
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_HOME = Path("/var/lib/vmvault")
USER_HOME_SUFFIX = Path(".local/share/vmvault")


@dataclass(frozen=True)
class Settings:
    """Everything vmvault takes from its environment, read once."""

    home: Path
    passphrase: str | None = None
    debug: bool = False

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.db"

    @property
    def vaults_dir(self) -> Path:
        return self.home / "vaults"


def default_home() -> Path:
    """The home used when neither --home nor VMVAULT_HOME is given."""
    if os.geteuid() == 0:
        return ROOT_HOME
    return Path.home() / USER_HOME_SUFFIX


def debug_enabled() -> bool:
    return os.environ.get("VMVAULT_DEBUG", "") not in ("", "0")


def load_settings(home_override: str | None = None) -> Settings:
    """Build the settings: --home beats VMVAULT_HOME beats the default."""
    raw_home = home_override or os.environ.get("VMVAULT_HOME") or ""
    home = Path(raw_home).expanduser() if raw_home else default_home()
    passphrase = os.environ.get("VMVAULT_PASSPHRASE") or None
    return Settings(home=Path(os.path.abspath(home)), passphrase=passphrase, debug=debug_enabled())
