"""The layers stay apart (docs/design.md, "Connectors"): read from the code's imports, nothing is run.

- service/ and engine/ name no hypervisor: no libvirt binding, no QMP, QEMU, guest agent or
  qemu-img/qemu-nbd module; the service reaches connectors only through their contract, their
  registry and their shared work files; the engine not at all (it reads exported disks).
- a connector reports through its port: it imports no service, catalog session or vault.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "vmvault"
HYPERVISOR_WORDS = ("libvirt", "qmp", "qemu", "guest_agent", "diskimage", "images", "imagelock")
SERVICE_MAY_USE = ("vmvault.connectors.contract", "vmvault.connectors.registry", "vmvault.connectors.workfiles")


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-local imports included), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def offending(folder: str, bad: object) -> list[str]:
    out = []
    for path in sorted((SRC / folder).rglob("*.py")):
        for line, module in imports(path):
            if bad(module):  # type: ignore[operator]
                out.append(f"{path.relative_to(SRC.parent)}:{line}: {module}")
    return out


def names_a_hypervisor(module: str) -> bool:
    parts = module.split(".")
    if parts[0] != "vmvault":
        return parts[0] in ("libvirt", "libvirt_qemu")
    if parts[:2] == ["vmvault", "connectors"]:
        return not module.startswith(SERVICE_MAY_USE)
    return any(word in part for part in parts for word in HYPERVISOR_WORDS)


def test_the_service_reaches_hypervisors_only_through_the_connector_contract() -> None:
    assert offending("service", names_a_hypervisor) == []


def test_the_engine_knows_no_hypervisor_and_no_connector() -> None:
    def bad(module: str) -> bool:
        return names_a_hypervisor(module) or module.startswith(("vmvault.connectors", "vmvault.service"))

    assert offending("engine", bad) == []


def test_connectors_report_through_their_port_not_to_the_catalog_or_a_vault() -> None:
    def bad(module: str) -> bool:
        if module.startswith("vmvault.catalog.clock"):
            return False  # the time of day, as the catalog writes it
        return module.startswith(("vmvault.service", "vmvault.catalog", "vmvault.vault", "vmvault.api",
                                  "vmvault.cli", "vmvault.web"))  # fmt: skip

    assert offending("connectors", bad) == []


def test_the_check_sees_an_import_made_inside_a_function(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from vmvault.connectors.qemu.qmp import QmpClient\n    import libvirt\n")
    assert [m for _, m in imports(sample) if names_a_hypervisor(m)] == [
        "vmvault.connectors.qemu.qmp", "vmvault.connectors.qemu.qmp.QmpClient", "libvirt"]  # fmt: skip
