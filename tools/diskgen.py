#!/usr/bin/env python3
"""vmvault's own generator of realistic VM disk images, for the tests and the benchmarks.

    diskgen.py make   --out IMG --size 512M --seed 1     # GPT + ext4 holding realistic files
    diskgen.py mutate IMG --seed 7 --fraction 0.01 [--contig BYTES] [--undo FILE]
    diskgen.py revert IMG --undo FILE

`make` writes a raw image of exactly --size bytes: a GPT with one Linux partition from 1 MiB,
formatted ext4 by `mkfs.ext4 -d` (no root, no loop device) from a staging folder that holds, as
shares of the image size:

    text        generated log files, configuration files and prose (compresses well)
    binaries    executables and libraries of this host (/usr/bin, /usr/lib: real machine code)
    compressed  gzip archives of generated text (does not compress again)
    random      seeded random bytes (incompressible, unique)
    sparse-ish  database-like files: 8 KiB pages, half of them zero (zero runs inside files)
    duplicates  copies of earlier files (data a real disk holds twice)

and the rest of the disk is never written (zero, sparse in the file). Timestamps, UUIDs and the
ext4 hash seed are fixed, so the files, their contents and their places on the disk depend only on
the seed, the size and the host's binaries; only inode change times (and the checksums covering
them) differ between two builds. A JSON summary of the composition is printed and written to IMG.json.

`mutate` changes a fraction of the disk in place as a running VM would: one contiguous region
(a file rewritten) plus scattered 4 KiB writes, both only where the disk already holds data.
It prints how many blocks it touched at several block sizes: the least a fixed-block incremental
backup must read. `--undo FILE` saves the old bytes; `revert` puts them back.

Needs e2fsprogs (mkfs.ext4 with -d) and gdisk (sgdisk). Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

MiB = 1 << 20
SECTOR = 512
PARTITION_START = MiB
GPT_TAIL = 34 * SECTOR  # the backup GPT at the end of the disk
FIXED_TIME = 1_700_000_000
BLOCK = 4096
USED_UNIT = 64 << 10

# Shares of the written data by kind (scaled so they add up to --fill of the disk).
SHARES = {"text": 0.08, "binaries": 0.20, "compressed": 0.04, "random": 0.12, "pages": 0.04, "duplicates": 0.02}
BINARY_SOURCES = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/libexec")

WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were",
    "her", "she", "there", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no",
    "will", "more", "can", "out", "up", "who", "kernel", "disk", "backup", "vault", "snapshot", "restore",
    "network", "service", "daemon", "started", "stopped", "error", "warning", "info", "request", "response",
    "session", "user", "admin", "config", "value", "timeout", "retry", "connection", "database", "query",
    "table", "index", "page", "buffer", "cache", "memory", "thread", "process", "signal", "socket", "client",
    "server", "version", "update", "install", "package",
)
LOG_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
SERVICES = ("sshd", "nginx", "postgres", "cron", "systemd", "kernel", "dhclient", "app")


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def prose(rng: random.Random, size: int) -> bytes:
    """Sentences of common words: compresses about 3:1 like real documentation."""
    out: list[str] = []
    length = 0
    while length < size:
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        line = " ".join(words).capitalize() + ".\n"
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


def log_text(rng: random.Random, size: int) -> bytes:
    """syslog-like lines with rising timestamps, hosts, pids and numbers: repetitive but not identical."""
    out: list[str] = []
    length = 0
    stamp = FIXED_TIME - rng.randrange(10**7)
    while length < size:
        stamp += rng.randrange(1, 30)
        service = rng.choice(SERVICES)
        words = " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))
        pid = rng.randrange(100, 40000)
        level = rng.choice(LOG_LEVELS)
        line = f"{stamp} vm{rng.randrange(4)} {service}[{pid}]: {level} {words} id={rng.getrandbits(32):08x}\n"
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


def config_text(rng: random.Random, size: int) -> bytes:
    out: list[str] = []
    length = 0
    while length < size:
        section = rng.choice(WORDS)
        lines = [f"[{section}.{rng.randrange(100)}]"]
        for _ in range(rng.randint(3, 12)):
            value = rng.choice(["true", "false", str(rng.randrange(10**6)), rng.choice(WORDS)])
            lines.append(f"{rng.choice(WORDS)}_{rng.choice(WORDS)} = {value}")
        block = "\n".join(lines) + "\n\n"
        out.append(block)
        length += len(block)
    return "".join(out).encode()[:size]


def database_pages(rng: random.Random, size: int) -> bytes:
    """8 KiB pages, about half never written (zero), the rest half-filled rows then zero padding."""
    pages = []
    for _ in range(max(1, size // 8192)):
        if rng.random() < 0.5:
            pages.append(bytes(8192))
        else:
            used = rng.randrange(512, 8192)
            pages.append(rng.randbytes(used) + bytes(8192 - used))
    return b"".join(pages)[:size]


def host_binaries(rng: random.Random) -> list[Path]:
    """Regular ELF files of this host, in a seeded order (real machine code, as on a real disk)."""
    found: list[Path] = []
    for root in BINARY_SOURCES:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    if path.is_symlink() or not path.is_file() or path.stat().st_size < 4096:
                        continue
                    with open(path, "rb") as f:
                        if f.read(4) != b"\x7fELF":
                            continue
                except OSError:
                    continue
                found.append(path)
    rng.shuffle(found)
    return found


class Stager:
    """Fills a staging folder up to a byte budget per kind, recording what it wrote."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.written: dict[str, int] = {}
        self.files: list[Path] = []

    def put(self, kind: str, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files.append(path)
        self.written[kind] = self.written.get(kind, 0) + len(data)

    def file_size(self, budget_left: int, low: int, high: int) -> int:
        # Log-uniform sizes: many small files and a few large ones, as on a real system.
        size = int(2 ** self.rng.uniform(low.bit_length(), high.bit_length()))
        return max(1, min(size, budget_left))

    def fill_text(self, budget: int) -> None:
        makers = (("var/log", "log", log_text), ("etc", "conf", config_text), ("usr/share/doc", "txt", prose))
        n = 0
        while self.written.get("text", 0) < budget:
            folder, ext, make = makers[n % 3]
            size = self.file_size(budget - self.written.get("text", 0), 256, 4 * MiB)
            self.put("text", f"{folder}/{self.rng.choice(WORDS)}-{n}.{ext}", make(self.rng, size))
            n += 1

    def fill_binaries(self, budget: int) -> None:
        for n, source in enumerate(host_binaries(self.rng)):
            if self.written.get("binaries", 0) >= budget:
                return
            data = source.read_bytes()[: budget - self.written.get("binaries", 0)]
            self.put("binaries", f"opt/app/{'lib' if '.so' in source.name else 'bin'}/{n:05d}-{source.name}", data)
        # A host without binaries still gets code-like content: prose interleaved with random runs.
        n = 0
        while self.written.get("binaries", 0) < budget:
            size = self.file_size(budget - self.written.get("binaries", 0), 16 << 10, 2 * MiB)
            half = size // 2
            self.put("binaries", f"opt/app/bin/synthetic-{n}", prose(self.rng, half) + self.rng.randbytes(size - half))
            n += 1

    def fill_compressed(self, budget: int) -> None:
        n = 0
        while self.written.get("compressed", 0) < budget:
            raw = log_text(self.rng, self.file_size(budget * 3, 64 << 10, 8 * MiB))
            data = gzip.compress(raw, compresslevel=6, mtime=FIXED_TIME)[: budget - self.written.get("compressed", 0)]
            self.put("compressed", f"var/log/archive/messages.{n}.gz", data)
            n += 1

    def fill_random(self, budget: int) -> None:
        n = 0
        while self.written.get("random", 0) < budget:
            size = self.file_size(budget - self.written.get("random", 0), 4 << 10, 16 * MiB)
            self.put("random", f"home/user/data/blob-{n}.bin", self.rng.randbytes(size))
            n += 1

    def fill_pages(self, budget: int) -> None:
        n = 0
        while self.written.get("pages", 0) < budget:
            size = self.file_size(budget - self.written.get("pages", 0), 64 << 10, 16 * MiB)
            self.put("pages", f"var/lib/db/base/{16384 + n}", database_pages(self.rng, size))
            n += 1

    def fill_duplicates(self, budget: int) -> None:
        originals = list(self.files)
        n = 0
        while originals and self.written.get("duplicates", 0) < budget:
            source = self.rng.choice(originals)
            data = source.read_bytes()[: budget - self.written.get("duplicates", 0)]
            self.put("duplicates", f"srv/copy/{n}-{source.name}", data)
            n += 1


# ---------------------------------------------------------------------------------------------
# make
# ---------------------------------------------------------------------------------------------


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def seeded_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(bytes=rng.randbytes(16), version=4))


