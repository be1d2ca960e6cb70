"""File recovery: mount a recovery point's disks read-only, browse and download, script, unmount.

Use cases (docs/file-recovery.md):

- mount_point: serve the point (a session, see recovery/session.py) and mount its file systems
  under DIR/<disk>-part<N>, as a FileRecoveryMount job. Mounting the same point again extends its
  session (default 12 h from now); another mount point for it is refused naming the existing one.
- unmount: end a VM's sessions (or one) as a FileRecoveryUnmount job.
- make_script: the recovery script for another machine, plus a password shown once.
- browse / download: list a directory or stream a file of a mounted volume (recovery/browse.py).
- reap: clear what dead sessions left; every use case here runs it first (and `serve` may too).

Mounts never write recovery data to the vault; the export pins the point so garbage collection
keeps its data while the session lasts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso, utc_now
from vmvault.catalog.models import FileRecoverySessionRow, VaultRow
from vmvault.errors import AlreadyExists, InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, create_job, run_job
from vmvault.service.softdelete import resolve_point, usable_point
from vmvault.service.validate import absolute
from vmvault.service.vaultio import check_readable
from vmvault.service.views import JsonDict


@dataclass(frozen=True)
class Target:
    """A recovery point of a VM, checked against the catalog."""

    vm_id: str
    vm_name: str
    rp_id: str
    vault: VaultRow
    disks: list[str]


def _target(ctx: Context, vm_name: str, rp_id: str) -> Target:
    with ctx.catalog.read() as s:
        vm, point = usable_point(s, vm_name, rp_id)
        vault = repos.vault_by_id(s, point.vault_id)
        check_readable(vault)  # --from-secondary on an LRS vault: refused before any job or mountpoint
        return Target(vm.id, vm.name, point.id, vault, [str(d["name"]) for d in point.disks])


def reap(ctx: Context) -> list[str]:
    """End sessions whose owner died or that outlived their expiry, and clear their leftovers."""
    from vmvault.recovery.session import reap_sessions

    return reap_sessions(ctx)


# ---- views --------------------------------------------------------------------------------------


def session_view(row: FileRecoverySessionRow) -> JsonDict:
    return {
        "id": row.id,
        "vm": row.vm_name,
        "recoveryPoint": row.rp_id,
        "state": row.state,
        "mountpoint": row.mountpoint,
        "created": row.created,
        "expires": row.expires,
        "ended": row.ended,
        "endReason": row.end_reason,
        "volumes": [_volume_view(v) for v in row.volumes or []],
        "paths": [v["path"] for v in row.volumes or [] if v.get("status") == "mounted"],
        "export": {"unixSocket": (row.details or {}).get("socket"), "tlsAddress": row.tcp_address},
        "host": (row.details or {}).get("host"),
    }


def _volume_view(v: dict[str, Any]) -> JsonDict:
    return {
        "disk": v.get("disk"),
        "partition": v.get("partition"),
        "fileSystem": v.get("fstype") or None,
        "path": v.get("path") or None,
        "status": v.get("status"),
        "driver": v.get("driver") or None,
        "reason": v.get("reason") or None,
    }


def list_sessions(ctx: Context, vm_name: str | None = None, *, include_ended: bool = False) -> list[JsonDict]:
    """Sessions (live ones, or all with include_ended), newest first: mounts, paths and expiry."""
    reap(ctx)
    with ctx.catalog.read() as s:
        vm_id = repos.get_vm(s, vm_name).id if vm_name else None
        if include_ended:
            rows = list(repos.list_file_sessions(s, vm_id=vm_id))
        else:
            rows = list(reversed(repos.live_file_sessions(s, vm_id=vm_id)))
    return [session_view(r) for r in rows]


# ---- mount --------------------------------------------------------------------------------------


def default_mountpoint(ctx: Context, target: Target) -> Path:
    return ctx.settings.home / "mounts" / f"{target.vm_name}-{target.rp_id}"


def _live_for_point(ctx: Context, rp_id: str) -> FileRecoverySessionRow | None:
    with ctx.catalog.read() as s:
        rows = repos.live_file_sessions(s, rp_id=rp_id)
    return rows[0] if rows else None


def _live_here_for_point(ctx: Context, rp_id: str) -> FileRecoverySessionRow | None:
    """The point's live session this server serves (never one an agent serves on its host)."""
    from vmvault.service.hostfiles import host_of

    with ctx.catalog.read() as s:
        rows = [r for r in repos.live_file_sessions(s, rp_id=rp_id) if host_of(r) is None]
    return rows[0] if rows else None


