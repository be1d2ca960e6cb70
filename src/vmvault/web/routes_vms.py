"""Virtual machines: the list, a VM's Backup page, Enable backup, Backup now, stop/resume protection."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from vmvault.api.auth import Permission, Scope, check_vault, vault_of_vm, visible
from vmvault.api.deps import Background
from vmvault.errors import Forbidden, InvalidInput
from vmvault.service import backups, dashboard, hosts, items, jobs, policies, protection, softdelete, vaults, vms
from vmvault.service.context import Context
from vmvault.service.views import NOT_PROTECTED, JsonDict
from vmvault.web.core import PortalRoute, access, can, ctx_of, principal_of, redirect, render, session_of

router = APIRouter(route_class=PortalRoute, include_in_schema=False)
NEW_VAULT = "__new__"
DEFAULT_RETAIN_DAYS = 30
def background(request: Request) -> Background:
    runner: Background = request.app.state.background
    return runner


def policy_summaries(ctx: Context, vault: str) -> list[JsonDict]:
    return [{**policies.policy_summary(view), "vault": vault} for view in policies.list_policies(ctx, vault)]


@router.get("/vms")
@access(Permission.READ)
def vm_list(request: Request, bucket: str = "", host: str = "") -> Response:
    """The VMs; ?bucket=healthy|warning|failed|never: the protected ones the overview counted so;
    ?host=NAME: the VMs of that host (the Hosts page links here)."""
    ctx, principal = ctx_of(request), principal_of(request)
    listed = vms.list_vms_with_status(ctx)
    rows = visible(principal, listed) if principal.vault else listed
    by_name = {i["name"]: i for i in items.list_items(ctx)}
    host_of = hosts.host_of_vms(ctx)
    for row in rows:
        row["item"] = by_name.get(row["name"])
        row["host"] = host_of.get(row["name"])
    chosen = bucket if bucket in dashboard.BUCKETS else ""
    if chosen:
        rows = [r for r in rows if r["item"] is not None and dashboard.backup_bucket(r["item"]) == chosen]
    if host:
        rows = [r for r in rows if r["host"] == host]
    return render(request, "vms.html", vms=rows, bucket=chosen, host=host)


@router.get("/vms/{vm}")
@access(Permission.READ, Scope.VM)
def vm_page(request: Request, vm: str) -> Response:
    ctx = ctx_of(request)
    view = vms.show_vm_with_status(ctx, vm)
    view["host"] = hosts.host_of_vms(ctx).get(vm)
    item = items.show_item(ctx, vm) if view["protectionState"] != NOT_PROTECTED else None
    summary, points = _item_parts(ctx, vm, item)
    recent = jobs.list_jobs(ctx, vm=vm, limit=5)
    choices = policy_summaries(ctx, item["vault"]) if item is not None else []
    default_retain = (ctx.now() + timedelta(days=DEFAULT_RETAIN_DAYS)).date().isoformat()
    tomorrow = (ctx.now() + timedelta(days=1)).date().isoformat()
    return render(
        request, "vm.html", vm=view, item=item, summary=summary, points=points, jobs=recent,
        default_retain=default_retain, tomorrow=tomorrow, policies=choices,
    )  # fmt: skip


def _item_parts(ctx: Context, vm: str, item: JsonDict | None) -> tuple[JsonDict | None, list[JsonDict]]:
    """The item's policy summary and its recovery points (soft-deleted ones too)."""
    if item is None:
        return None, []
    summary = None
    if item["policy"]:
        summary = policies.policy_summary(policies.show_policy(ctx, item["vault"], item["policy"]))
    return summary, backups.list_recovery_points(ctx, vm, include_deleted=True)


@router.get("/vms/{vm}/item")
@access(Permission.READ, Scope.VM)
def item_live(request: Request, vm: str) -> Response:
    """The Backup page's item facts and points alone: polled by portal.js while a backup runs."""
    ctx = ctx_of(request)
    item = items.show_item(ctx, vm)
    summary, points = _item_parts(ctx, vm, item)
    return render(request, "item_live.html", fragment=True, vm={"name": vm}, item=item, summary=summary, points=points)


@router.get("/vms/{vm}/jobs")
@access(Permission.READ, Scope.VM)
def recent_jobs(request: Request, vm: str) -> Response:
    """The Backup page's recent jobs alone: polled all the time the page is open (jobs start anywhere)."""
    rows = jobs.list_jobs(ctx_of(request), vm=vm, limit=5)
    return render(request, "vm_jobs.html", fragment=True, vm={"name": vm}, jobs=rows)


