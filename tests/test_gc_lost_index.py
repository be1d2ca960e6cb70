"""Issue 18 item 0: garbage collection never deletes a pack it cannot prove unreferenced.

A pack whose index file is lost is listed again from its own trailer and kept while any point
uses its blobs; one whose trailer is damaged too is kept untouched and named by verify.
"""

from __future__ import annotations

from pathlib import Path

from helpers import Cli, Protected, assert_same_image, copy_image, head_of_image, mutate_image, vault_files
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def _two_points(small_image: Path, tmp_path: Path) -> tuple[Protected, list[str], list[Path]]:
    disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    assert prot.cli.backup_now(prot.vm).ok
    first = copy_image(disk, tmp_path / "first.raw")
    mutate_image(disk, seed=7, fraction=0.2)
    assert prot.cli.backup_now(prot.vm).ok
    return prot, prot.cli.point_ids(prot.vm), [first, disk]


def _restores(prot: Protected, points: list[str], images: list[Path], tmp_path: Path) -> None:
    for n, (rp, image) in enumerate(zip(points, images, strict=True)):
        target = tmp_path / f"restore-{n}"
        r = prot.cli.restore_disks(prot.vm, rp, target)
        assert r.ok, str(r)
        (restored,) = list(target.iterdir())
        assert_same_image(restored, image)


def test_gc_reindexes_packs_whose_index_file_was_deleted(small_image: Path, tmp_path: Path) -> None:
    prot, points, images = _two_points(small_image, tmp_path)
    data_indexes = [
        p for p in vault_files(prot.storage, "index") if (prot.storage / "data" / p.parent.name / p.name).exists()
    ]
    assert data_indexes
    for index_file in data_indexes:
        index_file.unlink()
    packs_before = set(vault_files(prot.storage, "data"))

    report = prot.cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert report["packsReindexed"] == len(data_indexes), report
    assert report["problems"] == [], report
    assert set(vault_files(prot.storage, "data")) == packs_before, "GC deleted packs that points use"
    for index_file in data_indexes:
        assert index_file.exists(), f"GC did not rewrite {index_file}"
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)
    _restores(prot, points, images, tmp_path)
    # A fresh home (no cached chunk index) reads the rewritten index files.
    fresh = Cli(home=tmp_path / "home2")
    assert fresh.vault_import(prot.storage).ok
    assert fresh.vault_verify("vault").ok


def test_gc_keeps_a_pack_without_index_file_and_with_a_damaged_trailer(small_image: Path, tmp_path: Path) -> None:
    prot, points, _images = _two_points(small_image, tmp_path)
    pack = max(vault_files(prot.storage, "data"), key=lambda p: p.stat().st_size)
    rel = pack.relative_to(prot.storage).as_posix()
    (prot.storage / "index" / pack.parent.name / pack.name).unlink()
    data = bytearray(pack.read_bytes())
    data[-20] ^= 0xFF  # inside the trailer's authentication tag
    pack.write_bytes(bytes(data))

    r = prot.cli.ok("vault", "gc", prot.vault, "--grace", "0")
    report = r.json()
    assert pack.exists(), "GC deleted a pack whose content it could not read"
    assert report["packsUnreadableKept"] == 1, report
    assert any(rel in p for p in report["problems"]), report

    r = prot.cli.vault_verify(prot.vault)
    assert not r.ok and rel in r.stderr, str(r)
    # Nothing says which chunks the pack held: the points' chunks are reported missing.
    damaged = {d["object"]: d for d in r.json()["damagedObjects"]}
    assert rel in damaged, str(r)
    affected = {p["recoveryPoint"] for p in damaged["missing chunks"]["affectedPoints"]}
    assert affected and affected <= set(points), str(r)
