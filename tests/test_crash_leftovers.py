"""Issue 18 item 1: a killed process leaves nothing behind once the next command has run.

Kills land at the product's own steps (VMVAULT_TEST_KILL_AT, src/vmvault/testhooks.py):
- a restore killed after writing a disk's partial file: the job recorded where its partial files
  go, and the next command (which reaps the dead job) deletes them;
- a qcow2 backup killed right after publishing a pack (before its index file): its export's work
  directory (/tmp/vmv-<pid>-*, the qemu-nbd socket) is removed by the next command, and garbage
  collection lists the pack again from its trailer and deletes it, unreferenced, without waiting
  for the grace window: its writer is known to have died.
"""

from __future__ import annotations

import signal
from pathlib import Path

from helpers import Cli, head_of_image, to_qcow2, vault_files, wait_for
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def _processes_using(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (e.g. a qemu-nbd serving its socket)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def test_a_killed_restore_leaves_no_partial_file(small_image: Path, tmp_path: Path) -> None:
    disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    assert prot.cli.backup_now(prot.vm).ok
    (rp,) = prot.cli.point_ids(prot.vm)
    target = tmp_path / "target"
    doomed = Cli(home=prot.cli.home, extra_env={"VMVAULT_TEST_KILL_AT": "restore:partial-written"})
    r = doomed.restore_disks(prot.vm, rp, target)
    assert r.returncode == -signal.SIGKILL, str(r)
    partial = [p.name for p in target.iterdir()]
    assert partial and all(".vmvault-partial-" in n for n in partial), partial

    # this command reaps it
    (job,) = [j["properties"] for j in prot.cli.jobs() if j["properties"]["operation"] == "Restore"]
    assert job["status"] == "Failed", job
    assert list(target.iterdir()) == [], "the killed restore's partial files are still there"


def test_a_killed_qcow2_backup_leaves_no_work_dir_and_no_pack(small_image: Path, tmp_path: Path) -> None:
    raw = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    disk = to_qcow2(raw, tmp_path / "disk.qcow2")
    raw.unlink()
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    doomed = Cli(home=prot.cli.home, extra_env={"VMVAULT_TEST_KILL_AT": "pack:published"})
    proc = doomed.popen(*prot.cli.backup_args(prot.vm))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    work_dirs = list(Path("/tmp").glob(f"vmv-{proc.pid}-*"))
    assert work_dirs, "the killed backup had no export work directory to leave behind"
    assert vault_files(prot.storage, "data") and not vault_files(prot.storage, "index")

    (job,) = [j["properties"] for j in prot.cli.jobs() if j["properties"]["operation"] == "Backup"]
    assert job["status"] == "Failed", job
    assert [d for d in work_dirs if d.exists()] == [], "the dead backup's work directory is still there"
    wait_for(lambda: not _processes_using(work_dirs[0]), 30, "the export's qemu-nbd to end with its parent")

    # The default grace (a day) protects running writers; this pack's writer is known dead.
    report = prot.cli.ok("vault", "gc", prot.vault).json()
    assert report["packsReindexed"] >= 1 and report["orphanPacksDeleted"] >= 1, report
    assert vault_files(prot.storage, "data") == [] and vault_files(prot.storage, "index") == []
    assert prot.cli.vault_verify(prot.vault).ok
