"""The restore's pipeline (engine/restore.py _Pipeline) against a real S3 server (moto).

Reads are fetched by several threads and decoded by others, so they finish in any order: the disk
must still come out byte-identical, every chunk must still be authenticated before it is written,
and a damaged chunk met in the middle of a restore must fail it with the integrity error (not a
"cancelled" of the reads stopped because of it), leaving nothing under the final name.

The point is made once per module by the CLI (vault create, vm add, protection enable, backup).
To get many reads in flight from a 16 MiB disk, reads are planned at most 128 KiB each (never
a whole pack) and decoded in 64 KiB pieces, with a 1 MiB window: the real planner and pipeline,
smaller numbers. tests/test_corruption.py covers the whole-pack reads a full point gets.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import objstores
from helpers import Cli, assert_same_image, head_of_image, rp_id
from helpers import protect_host_key_only as protect
from vmvault.engine import restore as engine
from vmvault.engine.readplan import plan_reads
from vmvault.errors import IntegrityError
from vmvault.vault.backends import open_backend
from vmvault.vault.chunkindex import Location
from vmvault.vault.packs import HEADER_LEN
from vmvault.vault.store import Vault

SMALL_READ = 128 << 10


@dataclass
class S3Point:
    url: str
    home: Path
    rp: str
    disk: Path
    cli: Cli
    vm: str


@pytest.fixture(scope="module")
def s3_point(
    moto_s3: objstores.Server, small_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Point]:
    work = tmp_path_factory.mktemp("pipeline")
    disk = head_of_image(small_image, work / "disk.raw", 16 << 20)
    url = objstores.fresh_s3_url()
    with pytest.MonkeyPatch.context() as mp:
        for var, value in moto_s3.env.items():
            mp.setenv(var, value)  # this process opens the vault too
        prot = protect(Cli(home=work / "home", extra_env=dict(moto_s3.env)), disk, url)  # type: ignore[arg-type]
        r = prot.cli.backup_now(prot.vm)
        assert r.ok, str(r)
        (point,) = prot.cli.points(prot.vm)
        yield S3Point(url, work / "home", rp_id(point), disk, prot.cli, prot.vm)


@pytest.fixture
def many_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small reads, pieces and window, and several threads in each stage."""
    # No whole-pack reads (this one-pack point would be one read): ranged ones, checked apart.
    monkeypatch.setattr(engine, "plan_reads", functools.partial(plan_reads, max_read=SMALL_READ, whole_share=2.0))
    monkeypatch.setattr(engine, "FETCHERS", 4)
    monkeypatch.setattr(engine, "DECODERS", 3)
    monkeypatch.setattr(engine, "DECODE_PIECE", 64 << 10)
    monkeypatch.setattr(engine, "IN_FLIGHT_BYTES", 1 << 20)


def _chunk_refs(vault: Vault, point: S3Point) -> list[Location]:
    return [loc for pack in _data_packs(point) for loc in _locations(vault, pack)]


def _data_packs(point: S3Point) -> list[str]:
    return sorted(info.name for info in open_backend(point.url).list("data"))


def _locations(vault: Vault, pack: str) -> list[Location]:
    known = vault.index.pack_entries(pack)
    assert known is not None, pack
    return [Location(pack, known[0], ref) for ref in known[1]]


def test_reads_finishing_out_of_order_restore_byte_identical(
    s3_point: S3Point, many_reads: None, tmp_path: Path
) -> None:
    vault = Vault.open(s3_point.url, s3_point.home)
    finished: list[tuple[str, int]] = []
    lock = threading.Lock()
    real_get, rng = vault.backend.get, random.Random(21)

    def jittery_get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        with lock:
            delay = rng.uniform(0, 0.03)
        time.sleep(delay)  # so the reads finish out of their submission order
        data = real_get(name, offset, length)
        if name.startswith("data/") and length and length > 4096:
            with lock:
                finished.append((name, offset))
        return data

    vault.backend.get = jittery_get  # type: ignore[method-assign]
    try:
        (restored,) = engine.run_restore(vault, vault.read_manifest(s3_point.rp), tmp_path / "out")
    finally:
        vault.close()
    assert len(finished) >= 8, f"only {len(finished)} data reads: the test would not test several in flight"
    assert finished != sorted(finished), "the reads finished in order: the test would not test reordering"
    assert_same_image(restored, s3_point.disk)


