"""File-recovery sessions: who serves a recovery point, who mounts it, and who takes it all down.

A session is a catalog row (file_recovery_sessions) plus a run directory
``$VMVAULT_HOME/run/files/<id>/`` (0700) holding the export's socket, TLS credentials, the FUSE
block files and a log. Processes:

- the **session owner** (``python -m vmvault.recovery.session owner``), detached from the command
  that started it (own session, stdio to ``owner.log``): it starts the export and the FUSE block
  files, marks the session Active, then sleeps until the session expires (re-reading the expiry,
  which a new mount of the same point extends), until SIGTERM (`vmvault files unmount`), or until
  a child dies; then it tears everything down and marks the row Ended. No CLI or `serve` needs
  to run meanwhile.
- the **export** (nbdserver.py), a child of the owner: reads the vault, pins the point for GC.
- one **nbdfuse** per disk, children of the owner: ``fuse/<disk>/disk`` is the disk as a file.

The command that mounts (a FileRecoveryMount job) attaches loop devices and mounts the file
systems itself: it serves nothing, so it cannot deadlock against its own mounts.

Teardown order is always umount -> loop detach -> FUSE unmount -> export close, and it is
found from the system (mount.cleanup), so a crashed owner's leftovers are cleared the same way by
the next `files` command (reap_sessions). All state changes of one home are serialised by an
flock on ``run/files/.lock``; the owner takes it before tearing down, so a mount that is extending
the session and an expiry never race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso, utc_now
from vmvault.catalog.models import FileRecoverySessionRow
from vmvault.errors import Busy, InvalidInput, StorageError, VmvaultError
from vmvault.proc import boot_id, pid_alive, process_cmdline
from vmvault.recovery import mount

log = logging.getLogger("vmvault.files")

STARTING, ACTIVE, ENDED = "Starting", "Active", "Ended"
DEFAULT_DURATION = timedelta(hours=12)
MAX_DURATION = timedelta(days=7)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes


def parse_duration(text: str | None) -> timedelta:
    """'30s', '15m', '12h', '2d' (or plain seconds); default 12 h; at most 7 days."""
    if text is None:
        return DEFAULT_DURATION
    match = _DURATION_RE.fullmatch(text)
    if not match or int(match.group(1)) <= 0:
        raise InvalidInput(f"invalid duration '{text}'", hint="give a number with s, m, h or d, e.g. --duration 12h")
    value = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if value > MAX_DURATION:
        raise InvalidInput(f"duration '{text}' is longer than 7 days", hint="give at most --duration 7d")
    return value


def new_session_id() -> str:
    return secrets.token_hex(6)


# ---- paths ---------------------------------------------------------------------------------------


def run_root(home: Path) -> Path:
    return home / "run" / "files"


@dataclass(frozen=True)
class Paths:
    run_dir: Path

    @property
    def fuse_root(self) -> Path:
        return self.run_dir / "fuse"

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    @property
    def server_config(self) -> Path:
        return self.run_dir / "server.json"

    @property
    def ready(self) -> Path:
        return self.run_dir / "ready"

    @property
    def log(self) -> Path:
        return self.run_dir / "owner.log"

    def fuse_file(self, disk: str) -> Path:
        return self.fuse_root / disk / "disk"


def socket_path(run_dir: Path, session_id: str) -> Path:
    """run_dir/nbd.sock, or a short path under /run (or /tmp) when the home's path is too long."""
    inside = run_dir / "nbd.sock"
    if len(str(inside)) <= MAX_SOCKET_PATH:
        return inside
    base = Path("/run") if os.access("/run", os.W_OK) else Path("/tmp")
    short = base / f"vmvault-files-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    os.chmod(short, 0o700)
    return short / f"{session_id}.sock"


