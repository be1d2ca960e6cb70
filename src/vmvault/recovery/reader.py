"""Random-access reads of a recovery point's disk, straight from the vault.

A read maps its byte range to chunk indexes, resolves each through the disk index (root -> leaf,
leaves cached and delta chains followed by LeafReader), and fetches the chunks it needs on
demand. Every fetched chunk goes through Vault.get_blob, which decrypts, decompresses and
re-hashes it against its ID, so a damaged pack fails the read instead of returning wrong bytes.
All-zero chunks are never stored and come back as zeros without touching the vault.

Fetched chunks sit in a bounded LRU cache keyed by chunk ID (identical chunks at different offsets
share one entry). The reader is thread-safe: the NBD server answers several connections at once;
fetches run outside the lock so slow storage never serialises unrelated reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from vmvault.errors import IntegrityError
from vmvault.vault.crypto import ZERO_ID
from vmvault.vault.diskindex import LeafReader, Root

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class ChunkCache:
    """An LRU of chunk plaintexts, bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: bytes, data: bytes) -> None:
        if key in self._items or len(data) > self.max_bytes:
            return
        self._items[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old)


class DiskReader:
    """pread() over one disk of one recovery point (the vault must stay open while it is used)."""

    def __init__(self, vault: Any, rp_id: str, disk: Any, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._vault = vault
        self.name: str = disk.name
        self._where = f"disk {disk.name} of recovery point {rp_id}"
        self._root = Root.decode(vault.get_blob(bytes.fromhex(disk.index_root)), self._where)
        if self._root.disk_size != disk.size:
            raise IntegrityError(f"disk index of {self._where} does not match the manifest size")
        self.size: int = self._root.disk_size
        self.chunk_size: int = self._root.chunk_size
        self._lock = threading.Lock()
        self._leaves = LeafReader(vault.get_blob, cache_size=256)
        self._cache = ChunkCache(cache_bytes)
        self.chunks_fetched = 0

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} is outside {self._where} ({self.size} bytes)")
        out = bytearray()
        cs = self.chunk_size
        pos, end = offset, offset + length
        while pos < end:
            index = pos // cs
            start = index * cs
            data = self._chunk(index)
            out += data[pos - start : min(end - start, len(data))]
            pos = start + len(data)
        return bytes(out)

    def _chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def _chunk(self, index: int) -> bytes:
        span = self._root.leaf_span
        with self._lock:
            chunk_id = self._leaves.read(self._root.leaves[index // span]).ids[index % span]
            if chunk_id == ZERO_ID:
                return bytes(self._chunk_length(index))
            data = self._cache.get(chunk_id)
        if data is None:
            data = self._fetch(chunk_id, index)
            with self._lock:
                self._cache.put(chunk_id, data)
                self.chunks_fetched += 1
        return data

    def _fetch(self, chunk_id: bytes, index: int) -> bytes:
        try:
            data: bytes = self._vault.get_blob(chunk_id)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{exc.message} ({self._where}, offset {index * self.chunk_size})",
                hint="run 'vmvault vault verify' to list every affected point",
            ) from exc
        if len(data) != self._chunk_length(index):
            raise IntegrityError(
                f"chunk {chunk_id.hex()} at offset {index * self.chunk_size} of {self._where} has the wrong length"
            )
        return data
