"""Issue 18 item 2: for every damaged vault object, verify names the exact points that depend on it.

Two VMs back up into one vault with nothing in common (vm "a": the small test image, vm "b": 4 MiB
of random bytes), so every pack, index file and manifest belongs to exactly one point. Each kind
of object (data pack, pack index file, disk-index pack, manifest) is flipped, truncated and
deleted in turn: `vault verify` must name that file and exactly that point (with the disk and
byte ranges), `recoverypoint list` shows it Failed and the other Passed, its restore is refused
at once, and the other point still restores byte-identical.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli, assert_same_image, head_of_image, vault_files
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)

KINDS = ["data", "index", "tree", "points"]
DAMAGES = ["flip", "truncate", "delete"]
CASES = [f"{kind}-{damage}" for kind in KINDS for damage in DAMAGES]


@dataclass
class TwoVms:
    cli: Cli
    vault: str
    storage: Path
    points: dict[str, str]  # vm -> its only point
    images: dict[str, Path]  # vm -> its disk as backed up
    files: dict[str, set[str]]  # vm -> vault files its backup wrote


def _new_files(storage: Path, before: set[str]) -> set[str]:
    now = {p.relative_to(storage).as_posix() for k in KINDS for p in vault_files(storage, k)}
    return now - before


@pytest.fixture(scope="module")
def two_vms(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> TwoVms:
    work = tmp_path_factory.mktemp("damage")
    disk_a = head_of_image(small_image, work / "a.raw", 8 << 20)
    disk_b = work / "b.raw"
    disk_b.write_bytes(random.Random(18).randbytes(4 << 20))
    prot = protect(Cli(home=work / "home"), disk_a, work / "vault", vm="a")
    cli = prot.cli
    assert cli.vm_add("b", disk_b).ok and cli.protection_enable("b", prot.vault).ok
    files: dict[str, set[str]] = {}
    seen: set[str] = set()
    for vm in ("a", "b"):
        r = cli.backup_now(vm)
        assert r.ok, str(r)
        files[vm] = _new_files(prot.storage, seen)
        seen |= files[vm]
    points = {vm: cli.point_ids(vm)[0] for vm in ("a", "b")}
    return TwoVms(cli, prot.vault, prot.storage, points, {"a": disk_a, "b": disk_b}, files)


@dataclass
class Damage:
    vm: str  # the VM whose backup wrote the damaged file
    rel: str


@pytest.fixture
def damaged(request: pytest.FixtureRequest, two_vms: TwoVms) -> Iterator[Damage]:
    kind, _, how = str(request.param).partition("-")
    rng = random.Random(f"vmvault-damage-{request.param}")
    vm = rng.choice(["a", "b"])
    rel = rng.choice(sorted(f for f in two_vms.files[vm] if f.startswith(kind + "/")))
    path = two_vms.storage / rel
    original = path.read_bytes()
    if how == "flip":
        data = bytearray(original)
        data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        os.truncate(path, rng.randrange(len(original)))
    else:
        path.unlink()
    try:
        yield Damage(vm, rel)
    finally:
        path.write_bytes(original)


@pytest.mark.parametrize("damaged", CASES, indirect=True)
def test_verify_names_the_damaged_file_and_exactly_the_points_that_use_it(
    damaged: Damage, two_vms: TwoVms, tmp_path: Path
) -> None:
    cli, hit = two_vms.cli, damaged.vm
    spared = "b" if hit == "a" else "a"
    r = cli.vault_verify(two_vms.vault)
    assert not r.ok and "Traceback" not in r.output, str(r)
    report = r.json()
    objects = {d["object"]: d for d in report["damagedObjects"]}
    assert set(objects) == {damaged.rel}, f"expected only {damaged.rel} named:\n{r}"
    affected = objects[damaged.rel]["affectedPoints"]
    assert [(p["recoveryPoint"], p["vm"]) for p in affected] == [(two_vms.points[hit], hit)], str(r)
    if not damaged.rel.startswith("points/"):
        ((disk, ranges),) = [(d["disk"], d["ranges"]) for d in affected[0]["disks"]]
        size = two_vms.images[hit].stat().st_size + 4096  # the virtual size: rounded up to sectors
        assert disk == "disk0" and ranges and all(0 <= s < e <= size for s, e in ranges), ranges
    assert damaged.rel in r.stderr and two_vms.points[hit] in r.stderr, str(r)

    (point,) = cli.points(hit)
    verification = point["properties"]["verification"]
    assert verification["state"] == "Failed" and damaged.rel in verification["problem"], point
    (other,) = cli.points(spared)
    assert other["properties"]["verification"]["state"] == "Passed", other

    target = tmp_path / "refused"
    r = cli.fails("restore", "disks", "--vm", hit, "--rp", two_vms.points[hit], "--target-dir", str(target))
    assert "point_failed_verification" in r.stderr and damaged.rel in r.stderr, str(r)
    assert not target.exists() or not any(target.iterdir())

    target = tmp_path / "spared"
    r = cli.restore_disks(spared, two_vms.points[spared], target)
    assert r.ok, str(r)
    (restored,) = list(target.iterdir())
    assert_same_image(restored, two_vms.images[spared])


def test_the_vault_verifies_again_once_every_file_is_back(two_vms: TwoVms) -> None:
    r = two_vms.cli.vault_verify(two_vms.vault)
    assert r.ok, str(r)
    assert r.json()["damagedObjects"] == []
