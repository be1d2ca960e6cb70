"""Backup policies of a vault: list, show (as `az backup policy show`), create, set, delete.

A policy is stored as its canonical Azure properties (domain.policy.to_properties: the time
zone as the user named it, kept fields as given); items reference it by id, so `policy set`
moves every item to the new rules at once. `policy show` adds ``notes``: what of the policy
vmvault keeps without acting on it (domain.policy.policy_notes; docs/policies.md).
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import PolicyRow, VaultRow
from vmvault.domain.policy import (
    DEFAULT_POLICY_NAME,
    WEEKDAYS,
    Policy,
    default_policy,
    parse_policy,
    policy_notes,
    to_properties,
)
from vmvault.errors import AlreadyExists, Busy, InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.validate import check_name
from vmvault.service.vaultsettings import saves_settings, vault_argument
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")
POLICY_TYPE = "Microsoft.RecoveryServices/vaults/backupPolicies"


def policy_of(row: PolicyRow) -> Policy:
    """The domain policy of a stored row (stored rows are canonical, so this does not fail)."""
    return parse_policy(row.properties)


def policy_view(s: Session, vault: VaultRow, row: PolicyRow) -> JsonDict:
    """A policy as `az backup policy show` prints it."""
    properties = dict(row.properties)
    properties["protectedItemsCount"] = len(repos.items_with_policy(s, row.id))
    return {
        "id": f"/vaults/{vault.name}/backupPolicies/{row.name}",
        "name": row.name,
        "type": POLICY_TYPE,
        "vault": vault.name,
        "properties": properties,
        "notes": policy_notes(policy_of(row)),
    }


def policy_summary(view: JsonDict) -> JsonDict:
    """One table row of `policy list`."""
    props = view["properties"]
    policy = parse_policy(props)
    retention = props["retentionPolicy"]
    sched = policy.schedule
    times = ", ".join(t.strftime("%H:%M") for t in sched.run_times)
    days = ", ".join(WEEKDAYS[d] for d in sched.run_days)
    rules = []
    for key, label in (("dailySchedule", "daily"), ("weeklySchedule", "weekly"), ("monthlySchedule", "monthly"),
                       ("yearlySchedule", "yearly")):  # fmt: skip
        rule = retention.get(key)
        if rule:
            d = rule["retentionDuration"]
            rules.append(f"{label} {d['count']} {d['durationType'].lower()}")
    return {
        "name": view["name"],
        "frequency": sched.frequency,
        "days": days,
        "time": times,
        "timeZone": props["timeZone"],
        "retention": ", ".join(rules),
        "protectedItems": props["protectedItemsCount"],
    }


# ---- reading policy files -----------------------------------------------------------------------


def read_policy_file(path: str | Path) -> Any:
    """The JSON of a policy file; InvalidInput names the file (and the line of a syntax error)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"policy file {file} not found", hint="pass an existing JSON file to --file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read policy file {file}: {exc}", hint="pass a readable JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"policy file {file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            hint="start from: vmvault policy show DefaultPolicy --vault V -o json",
        ) from None


# ---- use cases ----------------------------------------------------------------------------------


def add_default_policy(s: Session, vault: VaultRow, time_zone: str = "UTC") -> PolicyRow:
    """Give a new vault its DefaultPolicy (inside the caller's transaction)."""
    now = now_iso()
    row = PolicyRow(
        vault_id=vault.id,
        name=DEFAULT_POLICY_NAME,
        properties=to_properties(default_policy(time_zone)),
        created=now,
        modified=now,
    )
    return repos.add_policy(s, row)


def list_policies(ctx: Context, vault_name: str) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, vault_name)
        return [policy_view(s, vault, row) for row in repos.list_policies(s, vault.id)]


def show_policy(ctx: Context, vault_name: str, name: str) -> JsonDict:
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, vault_name)
        return policy_view(s, vault, repos.get_policy(s, vault, name))


@saves_settings(vault_argument)
def create_policy(ctx: Context, vault_name: str, name: str, document: Any) -> JsonDict:
    """Add a policy from its JSON; refused (nothing stored) when invalid or the name is taken."""
    check_name("policy", name)
    properties = to_properties(parse_policy(document))
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        if repos.find_policy(s, vault.id, name) is not None:
            raise AlreadyExists(
                f"policy '{name}' already exists in vault '{vault_name}'",
                hint=f"change it with: vmvault policy set {name} --vault {vault_name} --file FILE",
            )
        now = now_iso()
        row = repos.add_policy(
            s, PolicyRow(vault_id=vault.id, name=name, properties=properties, created=now, modified=now)
        )
        return policy_view(s, vault, row)


@saves_settings(vault_argument)
def set_policy(ctx: Context, vault_name: str, name: str, document: Any) -> JsonDict:
    """Replace a policy's rules; its items follow them from now on and their points' expiry is recomputed."""
    properties = to_properties(parse_policy(document))
    now_utc = ctx.now()
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        row = repos.get_policy(s, vault, name)
        row.properties = properties
        row.modified = now_iso()
        anchor = now_utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for item in repos.items_with_policy(s, row.id):
            # The new schedule counts from now: a slot of the new times that already passed today
            # is not a "missed" backup.
            if item.schedule_anchor is None or item.schedule_anchor < anchor:
                item.schedule_anchor = anchor
        s.flush()
    recompute_points_expiry(ctx, vault, row)
    return show_policy(ctx, vault_name, name)


def recompute_points_expiry(ctx: Context, vault: VaultRow, row: PolicyRow) -> bool:
    """Ask retention (service/retention.py, when present) to recompute the expiry of the policy's points.

    Returns False, leaving every expiry as it is, when this build has no retention module.
    """
    try:
        retention = importlib.import_module("vmvault.service.retention")
    except ModuleNotFoundError as exc:
        if exc.name != "vmvault.service.retention":
            raise
        return False
    recompute = getattr(retention, "recompute_expiry", None)
    if recompute is None:
        log.info("service.retention has no recompute_expiry: expiry of existing points left unchanged")
        return False
    recompute(ctx, vault, row)
    return True


@saves_settings(vault_argument)
def delete_policy(ctx: Context, vault_name: str, name: str) -> None:
    """Delete a policy no item uses."""
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        row = repos.get_policy(s, vault, name)
        users = repos.items_with_policy(s, row.id)
        if users:
            names = ", ".join(sorted(_vm_name(s, item.vm_id) for item in users))
            raise Busy(
                f"policy '{name}' is used by {len(users)} item(s): {names}",
                hint="move them to another policy first: vmvault protection update VM --policy OTHER",
            )
        s.delete(row)


def _vm_name(s: Session, vm_id: str) -> str:
    vm = repos.find_vm_by_id(s, vm_id)
    return vm.name if vm else vm_id


def resolve_policy(s: Session, vault: VaultRow, name: str | None) -> PolicyRow:
    """The named policy of the vault (default: DefaultPolicy)."""
    return repos.get_policy(s, vault, name or DEFAULT_POLICY_NAME)
