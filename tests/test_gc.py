"""Garbage collection: it frees what deleted points alone used, and never what a backup needs.

Points are deleted the way the product deletes them: an on-demand point kept until tomorrow
expires when the Retention job runs with the test-only clock offset (VMVAULT_TEST_CLOCK_OFFSET_S)
three days ahead. The race test pauses a real backup with VMVAULT_TEST_PAUSE_AFTER_DEDUP right
after it found a chunk in the vault that only the just-deleted point used.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, Protected, assert_same_image, copy_image, head_of_image, mutate_image, rp_id, wait_for
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)

THREE_DAYS = str(3 * 24 * 3600)
MiB = 1 << 20


def whole_mib_disk(image: Path, dst: Path) -> Path:
    """A copy of the test image cut to whole MiB: these tests are about GC, not odd disk sizes
    (QEMU shows a raw file of an odd size rounded up to 512 bytes)."""
    copy_image(image, dst)
    os.truncate(dst, image.stat().st_size // MiB * MiB)
    return dst


def tomorrow() -> str:
    return (datetime.now(UTC).date() + timedelta(days=1)).isoformat()


def vault_bytes(storage: Path) -> int:
    return sum(p.stat().st_size for top in ("data", "tree", "index") for p in (storage / top).rglob("*") if p.is_file())


def expire_short_points(prot: Protected) -> Any:
    offset = {**prot.cli.extra_env, "VMVAULT_TEST_CLOCK_OFFSET_S": THREE_DAYS}
    later = Cli(home=prot.cli.home, passphrase=prot.cli.passphrase, extra_env=offset)
    return later.ok("retention", "run", "--vault", prot.vault, "--no-gc").json()


def restore_and_compare(prot: Protected, point: str, expected: Path, target: Path) -> None:
    r = prot.cli.restore_disks(prot.vm, point, target)
    assert r.ok, str(r)
    (restored,) = list(target.iterdir())
    assert_same_image(restored, expected)


def verify_ok(prot: Protected) -> None:
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, f"vault does not verify:\n{r}"
    assert r.json()["problems"] == []


def test_gc_frees_the_data_of_deleted_points_and_repacks(small_image: Path, tmp_path: Path) -> None:
    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    assert cli.backup_now(prot.vm, retain_until=tomorrow()).ok
    first = cli.point_ids(prot.vm)[0]
    # 10 % of the disk (4 KiB writes in its used area + one 4 MiB region): most, not all, of the 64 KiB
    # chunks change, so the first point's data pack is partly dead (repacked), not wholly dead.
    mutate_image(disk, seed=21, fraction=0.1)
    assert cli.backup_now(prot.vm).ok
    second = cli.point_ids(prot.vm)[1]

    retention = expire_short_points(prot)
    (entry,) = retention["vaults"]
    assert [p["id"] for p in entry["deletedPoints"]] == [first]
    assert cli.point_ids(prot.vm) == [second]
    assert not (prot.storage / "points" / first).exists()

    before = vault_bytes(prot.storage)
    # The default grace (a day) protects these young packs: nothing may go yet.
    report = cli.ok("vault", "gc", prot.vault).json()
    assert report["packsDeleted"] == report["packsRepacked"] == 0 and report["packsTooYoung"] > 0, report
    assert vault_bytes(prot.storage) == before

    report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    after = vault_bytes(prot.storage)
    assert report["packsRepacked"] >= 1, report
    assert report["bytesFreed"] > 0 and after < before, (before, after, report)
    assert report["bytesAfter"] == after
    verify_ok(prot)
    restore_and_compare(prot, second, disk, tmp_path / "out")

    # A second collection finds nothing left to free.
    again = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert again["bytesFreed"] == 0 and again["packsDeleted"] == again["packsRepacked"] == 0, again
    job = [j for j in cli.jobs() if j["properties"]["operation"] == "GarbageCollect"]
    assert len(job) == 3 and all(j["properties"]["status"] == "Completed" for j in job), job


def store_env() -> dict[str, str]:
    """The object stores' credentials any_storage set in this process (Cli drops VMVAULT_* variables)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("VMVAULT_AZURE_", "AWS_", "AZURE_"))}


