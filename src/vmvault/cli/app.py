"""The vmvault command tree (shaped like `az backup`). Service modules are imported inside commands."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.state import STATE, service_context
from vmvault.errors import InvalidInput
from vmvault.service import azure_shape as shape

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
    tsv = "tsv"
    csv = "csv"


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
    query: Annotated[
        str | None, typer.Option("--query", help="JMESPath query applied to the JSON, as az (anywhere on the line).")
    ] = None,
    home: Annotated[
        str | None, typer.Option("--home", help="vmvault home (default $VMVAULT_HOME; anywhere on the line).")
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            "--catalog",
            help="PostgreSQL catalog URL, no password (default $VMVAULT_CATALOG, else SQLite in the home).",
        ),
    ] = None,
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Global options are taken out of the command line before parsing (see vmvault.cli.state)."""


# ---- helpers ------------------------------------------------------------------------------------

VmArgument = Annotated[str | None, typer.Argument(help="VM name (or --vm NAME).", metavar="VM", show_default=False)]
VmOption = Annotated[
    str | None,
    typer.Option(
        "--vm", "--item-name", "--container-name",
        help="VM name, instead of the VM argument (--item-name, --container-name: as az backup).", show_default=False,
    ),
]  # fmt: skip


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

    job = shape.job(outcome.job)
    output.print_object(job)
    for note in notes or []:
        output.info(note)
    if outcome.failed:
        error = shape.error_of(job) or {"code": "internal_error", "message": "the job failed"}
        output.print_error_dict(error)
        raise typer.Exit(exit_code_for(error.get("code")))


VaultFilter = Annotated[
    str | None,
    typer.Option("--vault", "--vault-name", help="The vault it is in (as az backup; a check, not needed).",
                 show_default=False),
]  # fmt: skip


def in_vault(rows: list[dict[str, Any]], vault: str | None, what: str) -> list[dict[str, Any]]:
    """The resources of `vault` (all without it); none there is a NotFound naming the vault, as in Azure."""
    if vault is None or not rows:
        return rows
    from vmvault.errors import NotFound

    kept = [r for r in rows if f"/vaults/{vault}/" in r["id"]]
    if not kept:
        raise NotFound(f"{what} has nothing in vault '{vault}'", hint="leave --vault-name out, or name its vault")
    return kept


# ---- vault --------------------------------------------------------------------------------------


@vault_app.command("create")
def vault_create(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    storage: Annotated[
        str | None,
        typer.Option(
            help="Where the vault lives: a directory (default $VMVAULT_HOME/vaults/NAME), "
            "azure://ACCOUNT/CONTAINER[/PREFIX] (connection string in VMVAULT_AZURE_<ACCOUNT>) or "
            "s3://BUCKET[/PREFIX] (the standard AWS variables).",
        ),
    ] = None,
    redundancy: Annotated[
        Redundancy | None,
        typer.Option(
            case_sensitive=False,
            help="LRS, or GRS (replicated to --secondary). "
            "Default: GRS when VMVAULT_DEFAULT_SECONDARY is set, else LRS.",
        ),
    ] = None,
    secondary: Annotated[
        str | None,
        typer.Option(help="GRS: the secondary location (a directory, azure:// or s3:// URL), empty or new."),
    ] = None,
    passphrase_file: Annotated[Path | None, typer.Option(help="File holding the passphrase.")] = None,
    timezone: Annotated[
        str,
        typer.Option(
            "--timezone",
            help="Time zone of the vault's DefaultPolicy: IANA (Europe/Berlin) or Windows (W. Europe Standard Time).",
        ),
    ] = "UTC",
) -> None:
    """Create a vault (passphrase from VMVAULT_PASSPHRASE or --passphrase-file, 12+ characters)."""
    from vmvault.cli import remote
    from vmvault.service import vaults

    secret = _passphrase(passphrase_file)
    if remote.active():
        body = {"name": name, "storageDir": remote.storage_location(storage, "--storage"),
                "redundancy": redundancy.value if redundancy else None, "passphrase": secret, "timeZone": timezone,
                "secondaryStorage": remote.storage_location(secondary, "--secondary")}  # fmt: skip
        output.print_object(shape.vault(remote.post("/vaults", body)))
        return
    with service_context() as ctx:
        made = vaults.create_vault(
            ctx, name, storage_dir=storage, redundancy=redundancy.value if redundancy else None, passphrase=secret,
            time_zone=timezone,
            secondary=secondary,
        )
    output.print_object(shape.vault(made))


@vault_app.command("delete")
def vault_delete(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    keep_storage: Annotated[
        bool, typer.Option("--keep-storage", help="Only unregister it; leave its directory as it is.")
    ] = False,
) -> None:
    """Delete an empty vault (refused while it has protected or soft-deleted items, or recovery points)."""
    from vmvault.cli import remote
    from vmvault.service import vaults

    if remote.active():
        output.print_object(shape.vault(remote.delete(f"/vaults/{remote.q(name)}", keepStorage=keep_storage)))
        return
    with service_context() as ctx:
        output.print_object(shape.vault(vaults.delete_vault(ctx, name, keep_storage=keep_storage)))


