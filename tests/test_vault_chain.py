"""Deleting, adding or rolling back recovery points in the vault's storage is detected (issue #14 item 3).

The vault keeps one sealed, hash-chained record per event in seq/<n> (vault/seqchain.py,
docs/format.md "Record chain"). Someone with write access to the storage (not the keys) deletes a
manifest, removes the last records, or drops in a manifest sealed with the same keys but never
published here (a second copy of the vault): `vault verify` fails naming it and `vault gc`
refuses. Legitimate retention is recorded, so it is never flagged; an old vault without the
chain gains it on its first write.

The vault side is driven through the real CLI; synthetic manifests (many points, a forged point)
are written in-process with the real Vault and its keys from the test home, which is what an
attacker holding a copy of the keys, or a second copy of the vault, could do.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from helpers import Cli, Protected, copy_image, tree_digest
from helpers import opened_vault as opened
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)
from vmvault.vault import seqchain
from vmvault.vault.manifest import RecoveryPointManifest
from vmvault.vault.sealed import seal
from vmvault.vault.store import Vault


@dataclass
class TwoPoints:
    prot: Protected
    points: list[str]


@pytest.fixture(scope="module")
def two_points(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> TwoPoints:
    work = tmp_path_factory.mktemp("chain")
    prot = protect(Cli(home=work / "home"), copy_image(small_image, work / "disk.raw"), work / "vault")
    for _ in range(2):
        r = prot.cli.backup_now(prot.vm)
        assert r.ok, str(r)
    return TwoPoints(prot, prot.cli.point_ids(prot.vm))


@contextmanager
def moved_aside(*paths: Path) -> Iterator[None]:
    """Take files out of the vault (as an intruder would); put them back afterwards."""
    keep = [(p, p.with_name(p.name + ".aside")) for p in paths]
    for path, aside in keep:
        path.rename(aside)
    try:
        yield
    finally:
        for path, aside in keep:
            aside.rename(path)


def records(storage: Path) -> list[Path]:
    return sorted((storage / "seq").iterdir())


def verify_fails_naming(prot: Protected, *words: str) -> str:
    r = prot.cli.vault_verify(prot.vault)
    assert not r.ok, f"verify passed:\n{r}"
    assert "Traceback" not in r.output, str(r)
    for word in words:
        assert word in r.stderr, f"verify does not name {word!r}:\n{r}"
    return r.stderr


def gc_refuses(prot: Protected) -> None:
    before = tree_digest(prot.storage)
    r = prot.cli.run("vault", "gc", prot.vault, "--grace", "0")
    assert not r.ok, f"gc ran on a tampered vault:\n{r}"
    assert "changed outside vmvault" in r.output, str(r)
    assert tree_digest(prot.storage) == before, "a refused gc changed the vault"


def test_healthy_vault_has_a_chain_and_verifies(two_points: TwoPoints) -> None:
    prot = two_points.prot
    names = [p.name for p in records(prot.storage)]
    assert names == [f"{n:012d}" for n in range(5)], names  # genesis, then intent + publish per point
    config = json.loads((prot.storage / "config").read_bytes())
    assert seqchain.FEATURE in config["features"]
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)


def test_deleted_manifest_is_named_and_gc_refuses(two_points: TwoPoints) -> None:
    prot, victim = two_points.prot, two_points.points[0]
    with moved_aside(prot.storage / "points" / victim):
        stderr = verify_fails_naming(prot, victim)
        assert "without a deletion record" in stderr
        gc_refuses(prot)
    assert prot.cli.vault_verify(prot.vault).ok


def test_removed_last_records_are_named(two_points: TwoPoints) -> None:
    """The last point's publish (and intent) records are removed: its manifest is unrecorded."""
    prot, last = two_points.prot, two_points.points[-1]
    with moved_aside(*records(prot.storage)[-2:]):
        stderr = verify_fails_naming(prot, last, "no publish record")
        assert "this host has seen" in stderr  # and the chain is shorter than this host knows
        gc_refuses(prot)
    assert prot.cli.vault_verify(prot.vault).ok


