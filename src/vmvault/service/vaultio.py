"""Opening the vault behind a catalog row, through the engine contract (imported lazily)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmvault.catalog.models import VaultRow
from vmvault.errors import IntegrityError, InvalidInput, NotFound, ObjectNotFound
from vmvault.service.context import Context
from vmvault.settings import Settings

# Cross-region restore (`--from-secondary`): every vault this CLI process opens is read from its
# GRS secondary, never from the primary (which may be unreachable). Process-wide on purpose: the
# CLI runs one command, and a restore's work may run on other threads.
_FROM_SECONDARY = False


def read_from_secondary() -> None:
    global _FROM_SECONDARY
    _FROM_SECONDARY = True


def reading_from_secondary() -> bool:
    return _FROM_SECONDARY


def secondary_location(row: VaultRow) -> str:
    if not row.secondary_storage:
        raise InvalidInput(
            f"vault '{row.name}' has no secondary ({row.redundancy})",
            hint="--from-secondary needs a GRS vault (vault create --redundancy GRS --secondary ...)",
        )
    return row.secondary_storage


def check_readable(row: VaultRow) -> None:
    """Before a restore or mount creates a job or a directory: with --from-secondary, refuse a
    vault that has no secondary (an LRS vault) up front, naming it."""
    location_of(row)


def location_of(row: VaultRow) -> tuple[str, str]:
    """(where to read the vault, the name of this host's cache of it): the primary (a directory or
    an azure:// / s3:// URL), or with --from-secondary the GRS secondary and its own cache."""
    if _FROM_SECONDARY:
        return secondary_location(row), f"{row.uuid}-secondary"
    return row.storage_dir, ""


@contextmanager
def opened_vault(
    ctx: Context, row: VaultRow, passphrase: str | None = None, *, host_key_only: bool = False
) -> Iterator[Any]:
    """The vault of a catalog row, checked to be the same vault (uuid), closed afterwards.

    A passphrase given for this vault (or the CLI's VMVAULT_PASSPHRASE) must open its key file
    even when the host key opens the vault (wrong_passphrase otherwise); under `serve` a
    mismatch of the service-wide passphrase is logged (Vault.open, strict_passphrase).
    """
    with opened_vault_at(ctx.settings, row, passphrase, host_key_only=host_key_only) as vault:
        yield vault


@contextmanager
def opened_vault_at(
    settings: Settings, row: VaultRow, passphrase: str | None = None, *, host_key_only: bool = False
) -> Iterator[Any]:
    """opened_vault for a process without a catalog (an agent: the row comes from the server's work package)."""
    from vmvault.vault.store import Vault

    location, cache = location_of(row)
    vault = Vault.open(
        location,
        settings.home,
        None if host_key_only else passphrase or settings.passphrase,
        strict_passphrase=passphrase is not None or settings.strict_passphrase,
        cache_name=cache,
    )
    try:
        if vault.uuid != row.uuid:
            raise IntegrityError(
                f"the storage of vault '{row.name}' ({row.storage_dir}) holds another vault (uuid {vault.uuid}, "
                f"expected {row.uuid})",
                hint="put the vault's own storage back at that path, or register this one with: vmvault vault import",
            )
        yield vault
    finally:
        vault.close()


def read_manifest_or_none(vault: Any, rp_id: str) -> Any:
    """The manifest of rp_id, or None when the vault no longer has it."""
    try:
        return vault.read_manifest(rp_id)
    except (NotFound, ObjectNotFound, FileNotFoundError):
        return None