@vault_app.command("list")
def vault_list() -> None:
    """List vaults."""
    from vmvault.cli import remote
    from vmvault.service import vaults

    if remote.active():
        output.print_list(remote.get_list("/vaults"), output.VAULT_COLUMNS)
        return

    with service_context() as ctx:
        output.print_list(shape.vaults(vaults.list_vaults(ctx)), output.VAULT_COLUMNS)


@vault_app.command("show")
def vault_show(name: Annotated[str, typer.Argument(help="Vault name.")]) -> None:
    """Show a vault."""
    from vmvault.cli import remote
    from vmvault.service import vaults

    if remote.active():
        output.print_object(remote.get(f"/vaults/{remote.q(name)}"))
        return

    with service_context() as ctx:
        output.print_object(shape.vault(vaults.show_vault(ctx, name)))


@vault_app.command("replicate")
def vault_replicate(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    wait: Annotated[bool, typer.Option("--wait", help="Return when the secondary has every published point.")] = False,
) -> None:
    """GRS: copy what the secondary lacks now, in this process; prints the replication state."""
    from vmvault.cli import remote
    from vmvault.service import replication

    remote.refuse_option("vault replicate", True)
    with service_context() as ctx:
        output.print_object(replication.replicate(ctx, name, wait=wait))


@vault_app.command("verify")
def vault_verify(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    rp: Annotated[str | None, typer.Option("--rp", help="Verify only this recovery point.")] = None,
    secondary: Annotated[bool, typer.Option("--secondary", help="GRS: verify the secondary copy instead.")] = False,
) -> None:
    """Check every object of a vault (or one recovery point); exits non-zero when problems are found."""
    from vmvault.cli import remote
    from vmvault.cli.errors import exit_code_for
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import vaults

    remote.refuse_option("--secondary", secondary)
    if remote.active():  # the server keeps the report: print the Verify job
        _end_job(remote.run_job(f"/vaults/{remote.q(name)}/verify", {"rp": rp}))
        return
    _from_secondary(secondary)
    with service_context() as ctx, progress_display(f"verify {name}") as show:
        outcome = run_cancellable(
            lambda cancel: vaults.verify_vault(ctx, name, rp_id=rp, on_progress=show, cancel=cancel)
        )
    report = outcome.result
    if report is None:
        output.print_object(shape.job(outcome.job))
    else:
        output.print_object(
            report
            if STATE.structured
            else {**report, "problems": len(report["problems"]), "notes": len(report.get("notes", []))}
        )
        for note in report.get("notes", []):
            output.info(f"note: {note}")
    if outcome.failed:
        for problem in (report or {}).get("problems", []):
            output.info(f"problem: {problem}")
        error = shape.error_of(shape.job(outcome.job)) or {}
        output.print_error_dict(error)
        raise typer.Exit(exit_code_for(error.get("code")))


@vault_app.command("repair")
def vault_repair(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    apply: Annotated[bool, typer.Option("--apply", help="Change the vault (default: say what would change).")] = False,
) -> None:
    """Rebuild lost or damaged pack index files from the packs, drop those of gone packs; list damaged points."""
    from vmvault.cli import remote
    from vmvault.errors import IntegrityError, InvalidInput
    from vmvault.service.repair import repair_vault

    if remote.active():
        raise InvalidInput(
            "vault repair works on the vault's files directly", hint="run it on the host that holds the vault"
        )
    with service_context() as ctx:
        report = repair_vault(ctx, name, apply=apply)
    output.print_object(report)
    for act in report["actions"]:
        verb = ("" if apply else "would ") + ("rebuild" if act["action"] == "rebuild-index" else "drop")
        output.info(f"{verb} {act['indexFile']}: {act['reason']}")
    for problem in report["unrepairable"]:
        output.info(f"cannot repair: {problem}")
    if not report["ok"]:
        for damaged in report["damagedObjects"]:
            points = ", ".join(p["recoveryPoint"] for p in damaged["affectedPoints"]) or "none"
            output.info(f"damaged: {damaged['object']}: {damaged['problem']} (points: {points})")
        pending = "" if apply or not report["actions"] else "; run again with --apply"
        raise IntegrityError(
            f"vault '{name}' still has {len(report['damagedObjects'])} damaged object(s){pending}",
            hint="points listed as damaged cannot be restored in full; take new backups of their VMs",
        )


