"""`vault import` treats a vault's content as evidence, not instructions (issue #14 item 3).

The author of an imported vault holds its keys, so every manifest field is theirs to choose. Names
become catalog names and file names under a restore's target directory: they follow the rules of
user input (no '/', '..', control characters; VM names through the same validator). A foreign
vault's points never join a VM this catalog already has.

The hostile manifests are written in-process with the real Vault and the vault's own keys (what
the vault's author can do); everything else goes through the real CLI.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, copy_image, protect, tree_digest
from vmvault.vault.manifest import DiskEntry, RecoveryPointManifest
from vmvault.vault.store import Vault


def publish(storage: Path, home: Path, manifest: RecoveryPointManifest) -> None:
    vault = Vault.open(storage, home)
    try:
        vault.publish_manifest(manifest)  # properly recorded: only the content is hostile
    finally:
        vault.close()


def a_manifest(storage: Path, home: Path, rp_id: str) -> RecoveryPointManifest:
    vault = Vault.open(storage, home)
    try:
        return vault.read_manifest(rp_id)
    finally:
        vault.close()


def disk_with(manifest: RecoveryPointManifest, **changes: Any) -> tuple[DiskEntry, ...]:
    return (replace(manifest.disks[0], **changes), *manifest.disks[1:])


HOSTILE = {
    "vm name with a slash": {"vm_name": "../../etc"},
    "vm name with a newline": {"vm_name": "nl\n"},
    "vm name with a control character": {"vm_name": "vm\x1b[31m"},
    "disk name escaping the target directory": {"disk": {"name": "../../../tmp/escape"}},
    "disk name with a slash": {"disk": {"name": "a/b"}},
    "disk source path with ..": {"disk": {"source_path": "/var/lib/../../etc/shadow"}},
    "disk source path with a newline": {"disk": {"source_path": "/images/x\n.raw"}},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_names_are_refused_naming_the_manifest(case: str, small_image: Path, tmp_path: Path) -> None:
    author = protect(Cli(home=tmp_path / "author"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "vault")
    r = author.cli.backup_now(author.vm)
    assert r.ok, str(r)
    (real,) = author.cli.point_ids(author.vm)
    base = a_manifest(author.storage, author.cli.home, real)
    changes = dict(HOSTILE[case])
    disk_changes = changes.pop("disk", None)
    hostile = replace(base, rp_id="4057113e00000001", **changes)
    if disk_changes:
        hostile = replace(hostile, disks=disk_with(base, **disk_changes))
    publish(author.storage, author.cli.home, hostile)
    before = tree_digest(author.storage)

    victim = Cli(home=tmp_path / "victim")
    r = victim.vault_import(author.storage)
    assert not r.ok, f"a vault with a hostile manifest ({case}) was imported:\n{r}"
    assert "Traceback" not in r.output, str(r)
    assert "points/4057113e00000001" in r.stderr and "invalid" in r.stderr, str(r)
    assert victim.ok("vault", "list").json() == []
    assert victim.ok("vm", "list").json() == []
    assert tree_digest(author.storage) == before
    assert not (tmp_path / "tmp" / "escape").exists()


def test_foreign_points_never_join_an_existing_vm(small_image: Path, tmp_path: Path) -> None:
    """Vault B claims points of my VM vm1 (its id and name): imported, but not as vm1's points."""
    mine = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v1")
    r = mine.cli.backup_now(mine.vm)
    assert r.ok, str(r)
    (my_point,) = mine.cli.point_ids(mine.vm)
    template = a_manifest(mine.storage, mine.cli.home, my_point)

    stranger = Cli(home=tmp_path / "stranger")
    stranger.vault_create("evil", tmp_path / "evil")
    claim = replace(template, rp_id="ffffffff00000001", time="2099-01-01T00:00:00.000000Z", job_id="")
    publish(tmp_path / "evil", stranger.home, claim)

    r = mine.cli.vault_import(tmp_path / "evil")
    assert r.ok, str(r)
    skipped = r.json()["properties"].get("skippedPoints")  # a vault resource (docs/api.md): extras in properties
    assert [p["id"] for p in skipped] == ["ffffffff00000001"], r.stdout
    assert "vm1" in skipped[0]["reason"], r.stdout
    assert mine.cli.point_ids(mine.vm) == [my_point], "a foreign vault added a point to my VM"
    vms = mine.cli.vms()
    assert [vm["name"] for vm in vms] == ["vm1"], vms