def test_removed_middle_record_is_a_gap(two_points: TwoPoints) -> None:
    prot = two_points.prot
    with moved_aside(records(prot.storage)[2]):
        verify_fails_naming(prot, "seq/000000000002", "missing")
    assert prot.cli.vault_verify(prot.vault).ok


def test_manifest_from_another_copy_of_the_vault_is_named(two_points: TwoPoints) -> None:
    """A manifest sealed with this vault's keys but never published here (a second copy of the vault)."""
    prot = two_points.prot
    with opened(prot) as vault:
        original = vault.read_manifest(two_points.points[0])
        stranger = replace(original, rp_id="f0f0f0f0f0f0f0f0", time="2099-01-01T00:00:00.000000Z")
        name = vault.manifest_name(stranger.rp_id)
        vault.backend.put(name, seal(vault.keys, name, stranger.to_json()))
    path = prot.storage / name
    try:
        verify_fails_naming(prot, "points/f0f0f0f0f0f0f0f0", "no publish record")
        # Sealed with the vault's keys and naming a known job, but unrecorded: never adopted.
        assert "f0f0f0f0f0f0f0f0" not in prot.cli.point_ids(prot.vm)
        gc_refuses(prot)
    finally:
        path.unlink()
    assert prot.cli.vault_verify(prot.vault).ok


