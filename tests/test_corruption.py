"""One byte flipped in each kind of vault file in turn: verify names it, restore never lies.

Kinds: pack (data/**), pack index (index/**), disk index (tree/**), manifest (points/**),
passphrase key file (keys/**) and config. For each: `vault verify` exits non-zero and its stderr
names the damaged object; `restore disks` fails and leaves nothing under the final file names.

Three kinds are allowed to restore correctly instead of failing, because the data they describe is
intact and authenticated elsewhere:
- keys/passphrase and config are kept in two copies (docs/format.md, "Copies"): one damaged copy
  is reported by verify, and the vault opens with the other; they must restore (test below).
- index/** lists what a pack holds; a home that has already read it keeps that list in its cache.
In every case a successful restore must still be byte-identical.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import PASSPHRASE, Cli, Protected, copy_image, files_equal, qemu_raw_view, rp_id, tree_digest, vault_files
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)
from vmvault.engine.readplan import plan_reads
from vmvault.vault.chunkindex import Location
from vmvault.vault.store import Vault

KINDS = ["data", "index", "tree", "points", "keys", "config"]
# Three seeded offsets per kind of file: headers, bodies and trailers all get hit over the runs.
FLIPS = [f"{kind}#{n}" for kind in KINDS for n in range(3)]


@dataclass
class OnePoint:
    prot: Protected
    rp: str
    expected: Path


@pytest.fixture(scope="module")
def one_point(small_image: Path, tmp_path_factory: pytest.TempPathFactory) -> OnePoint:
    work = tmp_path_factory.mktemp("corruption")
    disk = copy_image(small_image, work / "disk.raw")
    prot = protect(Cli(home=work / "home"), disk, work / "vault")
    r = prot.cli.backup_now(prot.vm)
    assert r.ok, str(r)
    (point,) = prot.cli.points(prot.vm)
    return OnePoint(prot, rp_id(point), small_image)


@dataclass
class Flip:
    path: Path
    rel: str
    offset: int


@pytest.fixture
def flipped(request: pytest.FixtureRequest, one_point: OnePoint) -> Iterator[Flip]:
    """Flip one byte of one file of the requested kind; put it back afterwards."""
    kind = str(request.param).partition("#")[0]
    storage = one_point.prot.storage
    files = vault_files(storage, kind)
    assert files, f"the vault has no {kind} file: {sorted(tree_digest(storage))}"
    rng = random.Random(f"vmvault-flip-{request.param}")
    # Anywhere in the file, headers and trailers included: with a single point every byte of
    # every vault file is something that point (or unlocking the vault) depends on.
    path = rng.choice(files)
    offset = rng.randrange(path.stat().st_size)
    data = bytearray(path.read_bytes())
    original = data[offset]
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        yield Flip(path, path.relative_to(storage).as_posix(), offset)
    finally:
        data[offset] = original
        path.write_bytes(bytes(data))


def _names_object(stderr: str, flip: Flip, kind: str) -> bool:
    if flip.rel in stderr or flip.path.name in stderr:
        return True
    # A damaged pack may be reported by the chunk (or blob) whose bytes failed authentication.
    return kind == "data" and re.search(r"(chunk|blob) [0-9a-f]{16,}", stderr) is not None


def _final_files(target: Path) -> list[Path]:
    if not target.exists():
        return []
    return [p for p in target.iterdir() if p.suffix in (".raw", ".qcow2")]


def test_healthy_vault_verifies(one_point: OnePoint) -> None:
    r = one_point.prot.cli.vault_verify(one_point.prot.vault)
    assert r.ok, str(r)


@pytest.mark.parametrize("flipped", FLIPS, indirect=True)
def test_flipped_byte_is_reported_and_never_restored(flipped: Flip, one_point: OnePoint, tmp_path: Path) -> None:
    kind = flipped.rel.split("/")[0]
    cli, vault = one_point.prot.cli, one_point.prot.vault
    where = f"byte {flipped.offset} of {flipped.rel}"

    r = cli.vault_verify(vault)
    assert not r.ok, f"verify passed with {where} flipped:\n{r}"
    assert "Traceback" not in r.output, str(r)
    assert _names_object(r.stderr, flipped, kind), f"verify does not name {flipped.rel} ({where}):\n{r}"

    target = tmp_path / "restore"
    r = cli.restore_disks(one_point.prot.vm, one_point.rp, target)
    if kind in ("keys", "config", "config.2"):  # the other copy opens the vault: the point restores
        assert r.ok, f"restore failed with one copy damaged ({where}):\n{r}"
        assert [p.name for p in _final_files(target)] == ["disk0.raw"], str(r)
        expected = qemu_raw_view(one_point.expected, tmp_path / "expected.raw")
        assert files_equal(target / "disk0.raw", expected), f"restore differs ({where})"
        return
    assert not r.ok, f"restore succeeded with {where} flipped:\n{r}"
    assert "Traceback" not in r.output, str(r)
    assert _final_files(target) == [], f"restore left files under their final names ({where}):\n{r}"


@pytest.mark.parametrize("flipped", ["keys#0", "keys#1", "keys#2"], indirect=True)
def test_flipped_key_file_copy_still_unlocks_with_passphrase(
    flipped: Flip, one_point: OnePoint, tmp_path: Path
) -> None:
    """One damaged copy of keys/passphrase: a fresh home (no host key) still opens the vault (tests/test_vault_keys.py
    damages both)."""
    storage = one_point.prot.storage
    before = tree_digest(storage)
    fresh = Cli(home=tmp_path / "home2")
    r = fresh.vault_import(storage)
    assert r.ok, f"the key file's other copy did not open the vault ({flipped.rel} damaged):\n{r}"
    assert tree_digest(storage) == before, "an import must not change the vault"


def test_flipped_byte_inside_a_coalesced_read_fails_the_restore(one_point: OnePoint, tmp_path: Path) -> None:
    """A restore fetches neighbouring blobs of a pack in one ranged read (engine/readplan.py): a
    byte flipped in a blob in the middle of such a read, not at either end of it, still fails the
    restore, naming the chunk and its pack, and leaves no file under the final name."""
    storage = one_point.prot.storage
    vault = Vault.open(storage, tmp_path / "home", PASSPHRASE)
    try:
        reads = []
        for path in vault_files(storage, "data"):
            name = path.relative_to(storage).as_posix()
            known = vault.index.pack_entries(name)
            assert known is not None, f"{name} is not in the index"
            reads += plan_reads(Location(name, known[0], ref) for ref in known[1])
    finally:
        vault.close()
    read = max(reads, key=lambda r: len(r.blobs))
    assert len(read.blobs) >= 3, "no read coalesces three blobs: the test would not test coalescing"
    middle = read.blobs[len(read.blobs) // 2]
    path = storage / middle.pack
    data = bytearray(path.read_bytes())
    offset = middle.ref.offset + middle.ref.length // 2
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        target = tmp_path / "restore"
        r = one_point.prot.cli.restore_disks(one_point.prot.vm, one_point.rp, target)
        assert not r.ok, f"restore succeeded with byte {offset} of {middle.pack} flipped:\n{r}"
        assert f"chunk {middle.ref.blob_id.hex()}" in r.stderr and middle.pack in r.stderr, str(r)
        assert _final_files(target) == [], str(r)
    finally:
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))


def test_a_pack_is_checked_once_by_concurrent_restore_workers(one_point: OnePoint, tmp_path: Path) -> None:
    """Eight workers reaching an unchecked pack together: one reads its header, table of contents
    and index file; the others wait for that check instead of repeating it (three GETs each on
    object storage). The backend is the real local one, its reads counted and slowed."""
    vault = Vault.open(one_point.prot.storage, tmp_path / "home", PASSPHRASE)
    try:
        pack = vault_files(one_point.prot.storage, "data")[0].relative_to(one_point.prot.storage).as_posix()
        real_get, reads, lock = vault.backend.get, [], threading.Lock()

        def slow_get(name: str, offset: int = 0, length: int | None = None) -> bytes:
            with lock:
                reads.append(name)
            time.sleep(0.05)  # long enough for every worker to arrive while the check runs
            return real_get(name, offset, length)

        vault.backend.get = slow_get  # type: ignore[method-assign]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _n: vault.authenticate_pack(pack), range(8)))
    finally:
        vault.close()
    assert reads.count(pack) == 2, f"the pack's header and table of contents were read {reads.count(pack)} times"
    assert len(reads) == 3, reads


def test_vault_verifies_again_after_repair(one_point: OnePoint) -> None:
    # Every flip above was put back: the vault (and this home's caches) must be healthy again.
    r = one_point.prot.cli.vault_verify(one_point.prot.vault)
    assert r.ok, str(r)
