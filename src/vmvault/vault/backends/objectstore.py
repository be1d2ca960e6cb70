"""What the object-store backends (azure.py, s3.py) have in common: keys under the vault's prefix,
listing through the store's own `_list`, and no POSIX locks (vault/objlock.py takes their place)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vmvault.errors import ObjectNotFound
from vmvault.vault.backends.base import ObjectInfo, check_name
from vmvault.vault.backends.retry import Retrier


class ObjectStoreBackend:
    """Base of a backend over one container or bucket; a subclass sets `_url`, `_prefix` and
    `retrier`, and implements `stat` and `_list` (a listing of every object whose key starts so)."""

    _url: str
    _prefix: str  # "" or "PREFIX/"
    retrier: Retrier

    @property
    def location(self) -> str:
        return self._url

    @property
    def remote(self) -> bool:
        return True

    @property
    def retries(self) -> int:
        return self.retrier.retries

    def describe(self) -> str:
        return self._url

    def lock_path(self, name: str) -> Path | None:
        return None  # no POSIX locks: vault/objlock.py

    def _key(self, name: str) -> str:
        return self._prefix + check_name(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = self._prefix + (check_name(prefix) + "/" if prefix else "")
        return self._list(start)

    def inventory(self) -> Iterator[ObjectInfo]:
        return self._list(self._prefix)

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    def stat(self, name: str) -> ObjectInfo:
        raise NotImplementedError

    def _list(self, start: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError
