#!/usr/bin/env python3
"""Per-recovery-point metadata of a large disk, computed with vmvault's own disk-index encoder.

    .venv/bin/python bench/metadata_size.py                  # 1 TiB, 1 % of chunks changed
    .venv/bin/python bench/metadata_size.py --disk 4T --changed 0.05 --points 10 --out meta.json

No data is read or written: the disk-index structures (src/vmvault/vault/diskindex.py: Root,
encode_leaf) are built from synthetic chunk-ID lists. Point 1 is a full disk (every chunk distinct
and non-zero: the worst case); each later point changes --changed of the chunks, either

  * "runs":   in runs of --run-size (default 1 MiB = 16 chunks of 64 KiB) at random positions, or
  * "random": single chunks at random positions,

and its own metadata is what a backup writes new: the leaves whose content changed (the encoder
writes a patch over the previous point's leaf when <= 1/8 of its chunks changed, a full leaf
otherwise or after MAX_DELTA_DEPTH patches) plus the root, which lists every leaf and is new at
every point. Blob IDs stand in for vmvault's keyed BLAKE3 (any 32-byte ID gives the same sizes).
Sizes are reported as encoded (plaintext) bytes, and with the per-blob storage overhead of a pack
(AES-GCM tag + pack table entry + index entry) as stored bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vmvault.vault.diskindex import MAX_DELTA_DEPTH, Leaf, Root, encode_leaf
from vmvault.vault.packs import ENTRY
from vmvault.vault.store import DEFAULT_CHUNK_SIZE, LEAF_SPAN

GCM_TAG = 16
# Each stored blob costs a GCM tag in its pack, one entry in the pack's own table and one in the
# pack's index file (docs/format.md, "Packs").
PER_BLOB_OVERHEAD = GCM_TAG + 2 * ENTRY.size


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def chunk_id(chunk: int, version: int) -> bytes:
    """A distinct 32-byte ID for (chunk index, content version): stands in for the keyed hash."""
    return struct.pack("<QQ", chunk, version) + b"\x5a" * 16


def blob_id(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def changed_chunks(rng: random.Random, chunk_count: int, fraction: float, mode: str, run: int) -> set[int]:
    """Chunk indices changed at one point: `fraction` of all chunks, in runs or one by one."""
    want = int(chunk_count * fraction)
    changed: set[int] = set()
    if mode == "random":
        return set(rng.sample(range(chunk_count), want))
    while len(changed) < want:
        start = rng.randrange(chunk_count - run + 1)
        changed.update(range(start, start + run))
    return changed


class DiskModel:
    """The latest point's disk index: per-chunk content versions plus each leaf's encoded state."""

    def __init__(self, chunk_count: int, leaf_span: int) -> None:
        self.chunk_count = chunk_count
        self.span = leaf_span
        self.leaf_count = -(-chunk_count // leaf_span)
        self.versions = bytearray(chunk_count)  # content version of every chunk (wraps at 256: fine for IDs)
        self.leaf_ids: list[bytes] = []
        self.leaf_depth = bytearray(self.leaf_count)

    def leaf_chunk_ids(self, leaf: int) -> list[bytes]:
        first = leaf * self.span
        end = min(first + self.span, self.chunk_count)
        return [chunk_id(c, self.versions[c]) for c in range(first, end)]

    def first_point(self) -> dict[str, int]:
        """Every leaf full and distinct (a fully written disk)."""
        stats = {"leaves_new": 0, "leaf_bytes": 0, "full_leaves": 0, "delta_leaves": 0}
        for leaf in range(self.leaf_count):
            data = encode_leaf(self.leaf_chunk_ids(leaf), None, None)
            self.leaf_ids.append(blob_id(data))
            stats["leaves_new"] += 1
            stats["full_leaves"] += 1
            stats["leaf_bytes"] += len(data)
        return stats

    def next_point(self, changed: set[int]) -> dict[str, int]:
        by_leaf: dict[int, list[int]] = {}
        for c in changed:
            by_leaf.setdefault(c // self.span, []).append(c)
        stats = {"leaves_new": 0, "leaf_bytes": 0, "full_leaves": 0, "delta_leaves": 0, "patches": 0}
        for leaf, chunks in by_leaf.items():
            before = Leaf(self.leaf_chunk_ids(leaf), self.leaf_depth[leaf])
            for c in chunks:
                self.versions[c] = (self.versions[c] + 1) % 256
            after = self.leaf_chunk_ids(leaf)
            data = encode_leaf(after, before, self.leaf_ids[leaf])
            new_id = blob_id(data)
            if new_id == self.leaf_ids[leaf]:
                continue
            self.leaf_ids[leaf] = new_id
            stats["leaves_new"] += 1
            stats["leaf_bytes"] += len(data)
            if data[0] == 2:  # LEAF_DELTA
                self.leaf_depth[leaf] = before.depth + 1
                stats["delta_leaves"] += 1
                stats["patches"] += len(chunks)
            else:
                self.leaf_depth[leaf] = 0
                stats["full_leaves"] += 1
        return stats

    def root_bytes(self, disk_size: int, chunk_size: int) -> int:
        return len(Root(disk_size, chunk_size, self.span, self.leaf_ids).encode())


def scenario(
    disk_size: int, chunk_size: int, leaf_span: int, fraction: float, mode: str, run: int, points: int, seed: int
) -> dict[str, Any]:
    chunk_count = -(-disk_size // chunk_size)
    model = DiskModel(chunk_count, leaf_span)
    rng = random.Random(seed)
    per_point = []
    t0 = time.monotonic()
    for n in range(1, points + 1):
        if n == 1:
            stats = model.first_point()
            changed_n = chunk_count
        else:
            changed = changed_chunks(rng, chunk_count, fraction, mode, run)
            changed_n = len(changed)
            stats = model.next_point(changed)
        root = model.root_bytes(disk_size, chunk_size)
        blobs = stats["leaves_new"] + 1
        encoded = stats["leaf_bytes"] + root
        per_point.append(
            {
                "point": n,
                "chunks_changed": changed_n,
                **stats,
                "root_bytes": root,
                "metadata_bytes": encoded,
                "stored_bytes": encoded + blobs * PER_BLOB_OVERHEAD,
                "metadata_per_changed_chunk": round(encoded / changed_n, 1),
            }
        )
    second = per_point[1] if points > 1 else per_point[0]
    later = per_point[1:]
    return {
        "mode": mode,
        "run_bytes": run * chunk_size if mode == "runs" else chunk_size,
        "second_point": second,
        "mean_later_point_metadata_bytes": int(sum(p["metadata_bytes"] for p in later) / len(later)) if later else None,
        "points": per_point,
        "seconds": round(time.monotonic() - t0, 1),
    }


def fmt(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--disk", default="1T", help="disk size (default 1T)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of chunks changed per point (0.01)")
    ap.add_argument("--run-size", default="1M", help="length of a changed run in 'runs' mode (default 1M)")
    ap.add_argument(
        "--points", type=int, default=2, help="recovery points to model (default 2; >8 shows re-based leaves)"
    )
    ap.add_argument("--modes", default="runs,random")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    disk = parse_size(a.disk)
    chunk = DEFAULT_CHUNK_SIZE
    run = max(1, parse_size(a.run_size) // chunk)
    if a.points < 2:
        ap.error("--points must be >= 2 (the second point is the one reported)")
    results: dict[str, Any] = {
        "disk_bytes": disk,
        "chunk_size": chunk,
        "leaf_span": LEAF_SPAN,
        "max_delta_depth": MAX_DELTA_DEPTH,
        "changed_fraction": a.changed,
        "points": a.points,
        "per_blob_overhead_bytes": PER_BLOB_OVERHEAD,
        "scenarios": {},
    }
    print(
        f"disk {fmt(disk)}, chunk {fmt(chunk)}, leaf span {LEAF_SPAN} chunks ({fmt(chunk * LEAF_SPAN)} per leaf), "
        f"{a.changed:.2%} of chunks changed per point"
    )
    for mode in [m.strip() for m in a.modes.split(",") if m.strip()]:
        r = scenario(disk, chunk, LEAF_SPAN, a.changed, mode, run, a.points, a.seed)
        results["scenarios"][mode] = r
        s = r["second_point"]
        first = r["points"][0]
        label = f"runs of {fmt(r['run_bytes'])}" if mode == "runs" else "single chunks at random positions"
        print(f"\n{mode}: {label}")
        print(f"  point 1 (full):  {first['leaves_new']} leaves, {fmt(first['metadata_bytes'])} of metadata")
        print(
            f"  point 2:         {s['chunks_changed']} chunks changed ({fmt(s['chunks_changed'] * chunk)}) "
            f"in {s['leaves_new']} leaves ({s['delta_leaves']} patches, {s['full_leaves']} full)"
        )
        print(
            f"                   new leaves {fmt(s['leaf_bytes'])} + root {fmt(s['root_bytes'])} = "
            f"{fmt(s['metadata_bytes'])} ({fmt(s['stored_bytes'])} stored), "
            f"{s['metadata_per_changed_chunk']:.0f} B per changed chunk"
        )
        if a.points > 2:
            print(
                f"  points 2..{a.points}: mean {fmt(r['mean_later_point_metadata_bytes'])} per point; "
                + ", ".join(fmt(p["metadata_bytes"]) for p in r["points"][1:])
            )
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
        print(f"\nresults written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
