"""Issue 18 item 3: import what is sound, and `vault repair` rebuilds the index from the packs.

Vault files are damaged the way disks and operators damage them: vm "b"'s manifest flipped and
its data pack deleted, vm "a"'s data index file deleted and its tree index file flipped. A new
home imports vm "a" and names what it could not import; `vault repair` (dry run) plans exactly
the two rebuilds and the drop and changes nothing; `--apply` does them, after which vm "a"'s
point restores byte-identical and only vm "b"'s point is named as damaged.
"""

from __future__ import annotations

import random
from pathlib import Path

from helpers import Cli, assert_same_image, head_of_image, tree_digest
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _index_of(pack_rel: str) -> str:
    return "index/" + pack_rel.split("/", 1)[1]


def test_import_skips_damaged_files_and_repair_rebuilds_the_index(small_image: Path, tmp_path: Path) -> None:
    disk_a = head_of_image(small_image, tmp_path / "a.raw", 8 << 20)
    disk_b = tmp_path / "b.raw"
    disk_b.write_bytes(random.Random(3).randbytes(4 << 20))
    prot = protect(Cli(home=tmp_path / "home"), disk_a, tmp_path / "vault", vm="a")
    cli, storage = prot.cli, prot.storage
    assert cli.vm_add("b", disk_b).ok and cli.protection_enable("b", prot.vault).ok
    written: dict[str, set[str]] = {}
    seen: set[str] = set()
    for vm in ("a", "b"):
        assert cli.backup_now(vm).ok
        now = {p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()}
        written[vm], seen = now - seen, now
    rp_a, rp_b = cli.point_ids("a")[0], cli.point_ids("b")[0]
    (data_a,) = [f for f in written["a"] if f.startswith("data/")]
    (tree_a,) = [f for f in written["a"] if f.startswith("tree/")]
    (data_b,) = [f for f in written["b"] if f.startswith("data/")]

    _flip(storage / "points" / rp_b)
    (storage / data_b).unlink()
    (storage / _index_of(data_a)).unlink()
    _flip(storage / _index_of(tree_a))

    # A new server: the sound part of the vault is imported, the rest named.
    fresh = Cli(home=tmp_path / "home2")
    r = fresh.vault_import(storage, name="v1")
    assert r.ok, str(r)
    skipped = {e["object"] for e in r.json()["properties"]["notImported"]}
    assert skipped == {f"points/{rp_b}", _index_of(tree_a)}, str(r)
    assert f"points/{rp_b}" in r.stderr, str(r)
    assert fresh.point_ids("a") == [rp_a]
    # vm b and its protection come back from the vault's settings; its only point could not be read.
    assert fresh.point_ids("b") == []

    def content() -> dict[str, str]:  # locks/ holds empty lock files only (coordination, not data)
        return {k: v for k, v in tree_digest(storage).items() if not k.startswith("locks/")}

    before = content()
    r = fresh.run("vault", "repair", "v1")
    assert not r.ok and "Traceback" not in r.output and "--apply" in r.stderr, str(r)
    planned = {(a["action"], a["indexFile"]) for a in r.json()["actions"]}
    assert planned == {
        ("rebuild-index", _index_of(data_a)),
        ("rebuild-index", _index_of(tree_a)),
        ("drop-index", _index_of(data_b)),
    }, str(r)
    assert content() == before, "a dry run changed the vault"

    r = fresh.run("vault", "repair", "v1", "--apply")
    assert not r.ok, str(r)  # vm b's point stays damaged: its manifest and its data are gone
    report = r.json()
    assert {(a["action"], a["indexFile"]) for a in report["actions"]} == planned
    assert report["damagedPoints"] == [rp_b], str(r)
    assert [d["object"] for d in report["damagedObjects"]] == [f"points/{rp_b}"], str(r)
    assert (storage / _index_of(data_a)).is_file() and not (storage / _index_of(data_b)).exists()

    r = fresh.restore_disks("a", rp_a, tmp_path / "out")
    assert r.ok, str(r)
    (restored,) = list((tmp_path / "out").iterdir())
    assert_same_image(restored, disk_a)
    r = fresh.run("vault", "repair", "v1")  # nothing left to do
    assert r.json()["actions"] == [], str(r)
