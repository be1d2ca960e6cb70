#!/usr/bin/env python3
"""Backup and restore into object storage vs the floor: a plain parallel upload/download of the same bytes.

    .venv/bin/python bench/objstore_bench.py                  # 256 MiB image, Azurite and moto
    .venv/bin/python bench/objstore_bench.py --size 1G --out objstore.json

For each store (Azurite for Azure Blob, moto in server mode for S3; both started here on a free port
and a temporary location, as the tests do), in the same run and with the same client library:

  floor    the image's bytes cut into 16 MiB objects, uploaded 4 at a time through vmvault's own
           backend class (the same SDK, retries and parallel uploads), then downloaded the same way;
  vmvault  `vault create --storage URL`, `backup now` (a full backup) and `restore disks`, each timed
           by the CLI's wall clock.

On 2 cores the emulator is the bottleneck, so the floor is what any client could do against it.
Target: backup and restore within 1.3x of their floor. vmvault compresses and deduplicates, so it
may send fewer bytes than the floor does; both sizes are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _floor(url: str, image: Path) -> dict[str, float]:
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
    with ThreadPoolExecutor(4) as pool:
        got = sum(pool.map(down, offsets))
    assert got == size
    return {"upload_s": round(upload, 2), "download_s": round(time.monotonic() - started, 2), "bytes": size}


def _one(kind: str, server: objstores.Server, image: Path, work: Path) -> dict[str, Any]:
    os.environ.update(server.env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_")}
    env.update(server.env, VMVAULT_PASSPHRASE="correct horse battery staple")
    new_url = objstores.fresh_azure_url if kind == "azure" else objstores.fresh_s3_url
    floor = _floor(new_url(), image)
    home = work / f"home-{kind}"
    url = new_url()
    _vmvault(home, env, "vault", "create", "v1", "--storage", url)
    _vmvault(home, env, "vm", "add", "vm1", "--disk", str(image))
    _vmvault(home, env, "protection", "enable", "--vm", "vm1", "--vault", "v1")
    backup_s, _ = _vmvault(home, env, "backup", "now", "--vm", "vm1")
    _, listed = _vmvault(home, env, "recoverypoint", "list", "--vm", "vm1")
    rp = json.loads(listed)[0]["name"]
    out = work / f"out-{kind}"
    restore_s, _ = _vmvault(home, env, "restore", "disks", "--vm", "vm1", "--rp", rp, "--target-dir", str(out))
    restored = next(p for p in out.iterdir() if p.suffix == ".raw")
    same = subprocess.run(["cmp", "-s", str(image), str(restored)]).returncode == 0
    from vmvault.vault.backends import open_backend

    stored = sum(i.size for i in open_backend(url).list())
    shutil.rmtree(out)
    return {
        "floor": floor,
        "backup_s": round(backup_s, 2),
        "restore_s": round(restore_s, 2),
        "vault_bytes": stored,
        "backup_vs_floor": round(backup_s / floor["upload_s"], 2),
        "restore_vs_floor": round(restore_s / floor["download_s"], 2),
        "restored_identical": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--stores", default="azure,s3")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmv-objbench-"))
    try:
        image = work / "image.raw"
        subprocess.run([sys.executable, str(REPO / "tools" / "diskgen.py"), "make", "--out", str(image),
                        "--size", args.size, "--seed", "3", "--workdir", str(work)],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        results: dict[str, Any] = {"image_bytes": image.stat().st_size}
        for kind in args.stores.split(","):
            start = objstores.start_azurite if kind == "azure" else objstores.start_moto
            server = start(work / f"server-{kind}")
            try:
                results[kind] = _one(kind, server, image, work)
            finally:
                server.stop()
            print(kind, json.dumps(results[kind]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
