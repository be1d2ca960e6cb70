"""Vaults: list and create; a vault's policies (view, create, edit), usage and pricing, storage chart."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from markupsafe import Markup
from starlette.responses import JSONResponse, PlainTextResponse, Response

from vmvault.api.auth import Permission, Scope, visible
from vmvault.errors import Forbidden, InvalidInput, VmvaultError
from vmvault.service import gc, notify, policies, usage, vaults
from vmvault.service.validate import check_passphrase
from vmvault.web.charts import storage_series, storage_svg
from vmvault.web.core import (
    PortalRoute,
    access,
    ctx_of,
    principal_of,
    redirect,
    render,
    secret_channel,
    session_of,
)
from vmvault.web.policyform import PolicyForm
from vmvault.web.routes_vms import background
from vmvault.web.wording import recovery_sheet

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


@router.get("/vaults")
@access(Permission.READ)
def vault_list(request: Request) -> Response:
    rows = visible(principal_of(request), vaults.list_vaults(ctx_of(request)), key="name")
    return render(request, "vaults.html", vaults=rows)


def _create_page(request: Request, error: VmvaultError | None = None, **typed: str) -> Response:
    return render(
        request, "vault_new.html", status_code=error.http_status if error else 200, error=error,
        secure=secret_channel(request), redundancies=vaults.OFFERED_REDUNDANCIES, typed=typed,
    )  # fmt: skip


@router.get("/vaults/new")
@access(Permission.VAULT_CREATE)
def vault_new(request: Request) -> Response:
    return _create_page(request)


@router.post("/vaults/passphrase-check")
@access(Permission.VAULT_CREATE)
def passphrase_check(request: Request, passphrase: Annotated[str, Form()] = "") -> Response:
    """The strength shown while typing: the very rules `create_vault` applies (service/validate.py)."""
    _require_secret_channel(request)
    try:
        check_passphrase(passphrase, "new")
    except InvalidInput as exc:
        return JSONResponse({"ok": False, "message": exc.message.replace(" for vault 'new'", ""), "hint": exc.hint})
    return JSONResponse({"ok": True, "message": "12 characters or more, not a common password"})


@router.post("/vaults")
@access(Permission.VAULT_CREATE)
def vault_create(
    request: Request,
    name: Annotated[str, Form()] = "",
    redundancy: Annotated[str, Form()] = "LRS",
    passphrase: Annotated[str, Form()] = "",
    passphrase2: Annotated[str, Form()] = "",
    understood: Annotated[str, Form()] = "",
) -> Response:
    name = name.strip()
    typed = {"name": name, "redundancy": redundancy}
    try:
        secret = _checked_secret(request, passphrase, passphrase2, understood)
        vaults.create_vault(ctx_of(request), name, redundancy=redundancy, passphrase=secret)
    except (InvalidInput, Forbidden) as exc:  # shown beside the form, which keeps the name
        return _create_page(request, exc, **typed)
    session_of(request).toast(f"Vault {name} created with its DefaultPolicy. Download its recovery sheet now.")
    return redirect(f"/vaults/{name}?created=1")


def _require_secret_channel(request: Request, outcome: str = "") -> None:
    if not secret_channel(request):
        raise Forbidden(
            f"a passphrase may only be sent over HTTPS or from this server itself{outcome}",
            hint="open the portal over HTTPS, or from a browser on the server (localhost)",
        )


def _checked_secret(request: Request, passphrase: str, again: str, understood: str) -> str | None:
    """The passphrase typed twice (only over HTTPS or loopback); None: the server's own (its environment)."""
    if not passphrase and not again:
        if ctx_of(request).settings.passphrase:
            return None
        raise InvalidInput("a passphrase is required to create the vault", hint="type a passphrase in both fields")
    _require_secret_channel(request, "; nothing was created")
    if passphrase != again:
        raise InvalidInput("the two passphrases differ; nothing was created", hint="type the same passphrase twice")
    if not understood:
        raise InvalidInput(
            "confirm that you keep the passphrase safe: without it the backups are lost with this server",
            hint="tick the box under the passphrase",
        )
    return passphrase


@router.get("/vaults/{vault}/recovery-sheet")
@access(Permission.READ, Scope.VAULT)
def recovery_sheet_get(request: Request, vault: str) -> Response:
    return _sheet(request, vault, None)