@vault_app.command("import")
def vault_import(
    directory: Annotated[
        str, typer.Argument(help="Directory holding the vault, or its azure:// or s3:// URL.", metavar="DIR")
    ],
    name: Annotated[str | None, typer.Option(help="Name to register it under (default: the directory's name).")] = None,
    passphrase_file: Annotated[Path | None, typer.Option(help="File holding the passphrase.")] = None,
) -> None:
    """Register an existing vault and rebuild its VMs and recovery points from its manifests."""
    from vmvault.cli import remote
    from vmvault.service import vaults

    secret = _passphrase(passphrase_file)
    if remote.active():
        body = {"storageDir": remote.storage_location(directory, "DIR"), "name": name, "passphrase": secret}
        output.print_object(remote.post("/vaults/import", body))
        return
    with service_context() as ctx:
        view = vaults.import_vault(ctx, directory, name=name, passphrase=secret)
    output.print_object(shape.vault(view))
    for entry in view.get("notImported") or []:  # the sound rest was imported
        what = f" ({entry['entry']})" if entry.get("entry") else ""
        output.info(f"not imported: {entry['object']}{what}: {entry['problem']}")
    for point in view.get("skippedPoints") or []:  # a vault's points never join a VM this catalog has
        output.info(f"point not attached: {point['id']} of VM {point['vm']}: {point['reason']}")


@vault_app.command("check-passphrase")
def vault_check_passphrase(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    passphrase_file: Annotated[Path | None, typer.Option(help="File holding the passphrase.")] = None,
) -> None:
    """Check that a passphrase opens the vault's key file (exit 0; 77: wrong passphrase). Changes nothing."""
    from vmvault.service import vaults

    secret = _passphrase(passphrase_file)
    with service_context() as ctx:
        output.print_object(vaults.check_vault_passphrase(ctx, name, secret))


@vault_app.command("change-passphrase")
def vault_change_passphrase(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    new_passphrase_file: Annotated[
        Path, typer.Option(help="File holding the new passphrase (12+ characters, not a common password).")
    ],
    passphrase_file: Annotated[
        Path | None, typer.Option(help="File holding the current passphrase (default VMVAULT_PASSPHRASE).")
    ] = None,
) -> None:
    """Re-wrap the vault's key under a new passphrase (both key file copies; the data is untouched)."""
    from vmvault.service import vaults

    old, new = _passphrase(passphrase_file), _passphrase(new_passphrase_file)
    with service_context() as ctx:
        output.print_object(vaults.change_vault_passphrase(ctx, name, new, old_passphrase=old))


# ---- vm -----------------------------------------------------------------------------------------


QuiesceTimeoutOption = Annotated[
    int | None,
    typer.Option(
        "--quiesce-timeout",
        help="Seconds a live backup's freeze may take, the guest's fsfreeze hooks included (1-3600; 0: the "
        "service's VMVAULT_QUIESCE_TIMEOUT, default 60). Past it the guest is thawed, retried once, then the "
        "point is crash-consistent (warning quiesce_timeout).",
    ),
]


@vm_app.command("add")
def vm_add(
    name: Annotated[str, typer.Argument(help="VM name.")],
    disk: Annotated[
        list[Path] | None, typer.Option("--disk", help="Disk image (repeat, in order: disk0, disk1, ...).")
    ] = None,
    qmp: Annotated[
        Path | None, typer.Option("--qmp", help="A running QEMU's QMP socket, vmvault's own (-qmp unix:PATH,...).")
    ] = None,
    guest_agent: Annotated[
        Path | None, typer.Option("--guest-agent", help="With --qmp: the socket of its guest agent channel.")
    ] = None,
    libvirt: Annotated[str | None, typer.Option("--libvirt", help="A libvirt domain's name.")] = None,
    connect: Annotated[
        str | None, typer.Option("--connect", help="With --libvirt: libvirt's URI (default qemu:///system).")
    ] = None,
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="With --disk: raw or qcow2, once for all disks or once per --disk; recorded and used for every "
            "open (without it, guessed once now and shown).",
        ),
    ] = None,
    quiesce_timeout: QuiesceTimeoutOption = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="The VM's host: its agent runs its jobs; paths are paths on that host."),
    ] = None,
) -> None:
    """Add a VM given by its disk images (raw or qcow2), a running QEMU VM with --qmp, or a libvirt domain."""
    from vmvault.cli import remote
    from vmvault.service import vms
    from vmvault.service.quiesce import check_timeout

    if host is not None:
        _vm_add_on_host(name, host, disk, fmt, qmp, guest_agent, libvirt, connect, quiesce_timeout)
        return

    for flag, value in (("--qmp", qmp), ("--guest-agent", guest_agent), ("--libvirt", libvirt), ("--connect", connect),
                        ("--quiesce-timeout", quiesce_timeout)):  # fmt: skip
        remote.refuse_option(flag, value is not None)
    check_timeout(quiesce_timeout or None)
    if quiesce_timeout is not None and qmp is None and libvirt is None:
        raise InvalidInput("--quiesce-timeout goes with --qmp or --libvirt", hint="only running VMs are quiesced")
    if remote.active():
        disks = [remote.server_path(d, "--disk") for d in disk or []]
        body: dict[str, object] = {"name": name, "disks": disks, **({"formats": fmt} if fmt else {})}
        output.print_object(remote.post("/vms", body))
        return
    if fmt and not disk:
        raise InvalidInput("--format goes with --disk", hint="QEMU or libvirt gives a running VM's formats")
    if libvirt is not None:
        if disk or qmp is not None or guest_agent is not None:
            raise InvalidInput("--libvirt goes alone (with --connect)", hint="libvirt knows the domain's disks")
        with service_context() as ctx:
            added = vms.add_libvirt_vm(ctx, name, libvirt, connect)
            output.print_object(_with_quiesce_timeout(ctx, added, name, quiesce_timeout))
        return
    if connect is not None:
        hint = f"vmvault vm add {name} --libvirt DOMAIN --connect URI"
        raise InvalidInput("--connect goes with --libvirt", hint=hint)

    if qmp is None and guest_agent is not None:
        raise InvalidInput(
            "--guest-agent goes with --qmp", hint=f"vmvault vm add {name} --qmp SOCKET --guest-agent SOCKET"
        )
    if qmp is not None and disk:
        raise InvalidInput("give either --disk or --qmp", hint="a running VM's disks come from QEMU itself")
    with service_context() as ctx:
        if qmp is not None:
            added = vms.add_qmp_vm(ctx, name, qmp, guest_agent)
            output.print_object(_with_quiesce_timeout(ctx, added, name, quiesce_timeout))
            return
        output.print_object(vms.add_vm(ctx, name, list(disk or []), fmt))


