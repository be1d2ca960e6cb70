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

import os
import signal
from pathlib import Path

from helpers import Cli, assert_same_image, head_of_image, protect, to_qcow2, vault_files, wait_for


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


def test_gc_collects_a_dead_jobs_pack_but_not_an_overlapping_live_jobs(small_image: Path, tmp_path: Path) -> None:
    """Two backups of one vault overlap: `live` publishes its data pack and pauses, `dead` is
    killed right after publishing its own, then `live` completes. The dead job's pack journal names
    its pack, so GC collects it at once; `live`'s packs (young, of a job that succeeded) wait for
    the grace window. Judged from job timing windows (before), the dead pack fell inside the live
    job's window and was kept for a day."""
    cli = Cli(home=tmp_path / "home")
    prot = protect(cli, head_of_image(small_image, tmp_path / "live.raw", 8 << 20), tmp_path / "vault", vm="live")
    other = head_of_image(small_image, tmp_path / "dead.raw", 12 << 20)
    with open(other, "r+b") as f:  # different data: the dead job's pack holds blobs of its own
        f.write(bytes(range(256)) * 4096)
    assert cli.vm_add("dead", other).ok and cli.protection_enable("dead", prot.vault).ok

    paused = Cli(home=cli.home, extra_env={"VMVAULT_TEST_PAUSE_AFTER_PACK": "8"})
    live = paused.popen(*cli.backup_args("live"))
    try:
        wait_for(lambda: vault_files(prot.storage, "index") or live.poll() is not None, 120, "live's first pack")
        assert live.poll() is None, f"the live backup ended before the overlap: {live.communicate()}"
        before = set(vault_files(prot.storage, "data"))
        doomed = Cli(home=cli.home, extra_env={"VMVAULT_TEST_KILL_AT": "pack:published"})
        r = doomed.backup_now("dead")
        assert r.returncode == -signal.SIGKILL, str(r)
        (dead_pack,) = set(vault_files(prot.storage, "data")) - before
    finally:
        _out, err = live.communicate(timeout=300)
    assert live.returncode == 0, err
    statuses = {j["properties"]["entityFriendlyName"]: j["properties"]["status"] for j in cli.jobs()
                if j["properties"]["operation"] == "Backup"}
    assert statuses == {"live": "Completed", "dead": "Failed"}, statuses
    live_packs = len(vault_files(prot.storage, "data")) + len(vault_files(prot.storage, "tree")) - 1

    report = cli.ok("vault", "gc", prot.vault).json()  # the default grace: a day
    assert not dead_pack.exists(), f"the dead job's pack was kept: {report}"
    assert report["orphanPacksDeleted"] == 1 and report["packsTooYoung"] == live_packs, report
    (rp,) = cli.point_ids("live")
    assert cli.restore_disks("live", rp, tmp_path / "out").ok
    (restored,) = (tmp_path / "out").iterdir()
    assert_same_image(restored, prot.disk)
    assert cli.vault_verify(prot.vault).ok


def test_gc_deletes_the_temporaries_of_dead_writers_at_once(tmp_path: Path) -> None:
    """A `.tmp-` file names its writer (pid and boot): one whose writer died in this boot goes at
    the next `vault gc` without waiting for the grace window; a live writer's, and one naming no
    writer of this boot (another host's, an older vmvault's), stay until the grace has passed."""
    import subprocess

    from vmvault.vault.backends.local import writer_tag

    cli = Cli(home=tmp_path / "home")
    storage = tmp_path / "vault"
    cli.vault_create("v1", storage)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid of this boot that names no process now
    live_tag = writer_tag()
    dead_tag = live_tag.replace(f"w{os.getpid()}-", f"w{gone.pid}-")
    assert live_tag and dead_tag != live_tag
    (storage / "data" / "ab").mkdir(parents=True, exist_ok=True)
    dead = storage / "data" / "ab" / f".tmp-ab{'0' * 30}.{dead_tag}0a0b0c0d"
    live = storage / "data" / "ab" / f".tmp-ab{'1' * 30}.{live_tag}0a0b0c0d"
    unknown = storage / "points" / ".tmp-0123456789abcdef.0a0b0c0d"
    for path in (dead, live, unknown):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a write")

    report = cli.ok("vault", "gc", "v1").json()  # the default grace: a day
    assert report["temporariesDeleted"] == 1, report
    assert not dead.exists() and live.exists() and unknown.exists()


