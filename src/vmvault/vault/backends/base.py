"""The storage backend interface: the only thing the vault needs from a place to keep bytes.

Semantics every backend must honour (tests/contract runs them against each backend):

- Names are relative, '/'-separated, made of [A-Za-z0-9._-] components; no '..', no leading '/'.
- ``put(name, data)`` is atomic and durable: after it returns, ``get`` returns exactly ``data``
  even after a crash; during or after a crash in ``put`` a reader sees either the old object
  (or none) or the complete new one, never a partial one. Overwriting an existing name is allowed.
- ``put_if_absent(name, data)`` is ``put`` that only creates: when ``name`` already exists it
  raises AlreadyExists and leaves the object as it was. Of two concurrent calls for one name
  exactly one succeeds (local disk: link() of a complete temporary file; object stores:
  ``If-None-Match: *``). Append-only records (docs/format.md, "Record chain") rely on it.
- ``get(name, offset, length)`` returns ``length`` bytes from ``offset`` (all to the end when
  ``length`` is None); a range past the end is truncated; a missing object raises ObjectNotFound.
- ``exists(name)`` is True only for complete objects.
- ``delete(name)`` removes an object; deleting a missing object raises ObjectNotFound.
- ``list(prefix)`` yields (name, size) for every complete object whose name starts with
  ``prefix`` + '/' (or every object for prefix ""), in no particular order; it never yields
  temporary files of an unfinished ``put``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

from vmvault.errors import InvalidInput

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_name(name: str) -> str:
    """Refuse names that could escape the backend's root."""
    if not _NAME_RE.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise InvalidInput(f"invalid object name {name!r}", hint="object names are relative paths of [A-Za-z0-9._-]")
    return name


class Backend(Protocol):
    """A flat, durable object store (local directory, Azure Blob, S3)."""

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...

    def describe(self) -> str:
        """A human-readable location for messages, e.g. the directory path."""
        ...
