"""A plain QEMU VM's point as a new VM: the JSON template, its launch script, booting it (docs/restore.md).

The template (connectors/qemu/template.py) is the point's command line rewritten for the copy: new
name, UUID, MACs, sockets in a run directory of its own, disks in the target directory.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import time
from pathlib import Path

from vmvault.connectors.contract import JsonDict, NewVm, NewVmRequest, WrittenDisk
from vmvault.connectors.guest_agent import GuestAgent
from vmvault.connectors.qemu import instant
from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
from vmvault.connectors.qemu.template import DiskTarget, build_template, has_definition, refuse_without_definition
from vmvault.connectors.workfiles import BOOT_TIMEOUT, copy_run_dir, write_new
from vmvault.errors import HypervisorError, InvalidInput, VmRunning


def template_file(target_dir: Path, vm_name: str) -> Path:
    return target_dir / f"{vm_name}-template.json"


def extra_files(target_dir: Path, new_name: str) -> list[Path]:
    """The copy's files besides its disks: definition, launch script, serial log, pid file, QEMU's log."""
    return [target_dir / f"{new_name}.json", target_dir / f"{new_name}.sh", target_dir / f"{new_name}-serial.log",
            target_dir / f"{new_name}.pid", target_dir / f"{new_name}-qemu.log"]  # fmt: skip


def refuse_new_vm(request: NewVmRequest, kind: str | None) -> None:
    if kind != "qmp":
        raise InvalidInput(
            f"VM '{request.source_vm}' has no VM definition: use restore disks",
            hint=f"vmvault restore disks {request.source_vm} --rp {request.rp_id} --target-dir DIR",
        )


def in_the_way(request: NewVmRequest) -> list[str]:
    target_dir = Path(request.target_dir)
    found = [str(p) for p in extra_files(target_dir, request.new_name) if p.exists()]
    run_dir = copy_run_dir(target_dir, request.new_name)
    if run_dir.exists() and any(run_dir.iterdir()):
        found.append(str(run_dir))
    return found


def check_point(request: NewVmRequest, definition: JsonDict) -> None:
    refuse_without_definition(definition, request.source_vm)


def create_new_vm(
    request: NewVmRequest, definition: JsonDict, disks: list[WrittenDisk], *, instant_copy: bool = False
) -> NewVm:
    """Write the copy's template and launch script; its catalog record (a QMP VM, like `vm add --qmp`)."""
    target_dir, name = Path(request.target_dir), request.new_name
    targets = [DiskTarget(d.name, Path(d.path), d.format, d.virtual_size) for d in disks]
    run_dir = copy_run_dir(target_dir, name)
    template = build_template(
        dict(definition), source_vm=request.source_vm, rp_id=request.rp_id, name=name, disks=targets, excluded=[],
        run_dir=run_dir, log_dir=target_dir,
    )  # fmt: skip
    if instant_copy:  # a read of the export that fails pauses the VM instead of failing in the guest
        known = {str(d.get("name")): d for d in definition.get("disks") or []}
        nodes = [str((known.get(d.name) or {}).get("node") or d.name) for d in disks]
        template["qemu"] = {**template["qemu"], "cmdline": instant.stop_on_errors(template["qemu"]["cmdline"], nodes)}
    definition_file, script = extra_files(target_dir, name)[:2]
    files: list[str] = []
    try:
        write_new(definition_file, json.dumps(template, indent=2) + "\n")
        files.append(str(definition_file))
        write_new(script, launch_script(template, run_dir), mode=0o755)
        files.append(str(script))
    except BaseException:
        for path in files:
            Path(path).unlink(missing_ok=True)
        raise
    record, record_disks = _record(request, template, definition, definition_file, script)
    view: JsonDict = {"uuid": template["uuid"], "macs": template["macs"], "disks": [d.path for d in disks],
                      "definitionFile": str(definition_file), "launchScript": str(script)}  # fmt: skip
    handle = {"template": template, "script": str(script), "log": str(target_dir / f"{name}-qemu.log")}
    return NewVm("qmp", record_disks, record, files, view, handle)


