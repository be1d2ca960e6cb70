"""Turning a disk's allocation map into aligned reads, leaf by leaf."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

READ_SIZE = 4 * 1024 * 1024  # large reads, split into chunks inside workers


@dataclass(frozen=True)
class Geometry:
    disk_size: int
    chunk_size: int
    leaf_span: int

    @property
    def chunk_count(self) -> int:
        return -(-self.disk_size // self.chunk_size)

    @property
    def leaf_count(self) -> int:
        return -(-self.chunk_count // self.leaf_span)

    def leaf_chunks(self, leaf: int) -> range:
        first = leaf * self.leaf_span
        return range(first, min(first + self.leaf_span, self.chunk_count))

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(self.chunk_size, self.disk_size - start)


def data_chunk_runs(extents: Iterable[tuple[int, int]], geo: Geometry) -> Iterator[tuple[int, int]]:
    """Merge data extents (offset, length) into runs of chunk indices [first, end), rounded out."""
    run: tuple[int, int] | None = None
    for offset, length in extents:
        if length <= 0:
            continue
        first = offset // geo.chunk_size
        end = min(-(-(offset + length) // geo.chunk_size), geo.chunk_count)
        if run is not None and first <= run[1]:
            run = (run[0], max(run[1], end))
            continue
        if run is not None:
            yield run
        run = (first, end)
    if run is not None:
        yield run


def reads_per_leaf(runs: Iterable[tuple[int, int]], geo: Geometry) -> dict[int, list[tuple[int, int]]]:
    """Split chunk runs at leaf boundaries and at READ_SIZE: {leaf: [(first_chunk, n_chunks)]}."""
    per_read = max(1, READ_SIZE // geo.chunk_size)
    plan: dict[int, list[tuple[int, int]]] = {}
    for first, end in runs:
        chunk = first
        while chunk < end:
            leaf = chunk // geo.leaf_span
            stop = min(end, (leaf + 1) * geo.leaf_span, chunk + per_read)
            plan.setdefault(leaf, []).append((chunk, stop - chunk))
            chunk = stop
    return plan
