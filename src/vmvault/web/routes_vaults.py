"""Vaults: list and create; a vault's policies (view, create, edit), usage and pricing, storage chart."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from markupsafe import Markup
from starlette.responses import Response

from vmvault.api.auth import Permission, Scope, visible
from vmvault.errors import InvalidInput
from vmvault.service import policies, usage, vaults
from vmvault.web.charts import storage_series, storage_svg
from vmvault.web.core import PortalRoute, access, ctx_of, principal_of, redirect, render, session_of
from vmvault.web.policyform import PolicyForm

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


@router.get("/vaults")
@access(Permission.READ)
def vault_list(request: Request) -> Response:
    rows = visible(principal_of(request), vaults.list_vaults(ctx_of(request)), key="name")
    return render(request, "vaults.html", vaults=rows)


@router.post("/vaults")
@access(Permission.VAULT_CREATE)
def vault_create(
    request: Request, name: Annotated[str, Form()] = "", redundancy: Annotated[str, Form()] = "LRS"
) -> Response:
    vaults.create_vault(ctx_of(request), name.strip(), redundancy=redundancy)
    session_of(request).toast(f"Vault {name.strip()} created with its DefaultPolicy.")
    return redirect(f"/vaults/{name.strip()}")


@router.get("/vaults/{vault}")
@access(Permission.READ, Scope.VAULT)
def vault_page(request: Request, vault: str) -> Response:
    ctx = ctx_of(request)
    view = vaults.show_vault(ctx, vault)
    rows = [policies.policy_summary(p) for p in policies.list_policies(ctx, vault)]
    bill = usage.vault_usage(ctx, vault)
    chart = Markup(storage_svg(storage_series(ctx, vault)))  # built from numbers and escaped text only
    return render(request, "vault.html", vault=view, policies=rows, usage=bill, chart=chart)


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
