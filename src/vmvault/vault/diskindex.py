"""Disk indexes: which chunk sits at each offset of a disk at one recovery point.

Two levels (docs/format.md, "Disk index"): a root lists one leaf per LEAF_SPAN chunks; a leaf
lists chunk IDs, either in full or as a few patches over the same leaf of the previous point.
Unchanged leaves have the same content, hence the same ID, so points share them; a point's own
metadata is its root plus the leaves that changed (as patches when few chunks changed).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from vmvault.errors import IntegrityError

LEAF_FULL = 1
LEAF_DELTA = 2
ROOT = 3
ID_LEN = 32
MAX_DELTA_DEPTH = 8
_LEAF_HEAD = struct.Struct("<BBH")  # kind, depth, count (full) or patch count (delta)
_PATCH = struct.Struct("<H32s")
_ROOT_HEAD = struct.Struct("<BBHQIII")  # kind, version, reserved, disk size, chunk size, leaf span, leaves


@dataclass(frozen=True)
class Root:
    disk_size: int
    chunk_size: int
    leaf_span: int
    leaves: list[bytes]

    @property
    def chunk_count(self) -> int:
        return -(-self.disk_size // self.chunk_size)

    def encode(self) -> bytes:
        head = _ROOT_HEAD.pack(ROOT, 1, 0, self.disk_size, self.chunk_size, self.leaf_span, len(self.leaves))
        return head + b"".join(self.leaves)

    @classmethod
    def decode(cls, data: bytes, what: str) -> Root:
        try:
            kind, _ver, _res, size, chunk, span, n = _ROOT_HEAD.unpack_from(data)
            if kind != ROOT or len(data) != _ROOT_HEAD.size + n * ID_LEN:
                raise ValueError("bad root")
        except (struct.error, ValueError) as exc:
            raise IntegrityError(f"disk index root of {what} is malformed") from exc
        body = data[_ROOT_HEAD.size :]
        return cls(size, chunk, span, [body[i : i + ID_LEN] for i in range(0, len(body), ID_LEN)])


@dataclass(frozen=True)
class Leaf:
    ids: list[bytes]  # resolved chunk IDs (ZERO_ID for all-zero chunks)
    depth: int


def encode_full(ids: list[bytes]) -> bytes:
    return _LEAF_HEAD.pack(LEAF_FULL, 0, len(ids)) + b"".join(ids)


def encode_delta(base_id: bytes, depth: int, patches: list[tuple[int, bytes]]) -> bytes:
    return _LEAF_HEAD.pack(LEAF_DELTA, depth, len(patches)) + base_id + b"".join(_PATCH.pack(i, c) for i, c in patches)


def encode_leaf(ids: list[bytes], previous: Leaf | None, previous_id: bytes | None) -> bytes:
    """Full leaf, or patches over the previous point's leaf when few chunks changed."""
    if previous is not None and previous_id is not None and len(previous.ids) == len(ids):
        patches = [(i, c) for i, (c, p) in enumerate(zip(ids, previous.ids, strict=True)) if c != p]
        if len(patches) <= len(ids) // 8 and previous.depth < MAX_DELTA_DEPTH:
            return encode_delta(previous_id, previous.depth + 1, patches)
    return encode_full(ids)


class LeafReader:
    """Resolves leaf IDs to chunk ID lists, following delta chains, with a small LRU cache."""

    def __init__(self, fetch: Callable[[bytes], bytes], cache_size: int = 64) -> None:
        self._fetch = fetch
        self._cache: OrderedDict[bytes, Leaf] = OrderedDict()
        self._cache_size = cache_size

    def read(self, leaf_id: bytes) -> Leaf:
        leaf = self._cache.get(leaf_id)
        if leaf is not None:
            self._cache.move_to_end(leaf_id)
            return leaf
        leaf = self._decode(leaf_id, self._fetch(leaf_id))
        self._cache[leaf_id] = leaf
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return leaf

    def _decode(self, leaf_id: bytes, data: bytes) -> Leaf:
        try:
            kind, depth, count = _LEAF_HEAD.unpack_from(data)
            body = data[_LEAF_HEAD.size :]
            if kind == LEAF_FULL and len(body) == count * ID_LEN:
                return Leaf([body[i : i + ID_LEN] for i in range(0, len(body), ID_LEN)], 0)
            if kind == LEAF_DELTA and len(body) == ID_LEN + count * _PATCH.size and 0 < depth <= MAX_DELTA_DEPTH:
                base = self.read(body[:ID_LEN])
                if base.depth != depth - 1:
                    raise ValueError("delta depth does not follow its base")
                ids = list(base.ids)
                for off in range(ID_LEN, len(body), _PATCH.size):
                    i, chunk = _PATCH.unpack_from(body, off)
                    ids[i] = chunk
                return Leaf(ids, depth)
            raise ValueError("bad leaf")
        except (struct.error, ValueError, IndexError) as exc:
            raise IntegrityError(f"disk index leaf {leaf_id.hex()} is malformed") from exc
