#!/usr/bin/env python3
"""Backup and restore into object storage vs the floor: a plain parallel upload/download of the same bytes.

    .venv/bin/python bench/objstore_bench.py                  # 256 MiB image, Azurite and moto
    .venv/bin/python bench/objstore_bench.py --size 1G --repeat 5 --out objstore.json

For each store (Azurite for Azure Blob, moto in server mode for S3; both started here on a free port
and a temporary location, as the tests do), in the same run and with the same client library:

  floor    the image's bytes cut into 16 MiB objects, uploaded 4 at a time through vmvault's own
           backend class (the same SDK, retries and parallel uploads), then downloaded the same way
           (into memory, thrown away), and downloaded again into a file (each object written at
           its offset, then fsync: what a plain download tool does to land the image on disk, made
           durable as a restore makes its disks);
  vmvault  `vault create --storage URL`, `backup now` (a full backup) and `restore disks`, each timed
           by the CLI's wall clock. Only `vault create` gets the passphrase: later commands open
           the vault with the host key it left, as on a set-up host (a passphrase given to every
           command is checked each time with scrypt, about 0.4 s here);
  engine   the same restore through the engine in this process (engine/restore.py run_restore on
           the vault opened with the host key): the restore without the CLI's start-up (Python,
           imports, catalog, the SDK's client), which a one-shot command pays and the floor does not;
  decode   the same engine restore, same strategy (as from a remote store), from a copy of the
           vault on local disk: what decrypting, decompressing, re-hashing and writing the point
           costs on this machine with no store at all, a second reference where the store serves
           faster than that.

On 2 cores the emulator is the bottleneck, so the floor is what any client could do against it.
Target: backup and restore within 1.3x of their floor. vmvault compresses and deduplicates, so it
may send fewer bytes than the floor does; both sizes are printed. Each figure is the median of
--repeat runs (each with its own fresh vault and floor objects), as the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import objstores  # noqa: E402  (the test's server starters: the same set-up as the test suite)

PIECE = 16 * 1024 * 1024


def _vmvault(home: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    exe = str(Path(sys.executable).parent / "vmvault")
    started = time.monotonic()
    p = subprocess.run([exe, "--home", str(home), "-o", "json", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"vmvault {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return time.monotonic() - started, p.stdout


class _Cpu:
    """CPU seconds used by this process (every thread) and by the store's server process while
    the block runs: on 2 cores both share the same CPUs, so their sum over 2 bounds the wall time."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self.client = self.server = 0.0

    def _now(self) -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        fields = Path(f"/proc/{self._pid}/stat").read_text().rsplit(")", 1)[1].split()
        return own.ru_utime + own.ru_stime, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> _Cpu:
        self._start = self._now()
        return self

    def __exit__(self, *_exc: object) -> None:
        end = self._now()
        self.client, self.server = end[0] - self._start[0], end[1] - self._start[1]


def _floor(url: str, image: Path, server_pid: int) -> dict[str, float]:
    from vmvault.vault.backends import open_backend

    backend = open_backend(url)
    backend.ensure_container()
    size = image.stat().st_size
    offsets = range(0, size, PIECE)

    def up(offset: int) -> None:
        with open(image, "rb") as f:
            f.seek(offset)
            backend.put(f"floor/{offset:016x}", f.read(PIECE))

    def down(offset: int) -> int:
        return len(backend.get(f"floor/{offset:016x}"))

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(up, offsets))
    upload = time.monotonic() - started
    started = time.monotonic()
    with _Cpu(server_pid) as cpu, ThreadPoolExecutor(4) as pool:
        got = sum(pool.map(down, offsets))
    assert got == size
    download = time.monotonic() - started
    return {"upload_s": upload, "download_s": download, "download_to_file_s": _floor_to_file(backend, image),
            "download_cpu_s": cpu.client + cpu.server}  # fmt: skip


def _floor_to_file(backend: Any, image: Path) -> float:
    out = image.with_name("floor-download.raw")
    started = time.monotonic()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        def down(offset: int) -> None:
            data, at = memoryview(backend.get(f"floor/{offset:016x}")), offset
            while data:
                written = os.pwrite(fd, data, at)
                data, at = data[written:], at + written

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(down, range(0, image.stat().st_size, PIECE)))
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.monotonic() - started
    same = subprocess.run(["cmp", "-s", str(image), str(out)]).returncode == 0
    out.unlink()
    assert same, "the floor's download into a file is not the image"
    return took


def _engine_restore(url: str, home: Path, image: Path, out: Path, backend: Any = None) -> tuple[float, bool]:
    """The restore of the vault's one point through the engine in this process, and whether it is
    byte-identical."""
    from vmvault.engine.restore import run_restore
    from vmvault.vault.store import Vault

    vault = Vault.open(url, home, backend=backend)
    try:
        (point,) = [o.name.rsplit("/", 1)[-1] for o in vault.backend.list("points")]
        manifest = vault.read_manifest(point)
        started = time.monotonic()
        (restored,) = run_restore(vault, manifest, out)
        took = time.monotonic() - started
    finally:
        vault.close()
    same = subprocess.run(["cmp", "-s", str(image), str(restored)]).returncode == 0
    shutil.rmtree(out)
    return took, same