@pytest.mark.slow
def test_gc_waits_for_a_backup_that_deduplicated_against_a_deleted_point(
    small_image: Path, tmp_path: Path, any_storage: str
) -> None:
    """On every backend: a directory (POSIX locks) and Azure Blob and S3 (lock objects with leases)."""
    image = head_of_image(small_image, tmp_path / "image.raw", 16 * MiB)  # the race, not the disk, is tested
    disk = copy_image(image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home", extra_env=store_env()), disk, any_storage)  # type: ignore[arg-type]
    cli = prot.cli
    # Point 1 holds the image's chunks; point 2 (all zeros) none of them.
    assert cli.backup_now(prot.vm, retain_until=tomorrow()).ok
    first = cli.point_ids(prot.vm)[0]
    os.truncate(disk, 0)
    os.truncate(disk, image.stat().st_size)
    assert cli.backup_now(prot.vm).ok
    retention = expire_short_points(prot)
    assert [p["id"] for p in retention["vaults"][0]["deletedPoints"]] == [first]

    # The image comes back: the next backup finds every chunk in the vault, referenced by no point.
    copy_image(image, disk)
    hook = tmp_path / "hook"
    hook.mkdir()
    paused = Cli(home=cli.home, extra_env={**store_env(), "VMVAULT_TEST_PAUSE_AFTER_DEDUP": str(hook)})
    backup = paused.popen(*cli.backup_args(prot.vm))
    gc: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: (hook / "paused").exists() or backup.poll() is not None, 120, "the backup to pause")
        assert backup.poll() is None, f"the backup ended before its first dedup hit: {backup.communicate()}"
        chunk = (hook / "paused").read_text()
        assert len(chunk) == 64

        gc = cli.popen("vault", "gc", prot.vault, "--grace", "0")
        # The mark runs; the sweep needs the vault lock exclusive, which the paused backup holds shared.
        time.sleep(3)
        assert gc.poll() is None, f"garbage collection must wait for the running backup: {gc.communicate()}"
        assert backup.poll() is None

        (hook / "resume").touch()
        out, err = backup.communicate(timeout=300)
        assert backup.returncode == 0, f"backup failed:\n{out}\n{err}"
        out, err = gc.communicate(timeout=300)
        assert gc.returncode == 0, f"garbage collection failed:\n{out}\n{err}"
        report = json.loads(out)
        assert report["lockWaitSeconds"] > 0, report
        assert report["pointsMarked"] == 2, report  # the zero point, then the new one under the lock
    finally:
        (hook / "resume").touch()
        for proc in (backup, gc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()

    jobs = reversed(cli.jobs())  # oldest first: the last Backup is the paused one
    props = [j["properties"] for j in jobs]
    ended = {p["operation"]: p["endTime"] for p in props if p["operation"] in ("Backup", "GarbageCollect")}
    assert ended["GarbageCollect"] > ended["Backup"], ended
    points = cli.points(prot.vm)
    assert len(points) == 2, points
    newest = rp_id(points[-1])
    verify_ok(prot)
    restore_and_compare(prot, newest, image, tmp_path / "out")


def test_gc_keeps_what_a_valid_pin_reaches_even_without_its_point(small_image: Path, tmp_path: Path) -> None:
    from vmvault.catalog import repos
    from vmvault.engine.restore import run_restore
    from vmvault.service.context import context
    from vmvault.service.vaultio import opened_vault
    from vmvault.settings import load_settings
    from vmvault.vault.lock import add_pin, remove_pin

    image = whole_mib_disk(small_image, tmp_path / "image.raw")
    disk = copy_image(image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    assert cli.backup_now(prot.vm, retain_until=tomorrow()).ok
    first = cli.point_ids(prot.vm)[0]
    os.truncate(disk, 0)
    os.truncate(disk, image.stat().st_size)
    assert cli.backup_now(prot.vm).ok

    with context(load_settings(str(cli.home))) as ctx:
        with ctx.catalog.read() as s:
            (row,) = repos.list_vaults(s)
        with opened_vault(ctx, row) as vault:
            manifest = vault.read_manifest(first)
            pin = add_pin(vault, manifest, "a file-recovery session", 3600)  # this process: alive
            dead = add_pin(vault, manifest, "a session whose process died", 3600)
            dead_file = prot.storage / "pins" / f"{dead.pin_id}.json"
            no_such_pid = 2**22 + 1  # above Linux's largest pid_max
            dead_file.write_text(json.dumps({**json.loads(dead_file.read_text()), "pid": no_such_pid}))
        # Retention leaves the pinned point alone...
        retention = expire_short_points(prot)
        assert [p["id"] for p in retention["vaults"][0]["deferredPoints"]] == [first]
        # ... and if its manifest goes anyway (deleted between the pin and the session), GC keeps its data.
        with opened_vault(ctx, row) as vault:
            vault.delete_manifest(first)
        report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
        assert (report["pins"], report["stalePinsRemoved"], report["packsDeleted"]) == (1, 1, 0), report
        assert report["packsPinned"] >= 1, report  # a mount may be reading them: not even repacked
        with opened_vault(ctx, row) as vault:
            run_restore(vault, manifest, tmp_path / "out")
            assert_same_image(tmp_path / "out" / "disk0.raw", image)
            remove_pin(vault, pin.pin_id)

    report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert report["pins"] == 0 and report["packsDeleted"] >= 1 and report["bytesFreed"] > 0, report
    retention = expire_short_points(prot)  # the row whose manifest is gone goes too
    assert [p["id"] for p in retention["vaults"][0]["deletedPoints"]] == [first]
    verify_ok(prot)


def test_gc_keeps_delta_bases_but_not_the_chunks_patched_over(small_image: Path, tmp_path: Path) -> None:
    from vmvault.catalog import repos
    from vmvault.service.context import context
    from vmvault.service.vaultio import opened_vault
    from vmvault.settings import load_settings
    from vmvault.vault.crypto import ZERO_ID
    from vmvault.vault.diskindex import LEAF_DELTA, LeafReader, Root
    from vmvault.vault.gc import collect_garbage
    from vmvault.vault.packs import TYPE_DATA

    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    assert cli.backup_now(prot.vm, retain_until=tomorrow()).ok
    first = cli.point_ids(prot.vm)[0]
    mutate_image(disk, seed=5, fraction=0.002)  # a few chunks: most changed leaves become deltas
    assert cli.backup_now(prot.vm).ok
    second = cli.point_ids(prot.vm)[1]
    assert [p["id"] for p in expire_short_points(prot)["vaults"][0]["deletedPoints"]] == [first]

    with context(load_settings(str(cli.home))) as ctx:
        with ctx.catalog.read() as s:
            (row,) = repos.list_vaults(s)
        with opened_vault(ctx, row) as vault:
            (entry,) = vault.read_manifest(second).disks
            root = Root.decode(vault.get_blob(bytes.fromhex(entry.index_root)), "test")
            kinds = [vault.get_blob(leaf)[0] for leaf in root.leaves]
            assert LEAF_DELTA in kinds, "the second point should have delta leaves over the first's"
            # Repack anything with a dead byte, so the chunks only the deleted point read are dropped.
            report = collect_garbage(vault, grace_seconds=0, repack_threshold=1e-9)
            reader = LeafReader(vault.get_blob)
            wanted = {c for leaf in root.leaves for c in reader.read(leaf).ids if c != ZERO_ID}
            stored = set()
            for pack, _index in vault.index.iter_packs():
                found = vault.index.pack_entries(pack)
                assert found is not None
                stored |= {ref.blob_id for ref in found[1] if ref.type == TYPE_DATA}
    assert report.packs_repacked >= 1 and report.blobs_deleted >= 1, report
    # Exactly the chunks the live point reads are left: none the deleted point's leaves (kept as
    # delta bases) held at offsets the live point patched over.
    assert stored == wanted, (len(stored - wanted), len(wanted - stored))
    verify_ok(prot)
    restore_and_compare(prot, second, disk, tmp_path / "out")


def test_gc_deletes_nothing_when_a_disk_index_cannot_be_read(small_image: Path, tmp_path: Path) -> None:
    from helpers import tree_digest, vault_files

    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    assert cli.backup_now(prot.vm, retain_until=tomorrow()).ok
    trees_of_first = set(vault_files(prot.storage, "tree"))
    size = disk.stat().st_size
    os.truncate(disk, 0)
    os.truncate(disk, size)
    assert cli.backup_now(prot.vm).ok
    expire_short_points(prot)  # the first point goes: its data is garbage now
    (tree_pack,) = set(vault_files(prot.storage, "tree")) - trees_of_first  # the live point's
    data = bytearray(tree_pack.read_bytes())
    data[len(data) // 3] ^= 0xFF
    tree_pack.write_bytes(bytes(data))
    before = {k: v for k, v in tree_digest(prot.storage).items() if not k.startswith("locks/")}

    r = cli.fails("vault", "gc", prot.vault, "--grace", "0")
    assert "stopped before deleting anything" in r.stderr, r
    job = [j for j in cli.jobs() if j["properties"]["operation"] == "GarbageCollect"]
    assert [j["properties"]["status"] for j in job] == ["Failed"], job
    after = tree_digest(prot.storage)
    assert {k: v for k, v in after.items() if not k.startswith("locks/")} == before
