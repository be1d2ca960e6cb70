"""The vault-level configuration, kept in the vault itself (issue 18 item 4; docs/format.md).

`settings/catalog` is a sealed file (vault/sealed.py: authenticated and encrypted with the vault
key) holding this vault's policies, protected items (policy, excluded disks, state, schedule
anchor, soft delete), the definitions of their VMs and the notification targets. It is rewritten
whenever one of them changes and after every backup, so that `vault import` on a new host brings
back the protection as it was, not only the recovery points.

Writing is best effort: a vault that cannot be written to now does not undo the catalog change
(it is logged, and the next change or backup writes the file again).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import NotificationTargetRow, PolicyRow, ProtectedItemRow, VaultRow, VmRow
from vmvault.errors import AlreadyExists, IntegrityError, VmvaultError
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

log = logging.getLogger(__name__)
NAME = "settings/catalog"
VERSION = 1


def snapshot(s: Session, vault: VaultRow) -> JsonDict:
    policies = {p.id: p for p in repos.list_policies(s, vault.id)}
    items = list(repos.list_protected_items(s, vault.id))
    vms = [vm for vm in (repos.find_vm_by_id(s, i.vm_id) for i in items) if vm is not None]
    return {
        "version": VERSION,
        "vault": vault.uuid,
        "written": now_iso(),
        "policies": [
            {"name": p.name, "properties": p.properties, "created": p.created, "modified": p.modified}
            for p in policies.values()
        ],
        "vms": [
            {
                "id": v.id,
                "name": v.name,
                "kind": v.kind,
                "disks": v.disks,
                "definition": v.definition,
                "created": v.created,
            }
            for v in vms
        ],
        "items": [
            {
                "vmId": i.vm_id,
                "state": i.protection_state,
                "created": i.created,
                "policy": policies[i.policy_id].name if i.policy_id in policies else None,
                "excludedDisks": list(i.excluded_disks or []),
                "scheduleAnchor": i.schedule_anchor,
                "deferredDeleteTime": i.deferred_delete_time,
            }
            for i in items
        ],
        "notifications": [
            {"kind": t.kind, "address": t.address, "smtp": t.smtp, "sender": t.sender, "events": t.events}
            for t in repos.notification_targets(s, vault.id)
        ],
    }


def save(ctx: Context, vault: str | int | VaultRow) -> None:
    """Write the vault's configuration into it (best effort, see the module docstring)."""
    from vmvault.service.vaultio import opened_vault
    from vmvault.vault.sealed import seal

    try:
        with ctx.catalog.read() as s:
            row = _vault_row(s, vault)
            document = json.dumps(snapshot(s, row), sort_keys=True).encode()
        with opened_vault(ctx, row) as opened:
            opened.backend.put(NAME, seal(opened.keys, NAME, document))
    except Exception as exc:  # best effort: the catalog change stands; the next change or backup retries
        log.warning("could not write the configuration into vault %s: %s", vault, exc)
        log.debug("writing the vault configuration failed", exc_info=True)


def _vault_row(s: Session, vault: str | int | VaultRow) -> VaultRow:
    if isinstance(vault, VaultRow):
        return vault
    if isinstance(vault, int):
        return repos.vault_by_id(s, vault)
    return repos.get_vault(s, vault)