def _vm_add_on_host(
    name: str,
    host: str,
    disk: list[Path] | None,
    fmt: list[str] | None,
    qmp: Path | None,
    guest_agent: Path | None,
    libvirt: str | None,
    connect: str | None,
    quiesce_timeout: int | None,
) -> None:
    """`vm add --host`: a VM of another host (service/hostvms.py); nothing on this machine is opened.
    With --server, through the API (POST /vms with host): the same service function on the server."""
    from vmvault.cli import remote
    from vmvault.service import hostvms

    if quiesce_timeout is not None:
        raise InvalidInput(
            "with --host, --quiesce-timeout is set later (vm update)",
            hint=f"vmvault vm add {name} --host {host} ..., then vmvault vm update {name} --quiesce-timeout S",
        )
    disks = [str(d) for d in disk or []]
    sockets = (str(qmp) if qmp else None, str(guest_agent) if guest_agent else None)
    if remote.active():  # paths are paths on the VM's host: sent as given
        given = {"disks": disks, "formats": fmt, "qmp": sockets[0], "guestAgent": sockets[1], "libvirt": libvirt,
                 "connect": connect}  # fmt: skip
        output.print_object(remote.post("/vms", {"name": name, "host": host, **{k: v for k, v in given.items() if v}}))
        return
    with service_context() as ctx:
        added = hostvms.add_vm_on_host(ctx, name, host, disks=disks, formats=fmt, qmp=sockets[0],
                                       guest_agent=sockets[1], libvirt=libvirt, connect=connect)  # fmt: skip
        output.print_object(added)


@vm_app.command("set-format")
def vm_set_format(
    name: Annotated[str, typer.Argument(help="VM name.")],
    disk: Annotated[str, typer.Option("--disk", help="The disk's name (disk0, ...; see vm show).")],
    fmt: Annotated[str, typer.Option("--format", help="raw or qcow2: what the VM really uses.")],
) -> None:
    """Record a disk's format (and, for qcow2, its current backing chain, shown): every later open uses it."""
    from vmvault.cli import remote
    from vmvault.service import vms

    remote.refuse_option("vm set-format", True)
    with service_context() as ctx:
        output.print_object(vms.set_disk_format(ctx, name, disk, fmt))


def _with_quiesce_timeout(ctx: Any, view: dict[str, Any], name: str, seconds: int | None) -> dict[str, Any]:
    if not seconds:
        return view
    from vmvault.service.quiesce import set_quiesce_timeout

    return {**view, **set_quiesce_timeout(ctx, name, seconds)}


@vm_app.command("update")
def vm_update(
    name: Annotated[str, typer.Argument(help="VM name.")],
    quiesce_timeout: QuiesceTimeoutOption = None,
) -> None:
    """Change a VM's settings: its quiesce budget (seconds the freeze may take, fsfreeze hooks included)."""
    from vmvault.cli import remote
    from vmvault.service.quiesce import set_quiesce_timeout

    remote.refuse_option("--quiesce-timeout", quiesce_timeout is not None)
    if quiesce_timeout is None:
        raise InvalidInput("nothing to update", hint=f"vmvault vm update {name} --quiesce-timeout SECONDS")
    with service_context() as ctx:
        output.print_object(set_quiesce_timeout(ctx, name, quiesce_timeout))


@vm_app.command("discover")
def vm_discover(
    connect: Annotated[str | None, typer.Option("--connect", help="libvirt's URI (default qemu:///system).")] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Another host: the domains its agent found when it registered.")
    ] = None,
) -> None:
    """List the libvirt domains not yet added."""
    from vmvault.service import vms

    with service_context() as ctx:
        if host is not None:
            from vmvault.service.hostvms import discover_on_host

            output.print_list(discover_on_host(ctx, host), ["name", "state", "uuid", "connect", "host"])
            return
        output.print_list(vms.discover(ctx, connect), ["name", "state", "uuid", "connect"])