def test_a_damaged_chunk_mid_restore_fails_with_the_integrity_error(
    s3_point: S3Point, many_reads: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A byte of a chunk flipped in the store, in the fourth read of the restore, while its first
    read is held back: the restore raises that chunk's integrity error (not the Cancelled of the
    first read, stopped because of it) and leaves no file."""
    backend = open_backend(s3_point.url)
    damaged: dict[str, Any] = {}
    real_plan = engine._DiskWriter.plan

    def plan(self: engine._DiskWriter, batch: list[tuple[int, list[bytes]]]) -> Any:
        reads, positions = real_plan(self, batch)
        if not damaged:  # the first batch: damage a chunk of its fourth read, hold its first one
            assert len(reads) >= 8, "too few reads in flight for a 'middle' one"
            victim = reads[3].blobs[len(reads[3].blobs) // 2]
            original = backend.get(victim.pack)
            data = bytearray(original)
            data[victim.ref.offset + victim.ref.length // 2] ^= 0x01
            backend.put(victim.pack, bytes(data))
            damaged.update(victim=victim, original=original, held=reads[0])
        return reads, positions

    monkeypatch.setattr(engine._DiskWriter, "plan", plan)

    def hold(name: str, offset: int, length: int | None) -> float:
        held = damaged.get("held")
        return 0.5 if held is not None and (name, offset, length) == (held.pack, held.offset, held.length) else 0.0

    try:
        error = _failed_restore(s3_point, tmp_path / "out", hold)  # held: in flight when the damaged read fails
    finally:
        if damaged:
            backend.put(damaged["victim"].pack, damaged["original"])
    victim = damaged["victim"]
    assert f"chunk {victim.ref.blob_id.hex()}" in error.message
    assert victim.pack in error.message


def _failed_restore(point: S3Point, out: Path, hold: Any) -> IntegrityError:
    """Restore the point into out with each read delayed by hold(name, offset, length) seconds; it must
    fail with an integrity error and leave no file."""
    vault = Vault.open(point.url, point.home)
    real_get = vault.backend.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        time.sleep(hold(name, offset, length))
        return real_get(name, offset, length)

    vault.backend.get = get  # type: ignore[method-assign]
    try:
        with pytest.raises(IntegrityError) as caught:
            engine.run_restore(vault, vault.read_manifest(point.rp), out)
    finally:
        vault.close()
    assert list(out.iterdir()) == [], "a restore that failed left files behind"
    return caught.value


def test_a_damaged_pack_header_fails_the_restore_though_its_blobs_decode(
    s3_point: S3Point, many_reads: None, tmp_path: Path
) -> None:
    """Blobs are decoded without waiting for their pack's check (header, table of contents, index
    file); a pack whose header is damaged, its blobs intact, still fails the restore, naming it,
    and leaves no file."""
    pack = _data_packs(s3_point)[-1]
    backend = open_backend(s3_point.url)
    original = backend.get(pack)
    backend.put(pack, bytes([original[0] ^ 0xFF]) + original[1:])
    def hold(name: str, offset: int, length: int | None) -> float:
        return 1.0 if (name, offset, length) == (pack, 0, HEADER_LEN) else 0.0  # checked after every write

    try:
        error = _failed_restore(s3_point, tmp_path / "out", hold)
    finally:
        backend.put(pack, original)
    assert f"pack {pack} is damaged: bad header" in error.message


def test_a_whole_pack_read_with_a_damaged_table_of_contents_fails_the_restore(
    s3_point: S3Point, tmp_path: Path
) -> None:
    """The default plan reads this point's pack whole and checks it from those bytes: a byte of
    its table of contents flipped (its blobs intact, so every chunk decodes) fails the restore,
    naming the pack, and leaves no file."""
    pack = _data_packs(s3_point)[-1]
    backend = open_backend(s3_point.url)
    original = backend.get(pack)
    damaged = bytearray(original)
    damaged[-20] ^= 0x01  # inside the sealed table, before its length and end marker
    backend.put(pack, bytes(damaged))
    try:
        error = _failed_restore(s3_point, tmp_path / "out", lambda *_: 0.0)
    finally:
        backend.put(pack, original)
    assert f"pack {pack} is damaged: its table of contents fails authentication" in error.message


def test_a_full_points_packs_are_each_read_once_whole(s3_point: S3Point, tmp_path: Path) -> None:
    """A full point needs all of each of its data packs: from an object store the restore reads
    each in one GET of the whole object and checks its header and table of contents from those
    bytes, instead of ranged data reads plus the two the check makes (engine/readplan.py). The
    store's reads are counted; the restored disk is byte-identical."""
    vault = Vault.open(s3_point.url, s3_point.home)
    real_get, reads, lock = vault.backend.get, list[tuple[str, int, int | None]](), threading.Lock()

    def counted_get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        with lock:
            reads.append((name, offset, length))
        return real_get(name, offset, length)

    vault.backend.get = counted_get  # type: ignore[method-assign]
    try:
        (restored,) = engine.run_restore(vault, vault.read_manifest(s3_point.rp), tmp_path / "out")
    finally:
        vault.close()
    assert_same_image(restored, s3_point.disk)
    packs = _data_packs(s3_point)
    assert packs
    for pack in packs:
        assert [r for r in reads if r[0] == pack] == [(pack, 0, None)], f"{pack} was not read once whole: {reads}"


