#!/usr/bin/env python3
"""Summarise py-spy raw (collapsed) profiles written by `run_bench.py --profile-dir DIR`.

    .venv/bin/python bench/profile_summary.py DIR/vmvault-full.txt [--top 25]

Prints, over all sampled (non-idle) stacks: samples per process and thread group, the hottest
functions by self samples (the innermost frame: where the CPU actually is) and by inclusive
samples (anywhere on the stack), each as a share of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path}:{m['line']})" if with_line and m["line"] else f"{m['func']} ({path})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--lines", action="store_true", help="distinguish lines, not only functions")
    a = ap.parse_args()
    for path in a.profiles:
        self_c: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        groups: Counter[str] = Counter()
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            parts = stack.split(";")
            proc = parts[0].split(":", 1)[0]
            frames = [p for p in parts[1:] if not p.startswith("thread (")]
            thread = next((p for p in parts[1:] if p.startswith("thread (")), "")
            tname = re.sub(r"_\d+$", "_N", thread.split(": ", 1)[1]) if ": " in thread else thread
            groups[f"{proc} {tname}"] += n
            names = [frame_name(f, a.lines) for f in frames if f and f != '""']
            if names:
                self_c[names[-1]] += n
            for name in set(names):
                incl[name] += n
        print(f"== {path}  ({total} samples)")
        print("-- by process / thread")
        for name, n in groups.most_common(a.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
        print("-- self")
        for name, n in self_c.most_common(a.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
        print("-- inclusive")
        for name, n in incl.most_common(a.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
