"""Vault use cases: create, list, show, verify, import."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso
from vmvault.catalog.models import RecoveryPointRow, VaultRow, VmRow
from vmvault.errors import AlreadyExists, HostileContent, IntegrityError, InvalidInput, NotFound, VmvaultError
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.paths import Rule, allowed
from vmvault.service.validate import check_name, check_passphrase
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict, vault_view

REDUNDANCIES = ("LRS", "GRS")
OFFERED_REDUNDANCIES = ("LRS",)  # what create_vault accepts on this server (faces offer only these)
GRS_NOT_AVAILABLE = (
    "GRS redundancy (replication to a second location) is not available yet; create the vault with --redundancy LRS"
)


def _view(s: Session, row: VaultRow) -> JsonDict:
    return vault_view(
        row,
        protected_items=repos.count_protected_items(s, row.id),
        recovery_points=repos.count_recovery_points(s, row.id),
    )


def check_redundancy(redundancy: str) -> str:
    value = redundancy.upper()
    if value not in REDUNDANCIES:
        raise InvalidInput(f"unknown redundancy '{redundancy}'", hint="use --redundancy LRS")
    if value == "GRS":
        raise InvalidInput(GRS_NOT_AVAILABLE, hint="use --redundancy LRS")
    return value


# ---- create / list / show -----------------------------------------------------------------------


def create_vault(
    ctx: Context,
    name: str,
    *,
    storage_dir: str | Path | None = None,
    redundancy: str = "LRS",
    passphrase: str | None = None,
    time_zone: str = "UTC",
) -> JsonDict:
    """Create a vault (default storage $VMVAULT_HOME/vaults/NAME) and register it.

    The vault gets its DefaultPolicy (daily 20:30, 180 days) in time_zone (an IANA or a Windows name).
    """
    from vmvault.domain.policy import check_time_zone
    from vmvault.service.policies import add_default_policy
    from vmvault.vault.store import Vault

    check_name("vault", name)
    check_time_zone(time_zone, "--timezone")
    value = check_redundancy(redundancy)
    _refuse_taken_name(ctx, name)
    secret = check_passphrase(passphrase or ctx.settings.passphrase, name)
    # the default is the server's choice; a caller's folder must be in the allowed vault roots (service/paths.py)
    storage = allowed(ctx, Rule.VAULTS, storage_dir) if storage_dir else ctx.settings.vaults_dir / name
    vault = Vault.create(storage, ctx.settings.home, secret, redundancy=value)
    try:
        row = _row_for(name, vault)
    finally:
        vault.close()
    with ctx.catalog.write() as s:
        _refuse_taken_name_in(s, name)
        repos.add_vault(s, row)
        add_default_policy(s, row, time_zone)
        return _view(s, row)


def _row_for(name: str, vault: Any) -> VaultRow:
    return VaultRow(
        name=name,
        storage_dir=str(vault.storage_dir),
        uuid=vault.uuid,
        redundancy=vault.redundancy,
        chunk_size=int(vault.chunk_size),
        created=_iso(str(vault.created)),
    )


def _iso(text: str) -> str:
    """The vault's creation time in the catalog's format (kept as is if it does not parse)."""
    try:
        return to_iso(from_iso(text)) if text else now_iso()
    except ValueError:
        return text


def _refuse_taken_name(ctx: Context, name: str) -> None:
    with ctx.catalog.read() as s:
        _refuse_taken_name_in(s, name)


def _refuse_taken_name_in(s: Session, name: str) -> None:
    if repos.find_vault(s, name) is not None:
        raise AlreadyExists(
            f"vault '{name}' already exists", hint=f"choose another name, or see it with: vmvault vault show {name}"
        )


def list_vaults(ctx: Context) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        return [_view(s, row) for row in repos.list_vaults(s)]


def show_vault(ctx: Context, name: str) -> JsonDict:
    with ctx.catalog.read() as s:
        return _view(s, repos.get_vault(s, name))


# ---- verify -------------------------------------------------------------------------------------


def verify_vault(
    ctx: Context,
    name: str,
    *,
    rp_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Verify a vault (or one recovery point) as a Verify job; result: the verify report as JSON."""
    with ctx.catalog.read() as s:
        row = repos.get_vault(s, name)
        if rp_id is not None:
            _check_point_in_vault(s, rp_id, row)
    job = create_job(ctx, Operation.VERIFY, vm=None, vault=name)

    def work(run: JobRun) -> JsonDict:
        from vmvault.engine.verify import run_verify
        from vmvault.service.reconcile import reconcile_vault

        with opened_vault(ctx, row) as vault:
            reconciled = reconcile_vault(ctx, row, vault, f"by verify job {job.id}")
            with ctx.catalog.read() as s:
                listed = {p.id: _vm_name(s, p.vm_id) for p in repos.recovery_points_in_vault(s, row.id)}
            report = run_verify(vault, rp_id, on_progress=run.progress, expected_points=listed)
        healed = _record_verification(ctx, report.points)
        view = _report_view(name, rp_id, report, job.id)
        view["healedPoints"] = healed
        view["damagedObjects"] = damaged_view(report, listed)
        view.update(reconciled.view())
        run.details = {**(run.details or {}), "damagedObjects": view["damagedObjects"]}
        return view

    return run_job(ctx, job, work, failure=_verify_failure, on_progress=on_progress, cancel=cancel)


