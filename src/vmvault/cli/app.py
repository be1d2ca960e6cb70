"""The vmvault command tree (shaped like `az backup`). Service modules are imported inside commands."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.state import STATE, service_context
from vmvault.errors import InvalidInput

app = typer.Typer(
    name="vmvault",
    help="Self-hosted backup and recovery for KVM/QEMU virtual machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
vault_app = typer.Typer(help="Create, list, verify and import vaults.", no_args_is_help=True)
vm_app = typer.Typer(help="Add and inspect the VMs vmvault knows.", no_args_is_help=True)
protection_app = typer.Typer(help="Choose the vault that protects a VM.", no_args_is_help=True)
backup_app = typer.Typer(help="Back VMs up.", no_args_is_help=True)
job_app = typer.Typer(help="Follow backup, restore and verify jobs.", no_args_is_help=True)
rp_app = typer.Typer(help="List recovery points.", no_args_is_help=True)
restore_app = typer.Typer(help="Restore from recovery points.", no_args_is_help=True)
for sub, name in (
    (vault_app, "vault"), (vm_app, "vm"), (protection_app, "protection"), (backup_app, "backup"),
    (job_app, "job"), (rp_app, "recoverypoint"), (restore_app, "restore"),
):  # fmt: skip
    app.add_typer(sub, name=name)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


class Redundancy(StrEnum):
    LRS = "LRS"
    GRS = "GRS"


class DiskFormat(StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"vmvault {version('vmvault')}")
        except PackageNotFoundError:
            typer.echo("vmvault (not installed)")
        raise typer.Exit(0)


@app.callback()
def root(
    output_format: Annotated[
        OutputFormat, typer.Option("-o", "--output", help="Output format (anywhere on the line).")
    ] = OutputFormat.table,
    home: Annotated[
        str | None, typer.Option("--home", help="vmvault home (default $VMVAULT_HOME; anywhere on the line).")
    ] = None,
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Global options are taken out of the command line before parsing (see vmvault.cli.state)."""


# ---- helpers ------------------------------------------------------------------------------------

VmArgument = Annotated[str | None, typer.Argument(help="VM name (or --vm NAME).", metavar="VM", show_default=False)]
VmOption = Annotated[str | None, typer.Option("--vm", help="VM name, instead of the VM argument.", show_default=False)]


def _vm_name(argument: str | None, option: str | None, command: str) -> str:
    """The VM given positionally or with --vm (az style); exactly one name."""
    if argument and option and argument != option:
        raise InvalidInput(f"two VM names given: '{argument}' and --vm '{option}'", hint="give the VM name once")
    name = argument or option
    if not name:
        raise InvalidInput("no VM given", hint=f"name it: vmvault {command} VM (or --vm VM)")
    return name


def _passphrase(passphrase_file: Path | None) -> str | None:
    if passphrase_file is None:
        return None
    from vmvault.service.validate import read_passphrase_file

    return read_passphrase_file(passphrase_file)


def _end_job(outcome: Any, notes: list[str] | None = None) -> None:
    """Print the job (then notes on stderr); a Failed/Cancelled job prints its error and exits with its code."""
    from vmvault.cli.errors import exit_code_for

    output.print_object(outcome.job)
    for note in notes or []:
        output.info(note)
    if outcome.failed:
        error = outcome.job.get("error") or {"code": "internal_error", "message": "the job failed"}
        output.print_error_dict(error)
        raise typer.Exit(exit_code_for(error.get("code")))


# ---- vault --------------------------------------------------------------------------------------


@vault_app.command("create")
def vault_create(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    storage: Annotated[
        Path | None, typer.Option(help="Directory of the vault (default $VMVAULT_HOME/vaults/NAME).")
    ] = None,
    redundancy: Annotated[Redundancy, typer.Option(case_sensitive=False, help="LRS (GRS: not yet).")] = Redundancy.LRS,
    passphrase_file: Annotated[Path | None, typer.Option(help="File holding the passphrase.")] = None,
) -> None:
    """Create a vault (passphrase from VMVAULT_PASSPHRASE or --passphrase-file, 8+ characters)."""
    from vmvault.service import vaults

    secret = _passphrase(passphrase_file)
    with service_context() as ctx:
        output.print_object(
            vaults.create_vault(ctx, name, storage_dir=storage, redundancy=redundancy.value, passphrase=secret)
        )


@vault_app.command("list")
def vault_list() -> None:
    """List vaults."""
    from vmvault.service import vaults

    with service_context() as ctx:
        output.print_list(vaults.list_vaults(ctx), output.VAULT_COLUMNS)


@vault_app.command("show")
def vault_show(name: Annotated[str, typer.Argument(help="Vault name.")]) -> None:
    """Show a vault."""
    from vmvault.service import vaults

    with service_context() as ctx:
        output.print_object(vaults.show_vault(ctx, name))


@vault_app.command("verify")
def vault_verify(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    rp: Annotated[str | None, typer.Option("--rp", help="Verify only this recovery point.")] = None,
) -> None:
    """Check every object of a vault (or one recovery point); exits non-zero when problems are found."""
    from vmvault.cli.errors import exit_code_for
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import vaults

    with service_context() as ctx, progress_display(f"verify {name}") as show:
        outcome = run_cancellable(
            lambda cancel: vaults.verify_vault(ctx, name, rp_id=rp, on_progress=show, cancel=cancel)
        )
    report = outcome.result
    if report is None:
        output.print_object(outcome.job)
    else:
        output.print_object(report if STATE.json else {**report, "problems": len(report["problems"])})
    if outcome.failed:
        for problem in (report or {}).get("problems", []):
            output.info(f"problem: {problem}")
        error = outcome.job["error"] or {}
        output.print_error_dict(error)
        raise typer.Exit(exit_code_for(error.get("code")))