@vm_app.command("list")
def vm_list() -> None:
    """List VMs."""
    from vmvault.cli import remote
    from vmvault.service import vms

    if remote.active():
        output.print_list(remote.get_list("/vms"), VM_LIST_COLUMNS)
        return

    with service_context() as ctx:
        output.print_list(vms.list_vms_with_status(ctx), VM_LIST_COLUMNS)


VM_LIST_COLUMNS = ("name", "kind", "powerState", "disks", "agent", "protection", "lastRecoveryPoint")


@vm_app.command("enable-agent")
def vm_enable_agent(name: Annotated[str, typer.Argument(help="VM name (a libvirt domain).")]) -> None:
    """Add the guest agent channel (org.qemu.guest_agent.0) to a libvirt domain's definition, for its next boot."""
    from vmvault.cli import remote
    from vmvault.service import agents

    if remote.active():
        output.print_object(remote.post(f"/vms/{remote.q(name)}/enable-agent"))
        return
    with service_context() as ctx:
        output.print_object(agents.enable_agent(ctx, name))


@vm_app.command("show")
def vm_show(name: Annotated[str, typer.Argument(help="VM name.")]) -> None:
    """Show a VM, its disks and its protection."""
    from vmvault.cli import remote
    from vmvault.service import vms

    if remote.active():
        output.print_object(remote.get(f"/vms/{remote.q(name)}"))
        return

    with service_context() as ctx:
        output.print_object(vms.show_vm(ctx, name))


# ---- protection ---------------------------------------------------------------------------------


PolicyOption = Annotated[str | None, typer.Option("--policy", help="Backup policy of the vault (see: policy list).")]
ExcludeDiskOption = Annotated[
    list[str] | None, typer.Option("--exclude-disk", help="Leave this disk out of backups (repeat for more).")
]


@protection_app.command("enable")
def protection_enable(
    vault: Annotated[str, typer.Option("--vault", "--vault-name", help="Vault that will hold its backups.")],
    vm: VmArgument = None,
    vm_option: VmOption = None,
    policy: PolicyOption = None,
    exclude_disk: ExcludeDiskOption = None,
) -> None:
    """Protect a VM with a vault and a policy (default DefaultPolicy); a ConfigureBackup job."""
    from vmvault.cli import remote
    from vmvault.service import protection

    name = _vm_name(vm, vm_option, "protection enable")
    if remote.active():
        body = {"vault": vault, "policy": policy, "excludeDisks": list(exclude_disk or [])}
        output.print_object(remote.post(f"/items/{remote.q(name)}/enable", body))
        return
    with service_context() as ctx:
        job = protection.enable_protection(ctx, name, vault, policy=policy, exclude_disks=list(exclude_disk or []))
    output.print_object(shape.job(job))


@protection_app.command("update")
def protection_update(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    policy: PolicyOption = None,
    exclude_disk: ExcludeDiskOption = None,
    all_disks: Annotated[bool, typer.Option("--all-disks", help="Exclude no disk any more.")] = False,
) -> None:
    """Change a protected VM's policy and/or excluded disks (a ConfigureBackup job)."""
    from vmvault.cli import remote
    from vmvault.service import protection

    name = _vm_name(vm, vm_option, "protection update")
    if all_disks and exclude_disk:
        raise InvalidInput("--all-disks and --exclude-disk contradict each other", hint="give one of them")
    excluded = [] if all_disks else (list(exclude_disk) if exclude_disk else None)
    if remote.active():
        body = {"policy": policy, "excludeDisks": excluded}
        output.print_object(remote.post(f"/items/{remote.q(name)}/update", body))
        return
    with service_context() as ctx:
        output.print_object(shape.job(protection.update_protection(ctx, name, policy=policy, exclude_disks=excluded)))


@protection_app.command("disable")
def protection_disable(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    delete_data: Annotated[
        bool, typer.Option("--delete-data", help="Also soft delete the backup data (purged after 14 days).")
    ] = False,
) -> None:
    """Stop backing a VM up; its points stay and keep expiring by its policy (a DisableBackup job)."""
    from vmvault.cli import remote

    name = _vm_name(vm, vm_option, "protection disable")
    if remote.active():
        output.print_object(remote.post(f"/items/{remote.q(name)}/disable", {"deleteData": delete_data}))
        return
    with service_context() as ctx:
        if delete_data:
            from vmvault.service import softdelete

            output.print_object(shape.job(softdelete.delete_backup_data(ctx, name)))
        else:
            from vmvault.service import protection

            output.print_object(shape.job(protection.disable_protection(ctx, name)))


@protection_app.command("resume")
def protection_resume(vm: VmArgument = None, vm_option: VmOption = None, policy: PolicyOption = None) -> None:
    """Start backing up a VM whose protection was stopped (a ConfigureBackup job)."""
    from vmvault.cli import remote
    from vmvault.service import protection

    name = _vm_name(vm, vm_option, "protection resume")
    if remote.active():
        output.print_object(remote.post(f"/items/{remote.q(name)}/resume", {"policy": policy}))
        return
    with service_context() as ctx:
        output.print_object(shape.job(protection.resume_protection(ctx, name, policy=policy)))


# ---- backup -------------------------------------------------------------------------------------