def test_manifest_of_another_vault_is_named(two_points: TwoPoints, small_image: Path, tmp_path: Path) -> None:
    prot = two_points.prot
    other = protect(Cli(home=tmp_path / "home2"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v2")
    r = other.cli.backup_now(other.vm)
    assert r.ok, str(r)
    (foreign,) = other.cli.point_ids(other.vm)
    target = prot.storage / "points" / foreign
    shutil.copyfile(other.storage / "points" / foreign, target)
    try:
        verify_fails_naming(prot, f"points/{foreign}")
        gc_refuses(prot)
    finally:
        target.unlink()


def test_replaced_manifest_is_named(two_points: TwoPoints) -> None:
    """Same point id, another manifest (sealed with the keys): not the one recorded."""
    prot, victim = two_points.prot, two_points.points[0]
    path = prot.storage / "points" / victim
    saved = path.read_bytes()
    with opened(prot) as vault:
        original = vault.read_manifest(victim)
        changed = replace(original, retain_until="2099-12-31")
        path.write_bytes(seal(vault.keys, vault.manifest_name(victim), changed.to_json()))
    try:
        verify_fails_naming(prot, f"points/{victim}", "replaced")
    finally:
        path.write_bytes(saved)
    assert prot.cli.vault_verify(prot.vault).ok


# ---- legitimate changes raise nothing -------------------------------------------------------------


def synthetic_points(vault: Vault, template: RecoveryPointManifest, count: int) -> list[str]:
    """Publish `count` points that share the template's data (as incremental backups would)."""
    ids = []
    for i in range(count):
        manifest = replace(template, rp_id=f"synthetic{i:05d}", time=f"2030-01-01T00:00:{i % 60:02d}.{i:06d}Z")
        vault.publish_manifest(manifest)
        ids.append(manifest.rp_id)
    return ids


def test_retention_over_many_points_raises_nothing(small_image: Path, tmp_path: Path) -> None:
    prot = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (real,) = prot.cli.point_ids(prot.vm)
    from vmvault.service.retention import delete_point_data

    with opened(prot) as vault:
        ids = synthetic_points(vault, vault.read_manifest(real), 120)
        for rp in ids[:100]:
            delete_point_data(vault, rp)  # what retention and purge call for each point
        audit = vault.audit_chain()
    assert audit.problems == [], audit.problems
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)
    r = prot.cli.run("vault", "gc", prot.vault, "--grace", "0")
    assert r.ok, str(r)


def test_concurrent_writers_never_lose_a_record(small_image: Path, tmp_path: Path) -> None:
    """Four writers (separate Vault objects, as parallel jobs have) race for seq/<n>: no gap, no loss."""
    prot = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (real,) = prot.cli.point_ids(prot.vm)
    with opened(prot) as vault:
        template = vault.read_manifest(real)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with opened(prot) as vault:
                for i in range(10):
                    vault.publish_manifest(replace(template, rp_id=f"w{k}p{i:02d}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(records(prot.storage)) == 1 + 2 * 41
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)


def test_interrupted_publish_is_a_note_not_tampering(two_points: TwoPoints) -> None:
    """A backup killed between its intent record and its manifest: verify passes and says so."""
    prot = two_points.prot
    with opened(prot) as vault:
        record = vault.chain.append("intent", {"deadbeefdeadbeef": "0" * 64})
    path = prot.storage / seqchain.record_name(record.n)
    try:
        r = prot.cli.vault_verify(prot.vault)
        assert r.ok, str(r)
        assert "never published" in r.output, str(r)
    finally:
        path.unlink()  # leave the module's vault as the other tests expect (host hint is only a hint)
        hint = prot.cli.home / "cache"
        for head in hint.rglob("seq-head.json"):
            head.write_text(json.dumps({"head": record.n - 1}))


# ---- an old vault gains the chain on its first write ----------------------------------------------


def test_old_vault_gains_the_chain_on_first_write(small_image: Path, tmp_path: Path) -> None:
    prot = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "d.raw"), tmp_path / "v")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (first,) = prot.cli.point_ids(prot.vm)
    # Make it a vault written before the chain: no seq/, no features, single copies.
    with opened(prot) as vault:
        old = {k: v for k, v in vault.config.items() if k not in ("features", "mac")}
        old["mac"] = vault.keys.mac(json.dumps(old, sort_keys=True, separators=(",", ":")).encode())
    shutil.rmtree(prot.storage / "seq")
    for name in ("config.2", "keys/passphrase.2"):
        (prot.storage / name).unlink()
    (prot.storage / "config").write_text(json.dumps(old, indent=1, sort_keys=True))
    for head in (prot.cli.home / "cache").rglob("seq-head.json"):
        head.unlink()

    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, f"an old vault must keep working:\n{r}"
    r = prot.cli.restore_disks(prot.vm, first, tmp_path / "out")
    assert r.ok, str(r)

    r = prot.cli.backup_now(prot.vm)  # the first write
    assert r.ok, str(r)
    config = json.loads((prot.storage / "config").read_bytes())
    assert seqchain.FEATURE in config["features"]
    assert (prot.storage / "config.2").read_bytes() == (prot.storage / "config").read_bytes()
    assert (prot.storage / "keys/passphrase.2").read_bytes() == (prot.storage / "keys/passphrase").read_bytes()
    with opened(prot) as vault:
        genesis = vault.chain.read(0)
    assert genesis.event == "genesis" and list(genesis.points) == [first]
    r = prot.cli.vault_verify(prot.vault)
    assert r.ok, str(r)
    # From now on, deleting the old point is detected too.
    with moved_aside(prot.storage / "points" / first):
        verify_fails_naming(prot, first)


def test_publish_without_its_record_is_a_note_not_tampering(two_points: TwoPoints) -> None:
    """Killed right after the manifest, before its publish record: the point is recorded as intended."""
    prot = two_points.prot
    with opened(prot) as vault:
        manifest = replace(vault.read_manifest(two_points.points[0]), rp_id="cafecafecafecafe")
        payload = manifest.to_json()
        record = vault.chain.append("intent", {manifest.rp_id: seqchain.digest(payload)})
        name = vault.manifest_name(manifest.rp_id)
        vault.backend.put(name, seal(vault.keys, name, payload))
    try:
        r = prot.cli.vault_verify(prot.vault)
        assert r.ok, str(r)
        assert "publish record was not written" in r.output, str(r)
    finally:
        (prot.storage / name).unlink()
        (prot.storage / seqchain.record_name(record.n)).unlink()
        for head in (prot.cli.home / "cache").rglob("seq-head.json"):
            head.write_text(json.dumps({"head": record.n - 1}))
