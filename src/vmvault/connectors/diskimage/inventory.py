"""A VM given by its disk images as `vm add --disk`, `vm set-format` and `doctor` see it."""

from __future__ import annotations

from pathlib import Path

from vmvault.connectors.contract import JsonDict
from vmvault.connectors.diskimage.diskformat import chain_from_record, chain_to_record, read_qcow2_header
from vmvault.connectors.diskimage.images import DiskInfo, disk_info, probe_format
from vmvault.errors import InvalidInput, VmvaultError

PASS, FAIL = "pass", "fail"


def inspect(path: Path, fmt: str | None) -> DiskInfo:
    """The disk's info opened as `fmt`; guessed (once, here) when the user gave none."""
    if fmt is None:
        fmt = probe_format(path)
        header = read_qcow2_header(path) if fmt == "qcow2" else None
        if header is not None and (header.backing_name or header.data_file):
            named = header.backing_name or "an external data file"
            raise InvalidInput(
                f"disk {path} looks like a qcow2 image that names {named!r}; vmvault does not trust a "
                "guessed format with a backing file (a guest can write such a header into a raw disk)",
                hint=f"say what it is: --format qcow2 if {path} is a qcow2 image you made, --format raw if the "
                "VM uses it as a raw disk",
                code="disk_format_ambiguous",
            )
    return disk_info(path, fmt)


def disk_record(name: str, info: DiskInfo) -> JsonDict:
    """A disk as the catalog keeps it (vms.disks): its format and qcow2 chain, fixed at `vm add`."""
    record: JsonDict = {"name": name, "path": str(info.path), "format": info.format}
    if info.format == "qcow2":
        record["chain"] = chain_to_record(list(info.chain))
    return record


def describe(where: JsonDict) -> tuple[list[JsonDict], JsonDict]:
    """where["disks"]: [{"path", "format" or None}] in order (disk0..N): their records and the VM's definition."""
    infos = [inspect(Path(str(d["path"])), d.get("format")) for d in where["disks"]]
    definition = [{"name": f"disk{i}", "path": str(d["path"]), "format": info.format,
                   "virtualSize": int(info.virtual_size)} for i, (d, info) in enumerate(zip(where["disks"], infos,
                                                                                        strict=True))]  # fmt: skip
    return [disk_record(f"disk{i}", info) for i, info in enumerate(infos)], {"disks": definition}


def doctor_vm(vm_name: str, disks: list[JsonDict]) -> list[JsonDict]:
    """Each image opens as recorded at `vm add` (never guessed from the content); its chain is checked too."""
    checks = []
    for disk in disks:
        label = f"vm {vm_name} disk {disk.get('name')}"
        path = Path(str(disk.get("path")))
        try:
            chain = chain_from_record(disk["chain"]) if "chain" in disk else None
            info = disk_info(path, str(disk.get("format")), chain)
        except VmvaultError as exc:
            checks.append({"name": label, "status": FAIL, "detail": exc.message, "fix": exc.hint})
            continue
        detail = f"{path}: {info.format}, {info.virtual_size} bytes, not locked"
        checks.append({"name": label, "status": PASS, "detail": detail, "fix": None})
    return checks