@backup_app.command("now")
def backup_now(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    retain_until: Annotated[
        str | None, typer.Option(help="Keep the point until this date, YYYY-MM-DD (default: 30 days).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job (the default).")] = False,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="With vmvault serve running: print the queued job and return.")
    ] = False,
) -> None:
    """Back a protected VM up now (queued to vmvault serve when it runs); prints the job, non-zero if it failed."""
    from vmvault.cli import remote
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import backups, jobs

    name = _vm_name(vm, vm_option, "backup now")
    if remote.active():
        _remote_backup_now(name, retain_until, no_wait)
        return
    with service_context() as ctx, progress_display(f"backup {name}") as show:
        outcome = run_cancellable(
            lambda cancel: backups.backup_now(ctx, name, retain_until=retain_until, on_progress=show, cancel=cancel)
        )
        if outcome.job["status"] == jobs.Status.IN_PROGRESS:  # queued to vmvault serve (or a host's agent)
            where = "its host's agent" if backups.on_other_host(ctx, name) else "vmvault serve"
            output.info(f"queued to {where} as job {outcome.job['id']}")
            if no_wait:
                output.print_object(shape.job(outcome.job))
                return
            followed = run_cancellable(
                lambda cancel: backups.follow_backup(ctx, outcome.job["id"], on_progress=show, cancel=cancel)
            )
            point = jobs.describe_job(ctx, followed.job["id"])["extendedInfo"]["recoveryPoint"]
            _end_job(followed, [f"recovery point {point}"] if point else [])
            return
    manifest = outcome.result
    _end_job(outcome, [f"recovery point {manifest.rp_id} at {manifest.time}"] if manifest is not None else [])


def _remote_backup_now(name: str, retain_until: str | None, no_wait: bool) -> None:
    """backup now --server: the server queues the job (202); follow it by polling, print as locally."""
    from vmvault.cli import remote
    from vmvault.service.jobs import JobOutcome

    job = remote.post(f"/items/{remote.q(name)}/backup", {"retainUntil": retain_until})
    output.info(f"queued to vmvault serve as job {job['name']}")
    if no_wait:
        output.print_object(job)
        return
    ended = remote.wait_job(job["name"])
    point = ended["properties"]["extendedInfo"].get("recoveryPoint")
    _end_job(JobOutcome(job=remote.job_view(ended)), [f"recovery point {point}"] if point else [])


# ---- job ----------------------------------------------------------------------------------------


JobIdArgument = Annotated[str, typer.Argument(help="Job id (or a unique prefix of 8+ characters).", metavar="ID")]


@job_app.command("list")
def job_list(
    vm: Annotated[str | None, typer.Option(help="Only jobs of this VM.")] = None,
    item: Annotated[str | None, typer.Option("--item", help="Only jobs of this protected item (VM).")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs with this status (e.g. InProgress).")] = None,
    operation: Annotated[str | None, typer.Option(help="Only this operation (e.g. Backup).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs started at or after this UTC date or time (YYYY-MM-DD[THH:MM]).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first (0: all).")] = 0,
) -> None:
    """List jobs, newest first."""
    from vmvault.cli import remote
    from vmvault.service import jobs

    name = _vm_name(vm, item, "job list --item") if vm or item else None
    if remote.active():
        params = {"vm": name, "status": status, "operation": operation, "limit": limit, "since": since}
        output.print_list(remote.get_list("/jobs", **params), output.JOB_COLUMNS)
        return
    with service_context() as ctx:
        rows = jobs.list_jobs(ctx, vm=name, status=status, operation=operation, limit=limit, since=since)
    output.print_list(shape.jobs(rows), output.JOB_COLUMNS)


@job_app.command("show")
def job_show(job_id: JobIdArgument) -> None:
    """Show a job, with its progress per disk, rate and error (extendedInfo)."""
    from vmvault.cli import remote
    from vmvault.service import jobs

    if remote.active():
        output.print_object(remote.get(f"/jobs/{remote.q(job_id)}"))
        return

    with service_context() as ctx:
        output.print_object(shape.job(jobs.describe_job(ctx, job_id)))


@job_app.command("wait")
def job_wait(
    job_id: JobIdArgument,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 75).")] = None,
) -> None:
    """Wait for a job to end; prints it and exits with its error's code if it did not complete."""
    from vmvault.cli import remote
    from vmvault.cli.progress import progress_display
    from vmvault.service import jobs
    from vmvault.service.worker import service_running

    if remote.active():
        _end_job(jobs.JobOutcome(job=remote.job_view(remote.wait_job(job_id, timeout))))
        return
    with service_context() as ctx, progress_display(f"job {job_id[:8]}") as show:
        if jobs.describe_job(ctx, job_id)["extendedInfo"]["queued"] and not service_running(ctx):
            output.info(f"job {job_id} is queued and no vmvault serve runs for this home: it starts with the service")
        job = jobs.wait_for_job(ctx, job_id, timeout=timeout, on_progress=show)
    _end_job(jobs.JobOutcome(job=job))