def test_only_journals_of_this_vaults_dead_backups_exempt_packs(tmp_path: Path) -> None:
    """The per-job rule itself, on a real catalog and vault: the packs a job's journal names are
    exempt from the grace window only when it is a Backup of this vault that ended Failed or
    Cancelled; a running job's, a completed job's, another vault's and an unknown job's are not.
    After a sweep only the running job's journal is kept."""
    from vmvault.catalog import repos
    from vmvault.service.context import context
    from vmvault.service.gc import dead_job_packs, forget_journals
    from vmvault.service.jobs import Operation, Status, create_job
    from vmvault.service.vaultio import opened_vault
    from vmvault.settings import load_settings
    from vmvault.vault.journal import PackJournal, read_journals

    cli = Cli(home=tmp_path / "home")
    cli.vault_create("v1", tmp_path / "vault")
    with context(load_settings(str(cli.home))) as ctx:
        with ctx.catalog.read() as s:
            (row,) = repos.list_vaults(s)
        ended = {"running": None, "failed": Status.FAILED, "cancelled": Status.CANCELLED,
                 "completed": Status.COMPLETED, "other-vault": Status.FAILED}
        packs: dict[str, str] = {}
        with opened_vault(ctx, row) as vault:
            for n, (vm, status) in enumerate(ended.items()):
                job = create_job(ctx, Operation.BACKUP, vm=vm, vault="v2" if vm == "other-vault" else "v1")
                if status is not None:
                    with ctx.catalog.write() as s:
                        repos.finish_job(s, job.id, status)
                packs[vm] = f"data/{n:02x}/{n:02x}{'0' * 30}"
                PackJournal(vault, job.id).record(packs[vm])
            PackJournal(vault, "not-a-job-of-this-catalog").record(f"data/ff/ff{'0' * 30}")

            assert dead_job_packs(ctx, vault, "v1") == {packs["failed"], packs["cancelled"]}
            forget_journals(ctx, vault)
            assert [set(p) for p in read_journals(vault).values()] == [{packs["running"]}]


def test_a_progress_report_keeps_what_another_writer_recorded_in_the_job(tmp_path: Path) -> None:
    """A job's progress reports write its details back; a key recorded meanwhile by another
    writer (a restore's partialFiles, written straight to the row) must survive them. Before, the
    first report after the record erased it, and a restore killed later left its partial files
    (found by the kill sweep, tests/test_kill_sweep.py)."""
    from vmvault.catalog import repos
    from vmvault.engine.progress import Progress
    from vmvault.service.context import context
    from vmvault.service.jobs import JobRun, Operation, create_job
    from vmvault.settings import load_settings

    cli = Cli(home=tmp_path / "home")
    cli.ok("vm", "list")  # creates the home and its catalog
    with context(load_settings(str(cli.home))) as ctx:
        job = create_job(ctx, Operation.RESTORE, vm="vm1", vault="v1", details={"trigger": "OnDemand"})
        run = JobRun(ctx, job.id, details={"trigger": "OnDemand"})
        where = {"dir": str(tmp_path), "pattern": ".*.vmvault-partial-j0123*"}
        with ctx.catalog.write() as s:
            repos.update_job_details(s, job.id, {"trigger": "OnDemand", "partialFiles": where})
        run._written_at = 0.0  # the next report is written, not throttled
        run.progress(Progress(total_bytes=100, bytes_read=50))
        with ctx.catalog.read() as s:
            details = repos.get_job(s, job.id).details
    assert details == {"trigger": "OnDemand", "partialFiles": where}, details
