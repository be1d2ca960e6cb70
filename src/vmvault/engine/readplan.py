"""Which ranged reads fetch a set of blobs: one read per run of neighbouring blobs of a pack.

Object stores bill and serve per request (about 10 ms each on the emulators here, whatever its
size up to a few MiB), so a restore reads neighbouring blobs of a pack in one ranged GET, and a
whole pack at once when that is what it needs. A pure function, so the rules are tested alone
(tests/test_readplan.py):

- blobs of one pack, taken in offset order, share a read while the gap from the end of what the
  read covers so far is at most ``max_gap`` (the gap's bytes are read and thrown away);
- a read grows to at most ``max_read`` bytes, so the reads spread over the workers and memory
  stays bounded; a single blob longer than that is a read of its own;
- overlapping or repeated ranges (which a sound index never has) share one read, each blob is
  still decoded, and so authenticated, on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vmvault.vault.chunkindex import Location

MAX_GAP = 256 * 1024
MAX_READ = 8 * 1024 * 1024


@dataclass
class Read:
    """One ranged read of `pack`: bytes [offset, offset + length), holding `blobs` (offset order)."""

    pack: str
    offset: int
    length: int
    blobs: list[Location] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.length


def plan_reads(locations: Iterable[Location], max_gap: int = MAX_GAP, max_read: int = MAX_READ) -> list[Read]:
    """The reads covering every location, grouped by pack (packs in first-seen order)."""
    by_pack: dict[str, list[Location]] = {}
    for loc in locations:
        by_pack.setdefault(loc.pack, []).append(loc)
    reads: list[Read] = []
    for pack, locs in by_pack.items():
        locs.sort(key=lambda item: (item.ref.offset, item.ref.length))
        current: Read | None = None
        for loc in locs:
            start, end = loc.ref.offset, loc.ref.offset + loc.ref.length
            grown = None if current is None else max(end, current.end) - current.offset
            if current is not None and grown is not None and start - current.end <= max_gap and grown <= max_read:
                current.length = grown
                current.blobs.append(loc)
                continue
            current = Read(pack, start, end - start, [loc])
            reads.append(current)
    return reads