def _record(request: NewVmRequest, template: JsonDict, old: JsonDict, definition_file: Path,
            script: Path) -> tuple[JsonDict, list[JsonDict]]:  # fmt: skip
    old_disks = {str(d.get("name")): d for d in old.get("disks") or []}
    disks = [{**{k: v for k, v in old_disks.get(d["name"], {}).items() if k in ("node", "device")},
              "name": d["name"], "path": d["path"], "format": d["format"], "virtualSize": d["virtualSize"]}
             for d in template["disks"]]  # fmt: skip
    definition: JsonDict = {
        "kind": "qmp",
        "qmp": template["sockets"]["qmp"],
        "guestAgent": template["sockets"]["guestAgent"],
        "disks": disks,
        "machine": template["machine"],
        "qemu": template["qemu"],
        "restoredFrom": {"vm": request.source_vm, "point": request.rp_id},
        "definitionFile": str(definition_file),
        "launchScript": str(script),
    }
    records = [{"name": d["name"], "path": d["path"], "format": d["format"],
                **({"chain": []} if d["format"] == "qcow2" else {})} for d in disks]  # written by vmvault
    return definition, records


def launch_script(template: JsonDict, run_dir: Path) -> str:
    cmd = " \\\n  ".join(shlex.quote(a) for a in template["qemu"]["cmdline"])
    return (
        "#!/bin/sh\n"
        f"# vmvault: VM {template['name']} restored from {template['sourceVm']} point {template['sourcePoint']}\n"
        f"mkdir -p -m 700 {shlex.quote(str(run_dir))}\n"
        f"exec {cmd}\n"
    )


def start_vm(template: JsonDict, script: Path, log: Path, timeout: float = BOOT_TIMEOUT) -> None:
    """Run the launch script detached and wait until the guest agent answers (or QMP says running)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(["/bin/sh", str(script)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    agent, qmp = template["sockets"].get("guestAgent"), template["sockets"].get("qmp")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise HypervisorError(f"QEMU of the restored VM {template['name']} exited ({proc.returncode}): {tail}",
                                  hint=f"see {log}")  # fmt: skip
        with contextlib.suppress(Exception):
            if agent:
                with GuestAgent(agent).connect(timeout=2):
                    return
            elif qmp:
                with QmpClient(qmp).connect(greeting_timeout=2) as client:
                    if client.query_status().get("running"):
                        return
        time.sleep(0.5)
    raise HypervisorError(
        f"the restored VM {template['name']} started, but its guest agent did not answer within {timeout:.0f} s",
        hint=f"it is still running; see its serial log {template.get('serialLog')}",
    )


def disks_template(
    target_dir: Path, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
    written: list[WrittenDisk], force: bool,
) -> Path | None:  # fmt: skip
    """Write <vm>-template.json in target_dir for a plain QEMU VM's point (None: a disk-only VM, no template)."""
    if not has_definition(definition):
        return None
    targets = [DiskTarget(d.name, Path(d.path), d.format, d.virtual_size) for d in written]
    chosen = {t.name for t in targets}
    excluded = [n for n in in_point if n not in chosen]
    name = f"{source_vm}-restored"
    template = build_template(
        definition, source_vm=source_vm, rp_id=rp_id, name=name, disks=targets, excluded=excluded,
        run_dir=copy_run_dir(target_dir, name), log_dir=target_dir,
    )  # fmt: skip
    out = template_file(target_dir, source_vm)
    write_new(out, json.dumps(template, indent=2) + "\n", force=force)
    return out


def refuse_running(vm_name: str, definition: JsonDict) -> None:
    socket = definition.get("qmp")
    if not socket:
        return
    try:
        with QmpClient(str(socket)).connect(greeting_timeout=5):
            pass
    except QemuNotRunning:
        return
    except HypervisorError:
        pass  # busy socket: someone else talks to a running QEMU
    raise VmRunning(
        f"VM '{vm_name}' is running: its disks can only be replaced while it is stopped",
        hint="shut the VM down, then run restore replace-disks again",
    )
