#!/usr/bin/env python3
"""Changed-block tracking benchmark: an incremental after a 1 % change, with and without tracking, vs restic.

    sudo .venv/bin/python bench/cbt_bench.py                 # 4 GiB image
    sudo .venv/bin/python bench/cbt_bench.py --size 1G --out cbt.json

The disk is served by qemu-storage-daemon (the guest-less stand-in for a running VM): vmvault backs
it up live over QMP (`vm add --qmp`), and the "guest" changes it through the daemon's writable FUSE
export, so the dirty bitmap sees every write. restic backs up a raw copy of the same bytes, changed
the same way (tools/diskgen.py mutate is deterministic per seed and content), in the same run.

  1. full backups: vmvault (live, starts tracking) and restic
  2. rounds, each a 1 % change then an incremental of vmvault and of restic (timed):
       diskgen's mutation pattern (scattered 4 KiB writes + one 16 MiB run), tracked
       1 MiB runs anywhere (files being written), tracked
       diskgen's mutation pattern again, with vmvault's bitmap removed (tracking lost, as after a
       crash: vmvault reads all data and compares hashes)
  3. vmvault's last point restored and compared byte for byte with the disk

Every timed phase starts with the page cache dropped. Target: a tracked incremental is at least
20x faster than restic's incremental of the same change, judged on the backup job's own duration
(what a long-running `vmvault serve` spends); the CLI's wall time, which adds Python's start-up
with a cold page cache, is printed beside it. A changed chunk is read and stored again
whole: scattered 4 KiB writes touch ~10x their size in 64 KiB chunks, which the output shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import DISKGEN, PASSPHRASE, drop_caches, ensure_image, log, run

VMVAULT = Path(sys.executable).parent / "vmvault"
TARGET_VS_RESTIC = 20.0
MiB = 1 << 20


class Daemon:
    """qemu-storage-daemon serving one qcow2 disk: QMP for vmvault, a writable FUSE file for the 'guest'."""

    def __init__(self, workdir: Path, image: Path) -> None:
        self.workdir, self.image = workdir, image
        self.sockets = Path(tempfile.mkdtemp(prefix="vmv-bench-", dir="/run" if os.access("/run", os.W_OK) else None))
        self.live = workdir / "disk.live"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp(self) -> Path:
        return self.sockets / "qmp.sock"

    def start(self) -> None:
        self.live.touch()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--chardev", f"socket,id=mon0,path={self.qmp},server=on,wait=off", "--monitor", "chardev=mon0",
             "--blockdev", f"driver=file,node-name=disk0-file,filename={self.image}",
             "--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
             "--export", f"type=fuse,id=rw0,node-name=disk0,mountpoint={self.live},writable=on"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.qmp.exists() or os.path.getsize(self.live) == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"qemu-storage-daemon did not start: {self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            time.sleep(0.05)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        from vmvault.connectors.qemu.qmp import QmpClient

        with QmpClient(self.qmp).connect() as qmp:
            return qmp.execute(command, arguments)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.execute("quit")
                self.proc.wait(30)
            except Exception:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.sockets, ignore_errors=True)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    drop_caches()
    t0 = time.monotonic()
    proc = run(cmd, env=env)
    return time.monotonic() - t0, proc


def mutate(path: Path, seed: int, fraction: float) -> dict[str, Any]:
    """Scattered 4 KiB writes plus one 16 MiB run in the used area (tools/diskgen.py mutate)."""
    out = run([sys.executable, str(DISKGEN), "mutate", str(path), "--fraction", str(fraction),
               "--seed", str(seed)]).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def write_runs(path: Path, seed: int, fraction: float) -> dict[str, Any]:
    """Random 1 MiB runs anywhere on the disk, like files being written: same bytes for the same seed."""
    import random

    rng = random.Random(seed)
    size = path.stat().st_size
    count = max(1, int(size * fraction) // MiB)
    offsets = rng.sample(range(size // MiB), count)
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in offsets:
            os.pwrite(fd, rng.randbytes(MiB), index * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"runs": count, "touched_blocks": {"64KiB": {"bytes": count * MiB}}}


ROUNDS = (  # (name, change, vmvault keeps its tracking)
    ("scattered 4 KiB writes + a 16 MiB run, tracked", mutate, True),
    ("1 MiB runs (files being written), tracked", write_runs, True),
    ("scattered 4 KiB writes + a 16 MiB run, tracking lost", mutate, False),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4G", help="image size for tools/diskgen.py (default 4G)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the disk changed (default 0.01)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default under /var/tmp)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if shutil.which("restic") is None:
        sys.exit("restic is missing: apt-get install restic")

    base, _meta = ensure_image(args.size, args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cbt-", dir="/var/tmp/vmvault-bench"))
    work.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(work, work / "disk.qcow2")
    results: dict[str, Any] = {"size": args.size, "fraction": args.fraction, "rounds": []}
    try:
        log("preparing: qcow2 for the daemon, raw copy for restic")
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(daemon.image)])
        restic_src = work / "disk.raw"
        run(["cp", "--sparse=always", str(base), str(restic_src)])
        daemon.start()

        home = work / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VMVAULT_", "RESTIC_"))}
        vmv_env = dict(env, VMVAULT_HOME=str(home), VMVAULT_PASSPHRASE=PASSPHRASE)
        restic_env = dict(env, RESTIC_REPOSITORY=str(work / "restic"), RESTIC_PASSWORD=PASSPHRASE,
                          RESTIC_CACHE_DIR=str(work / "restic-cache"))  # fmt: skip
        vmv = [str(VMVAULT), "-o", "json"]
        run([*vmv, "vault", "create", "v1", "--storage", str(work / "vault")], env=vmv_env)
        run([*vmv, "vm", "add", "disk", "--qmp", str(daemon.qmp)], env=vmv_env)
        run([*vmv, "protection", "enable", "disk", "--vault", "v1"], env=vmv_env)
        run(["restic", "init"], env=restic_env)
        backup_vmv = [*vmv, "backup", "now", "disk"]
        backup_restic = ["restic", "backup", "--host", "bench", str(restic_src)]

        log("full backups")
        results["vmvault_full_s"], _ = timed(backup_vmv, vmv_env)
        results["restic_full_s"], _ = timed(backup_restic, restic_env)

        for number, (name, change, tracked) in enumerate(ROUNDS, 1):
            log(f"round {number}: {args.fraction:.0%} change, {name}")
            summary = change(daemon.live, 10 + number, args.fraction)  # through the daemon: the bitmap sees it
            change(restic_src, 10 + number, args.fraction)  # the same bytes in restic's copy
            if not tracked:
                _remove_bitmaps(daemon)
            seconds, proc = timed(backup_vmv, vmv_env)
            job = json.loads(proc.stdout)
            restic_s, _ = timed(backup_restic, restic_env)
            results["rounds"].append({
                "name": name, "tracked": tracked, "vmvault_s": seconds, "vmvault_status": job["status"],
                "vmvault_job_s": job["durationSeconds"], "vmvault_bytes_read": job["progress"]["bytesRead"],
                "restic_s": restic_s, "touched_64k_bytes": summary["touched_blocks"]["64KiB"]["bytes"],
                "vs_restic": restic_s / seconds, "job_vs_restic": restic_s / max(job["durationSeconds"], 0.001),
            })  # fmt: skip

        log("checking vmvault's last point against the disk")
        points = json.loads(run([*vmv, "recoverypoint", "list", "disk"], env=vmv_env).stdout)
        run([*vmv, "restore", "disks", "disk", "--rp", points[-1]["id"], "--target-dir", str(work / "out"),
             "--format", "raw"], env=vmv_env)  # fmt: skip
        run(["qemu-img", "convert", "-U", "-O", "raw", str(daemon.image), str(work / "live.raw")])
        results["restore_identical"] = subprocess.run(["cmp", "-s", str(work / "out" / "disk0.raw"),
                                                       str(work / "live.raw")]).returncode == 0  # fmt: skip
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    tracked_rounds = [r for r in results["rounds"] if r["tracked"]]
    results["target_met_cli"] = all(r["vs_restic"] >= TARGET_VS_RESTIC for r in tracked_rounds)
    results["target_met_job"] = all(r["job_vs_restic"] >= TARGET_VS_RESTIC for r in tracked_rounds)
    results["target_met"] = results["restore_identical"] and results["target_met_job"]
    print(
        f"\nincremental after a {args.fraction:.0%} change of a {args.size} disk; target: a tracked incremental "
        f">= {TARGET_VS_RESTIC:.0f}x faster than restic's"
    )
    print(
        "  vmvault's time as the backup job (what `vmvault serve` spends) and as a CLI run (adds Python start-up "
        "with a cold page cache)"
    )
    for r in results["rounds"]:
        verdict = ("met" if r["job_vs_restic"] >= TARGET_VS_RESTIC else "NOT met") if r["tracked"] else "-"
        print(
            f"  {r['name']}: {r['vmvault_bytes_read'] / MiB:.0f} MiB read, {r['touched_64k_bytes'] / MiB:.0f} MiB "
            f"of 64 KiB chunks touched, {r['vmvault_status']}"
        )
        print(
            f"    restic {r['restic_s']:6.2f} s | vmvault job {r['vmvault_job_s']:6.2f} s = {r['job_vs_restic']:5.1f}x "
            f"{verdict} | vmvault CLI {r['vmvault_s']:6.2f} s = {r['vs_restic']:5.1f}x"
        )
    print(f"  restore identical: {results['restore_identical']}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if results["target_met"] else 1


def _remove_bitmaps(daemon: Daemon) -> None:
    """Tracking lost, as after a crash: vmvault must read everything and compare hashes."""
    for node in daemon.execute("query-named-block-nodes", {"flat": True}):
        for bitmap in node.get("dirty-bitmaps") or []:
            if str(bitmap.get("name", "")).startswith("vmv-"):
                daemon.execute("block-dirty-bitmap-remove", {"node": node["node-name"], "name": bitmap["name"]})


if __name__ == "__main__":
    sys.exit(main())
