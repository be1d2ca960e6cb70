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
from vmvault.errors import IntegrityError, VmvaultError
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


def restore(s: Session, vault: VaultRow, document: JsonDict) -> list[JsonDict]:
    """Recreate policies, VMs, protected items and notification targets from `document`.

    Authenticated by the vault key, but still checked entry by entry: an entry that does not fit
    (a name taken here, a malformed value) is skipped and returned as a problem."""
    problems: list[JsonDict] = []
    policy_ids = _restore_policies(s, vault, _list(document, "policies"), problems)
    for entry in _list(document, "vms"):
        _guard(problems, "vm", entry, lambda e=entry: _restore_vm(s, e))
    for entry in _list(document, "items"):
        _guard(problems, "protected item", entry, lambda e=entry: _restore_item(s, vault, e, policy_ids))
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


def _restore_vm(s: Session, entry: JsonDict) -> None:
    from vmvault.errors import AlreadyExists
    from vmvault.service.validate import check_name

    vm_id, name = str(entry["id"]), check_name("VM", str(entry["name"]))
    if repos.find_vm_by_id(s, vm_id) is not None:
        return
    if repos.find_vm(s, name) is not None:
        raise AlreadyExists(f"VM '{name}' of the vault clashes with another VM of that name here")
    disks, definition = entry["disks"], entry["definition"]
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks) or not isinstance(definition, dict):
        raise ValueError("disks or definition malformed")
    repos.add_vm(
        s,
        VmRow(
            id=vm_id,
            name=name,
            kind=str(entry["kind"]),
            disks=disks,
            definition=definition,
            created=str(entry.get("created") or now_iso()),
        ),
    )


def _restore_item(s: Session, vault: VaultRow, entry: JsonDict, policy_ids: dict[str, int]) -> None:
    vm_id = str(entry["vmId"])
    if repos.find_vm_by_id(s, vm_id) is None or repos.protected_item(s, vm_id) is not None:
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


def saves_settings(vault_of: Callable[[tuple[Any, ...], dict[str, Any], Any], str | None]) -> Callable[
    [Callable[P, R]], Callable[P, R]
]:
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