def load(vault: Any) -> JsonDict | None:
    """The configuration a vault holds (None: none written yet). Raises IntegrityError if damaged."""
    from vmvault.vault.sealed import unseal

    if not vault.backend.exists(NAME):
        return None
    try:
        document = json.loads(unseal(vault.keys, NAME, vault.backend.get(NAME)))
    except ValueError as exc:
        raise IntegrityError(f"vault file {NAME} is damaged: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != VERSION or document.get("vault") != vault.uuid:
        raise IntegrityError(f"vault file {NAME} is not this vault's configuration (version {VERSION})")
    return document


def check_untrusted(document: JsonDict) -> list[str]:
    """Names and paths in the (authenticated) document that user input could not have given.

    Not damage: whoever holds the vault's keys wrote them, and `vault import` refuses the vault
    whole if there is any (as for manifests, vault/manifest.py)."""
    from vmvault.vault.manifest import VM_NAME_RE, UntrustedName, check_disk_name, check_disk_path

    found = []
    for entry in _list(document, "vms"):
        name = entry.get("name")
        if not isinstance(name, str) or not VM_NAME_RE.fullmatch(name):
            found.append(f"vm entry: invalid VM name {name!r}")
            continue
        disks = entry.get("disks")
        for disk in disks if isinstance(disks, list) else []:
            try:
                if isinstance(disk, dict):
                    check_disk_name(disk.get("name"))
                    check_disk_path(disk.get("path") or "")
            except UntrustedName as exc:
                found.append(f"vm {name}: {exc}")
    return found


def restore(s: Session, vault: VaultRow, document: JsonDict) -> list[JsonDict]:
    """Recreate policies, VMs, protected items and notification targets from `document`.

    Authenticated by the vault key, but still checked entry by entry: an entry that does not fit
    (a name taken here, a malformed value) is skipped and returned as a problem. A vault's
    configuration is evidence, not instructions: it never changes, protects or attaches a VM this
    catalog already has (same id, same disk, same libvirt domain), only the VMs it brings."""
    problems: list[JsonDict] = []
    policy_ids = _restore_policies(s, vault, _list(document, "policies"), problems)
    brought: set[str] = set()
    for entry in _list(document, "vms"):
        _guard(problems, "vm", entry, lambda e=entry: brought.add(_restore_vm(s, e)))
    for entry in _list(document, "items"):
        _guard(problems, "protected item", entry, lambda e=entry: _restore_item(s, vault, e, policy_ids, brought))
    known = {(t.kind, t.address) for t in repos.notification_targets(s, vault.id)}
    for entry in _list(document, "notifications"):
        _guard(problems, "notification target", entry, lambda e=entry: _restore_target(s, vault, e, known))
    s.flush()
    return problems


def _list(document: JsonDict, key: str) -> list[JsonDict]:
    value = document.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _guard(problems: list[JsonDict], what: str, entry: JsonDict, fn: Any) -> None:
    try:
        fn()
    except (VmvaultError, ValueError, KeyError, TypeError) as exc:
        message = exc.message if isinstance(exc, VmvaultError) else f"malformed ({exc})"
        problems.append(
            {"object": NAME, "entry": f"{what} {entry.get('name') or entry.get('vmId')}", "problem": message}
        )


def _restore_policies(s: Session, vault: VaultRow, entries: list[JsonDict], problems: list[JsonDict]) -> dict[str, int]:
    from vmvault.service.policies import policy_of
    from vmvault.service.validate import check_name

    ids = {p.name: p.id for p in repos.list_policies(s, vault.id)}

    def one(entry: JsonDict) -> None:
        name = check_name("policy", str(entry["name"]))
        properties = entry["properties"]
        if not isinstance(properties, dict):
            raise ValueError("properties is not an object")
        row = repos.find_policy(s, vault.id, name)
        if row is None:
            row = PolicyRow(
                vault_id=vault.id,
                name=name,
                properties=properties,
                created=str(entry.get("created") or now_iso()),
                modified=now_iso(),
            )
            policy_of(row)  # the same checks as `policy create`
            repos.add_policy(s, row)
        else:  # e.g. the DefaultPolicy the import just created: the vault's version wins
            policy_of(PolicyRow(vault_id=vault.id, name=name, properties=properties, created="", modified=""))
            row.properties, row.modified = properties, now_iso()
        ids[name] = row.id

    for entry in entries:
        _guard(problems, "policy", entry, lambda e=entry: one(e))
    return ids


KINDS = ("disks", "imported", "qmp", "libvirt")


def _restore_vm(s: Session, entry: JsonDict) -> str:
    """Add the entry's VM; its id. Refused if this catalog has it already (id, a disk, its libvirt domain)."""
    import os

    from vmvault.service.validate import check_name

    vm_id, name, kind = str(entry["id"]), check_name("VM", str(entry["name"])), str(entry["kind"])
    existing = repos.find_vm_by_id(s, vm_id)
    if existing is not None:
        raise AlreadyExists(
            f"VM id {vm_id} is already VM '{existing.name}' here: a vault cannot change a VM it did not bring"
        )
    if repos.find_vm(s, name) is not None:
        raise AlreadyExists(f"VM '{name}' of the vault clashes with another VM of that name here")
    if kind not in KINDS:
        raise ValueError(f"unknown VM kind {kind!r}")
    disks, definition = entry["disks"], entry["definition"]
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks) or not isinstance(definition, dict):
        raise ValueError("disks or definition malformed")
    # as for manifests (service/vaults.py _ensure_vm): only an absolute path is kept as a disk path
    disks = [{**d, "path": d["path"] if str(d.get("path") or "").startswith("/") else ""} for d in disks]
    mine = {os.path.realpath(str(d["path"])) for d in disks if d["path"]}
    domain = definition.get("uuid") if kind == "libvirt" else None
    for other in repos.list_vms(s):
        theirs = {os.path.realpath(str(d.get("path"))) for d in other.disks or [] if d.get("path")}
        if mine & theirs:
            raise AlreadyExists(
                f"disk {sorted(mine & theirs)[0]} is VM '{other.name}''s disk here: a vault cannot attach a VM "
                "this catalog already has"
            )
        if domain and other.kind == "libvirt" and (other.definition or {}).get("uuid") == domain:
            raise AlreadyExists(f"libvirt domain {domain} is VM '{other.name}' here")
    repos.add_vm(
        s,
        VmRow(
            id=vm_id,
            name=name,
            kind=kind,
            disks=disks,
            definition=definition,
            created=str(entry.get("created") or now_iso()),
        ),
    )
    s.flush()
    return vm_id