def _record_verification(ctx: Context, points: dict[str, str | None]) -> list[str]:
    """Remember each checked point's outcome: restores refuse a Failed point until a verify passes.

    Returns the points that had failed and pass now (healed: repaired or their data stored again)."""
    when = now_iso()
    healed = []
    with ctx.catalog.write() as s:
        for point_id, problem in points.items():
            point = repos.find_recovery_point(s, point_id)
            if point is None:
                continue  # in the vault but not in this catalog (an imported vault's stale point)
            if point.verify_state == "Failed" and not problem:
                healed.append(point_id)
            point.verify_state = "Failed" if problem else "Passed"
            point.verify_time = when
            point.verify_problem = problem
    return sorted(healed)


def damaged_view(report: Any, vm_names: dict[str, str]) -> list[JsonDict]:
    """Each damaged object with the points (VM, disks, byte ranges [start, end)) that depend on it."""
    return [
        {
            "object": d.name,
            "problem": d.problem,
            "affectedPoints": [
                {
                    "recoveryPoint": rp,
                    "vm": a.vm or vm_names.get(rp),
                    "disks": [{"disk": disk, "ranges": ranges} for disk, ranges in a.disks.items()],
                }
                for rp, a in sorted(d.points.items())
            ],
        }
        for d in report.damaged.values()
    ]


def _check_point_in_vault(s: Session, rp_id: str, row: VaultRow) -> None:
    point = repos.find_recovery_point(s, rp_id)
    if point is None or point.vault_id != row.id:
        raise NotFound(
            f"recovery point '{rp_id}' not found in vault '{row.name}'",
            hint="list the points of a VM with: vmvault recoverypoint list VM",
        )


def _report_view(name: str, rp_id: str | None, report: Any, job_id: str) -> JsonDict:
    return {
        "vault": name,
        "recoveryPoint": rp_id,
        "ok": bool(report.ok),
        "problems": [str(p) for p in report.problems],
        "notes": [str(n) for n in report.notes],  # not problems: e.g. an interrupted backup's leftovers
        "objectsChecked": int(report.objects_checked),
        "bytesChecked": int(report.bytes_checked),
        "jobId": job_id,
    }


def _verify_failure(report: JsonDict) -> VmvaultError | None:
    if report["ok"] and not report["problems"]:
        return None
    problems = report["problems"] or ["the verify reported a failure"]
    count = len(problems)
    return IntegrityError(
        f"vault '{report['vault']}' has {count} problem{'s' if count != 1 else ''}; the first: {problems[0]}",
        hint="recovery points that use the damaged objects cannot be restored in full; "
        "take new backups of the affected VMs and check the vault's storage",
    )


# ---- import -------------------------------------------------------------------------------------


@dataclass
class _Imported:
    row: VaultRow
    manifests: list[Any]
    settings: JsonDict | None = None  # the vault's own configuration (service/vaultsettings.py)
    skipped: list[JsonDict] = field(default_factory=list)  # points not attached (foreign VM, duplicate id)