def _check_vm_scope(request: Request, vm: str) -> None:
    """A vault-scoped token: as in the API, nothing of a VM another vault protects (403)."""
    principal = principal_of(request)
    current = vault_of_vm(ctx_of(request), vm)
    if current is not None:
        check_vault(principal, current)


@router.get("/vms/{vm}/enable")
@access(Permission.PROTECTION_ENABLE, Scope.BODY)
def enable_form(request: Request, vm: str) -> Response:
    ctx, principal = ctx_of(request), principal_of(request)
    _check_vm_scope(request, vm)
    view = vms.show_vm(ctx, vm)
    known = visible(principal, vaults.list_vaults(ctx), key="name")
    options = [p for v in known for p in policy_summaries(ctx, v["name"])]
    return render(
        request, "enable.html", vm=view, vaults=known, policies=options,
        may_create_vault=can(principal, Permission.VAULT_CREATE) and principal.vault is None,
        inline_vault=bool(ctx.settings.passphrase),  # else a new vault needs its passphrase: the Create vault page
    )  # fmt: skip


@router.post("/vms/{vm}/enable")
@access(Permission.PROTECTION_ENABLE, Scope.BODY)
def enable(
    request: Request,
    vm: str,
    vault: Annotated[str, Form()] = "",
    new_vault: Annotated[str, Form()] = "",
    policy: Annotated[str, Form()] = "",
) -> Response:
    ctx, principal = ctx_of(request), principal_of(request)
    _check_vm_scope(request, vm)
    chosen_policy: str | None = policy.strip() or None
    if vault == NEW_VAULT:
        if not can(principal, Permission.VAULT_CREATE) or principal.vault is not None:
            raise Forbidden(f"role {principal.role} may not create vaults", hint="pick an existing vault")
        if not new_vault.strip():
            raise InvalidInput("give the new vault a name", hint="e.g. main")
        vaults.create_vault(ctx, new_vault.strip())
        vault, chosen_policy = new_vault.strip(), None  # a new vault has its DefaultPolicy only
    if not vault:
        raise InvalidInput("pick a vault", hint="or create one")
    check_vault(principal, vault)
    job = protection.enable_protection(ctx, vm, vault, policy=chosen_policy)
    session_of(request).toast(f"Backup enabled for {vm} in vault {vault}.", job=job.get("id"))
    return redirect(f"/vms/{vm}")


@router.post("/vms/{vm}/backup")
@access(Permission.BACKUP, Scope.VM)
def backup_now(request: Request, vm: str, retain_until: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    until = retain_until.strip() or None
    job = background(request).start(lambda cancel: backups.backup_now(ctx, vm, retain_until=until, cancel=cancel))
    session_of(request).toast(
        f"Backup of {vm} triggered (kept until {until or 'the default date'}).", job=str(job["id"])
    )
    return redirect(f"/vms/{vm}")


@router.post("/vms/{vm}/disable")
@access(Permission.PROTECTION_CHANGE, Scope.VM)
def disable(request: Request, vm: str, delete_data: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    job: dict[str, Any]
    if delete_data:
        job = softdelete.delete_backup_data(ctx, vm)
        message = f"Protection of {vm} stopped; its backup data is soft deleted (purged after 14 days)."
    else:
        job = protection.disable_protection(ctx, vm)
        message = f"Protection of {vm} stopped; its recovery points are kept."
    session_of(request).toast(message, job=job.get("id"))
    return redirect(f"/vms/{vm}")


@router.post("/vms/{vm}/policy")
@access(Permission.PROTECTION_CHANGE, Scope.VM)
def change_policy(request: Request, vm: str, policy: Annotated[str, Form()] = "") -> Response:
    if not policy:
        raise InvalidInput("pick a policy", hint="choose one in the list")
    job = protection.update_protection(ctx_of(request), vm, policy=policy)
    session_of(request).toast(f"{vm} now follows policy {policy}.", job=job.get("id"))
    return redirect(f"/vms/{vm}")


@router.post("/vms/{vm}/resume")
@access(Permission.PROTECTION_ENABLE, Scope.VM)
def resume(request: Request, vm: str) -> Response:
    job = protection.resume_protection(ctx_of(request), vm)
    session_of(request).toast(f"Protection of {vm} resumed.", job=job.get("id"))
    return redirect(f"/vms/{vm}")


@router.post("/vms/{vm}/undelete")
@access(Permission.PROTECTION_CHANGE, Scope.VM)
def undelete(request: Request, vm: str) -> Response:
    job = softdelete.undelete(ctx_of(request), vm)
    session_of(request).toast(f"Backup data of {vm} undeleted.", job=job.get("id"))
    return redirect(f"/vms/{vm}")
