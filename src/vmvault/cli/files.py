"""`vmvault files ...`: file recovery (mount a recovery point read-only, browse, script, unmount)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.app import FromSecondaryOption, VmArgument, VmOption, _end_job, _from_secondary, _vm_name, app
from vmvault.cli.state import STATE, service_context
from vmvault.errors import InvalidInput

files_app = typer.Typer(
    help="Mount a recovery point's disks read-only, browse and copy files, unmount.", no_args_is_help=True
)
app.add_typer(files_app, name="files")

SESSION_COLUMNS = ("id", "vm", "recoveryPoint", "state", "host", "mountpoint", "expires", "paths")
RpOption = Annotated[
    str, typer.Option("--rp", help="Recovery point id (see: vmvault recoverypoint list VM), or latest.")
]
DurationOption = Annotated[
    str | None, typer.Option("--duration", help="How long it stays, e.g. 30s, 15m, 12h (default 12h, at most 7d).")
]


@files_app.command("mount")
def files_mount(
    rp: RpOption,
    vm: VmArgument = None,
    vm_option: VmOption = None,
    mountpoint: Annotated[
        Path | None,
        typer.Option("--mountpoint", help="Directory (default $VMVAULT_HOME/mounts/<vm>-<rp>); for a VM of "
                     "another host, a directory there (inside its agent's --allow-restores folders)."),
    ] = None,
    duration: DurationOption = None,
    from_secondary: FromSecondaryOption = False,
) -> None:
    """Mount a recovery point's file systems read-only; returns once mounted, printing the paths.

    Mounting the same point again extends its session. Everything unmounts at expiry, whether or
    not any vmvault command runs then.
    """
    from vmvault.cli import remote
    from vmvault.service import files

    name = _vm_name(vm, vm_option, "files mount")
    remote.refuse_option("--from-secondary", from_secondary)
    _from_secondary(from_secondary)
    if remote.active():
        outcome, session = _remote_mount(name, rp, duration, remote.server_path(mountpoint, "--mountpoint"))
    else:
        with service_context() as ctx:
            outcome = _followed(ctx, files.mount_point(ctx, name, rp, mountpoint=mountpoint, duration=duration))
        session = outcome.result
    if session is None:
        _end_job(outcome)
        return
    if STATE.structured:
        output.print_json(session)
    else:
        _print_session(session)


def _followed(ctx: Any, outcome: Any) -> Any:
    """A VM of another host: the job was queued for its agent; follow it to its end here."""
    from vmvault.cli.progress import run_cancellable
    from vmvault.service import hostfiles

    if outcome.job["status"] != "InProgress" or outcome.result is not None:
        return outcome
    queued = str(outcome.job["id"])
    output.info(f"queued to the agent of host {hostfiles.job_host(ctx, queued)} as job {queued}")
    return run_cancellable(lambda cancel: hostfiles.follow(ctx, queued, cancel))


def _remote_mount(
    name: str, rp: str, duration: str | None, mountpoint: str | None
) -> tuple[Any, dict[str, Any] | None]:
    """files mount --server: the FileRecoveryMount job, then the point's live session."""
    from vmvault.cli import remote

    body = {"rp": rp, "duration": duration, "mountpoint": mountpoint}
    outcome = remote.run_job(f"/items/{remote.q(name)}/files/mount", body)
    if outcome.failed:
        return outcome, None
    sessions = remote.get_list(f"/items/{remote.q(name)}/files/sessions")
    live = [s for s in sessions if s["recoveryPoint"] == rp]
    return outcome, (live[-1] if live else None)


def _remote_unmount(name: str, session: str | None) -> tuple[Any, list[dict[str, Any]] | None]:
    """files unmount --server: the FileRecoveryUnmount job, then the sessions it ended."""
    from vmvault.cli import remote

    path = f"/items/{remote.q(name)}/files/sessions"
    live = {s["id"] for s in remote.get_list(path) if session is None or s["id"] == session}
    outcome = remote.run_job(f"/items/{remote.q(name)}/files/unmount", {"sessionId": session})
    if outcome.failed:
        return outcome, None
    return outcome, [s for s in remote.get_list(path, includeEnded=True) if s["id"] in live]