def import_vault(
    ctx: Context, storage_dir: str | Path, *, name: str | None = None, passphrase: str | None = None
) -> JsonDict:
    """Register an existing vault directory and rebuild its VMs and recovery points from the manifests."""
    from vmvault.vault.store import Vault

    storage = allowed(ctx, Rule.VAULTS, storage_dir)
    vault_name = check_name("vault", name or storage.name)
    if not storage.is_dir():
        raise NotFound(f"vault directory {storage} not found", hint="pass the directory that holds the vault")
    _refuse_taken_name(ctx, vault_name)
    vault = Vault.open(
        storage,
        ctx.settings.home,
        passphrase or ctx.settings.passphrase,
        strict_passphrase=passphrase is not None or ctx.settings.strict_passphrase,
    )
    try:
        hostile: list[JsonDict] = []
        manifests, unreadable = _sound_manifests(vault, hostile)
        unreadable += _damaged_index_report(vault)
        settings = _vault_settings(vault, unreadable, hostile)
        imported = _Imported(_row_for(vault_name, vault), manifests, settings)
    finally:
        vault.close()
    if hostile:
        raise _hostile_vault(storage, hostile)
    with ctx.catalog.write() as s:
        _refuse_taken_name_in(s, vault_name)
        _refuse_known_uuid(s, imported.row)
        known = {vm.id for vm in repos.list_vms(s)} if ctx.paths is not None else set()
        unreadable += _insert_imported(s, imported)
        unreadable += _confine_imported_disks(ctx, s, known)
        view = _view(s, imported.row)
    view["notImported"] = unreadable
    if imported.skipped:
        view["skippedPoints"] = imported.skipped
    return view


def _confine_imported_disks(ctx: Context, s: Session, known: set[str]) -> list[JsonDict]:
    """API and portal callers: a disk path the vault brought must lie in the allowed disk roots.

    The vault's manifests and settings say where the VM's disks were; for a caller who is not root
    on this host that is still untrusted (it would make scheduled backups read that path), so a
    path outside the roots is dropped from the imported VM and reported.
    """
    if ctx.paths is None:
        return []
    dropped: list[JsonDict] = []
    for vm in repos.list_vms(s):
        if vm.id in known:
            continue
        disks = [dict(d) for d in vm.disks or []]
        for disk in disks:
            if not disk.get("path"):
                continue
            try:
                ctx.paths.check(Rule.DISKS, disk["path"])
            except VmvaultError as exc:
                dropped.append({"object": f"VM {vm.name} disk {disk.get('name')}", "recoveryPoint": None,
                                "problem": f"{exc.message}; the disk path was not kept"})  # fmt: skip
                disk["path"] = ""
        vm.disks = disks
    return dropped


def _sound_manifests(vault: Any, hostile: list[JsonDict]) -> tuple[list[Any], list[JsonDict]]:
    """The manifests that authenticate (oldest first), and one entry per one that does not.

    One damaged manifest must not keep the rest of the vault from being imported (after a
    catalog loss nothing could be restored): the sound points are imported, the others listed.
    A manifest that authenticates but holds a name user input could not have given is not
    damage: it goes to `hostile`, and the vault is not imported at all (_hostile_vault).
    """
    manifests, bad = [], []
    for rp_id in vault.list_recovery_points():
        try:
            manifest = vault.read_manifest(rp_id)  # checked as untrusted input (manifest.check_names)
            check_name("VM", manifest.vm_name)  # the same rule as user input
            manifests.append(manifest)
        except (HostileContent, InvalidInput) as exc:
            hostile.append({"object": vault.manifest_name(rp_id), "recoveryPoint": rp_id, "problem": exc.message})
        except VmvaultError as exc:
            bad.append({"object": vault.manifest_name(rp_id), "recoveryPoint": rp_id, "problem": exc.message})
    return sorted(manifests, key=lambda m: m.time), bad


def _hostile_vault(storage: Path, hostile: list[JsonDict]) -> HostileContent:
    """Refuse the whole vault: its author (who holds its keys) wrote names no vmvault writes.

    Damage is an accident and the sound rest is imported; this is not, so nothing of it is."""
    listed = "; ".join(f"{h['object']}: {h['problem']}" for h in hostile)
    return HostileContent(
        f"the vault at {storage} was not imported: {len(hostile)} authenticated file(s) hold names or paths "
        f"user input could not have given (written by whoever holds the vault's keys): {listed}",
        hint="nothing was registered; do not trust this vault's content (docs/security.md)",
    )


def _vault_settings(vault: Any, problems: list[JsonDict], hostile: list[JsonDict]) -> JsonDict | None:
    """The configuration the vault holds; a damaged one is reported and the import goes on."""
    from vmvault.service.vaultsettings import NAME, check_untrusted, load

    try:
        document = load(vault)
    except VmvaultError as exc:
        problems.append({"object": NAME, "recoveryPoint": None, "problem": exc.message})
        return None
    if document is not None:
        hostile += [{"object": NAME, "recoveryPoint": None, "problem": p} for p in check_untrusted(document)]
    return document


