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
- ``list(prefix)`` yields an ObjectInfo (name, size, mtime) for every complete object whose name
  starts with ``prefix`` + '/' (or every object for prefix ""), in no particular order; it never
  yields temporary files of an unfinished ``put``. ``mtime`` is the store's own clock (seconds
  since the epoch) at the object's last write.
- ``stat(name)`` is the ObjectInfo of one object (ObjectNotFound when missing).
- ``now()`` is the store's clock, comparable with ``mtime``: ages (GC's grace window, lock
  leases) are judged by it, never by the host's clock, as several hosts may write one vault.
- ``inventory()`` lists everything under the location, also leftovers ``list`` hides
  (temporary files, names vmvault never writes), for ``vault verify``; unlike ``list`` it may
  yield names that ``check_name`` refuses.
- ``delete_temporaries(older_than)`` removes leftovers of writes that died (local temporary
  files, unfinished multipart uploads) older than ``older_than`` seconds; returns how many.
- ``lock_path(name)`` is the local file to lock with POSIX locks for lock ``name``, or None when
  the store has no POSIX locks (object stores: vault/objlock.py leases instead).
- ``retries`` counts the attempts repeated after transient errors (throttling) since the
  backend was made; jobs report it.
- ``location`` is the vault's location as the user gave it (a directory or a URL), with no
  secret in it: the catalog stores it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from vmvault.errors import InvalidInput

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_name(name: str) -> str:
    """Refuse names that could escape the backend's root."""
    if not _NAME_RE.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise InvalidInput(f"invalid object name {name!r}", hint="object names are relative paths of [A-Za-z0-9._-]")
    return name


class ObjectInfo(NamedTuple):
    name: str
    size: int
    mtime: float  # seconds since the epoch, by the store's clock


class Backend(Protocol):
    """A flat, durable object store (local directory, Azure Blob, S3)."""

    @property
    def location(self) -> str: ...

    @property
    def retries(self) -> int: ...

    @property
    def remote(self) -> bool:
        """Whether reads cross a network (an object store) rather than come from this machine's
        disks: a restore then reads whole packs and writes around the page cache
        (engine/restore.py), which would compete with a local vault's reads for the device."""
        ...

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def stat(self, name: str) -> ObjectInfo: ...

    def now(self) -> float: ...

    def inventory(self) -> Iterator[ObjectInfo]: ...

    def delete_temporaries(self, older_than: float, dead_objects: frozenset[str] = frozenset()) -> int: ...

    def lock_path(self, name: str) -> Path | None: ...

    def ensure_container(self) -> None:
        """Create the container (bucket, directory) if missing: vault create calls it."""
        ...

    def describe(self) -> str:
        """A human-readable location for messages, e.g. the directory path."""
        ...
