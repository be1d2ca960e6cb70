"""File recovery on the vmvault host: mount recovery points read-only, browse, unmount, expire.

One VM with a GPT disk (ext4, XFS, NTFS, FAT32 and a partition with no file system) and an MBR
disk (FAT16 primary, ext4 logical), backed up twice with a file changed in between. Everything
runs through the real CLI; the export, FUSE block files, loop devices and mounts are real.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from files_support import (
    LONG_NAME,
    SHADOW_LINK,
    UNICODE_NAME,
    TwoPoints,
    check_volume_files,
    expected_digests,
    mounts_under,
    processes_mentioning,
    session_leftovers,
    wait_until_clean,
)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoPoints]:
    points = TwoPoints(tmp_path_factory.mktemp("files-mount"))
    try:
        yield points
    finally:
        points.unmount_all()


def _volumes(session: dict[str, object]) -> dict[tuple[str, int], dict[str, object]]:
    return {(str(v["disk"]), int(v["partition"])): v for v in session["volumes"]}  # type: ignore[attr-defined]


EXPECTED_LAYOUT = {
    ("disk0", 1): "ext4",
    ("disk0", 2): "xfs",
    ("disk0", 3): "ntfs",
    ("disk0", 4): "vfat",
    ("disk1", 1): "vfat",
    ("disk1", 5): "ext4",
}


def test_every_file_reads_back_through_the_mount(vm: TwoPoints) -> None:
    session = vm.mount(0)
    volumes = _volumes(session)
    assert session["mountpoint"] == str(vm.home / "mounts" / f"vm1-{vm.points[0]}")
    for key, fs in EXPECTED_LAYOUT.items():
        volume = volumes[key]
        assert volume["status"] == "mounted" and volume["fileSystem"] == fs, volume
        assert volume["path"] == f"{session['mountpoint']}/{key[0]}-part{key[1]}"
        check_volume_files(Path(str(volume["path"])), fs, version=1)
    junk = volumes[("disk0", 5)]
    assert junk["status"] == "skipped" and "no file system" in str(junk["reason"])
    # the names that are hard to get right, checked by name
    root = Path(str(volumes[("disk0", 1)]["path"]))
    assert (root / UNICODE_NAME).is_file() and (root / LONG_NAME).is_file()
    assert os.path.getsize(root / "sparse.bin") == 8 << 20 and os.path.getsize(root / "empty") == 0


def test_mounts_are_read_only_nosuid_nodev_noexec(vm: TwoPoints) -> None:
    session = vm.mount(0)
    by_point = {line.split()[4]: line.split()[5] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    for key in EXPECTED_LAYOUT:
        path = Path(str(_volumes(session)[key]["path"]))
        options = set(by_point[str(path)].split(","))
        assert {"ro", "nosuid", "nodev", "noexec"} <= options, (path, options)
        existing = next(p for p in path.iterdir() if p.name.lower() == "small.txt")
        for target, flags in ((path / "new-file", os.O_WRONLY | os.O_CREAT), (existing, os.O_WRONLY | os.O_APPEND)):
            with pytest.raises(OSError) as caught:
                os.close(os.open(target, flags, 0o644))
            assert caught.value.errno == errno.EROFS, (target, caught.value)


def test_two_points_mounted_at_once_show_their_own_versions(vm: TwoPoints) -> None:
    first, second = vm.mount(0), vm.mount(1)
    assert first["id"] != second["id"] and first["mountpoint"] != second["mountpoint"]
    for session, version in ((first, 1), (second, 2)):
        volumes = _volumes(session)
        ext4 = Path(str(volumes[("disk0", 1)]["path"]))
        fat = Path(str(volumes[("disk0", 4)]["path"]))
        assert (ext4 / "changed.txt").read_text() == f"ext4 version {version}\n"
        fat_name = next(p for p in fat.iterdir() if p.name.lower() == "changed.txt")
        assert fat_name.read_text() == f"vfat version {version}\n"
        check_volume_files(ext4, "ext4", version)
    listed = {s["recoveryPoint"]: s for s in vm.cli.ok("files", "list").json()}
    assert set(listed) == set(vm.points)
    assert all(s["state"] == "Active" and s["paths"] for s in listed.values())


def test_mounting_again_extends_the_session_and_another_mountpoint_is_refused(vm: TwoPoints) -> None:
    before = vm.mount(0)
    again = vm.mount(0, "--duration", "2d")
    assert again["id"] == before["id"] and again["mountpoint"] == before["mountpoint"]
    assert again["expires"] > before["expires"]
    elsewhere = vm.work / "elsewhere"
    r = vm.cli.fails("files", "mount", "vm1", "--rp", vm.points[0], "--mountpoint", str(elsewhere))
    assert "already_exists" in r.stderr and str(before["mountpoint"]) in r.stderr, r
    assert not elsewhere.exists()


def test_browse_and_download_never_follow_links_out_of_the_volume(vm: TwoPoints) -> None:
    from vmvault.errors import InvalidInput, NotFound
    from vmvault.service import files
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    vm.mount(0)
    rp = vm.points[0]
    host_secret = Path("/etc/shadow").read_bytes() if Path("/etc/shadow").exists() else b"\0never"
    with context(load_settings(str(vm.home))) as ctx:  # the service functions the API exposes
        listing = {e["name"]: e for e in files.browse(ctx, "vm1", "disk0-part1", rp_id=rp)}
        assert listing[SHADOW_LINK]["type"] == "symlink" and listing[SHADOW_LINK]["target"] == "/etc/shadow"
        for hostile in (
            f"disk0-part1/{SHADOW_LINK}",
            "disk0-part1/etclink/shadow",
            "disk0-part1/a/../../..",
            "disk0-part1/a/../../../etc/shadow",
            "disk0-part1/up/etc/shadow",
            "../../etc/shadow",
            "disk0-part1/up",
            "disk0-part1/etclink",
        ):
            with pytest.raises((InvalidInput, NotFound)):
                files.download(ctx, "vm1", hostile, rp_id=rp)
            try:
                shown = files.browse(ctx, "vm1", hostile, rp_id=rp)
            except (InvalidInput, NotFound):
                continue
            raise AssertionError(f"browsing {hostile!r} returned {shown}")
        size, blocks = files.download(ctx, "vm1", "disk0-part1/a/inside.txt", rp_id=rp)
        assert (size, b"".join(blocks)) == (9, b"inside a\n")
    out = vm.work / "out.bin"
    r = vm.cli.fails("files", "download", f"disk0-part1/{SHADOW_LINK}", "--to", str(out), "--vm", "vm1", "--rp", rp)
    assert "symbolic link" in r.stderr and "/etc/shadow" in r.stderr
    assert not out.exists() or host_secret not in out.read_bytes()
    r = vm.cli.fails("files", "browse", "disk0-part1/a/../../..", "--vm", "vm1", "--rp", rp)
    assert "'..' is not allowed" in r.stderr
    vm.cli.ok("files", "download", "disk0-part1/big.bin", "--to", str(out), "--vm", "vm1", "--rp", rp)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_digests("ext4", 1)["big.bin"]


def test_a_mounted_point_is_pinned_for_gc_and_does_not_block_the_next_backup(vm: TwoPoints) -> None:
    vm.mount(0)
    pins = [json.loads(p.read_text()) for p in (vm.vault_dir / "pins").glob("*.json")]
    assert any(pin["rp_id"] == vm.points[0] for pin in pins), pins
    r = vm.cli.run("backup", "now", "vm1")
    assert r.ok, f"a backup must run while a point of the VM is mounted:\n{r}"


def test_a_killed_session_owner_is_cleaned_up_by_the_next_files_command(vm: TwoPoints) -> None:
    session = vm.mount(1)
    owner = [int(line.split(":")[0]) for line in processes_mentioning(f"session owner {vm.home} {session['id']}")]
    assert len(owner) == 1
    os.kill(owner[0], signal.SIGKILL)  # leaves the export, nbdfuse, loop devices and mounts behind
    time.sleep(0.3)
    assert mounts_under(Path(session["mountpoint"]))
    listed = vm.cli.ok("files", "list", "--all").json()
    assert next(s for s in listed if s["id"] == session["id"])["endReason"] == "OwnerDied"
    wait_until_clean(vm.home, session, timeout=10)


def test_a_point_that_cannot_be_served_fails_the_mount_and_leaves_nothing(vm: TwoPoints) -> None:
    vm.unmount_all()
    hidden = vm.vault_dir.with_name("vault-hidden")
    vm.vault_dir.rename(hidden)
    try:
        r = vm.cli.fails("files", "mount", "vm1", "--rp", vm.points[0])
    finally:
        hidden.rename(vm.vault_dir)
    assert "could not serve the recovery point" in r.stderr and "no vault" in r.stderr, r
    ended = vm.cli.ok("files", "list", "--all").json()[0]
    assert ended["state"] == "Ended" and ended["endReason"] == "StartFailed"
    wait_until_clean(vm.home, ended, timeout=10)
    assert not (vm.home / "mounts" / f"vm1-{vm.points[0]}").exists()


def test_explicit_unmount_leaves_nothing(vm: TwoPoints) -> None:
    sessions = {s["recoveryPoint"]: s for s in (vm.mount(0), vm.mount(1))}
    second = sessions[vm.points[1]]
    ended = vm.cli.ok("files", "unmount", "vm1", "--session", second["id"]).json()
    assert [s["state"] for s in ended] == ["Ended"] and ended[0]["endReason"] == "Unmounted"
    wait_until_clean(vm.home, second, timeout=10)
    first = sessions[vm.points[0]]
    assert not session_leftovers(vm.home, first) or first["paths"], "unmounting one session touched the other"
    assert Path(first["paths"][0]).is_dir() and any(Path(first["paths"][0]).iterdir())
    vm.cli.ok("files", "unmount", "vm1")
    wait_until_clean(vm.home, first, timeout=10)
    assert not Path(str(first["mountpoint"])).exists()
    jobs = [j for j in vm.cli.jobs() if j["properties"]["operation"] == "FileRecoveryUnmount"]
    assert jobs and all(j["properties"]["status"] == "Completed" for j in jobs)


def test_duration_expiry_unmounts_everything_with_no_vmvault_process_running(vm: TwoPoints) -> None:
    session = vm.mount(0, "--duration", "3s")  # the CLI has exited when this returns
    assert len(session["paths"]) == len(EXPECTED_LAYOUT)
    assert len(mounts_under(Path(session["mountpoint"]))) == len(EXPECTED_LAYOUT)
    # No service runs for this home (serve processes of other homes are not ours to judge).
    assert not [p for p in processes_mentioning(" serve") if str(vm.home) in p]
    wait_until_clean(vm.home, session, timeout=30)
    ended = [s for s in vm.cli.ok("files", "list", "--all").json() if s["id"] == session["id"]]
    assert ended[0]["state"] == "Ended" and ended[0]["endReason"] == "Expired"
    expiry_jobs = [j for j in vm.cli.jobs() if j["properties"]["operation"] == "FileRecoveryUnmount"]
    assert expiry_jobs[0]["properties"]["status"] == "Completed"
