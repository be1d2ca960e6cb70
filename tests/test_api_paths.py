"""Issue 14 item 2: every path an API or portal caller sends is confined to the server's allowed roots.

The sandbox's roots are set the way `vmvault serve --allow-disks/--allow-vaults/--allow-restores`
sets them (service/paths.py build_policy); the last tests start a real `vmvault serve` with those
flags and with HOME/settings.toml. Each refusal is a 403 `path_not_allowed` naming the path and the
rule, with nothing changed on disk.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api_support import PASSPHRASE, Sandbox, make_ext4_image, sandbox
from helpers import Cli, files_equal, tree_digest
from test_api_flows import API, served, wait_job
from test_portal_access import signed_in
from vmvault.catalog import repos
from vmvault.service import backups, protection, vaults, vms
from vmvault.service.paths import build_policy
from vmvault.settings import Settings

OWNER, CONTRIBUTOR, OPERATOR = "Owner", "BackupContributor", "BackupOperator"


@dataclass
class World:
    box: Sandbox
    root: Path
    allowed: Path  # allowed/images: disks and restores; allowed/vaults; allowed/restores
    outside: Path
    rp1: str  # a point of vm1 (vault v1, disk allowed/images/vm1/disk0.raw)
    rp2: str  # a point of vm2 (vault v2)
    rp3: str  # a point of vm3 (vault v1, its disk registered by root outside the roots)

    @property
    def home(self) -> Path:
        return self.box.home


def _protect(box: Sandbox, vm: str, disk: Path, vault: str) -> str:
    vms.add_vm(box.ctx, vm, [disk])  # the unconfined context: root's CLI may register any path
    protection.enable_protection(box.ctx, vm, vault)
    manifest = backups.backup_now(box.ctx, vm).result
    assert manifest is not None
    return str(manifest.rp_id)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("api-paths")
    allowed, outside = root / "allowed", root / "outside"
    for sub in ("images/vm1", "images/vm2", "vaults", "restores"):
        (allowed / sub).mkdir(parents=True)
    outside.mkdir()
    home = root / "home"
    settings = Settings(home=home, passphrase=PASSPHRASE)
    policy = build_policy(
        settings,
        disks=[str(allowed / "images")],
        vaults=[str(allowed / "vaults")],
        restores=[str(allowed / "restores"), str(allowed / "images")],  # overlapping the disks: force is tested
    )
    with sandbox(home, paths=policy) as box:
        for name in ("v1", "v2"):
            vaults.create_vault(box.ctx, name)
        rp1 = _protect(box, "vm1", make_ext4_image(allowed / "images/vm1/disk0.raw", 8, {"a": b"vm1\n"}), "v1")
        rp2 = _protect(box, "vm2", make_ext4_image(allowed / "images/vm2/disk0.raw", 8, {"a": b"vm2\n"}), "v2")
        rp3 = _protect(box, "vm3", make_ext4_image(outside / "vm3.raw", 8, {"a": b"vm3\n"}), "v1")
        (outside / "secret.raw").write_bytes(b"host secret\n" * 1000)
        yield World(box, root, allowed, outside, rp1, rp2, rp3)


def _escapes(w: World, kind: str) -> list[str]:
    """Paths outside the roots of this kind: plain, with .., through a symlink, and vmvault's own files."""
    base = w.allowed / kind
    link = base / f"escape-{secrets.token_hex(3)}"
    link.symlink_to(w.outside)
    return [
        "/etc",
        str(w.outside / "x"),
        f"{base}/../../outside/x",
        str(link / "x"),  # a symlink inside the root that leads out
        str(w.home),
        str(w.home / "keys"),
        str(w.home / "catalog.db"),
    ]


def _refused(r: Any, path: str, rule: str | None = None) -> None:
    assert r.status_code == 403, f"{path}: {r.status_code} {r.text}"
    body = r.json()
    assert body["code"] == "path_not_allowed", body
    assert path in body["message"], body
    assert "rule:" in body["message"], body
    if rule is not None:
        assert rule in body["message"] and rule in body["hint"], body


def test_restore_routes_refuse_targets_outside_the_restore_roots(world: World) -> None:
    box = world.box
    operator = box.token(OPERATOR, "v1")
    before = _state(world)
    bodies = [
        ("restore", {"rp": world.rp1}),
        ("restore/vm", {"rp": world.rp1, "name": "copy1", "format": "raw"}),
        ("restore/vm", {"rp": world.rp1, "name": "copy2", "instant": True}),  # the instant restore's overlays
    ]
    for route, body in bodies:
        for path in _escapes(world, "restores"):
            r = box.call("POST", f"{API}/items/vm1/{route}", operator, json={**body, "targetDir": path})
            _refused(r, path)
    r = box.call("POST", f"{API}/items/vm1/restore", operator, json={"rp": world.rp1, "targetDir": "/etc"})
    _refused(r, "/etc", "allow-restores")
    assert _state(world) == before, "a refused restore wrote something"
    assert not {"copy1", "copy2"} & {v["name"] for v in vms.list_vms(box.ctx)}  # no VM registered by them


