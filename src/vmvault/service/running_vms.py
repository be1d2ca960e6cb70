"""Running QEMU VMs driven over QMP: add them, report their guest agent.

Their backups run over the plain-QEMU connector (connectors/qemu/connector.py, docs/running-vms.md).
What vmvault keeps about such a VM lives in the catalog's `vms.definition`: the sockets, the last
seen definition, the changed-block tracking state ("tracking") and the last agent probe ("agent").
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.connectors.qemu.connector import KIND_QMP
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.validate import absolute, check_name
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")



# ---- vm add --qmp ----------------------------------------------------------------------------------


def add_qmp_vm(ctx: Context, name: str, qmp_socket: str | Path, agent_socket: str | Path | None = None) -> JsonDict:
    """Add a running QEMU VM: its disks and definition come from QMP (the VM must be running)."""
    from vmvault.connectors.qemu.connector import qmp_disk_record
    from vmvault.connectors.qemu.qmp import QmpClient
    from vmvault.connectors.qemu.vm import inspect_vm
    from vmvault.service.vms import _refuse_taken, _refuse_taken_in, _view

    check_name("VM", name)
    qmp_path = absolute(qmp_socket)
    agent_path = absolute(agent_socket) if agent_socket else None
    if agent_path is not None and agent_path == qmp_path:
        raise InvalidInput("the QMP socket and the guest agent socket are the same file", hint="give each its socket")
    _refuse_taken(ctx, name)
    with QmpClient(qmp_path).connect() as qmp:
        vm = inspect_vm(qmp)
    if not vm.disks:
        raise InvalidInput(f"the QEMU behind {qmp_path} has no writable disk to back up")
    definition: JsonDict = {
        "kind": KIND_QMP,
        "qmp": str(qmp_path),
        "guestAgent": str(agent_path) if agent_path else None,
        **vm.definition,
        "agent": _probe_now(str(agent_path) if agent_path else None, vm.running),
    }
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_QMP,
        disks=[qmp_disk_record(d) for d in vm.disks],
        definition=definition,
        created=now_iso(),
    )
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        repos.add_vm(s, row)
        return _view(s, row)


# ---- the guest agent's state (for `item show`) ---------------------------------------------------------


def agent_status(ctx: Context, vm_name: str, *, live: bool = False) -> JsonDict:
    """The VM's guest agent as Azure reports its VM extension: state, version, what it allows, and the fix.

    Without live, the state found by the last backup (or `vm add`); with live, probed now.
    """
    from vmvault.engine.consistency import INSTALL_AGENT_HINT

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, vm_name)
        definition = dict(row.definition or {})
    if definition.get("kind") != KIND_QMP:
        return {"state": "NotApplicable", "message": "the VM is backed up from its disk images (offline)",
                "recommendedAction": None}  # fmt: skip
    socket = definition.get("guestAgent")
    probe = dict(definition.get("agent") or {})
    if live:
        probe = _probe_now(socket, running=True)
        from vmvault.service.vms import save_definition

        save_definition(ctx, row.id, {"agent": probe})
    state = str(probe.get("state") or ("NotConfigured" if not socket else "Unknown"))
    fixes = {
        "NotConfigured": INSTALL_AGENT_HINT,
        "NotReachable": "start qemu-guest-agent in the guest and check the VM's org.qemu.guest_agent.0 port "
        f"on {socket}",
        "Limited": "allow guest-exec and guest-fsfreeze-* in the agent's configuration (its --block-rpcs / "
        "--allow-rpcs options)",
        "Unknown": f"run a backup, or check now with agent_status(live=True), to probe the agent on {socket}",
    }
    return {
        "state": state,
        "socket": socket,
        "version": probe.get("version"),
        "os": probe.get("os"),
        "guestExec": probe.get("guestExec"),
        "fsFreeze": probe.get("fsFreeze"),
        "lastChecked": probe.get("checked"),
        "recommendedAction": fixes.get(state),
    }


def _probe_now(socket: str | None, running: bool) -> JsonDict:
    from vmvault.connectors.guest_agent import GuestAgent
    from vmvault.engine.consistency import probe_agent
    from vmvault.errors import HypervisorError

    if not socket:
        return {"state": "NotConfigured", "checked": now_iso()}
    if not running:
        return {"state": "Unknown", "checked": now_iso()}
    try:
        with GuestAgent(socket).connect() as agent:
            probe = probe_agent(agent)
    except HypervisorError:
        return {"state": "NotReachable", "checked": now_iso()}
    state = "Ready" if probe.exec_allowed and probe.freeze_allowed else "Limited"
    return {"state": state, "checked": now_iso(), **probe.to_dict()}