def write_settings(storage: Path, home: Path, document: dict[str, Any]) -> None:
    """What the vault's author can write: a sealed settings/catalog (service/vaultsettings.py)."""
    import json

    from vmvault.service.vaultsettings import NAME, VERSION
    from vmvault.vault.sealed import seal

    vault = Vault.open(storage, home)
    try:
        body = {"version": VERSION, "vault": vault.uuid, "written": "2099-01-01T00:00:00.000000Z", **document}
        vault.backend.put(NAME, seal(vault.keys, NAME, json.dumps(body).encode()))
    finally:
        vault.close()


def test_vault_settings_never_attach_or_protect_a_vm_this_catalog_has(small_image: Path, tmp_path: Path) -> None:
    """Vault B's configuration claims my unprotected VM (its id) and my protected VM's disk: neither happens."""
    mine = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v1")
    assert mine.cli.vm_add("spare", copy_image(small_image, tmp_path / "spare.raw")).ok
    before = {vm["name"]: vm for vm in mine.cli.vms()}

    stranger = Cli(home=tmp_path / "stranger")
    stranger.vault_create("evil", tmp_path / "evil")
    thief = "0123abcd-0000-4000-8000-000000000001"
    write_settings(
        tmp_path / "evil",
        stranger.home,
        {
            "policies": [],
            "vms": [
                {"id": before["spare"]["id"], "name": "spare", "kind": "disks", "disks": [], "definition": {}},
                {
                    "id": thief,
                    "name": "thief",
                    "kind": "disks",
                    "definition": {},
                    "disks": [{"name": "disk0", "path": str(mine.disk), "format": "raw"}],
                },
            ],
            "items": [
                {"vmId": before["spare"]["id"], "state": "Protected", "policy": "DefaultPolicy"},
                {"vmId": thief, "state": "Protected", "policy": "DefaultPolicy"},
            ],
            "notifications": [],
        },
    )

    r = mine.cli.vault_import(tmp_path / "evil")
    assert r.ok, str(r)  # names are sound: the entries that do not fit are listed, the rest imported
    listed = " ".join(f"{e.get('entry')}: {e['problem']}" for e in r.json()["properties"]["notImported"])
    assert "spare" in listed and "thief" in listed and str(mine.disk) in listed, r.stdout
    after = {vm["name"]: vm for vm in mine.cli.vms()}
    assert sorted(after) == ["spare", "vm1"], after
    assert after["spare"]["protectionState"] == before["spare"]["protectionState"], after["spare"]
    assert after["vm1"]["vault"] == "v1", after["vm1"]


def test_hostile_names_in_vault_settings_refuse_the_vault(small_image: Path, tmp_path: Path) -> None:
    stranger = Cli(home=tmp_path / "stranger")
    stranger.vault_create("evil", tmp_path / "evil")
    write_settings(
        tmp_path / "evil",
        stranger.home,
        {
            "vms": [
                {
                    "id": "0123abcd-0000-4000-8000-000000000002",
                    "name": "ok",
                    "kind": "disks",
                    "definition": {},
                    "disks": [{"name": "../../escape", "path": "/images/x.raw"}],
                }
            ],
        },
    )
    victim = Cli(home=tmp_path / "victim")
    r = victim.vault_import(tmp_path / "evil")
    assert not r.ok and "Traceback" not in r.output, str(r)
    assert "settings/catalog" in r.stderr and "invalid disk name" in r.stderr, str(r)
    assert victim.ok("vault", "list").json() == []
    assert victim.ok("vm", "list").json() == []