def _damaged_index_report(vault: Any) -> list[JsonDict]:
    """Pack index files that could not be read (the points using their packs fail until repaired)."""
    return [
        {
            "object": name,
            "recoveryPoint": None,
            "problem": f"{problem}; rebuild it with: vmvault vault repair VAULT --apply, then vmvault vault verify",
        }
        for name, problem in sorted(vault.damaged_index_files.items())
    ]


def _refuse_known_uuid(s: Session, row: VaultRow) -> None:
    known = repos.find_vault_by_uuid(s, row.uuid)
    if known is not None:
        raise AlreadyExists(
            f"the vault at {row.storage_dir} is already registered as '{known.name}'",
            hint=f"see it with: vmvault vault show {known.name}",
        )


def _insert_imported(s: Session, imported: _Imported) -> list[JsonDict]:
    """Register the vault, its configuration (policies, VMs, protection) and its points."""
    from vmvault.service.policies import add_default_policy
    from vmvault.service.vaultsettings import restore

    repos.add_vault(s, imported.row)
    add_default_policy(s, imported.row)
    # A vault's content is evidence, not instructions: its points never join a VM this catalog
    # already has (a foreign vault must not add a "latest point" to your VM), nor replace a point.
    # Decided before the vault's own configuration brings its VMs back.
    foreign = {m.vm_id for m in imported.manifests if repos.find_vm_by_id(s, m.vm_id) is not None}
    problems = restore(s, imported.row, imported.settings) if imported.settings else []
    latest_by_vm: dict[str, Any] = {m.vm_id: m for m in imported.manifests}  # sorted by time: last wins
    for manifest in latest_by_vm.values():
        if manifest.vm_id not in foreign and repos.find_vm_by_id(s, manifest.vm_id) is None:
            _ensure_vm(s, manifest)  # not in the vault's configuration (e.g. protection stopped, data kept)
    for manifest in imported.manifests:
        if manifest.vm_id in foreign or repos.find_recovery_point(s, manifest.rp_id) is not None:
            imported.skipped.append(_skipped(s, manifest, manifest.vm_id in foreign))
            continue
        repos.add_recovery_point(s, recovery_point_row(manifest, imported.row.id))
    return problems


def _skipped(s: Session, manifest: Any, foreign: bool) -> JsonDict:
    if foreign:
        vm = repos.find_vm_by_id(s, manifest.vm_id)
        reason = (
            f"VM id {manifest.vm_id} is already VM '{vm.name if vm else manifest.vm_id}' here: "
            "a vault cannot add points to a VM it did not bring"
        )
    else:
        reason = "a recovery point with this id is already in this catalog (in another vault)"
    return {"id": manifest.rp_id, "vm": manifest.vm_name, "time": manifest.time, "reason": reason}


def _ensure_vm(s: Session, manifest: Any) -> None:
    # Called only for VMs this catalog did not have before the import (not `foreign`): one with
    # this id now was brought back by the vault's own configuration (vaultsettings.restore).
    if repos.find_vm_by_id(s, manifest.vm_id) is not None:
        return
    if repos.find_vm(s, manifest.vm_name) is not None:
        raise AlreadyExists(
            f"VM '{manifest.vm_name}' in the vault (id {manifest.vm_id}) clashes with another VM of that name here",
            hint="import into another --home, or remove the other VM from this catalog first",
        )
    # Only an absolute file path is kept as the imported VM's disk path (manifest.check_names
    # already refused control characters and ".."); anything else is no path here.
    disks = [{"name": d.name, "path": d.source_path if d.source_path.startswith("/") else ""} for d in manifest.disks]
    row = VmRow(
        id=manifest.vm_id,
        name=manifest.vm_name,
        kind="imported",
        disks=disks,
        definition=dict(manifest.vm_definition),
        created=now_iso(),
    )
    repos.add_vm(s, row)


def recovery_point_row(manifest: Any, vault_id: int) -> RecoveryPointRow:
    """The catalog row indexing a manifest."""
    disks = [
        {"name": d.name, "size": d.size, "sourceFormat": d.source_format, "storedBytes": d.stored_bytes}
        for d in manifest.disks
    ]
    return RecoveryPointRow(
        id=manifest.rp_id,
        vm_id=manifest.vm_id,
        vault_id=vault_id,
        time=manifest.time,
        consistency=manifest.consistency,
        retain_until=manifest.retain_until,
        disks=disks,
        job_id=manifest.job_id,
    )


# ---- passphrase ---------------------------------------------------------------------------------