@router.post("/vaults/{vault}/recovery-sheet")
@access(Permission.VAULT_CREATE, Scope.VAULT)
def recovery_sheet_post(request: Request, vault: str, passphrase: Annotated[str, Form()] = "") -> Response:
    """The sheet with the passphrase written on it, when the user asks: only after it opens the vault."""
    if not passphrase:
        raise InvalidInput(
            "type the vault's passphrase to write it on the sheet", hint="or download the sheet without it"
        )
    _require_secret_channel(request)
    vaults.check_vault_passphrase(ctx_of(request), vault, passphrase)
    return _sheet(request, vault, passphrase)


def _sheet(request: Request, vault: str, passphrase: str | None) -> Response:
    view = vaults.show_vault(ctx_of(request), vault)
    text = recovery_sheet(view, ctx_of(request).now().strftime("%Y-%m-%d %H:%M UTC"), passphrase)
    headers = {"Content-Disposition": f'attachment; filename="vmvault-recovery-sheet-{vault}.txt"'}
    return PlainTextResponse(text, headers=headers)


@router.get("/vaults/{vault}")
@access(Permission.READ, Scope.VAULT)
def vault_page(request: Request, vault: str) -> Response:
    ctx = ctx_of(request)
    view = vaults.show_vault(ctx, vault)
    rows = [policies.policy_summary(p) for p in policies.list_policies(ctx, vault)]
    bill = usage.vault_usage(ctx, vault)
    chart = Markup(storage_svg(storage_series(ctx, vault)))  # built from numbers and escaped text only
    created = request.query_params.get("created") == "1"
    targets = notify.list_targets(ctx, vault)
    return render(
        request, "vault.html", vault=view, policies=rows, usage=bill, chart=chart, created=created, targets=targets,
        secure=secret_channel(request),
    )  # fmt: skip


def _policy_form(request: Request, vault: str, form: PolicyForm, *, new: bool, error: InvalidInput | None) -> Response:
    view = None if new else policies.show_policy(ctx_of(request), vault, form.name)
    return render(
        request, "policy.html", status_code=422 if error else 200, vault=vault, form=form, new=new, error=error,
        summary=policies.policy_summary(view) if view else None, notes=view["notes"] if view else [],
    )  # fmt: skip


@router.get("/vaults/{vault}/policies/new")
@access(Permission.POLICY_WRITE, Scope.VAULT)
def policy_new(request: Request, vault: str) -> Response:
    vaults.show_vault(ctx_of(request), vault)  # 404 for an unknown vault
    return _policy_form(request, vault, PolicyForm(), new=True, error=None)


def _form(
    name: str, frequency: str, time: str, days: list[str], time_zone: str, daily_days: str, weekly_weeks: str,
    interval: str = "4", window_hours: str = "12",
) -> PolicyForm:  # fmt: skip
    return PolicyForm(
        name.strip(), frequency, time.strip(), days, time_zone, daily_days, weekly_weeks, interval, window_hours
    )


@router.post("/vaults/{vault}/policies/new")
@access(Permission.POLICY_WRITE, Scope.VAULT)
def policy_create(
    request: Request,
    vault: str,
    name: Annotated[str, Form()] = "",
    frequency: Annotated[str, Form()] = "Daily",
    time: Annotated[str, Form()] = "",
    days: Annotated[list[str] | None, Form()] = None,
    time_zone: Annotated[str, Form()] = "UTC",
    daily_days: Annotated[str, Form()] = "",
    weekly_weeks: Annotated[str, Form()] = "",
    interval: Annotated[str, Form()] = "4",
    window_hours: Annotated[str, Form()] = "12",
) -> Response:
    form = _form(name, frequency, time, days or [], time_zone, daily_days, weekly_weeks, interval, window_hours)
    try:
        policies.create_policy(ctx_of(request), vault, form.name, form.document())
    except InvalidInput as exc:  # shown beside the form, which keeps what was typed
        return _policy_form(request, vault, form, new=True, error=exc)
    session_of(request).toast(f"Policy {form.name} created in vault {vault}.")
    return redirect(f"/vaults/{vault}/policies/{form.name}")