@vault_app.command("import")
def vault_import(
    directory: Annotated[Path, typer.Argument(help="Directory holding the vault.", metavar="DIR")],
    name: Annotated[str | None, typer.Option(help="Name to register it under (default: the directory's name).")] = None,
    passphrase_file: Annotated[Path | None, typer.Option(help="File holding the passphrase.")] = None,
) -> None:
    """Register an existing vault and rebuild its VMs and recovery points from its manifests."""
    from vmvault.service import vaults

    secret = _passphrase(passphrase_file)
    with service_context() as ctx:
        output.print_object(vaults.import_vault(ctx, directory, name=name, passphrase=secret))


# ---- vm -----------------------------------------------------------------------------------------


@vm_app.command("add")
def vm_add(
    name: Annotated[str, typer.Argument(help="VM name.")],
    disk: Annotated[list[Path], typer.Option("--disk", help="Disk image (repeat, in order: disk0, disk1, ...).")],
) -> None:
    """Add a VM given by its disk images (raw or qcow2)."""
    from vmvault.service import vms

    with service_context() as ctx:
        output.print_object(vms.add_vm(ctx, name, list(disk)))


@vm_app.command("list")
def vm_list() -> None:
    """List VMs."""
    from vmvault.service import vms

    with service_context() as ctx:
        output.print_list(vms.list_vms(ctx), output.VM_COLUMNS)


@vm_app.command("show")
def vm_show(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Show a VM, its disks and its protection."""
    from vmvault.service import vms

    with service_context() as ctx:
        output.print_object(vms.show_vm(ctx, name))


# ---- protection ---------------------------------------------------------------------------------


@protection_app.command("enable")
def protection_enable(
    vault: Annotated[str, typer.Option("--vault", help="Vault that will hold its backups.")],
    vm: VmArgument = None,
    vm_option: VmOption = None,
) -> None:
    """Protect a VM with a vault (a ConfigureBackup job)."""
    from vmvault.service import protection

    name = _vm_name(vm, vm_option, "protection enable")
    with service_context() as ctx:
        output.print_object(protection.enable_protection(ctx, name, vault))


# ---- backup -------------------------------------------------------------------------------------


@backup_app.command("now")
def backup_now(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    retain_until: Annotated[
        str | None, typer.Option(help="Keep the point until this date, YYYY-MM-DD (default: 30 days).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job (always: it runs in this process).")] = False,
) -> None:
    """Back a protected VM up now; prints the job and exits non-zero if it failed."""
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import backups

    name = _vm_name(vm, vm_option, "backup now")
    with service_context() as ctx, progress_display(f"backup {name}") as show:
        outcome = run_cancellable(
            lambda cancel: backups.backup_now(ctx, name, retain_until=retain_until, on_progress=show, cancel=cancel)
        )
    manifest = outcome.result
    _end_job(outcome, [f"recovery point {manifest.rp_id} at {manifest.time}"] if manifest is not None else [])


# ---- job ----------------------------------------------------------------------------------------


@job_app.command("list")
def job_list(
    vm: Annotated[str | None, typer.Option(help="Only jobs of this VM.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs with this status (e.g. InProgress).")] = None,
    operation: Annotated[str | None, typer.Option(help="Only this operation (e.g. Backup).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first (0: all).")] = 0,
) -> None:
    """List jobs, newest first."""
    from vmvault.service import jobs

    with service_context() as ctx:
        rows = jobs.list_jobs(ctx, vm=vm, status=status, operation=operation, limit=limit)
        output.print_list(rows, output.JOB_COLUMNS)


@job_app.command("show")
def job_show(
    job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix of 8+ characters).", metavar="ID")],
) -> None:
    """Show a job."""
    from vmvault.service import jobs

    with service_context() as ctx:
        output.print_object(jobs.show_job(ctx, job_id))


# ---- recoverypoint ------------------------------------------------------------------------------


@rp_app.command("list")
def recoverypoint_list(vm: VmArgument = None, vm_option: VmOption = None) -> None:
    """List a VM's recovery points, oldest first."""
    from vmvault.service import backups

    name = _vm_name(vm, vm_option, "recoverypoint list")
    with service_context() as ctx:
        output.print_list(backups.list_recovery_points(ctx, name), output.RP_COLUMNS)


# ---- restore ------------------------------------------------------------------------------------


@restore_app.command("disks")
def restore_disks(
    rp: Annotated[str, typer.Option("--rp", help="Recovery point id (see: vmvault recoverypoint list VM).")],
    target_dir: Annotated[Path, typer.Option(help="Directory to write <disk>.raw|.qcow2 into.")],
    disk_format: Annotated[
        DiskFormat | None, typer.Option("--format", case_sensitive=False, help="raw or qcow2 (default: as backed up).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files already in the target directory.")] = False,
    vm: VmArgument = None,
    vm_option: VmOption = None,
) -> None:
    """Restore a recovery point's disks as image files (a Restore job)."""
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import restores

    name = _vm_name(vm, vm_option, "restore disks")
    fmt = disk_format.value if disk_format else None
    with service_context() as ctx, progress_display(f"restore {name}") as show:
        outcome = run_cancellable(
            lambda cancel: restores.restore_disks(
                ctx, name, rp, target_dir, fmt=fmt, force=force, on_progress=show, cancel=cancel
            )
        )
    _end_job(outcome, [f"restored {path}" for path in outcome.result or []])