def _check_mountpoint(ctx: Context, target: Target, wanted: Path | None) -> None:
    """Refuse a second mount point for a point; refuse a non-empty or non-directory path."""
    current = _live_for_point(ctx, target.rp_id)
    if current is not None and current.mountpoint and wanted is not None and Path(current.mountpoint) != wanted:
        raise AlreadyExists(
            f"recovery point '{target.rp_id}' is already mounted on {current.mountpoint} (session {current.id})",
            hint=f"use that mount point (mounting again there extends it), or unmount first: "
            f"vmvault files unmount {target.vm_name} --session {current.id}",
        )
    if wanted is None or (current is not None and current.mountpoint and Path(current.mountpoint) == wanted):
        return
    if wanted.exists() and not wanted.is_dir():
        raise InvalidInput(f"mount point {wanted} is not a directory", hint="give a directory to --mountpoint")
    if wanted.is_dir() and any(wanted.iterdir()):
        raise InvalidInput(f"mount point {wanted} is not empty", hint="give an empty or new directory to --mountpoint")


def mount_point(
    ctx: Context, vm_name: str, rp_id: str, *, mountpoint: str | Path | None = None, duration: str | None = None
) -> JobOutcome[JsonDict]:
    """Mount a recovery point's file systems read-only (a FileRecoveryMount job); result: the session."""
    from vmvault.recovery.session import parse_duration
    from vmvault.service.hostvms import host_elsewhere
    from vmvault.service.paths import Rule, allowed

    reap(ctx)
    host = host_elsewhere(ctx, vm_name)
    if host is not None:  # a VM of another host (vm add --host): its agent mounts it there
        from vmvault.service.hostfiles import queue_mount

        return queue_mount(ctx, vm_name, resolve_point(ctx, vm_name, rp_id), host,
                           str(mountpoint) if mountpoint else None, duration)  # fmt: skip
    target = _target(ctx, vm_name, resolve_point(ctx, vm_name, rp_id))
    span = parse_duration(duration)
    current = _live_for_point(ctx, target.rp_id)
    # API and portal callers: a mount point only inside the server's allowed restore folders.
    wanted = allowed(ctx, Rule.RESTORES, mountpoint) if mountpoint else None
    if wanted is None:
        wanted = Path(current.mountpoint) if current and current.mountpoint else default_mountpoint(ctx, target)
    _check_mountpoint(ctx, target, wanted)
    record = {"mode": "files", "recoveryPoint": target.rp_id, "mountpoint": str(wanted)}
    job = create_job(
        ctx, Operation.FILE_RECOVERY_MOUNT, vm=target.vm_name, vault=target.vault.name, details={"restore": record}
    )

    def work(_run: JobRun) -> JsonDict:
        return session_view(_mount(ctx, target, wanted, span))

    return run_job(ctx, job, work)


def _mount(ctx: Context, target: Target, mountpoint: Path, span: timedelta) -> FileRecoverySessionRow:
    from vmvault.recovery import session

    with session.files_lock(ctx.settings.home):
        _check_mountpoint(ctx, target, mountpoint)  # again, under the lock
        row = _live_for_point(ctx, target.rp_id)
        if row is None:
            row = _start(ctx, target, span)
        else:
            session.ensure_not_busy(row)
            _extend(ctx, row, span)
        if not row.mountpoint:
            row = _mount_volumes(ctx, row, mountpoint)
        found = session.get_row(ctx, row.id)
        assert found is not None
        return found