def _restore_item(s: Session, vault: VaultRow, entry: JsonDict, policy_ids: dict[str, int], brought: set[str]) -> None:
    vm_id = str(entry["vmId"])
    if vm_id not in brought:  # never protect a VM this catalog had (or one the vault's VMs did not bring)
        vm = repos.find_vm_by_id(s, vm_id)
        if vm is None:
            return  # its VM entry was not restored: reported there
        raise AlreadyExists(
            f"VM id {vm_id} is already VM '{vm.name}' here: a vault cannot protect a VM it did not bring"
        )
    if repos.protected_item(s, vm_id) is not None:
        return
    excluded = entry.get("excludedDisks") or []
    if not isinstance(excluded, list):
        raise ValueError("excludedDisks is not a list")
    policy = entry.get("policy")
    s.add(
        ProtectedItemRow(
            vm_id=vm_id,
            vault_id=vault.id,
            protection_state=str(entry["state"]),
            created=str(entry.get("created") or now_iso()),
            policy_id=policy_ids.get(str(policy)) if policy is not None else None,
            excluded_disks=[str(d) for d in excluded],
            schedule_anchor=entry.get("scheduleAnchor"),
            deferred_delete_time=entry.get("deferredDeleteTime"),
        )
    )
    s.flush()


def _restore_target(s: Session, vault: VaultRow, entry: JsonDict, known: set[tuple[str, str]]) -> None:
    kind, address = str(entry["kind"]), str(entry["address"])
    if kind not in ("webhook", "email") or (kind, address) in known:
        return
    repos.add_notification_target(
        s,
        NotificationTargetRow(
            vault_id=vault.id,
            kind=kind,
            address=address,
            smtp=entry.get("smtp"),
            sender=entry.get("sender"),
            events=str(entry.get("events") or "failed"),
            created=now_iso(),
        ),
    )
    known.add((kind, address))


P = ParamSpec("P")
R = TypeVar("R")


def saves_settings(
    vault_of: Callable[[tuple[Any, ...], dict[str, Any], Any], str | None],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a service function (ctx first) that changes a vault's configuration: afterwards
    the vault `vault_of(args, kwargs, result)` names gets its settings/catalog rewritten."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result = fn(*args, **kwargs)
            name = vault_of(args, kwargs, result)
            if name:
                save(args[0], name)  # type: ignore[arg-type]
            return result

        return wrapper

    return decorate


def vault_argument(args: tuple[Any, ...], kwargs: dict[str, Any], _result: Any) -> str | None:
    """For functions called (ctx, vault_name, ...)."""
    value = kwargs.get("vault_name", args[1] if len(args) > 1 else None)
    return str(value) if value else None


def vault_of_job(_args: tuple[Any, ...], _kwargs: dict[str, Any], result: Any) -> str | None:
    """For functions returning the view of the job that recorded the change."""
    return str(result["vault"]) if isinstance(result, dict) and result.get("vault") else None
