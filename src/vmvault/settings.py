"""Settings: the only place vmvault reads its environment.

VMVAULT_HOME        where the catalog, host keys and default vaults live
                    (default /var/lib/vmvault for root, else ~/.local/share/vmvault)
VMVAULT_CATALOG     the catalog: a PostgreSQL URL (postgresql://USER[:PASSWORD]@HOST:PORT/DB) shared by
                    several servers; unset: SQLite in the home (HOME/catalog.db). The global
                    --catalog URL wins (without a password: PGPASSFILE or ~/.pgpass gives it)
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
VMVAULT_QUIESCE_TIMEOUT
                    seconds a running VM's freeze call may take, its guest's fsfreeze hooks
                    included (default 60, 1-3600); a VM's own `vm update --quiesce-timeout` wins
VMVAULT_FROZEN_WINDOW
                    seconds file systems may stay frozen for the snapshot itself (default 10, 1-600)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT_HOME = Path("/var/lib/vmvault")
USER_HOME_SUFFIX = Path(".local/share/vmvault")


@dataclass(frozen=True)
class Settings:
    """Everything vmvault takes from its environment, read once."""

    home: Path
    passphrase: str | None = None
    # A PostgreSQL catalog (VMVAULT_CATALOG, --catalog); None: SQLite in the home. Never in a repr:
    # the URL may hold the password.
    catalog_url: str | None = field(default=None, repr=False)
    strict_passphrase: bool = True  # see VMVAULT_PASSPHRASE_CHECK
    debug: bool = False
    clock_offset_s: float = 0.0
    files_listen: str = "127.0.0.1:0"
    quiesce_timeout_s: float = 60.0
    frozen_window_s: float = 10.0
    # GRS by default (as Azure): each new vault's secondary is DEFAULT_SECONDARY/<vault name>
    # (a directory or an azure:// / s3:// prefix); None: new vaults are LRS unless told otherwise.
    default_secondary: str | None = None

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.db"

    @property
    def vaults_dir(self) -> Path:
        return self.home / "vaults"

    @property
    def restores_dir(self) -> Path:
        """The default folder of restored VMs a hypervisor's own user opens (libvirt's QEMU runs as
        libvirt-qemu): beside the home, never in it. The home stays 0700 (catalog, host keys,
        tokens), which QEMU could not cross. /var/lib/vmvault-restores for the root home."""
        return self.home.parent / f"{self.home.name}-restores"

    @property
    def serve_lock_path(self) -> Path:
        """Held (flock) by a running `vmvault serve`; it holds the service's pid and address."""
        return self.home / "serve.lock"

    @property
    def settings_file(self) -> Path:
        """Optional TOML file of server settings: allowed roots of API paths (see read_settings_file)."""
        return self.home / "settings.toml"

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


def catalog_url_from_env() -> str | None:
    """VMVAULT_CATALOG (the CLI puts --catalog there too, so child processes open the same catalog)."""
    return os.environ.get("VMVAULT_CATALOG") or None


def load_settings(home_override: str | None = None) -> Settings:
    """Build the settings: --home beats VMVAULT_HOME beats the default."""
    raw_home = home_override or os.environ.get("VMVAULT_HOME") or ""
    home = Path(raw_home).expanduser() if raw_home else default_home()
    passphrase = os.environ.get("VMVAULT_PASSPHRASE") or None
    return Settings(
        home=Path(os.path.abspath(home)),
        passphrase=passphrase,
        catalog_url=catalog_url_from_env(),
        strict_passphrase=os.environ.get("VMVAULT_PASSPHRASE_CHECK", "strict") != "lenient",
        debug=debug_enabled(),
        clock_offset_s=_clock_offset(),
        files_listen=os.environ.get("VMVAULT_FILES_LISTEN") or "127.0.0.1:0",
        quiesce_timeout_s=_seconds("VMVAULT_QUIESCE_TIMEOUT", 60.0, 3600.0),
        frozen_window_s=_seconds("VMVAULT_FROZEN_WINDOW", 10.0, 600.0),
        default_secondary=(os.environ.get("VMVAULT_DEFAULT_SECONDARY") or "").rstrip("/") or None,
    )


def _seconds(name: str, default: float, highest: float) -> float:
    """A duration setting; a bad value falls back to the default (settings are read before logging is set up)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if 1.0 <= value <= highest else default


def _clock_offset() -> float:
    raw = os.environ.get("VMVAULT_TEST_CLOCK_OFFSET_S", "")
    try:
        return float(raw) if raw else 0.0
    except ValueError:
        return 0.0


SETTINGS_FILE_KEYS = ("allow-disks", "allow-vaults", "allow-restores")


def read_settings_file(path: Path) -> dict[str, list[str]]:
    """The keys of HOME/settings.toml (each a list of directories); {} when the file is absent.

    Raises ValueError naming the problem (unreadable, not TOML, unknown key, not a list of strings):
    `vmvault serve` refuses to start rather than guess what the admin meant.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    values: dict[str, list[str]] = {}
    for key, value in doc.items():
        if key not in SETTINGS_FILE_KEYS:
            raise ValueError(f"{path}: unknown key '{key}' (known: {', '.join(SETTINGS_FILE_KEYS)})")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f'{path}: {key} must be a list of directories, e.g. {key} = ["/srv/dir"]')
        values[key] = list(value)
    return values


# Service defaults, here (not in service/worker.py) so the CLI can show them without importing
# the service stack: `vmvault --help` stays fast.
DEFAULT_WORKERS = 2
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_SCHEDULE_JITTER_S = 300.0  # serve --schedule-jitter (domain/schedule.planned_start caps it to the slot gap)
MAX_SCHEDULE_JITTER_S = 1800.0  # half the missed-backup grace (domain/rpo.DEFAULT_GRACE): spread is never "late"