@router.get("/vaults/{vault}/policies/{policy}")
@access(Permission.READ, Scope.VAULT)
def policy_page(request: Request, vault: str, policy: str) -> Response:
    view = policies.show_policy(ctx_of(request), vault, policy)
    return _policy_form(request, vault, PolicyForm.of(policy, view["properties"]), new=False, error=None)


@router.post("/vaults/{vault}/policies/{policy}")
@access(Permission.POLICY_WRITE, Scope.VAULT)
def policy_set(
    request: Request,
    vault: str,
    policy: str,
    frequency: Annotated[str, Form()] = "Daily",
    time: Annotated[str, Form()] = "",
    days: Annotated[list[str] | None, Form()] = None,
    time_zone: Annotated[str, Form()] = "UTC",
    daily_days: Annotated[str, Form()] = "",
    weekly_weeks: Annotated[str, Form()] = "",
    interval: Annotated[str, Form()] = "4",
    window_hours: Annotated[str, Form()] = "12",
) -> Response:
    ctx = ctx_of(request)
    current = policies.show_policy(ctx, vault, policy)
    form = _form(policy, frequency, time, days or [], time_zone, daily_days, weekly_weeks, interval, window_hours)
    try:
        policies.set_policy(ctx, vault, policy, form.document(current["properties"]))
    except InvalidInput as exc:
        return _policy_form(request, vault, form, new=False, error=exc)
    session_of(request).toast(f"Policy {policy} saved; its protected items follow the new rules.")
    return redirect(f"/vaults/{vault}/policies/{policy}")


@router.post("/vaults/{vault}/policies/{policy}/delete")
@access(Permission.POLICY_WRITE, Scope.VAULT)
def policy_delete(request: Request, vault: str, policy: str) -> Response:
    policies.delete_policy(ctx_of(request), vault, policy)
    session_of(request).toast(f"Policy {policy} deleted.")
    return redirect(f"/vaults/{vault}")


# ---- vault actions: verify, garbage collection, notification targets ----------------------------


@router.post("/vaults/{vault}/verify")
@access(Permission.VAULT_VERIFY, Scope.VAULT)
def vault_verify(request: Request, vault: str) -> Response:
    ctx = ctx_of(request)
    return _vault_job(request, vault, "Verification", lambda cancel: vaults.verify_vault(ctx, vault, cancel=cancel))


@router.post("/vaults/{vault}/gc")
@access(Permission.VAULT_VERIFY, Scope.VAULT)
def vault_gc(request: Request, vault: str) -> Response:
    ctx = ctx_of(request)
    return _vault_job(
        request, vault, "Garbage collection", lambda cancel: gc.garbage_collect(ctx, vault, cancel=cancel)
    )


def _vault_job(request: Request, vault: str, what: str, work: Callable[[threading.Event], Any]) -> Response:
    """Starts a vault's job in the background and shows its page (an unknown vault: 404 before any job)."""
    vaults.show_vault(ctx_of(request), vault)
    job = background(request).start(work)
    session_of(request).toast(f"{what} of vault {vault} started.", job=str(job["id"]))
    return redirect(f"/jobs/{job['id']}")


@router.post("/vaults/{vault}/notifications")
@access(Permission.NOTIFY_WRITE, Scope.VAULT)
def notify_add(
    request: Request,
    vault: str,
    kind: Annotated[str, Form()] = "webhook",
    address: Annotated[str, Form()] = "",
    smtp: Annotated[str, Form()] = "",
    events: Annotated[str, Form()] = "failed",
) -> Response:
    ctx, address = ctx_of(request), address.strip()
    if kind == "email":
        notify.add_target(ctx, vault, email=address, smtp=smtp.strip() or None, events=events)
    else:
        notify.add_target(ctx, vault, webhook=address, events=events)
    session_of(request).toast(f"Notifications of vault {vault} now go to {address}.")
    return redirect(f"/vaults/{vault}#notifications")


@router.post("/vaults/{vault}/notifications/{target_id}/delete")
@access(Permission.NOTIFY_WRITE, Scope.VAULT)
def notify_remove(request: Request, vault: str, target_id: int) -> Response:
    notify.remove_target(ctx_of(request), vault, target_id)
    session_of(request).toast(f"Notification target {target_id} removed from vault {vault}.")
    return redirect(f"/vaults/{vault}#notifications")