def _state(w: World) -> dict[str, str]:
    """Every file in the roots and outside them (the home's catalog changes with each call: left out)."""
    files = {f"allowed/{k}": v for k, v in tree_digest(w.allowed).items()}
    files.update({f"outside/{k}": v for k, v in tree_digest(w.outside).items()})
    return {k: v for k, v in files.items() if "escape-" not in k}


def _post(address: str, path: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{address}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _cli_point(cli: Cli, vm: str) -> str:
    cli.ok("backup", "now", vm, "--retain-until", "2099-01-01")
    rp: str = cli.ok("recoverypoint", "list", vm).json()[0]["name"]
    return rp


def test_no_role_is_above_the_roots(world: World) -> None:
    """Owner included: a token is not root on the host; scoped or not, each role allowed the route is refused."""
    box = world.box
    secret = str(world.outside / "secret.raw")
    for role in (OWNER, CONTRIBUTOR, OPERATOR):
        for scope in (None, "v1"):
            token = box.token(role, scope)
            body = {"rp": world.rp1, "targetDir": str(world.outside), "force": True}
            _refused(box.call("POST", f"{API}/items/vm1/restore", token, json=body), str(world.outside))
            if role != OPERATOR and scope is None:  # adding VMs, creating vaults: unscoped Contributor or Owner
                r = box.call("POST", f"{API}/vms", token, json={"name": "thief", "disks": [secret]})
                _refused(r, secret, "allow-disks")
                r = box.call("POST", f"{API}/vaults", token, json={"name": "evil", "storageDir": "/etc/evil"})
                _refused(r, "/etc/evil", "allow-vaults")
    assert not Path("/etc/evil").exists()
    assert "thief" not in {v["name"] for v in vms.list_vms(box.ctx)}


def test_a_restore_inside_the_roots_works(world: World) -> None:
    box = world.box
    operator = box.token(OPERATOR, "v1")
    target = world.allowed / "restores" / "ok"
    r = box.call("POST", f"{API}/items/vm1/restore", operator, json={"rp": world.rp1, "targetDir": str(target)})
    assert r.status_code == 202, r.text
    assert wait_job(box, operator, r.json()["name"])["properties"]["status"] == "Completed"
    assert files_equal(target / "disk0.raw", world.allowed / "images/vm1/disk0.raw")


def test_vm_add_refuses_disks_outside_the_disk_roots(world: World) -> None:
    box = world.box
    contributor = box.token(CONTRIBUTOR)
    for path in [*_escapes(world, "images"), str(world.outside / "secret.raw"), str(world.allowed / "restores")]:
        r = box.call("POST", f"{API}/vms", contributor, json={"name": "thief", "disks": [path]})
        _refused(r, path)
    link = world.allowed / "images" / "catalog.raw"
    link.symlink_to(world.home / "catalog.db")  # a "disk" that is the catalog, via a symlink in the root
    r = box.call("POST", f"{API}/vms", contributor, json={"name": "thief", "disks": [str(link)]})
    _refused(r, str(link))
    assert "home" in r.json()["message"]
    with box.ctx.catalog.read() as s:
        assert repos.find_vm(s, "thief") is None
    inside = make_ext4_image(world.allowed / "images" / "ok.raw", 8)
    r = box.call("POST", f"{API}/vms", contributor, json={"name": "fine", "disks": [str(inside)]})
    assert r.status_code == 201, r.text


def test_vault_create_and_import_refuse_storage_outside_the_vault_roots(world: World) -> None:
    box = world.box
    contributor = box.token(CONTRIBUTOR)
    paths = _escapes(world, "vaults")
    before = _state(world), [os.path.lexists(p) for p in paths]
    for path in paths:
        r = box.call("POST", f"{API}/vaults", contributor, json={"name": "evil", "storageDir": path})
        _refused(r, path)
    assert (_state(world), [os.path.lexists(p) for p in paths]) == before, "a refused vault create wrote something"
    # a real vault outside the roots (root made it, then unregistered it): the API may not import it
    vaults.create_vault(box.ctx, "spare", storage_dir=world.outside / "spare")
    vaults.delete_vault(box.ctx, "spare", keep_storage=True)
    for path in (str(world.outside / "spare"), str(world.home / "vaults" / "v1")):
        r = box.call("POST", f"{API}/vaults/import", contributor, json={"storageDir": path, "name": "spare"})
        _refused(r, path, "allow-vaults")
    # object storage: only under a prefix the admin allowed (VMVAULT_ALLOWED_STORAGE, unset here),
    # refused before any request reaches a store (none runs here)
    for url in ("s3://any-bucket/x", "azure://acct/container/x"):
        for route, body in (("/vaults", {"name": "cloud", "storageDir": url}), ("/vaults/import", {"storageDir": url})):
            r = box.call("POST", f"{API}{route}", contributor, json=body)
            assert r.status_code == 403 and r.json()["code"] == "path_not_allowed", r.text
            assert "VMVAULT_ALLOWED_STORAGE" in r.json()["hint"]
    assert [v["name"] for v in vaults.list_vaults(box.ctx)] == ["v1", "v2"]
    r = box.call(
        "POST", f"{API}/vaults", contributor, json={"name": "v9", "storageDir": str(world.allowed / "vaults/v9")}
    )
    assert r.status_code == 201, r.text
    vaults.delete_vault(box.ctx, "v9")


def test_a_root_around_the_home_does_not_open_the_home(tmp_path: Path) -> None:
    """--allow-vaults /srv with the home in /srv/home: /srv/x yes, nothing in /srv/home."""
    with sandbox(tmp_path / "home") as box:  # roots: the home's parent (api_support.sandbox)
        contributor = box.token(CONTRIBUTOR)
        path = str(box.home / "vaults" / "x")
        r = box.call("POST", f"{API}/vaults", contributor, json={"name": "x", "storageDir": path})
        _refused(r, path)
        assert "inside vmvault's home" in r.json()["message"]
        assert not Path(path).exists()
        r = box.call("POST", f"{API}/vaults", contributor, json={"name": "y", "storageDir": str(tmp_path / "y")})
        assert r.status_code == 201, r.text


def test_replace_disks_refuses_a_vm_whose_disks_are_outside_the_disk_roots(world: World) -> None:
    box = world.box
    before = (world.outside / "vm3.raw").read_bytes()
    r = box.call("POST", f"{API}/items/vm3/restore/replace-disks", box.token(OPERATOR, "v1"), json={"rp": world.rp3})
    _refused(r, str(world.outside / "vm3.raw"), "allow-disks")
    assert (world.outside / "vm3.raw").read_bytes() == before


def test_the_recovery_script_takes_no_output_path(world: World) -> None:
    r = world.box.call(
        "POST", f"{API}/items/vm1/files/script", world.box.token(OPERATOR, "v1"),
        json={"rp": world.rp1, "out": str(world.outside / "evil.sh")},
    )  # fmt: skip
    assert r.status_code == 422 and "out" in r.json()["message"], r.text
    assert not (world.outside / "evil.sh").exists()


def test_a_scoped_token_cannot_overwrite_another_vaults_vm_disks(world: World) -> None:
    box = world.box
    disk = world.allowed / "images/vm1/disk0.raw"
    before = disk.read_bytes()
    other = box.token(OPERATOR, "v2")
    # vm1 is in v1: a token of v2 cannot restore it, replace its disks, or enable it into v2
    for route, body in (("restore", {"rp": world.rp1, "targetDir": str(disk.parent), "force": True}),
                        ("restore/replace-disks", {"rp": world.rp1}), ("enable", {"vault": "v2"})):  # fmt: skip
        r = box.call("POST", f"{API}/items/vm1/{route}", other, json=body)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    # its own VM's point, forced onto vm1's disk (images/ is a restore root too): never a registered disk
    r = box.call(
        "POST", f"{API}/items/vm2/restore", other, json={"rp": world.rp2, "targetDir": str(disk.parent), "force": True}
    )
    _refused(r, str(disk))
    assert "vm1" in r.json()["message"] and "replace-disks" in r.json()["hint"]
    assert disk.read_bytes() == before


def test_a_scoped_token_cannot_pull_an_unprotected_vm_into_its_vault(world: World) -> None:
    box = world.box
    vms.add_vm(box.ctx, "loose", [make_ext4_image(world.allowed / "images" / "loose.raw", 8)])
    r = box.call("POST", f"{API}/items/loose/enable", box.token(OPERATOR, "v1"), json={"vault": "v1"})
    assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    with box.ctx.catalog.read() as s:
        vm = repos.find_vm(s, "loose")
        assert vm is not None and repos.protected_item(s, vm.id) is None
    r = box.call("POST", f"{API}/items/loose/enable", box.token(OPERATOR), json={"vault": "v1"})
    assert r.status_code == 200, r.text


def test_a_vault_recreated_under_the_same_name_is_not_reached_by_old_scoped_tokens(world: World) -> None:
    box = world.box
    owner = box.token(OWNER)
    r = box.call("POST", f"{API}/vaults", owner, json={"name": "v5", "passphrase": PASSPHRASE})
    assert r.status_code == 201, r.text
    old = box.call("POST", f"{API}/tokens", owner, json={"role": CONTRIBUTOR, "vault": "v5"}).json()["token"]
    assert box.call("GET", f"{API}/vaults/v5", old).status_code == 200
    assert box.call("DELETE", f"{API}/vaults/v5", owner).status_code == 200
    r = box.call("POST", f"{API}/vaults", owner, json={"name": "v5", "passphrase": PASSPHRASE})
    assert r.status_code == 201, r.text
    for method, path in (("GET", "/vaults/v5"), ("GET", "/vaults/v5/policies"), ("GET", "/vaults")):
        r = box.call(method, f"{API}{path}", old)
        assert r.status_code == 401 and "deleted" in r.json()["message"], (path, r.text)
    fresh = box.call("POST", f"{API}/tokens", owner, json={"role": CONTRIBUTOR, "vault": "v5"}).json()["token"]
    assert box.call("GET", f"{API}/vaults/v5", fresh).status_code == 200


def test_a_block_device_link_in_a_dev_root_is_a_disk(tmp_path: Path) -> None:
    """LVM's /dev/VG/LV are symlinks to /dev/dm-N: accepted inside an allowed root under /dev only."""
    backing = make_ext4_image(tmp_path / "lv.raw", 8)
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    group = Path("/dev") / f"vmvault-test-{secrets.token_hex(4)}"  # stands for a volume group's /dev/vg0
    images = tmp_path / "images"
    try:
        group.mkdir()
        (group / "lv").symlink_to(device)
        images.mkdir()
        (images / "lv-link").symlink_to(device)
        home = tmp_path / "home"
        policy = build_policy(Settings(home=home), disks=[str(images), str(group)])
        with sandbox(home, paths=policy) as box:
            contributor = box.token(CONTRIBUTOR)
            r = box.call("POST", f"{API}/vms", contributor, json={"name": "lvm", "disks": [str(group / "lv")]})
            assert r.status_code == 201, r.text
            assert r.json()["disks"][0]["path"] == str(group / "lv")  # kept as given, like LVM's name
            # the same link outside /dev is resolved like any path: the device is outside the roots
            r = box.call("POST", f"{API}/vms", contributor, json={"name": "lvm2", "disks": [str(images / "lv-link")]})
            _refused(r, str(images / "lv-link"), "allow-disks")
    finally:
        shutil.rmtree(group, ignore_errors=True)
        subprocess.run(["losetup", "-d", device], check=False)


def test_the_portal_confines_the_restore_target(world: World) -> None:
    client, csrf = signed_in(world.box, world.box.token(OPERATOR, "v1"))
    target = world.outside / "portal-restore"
    r = client.post(
        "/vms/vm1/restore", data={"csrf": csrf, "rp": world.rp1, "mode": "disks", "target_dir": str(target)}
    )
    assert r.status_code == 403 and "allow-restores" in r.text, r.text
    assert not target.exists()


# ---- the real `vmvault serve`: its flags, HOME/settings.toml, and roots it refuses ------------------


def _serve_fails(cli: Cli, *args: str) -> str:
    r = cli.fails("serve", "--port", "0", *args, json_output=False, timeout=60)
    return r.stderr


def test_serve_flags_and_settings_file_set_the_roots(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    disk = make_ext4_image(tmp_path / "images" / "web1.raw", 8)
    (tmp_path / "restores").mkdir()
    cli.ok("vault", "create", "main")
    cli.ok("vm", "add", "web1", "--disk", str(disk))
    cli.ok("protection", "enable", "web1", "--vault", "main")
    rp = _cli_point(cli, "web1")
    with served(cli, roots=[tmp_path / "restores"]) as (address, token):
        status, body = _post(
            address, "/api/v1/items/web1/restore", token, {"rp": rp, "targetDir": str(tmp_path / "out")}
        )
        assert (status, body["code"]) == (403, "path_not_allowed"), body
        status, body = _post(address, "/api/v1/vms", token, {"name": "again", "disks": [str(disk)]})
        assert (status, body["code"]) == (403, "path_not_allowed"), body
        status, body = _post(
            address, "/api/v1/items/web1/restore", token, {"rp": rp, "targetDir": str(tmp_path / "restores/a")}
        )
        assert status == 202, body
    assert not (tmp_path / "out").exists()

    # another home (served() reads the first-run token): its settings.toml allows the disks folder only
    other = Cli(home=tmp_path / "home2")
    other.ok("vault", "create", "main")
    (other.home / "settings.toml").write_text(f'allow-disks = ["{tmp_path / "images"}"]\n')
    with served(other, roots=[]) as (address, token):  # no flags: the file's disk roots, the default others
        status, body = _post(address, "/api/v1/vms", token, {"name": "again", "disks": [str(disk)]})
        assert status == 201, body
        status, body = _post(address, "/api/v1/vaults", token, {"name": "v2", "storageDir": str(tmp_path / "v2")})
        assert (status, body["code"]) == (403, "path_not_allowed"), body
        assert "/var/lib/vmvault/vaults" in body["message"], body
    assert not (tmp_path / "v2").exists()


def test_serve_refuses_roots_that_expose_the_home(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    cli.ok("vault", "create", "main")
    assert "vmvault's home" in _serve_fails(cli, f"--allow-vaults={cli.home}")
    assert "host keys" in _serve_fails(cli, f"--allow-disks={cli.home / 'keys'}")
    assert "not an absolute path" in _serve_fails(cli, "--allow-restores=relative/dir")
    (cli.home / "settings.toml").write_text('allow-everything = ["/"]\n')
    assert "unknown key 'allow-everything'" in _serve_fails(cli)


def test_cli_restore_with_force_never_overwrites_a_registered_disk(tmp_path: Path) -> None:
    """The local CLI is not confined to roots, but --force onto a registered VM's disk is refused too."""
    cli = Cli(home=tmp_path / "home")
    disk = make_ext4_image(tmp_path / "web1" / "disk0.raw", 8, {"a": b"live data\n"})
    cli.ok("vault", "create", "main")
    cli.ok("vm", "add", "web1", "--disk", str(disk))
    cli.ok("protection", "enable", "web1", "--vault", "main")
    rp = _cli_point(cli, "web1")
    before = disk.read_bytes()
    r = cli.fails("restore", "disks", "web1", "--rp", rp, "--target-dir", str(disk.parent), "--force")
    assert "is a disk of VM 'web1'" in r.stderr and "replace-disks" in r.stderr, r.stderr
    assert disk.read_bytes() == before
    cli.ok("restore", "disks", "web1", "--rp", rp, "--target-dir", str(tmp_path / "elsewhere"))
    assert files_equal(tmp_path / "elsewhere" / "disk0.raw", disk)


def test_an_imported_vault_cannot_point_a_vm_outside_the_disk_roots(tmp_path: Path) -> None:
    """A vault's own manifests and settings say where its VMs' disks are: for an API caller that is
    untrusted too (scheduled backups would read that path), so such a path is dropped and reported."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "vaults").mkdir(parents=True)
    (allowed / "images").mkdir()
    outside.mkdir()
    secret = make_ext4_image(outside / "host-secret.raw", 8, {"a": b"host data\n"})
    inside = make_ext4_image(allowed / "images" / "ok.raw", 8, {"a": b"fine\n"})
    author = Cli(home=tmp_path / "author")  # whoever wrote the vault (root elsewhere)
    author.ok("vault", "create", "src", "--storage", str(allowed / "vaults" / "src"))
    for vm, disk in (("far", secret), ("near", inside)):
        author.ok("vm", "add", vm, "--disk", str(disk))
        author.ok("protection", "enable", vm, "--vault", "src")
        author.ok("backup", "now", vm)
    policy = build_policy(Settings(home=tmp_path / "home", passphrase=PASSPHRASE),
                          disks=[str(allowed / "images")], vaults=[str(allowed / "vaults")], restores=[])  # fmt: skip
    with sandbox(tmp_path / "home", paths=policy) as box:
        owner = box.token(OWNER)
        r = box.call("POST", f"{API}/vaults/import", owner,
                     json={"storageDir": str(allowed / "vaults" / "src"), "passphrase": PASSPHRASE})  # fmt: skip
        assert r.status_code == 201, r.text
        dropped = r.json()["properties"]["notImported"]
        assert [d["object"] for d in dropped] == ["VM far disk disk0"], dropped
        assert "allow-disks" in dropped[0]["problem"], dropped
        far = box.call("GET", f"{API}/vms/far", owner).json()
        near = box.call("GET", f"{API}/vms/near", owner).json()
        assert [d["path"] for d in far["disks"]] in ([None], [""]), far
        assert [d["path"] for d in near["disks"]] == [str(inside)], near