def _remote_script(name: str, rp: str, file: Path | None, duration: str | None, address: str | None) -> dict[str, Any]:
    """files script --server: the server makes it (its password, once); written here, where it was asked for."""
    from vmvault.cli import remote

    made = remote.post(f"/items/{remote.q(name)}/files/script", {"rp": rp, "duration": duration, "address": address})
    path = (file or Path.cwd()).absolute()
    if file is None or path.is_dir():
        path = path / made["script"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(made.pop("content"))
    tmp.chmod(0o700)
    tmp.replace(path)
    return {**made, "script": str(path)}


def _print_session(session: dict[str, Any]) -> None:
    sys.stdout.write(
        f"session {session['id']}: recovery point {session['recoveryPoint']} of {session['vm']}, "
        f"until {session['expires']}\n"
    )
    for volume in session.get("volumes") or []:
        where = volume.get("path") or f"not mounted: {volume.get('reason')}"
        fs = volume.get("fileSystem") or "?"
        sys.stdout.write(f"  {volume['disk']} partition {volume['partition']} ({fs}): {where}\n")


@files_app.command("list")
def files_list(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    all_sessions: Annotated[bool, typer.Option("--all", help="Include ended sessions.")] = False,
) -> None:
    """List file-recovery sessions: mounts, paths and expiry."""
    from vmvault.cli import remote
    from vmvault.service import files

    name = vm or vm_option
    if remote.active():
        if name is None:
            raise InvalidInput("files list --server needs the VM", hint="vmvault files list VM --server URL")
        output.print_list(remote.get_list(f"/items/{remote.q(name)}/files/sessions", includeEnded=all_sessions),
                          SESSION_COLUMNS)  # fmt: skip
        return
    with service_context() as ctx:
        output.print_list(files.list_sessions(ctx, name, include_ended=all_sessions), SESSION_COLUMNS)


@files_app.command("unmount")
def files_unmount(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    session: Annotated[str | None, typer.Option("--session", help="Only this session.")] = None,
) -> None:
    """Unmount a VM's recovery points (or one session) and close their exports."""
    from vmvault.cli import remote
    from vmvault.service import files

    name = _vm_name(vm, vm_option, "files unmount")
    if remote.active():
        outcome, ended = _remote_unmount(name, session)
    else:
        with service_context() as ctx:
            outcome = _followed(ctx, files.unmount(ctx, name, session_id=session))
        ended = outcome.result
    if outcome.failed or ended is None:
        _end_job(outcome)
        return
    output.print_list(ended, SESSION_COLUMNS)


@files_app.command("script")
def files_script(
    rp: RpOption,
    vm: VmArgument = None,
    vm_option: VmOption = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Where to write it (default ./<vm>-<rp>-recover.sh).")
    ] = None,
    duration: DurationOption = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Host name or IP the other machine reaches this host by.")
    ] = None,
) -> None:
    """Write a script that mounts the recovery point on another machine; prints its password once."""
    from vmvault.cli import remote
    from vmvault.service import files

    name = _vm_name(vm, vm_option, "files script")
    if remote.active():
        result = _remote_script(name, rp, file, duration, address)
    else:
        with service_context() as ctx:
            result = files.make_script(ctx, name, rp, out=file, duration=duration, address=address)
    if STATE.structured:
        output.print_json(result)
        return
    sys.stdout.write(
        f"script:   {result['script']}\npassword: {result['password']}\n"
        f"valid until {result['expires']} (export {result['address']})\n"
    )
    output.info("the password is shown only now; run the script as root on the machine that needs the files")


@files_app.command("browse")
def files_browse(
    first: Annotated[str, typer.Argument(help="VM name (or, with --vm, the path).", metavar="VM")] = "",
    path: Annotated[str, typer.Argument(help="VOLUME/dir (empty: the mounted volumes).", metavar="[PATH]")] = "",
    vm: Annotated[str | None, typer.Option("--vm", help="VM name (the older form: files browse PATH --vm VM).")] = None,
    rp: Annotated[str | None, typer.Option("--rp", help="The mounted recovery point (when several are).")] = None,
    session: Annotated[str | None, typer.Option("--session", help="The session (when several are mounted).")] = None,
) -> None:
    """List a directory of a mounted recovery point: files browse VM [PATH] (links shown, never followed)."""
    from vmvault.cli import remote
    from vmvault.service import files

    name, path = _browse_args(first, path, vm)
    if remote.active():
        entries = remote.get_list(f"/items/{remote.q(name)}/files/browse", path=path, rp=rp, sessionId=session)
        output.print_list(entries, ("name", "type", "size", "target"))
        return
    with service_context() as ctx:
        output.print_list(
            files.browse(ctx, name, path, rp_id=rp, session_id=session), ("name", "type", "size", "target")
        )


def _browse_args(first: str, second: str, vm: str | None) -> tuple[str, str]:
    """(VM, PATH) from `files browse VM [PATH]`, or the older `files browse [PATH] --vm VM`."""
    if vm is None:
        return _vm_name(first or None, None, "files browse"), second
    if second:  # files browse VM PATH --vm VM: the same VM twice is fine
        return _vm_name(first or None, vm, "files browse"), second
    return vm, first


@files_app.command("download")
def files_download(
    path: Annotated[str, typer.Argument(help="VOLUME/dir/file.")],
    to: Annotated[Path, typer.Option("--to", help="File to write (- for standard output).")],
    vm: Annotated[str | None, typer.Option("--vm", help="VM name.")] = None,
    rp: Annotated[str | None, typer.Option("--rp", help="The mounted recovery point (when several are).")] = None,
    session: Annotated[str | None, typer.Option("--session", help="The session (when several are mounted).")] = None,
) -> None:
    """Copy one file out of a mounted recovery point."""
    from vmvault.cli import remote
    from vmvault.service import files

    name = _vm_name(None, vm, "files download")
    if remote.active():
        where = f"/items/{remote.q(name)}/files/download"
        if str(to) == "-":
            remote.download(where, sys.stdout.buffer, path=path, rp=rp, sessionId=session)
            return
        with open(to, "wb") as f:
            size = remote.download(where, f, path=path, rp=rp, sessionId=session)
        output.info(f"wrote {size} bytes to {to}")
        return
    with service_context() as ctx:
        size, blocks = files.download(ctx, name, path, rp_id=rp, session_id=session)
        if str(to) == "-":
            for block in blocks:
                sys.stdout.buffer.write(block)
            return
        with open(to, "wb") as f:
            for block in blocks:
                f.write(block)
    output.info(f"wrote {size} bytes to {to}")