@contextlib.contextmanager
def files_lock(home: Path) -> Iterator[None]:
    """Serialise every file-recovery state change of one home (re-entrant within a thread)."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    root = run_root(home)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _thread_lock, open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes, or when the process dies
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0


_thread_lock = threading.Lock()
_held = threading.local()


# ---- processes -----------------------------------------------------------------------------------


def process_matches(pid: int, marker: str) -> bool:
    """pid is alive (not a zombie) and its command line names marker (guards against pid reuse)."""
    return pid > 0 and pid_alive(pid) and marker in " ".join(process_cmdline(pid))


def owner_alive(row: FileRecoverySessionRow) -> bool:
    if row.owner_boot_id and row.owner_boot_id != boot_id():
        return False
    return process_matches(row.owner_pid, row.id)


def _stop_process(pid: int, marker: str, timeout: float = 10.0) -> None:
    if not process_matches(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_matches(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process_matches(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- catalog access ----------------------------------------------------------------------------


def get_row(ctx: Any, session_id: str) -> FileRecoverySessionRow | None:
    with ctx.catalog.read() as s:
        return repos.find_file_session(s, session_id)


def set_fields(ctx: Any, session_id: str, **values: Any) -> None:
    with ctx.catalog.write() as s:
        repos.update_file_session(s, session_id, **values)


def live_rows(ctx: Any) -> list[FileRecoverySessionRow]:
    with ctx.catalog.read() as s:
        return list(repos.live_file_sessions(s))


# ---- start ---------------------------------------------------------------------------------------


def spawn_owner(ctx: Any, row: FileRecoverySessionRow) -> subprocess.Popen[bytes]:
    paths = Paths(Path(row.run_dir))
    with open(paths.log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vmvault.recovery.session", "owner", str(ctx.settings.home), row.id],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


def wait_until_active(ctx: Any, session_id: str, proc: subprocess.Popen[bytes]) -> FileRecoverySessionRow:
    """Wait (holding files_lock) for the owner to report the export ready; tear down on failure."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        row = get_row(ctx, session_id)
        if row is not None and row.state == ACTIVE:
            return row
        if proc.poll() is not None:
            return _start_failed(ctx, session_id)
        time.sleep(0.05)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)
    return _start_failed(ctx, session_id, "the export did not start within a minute")


def _start_failed(ctx: Any, session_id: str, why: str | None = None) -> FileRecoverySessionRow:
    row = get_row(ctx, session_id)
    details = (row.details or {}) if row is not None else {}
    reason = why or details.get("error") or "the session owner exited"
    hint = details.get("errorHint") or "check the vault's storage (vmvault vault verify NAME) and retry"
    if row is not None:
        with contextlib.suppress(OSError):
            log.debug("session %s did not start; its log:\n%s", session_id, Paths(Path(row.run_dir)).log.read_text())
        teardown(ctx, row, "StartFailed")
    raise StorageError(f"could not serve the recovery point: {reason}", hint=hint)


# ---- teardown ------------------------------------------------------------------------------------