def check_vault_passphrase(ctx: Context, name: str, passphrase: str | None = None) -> JsonDict:
    """Does the passphrase (given, or VMVAULT_PASSPHRASE) open the vault's key file? wrong_passphrase if not.

    Opens nothing else and changes nothing: admins test the passphrase they will need after losing
    the host (whose key opens the vault today).
    """
    from vmvault.errors import AuthenticationError
    from vmvault.vault import keyfile
    from vmvault.vault.store import Vault

    secret = passphrase or ctx.settings.passphrase
    if not secret:
        raise AuthenticationError(
            f"no passphrase given to check against vault '{name}'",
            hint="set VMVAULT_PASSPHRASE or pass --passphrase-file FILE",
        )
    with ctx.catalog.read() as s:
        row = repos.get_vault(s, name)
    if not keyfile.HostKeys(ctx.settings.home).has(row.uuid):
        with opened_vault(ctx, row, secret):  # a new host: unlocking with it is the check
            return {"vault": name, "passphrase": "ok"}
    with opened_vault(ctx, row, host_key_only=True) as vault:
        assert isinstance(vault, Vault)
        vault.check_passphrase(secret)  # damaged key files: IntegrityError, not wrong_passphrase
    return {"vault": name, "passphrase": "ok"}


def change_vault_passphrase(
    ctx: Context, name: str, new_passphrase: str | None, *, old_passphrase: str | None = None
) -> JsonDict:
    """Re-wrap the vault's master key under a new passphrase (current KDF), both key file copies.

    The vault must open with this host's key or the old passphrase; data and host keys stay as
    they are. The new passphrase follows the rules for a new vault's.
    """
    with ctx.catalog.read() as s:
        row = repos.get_vault(s, name)
    secret = check_passphrase(new_passphrase, name)
    with opened_vault(ctx, row, old_passphrase) as vault:
        vault.change_passphrase(secret)
    return {"vault": name, "passphrase": "changed"}


# ---- delete -------------------------------------------------------------------------------------


def delete_vault(ctx: Context, name: str, *, keep_storage: bool = False) -> JsonDict:
    """Unregister an empty vault and remove its storage (unless keep_storage).

    Refused while it has protected items (in any state: protected, stopped, soft-deleted),
    recovery points or running jobs.
    """
    with ctx.catalog.write() as s:
        row = repos.get_vault(s, name)
        _refuse_in_use(s, row)
        for target in repos.notification_targets(s, row.id):
            repos.delete_notification_target(s, target.id)
        for policy in repos.list_policies(s, row.id):
            s.delete(policy)
        s.flush()
        s.delete(row)
        view = vault_view(row, protected_items=0, recovery_points=0)
    view["storageDeleted"] = False if keep_storage else _remove_storage(ctx, row)
    return view


def _refuse_in_use(s: Session, row: VaultRow) -> None:
    items = repos.list_protected_items(s, row.id)
    if items:
        described = ", ".join(f"{_vm_name(s, i.vm_id)} ({i.protection_state})" for i in items)
        raise InvalidInput(
            f"vault '{row.name}' still has {len(items)} protected item(s): {described}",
            hint="stop their protection and delete their data first: vmvault protection disable VM --delete-data "
            "(soft-deleted items must be purged, which takes 14 days)",
        )
    points = repos.count_recovery_points(s, row.id)
    if points:
        raise InvalidInput(
            f"vault '{row.name}' still holds {points} recovery point(s)",
            hint="see them with: vmvault recoverypoint list VM",
        )
    running = [j for j in repos.running_jobs(s) if j.vault == row.name]
    if running:
        raise InvalidInput(
            f"vault '{row.name}' has {len(running)} running job(s), e.g. {running[0].operation} {running[0].id}",
            hint=f"wait for them: vmvault job wait {running[0].id}",
        )


def _vm_name(s: Session, vm_id: str) -> str:
    vm = repos.find_vm_by_id(s, vm_id)
    return vm.name if vm is not None else vm_id


def _remove_storage(ctx: Context, row: VaultRow) -> bool:
    """Remove the vault's directory (only if it still holds this vault) and this host's key and cache of it."""
    import json
    import shutil

    storage = Path(row.storage_dir)
    try:
        config = json.loads((storage / "config").read_text())
    except (OSError, ValueError):
        return False
    if config.get("uuid") != row.uuid:
        return False
    shutil.rmtree(storage, ignore_errors=True)
    (ctx.settings.home / "keys" / f"{row.uuid}.json").unlink(missing_ok=True)
    shutil.rmtree(ctx.settings.home / "cache" / row.uuid, ignore_errors=True)
    return not storage.exists()
