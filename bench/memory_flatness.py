#!/usr/bin/env python3
"""Peak memory of vmvault as disks grow (4 -> 64 GiB) and as points pile up (1 -> 100).

    sudo .venv/bin/python bench/memory_flatness.py --out bench/results/memory.json
    sudo .venv/bin/python bench/memory_flatness.py --quick          # 1 and 8 GiB, 1 -> 10 points

Every figure is the peak RSS of one `vmvault` command (GNU time's "Maximum resident set size",
the CLI process; offline reads of raw images need no helper process). Size: a full backup and a
full restore of a 4 GiB image with the default composition and of a 64 GiB image holding about
the same amount of data (tools/diskgen.py --fill 0.05: 5 % of 64 GiB, the rest sparse). Points:
the first backup, then incrementals after tools/diskgen.py mutate changes 0.1 % each time, measuring the
first and last incremental and the restore of the last point (whose disk index patches over
the longest chain of leaves). Flat means the later figure stays within 1.25x the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DISKGEN = Path(__file__).resolve().parents[1] / "tools" / "diskgen.py"
CACHE = Path("/var/tmp/vmvault-bench")
VMVAULT = Path(sys.executable).parent / "vmvault"
PASSPHRASE = "vmvault-memory-bench"
FLAT = 1.25


def image(size: str, extra: list[str]) -> Path:
    path = CACHE / f"diskgen-{size}-seed1{'-sparse' if extra else ''}.raw"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(DISKGEN), "make", "--out", str(path), "--size", size,
                        "--seed", "1", *extra], check=True, stdout=subprocess.DEVNULL)
    return path


class Home:
    def __init__(self, work: Path, disk: Path) -> None:
        self.work, self.disk = work, disk
        self.run("vault", "create", "m", "--storage", str(work / "vault"))
        self.run("vm", "add", "vm1", "--disk", str(disk))
        self.run("protection", "enable", "vm1", "--vault", "m")

    def run(self, *args: str) -> tuple[str, int]:
        """stdout and peak RSS (KiB) of one vmvault command."""
        env = {**os.environ, "VMVAULT_PASSPHRASE": PASSPHRASE}
        cmd = ["/usr/bin/time", "-f", "MAXRSS %M", str(VMVAULT), "--home", str(self.work / "home"), "-o", "json",
               *args]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr}")
        rss = int(next(line for line in p.stderr.splitlines() if line.startswith("MAXRSS")).split()[1])
        return p.stdout, rss

    def backup(self) -> int:
        return self.run("backup", "now", "vm1")[1]

    def restore_latest(self) -> int:
        points = json.loads(self.run("recoverypoint", "list", "vm1")[0])
        latest = max(points, key=lambda p: p["time"])["id"]
        target = self.work / "restore"
        shutil.rmtree(target, ignore_errors=True)
        rss = self.run("restore", "disks", "vm1", "--rp", latest, "--target-dir", str(target))[1]
        shutil.rmtree(target)
        return rss


def by_size(sizes: list[tuple[str, list[str]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, extra in sizes:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            home = Home(Path(tmp), image(size, extra))
            out[size] = {"backupMaxRssMiB": home.backup() / 1024, "restoreMaxRssMiB": home.restore_latest() / 1024}
            print(size, out[size], flush=True)
    return out


def by_points(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        disk = Path(tmp) / "disk.raw"
        subprocess.run(["cp", "--sparse=always", str(image("4G", [])), str(disk)], check=True)
        home = Home(Path(tmp), disk)
        first_full = home.backup()
        incrementals: list[int] = []
        for n in range(1, count):
            subprocess.run([sys.executable, str(DISKGEN), "mutate", str(disk), "--seed", str(n),
                            "--fraction", "0.001"], check=True, stdout=subprocess.DEVNULL)
            incrementals.append(home.backup())
            if n % 10 == 0:
                print(f"{n + 1} points, last incremental {incrementals[-1] / 1024:.0f} MiB", flush=True)
        return {"points": count, "fullMaxRssMiB": first_full / 1024,
                "firstIncrementalMaxRssMiB": incrementals[0] / 1024,
                "lastIncrementalMaxRssMiB": incrementals[-1] / 1024,
                "maxIncrementalMaxRssMiB": max(incrementals) / 1024,
                "restoreLastPointMaxRssMiB": home.restore_latest() / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    big, count = ("8G", 10) if args.quick else ("64G", 100)
    result: dict[str, Any] = {"size": by_size([("4G", []), (big, ["--fill", "0.05"])])}
    result["points"] = by_points(count)
    small, large = result["size"]["4G"], result["size"][big]
    pts = result["points"]
    result["flat"] = {
        "backupBySize": large["backupMaxRssMiB"] <= FLAT * small["backupMaxRssMiB"],
        "restoreBySize": large["restoreMaxRssMiB"] <= FLAT * small["restoreMaxRssMiB"],
        "backupByPoints": pts["maxIncrementalMaxRssMiB"] <= FLAT * pts["firstIncrementalMaxRssMiB"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
