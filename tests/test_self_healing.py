"""Issue 18 item 3: self-healing backups. A chunk that verify (or a restore) found bad is stored
again by the next backup of a VM that still has the data, instead of being deduplicated against
the bad copy; the older point that used it becomes restorable again (verify lists it under
healedPoints), and garbage collection then drops the bad copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Cli, assert_same_image, head_of_image, vault_files
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


@pytest.mark.parametrize("found_by", ["verify", "restore"])
def test_the_next_backup_stores_a_bad_chunk_again_and_heals_the_old_point(
    found_by: str, small_image: Path, tmp_path: Path
) -> None:
    disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    assert cli.backup_now(prot.vm).ok
    (first,) = cli.point_ids(prot.vm)
    pack = max(vault_files(prot.storage, "data"), key=lambda p: p.stat().st_size)
    rel = pack.relative_to(prot.storage).as_posix()
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside one chunk's ciphertext
    pack.write_bytes(bytes(data))

    if found_by == "verify":
        r = cli.vault_verify(prot.vault)
        assert not r.ok and rel in r.stderr and first in r.stderr, str(r)
    else:  # never verified: the restore itself meets the bad chunk
        r = cli.restore_disks(prot.vm, first, tmp_path / "failed")
        assert not r.ok and "fails authentication" in r.stderr, str(r)

    assert cli.backup_now(prot.vm).ok  # the VM still has that data: it is stored again
    assert cli.point_ids(prot.vm)[0] == first
    second = cli.point_ids(prot.vm)[1]
    r = cli.vault_verify(prot.vault)
    assert r.ok, f"the new backup deduplicated against the bad copy:\n{r}"
    report = r.json()
    assert report["healedPoints"] == ([first] if found_by == "verify" else []), str(r)
    assert any(rel in n and "good copy" in n for n in report["notes"]), str(r)
    for rp in (first, second):
        target = tmp_path / rp
        r = cli.restore_disks(prot.vm, rp, target)
        assert r.ok, str(r)
        (restored,) = list(target.iterdir())
        assert_same_image(restored, disk)

    report = cli.ok("vault", "gc", prot.vault, "--grace", "0").json()
    assert report["packsRepacked"] + report["packsDeleted"] >= 1, report
    assert not pack.exists(), "garbage collection kept the pack with the bad copy"
    r = cli.vault_verify(prot.vault)
    assert r.ok and r.json()["notes"] == [], str(r)
