"""Settings: the only place vmvault reads its environment.

VMVAULT_HOME        where the catalog, host keys and default vaults live
                    (default /var/lib/vmvault for root, else ~/.local/share/vmvault)
VMVAULT_PASSPHRASE  the vault passphrase (create/import; a fallback when no host key exists)
VMVAULT_PASSPHRASE_CHECK
                    "strict" (default, the CLI): a passphrase given must open the key file of the
                    vault a command names, even when this host's key opens the vault; "lenient"
                    (set by `serve` for itself and its children): a mismatch is only logged
VMVAULT_DEBUG       "1" shows tracebacks of unexpected errors
VMVAULT_TEST_CLOCK_OFFSET_S
                    test-only: seconds added to the clock the scheduler reads (and the "next
                    scheduled backup" it shows), so a test can bring a policy's next slot close;
                    job and recovery point times stay real
VMVAULT_FILES_LISTEN
                    HOST:PORT the file-recovery export listens on for other machines (TLS +
                    per-script password); default 127.0.0.1:0 (loopback, any free port).
                    Exposing it (e.g. 0.0.0.0:10809) is this explicit setting
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
    strict_passphrase: bool = True  # see VMVAULT_PASSPHRASE_CHECK
    debug: bool = False
    clock_offset_s: float = 0.0
    files_listen: str = "127.0.0.1:0"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.db"

    @property
    def vaults_dir(self) -> Path:
        return self.home / "vaults"

    @property
    def serve_lock_path(self) -> Path:
        """Held (flock) by a running `vmvault serve`; it holds the service's pid and address."""
        return self.home / "serve.lock"

    @property
    def prices_path(self) -> Path:
        """Optional JSON object of price overrides for `vault usage` (see domain/usage.py Prices)."""
        return self.home / "prices.json"


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
    return Settings(
        home=Path(os.path.abspath(home)),
        passphrase=passphrase,
        strict_passphrase=os.environ.get("VMVAULT_PASSPHRASE_CHECK", "strict") != "lenient",
        debug=debug_enabled(),
        clock_offset_s=_clock_offset(),
        files_listen=os.environ.get("VMVAULT_FILES_LISTEN") or "127.0.0.1:0",
    )


def _clock_offset() -> float:
    raw = os.environ.get("VMVAULT_TEST_CLOCK_OFFSET_S", "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


# Service defaults, here (not in service/worker.py) so the CLI can show them without importing
# the service stack: `vmvault --help` stays fast.
DEFAULT_WORKERS = 2
DEFAULT_LISTEN = "127.0.0.1:8080"
