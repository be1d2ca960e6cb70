"""vmvault.vault.backends: where a vault keeps its bytes, chosen by its location.

A location is a directory, ``azure://ACCOUNT/CONTAINER[/PREFIX]`` or ``s3://BUCKET[/PREFIX]``.
Credentials never appear in a location (the catalog stores it): they come from the environment
(vault/backends/azure.py, vault/backends/s3.py).
"""

from __future__ import annotations

from pathlib import Path

from vmvault.errors import InvalidInput
from vmvault.vault.backends.base import Backend

URL_SCHEMES = ("azure://", "s3://")


def is_url(location: str | Path) -> bool:
    """True for an object-store location (azure://, s3://), False for a directory."""
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


def normalize_location(location: str | Path) -> str:
    """The location as the catalog stores it: an absolute directory, or the URL unchanged."""
    text = str(location)
    if "://" in text and not is_url(text):
        raise InvalidInput(
            f"unsupported storage {text!r}",
            hint="give a directory, azure://ACCOUNT/CONTAINER[/PREFIX] or s3://BUCKET[/PREFIX]",
        )
    if is_url(text):
        return text.rstrip("/")
    return str(Path(text).absolute())


def open_backend(location: str | Path) -> Backend:
    """The backend for a location (credentials from the environment)."""
    text = normalize_location(location)
    if text.startswith("azure://"):
        from vmvault.vault.backends.azure import AzureBackend

        return AzureBackend.from_url(text)
    if text.startswith("s3://"):
        from vmvault.vault.backends.s3 import S3Backend

        return S3Backend.from_url(text)
    from vmvault.vault.backends.local import LocalBackend

    return LocalBackend(Path(text))