def _extend(ctx: Context, row: FileRecoverySessionRow, span: timedelta) -> None:
    from vmvault.recovery import session

    wanted = utc_now() + span
    if wanted > from_iso(row.expires):
        session.set_fields(ctx, row.id, expires=to_iso(wanted))


def _listen(ctx: Context) -> tuple[str, int]:
    host, _, port = ctx.settings.files_listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port or 0)
    except ValueError:
        raise InvalidInput(
            f"invalid VMVAULT_FILES_LISTEN '{ctx.settings.files_listen}'",
            hint="give HOST:PORT, e.g. 127.0.0.1:0 or 0.0.0.0:10809",
        ) from None


def _start(ctx: Context, target: Target, span: timedelta) -> FileRecoverySessionRow:
    """Insert the session, start its owner and wait until the export is up (under files_lock)."""
    from vmvault.recovery import session, tlscert

    sid = session.new_session_id()
    run_dir = session.run_root(ctx.settings.home) / sid
    run_dir.mkdir(mode=0o700, parents=True)
    host, port = _listen(ctx)
    from vmvault.service.hosts import local_host_name

    details = {
        "host": local_host_name(),  # where it is mounted (files list; an agent's sessions name their host)
        "socket": str(session.socket_path(run_dir, sid)),
        "listenHost": host,
        "vaultName": target.vault.name,
        "disks": target.disks,
    }
    ca = tlscert.make_credentials(session.Paths(run_dir).tls_dir, sid, [host], span + timedelta(days=7))
    row = FileRecoverySessionRow(
        id=sid,
        vm_id=target.vm_id,
        vm_name=target.vm_name,
        rp_id=target.rp_id,
        vault_id=target.vault.id,
        state=session.STARTING,
        mountpoint=None,
        created=now_iso(),
        expires=session.to_deadline(span),
        run_dir=str(run_dir),
        ca_cert=ca,
        volumes=[],
        details=details,
        owner_pid=0,
        owner_boot_id="",
    )
    with ctx.catalog.write() as s:
        repos.add_file_session(s, row)
    _write_server_config(ctx, row, target, (host, port))
    proc = session.spawn_owner(ctx, row)
    return session.wait_until_active(ctx, sid, proc)


def _write_server_config(ctx: Context, row: FileRecoverySessionRow, target: Target, listen: tuple[str, int]) -> None:
    import json

    from vmvault.recovery import session

    paths = session.Paths(Path(row.run_dir))
    from vmvault.service.vaultio import location_of

    storage, cache = location_of(target.vault)  # --from-secondary: the GRS secondary, its own caches
    config = {
        "home": str(ctx.settings.home),
        "storage_dir": storage,
        "cache_name": cache,
        "vault_uuid": target.vault.uuid,
        "rp_id": row.rp_id,
        "unix": row.details["socket"],
        "tcp_host": listen[0],
        "tcp_port": listen[1],
        "tls_dir": str(paths.tls_dir),
        "session": row.id,
        "ready": str(paths.ready),
        "pin_seconds": (session.MAX_DURATION + timedelta(hours=1)).total_seconds(),
    }
    paths.server_config.write_text(json.dumps(config, indent=1))


def _mount_volumes(ctx: Context, row: FileRecoverySessionRow, mountpoint: Path) -> FileRecoverySessionRow:
    import logging

    from vmvault.recovery import mount, session

    created = not mountpoint.exists()
    mountpoint.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(mountpoint, 0o700)  # a mounted volume's root keeps its own mode: this is what keeps others out
    details = {**row.details, "createdMountpoint": created}
    session.set_fields(ctx, row.id, mountpoint=str(mountpoint), details=details)
    paths = session.Paths(Path(row.run_dir))
    volumes: list[dict[str, Any]] = []
    log = logging.getLogger("vmvault.files").info
    for disk in row.details.get("disks") or []:
        found = mount.mount_disk(str(paths.fuse_file(disk)), disk, mountpoint, log)
        volumes += [v.to_dict() for v in found]
        session.set_fields(ctx, row.id, volumes=volumes)  # recorded as we go: a crash leaves a true list
    current = session.get_row(ctx, row.id)
    assert current is not None
    return current