@job_app.command("cancel")
def job_cancel(job_id: JobIdArgument) -> None:
    """Cancel a job: a queued one at once, a running one as soon as it notices (no recovery point is left)."""
    from vmvault.cli import remote
    from vmvault.service import jobs

    if remote.active():
        output.print_object(remote.post(f"/jobs/{remote.q(job_id)}/cancel"))
        return

    with service_context() as ctx:
        output.print_object(shape.job(jobs.cancel_job(ctx, job_id)))


# ---- recoverypoint ------------------------------------------------------------------------------


@rp_app.command("list")
def recoverypoint_list(
    vm: VmArgument = None,
    vm_option: VmOption = None,
    vault: VaultFilter = None,
    include_deleted: Annotated[
        bool, typer.Option("--include-deleted", help="Also list soft-deleted points (see protection disable).")
    ] = False,
) -> None:
    """List a VM's recovery points, newest first (as az: --query [0].name is the latest)."""
    from vmvault.cli import remote
    from vmvault.service import backups

    name = _vm_name(vm, vm_option, "recoverypoint list")
    if remote.active():
        rows = remote.get_list(f"/items/{remote.q(name)}/recoverypoints", includeDeleted=include_deleted)
    else:
        with service_context() as ctx:
            rows = shape.recovery_points(backups.list_recovery_points(ctx, name, include_deleted=include_deleted))
    output.print_list(in_vault(rows, vault, f"VM '{name}'"), output.RP_COLUMNS)


# ---- restore ------------------------------------------------------------------------------------


FromSecondaryOption = Annotated[
    bool,
    typer.Option("--from-secondary", help="GRS: read only the vault's secondary copy (cross-region restore)."),
]


def _from_secondary(given: bool) -> None:
    """--from-secondary: this process reads every vault from its GRS secondary, never the primary."""
    if given:
        from vmvault.service.vaultio import read_from_secondary

        read_from_secondary()


@restore_app.command("disks")
def restore_disks(
    rp: Annotated[str, typer.Option("--rp", help="Recovery point id (see: vmvault recoverypoint list VM), or latest.")],
    target_dir: Annotated[Path, typer.Option(help="Directory to write <disk>.raw|.qcow2 into.")],
    disk_format: Annotated[
        DiskFormat | None, typer.Option("--format", case_sensitive=False, help="raw or qcow2 (default: as backed up).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files already in the target directory.")] = False,
    vm: VmArgument = None,
    vm_option: VmOption = None,
    disk: Annotated[
        list[str] | None, typer.Option("--disk", help="Restore only this disk (repeatable; default: all).")
    ] = None,
    from_secondary: FromSecondaryOption = False,
) -> None:
    """Restore a recovery point's disks as image files, plus a template for a plain QEMU VM (a Restore job)."""
    from vmvault.cli import remote
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import restores

    name = _vm_name(vm, vm_option, "restore disks")
    remote.refuse_option("--from-secondary", from_secondary)
    _from_secondary(from_secondary)
    fmt = disk_format.value if disk_format else None
    if remote.active():
        target = remote.server_path(target_dir, "--target-dir")
        body = {"rp": rp, "targetDir": target, "format": fmt, "force": force, "disks": disk or None}
        _end_job(remote.run_job(f"/items/{remote.q(name)}/restore", body))
        return
    with service_context() as ctx, progress_display(f"restore {name}") as show:
        outcome = run_cancellable(
            lambda cancel: restores.restore_disks(
                ctx, name, rp, target_dir, fmt=fmt, force=force, disks=disk or None, on_progress=show, cancel=cancel
            )
        )
        if outcome.job["status"] == "InProgress":  # a VM of another host: queued to its agent, followed here
            output.info(f"queued to its host's agent as job {outcome.job['id']}")
            queued = str(outcome.job["id"])
            outcome = run_cancellable(
                lambda cancel: restores.follow_restore(ctx, queued, on_progress=show, cancel=cancel)
            )
    _end_job(outcome, [f"restored {path}" for path in outcome.result or []])


