"""The restore template: a recovery point's VM definition pointed at restored disks, with a new identity.

For a plain QEMU VM (definition kind "qmp", with the command line read at backup time) the template
is a JSON document (docs/restore.md):

    {"templateVersion": 1, "kind": "qemu", "name", "uuid", "macs", "sourceVm", "sourcePoint",
     "disks": [{"name", "path", "format", "virtualSize"}], "excludedDisks": [{"name", "reason"}],
     "sockets": {"qmp", "guestAgent"}, "serialLog", "machine", "qemu": {"binary", "cmdline"}}

A VM added from its disk images has no definition to restore: it gets no template.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.connectors.qemu.cmdline import CopyIdentity, RestoredDisk, rewrite
from vmvault.errors import InvalidInput

TEMPLATE_VERSION = 1
EXCLUDED_REASON = "not selected for this restore: left out of the template"
JsonDict = dict[str, Any]


@dataclass(frozen=True)
class DiskTarget:
    name: str
    path: Path
    fmt: str
    virtual_size: int


def has_definition(definition: JsonDict | None) -> bool:
    """A plain QEMU VM whose command line was recorded: a VM can be built from it."""
    d = definition or {}
    return d.get("kind") == "qmp" and bool((d.get("qemu") or {}).get("cmdline"))


def refuse_without_definition(definition: JsonDict | None, vm_name: str) -> None:
    if not has_definition(definition):
        raise InvalidInput(
            f"VM '{vm_name}': no VM definition: use restore disks",
            hint=f"vmvault restore disks {vm_name} --rp ID --target-dir DIR writes its disks",
        )


def build_template(
    definition: JsonDict,
    *,
    source_vm: str,
    rp_id: str,
    name: str,
    disks: list[DiskTarget],
    excluded: list[str],
    run_dir: Path,
    log_dir: Path,
) -> JsonDict:
    """The template of a copy of the VM: only `disks` (restored), `excluded` left out and said so."""
    by_name = {str(d.get("name")): d for d in definition.get("disks") or []}
    restored = []
    for target in disks:
        known = by_name.get(target.name) or {}
        restored.append(
            RestoredDisk(
                str(known.get("node") or target.name), str(known.get("path") or ""), str(target.path), target.fmt
            )
        )
    drop = [str((by_name.get(n) or {}).get("node") or n) for n in excluded]
    ident = CopyIdentity(name=name, uuid=str(uuidlib.uuid4()), run_dir=run_dir, log_dir=log_dir)
    qemu = dict(definition.get("qemu") or {})
    cmdline = rewrite(list(qemu.get("cmdline") or []), restored, drop, ident)
    sockets = ident.sockets
    agent = definition.get("guestAgent")
    machine = dict(definition.get("machine") or {})
    return {
        "templateVersion": TEMPLATE_VERSION,
        "kind": "qemu",
        "name": name,
        "uuid": ident.uuid,
        "macs": ident.macs,
        "sourceVm": source_vm,
        "sourcePoint": rp_id,
        "disks": [{"name": t.name, "path": str(t.path), "format": t.fmt, "virtualSize": t.virtual_size} for t in disks],
        "excludedDisks": [{"name": n, "reason": EXCLUDED_REASON} for n in excluded],
        "sockets": {
            "qmp": sockets.get(str(definition.get("qmp") or "")),
            "guestAgent": sockets.get(str(agent)) if agent else None,
        },
        "serialLog": next((a[5:] for a in cmdline if a.startswith("file:")), None),
        "pidFile": str(log_dir / f"{name}.pid"),
        "machine": {**machine, "name": name, "uuid": ident.uuid, "nics": [{"mac": m} for m in ident.macs]},
        "qemu": {"binary": cmdline[0], "cmdline": cmdline, "sourceVersion": qemu.get("version")},
    }


def template_paths(template: JsonDict) -> list[str]:
    """Every file path the template's copy would use (disks, sockets, logs)."""
    found = [str(d["path"]) for d in template.get("disks") or []]
    found += [str(p) for p in (template.get("sockets") or {}).values() if p]
    if template.get("serialLog"):
        found.append(str(template["serialLog"]))
    return found