def _server_pid(paths: Paths) -> int:
    try:
        return int(json.loads(paths.ready.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return 0


def teardown(ctx: Any, row: FileRecoverySessionRow, reason: str, *, stop_owner: bool = True) -> mount.Cleanup:
    """Take a session down (umount -> loop detach -> FUSE unmount -> export close) and mark it Ended.

    Callers hold files_lock. Idempotent: it finds what is left from the system, not from records.
    """
    paths = Paths(Path(row.run_dir))
    roots = [Path(row.mountpoint)] if row.mountpoint else []
    done = mount.cleanup(roots, [paths.fuse_root], log.info)
    _stop_process(_server_pid(paths), str(paths.server_config))
    with contextlib.suppress(OSError):
        Path(row.details.get("socket", "")).unlink(missing_ok=True)
    if stop_owner and row.owner_pid != os.getpid():
        _stop_process(row.owner_pid, row.id)
    if row.mountpoint:
        mount.remove_volume_dirs(Path(row.mountpoint), list(row.details.get("disks") or []))
        if row.details.get("createdMountpoint"):
            with contextlib.suppress(OSError):
                Path(row.mountpoint).rmdir()
    if not done.problems:
        shutil.rmtree(paths.run_dir, ignore_errors=True)
    volumes = [{**v, "status": "unmounted" if v.get("status") == "mounted" else v.get("status")} for v in row.volumes]
    details = {**row.details, **({"cleanupProblems": done.problems} if done.problems else {})}
    set_fields(ctx, row.id, state=ENDED, ended=now_iso(), end_reason=reason, volumes=volumes, details=details)
    return done


def stop_session(ctx: Any, row: FileRecoverySessionRow) -> None:
    """End a session on request: ask its owner (SIGTERM), or tear down here when it is gone."""
    if owner_alive(row):
        with contextlib.suppress(ProcessLookupError):
            os.kill(row.owner_pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            current = get_row(ctx, row.id)
            if current is None or current.state == ENDED:
                return
            if not owner_alive(row):
                break
            time.sleep(0.05)
    with files_lock(ctx.settings.home):
        current = get_row(ctx, row.id)
        if current is not None and current.state != ENDED:
            teardown(ctx, current, "Unmounted")


def reap_sessions(ctx: Any) -> list[str]:
    """End sessions whose owner died or which outlived their expiry; clear orphaned run dirs.

    A session being started is safe: its starter holds files_lock from inserting the row until
    the owner runs, so under the lock a live row without a live owner is a dead one.
    """
    ended = []
    for row in live_rows(ctx):
        if (row.details or {}).get("agentHost"):
            continue  # mounted on an agent's host: its agent ends it (service/hostfiles.py), never here
        if not _of_this_home(ctx, row) and not _stuck(row):
            continue  # a shared catalog: another server's session (its files_lock, its mounts): it reaps it
        if owner_alive(row) and not _stuck(row):
            continue
        with files_lock(ctx.settings.home):
            current = get_row(ctx, row.id)
            if current is None or current.state == ENDED:
                continue
            stuck = _stuck(current)
            if stuck or not owner_alive(current):
                teardown(ctx, current, "Expired" if stuck else "OwnerDied")
                ended.append(row.id)
    _clear_orphan_dirs(ctx)
    return ended


def _of_this_home(ctx: Any, row: FileRecoverySessionRow) -> bool:
    """The session was started from this home (its run directory is here). Always so on SQLite
    (one home per catalog); on a PostgreSQL catalog, other servers' sessions are theirs to reap."""
    return Path(row.run_dir).parent == run_root(ctx.settings.home)


def _stuck(row: FileRecoverySessionRow) -> bool:
    """Still Active two minutes after expiry: the owner hangs; take it down from outside."""
    return row.state == ACTIVE and from_iso(row.expires) + timedelta(minutes=2) < utc_now()


def _clear_orphan_dirs(ctx: Any) -> None:
    root = run_root(ctx.settings.home)
    if not root.is_dir():
        return
    live = {r.id for r in live_rows(ctx)}
    for run_dir in root.iterdir():
        if run_dir.is_dir() and run_dir.name not in live:
            with files_lock(ctx.settings.home):
                if run_dir.name in {r.id for r in live_rows(ctx)}:
                    continue
                paths = Paths(run_dir)
                done = mount.cleanup([], [paths.fuse_root], log.info)
                _stop_process(_server_pid(paths), str(paths.server_config))
                if not done.problems:
                    shutil.rmtree(run_dir, ignore_errors=True)


# ---- the owner process -----------------------------------------------------------------------------


class Owner:
    """The detached process that keeps a session's export up until it ends."""

    def __init__(self, ctx: Any, session_id: str) -> None:
        self.ctx = ctx
        self.id = session_id
        self.stop = threading.Event()
        self.children: list[subprocess.Popen[bytes]] = []
        row = get_row(ctx, session_id)
        if row is None:
            raise InvalidInput(f"no file-recovery session {session_id}")
        self.paths = Paths(Path(row.run_dir))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        set_fields(self.ctx, self.id, owner_pid=os.getpid(), owner_boot_id=boot_id())
        try:
            tcp_port, disks = self._start_export()
        except Exception as exc:
            # The starter holds files_lock and tears down once this process has exited.
            log.error("session %s could not start: %s", self.id, exc)
            row = get_row(self.ctx, self.id)
            if row is not None:
                hint = exc.hint if isinstance(exc, VmvaultError) else None
                set_fields(self.ctx, self.id, details={**row.details, "error": str(exc), "errorHint": hint})
            return 1
        self._mark_active(tcp_port, disks)
        reason = self._wait()
        return self._end(reason)

    def _start_export(self) -> tuple[int | None, list[str]]:
        with open(self.paths.log, "ab") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "vmvault.recovery.nbdserver", str(self.paths.server_config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                close_fds=True,
            )
            self.children.append(server)
            ready = self._wait_ready(server)
            row = get_row(self.ctx, self.id)
            assert row is not None
            for disk in ready["disks"]:
                uri = f"nbd+unix:///{disk}?socket={row.details['socket']}"
                self.children.append(mount.start_nbdfuse(uri, self.paths.fuse_file(disk).parent, out))
        return ready.get("tcp_port"), list(ready["disks"])

    def _wait_ready(self, server: subprocess.Popen[bytes]) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        error_file = self.paths.ready.with_suffix(".error")
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.paths.ready.exists():
                ready: dict[str, Any] = json.loads(self.paths.ready.read_text())
                return ready
            if server.poll() is not None:
                error = {"message": f"exit code {server.returncode}", "hint": None}
                with contextlib.suppress(OSError, ValueError):
                    error = json.loads(error_file.read_text())
                raise StorageError(f"the export process failed: {error['message']}", hint=error.get("hint"))
            time.sleep(0.02)
        raise StorageError("the export process did not become ready")

    def _mark_active(self, tcp_port: int | None, disks: list[str]) -> None:
        row = get_row(self.ctx, self.id)
        assert row is not None
        host = row.details.get("listenHost")
        address = f"{host}:{tcp_port}" if host and tcp_port else None
        set_fields(self.ctx, self.id, state=ACTIVE, tcp_address=address, details={**row.details, "disks": disks})
        log.info("session %s active: disks %s, TLS export %s", self.id, ", ".join(disks), address)

    def _wait(self) -> str:
        while not self.stop.wait(self._sleep_seconds()):
            row = get_row(self.ctx, self.id)
            if row is None or row.state == ENDED:
                return ""
            if from_iso(row.expires) <= utc_now():
                return "Expired"
            if any(child.poll() is not None for child in self.children):
                return "ExportFailed"
        return "Unmounted"

    def _sleep_seconds(self) -> float:
        row = get_row(self.ctx, self.id)
        if row is None:
            return 0.0
        left = (from_iso(row.expires) - utc_now()).total_seconds()
        return max(0.05, min(1.0, left))

    def _end(self, reason: str) -> int:
        if not reason:
            return 0
        with files_lock(self.ctx.settings.home):
            row = get_row(self.ctx, self.id)
            if row is None or row.state == ENDED:
                return 0
            if reason == "Expired" and from_iso(row.expires) > utc_now():
                return self._continue()  # a mount extended the session while we waited for the lock
            if reason == "Expired":
                _record_expiry(self.ctx, row)
            else:
                teardown(self.ctx, row, reason, stop_owner=False)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
        log.info("session %s ended: %s", self.id, reason)
        return 0

    def _continue(self) -> int:
        return self._end(self._wait())


def _record_expiry(ctx: Any, row: FileRecoverySessionRow) -> None:
    """The unmount at expiry, as a FileRecoveryUnmount job of its own."""
    from vmvault.service.jobs import Operation, create_job, run_job

    vault = row.details.get("vaultName")
    job = create_job(ctx, Operation.FILE_RECOVERY_UNMOUNT, vm=row.vm_name, vault=vault)
    run_job(ctx, job, lambda _run: teardown(ctx, row, "Expired", stop_owner=False))


def owner_main(home: str, session_id: str) -> int:
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s owner[{os.getpid()}] %(message)s")
    with context(load_settings(home)) as ctx:
        return Owner(ctx, session_id).run()


def to_deadline(duration: timedelta) -> str:
    return to_iso(utc_now() + duration)


def ensure_not_busy(row: FileRecoverySessionRow) -> None:
    if row.state == STARTING:
        raise Busy(f"file-recovery session {row.id} is still starting", hint="retry in a few seconds")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "owner":
        sys.exit(owner_main(sys.argv[2], sys.argv[3]))
    sys.stderr.write("usage: python -m vmvault.recovery.session owner HOME SESSION_ID\n")
    sys.exit(64)