def stage(root: Path, size: int, seed: int, fill: float) -> dict[str, int]:
    """Write the files; `fill` scales the shares (0.5 by default: half the disk holds data)."""
    scale = fill / sum(SHARES.values())
    budget = {kind: int(size * share * scale) for kind, share in SHARES.items()}
    stager = Stager(root, random.Random(seed))
    stager.fill_text(budget["text"])
    stager.fill_binaries(budget["binaries"])
    stager.fill_compressed(budget["compressed"])
    stager.fill_random(budget["random"])
    stager.fill_pages(budget["pages"])
    stager.fill_duplicates(budget["duplicates"])
    for path in [root, *root.rglob("*")]:
        os.utime(path, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    return stager.written


def copy_data_blocks(src: Path, dst_fd: int, offset: int) -> None:
    """Copy src into dst at offset, skipping holes and zero blocks (so the image stays sparse)."""
    with open(src, "rb") as f:
        pos = 0
        while True:
            chunk = f.read(4 * MiB)
            if not chunk:
                return
            for start in range(0, len(chunk), USED_UNIT):
                piece = chunk[start : start + USED_UNIT]
                if piece.count(0) != len(piece):
                    os.pwrite(dst_fd, piece, offset + pos + start)
            pos += len(chunk)


def make_image(out: Path, size: int, seed: int, workdir: Path | None = None, fill: float = 0.5) -> dict[str, Any]:
    if size < 8 * MiB:
        raise SystemExit("diskgen: --size must be at least 8 MiB")
    if not 0 < fill <= 0.8:
        raise SystemExit("diskgen: --fill must be above 0 and at most 0.8 (ext4 needs room for its metadata)")
    for tool in ("mkfs.ext4", "sgdisk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"diskgen: {tool} is missing (apt-get install e2fsprogs gdisk)")
    rng = random.Random(seed ^ 0x5EED)
    partition_bytes = (size - PARTITION_START - GPT_TAIL) // BLOCK * BLOCK
    with tempfile.TemporaryDirectory(dir=workdir, prefix="diskgen-") as scratch:
        staging = Path(scratch) / "root"
        staging.mkdir()
        composition = stage(staging, size, seed, fill)
        fs_image = Path(scratch) / "fs.img"
        with open(fs_image, "wb") as f:
            f.truncate(partition_bytes)
        env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}
        fs_uuid = seeded_uuid(rng)
        run(["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-d", str(staging), "-U", fs_uuid,
             "-E", f"hash_seed={seeded_uuid(rng)},root_owner=0:0", "-L", "vmroot", str(fs_image)], env=env)
        out.unlink(missing_ok=True)
        with open(out, "wb") as f:
            f.truncate(size)
        run(["sgdisk", "-Z", str(out)])
        run(["sgdisk", "-U", seeded_uuid(rng), "-n", f"1:{PARTITION_START // SECTOR}:+{partition_bytes // 1024}K",
             "-t", "1:8300", "-u", f"1:{seeded_uuid(rng)}", "-c", "1:root", str(out)])
        fd = os.open(out, os.O_RDWR)
        try:
            copy_data_blocks(fs_image, fd, PARTITION_START)
            os.fsync(fd)
        finally:
            os.close(fd)
    summary: dict[str, Any] = {
        "image": str(out), "size": size, "seed": seed, "filesystem": "ext4", "fs_uuid": fs_uuid,
        "partition_offset": PARTITION_START, "partition_bytes": partition_bytes,
        "written_bytes_by_kind": composition, "written_bytes": sum(composition.values()),
    }
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------
# mutate / revert
# ---------------------------------------------------------------------------------------------


def used_units(fd: int, size: int) -> list[int]:
    """Indexes of the 64 KiB units that hold data (found with SEEK_DATA, then read)."""
    units: list[int] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        unit = start // USED_UNIT
        while unit * USED_UNIT < end:
            piece = os.pread(fd, USED_UNIT, unit * USED_UNIT)
            if piece.count(0) != len(piece):
                units.append(unit)
            unit += 1
        pos = max(end, unit * USED_UNIT)
    return units


def pick_regions(fd: int, size: int, rng: random.Random, fraction: float, contig: int) -> list[tuple[int, int]]:
    units = used_units(fd, size)
    if not units:
        raise SystemExit("diskgen: the image holds no data to change")
    target = int(size * fraction)
    contig = min(contig, target) // BLOCK * BLOCK
    regions: list[tuple[int, int]] = []
    taken: set[int] = set()
    if contig:
        start = min(rng.choice(units) * USED_UNIT, size - contig) // BLOCK * BLOCK
        regions.append((start, contig))
        taken.update(range(start // BLOCK, (start + contig) // BLOCK))
    wanted = max(0, (target - contig) // BLOCK)
    blocks_per_unit = USED_UNIT // BLOCK
    tries = 0
    zero = bytes(BLOCK)
    while len(regions) < wanted + (1 if contig else 0) and tries < 50 * max(wanted, 1):
        tries += 1
        block = rng.choice(units) * blocks_per_unit + rng.randrange(blocks_per_unit)
        if block in taken or (block + 1) * BLOCK > size or os.pread(fd, BLOCK, block * BLOCK) == zero:
            continue
        taken.add(block)
        regions.append((block * BLOCK, BLOCK))
    return sorted(regions)


def touched(regions: list[tuple[int, int]], granule: int) -> int:
    blocks: set[int] = set()
    for offset, length in regions:
        blocks.update(range(offset // granule, (offset + length - 1) // granule + 1))
    return len(blocks)


def mutate_image(image: Path, seed: int, fraction: float, contig: int, undo: Path | None) -> dict[str, Any]:
    size = image.stat().st_size
    rng = random.Random(seed)
    fd = os.open(image, os.O_RDWR)
    try:
        regions = pick_regions(fd, size, rng, fraction, contig)
        with open(undo, "wb") if undo else open(os.devnull, "wb") as saved:
            for offset, length in regions:
                saved.write(struct.pack("<QI", offset, length) + os.pread(fd, length, offset))
                os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    written = sum(length for _, length in regions)
    granules = {"4KiB": 4 << 10, "64KiB": 64 << 10, "256KiB": 256 << 10, "1024KiB": 1 << 20, "4096KiB": 4 << 20}
    return {
        "image": str(image), "seed": seed, "image_bytes": size, "regions": len(regions),
        "bytes_written": written, "fraction_written": round(written / size, 6),
        "touched_blocks": {name: {"blocks": touched(regions, g), "bytes": touched(regions, g) * g}
                           for name, g in granules.items()},
    }


def revert_image(image: Path, undo: Path) -> dict[str, Any]:
    fd = os.open(image, os.O_RDWR)
    count = 0
    try:
        with open(undo, "rb") as saved:
            while header := saved.read(12):
                offset, length = struct.unpack("<QI", header)
                os.pwrite(fd, saved.read(length), offset)
                count += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"image": str(image), "reverted_regions": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="build a realistic raw disk image")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--size", default="512M")
    make.add_argument("--seed", type=int, default=1)
    make.add_argument("--fill", type=float, default=0.5, help="share of the disk that holds data (default 0.5)")
    make.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: the system's)")
    mutate = sub.add_parser("mutate", help="change a fraction of an image like a running VM")
    mutate.add_argument("image", type=Path)
    mutate.add_argument("--seed", type=int, default=42)
    mutate.add_argument("--fraction", type=float, default=0.01)
    mutate.add_argument("--contig", type=int, default=16 * MiB, help="bytes of the contiguous region")
    mutate.add_argument("--undo", type=Path, default=None, help="save the old bytes here")
    revert = sub.add_parser("revert", help="undo a mutate")
    revert.add_argument("image", type=Path)
    revert.add_argument("--undo", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "make":
        result = make_image(args.out, parse_size(args.size), args.seed, args.workdir, args.fill)
    elif args.command == "mutate":
        result = mutate_image(args.image, args.seed, args.fraction, args.contig, args.undo)
    else:
        result = revert_image(args.image, args.undo)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
