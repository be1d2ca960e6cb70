"""The PostgreSQL catalog's own mechanisms, against a real PostgreSQL 15 (tests/pgserver.py).

- the URL: --catalog refuses a password (process arguments are public), PGPASSFILE supplies it,
  and no error or log line shows it;
- claiming: SELECT ... FOR UPDATE SKIP LOCKED: a worker never waits for another's locked job;
- LISTEN/NOTIFY: a job queued by any process wakes an idle worker at once;
- the scheduling lock (advisory lock): one holder; another takes it when the holder lets go;
- leases: a job owned by another machine is dead only once its heartbeat is older than the lease.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from helpers import PASSPHRASE, Cli
from pgserver import PgServer

MiB = 1 << 20


@pytest.fixture
def pg_ctx(tmp_path: Path, pg_server: PgServer) -> Iterator[Any]:
    from vmvault.service.context import context
    from vmvault.settings import Settings

    settings = Settings(home=tmp_path / "home", passphrase=PASSPHRASE, catalog_url=pg_server.new_database())
    with context(settings) as ctx:
        yield ctx


def queued_backups(ctx: Any, tmp_path: Path, count: int) -> list[str]:
    """count protected VMs with tiny disks, one queued backup each; returns the job ids."""
    from vmvault.service import backups, protection, vaults, vms

    vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
    ids = []
    for i in range(count):
        disk = tmp_path / f"d{i}.raw"
        disk.write_bytes(os.urandom(MiB))
        vms.add_vm(ctx, f"vm{i}", [disk])
        protection.enable_protection(ctx, f"vm{i}", "v1")
        ids.append(str(backups.backup_now(ctx, f"vm{i}", queue=True).job["id"]))
    return ids


# ---- the URL and its password --------------------------------------------------------------------


def test_catalog_url_password_never_in_arguments_nor_output(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    secret = pg_server.password
    cli = Cli(home=tmp_path / "home")
    # A password on the command line is refused before anything runs (ps shows arguments).
    r = cli.fails("--catalog", url, "vault", "list")
    assert r.returncode == 64 and "PGPASSFILE" in r.stderr and secret not in r.output, r
    # Without the password in the URL, libpq takes it from PGPASSFILE.
    bare = f"postgresql://vmvault@127.0.0.1:{pg_server.port}/{make_url(url).database}"
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_server.port}:*:vmvault:{secret}\n")
    passfile.chmod(0o600)
    with_file = Cli(home=tmp_path / "home", extra_env={"PGPASSFILE": str(passfile)})
    made = with_file.ok("--catalog", bare, "token", "create", "--role", "BackupReader", "--name", "pgpass").json()
    # VMVAULT_CATALOG (the whole URL, password included) opens the same catalog.
    from_env = Cli(home=tmp_path / "other-home", extra_env={"VMVAULT_CATALOG": url})
    assert [t["id"] for t in from_env.ok("token", "list").json()] == [made["id"]]
    # A wrong password or an unreachable server: a clear error naming the catalog, never the password.
    wrong = url.replace(secret, "not-the-password")
    r = Cli(home=tmp_path / "h3", extra_env={"VMVAULT_CATALOG": wrong}).fails("vault", "list")
    assert "cannot open the catalog postgresql://vmvault:***@127.0.0.1" in r.stderr, r
    assert "not-the-password" not in r.output and "password authentication failed" in r.stderr
    down = make_url(url).set(port=1).render_as_string(hide_password=False)
    r = Cli(home=tmp_path / "h4", extra_env={"VMVAULT_CATALOG": down}).fails("vault", "list")
    assert ":1/" in r.stderr and secret not in r.output, r
    r = Cli(home=tmp_path / "h5", extra_env={"VMVAULT_CATALOG": "mysql://x@y/z"}).fails("vault", "list")
    assert r.returncode == 64 and "unsupported catalog URL scheme 'mysql'" in r.stderr, r
    # Nor in what a log line or a traceback would print of the settings or the catalog.
    from vmvault.catalog.db import Catalog
    from vmvault.settings import Settings

    catalog = Catalog(url=url)
    try:
        printed = repr(Settings(home=tmp_path, catalog_url=url)) + repr(catalog) + catalog.where
    finally:
        catalog.close()
    assert secret not in printed and "vmvault:***@127.0.0.1" in printed


# ---- claiming, waking, leading, leases --------------------------------------------------------------


def test_a_worker_skips_a_job_another_worker_holds_locked(tmp_path: Path, pg_ctx: Any) -> None:
    from vmvault.catalog import repos
    from vmvault.service.worker import QUEUED_OPERATIONS, claim_next

    first, second = queued_backups(pg_ctx, tmp_path, 2)
    with pg_ctx.catalog.update() as s:  # another server's worker in the middle of claiming `first`
        held = repos.lock_next_queued(s, QUEUED_OPERATIONS)
        assert held is not None and held.id == first
        started = time.monotonic()
        got: list[Any] = []
        worker = threading.Thread(target=lambda: got.append(claim_next(pg_ctx)))
        worker.start()
        worker.join(20)
        waited = time.monotonic() - started
    assert got and got[0] is not None and got[0].id == second, "the worker must take the next job, not wait"
    assert waited < 5, f"the worker waited {waited:.1f} s for a locked row"
    assert got[0].owner_pid == os.getpid()
    claimed = claim_next(pg_ctx)  # released: the first job is claimable again, exactly once
    assert claimed is not None and claimed.id == first
    assert claim_next(pg_ctx) is None


def test_a_queued_job_wakes_idle_workers_at_once(tmp_path: Path, pg_ctx: Any) -> None:
    from vmvault.service.wakeup import SHARED_POLL_S, Wakeup

    wakeup = Wakeup(pg_ctx.catalog, poll_s=0.5)
    assert wakeup.poll_s == SHARED_POLL_S  # PostgreSQL: no tight polling loop
    wakeup.start()
    try:
        assert wakeup.listening.wait(20), "the listener did not start"
        woke: list[float] = []
        stop = threading.Event()
        waiter = threading.Thread(target=lambda: (wakeup.wait(stop), woke.append(time.monotonic())))
        time.sleep(0.5)
        waiter.start()
        time.sleep(0.5)
        queued_at = time.monotonic()
        queued_backups(pg_ctx, tmp_path, 1)
        waiter.join(SHARED_POLL_S + 5)
        assert woke, "not woken"
        # Queueing took part of this (vault creation, scrypt); a poll would be SHARED_POLL_S late.
        assert woke[0] - queued_at < SHARED_POLL_S - 0.5
    finally:
        wakeup.stop()


def test_one_scheduling_server_at_a_time(pg_ctx: Any) -> None:
    from vmvault.catalog.db import Catalog
    from vmvault.service import leader

    other = Catalog(url=pg_ctx.catalog.url)
    changes: list[bool] = []
    first = leader.Leadership(pg_ctx.catalog)
    second = leader.Leadership(other, on_change=changes.append)
    try:
        assert first.check() is True
        assert second.check() is False and second.check() is False
        first.release()
        wait_until = time.monotonic() + leader.RETRY_S + 5
        while not second.check() and time.monotonic() < wait_until:
            time.sleep(0.2)
        assert second.is_leader and changes == [True]
        assert first.check() is False  # the lock is taken now
    finally:
        first.release()
        second.release()
        other.close()


def test_another_machines_job_is_dead_only_after_its_lease(tmp_path: Path, pg_ctx: Any) -> None:
    from datetime import timedelta

    from vmvault.catalog import repos
    from vmvault.catalog.clock import to_iso, utc_now
    from vmvault.service import jobs

    (job_id,) = queued_backups(pg_ctx, tmp_path, 1)
    with pg_ctx.catalog.write() as s:  # claimed by a worker of another machine (another boot id)
        repos.claim_job(s, job_id, 4242, "another-machine", {})
    assert jobs.reap_dead_jobs(pg_ctx) == 0, "a running job on another machine was failed"
    stale = to_iso(utc_now() - timedelta(seconds=jobs.JOB_LEASE_S + 5))
    with pg_ctx.catalog.write() as s:
        repos.get_job(s, job_id).heartbeat = stale
    assert jobs.reap_dead_jobs(pg_ctx) == 1
    assert jobs.show_job(pg_ctx, job_id)["status"] == "Failed"


def test_cancel_during_a_claim_asks_the_claimer_instead_of_ending_a_running_job(tmp_path: Path, pg_ctx: Any) -> None:
    """A worker claims without the catalog-wide write lock: `job cancel` locks the row, so it sees
    the claim and asks the new owner to stop, never marks a job Cancelled while it runs."""
    from vmvault.catalog import repos
    from vmvault.service import jobs
    from vmvault.service.worker import QUEUED_OPERATIONS

    (job_id,) = queued_backups(pg_ctx, tmp_path, 1)
    result: list[Any] = []
    with pg_ctx.catalog.update() as s:  # a worker of another server, mid-claim
        held = repos.lock_next_queued(s, QUEUED_OPERATIONS)
        assert held is not None and repos.claim_job(s, held.id, 4242, "another-machine", {})
        canceller = threading.Thread(target=lambda: result.append(jobs.cancel_job(pg_ctx, job_id)))
        canceller.start()
        time.sleep(1.0)
        assert not result, "cancel must wait for the claim's transaction"
    canceller.join(20)
    (shown,) = result
    assert shown["status"] == "InProgress" and shown["extendedInfo"]["cancelRequested"] is True


def test_file_recovery_sessions_of_another_server_are_left_to_it(tmp_path: Path, pg_ctx: Any) -> None:
    """On a shared catalog a server reaps only the sessions started from its own home (its run
    directory, its files_lock, its mounts); another server's live session is not ended here."""
    from datetime import timedelta

    from vmvault.catalog.clock import to_iso, utc_now
    from vmvault.catalog.models import FileRecoverySessionRow
    from vmvault.recovery import session

    def row(sid: str, run_root: Path) -> FileRecoverySessionRow:
        return FileRecoverySessionRow(
            id=sid, vm_id="x", vm_name="web1", rp_id="rp", vault_id=1, state=session.ACTIVE, created=to_iso(utc_now()),
            expires=to_iso(utc_now() + timedelta(hours=1)), owner_pid=2**22 + 17, owner_boot_id="another-machine",
            run_dir=str(run_root / sid), volumes=[], details={},
        )  # fmt: skip

    other_home = tmp_path / "other-server-home"
    with pg_ctx.catalog.write() as s:
        s.add(row("theirs", session.run_root(other_home)))
        s.add(row("mine", session.run_root(pg_ctx.settings.home)))
    assert session.reap_sessions(pg_ctx) == ["mine"]  # its owner is gone: ended here
    with pg_ctx.catalog.read() as s:
        theirs = s.get(FileRecoverySessionRow, "theirs")
        assert theirs is not None and theirs.state == session.ACTIVE


def test_backup_now_queues_to_an_online_server_of_the_shared_catalog(tmp_path: Path, pg_ctx: Any) -> None:
    """Without a serve in this home, `backup now` runs here; once a server of the shared catalog
    is Online (its host's heartbeat), it queues the job for that server's workers instead."""
    from vmvault.service import backups, hosts, jobs, protection, vaults, vms

    vaults.create_vault(pg_ctx, "v1", storage_dir=tmp_path / "v1")
    disk = tmp_path / "d.raw"
    disk.write_bytes(os.urandom(MiB))
    vms.add_vm(pg_ctx, "vm1", [disk])
    protection.enable_protection(pg_ctx, "vm1", "v1")
    assert backups.backup_now(pg_ctx, "vm1").job["status"] == "Completed"  # no server anywhere: run here
    hosts.heartbeat_server(pg_ctx, "http://127.0.0.1:8080")  # a serve (any home, any machine) beats
    queued = backups.backup_now(pg_ctx, "vm1").job
    assert queued["status"] == "InProgress"
    assert jobs.describe_job(pg_ctx, queued["id"])["extendedInfo"]["queued"] is True