@restore_app.command("vm")
def restore_vm(
    rp: Annotated[str, typer.Option("--rp", help="Recovery point id (see: vmvault recoverypoint list VM), or latest.")],
    new_name: Annotated[str, typer.Option("--name", help="Name of the new VM.")],
    target_dir: Annotated[
        Path | None,
        typer.Option(help="Directory for the new VM's disks and files (default: $VMVAULT_HOME/vms/NAME; "
                     "a libvirt VM: $VMVAULT_HOME-restores/vms/NAME, outside the 0700 home)."),
    ] = None,
    disk_format: Annotated[
        DiskFormat | None, typer.Option("--format", case_sensitive=False, help="raw or qcow2 (default: as backed up).")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Boot the new VM and wait for its guest agent.")] = False,
    instant: Annotated[
        bool,
        typer.Option("--instant", help="Boot it at once from the vault's export; disks copied in the background."),
    ] = False,
    vm: VmArgument = None,
    vm_option: VmOption = None,
    from_secondary: FromSecondaryOption = False,
) -> None:
    """Restore a point of a QEMU or libvirt VM as a new VM: new name, UUID, MACs and paths (a Restore job)."""
    from vmvault.cli import remote
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import restores

    name = _vm_name(vm, vm_option, "restore vm")
    remote.refuse_option("--from-secondary", from_secondary)
    _from_secondary(from_secondary)
    fmt = disk_format.value if disk_format else None
    if remote.active():
        body = {"rp": rp, "name": new_name, "targetDir": remote.server_path(target_dir, "--target-dir"), "format": fmt,
                "start": start, "instant": instant}  # fmt: skip
        until = remote.vm_running if instant else None  # as locally: back once the new VM runs
        outcome = remote.run_job(f"/items/{remote.q(name)}/restore/vm", body, until=until)
        note = f"it runs on the vault's export while its disks are copied: vmvault job wait {outcome.job['name']}"
        _end_job(outcome, [note] if outcome.job["properties"]["status"] == "InProgress" else [])
        return
    with service_context() as ctx, progress_display(f"restore {name} as {new_name}") as show:
        outcome = run_cancellable(
            lambda cancel: restores.restore_as_new_vm(
                ctx, name, rp, new_name, target_dir=str(target_dir) if target_dir else None, fmt=fmt, start=start,
                instant=instant,
                on_progress=show, cancel=cancel,
            )
        )
        if not instant and outcome.job["status"] == "InProgress":  # a VM of another host: its agent restores
            from vmvault.service.restore_vm import follow_new_vm

            output.info(f"queued to its host's agent as job {outcome.job['id']}")
            queued = str(outcome.job["id"])
            outcome = run_cancellable(lambda cancel: follow_new_vm(ctx, queued, on_progress=show, cancel=cancel))
    result = outcome.result or {}
    defined = result.get("launchScript") or result.get("definitionFile")  # plain QEMU: its script; libvirt: its XML
    notes = [f"restored VM {result.get('name')}: {defined}"] if result.get("name") else []
    if instant and outcome.job["status"] == "InProgress" and result.get("vmRunning"):
        notes.append(f"it runs on the vault's export while its disks are copied: vmvault job wait {outcome.job['id']}")
    elif instant and outcome.job["status"] == "InProgress":  # a VM of another host whose agent has not run it yet
        notes.append(f"queued to its host's agent, the VM not running yet: vmvault job wait {outcome.job['id']}")
    _end_job(outcome, notes)


@restore_app.command("replace-disks")
def restore_replace_disks(
    rp: Annotated[str, typer.Option("--rp", help="Recovery point id (see: vmvault recoverypoint list VM), or latest.")],
    vm: VmArgument = None,
    vm_option: VmOption = None,
) -> None:
    """Overwrite a stopped VM's disks with a recovery point's (a Restore job)."""
    from vmvault.cli import remote
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import restore_vm as service

    name = _vm_name(vm, vm_option, "restore replace-disks")
    if remote.active():
        _end_job(remote.run_job(f"/items/{remote.q(name)}/restore/replace-disks", {"rp": rp}))
        return
    with service_context() as ctx, progress_display(f"replace disks of {name}") as show:
        outcome = run_cancellable(
            lambda cancel: service.replace_disks(ctx, name, rp, on_progress=show, cancel=cancel)
        )
        if outcome.job["status"] == "InProgress":  # a VM of another host: its agent swaps its disks there
            output.info(f"queued to its host's agent as job {outcome.job['id']}")
            queued = str(outcome.job["id"])
            outcome = run_cancellable(lambda cancel: service.follow_replace(ctx, queued, on_progress=show,
                                                                            cancel=cancel))  # fmt: skip
    _end_job(outcome, [f"replaced {path}" for path in (outcome.result or {}).get("replaced", [])])


# Commands defined in their own modules register themselves on the groups above:
# vault gc (cli/gc.py); retention run, protection undelete (cli/retention.py).
from vmvault.cli import gc as _gc, retention as _retention  # noqa: E402, F401, I001
# policy, item, serve, vault usage, vault notify (cli/policy.py, item.py, serve.py, usage.py, notify.py).
from vmvault.cli import item as _i, notify as _n, policy as _p, serve as _s, usage as _u  # noqa: E402, F401
from vmvault.cli import report as _report  # noqa: E402, F401  (vmvault report)
# file recovery: files mount|list|unmount|script|browse|download (cli/files.py).
from vmvault.cli import files as _files  # noqa: E402, F401
# API tokens: token create|list|revoke (cli/token.py).
from vmvault.cli import token as _token  # noqa: E402, F401
# hosts of the deployment: host list|show|remove (cli/host.py).
from vmvault.cli import host as _host  # noqa: E402, F401
# host checks: doctor (cli/doctor.py).
from vmvault.cli import doctor as _doctor  # noqa: E402, F401
# scheduled verification period of a vault: vault verify-schedule (cli/verify_schedule.py).
from vmvault.cli import verify_schedule as _verify_schedule  # noqa: E402, F401
# the agent of a hypervisor host: agent run (cli/agent.py).
from vmvault.cli import agent as _agent  # noqa: E402, F401
