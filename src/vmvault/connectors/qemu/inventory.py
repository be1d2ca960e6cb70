"""A plain QEMU VM as `vm add --qmp`, `vm list`, `item show` and `doctor` see it: QMP and the guest agent."""

from __future__ import annotations

from pathlib import Path

from vmvault.catalog.clock import now_iso
from vmvault.connectors.consistency import INSTALL_AGENT_HINT, probe_agent
from vmvault.connectors.contract import JsonDict
from vmvault.connectors.guest_agent import GuestAgent
from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
from vmvault.connectors.qemu.vm import KIND_QMP, inspect_vm, qmp_disk_record
from vmvault.errors import HypervisorError, InvalidInput

STATUS_TIMEOUT_S = 1.0  # per socket: vm list stays fast when a QEMU or agent hangs
AGENT_TIMEOUT_S = 3  # doctor
PASS, WARN, FAIL = "pass", "warn", "fail"


def describe(where: JsonDict) -> tuple[list[JsonDict], JsonDict]:
    """The running QEMU behind where["qmp"]: its disk records and definition (the VM must be running)."""
    qmp_path, agent = Path(str(where["qmp"])), where.get("guestAgent")
    with QmpClient(qmp_path).connect() as qmp:
        vm = inspect_vm(qmp)
    if not vm.disks:
        raise InvalidInput(f"the QEMU behind {qmp_path} has no writable disk to back up")
    definition: JsonDict = {
        "kind": KIND_QMP,
        "qmp": str(qmp_path),
        "guestAgent": str(agent) if agent else None,
        **vm.definition,
        "agent": probe_now(str(agent) if agent else None, vm.running),
    }
    return [qmp_disk_record(d) for d in vm.disks], definition


def probe_now(socket: str | None, running: bool) -> JsonDict:
    """The guest agent's state as `item show` reports it (Ready, Limited, NotReachable...), probed now."""
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


def agent_status(definition: JsonDict, *, live: bool) -> tuple[JsonDict, JsonDict | None]:
    """The VM's guest agent as Azure reports its VM extension; with live, probed now (and the probe to keep)."""
    socket = definition.get("guestAgent")
    probe = dict(definition.get("agent") or {})
    fresh = None
    if live:
        probe = fresh = probe_now(socket, running=True)
    state = str(probe.get("state") or ("NotConfigured" if not socket else "Unknown"))
    fixes = {
        "NotConfigured": INSTALL_AGENT_HINT,
        "NotReachable": "start qemu-guest-agent in the guest and check the VM's org.qemu.guest_agent.0 port "
        f"on {socket}",
        "Limited": "allow guest-exec and guest-fsfreeze-* in the agent's configuration (its --block-rpcs / "
        "--allow-rpcs options)",
        "Unknown": f"run a backup, or check now with agent_status(live=True), to probe the agent on {socket}",
    }
    view = {
        "state": state,
        "socket": socket,
        "version": probe.get("version"),
        "os": probe.get("os"),
        "guestExec": probe.get("guestExec"),
        "fsFreeze": probe.get("fsFreeze"),
        "lastChecked": probe.get("checked"),
        "recommendedAction": fixes.get(state),
    }
    return view, fresh


def status(definition: JsonDict) -> JsonDict:
    """Running when its QMP socket answers, else stopped; and whether its guest agent answers."""
    qmp = definition.get("qmp")
    if not qmp:
        return {"powerState": "unknown", "agent": "n/a (disk images)"}
    try:
        with QmpClient(str(qmp)).connect(greeting_timeout=STATUS_TIMEOUT_S) as client:
            state_of = client.query_status()
        state = "running" if state_of.get("running") else str(state_of.get("status") or "paused")
    except QemuNotRunning:
        return {"powerState": "stopped", "agent": "not running" if definition.get("guestAgent") else "no socket"}
    except (HypervisorError, OSError):
        state = "unknown (QMP busy)"
    agent = definition.get("guestAgent")
    if not agent:
        return {"powerState": state, "agent": "no socket"}
    try:
        with GuestAgent(str(agent), timeout=STATUS_TIMEOUT_S).connect(timeout=STATUS_TIMEOUT_S):
            reachable = "answers"
    except (HypervisorError, OSError):
        reachable = "no answer"
    return {"powerState": state, "agent": reachable}


def doctor_vm(vm_name: str, definition: JsonDict) -> list[JsonDict]:
    """QMP answers; the guest agent is configured and answers."""
    label = f"vm {vm_name}"
    try:
        with QmpClient(str(definition.get("qmp"))).connect(greeting_timeout=AGENT_TIMEOUT_S) as client:
            client.query_status()
    except QemuNotRunning:
        return [_check(label, WARN, f"QEMU is not running (QMP socket {definition.get('qmp')})",
                       "start the VM before its backup, or back up its disks offline")]  # fmt: skip
    checks = [_check(label, PASS, f"QMP answers at {definition.get('qmp')}")]
    agent = definition.get("guestAgent")
    if not agent:
        checks.append(_check(
            f"{label} guest agent", WARN, "no guest agent channel: backups are CrashConsistent",
            f"give QEMU a virtserialport named org.qemu.guest_agent.0 and re-add the VM with "
            f"vmvault vm add {vm_name} --qmp SOCKET --guest-agent AGENT_SOCKET",
        ))  # fmt: skip
        return checks
    try:
        with GuestAgent(str(agent), timeout=AGENT_TIMEOUT_S).connect(timeout=AGENT_TIMEOUT_S):
            pass
    except (HypervisorError, OSError) as exc:
        checks.append(_check(f"{label} guest agent", FAIL, f"the guest agent at {agent} does not answer: {exc}",
                             "install and start qemu-guest-agent inside the guest"))  # fmt: skip
        return checks
    checks.append(_check(f"{label} guest agent", PASS, f"the guest agent answers at {agent}"))
    return checks


def fleece_space(where: Path, disks: list[JsonDict]) -> list[JsonDict]:
    """Running QEMU VMs are backed up through fleece overlays under HOME/fleece: they need real disk space."""
    import os

    from vmvault.connectors.qemu.snapshot import FLEECE_MARGIN, filesystem_type

    fs = filesystem_type(where)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    needed = FLEECE_MARGIN + sum(_allocated(d) for d in disks)
    if fs in ("tmpfs", "ramfs"):
        return [_check("fleece space", WARN, f"{where} is on {fs}: fleece overlays of live backups would fill memory",
                       "put VMVAULT_HOME on a disk-backed file system")]  # fmt: skip
    if free < needed:
        return [_check("fleece space", FAIL, f"{free >> 20} MiB free in {where}; live backups of the running QEMU "
                       f"VMs need up to {needed >> 20} MiB for fleece overlays",
                       f"free space in {where} or move VMVAULT_HOME")]  # fmt: skip
    return [_check("fleece space", PASS, f"{free / (1 << 30):.1f} GiB free in {where} ({fs}) for fleece overlays")]


def _allocated(disk: JsonDict) -> int:
    import os

    try:
        return os.stat(str(disk.get("path"))).st_blocks * 512
    except OSError:
        return 0


def _check(name: str, status: str, detail: str, fix: str | None = None) -> JsonDict:
    return {"name": name, "status": status, "detail": detail, "fix": fix}