# ---- unmount ------------------------------------------------------------------------------------


def unmount(ctx: Context, vm_name: str, *, session_id: str | None = None) -> JobOutcome[list[JsonDict]]:
    """End a VM's live sessions, or one (a FileRecoveryUnmount job); result: the ended sessions."""
    from vmvault.recovery import session
    from vmvault.service.hostvms import host_elsewhere

    reap(ctx)
    host = host_elsewhere(ctx, vm_name)
    if host is not None and not _served_here(ctx, vm_name, session_id):  # on its host: its agent unmounts them
        from vmvault.service.hostfiles import queue_unmount

        return queue_unmount(ctx, vm_name, host, session_id)
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        rows = [r for r in repos.live_file_sessions(s, vm_id=vm.id) if not (r.details or {}).get("agentHost")]
        if session_id is not None:
            rows = [r for r in rows if r.id == session_id]
            if not rows:
                raise NotFound(
                    f"no live file-recovery session '{session_id}' for VM '{vm_name}'",
                    hint=f"list them with: vmvault files list {vm_name}",
                )
        vaults = {r.vault_id: repos.vault_by_id(s, r.vault_id).name for r in rows}
    if not rows:
        raise NotFound(f"VM '{vm_name}' has no mounted recovery point", hint="see: vmvault files list")
    job = create_job(ctx, Operation.FILE_RECOVERY_UNMOUNT, vm=vm_name, vault=", ".join(sorted(set(vaults.values()))))

    def work(_run: JobRun) -> list[JsonDict]:
        ended = []
        for row in rows:
            session.stop_session(ctx, row)
            current = session.get_row(ctx, row.id)
            ended.append(session_view(current or row))
        return ended

    return run_job(ctx, job, work)


def _served_here(ctx: Context, vm_name: str, session_id: str | None) -> bool:
    """A VM of another host has sessions this server serves (its recovery scripts'): the session
    named, or without one any such session; those end here, the rest on its host."""
    from vmvault.service.hostfiles import host_of

    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        here = [r.id for r in repos.live_file_sessions(s, vm_id=vm.id) if host_of(r) is None]
    return session_id in here if session_id is not None else bool(here)


# ---- recovery script ----------------------------------------------------------------------------


