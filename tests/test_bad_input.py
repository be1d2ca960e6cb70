"""Bad input: a non-zero exit, a clear message naming the problem, and nothing changed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, Protected, assert_same_image, copy_image, rp_id, tree_digest
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


@dataclass
class State:
    vms: list[dict[str, Any]]
    points: list[str]
    vault_files: dict[str, str]


@dataclass
class World:
    prot: Protected
    rp: str
    work: Path

    def state(self) -> State:
        cli = self.prot.cli
        return State(cli.vms(), cli.point_ids(self.prot.vm), tree_digest(self.prot.storage))


@pytest.fixture(scope="module")
def world(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    work = tmp_path_factory.mktemp("badinput")
    prot = protect(Cli(home=work / "home"), copy_image(small_image, work / "disk.raw"), work / "vault")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (point,) = prot.cli.points(prot.vm)
    return World(prot, rp_id(point), work)


@pytest.fixture
def unchanged(world: World) -> Iterator[World]:
    before = world.state()
    yield world
    after = world.state()
    assert after.vms == before.vms, "the VM list changed"
    assert after.points == before.points, "the recovery points changed"
    assert after.vault_files == before.vault_files, "vault files changed"


def _says(r: Any, *words: str) -> None:
    text = r.stderr.lower()
    for w in words:
        assert w.lower() in text, f"the error should mention {w!r}:\n{r}"


def test_unknown_vm(unchanged: World) -> None:
    cli = unchanged.prot.cli
    _says(cli.fails(*cli.backup_args("no-such-vm")), "no-such-vm", "not found")
    _says(cli.fails("recoverypoint", "list", "--vm", "no-such-vm"), "no-such-vm")
    _says(cli.fails("protection", "enable", "--vm", "no-such-vm", "--vault", unchanged.prot.vault), "no-such-vm")


def test_unknown_vault(cli: Cli, small_image: Path) -> None:
    r = cli.vm_add("vm1", small_image)
    assert r.ok, str(r)
    vms = cli.vms()
    _says(cli.fails("protection", "enable", "--vm", "vm1", "--vault", "no-such-vault"), "no-such-vault", "not found")
    _says(cli.fails("vault", "verify", "no-such-vault"), "no-such-vault")
    assert cli.vms() == vms
    assert cli.run("vault", "list").json() == []


def test_missing_disk_file(unchanged: World) -> None:
    cli = unchanged.prot.cli
    missing = unchanged.work / "does-not-exist.raw"
    r = cli.vm_add("ghost", missing)
    assert not r.ok, str(r)
    assert "Traceback" not in r.output, str(r)
    _says(r, str(missing))


def test_not_a_disk_image(unchanged: World, tmp_path: Path) -> None:
    cli = unchanged.prot.cli
    text = tmp_path / "notes.txt"
    text.write_text("this is a shopping list, not a virtual disk\n" * 3)
    r = cli.vm_add("notes", text)
    assert not r.ok, str(r)
    assert "Traceback" not in r.output, str(r)
    _says(r, "not a disk image", "notes.txt")


def test_retain_until_in_the_past(unchanged: World) -> None:
    cli = unchanged.prot.cli
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    _says(cli.fails(*cli.backup_args(unchanged.prot.vm, retain_until=yesterday)), yesterday)
    _says(cli.fails(*cli.backup_args(unchanged.prot.vm, retain_until="2001-01-01")), "2001-01-01")


def test_retain_until_not_a_date(unchanged: World) -> None:
    cli = unchanged.prot.cli
    _says(cli.fails(*cli.backup_args(unchanged.prot.vm, retain_until="someday")), "someday")


def test_unknown_recovery_point(unchanged: World, tmp_path: Path) -> None:
    cli = unchanged.prot.cli
    r = cli.restore_disks(unchanged.prot.vm, "no-such-point", tmp_path / "out")
    assert not r.ok, str(r)
    _says(r, "no-such-point")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_restore_over_existing_files_needs_force(unchanged: World, tmp_path: Path) -> None:
    cli = unchanged.prot.cli
    target = tmp_path / "out"
    r = cli.restore_disks(unchanged.prot.vm, unchanged.rp, target)
    assert r.ok, str(r)
    (restored,) = list(target.iterdir())
    restored.write_bytes(b"precious data that must survive\n")
    before = tree_digest(target)

    r = cli.restore_disks(unchanged.prot.vm, unchanged.rp, target)
    assert not r.ok, f"restore overwrote {restored} without --force:\n{r}"
    assert "Traceback" not in r.output, str(r)
    _says(r, restored.name, "--force")
    assert tree_digest(target) == before, "a refused restore changed the target directory"

    r = cli.restore_disks(unchanged.prot.vm, unchanged.rp, target, force=True)
    assert r.ok, str(r)
    assert_same_image(restored, unchanged.prot.disk)
