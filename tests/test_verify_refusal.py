"""A point that failed `vault verify` is refused by restores and file recovery until a verify passes.

The damage is real (one byte flipped in the middle of a data pack); the refusal must change
nothing on disk, name the point and the problem, and say what to do. Putting the byte back and
verifying again clears the mark, and the restore is then byte-identical.
"""

from __future__ import annotations

from pathlib import Path

from helpers import Cli, assert_same_image, copy_image, rp_id, vault_files
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_point_that_failed_verification_is_refused_until_a_verify_passes(
    small_image: Path, tmp_path: Path
) -> None:
    disk = copy_image(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    assert prot.cli.backup_now(prot.vm).ok
    (point,) = prot.cli.points(prot.vm)
    rp = rp_id(point)
    assert point["properties"]["verification"]["state"] is None  # never verified yet: restorable

    assert prot.cli.vault_verify(prot.vault).ok
    (point,) = prot.cli.points(prot.vm)
    assert point["properties"]["verification"]["state"] == "Passed"

    pack = max(vault_files(prot.storage, "data"), key=lambda p: p.stat().st_size)
    offset = pack.stat().st_size // 2  # inside a chunk's ciphertext
    _flip(pack, offset)
    assert not prot.cli.vault_verify(prot.vault).ok
    (point,) = prot.cli.points(prot.vm)
    assert point["properties"]["verification"]["state"] == "Failed"
    assert point["properties"]["verification"]["problem"], point

    target = tmp_path / "restore"
    r = prot.cli.fails("restore", "disks", "--vm", prot.vm, "--rp", rp, "--target-dir", str(target))
    assert r.returncode == 65, r
    assert "point_failed_verification" in r.stderr and rp in r.stderr, r
    assert "vault verify" in r.stderr and "recoverypoint list" in r.stderr, r  # the fix is named
    assert not target.exists() or not any(target.iterdir())

    r = prot.cli.fails("files", "mount", prot.vm, "--rp", rp)
    assert "point_failed_verification" in r.stderr, r

    _flip(pack, offset)  # the storage is repaired
    assert prot.cli.vault_verify(prot.vault).ok
    (point,) = prot.cli.points(prot.vm)
    assert point["properties"]["verification"]["state"] == "Passed"
    r = prot.cli.restore_disks(prot.vm, rp, target)
    assert r.ok, r
    (restored,) = list(target.iterdir())
    assert_same_image(restored, small_image)