@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_a_pack_of_another_length_fails_the_restore_naming_it(s3_point: S3Point, tmp_path: Path, change: str) -> None:
    """A pack object one byte shorter (a torn upload) or longer than its index says: the whole-pack
    read's check fails the restore, names the pack and the fix, and leaves no file."""
    pack = _data_packs(s3_point)[-1]
    backend = open_backend(s3_point.url)
    original = backend.get(pack)
    backend.put(pack, original[:-1] if change == "truncated" else original + b"\0")
    try:
        error = _failed_restore(s3_point, tmp_path / "out", lambda *_: 0.0)
    finally:
        backend.put(pack, original)
    assert f"pack {pack} is damaged" in error.message
    assert error.hint is not None and "vault verify" in error.hint


def test_the_cli_reports_a_damaged_chunk_and_no_restored_disk(s3_point: S3Point, tmp_path: Path) -> None:
    """The same through `restore disks` with the default pipeline: exit non-zero, the chunk named,
    the job Failed, nothing reported restored and no disk file."""
    vault = Vault.open(s3_point.url, s3_point.home)
    try:
        locs = _chunk_refs(vault, s3_point)
    finally:
        vault.close()
    victim = sorted(locs, key=lambda loc: (loc.pack, loc.ref.offset))[len(locs) // 2]
    backend = open_backend(s3_point.url)
    original = backend.get(victim.pack)
    damaged = bytearray(original)
    damaged[victim.ref.offset + 20] ^= 0x80
    backend.put(victim.pack, bytes(damaged))
    out = tmp_path / "out"
    try:
        r = s3_point.cli.restore_disks(s3_point.vm, s3_point.rp, out)
    finally:
        backend.put(victim.pack, original)
    assert not r.ok, str(r)
    assert f"chunk {victim.ref.blob_id.hex()}" in r.stderr, str(r)
    assert "restored" not in r.stdout, str(r)
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".raw"], str(r)
    restores = [j for j in s3_point.cli.jobs() if j["properties"]["operation"] == "Restore"]
    assert [j["properties"]["status"] for j in restores] == ["Failed"], restores
