"""The restored file (engine/outfile.py): direct I/O for aligned pieces, the page cache for the rest.

Whatever path a piece takes, the file must hold exactly the bytes written at their offsets, holes
stay holes (zeros, unallocated), and a file system that refuses direct I/O still gets every
byte. Real files on this machine's file systems; one case makes the direct write fail, as a
stacked file system can, which no file system here does (said where it happens)."""

from __future__ import annotations

import errno
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vmvault.engine.outfile import ALIGN, MAX_DIRECT, RestoredFile

CHUNK = 64 * 1024


def _direct_works(folder: Path) -> bool:
    """Whether this file system takes O_DIRECT (probed apart from the code under test)."""
    probe = folder / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _pieces(seed: int, size: int) -> list[tuple[int, bytes | memoryview]]:
    """Runs of neighbouring 64 KiB chunks with holes between them, one piece longer than a
    direct write may be, and a short last chunk (a disk whose size is no multiple of the chunk
    size)."""
    rng = random.Random(seed)
    large_at = (size // 2) // CHUNK * CHUNK
    large_end = large_at + MAX_DIRECT + CHUNK
    pieces: list[tuple[int, bytes | memoryview]] = [(large_at, rng.randbytes(large_end - large_at))]
    last = (size - 1) // CHUNK * CHUNK
    for offset in range(0, last, CHUNK):
        if not large_at <= offset < large_end and rng.random() < 0.7:
            pieces.append((offset, rng.randbytes(CHUNK)))
    pieces.append((last, rng.randbytes(size - last)))  # short: not a multiple of ALIGN
    return pieces


def _expected(size: int, pieces: list[tuple[int, bytes | memoryview]]) -> bytes:
    image = bytearray(size)
    for offset, data in pieces:
        image[offset : offset + len(data)] = data
    return bytes(image)


def _write(path: Path, size: int, pieces: list[tuple[int, bytes | memoryview]], direct: bool) -> RestoredFile:
    """Write the pieces from four threads in a shuffled order, several at a time, as a restore's
    decoders do."""
    out = RestoredFile(path, size, direct=direct)
    shuffled = pieces[:]
    random.Random(7).shuffle(shuffled)
    groups = [shuffled[i : i + 5] for i in range(0, len(shuffled), 5)]
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(out.write_many, groups))
        out.sync()
    finally:
        out.close()
    return out


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_every_byte_lands_at_its_offset_and_holes_stay_holes(tmp_path: Path, direct: bool) -> None:
    size = 12 * MAX_DIRECT + 1234
    pieces = _pieces(1, size)
    path = tmp_path / "disk.raw"
    out = _write(path, size, pieces, direct)
    assert path.read_bytes() == _expected(size, pieces)
    assert path.stat().st_blocks * 512 < size, "the holes were written: the file is not sparse"
    if direct:
        assert (out.direct_writes > 0) == _direct_works(tmp_path), "direct I/O not used where the file system takes it"
    else:
        assert out.direct_writes == 0


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        RestoredFile(path, 1 << 20)
    assert path.read_bytes() == b"keep me"


def test_a_direct_write_refused_midway_falls_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stacked file system may accept O_DIRECT at open and refuse the write (EINVAL); no file
    system here does, so the direct descriptor's write is made to fail once. Every byte must still
    land, and later pieces go buffered."""
    if not _direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open: the fallback at open is the buffered case above")
    size = 4 * MAX_DIRECT
    pieces: list[tuple[int, bytes | memoryview]] = [
        (offset, random.Random(offset).randbytes(CHUNK)) for offset in range(0, size, 2 * CHUNK)
    ]
    real_pwrite, refused = os.pwrite, list[int]()

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if fd == out._direct_fd and not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    path = tmp_path / "disk.raw"
    out = RestoredFile(path, size)
    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        out.write_many(pieces)
        out.sync()  # the direct writes are done by the file's own writer threads
        assert refused and not out.direct
    finally:
        out.close()
    assert path.read_bytes() == _expected(size, pieces)


def test_pieces_not_aligned_take_the_page_cache(tmp_path: Path) -> None:
    """An unaligned offset or length never reaches the direct descriptor (the kernel would refuse
    it with EINVAL), whatever its neighbours are."""
    size = 1 << 20
    pieces: list[tuple[int, bytes | memoryview]] = [
        (0, b"a" * ALIGN), (ALIGN, b"b" * 100), (3 * ALIGN + 1, b"c" * ALIGN), (8 * ALIGN, b"d" * 2 * ALIGN)
    ]  # fmt: skip
    path = tmp_path / "disk.raw"
    out = RestoredFile(path, size)
    try:
        out.write_many(pieces)
        out.sync()
        direct_still = out.direct
        assert out.direct_writes == (2 if direct_still else 0)  # the first and the last piece
    finally:
        out.close()
    assert direct_still == _direct_works(tmp_path)
    assert path.read_bytes() == _expected(size, pieces)