def make_script(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    *,
    out: str | Path | None = None,
    duration: str | None = None,
    address: str | None = None,
) -> JsonDict:
    """Write the recovery script for another machine; returns its path and a password shown once.

    The point is served (a session is started if none runs: a FileRecoveryMount job) for at least
    the password's lifetime; the password is stored only as a hash. This server serves it from the
    vault, also for a VM of another host (vm add --host): the script reads the point, never the
    VM's host, so that host's agent takes no part.
    """
    from vmvault.recovery import script, secrets, session

    reap(ctx)
    target = _target(ctx, vm_name, rp_id)
    span = session.parse_duration(duration)
    path = absolute(out) if out else Path.cwd() / f"{target.vm_name}-{target.rp_id}-recover.sh"
    if path.is_dir():
        path = path / f"{target.vm_name}-{target.rp_id}-recover.sh"
    row = _serving(ctx, target, span)
    password = secrets.new_password()
    expires = to_iso(utc_now() + span)
    with ctx.catalog.write() as s:
        repos.add_file_secret(s, row.id, secrets.hash_password(password), expires)
    host = address or _published_host(ctx)
    port = int(str(row.tcp_address).rsplit(":")[-1])
    text = script.render(
        session_id=row.id,
        vm=target.vm_name,
        rp=target.rp_id,
        host=host,
        port=port,
        ca_pem=row.ca_cert or "",
        disks=list(row.details.get("disks") or []),
        expires=expires,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return {
        "script": str(path),
        "password": password,
        "expires": expires,
        "session": row.id,
        "address": f"{host}:{port}",
    }


def _serving(ctx: Context, target: Target, span: timedelta) -> FileRecoverySessionRow:
    """The live session of the point, extended to cover span; started (as a job) if there is none."""
    from vmvault.recovery import session

    with session.files_lock(ctx.settings.home):
        row = _live_here_for_point(ctx, target.rp_id)
        if row is not None:
            session.ensure_not_busy(row)
            _extend(ctx, row, span)
            found = session.get_row(ctx, row.id)
            assert found is not None
            return found
        record = {"mode": "files", "recoveryPoint": target.rp_id}
        job = create_job(
            ctx, Operation.FILE_RECOVERY_MOUNT, vm=target.vm_name, vault=target.vault.name, details={"restore": record}
        )
        outcome = run_job(ctx, job, lambda _run: session_view(_start(ctx, target, span)))
        if outcome.error is not None:
            raise outcome.error
        started = _live_for_point(ctx, target.rp_id)
        assert started is not None
        return started


def _published_host(ctx: Context) -> str:
    host, _port = _listen(ctx)
    if host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return host


# ---- browse and download -------------------------------------------------------------------------


def _volume_root(
    ctx: Context, vm_name: str, parts: list[str], rp_id: str | None, session_id: str | None
) -> tuple[FileRecoverySessionRow, Path | None]:
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        rows = [r for r in repos.live_file_sessions(s, vm_id=vm.id) if r.mountpoint]
    if session_id is not None:
        rows = [r for r in rows if r.id == session_id]
    if rp_id is not None:
        rows = [r for r in rows if r.rp_id == rp_id]
    if not rows:
        raise NotFound(
            f"VM '{vm_name}' has no mounted recovery point"
            f"{' matching the given --rp/--session' if rp_id or session_id else ''}",
            hint=f"mount one first: vmvault files mount {vm_name} --rp ID",
        )
    if len(rows) > 1:
        raise InvalidInput(
            f"VM '{vm_name}' has {len(rows)} mounted recovery points", hint="choose one with --rp ID or --session ID"
        )
    row = rows[0]
    if (row.details or {}).get("agentHost"):
        from vmvault.service.hostfiles import remote_session_error

        raise remote_session_error(row, vm_name)
    if not parts:
        return row, None
    for volume in row.volumes or []:
        if volume.get("status") == "mounted" and Path(volume["path"]).name == parts[0]:
            return row, Path(volume["path"])
    names = [Path(v["path"]).name for v in row.volumes or [] if v.get("status") == "mounted"]
    raise NotFound(f"no mounted volume '{parts[0]}' in session {row.id}", hint=f"volumes: {', '.join(names)}")


def browse(
    ctx: Context, vm_name: str, path: str = "", *, rp_id: str | None = None, session_id: str | None = None
) -> list[JsonDict]:
    """The entries of a directory: `VOLUME/dir/...`; the empty path lists the mounted volumes."""
    from vmvault.recovery import browse as fs

    reap(ctx)
    parts = fs.split_path(path)
    row, root = _volume_root(ctx, vm_name, parts, rp_id, session_id)
    if root is None:
        return [
            {"name": Path(v["path"]).name, "type": "volume", "fileSystem": v.get("fstype"), "size": v.get("size")}
            for v in row.volumes or []
            if v.get("status") == "mounted"
        ]
    return [e.to_dict() for e in fs.list_dir(root, parts[1:])]


def download(
    ctx: Context, vm_name: str, path: str, *, rp_id: str | None = None, session_id: str | None = None
) -> tuple[int, Iterator[bytes]]:
    """(size, blocks) of one regular file `VOLUME/dir/file` of a mounted point."""
    from vmvault.recovery import browse as fs

    reap(ctx)
    parts = fs.split_path(path)
    _row, root = _volume_root(ctx, vm_name, parts, rp_id, session_id)
    if root is None:
        raise InvalidInput(
            "give the path of a file: VOLUME/dir/file", hint=f"list volumes: vmvault files browse --vm {vm_name}"
        )
    fd, size = fs.open_file(root, parts[1:])
    return size, fs.read_chunks(fd)
