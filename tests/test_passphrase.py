"""A wrong passphrase is refused and changes nothing in the vault."""

from __future__ import annotations

from pathlib import Path

from helpers import Cli, copy_image, protect, tree_digest


def test_wrong_passphrase_is_refused_and_changes_nothing(small_image: Path, tmp_path: Path) -> None:
    prot = protect(Cli(home=tmp_path / "home"), copy_image(small_image, tmp_path / "disk.raw"), tmp_path / "vault")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    before = tree_digest(prot.storage)

    intruder = Cli(home=tmp_path / "home2", passphrase="not the passphrase")
    r = intruder.vault_import(prot.storage)
    assert not r.ok, f"import with a wrong passphrase succeeded:\n{r}"
    assert "Traceback" not in r.output, str(r)
    assert "passphrase" in r.stderr.lower(), f"the error should say the passphrase is wrong:\n{r}"
    assert tree_digest(prot.storage) == before, "a refused import changed vault files"

    nobody = Cli(home=tmp_path / "home3", passphrase=None)
    r = nobody.vault_import(prot.storage)
    assert not r.ok, f"import without any passphrase succeeded:\n{r}"
    assert "Traceback" not in r.output, str(r)
    assert tree_digest(prot.storage) == before, "a refused import changed vault files"

    # The refused homes know nothing of the vault.
    r = intruder.run("vault", "list")
    assert r.ok, str(r)
    assert r.json() == [], r.stdout

    # And the right passphrase still opens it.
    friend = Cli(home=tmp_path / "home4")
    r = friend.vault_import(prot.storage)
    assert r.ok, str(r)
    assert tree_digest(prot.storage) == before, "importing a vault must not change its files"
