"""Passphrase and keys (issue #14 item 4) and the two copies of config and keys/passphrase (issue #18).

- A command that names a vault and is given a passphrase that does not open the vault's key file
  fails with wrong_passphrase (exit 77) even though this host's key opens the vault, and changes
  nothing; `serve` (lenient) only logs the mismatch. `vault check-passphrase` exits 0 / 77.
- New passphrases: 12+ characters, not in zxcvbn's common-passwords list. New key files: scrypt
  N=2^17; parameters read back are bounded; old (N=2^15) key files keep working and
  `vault change-passphrase` re-wraps.
- config and keys/passphrase have a second copy: one damaged copy changes nothing for restores,
  the host key opens the vault when both key file copies are damaged, and a damaged key file is
  reported as damaged, not as a wrong passphrase. The next write heals.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from helpers import PASSPHRASE, Cli, Protected, assert_same_image, copy_image, protect, tree_digest
from helpers import opened_vault as opened
from vmvault.vault import crypto, keyfile, store

WRONG = "not the passphrase of this vault"
NEW = "a different long passphrase for tests"


@dataclass
class OneVault:
    prot: Protected
    point: str
    image: Path


@pytest.fixture(scope="module")
def backed_up_once(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[OneVault, Path]:
    """A home, a disk and a vault with one point, built once by the CLI; kept aside as `saved`."""
    live = tmp_path_factory.mktemp("keys") / "live"
    live.mkdir()
    prot = protect(Cli(home=live / "home"), copy_image(small_image, live / "disk.raw"), live / "vault")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (point,) = prot.cli.point_ids(prot.vm)
    saved = live.with_name("saved")
    subprocess.run(["cp", "-a", "--sparse=always", str(live), str(saved)], check=True)
    return OneVault(prot, point, small_image), saved


@pytest.fixture
def one_vault(backed_up_once: tuple[OneVault, Path]) -> OneVault:
    """The module's vault exactly as its backup left it: each test damages or re-keys it, so the saved
    copy (home, disk and vault, at the same paths) is put back first. Building it costs 5 CLI commands
    (about 6 s), putting it back a copy (well under 1 s)."""
    state, saved = backed_up_once
    live = state.prot.storage.parent
    shutil.rmtree(live)
    subprocess.run(["cp", "-a", "--sparse=always", str(saved), str(live)], check=True)
    # Same vault (uuid) in every test: forget what this process learned of its passphrase before.
    store._forget_checks(vault_uuid(state.prot.storage))
    return state


def vault_uuid(storage: Path) -> str:
    uuid: str = json.loads((storage / "config").read_bytes())["uuid"]
    return uuid


def as_user(prot: Protected, passphrase: str | None) -> Cli:
    return Cli(home=prot.cli.home, passphrase=passphrase)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def kdf_of(path: Path) -> dict[str, object]:
    kdf: dict[str, object] = json.loads(path.read_bytes())["kdf"]
    return kdf


def restores(prot: Protected, point: str, image: Path, target: Path, cli: Cli | None = None) -> None:
    r = (cli or prot.cli).restore_disks(prot.vm, point, target)
    assert r.ok, str(r)
    assert_same_image(target / "disk0.raw", image)


# ---- new passphrases ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("passphrase", "reason"),
    [("short pass1", "too short"), ("1qaz2wsx3edc", "common passwords"), ("QAZWSXEDCRFV", "common passwords")],
)
def test_weak_new_passphrase_is_refused_with_the_reason(passphrase: str, reason: str, tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home", passphrase=passphrase)
    r = cli.run("vault", "create", "v1", "--storage", str(tmp_path / "vault"))
    assert r.returncode == 64, str(r)
    assert reason in r.stderr, str(r)
    assert not (tmp_path / "vault").exists(), "a refused create left a vault directory"


def test_new_key_file_uses_scrypt_2_17_in_two_copies(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    cli.vault_create("v1", tmp_path / "vault")
    first, second = tmp_path / "vault/keys/passphrase", tmp_path / "vault/keys/passphrase.2"
    assert first.read_bytes() == second.read_bytes()
    assert kdf_of(first)["n"] == 2**17 and kdf_of(first)["name"] == "scrypt"
    assert (tmp_path / "vault/config").read_bytes() == (tmp_path / "vault/config.2").read_bytes()


# ---- a wrong passphrase fails, even with the host key -------------------------------------------------


def test_wrong_passphrase_fails_even_when_the_host_key_opens_the_vault(one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    before = tree_digest(prot.storage)
    wrong = as_user(prot, WRONG)
    restore = ["restore", "disks", prot.vm, "--rp", one_vault.point, "--target-dir", str(tmp_path / "out")]
    for args in (["vault", "verify", prot.vault], ["backup", "now", prot.vm], restore):
        r = wrong.run(*args)
        assert r.returncode == 77, f"{args} with a wrong passphrase:\n{r}"
        assert "wrong_passphrase" in r.output or "wrong passphrase" in r.output, str(r)
        assert "Traceback" not in r.output
    assert tree_digest(prot.storage) == before, "a wrong passphrase changed the vault"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert prot.cli.point_ids(prot.vm) == [one_vault.point]
    # Without any passphrase the host key is enough.
    r = as_user(prot, None).vault_verify(prot.vault)
    assert r.ok, str(r)


def test_check_passphrase(one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    before = tree_digest(prot.storage)
    r = prot.cli.run("vault", "check-passphrase", prot.vault)
    assert r.ok and r.json() == {"vault": prot.vault, "passphrase": "ok"}, str(r)
    r = as_user(prot, WRONG).run("vault", "check-passphrase", prot.vault)
    assert r.returncode == 77, str(r)
    secret = tmp_path / "pass"
    secret.write_text(WRONG + "\n")
    r = as_user(prot, None).run("vault", "check-passphrase", prot.vault, "--passphrase-file", str(secret))
    assert r.returncode == 77, str(r)
    secret.write_text(PASSPHRASE + "\n")
    r = as_user(prot, None).run("vault", "check-passphrase", prot.vault, "--passphrase-file", str(secret))
    assert r.ok, str(r)
    assert tree_digest(prot.storage) == before


def test_serve_only_logs_a_mismatch_and_checks_once(
    one_vault: OneVault, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's settings are lenient: the host key opens the vault, the mismatch is logged once per process."""
    from vmvault.service import vaults
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    calls: list[str] = []
    real = keyfile.unlock_with_passphrase

    def counting(data: bytes, passphrase: str, name: str = keyfile.KEYFILE_NAME) -> bytes:
        calls.append(name)
        return real(data, passphrase, name)

    monkeypatch.setattr(keyfile, "unlock_with_passphrase", counting)  # a spy: the real KDF still runs
    settings = replace(load_settings(str(one_vault.prot.cli.home)), passphrase=WRONG, strict_passphrase=False)
    caplog.set_level(logging.WARNING, logger="vmvault")
    with context(settings) as ctx:
        for _ in range(2):
            outcome = vaults.verify_vault(ctx, one_vault.prot.vault)
            assert not outcome.failed, outcome.job
    assert "does not open its key file" in caplog.text
    assert calls == [keyfile.KEYFILE_NAME], f"the KDF ran {len(calls)} times, not once: {calls}"


