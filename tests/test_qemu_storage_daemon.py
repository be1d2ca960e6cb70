"""Changed-block tracking edge cases, fast: qemu-storage-daemon stands in for the VM.

The daemon serves each disk to vmvault over QMP like a VM does, and to the test as a writable FUSE
file (the "guest"): writes there go through QEMU's block layer, so dirty bitmaps see them.
"""

from __future__ import annotations

import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Cli, files_equal
from vm.live import backup, fell_back, latest_point, protect_running, restore_raw, wait_for_line, warnings
from vm.machine import StorageDaemon, blank_disk, read_live

MiB = 1 << 20
VM = "qsd"


@pytest.fixture
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageDaemon]:
    fmt = getattr(request, "param", "qcow2")
    qsd = StorageDaemon(tmp_path, [blank_disk(tmp_path, "d0", 64 * MiB, fmt)]).start()
    try:
        _scribble(qsd, seed=0, blocks=400)
        yield qsd
    finally:
        qsd.close()


@pytest.fixture
def cli(daemon: StorageDaemon, tmp_path: Path) -> Cli:
    cli = Cli(home=tmp_path / "home")
    protect_running(cli, tmp_path / "vault", VM, daemon.vmvault_qmp)
    return cli


def _scribble(qsd: StorageDaemon, seed: int, blocks: int) -> None:
    """Random 4 KiB writes through the daemon (as a guest would)."""
    rng = random.Random(seed)
    disk = qsd.disks[0]
    size = 64 * MiB
    qsd.write(disk, [(rng.randrange(size // 4096) * 4096, rng.randbytes(4096)) for _ in range(blocks)])


def _assert_point_is_the_disk(cli: Cli, qsd: StorageDaemon, tmp_path: Path) -> None:
    restored = restore_raw(cli, VM, latest_point(cli, VM), tmp_path / "out")
    live = read_live(qsd.disks[0], tmp_path / "live.raw")
    assert files_equal(restored["d0"], live), "the point differs from the disk"


def _reason(job: dict[str, object]) -> str:
    (why,) = [w["message"] for w in warnings(job) if w["code"] == "cbt_fallback"]
    return str(why)


def test_incremental_backups_read_only_changes_and_survive_a_clean_restart(
    daemon: StorageDaemon, cli: Cli, tmp_path: Path
) -> None:
    first = backup(cli, VM)
    assert first["properties"]["status"] == "Completed", first  # a storage daemon has no guest: no agent warning
    _scribble(daemon, seed=1, blocks=20)
    job = backup(cli, VM)
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 20 * 64 * 1024, job["properties"]["extendedInfo"]
    _assert_point_is_the_disk(cli, daemon, tmp_path)

    daemon.quit()  # persistent bitmaps are written back at a clean exit...
    daemon.start()
    _scribble(daemon, seed=2, blocks=20)
    job = backup(cli, VM)  # ...and reloaded: tracking goes on across the restart
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 20 * 64 * 1024, job["properties"]["extendedInfo"]
    _assert_point_is_the_disk(cli, daemon, tmp_path)

    # Killed while its bitmap, loaded from the image at start, was in use: it comes back inconsistent.
    daemon.quit()
    daemon.start()
    _scribble(daemon, seed=3, blocks=20)
    daemon.kill9()
    daemon.start()
    job = backup(cli, VM)
    assert "inconsistent" in _reason(job), job
    _assert_point_is_the_disk(cli, daemon, tmp_path)
    _scribble(daemon, seed=4, blocks=5)
    assert not fell_back(backup(cli, VM))


def test_a_vm_migrated_away_from_its_bitmap_is_compared_by_hash_and_starts_a_new_chain(
    daemon: StorageDaemon, cli: Cli, tmp_path: Path
) -> None:
    """What a live migration leaves on the new host: the same QEMU-served disk, no bitmap of the old
    chain (here the bitmap is deleted between two backups). The next backup reads everything but stores
    only what changed (hash comparison with the latest point), says why and that a new chain starts;
    the one after is incremental again."""
    first = backup(cli, VM)
    nodes = daemon.qmp("query-named-block-nodes", {"flat": True})
    ours = [(n["node-name"], str(b["name"])) for n in nodes for b in n.get("dirty-bitmaps", [])
            if str(b.get("name") or "").startswith("vmv-")]  # fmt: skip
    assert len(ours) == 1, ours
    _scribble(daemon, seed=1, blocks=20)
    for node, name in ours:
        daemon.qmp("block-dirty-bitmap-remove", {"node": node, "name": name})
    job = backup(cli, VM)
    why = _reason(job)
    assert f"bitmap {ours[0][1]} is missing" in why and "live-migrated" in why and "a new chain starts" in why, why
    info, full = job["properties"]["extendedInfo"], first["properties"]["extendedInfo"]
    assert info["bytesRead"] >= full["bytesRead"], (info, full)  # everything read again...
    assert info["bytesWritten"] <= full["bytesWritten"] // 10, (info, full)  # ...only the changes stored
    _assert_point_is_the_disk(cli, daemon, tmp_path)
    _scribble(daemon, seed=2, blocks=5)
    job = backup(cli, VM)  # the new chain's bitmap: incremental again
    assert not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 5 * 64 * 1024, job["properties"]["extendedInfo"]
    _assert_point_is_the_disk(cli, daemon, tmp_path)


@pytest.mark.parametrize("daemon", ["raw"], indirect=True)
def test_a_raw_disk_is_tracked_only_while_its_qemu_runs(daemon: StorageDaemon, cli: Cli, tmp_path: Path) -> None:
    backup(cli, VM)
    _scribble(daemon, seed=1, blocks=10)
    job = backup(cli, VM)
    assert not fell_back(job), job
    assert job["properties"]["extendedInfo"]["bytesRead"] <= 10 * 64 * 1024, job["properties"]["extendedInfo"]
    daemon.quit()
    daemon.start()
    _scribble(daemon, seed=2, blocks=10)
    job = backup(cli, VM)
    assert "lives only in QEMU's memory" in _reason(job), job
    _assert_point_is_the_disk(cli, daemon, tmp_path)


def test_a_resized_disk_is_read_in_full(daemon: StorageDaemon, cli: Cli, tmp_path: Path) -> None:
    backup(cli, VM)
    daemon.qmp("block_resize", {"node-name": "d0", "size": 80 * MiB})
    job = backup(cli, VM)
    assert "resized" in _reason(job), job
    _assert_point_is_the_disk(cli, daemon, tmp_path)


def test_an_interrupted_backup_loses_no_change(daemon: StorageDaemon, cli: Cli, tmp_path: Path) -> None:
    backup(cli, VM)
    _scribble(daemon, seed=1, blocks=10)
    held = Cli(home=cli.home, extra_env={"VMVAULT_TEST_HOLD_SNAPSHOT": "5"})
    proc = held.popen(*held.backup_args(VM))
    try:
        wait_for_line(proc, "VMVAULT_TEST_HOLD_SNAPSHOT", timeout=60)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the job is cancelled once the hold ends
        out, _err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert '"Cancelled"' in out, out
    _scribble(daemon, seed=2, blocks=10)
    job = backup(cli, VM)  # the cancelled run's changes were merged into the new bitmap
    assert not fell_back(job), job
    _assert_point_is_the_disk(cli, daemon, tmp_path)
    nodes = daemon.qmp("query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vmv-")]
    bitmaps = [b.get("name") for n in nodes for b in n.get("dirty-bitmaps", [])]
    assert len([b for b in bitmaps if b and b.startswith("vmv-")]) == 1, bitmaps


def test_fleece_space_is_checked_before_anything_starts(daemon: StorageDaemon, cli: Cli, tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    subprocess.run(["truncate", "-s", "32M", str(small)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(small)], check=True)
    fleece = cli.home / "fleece"
    fleece.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(small), str(fleece)], check=True)
    try:
        r = cli.run(*cli.backup_args(VM))
        assert not r.ok and "Traceback" not in r.output, str(r)
        job = r.json()
        (error,) = job["properties"]["errorDetails"]
        assert job["properties"]["status"] == "Failed" and error["errorCode"] == "fleece_space", job
        assert "MiB free for fleece overlays" in error["errorString"], job
    finally:
        subprocess.run(["umount", str(fleece)], check=True)
    nodes = daemon.qmp("query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vmv-")]
    assert not daemon.qmp("query-block-jobs")
    assert cli.point_ids(VM) == []
