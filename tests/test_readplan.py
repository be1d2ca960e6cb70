"""The restore's read planning (engine/readplan.py): which ranged reads fetch a set of blobs.

A pure function: neighbouring blobs of one pack share a read across small gaps, never across a
large gap or past the largest read, packs never mix, and every blob is in exactly one read that
covers it (the restore slices each blob out of its read and authenticates it on its own;
tests/test_corruption.py flips a byte inside a coalesced read of a real vault)."""

from __future__ import annotations

import random

from vmvault.engine.readplan import plan_reads
from vmvault.vault.chunkindex import Location
from vmvault.vault.packs import BlobRef

KIB = 1024


def loc(pack: str, offset: int, length: int, n: int = 0) -> Location:
    blob_id = f"{pack}-{offset}-{length}-{n}".encode().ljust(32, b"\0")[:32]
    return Location(pack, b"salt", BlobRef(blob_id, 0, 0, offset, length, length))


def spans(locations: list[Location], **kw: int) -> list[tuple[str, int, int, int]]:
    return [(r.pack, r.offset, r.length, len(r.blobs)) for r in plan_reads(locations, **kw)]


def test_adjacent_blobs_of_a_pack_are_one_read_in_offset_order() -> None:
    blobs = [loc("p", 300, 100), loc("p", 100, 100), loc("p", 200, 100)]
    (read,) = plan_reads(blobs)
    assert (read.offset, read.length) == (100, 300)
    assert [b.ref.offset for b in read.blobs] == [100, 200, 300]


def test_a_small_gap_is_bridged_and_a_large_one_splits() -> None:
    blobs = [loc("p", 0, 100), loc("p", 100 + 4 * KIB, 100), loc("p", 10_000 + 4 * KIB + 100, 100)]
    assert spans(blobs, max_gap=4 * KIB) == [("p", 0, 4 * KIB + 200, 2), ("p", 10_000 + 4 * KIB + 100, 100, 1)]
    assert spans(blobs, max_gap=4 * KIB - 1) == [("p", 0, 100, 1), ("p", 100 + 4 * KIB, 100, 1),
                                                 ("p", 10_000 + 4 * KIB + 100, 100, 1)]  # fmt: skip


def test_overlapping_and_repeated_ranges_share_one_read() -> None:
    blobs = [loc("p", 0, 200), loc("p", 100, 200), loc("p", 100, 200, n=1), loc("p", 50, 10)]
    assert spans(blobs) == [("p", 0, 300, 4)]


def test_a_read_never_grows_past_max_read_and_a_larger_blob_is_its_own_read() -> None:
    blobs = [loc("p", i * 100, 100) for i in range(10)] + [loc("p", 1000, 5000)]
    assert spans(blobs, max_read=400) == [("p", 0, 400, 4), ("p", 400, 400, 4), ("p", 800, 200, 2),
                                          ("p", 1000, 5000, 1)]  # fmt: skip


def test_packs_never_share_a_read() -> None:
    blobs = [loc("a", 0, 100), loc("b", 100, 100), loc("a", 100, 100)]
    assert spans(blobs) == [("a", 0, 200, 2), ("b", 100, 100, 1)]
    assert plan_reads([]) == []


def test_every_blob_is_in_exactly_one_read_that_covers_it() -> None:
    rng = random.Random(21)
    blobs = [loc(rng.choice("abc"), rng.randrange(1 << 24), rng.randrange(1, 1 << 20), n) for n in range(2000)]
    reads = plan_reads(blobs, max_gap=64 * KIB, max_read=4 << 20)
    placed = [b for r in reads for b in r.blobs]
    assert sorted(map(id, placed)) == sorted(map(id, blobs))
    for r in reads:
        assert all(b.pack == r.pack and r.offset <= b.ref.offset <= b.ref.offset + b.ref.length <= r.end
                   for b in r.blobs)  # fmt: skip
        assert r.length <= 4 << 20 or len(r.blobs) == 1


def test_a_pack_mostly_asked_for_is_one_read_of_the_whole_object() -> None:
    """Half of a pack's blob bytes or more: one read of the whole object (its header and table of
    contents come with it, for the pack's check); less: ranged reads as before. A pack whose end
    is not given is never read whole."""
    blobs = [loc("p", 40 + i * 1000, 1000) for i in range(10)]  # 10,040 bytes of blobs
    (whole,) = plan_reads(blobs[:6], pack_ends={"p": 10_040})
    assert (whole.pack, whole.offset, whole.length, whole.whole) == ("p", 0, 10_040, True)
    assert [b.ref.offset for b in whole.blobs] == [40 + i * 1000 for i in range(6)]
    assert [r.whole for r in plan_reads(blobs[:4], pack_ends={"p": 10_040})] == [False]
    assert [r.whole for r in plan_reads(blobs[:6], pack_ends={"q": 10_040})] == [False]
    assert [r.whole for r in plan_reads(blobs[:6])] == [False]


def test_the_share_counts_each_byte_once_and_packs_are_judged_apart() -> None:
    """A blob asked for twice (and overlapping ranges) counts once toward the share; each pack
    gets its own decision."""
    repeated = [loc("p", 0, 3000, n) for n in range(4)]  # 3,000 distinct bytes, asked for 4 times
    assert [r.whole for r in plan_reads(repeated, pack_ends={"p": 10_000})] == [False]
    assert [r.whole for r in plan_reads(repeated, pack_ends={"p": 6_000})] == [True]
    mixed = [loc("a", 0, 900), loc("b", 0, 100), loc("a", 900, 100)]
    reads = plan_reads(mixed, pack_ends={"a": 1000, "b": 1000})
    assert [(r.pack, r.whole, len(r.blobs)) for r in reads] == [("a", True, 2), ("b", False, 1)]