# ---- changing the passphrase; old key files ----------------------------------------------------------


def test_change_passphrase_rewraps(one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    new_file = tmp_path / "new"
    new_file.write_text(NEW)
    weak = tmp_path / "weak"
    weak.write_text("password")
    r = prot.cli.run("vault", "change-passphrase", prot.vault, "--new-passphrase-file", str(weak))
    assert r.returncode == 64 and "too short" in r.stderr, str(r)
    before = tree_digest(prot.storage)
    r = as_user(prot, WRONG).run("vault", "change-passphrase", prot.vault, "--new-passphrase-file", str(new_file))
    assert r.returncode == 77, str(r)
    assert tree_digest(prot.storage) == before

    r = prot.cli.run("vault", "change-passphrase", prot.vault, "--new-passphrase-file", str(new_file))
    assert r.ok, str(r)
    assert as_user(prot, NEW).run("vault", "check-passphrase", prot.vault).ok
    assert as_user(prot, PASSPHRASE).run("vault", "check-passphrase", prot.vault).returncode == 77
    fresh = Cli(home=tmp_path / "home2", passphrase=NEW)
    r = fresh.vault_import(prot.storage)
    assert r.ok, str(r)
    restores(prot, one_vault.point, one_vault.image, tmp_path / "out", cli=fresh)


def test_old_key_file_keeps_working_and_change_passphrase_upgrades_it(
    one_vault: OneVault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prot = one_vault.prot
    with opened(prot) as vault:  # a key file as vmvault wrote it before: N=2^15, no checksum, one copy
        monkeypatch.setattr(crypto, "SCRYPT_N", 2**15)
        doc = json.loads(keyfile.make_keyfile(vault.keys.master, vault.uuid, PASSPHRASE))
        monkeypatch.undo()
    del doc["check"]
    (prot.storage / "keys/passphrase").write_text(json.dumps(doc, indent=1, sort_keys=True))
    (prot.storage / "keys/passphrase.2").unlink()
    assert kdf_of(prot.storage / "keys/passphrase")["n"] == 2**15

    fresh = Cli(home=tmp_path / "home2")
    r = fresh.vault_import(prot.storage)
    assert r.ok, f"an old key file must keep working:\n{r}"
    new_file = tmp_path / "new"
    new_file.write_text(NEW)
    r = prot.cli.run("vault", "change-passphrase", prot.vault, "--new-passphrase-file", str(new_file))
    assert r.ok, str(r)
    for name in ("keys/passphrase", "keys/passphrase.2"):
        assert kdf_of(prot.storage / name)["n"] == 2**17


@pytest.mark.parametrize("params", [{"n": 2**30}, {"r": 4096}, {"p": 10**6}, {"n": 2**17 + 1}, {"n": "1"}])
def test_hostile_kdf_parameters_are_refused_quickly(
    params: dict[str, object], one_vault: OneVault, tmp_path: Path
) -> None:
    """A vault's author chooses the KDF parameters: we never allocate or spin what they ask."""
    prot = one_vault.prot
    for name in ("keys/passphrase", "keys/passphrase.2"):
        path = prot.storage / name
        doc = json.loads(path.read_bytes())
        doc["kdf"].update(params)
        doc["check"] = keyfile.checksum(doc)  # a forger recomputes the plain checksum
        path.write_text(json.dumps(doc))
    started = time.monotonic()
    r = Cli(home=tmp_path / "home2").vault_import(prot.storage)
    assert not r.ok and r.returncode != 77, f"hostile KDF parameters must be refused as damage:\n{r}"
    assert "keys/passphrase" in r.stderr and ("out of bounds" in r.stderr or "not integers" in r.stderr), str(r)
    assert time.monotonic() - started < 30


# ---- two copies ----------------------------------------------------------------------------------------


def test_damaged_key_files_are_damage_not_a_wrong_passphrase(one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    for name in ("keys/passphrase", "keys/passphrase.2"):
        path = prot.storage / name
        flip(path, path.read_bytes().index(b'"salt"') + 12)  # a byte of the KDF salt in each copy
    fresh = Cli(home=tmp_path / "home2")
    r = fresh.vault_import(prot.storage)
    assert not r.ok, str(r)
    assert r.returncode == 65 and "wrong passphrase" not in r.output, f"damage reported as a wrong passphrase:\n{r}"
    assert "keys/passphrase" in r.stderr and "keys/passphrase.2" in r.stderr and "damaged" in r.stderr, str(r)
    assert as_user(prot, PASSPHRASE).run("vault", "check-passphrase", prot.vault).returncode == 65

    # This host's key still opens the vault: it restores, and verify names both copies.
    restores(prot, one_vault.point, one_vault.image, tmp_path / "out")
    r = prot.cli.vault_verify(prot.vault)
    assert not r.ok and "keys/passphrase.2" in r.stderr, str(r)
    # change-passphrase writes both copies anew; a new host can unlock again.
    new_file = tmp_path / "new"
    new_file.write_text(NEW)
    r = prot.cli.run("vault", "change-passphrase", prot.vault, "--new-passphrase-file", str(new_file))
    assert r.ok, str(r)
    r = Cli(home=tmp_path / "home3", passphrase=NEW).vault_import(prot.storage)
    assert r.ok, str(r)
    assert as_user(prot, NEW).vault_verify(prot.vault).ok
    assert prot.cli.vault_verify(prot.vault).returncode == 77, "the old passphrase must no longer be accepted"


def test_one_damaged_key_file_copy_unlocks_and_heals(one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    first = prot.storage / "keys/passphrase"
    flip(first, first.read_bytes().index(b'"key"') + 10)  # the wrapped key itself: AES-GCM alone would say "wrong"
    r = Cli(home=tmp_path / "home2").vault_import(prot.storage)
    assert r.ok, f"the second copy must unlock the vault:\n{r}"
    r = prot.cli.backup_now(prot.vm)  # the next write heals the damaged copy
    assert r.ok, str(r)
    assert first.read_bytes() == (prot.storage / "keys/passphrase.2").read_bytes()
    assert prot.cli.vault_verify(prot.vault).ok


@pytest.mark.parametrize("copy", ["config", "config.2"])
def test_flipped_config_every_point_restores_and_heals(copy: str, one_vault: OneVault, tmp_path: Path) -> None:
    prot = one_vault.prot
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    points = prot.cli.point_ids(prot.vm)
    path = prot.storage / copy
    flip(path, path.read_bytes().index(b'"uuid"') + 12)  # the vault's uuid: the copy names another vault
    r = prot.cli.vault_verify(prot.vault)
    assert not r.ok and copy in r.stderr, str(r)
    for i, point in enumerate(points):
        restores(prot, point, one_vault.image, tmp_path / f"out{i}")
    r = Cli(home=tmp_path / "home2").vault_import(prot.storage)  # a new host (passphrase) too
    assert r.ok, str(r)
    r = prot.cli.backup_now(prot.vm)  # heals
    assert r.ok, str(r)
    assert (prot.storage / "config").read_bytes() == (prot.storage / "config.2").read_bytes()
    assert prot.cli.vault_verify(prot.vault).ok