def _decode_floor(url: str, home: Path, image: Path, work: Path) -> float:
    """The engine restore from a local copy of the vault's objects (same home, same host key), with
    the strategy of a restore from the store it was copied from (whole-pack reads, direct writes:
    Backend.remote), so only the store's part differs."""
    from vmvault.vault.backends import open_backend
    from vmvault.vault.backends.local import LocalBackend

    class CopyOfRemote(LocalBackend):
        @property
        def remote(self) -> bool:
            return True

    source, copy = open_backend(url), CopyOfRemote(work / "local-copy")
    for info in source.list():
        copy.put(info.name, source.get(info.name))
    took, same = _engine_restore(str(work / "local-copy"), home, image, work / "decode", backend=copy)
    assert same, "the restore from the local copy is not byte-identical"
    shutil.rmtree(work / "local-copy")
    return took


def _one(kind: str, server: objstores.Server, image: Path, work: Path, repeat: int) -> dict[str, Any]:
    os.environ.update(server.env)
    load = [os.getloadavg()[0]]
    runs = [_one_run(kind, server, image, work / f"{kind}-{n}") for n in range(repeat)]
    load.append(os.getloadavg()[0])
    median = {k: statistics.median(r[k] for r in runs) for k in _TIMES}
    return {
        **{k: round(v, 2) for k, v in median.items()},
        "backup_vs_floor": round(median["backup_s"] / median["floor_upload_s"], 2),
        "restore_vs_floor": round(median["restore_s"] / median["floor_download_s"], 2),
        "engine_restore_vs_floor": round(median["engine_restore_s"] / median["floor_download_s"], 2),
        "engine_restore_vs_decode": round(median["engine_restore_s"] / median["decode_s"], 2),
        "restore_vs_file_floor": round(median["restore_s"] / median["floor_download_to_file_s"], 2),
        "engine_restore_vs_file_floor": round(median["engine_restore_s"] / median["floor_download_to_file_s"], 2),
        "ranges": {k: [round(min(r[k] for r in runs), 2), round(max(r[k] for r in runs), 2)] for k in _TIMES},
        "floor_bytes": image.stat().st_size,
        "vault_bytes": runs[0]["vault_bytes"],
        "restored_identical": all(r["restored_identical"] for r in runs),
        "runs": [{k: round(r[k], 2) for k in _TIMES} for r in runs],
        "load_average_before_after": load,
    }


_TIMES = ("floor_upload_s", "floor_download_s", "floor_download_to_file_s", "backup_s", "restore_s",
          "engine_restore_s", "decode_s", "floor_download_cpu_s", "engine_restore_cpu_s")  # fmt: skip


def _one_run(kind: str, server: objstores.Server, image: Path, work: Path) -> dict[str, Any]:
    """One repetition: the floor, then a fresh home and vault backed up and restored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_")}
    env.update(server.env)
    new_url = objstores.fresh_azure_url if kind == "azure" else objstores.fresh_s3_url
    floor = _floor(new_url(), image, server.proc.pid)
    home = work / "home"
    url = new_url()
    _vmvault(home, {**env, "VMVAULT_PASSPHRASE": "correct horse battery staple"}, "vault", "create", "v1",
             "--storage", url)  # fmt: skip
    _vmvault(home, env, "vm", "add", "vm1", "--disk", str(image))
    _vmvault(home, env, "protection", "enable", "--vm", "vm1", "--vault", "v1")
    backup_s, _ = _vmvault(home, env, "backup", "now", "--vm", "vm1")
    _, listed = _vmvault(home, env, "recoverypoint", "list", "--vm", "vm1")
    rp = json.loads(listed)[0]["name"]
    out = work / "out"
    restore_s, _ = _vmvault(home, env, "restore", "disks", "--vm", "vm1", "--rp", rp, "--target-dir", str(out))
    restored = next(p for p in out.iterdir() if p.suffix == ".raw")
    same = subprocess.run(["cmp", "-s", str(image), str(restored)]).returncode == 0
    shutil.rmtree(out)
    with _Cpu(server.proc.pid) as engine_cpu:
        engine_s, engine_same = _engine_restore(url, home, image, work / "engine")
    decode_s = _decode_floor(url, home, image, work)
    from vmvault.vault.backends import open_backend

    return {
        "floor_upload_s": floor["upload_s"],
        "floor_download_s": floor["download_s"],
        "floor_download_to_file_s": floor["download_to_file_s"],
        "floor_download_cpu_s": floor["download_cpu_s"],
        "engine_restore_cpu_s": engine_cpu.client + engine_cpu.server,
        "backup_s": backup_s,
        "restore_s": restore_s,
        "engine_restore_s": engine_s,
        "decode_s": decode_s,
        "vault_bytes": sum(i.size for i in open_backend(url).list()),
        "restored_identical": same and engine_same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--stores", default="azure,s3")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions, medians reported (a shared machine is noisy)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmv-objbench-"))
    try:
        image = work / "image.raw"
        subprocess.run([sys.executable, str(REPO / "tools" / "diskgen.py"), "make", "--out", str(image),
                        "--size", args.size, "--seed", "3", "--workdir", str(work)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        results: dict[str, Any] = {"image_bytes": image.stat().st_size, "load_before": os.getloadavg()}
        for kind in args.stores.split(","):
            start = objstores.start_azurite if kind == "azure" else objstores.start_moto
            server = start(work / f"server-{kind}")
            try:
                results[kind] = _one(kind, server, image, work, args.repeat)
            finally:
                server.stop()
            print(kind, json.dumps(results[kind]), flush=True)
        results["load_after"] = os.getloadavg()
        print("load average before and after:", results["load_before"], results["load_after"], flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
