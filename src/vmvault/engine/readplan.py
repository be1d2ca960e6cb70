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
  still decoded, and so authenticated, on its own;
- a pack of which the blobs asked for make up at least ``whole_share`` of its blob bytes (a
  full point's pack, mostly) is one read of the whole object: one GET instead of two data reads
  plus the header and table of contents its check needs, and on stores that copy the whole
  object for every ranged GET (moto) one copy instead of four or five. The caller gives the
  end of each pack's last blob (``pack_ends``); a read with ``whole`` set has no range, and its
  length is that estimate (the table of contents comes after it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmvault.vault.chunkindex import Location

MAX_GAP = 256 * 1024
MAX_READ = 8 * 1024 * 1024
WHOLE_SHARE = 0.5  # at most twice the bytes asked for, in place of three requests or more


@dataclass
class Read:
    """One ranged read of `pack`: bytes [offset, offset + length), holding `blobs` (offset order)."""

    pack: str
    offset: int
    length: int
    blobs: list[Location] = field(default_factory=list)
    whole: bool = False  # the whole object (offset 0, length the end of its last blob)

    @property
    def end(self) -> int:
        return self.offset + self.length


def plan_reads(
    locations: Iterable[Location],
    max_gap: int = MAX_GAP,
    max_read: int = MAX_READ,
    *,
    pack_ends: Mapping[str, int] | None = None,
    whole_share: float = WHOLE_SHARE,
) -> list[Read]:
    """The reads covering every location, grouped by pack (packs in first-seen order)."""
    by_pack: dict[str, list[Location]] = {}
    for loc in locations:
        by_pack.setdefault(loc.pack, []).append(loc)
    reads: list[Read] = []
    for pack, locs in by_pack.items():
        locs.sort(key=lambda item: (item.ref.offset, item.ref.length))
        pack_end = (pack_ends or {}).get(pack, 0)
        if pack_end > 0 and _wanted(locs) >= whole_share * pack_end:
            reads.append(Read(pack, 0, pack_end, locs, whole=True))
            continue
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


def _wanted(locs: list[Location]) -> int:
    """The bytes the blobs cover (a range asked for twice counts once)."""
    total = covered_to = 0
    for loc in locs:  # in offset order
        start, end = max(loc.ref.offset, covered_to), loc.ref.offset + loc.ref.length
        if end > start:
            total += end - start
            covered_to = end
    return total
