"""A VM's guest agent: its state for `item show`, and adding its channel (`vm enable-agent`).

What a guest agent allows decides whether a point can be application-consistent; each kind's
connector knows how its VMs reach theirs (a QMP VM's socket, a libvirt domain's channel).
"""

from __future__ import annotations

from vmvault.catalog import repos
from vmvault.catalog.models import VmRow
from vmvault.service.context import Context
from vmvault.service.views import JsonDict


def agent_status(ctx: Context, vm_name: str, *, live: bool = False) -> JsonDict:
    """The VM's guest agent as Azure reports its VM extension: state, version, what it allows, and the fix.

    Without live, the state found by the last backup (or `vm add`); with live, probed now (and kept).
    """
    from vmvault.connectors.registry import connector_for
    from vmvault.service.vms import save_definition

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, vm_name)
        vm_id, definition = row.id, dict(row.definition or {})
    view, probe = connector_for(definition.get("kind")).agent_status(definition, live=live)
    if probe is not None:
        save_definition(ctx, vm_id, {"agent": probe})
    return view


def agent_advice(row: VmRow) -> JsonDict | None:
    """What item show says about whether the VM's points can be quiesced, and the fix when not (None: nothing)."""
    from vmvault.connectors.registry import connector_for

    return connector_for(row.kind).agent_advice(row.name, dict(row.definition or {}))


def enable_agent(ctx: Context, name: str) -> JsonDict:
    """Add the guest agent channel to the VM's definition where vmvault can (a libvirt domain; idempotent)."""
    from vmvault.connectors.registry import connector_for

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, name)
        kind, definition = row.kind, dict(row.definition or {})
    return connector_for(kind).enable_agent(name, definition)
