#!/usr/bin/env python3
"""Benchmark vmvault against restic and borg on the same generated VM disk image, in one run.

    sudo .venv/bin/python bench/run_bench.py                 # 4 GiB image, all three tools
    sudo .venv/bin/python bench/run_bench.py --quick         # 1 GiB smoke run
    .venv/bin/python bench/run_bench.py --tools vmvault,restic --repeat 3 --out results.json

Per tool and per repetition, on a private copy of the image and a fresh repository:
  1. full backup of the image                                     (timed, page cache dropped first)
  2. tools/diskgen.py mutate changes ~1 % of it like a running VM; incremental backup  (timed)
  3. restore of that latest point                                 (timed)
  4. the restored file is compared byte for byte with the image at that point (cmp), its allocated
     blocks are reported; the mutation is reverted so the next tool starts from the same bytes.
Repository/vault sizes are taken after the full and after the incremental backup; peak RSS comes
from GNU time (/usr/bin/time -v, else getrusage(RUSAGE_CHILDREN)), plus a sampled whole-process-tree
sum (vmvault's qemu-nbd included). Figures are medians over --repeat runs (or, with --stat cleanest,
per phase the run least disturbed by other processes: the CPU time the rest of the machine used
during each phase is recorded); every figure carries its target and whether it is met. Results go
to --out as JSON and a ratio table is printed.

The image comes from tools/diskgen.py (the project's own generator) and is cached
under /var/tmp/vmvault-bench/ keyed by size and seed. Needs root (image build, drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DISKGEN = REPO_ROOT / "tools" / "diskgen.py"
CACHE_DIR = Path("/var/tmp/vmvault-bench")
GNU_TIME = Path("/usr/bin/time")
VENV_BIN = Path(sys.executable).parent
PASSPHRASE = "vmvault-bench-passphrase"
ALL_TOOLS = ("vmvault", "restic", "borg")
MiB = 1 << 20

# Targets of the "Engine performance" issue.
FULL_VS_BORG = 2.0
FULL_VS_RESTIC = 3.0
INCR_VS_RESTIC = 4.0
RESTORE_VS_RESTIC = 2.0
GROWTH_MAX = 300 * 10**6  # bytes the incremental may add to the vault
VAULT_VS_RESTIC = 0.65  # total vault size after both backups, as a fraction of restic's repository
RSS_MAX = 300 * MiB
SPARSE_SLACK = 1.10  # restored allocation may exceed the source image's allocation by 10 %
WALL_BUDGET_4G = 15 * 60
NOISE_SHARE = 0.10  # a phase is noisy when other processes used > 10 % of one CPU during it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


# ---- measuring one command ---------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    max_rss: int  # bytes: GNU time's "Maximum resident set size" (the largest single process)
    tree_peak_rss: int  # bytes: highest sampled sum of RSS over the whole process tree
    user_s: float
    sys_s: float
    stdout: str
    foreign_cpu_s: float = 0.0  # CPU time other processes used meanwhile (a shared machine adds noise)
    waited_quiet: bool | None = None

    def figures(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "max_rss_bytes": self.max_rss,
            "tree_peak_rss_bytes": self.tree_peak_rss,
            "user_s": round(self.user_s, 2),
            "sys_s": round(self.sys_s, 2),
            "foreign_cpu_s": round(self.foreign_cpu_s, 2),
            "started_quiet": self.waited_quiet,
        }


_HZ = os.sysconf("SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _HZ


QUIET_BUSY = 0.15  # the machine counts as quiet below 15 % of one CPU busy


QUIET_TOTAL = 150.0  # at most this much waiting over a whole run (keeps a 4G run under 15 minutes)
_quiet_spent = 0.0


def wait_quiet(limit: float) -> bool | None:
    """Wait up to `limit` seconds for other processes to leave the CPUs alone; None when not asked."""
    global _quiet_spent
    limit = min(limit, QUIET_TOTAL - _quiet_spent)
    if limit <= 0:
        return None
    t0 = time.monotonic()
    try:
        return _wait_quiet(limit)
    finally:
        _quiet_spent += time.monotonic() - t0


def _wait_quiet(limit: float) -> bool:
    deadline = time.monotonic() + limit
    told = False
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(1.0)
        if busy_cpu_seconds() - b0 < QUIET_BUSY:
            return True
        if time.monotonic() >= deadline:
            log(f"warning: the machine stayed busy for {limit:.0f}s (other processes); measuring anyway")
            return False
        if not told:
            log("waiting for the machine to be quiet (other processes are using the CPUs)")
            told = True


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Sum of RSS of `root` and all its descendants (one /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, _tree_rss(self.pid))


def _parse_gnu_time(text: str) -> dict[str, float]:
    keys = {
        "Maximum resident set size (kbytes)": "max_rss_kb",
        "User time (seconds)": "user",
        "System time (seconds)": "sys",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.strip().rpartition(": ")
        if name in keys:
            out[keys[name]] = float(value)
    return out


def run_measured(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, wrap: list[str] | None = None
) -> Measured:
    """Run one command; wall time, GNU time's max RSS and CPU, sampled process-tree RSS peak."""
    use_time = GNU_TIME.exists()
    with tempfile.NamedTemporaryFile("r", prefix="vmvbench-time-", suffix=".txt") as tf:
        full = list(wrap or []) + cmd
        if use_time:
            full = [str(GNU_TIME), "-v", "-o", tf.name, *full]
        before = os.times()
        busy0 = busy_cpu_seconds()
        t0 = time.monotonic()
        proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = _Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        seconds = time.monotonic() - t0
        busy = busy_cpu_seconds() - busy0
        sampler.stop.set()
        sampler.join()
        after = os.times()
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-4000:]}\n{out[-2000:]}")
        if use_time:
            g = _parse_gnu_time(Path(tf.name).read_text())
            max_rss, user, sys_ = int(g.get("max_rss_kb", 0)) * 1024, g.get("user", 0.0), g.get("sys", 0.0)
        else:  # getrusage(RUSAGE_CHILDREN) is a high-water mark over all children so far
            import resource

            max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            user, sys_ = after.children_user - before.children_user, after.children_system - before.children_system
    own = sum(after[i] - before[i] for i in range(4))  # this process (the RSS sampler) and its children
    return Measured(seconds, max_rss, sampler.peak, user, sys_, out, foreign_cpu_s=max(0.0, busy - own))


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc


_cache_warned = False


QUIET_LIMIT = 0.0  # set from --quiet-wait


def before_phase() -> bool | None:
    """Drop the page cache, then wait (bounded) for a quiet machine."""
    drop_caches()
    return wait_quiet(QUIET_LIMIT)


def drop_caches() -> bool:
    global _cache_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as exc:
        if not _cache_warned:
            log(f"warning: cannot drop the page cache ({exc}); timings include warm-cache effects")
            _cache_warned = True
        return False


def tree_size(path: Path) -> dict[str, int]:
    apparent = allocated = files = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return {"bytes": apparent, "allocated_bytes": allocated, "files": files}


# ---- the image ---------------------------------------------------------------------------------


def ensure_image(size: str, seed: int) -> tuple[Path, dict[str, Any]]:
    """The cached base image for (size, seed), built with tools/diskgen.py when missing."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = f"diskgen-{size}-seed{seed}"
    img = CACHE_DIR / f"{key}.raw"
    meta = CACHE_DIR / f"{key}.raw.json"
    if img.exists() and meta.exists():
        log(f"using cached image {img}")
        return img, json.loads(meta.read_text())
    for tool in ("sgdisk", "mkfs.ext4"):
        if shutil.which(tool) is None:
            sys.exit(f"building the image needs {tool} (apt-get install gdisk e2fsprogs)")
    log(f"building {img} with {DISKGEN} (size {size}, seed {seed})")
    tmp = CACHE_DIR / f".{key}.building.raw"
    t0 = time.monotonic()
    run([sys.executable, str(DISKGEN), "make", "--out", str(tmp), "--size", size, "--seed", str(seed),
         "--workdir", str(CACHE_DIR)])
    summary = json.loads(Path(f"{tmp}.json").read_text())
    summary["image"] = str(img)
    meta.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, img)
    Path(f"{tmp}.json").unlink()
    log(f"image built in {time.monotonic() - t0:.1f}s")
    return img, summary


def image_format(img: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run(["qemu-img", "info", "--output=json", str(img)]).stdout)
    return info


def reference_raw(img: Path, workdir: Path) -> Path:
    """`qemu-img convert -O raw` of the image as it is now; a raw image is its own reference."""
    if image_format(img)["format"] == "raw":
        return img
    ref = workdir / "reference.raw"
    ref.unlink(missing_ok=True)
    run(["qemu-img", "convert", "-O", "raw", str(img), str(ref)])
    return ref


def check_restore(tool: str, restored: Path, ref: Path) -> dict[str, Any]:
    ref_size = ref.stat().st_size
    st = restored.stat()
    want = -(-ref_size // 512) * 512 if tool == "vmvault" else ref_size  # QEMU's virtual size
    result: dict[str, Any] = {"size": st.st_size, "expected_size": want, "allocated_bytes": st.st_blocks * 512}
    same = run(["cmp", "--silent", "-n", str(ref_size), str(ref), str(restored)], check=False).returncode == 0
    tail_ok = True
    if st.st_size > ref_size:
        with open(restored, "rb") as f:
            f.seek(ref_size)
            tail_ok = not f.read().strip(b"\0")
    result["identical"] = bool(same and tail_ok and st.st_size == want)
    return result


# ---- the tools ---------------------------------------------------------------------------------


@dataclass
class Ctx:
    workdir: Path
    image: Path
    profile_dir: Path | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


class Tool:
    name = ""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.dir = ctx.workdir / self.name
        self.repo = self.dir / "repo"
        self.cache = self.dir / "cache"

    def version(self) -> str:
        raise NotImplementedError

    def setup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def backup(self, label: str) -> Measured:
        raise NotImplementedError

    def restore(self, target: Path) -> tuple[Measured, Path]:
        raise NotImplementedError

    def repo_size(self) -> dict[str, int]:
        return tree_size(self.repo)

    def cache_size(self) -> dict[str, int]:
        return tree_size(self.cache) if self.cache.exists() else {"bytes": 0, "allocated_bytes": 0, "files": 0}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Restic(Tool):
    name = "restic"

    def _env(self) -> dict[str, str]:
        return dict(
            self.ctx.env,
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(self.cache),
            RESTIC_PROGRESS_FPS="0.1",
        )

    def version(self) -> str:
        return run(["restic", "version"]).stdout.strip()

    def setup(self) -> None:
        super().setup()
        run(["restic", "init"], env=self._env())

    def backup(self, label: str) -> Measured:
        return run_measured(["restic", "backup", "--host", "bench", str(self.ctx.image)], env=self._env())

    def restore(self, target: Path) -> tuple[Measured, Path]:
        m = run_measured(["restic", "restore", "latest", "--target", str(target)], env=self._env())
        return m, target / str(self.ctx.image).lstrip("/")


class Borg(Tool):
    name = "borg"

    def _env(self) -> dict[str, str]:
        return dict(
            self.ctx.env,
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(self.cache),
            BORG_DISPLAY_PASSPHRASE="no",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )

    def version(self) -> str:
        return run(["borg", "--version"]).stdout.strip()

    def setup(self) -> None:
        super().setup()
        run(["borg", "init", "-e", "repokey", str(self.repo)], env=self._env())

    def backup(self, label: str) -> Measured:
        return run_measured(
            ["borg", "create", "--compression", "lz4", f"{self.repo}::{label}", str(self.ctx.image)], env=self._env()
        )

    def restore(self, target: Path) -> tuple[Measured, Path]:
        target.mkdir(parents=True, exist_ok=True)
        last = run(["borg", "list", "--last", "1", "--format", "{archive}", str(self.repo)], env=self._env()).stdout
        m = run_measured(["borg", "extract", f"{self.repo}::{last.strip()}"], env=self._env(), cwd=target)
        return m, target / str(self.ctx.image).lstrip("/")


def _py_spy() -> str:
    return shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}") or "py-spy"


def vmvault_cli_ready(exe: Path) -> bool:
    if not exe.exists():
        return False
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    return proc.returncode == 0 and "backup" in proc.stdout


class Vmvault(Tool):
    """vmvault through its CLI (preferred) or, as a fallback, its engine API (vmvault_api_driver.py)."""

    name = "vmvault"

    def __init__(self, ctx: Ctx, mode: str, fallback: bool = False) -> None:
        super().__init__(ctx)
        self.mode = mode
        self.fallback = fallback  # auto mode: fall back to the engine API when the CLI fails during set-up
        self.fallback_reason = ""
        self.exe = VENV_BIN / "vmvault"
        self.home = self.dir / "home"
        self.cache = self.home / "cache"
        self.rp_ids: list[str] = []

    def _env(self) -> dict[str, str]:
        return dict(self.ctx.env, VMVAULT_HOME=str(self.home), VMVAULT_PASSPHRASE=PASSPHRASE)

    def _cli(self, *args: str) -> str:
        return run([str(self.exe), *args], env=self._env()).stdout

    def _driver(self, action: str, *args: str) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).with_name("vmvault_api_driver.py")),
            action,
            "--storage",
            str(self.repo),
            "--home",
            str(self.home),
            *args,
        ]

    def _wrap(self, phase: str) -> list[str] | None:
        if self.ctx.profile_dir is None:
            return None
        out = self.ctx.profile_dir / f"vmvault-{phase}.txt"
        return [
            _py_spy(),
            "record",
            "--format",
            "raw",
            "--rate",
            "100",
            "--subprocesses",
            "--threads",
            "--output",
            str(out),
            "--",
        ]

    def version(self) -> str:
        proc = run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('vmvault'))"], check=False)
        return f"vmvault {proc.stdout.strip()} ({self.mode})"

    def setup(self) -> None:
        super().setup()
        self.rp_ids = []
        if self.mode == "cli":
            try:
                self._cli("vault", "create", "V", "--storage", str(self.repo))
                self._cli("vm", "add", "vm", "--disk", str(self.ctx.image))
                self._cli("protection", "enable", "vm", "--vault", "V")
                return
            except RuntimeError as exc:
                if not self.fallback:
                    raise
                log(f"warning: vmvault CLI set-up failed, using the engine API instead: {str(exc).strip()}")
                self.fallback_reason = str(exc).strip()
                self.mode = "api"
                super().setup()
        run(self._driver("create"), env=self._env())

    def backup(self, label: str) -> Measured:
        if self.mode == "cli":
            m = run_measured(
                [str(self.exe), "backup", "now", "vm", "-o", "json"], env=self._env(), wrap=self._wrap(label)
            )
            self.rp_ids.append(self._latest_rp())
        else:
            m = run_measured(
                self._driver("backup", "--image", str(self.ctx.image)), env=self._env(), wrap=self._wrap(label)
            )
            self.rp_ids.append(json.loads(m.stdout.strip().splitlines()[-1])["rp"])
        return m

    def _latest_rp(self) -> str:
        points = json.loads(self._cli("recoverypoint", "list", "vm", "-o", "json"))
        if isinstance(points, dict):  # tolerate {"items": [...]} / {"value": [...]} shapes
            points = next((v for v in points.values() if isinstance(v, list)), [])
        # Azure's recovery point shape: the point's ID is its "name", its time a property.
        new = [p for p in points if p["name"] not in self.rp_ids]
        if not new:
            raise RuntimeError("vmvault backup now did not add a recovery point")
        return str(max(new, key=lambda p: str(p["properties"]["recoveryPointTime"]))["name"])

    def restore(self, target: Path) -> tuple[Measured, Path]:
        rp = self.rp_ids[-1]
        if self.mode == "cli":
            m = run_measured(
                [str(self.exe), "restore", "disks", "vm", "--rp", rp, "--target-dir", str(target)],
                env=self._env(),
                wrap=self._wrap("restore"),
            )
        else:
            m = run_measured(
                self._driver("restore", "--rp", rp, "--target-dir", str(target)),
                env=self._env(),
                wrap=self._wrap("restore"),
            )
        found = sorted(target.glob("*.raw"))
        if len(found) != 1:
            raise RuntimeError(f"vmvault restore wrote {found} to {target}, expected one .raw disk")
        return m, found[0]


# ---- one run of one tool -----------------------------------------------------------------------


def mutate(image: Path, undo: Path, fraction: float, seed: int) -> dict[str, Any]:
    out = run(
        [
            sys.executable,
            str(DISKGEN),
            "mutate",
            str(image),
            "--fraction",
            str(fraction),
            "--seed",
            str(seed),
            "--undo",
            str(undo),
        ]
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def revert(image: Path, undo: Path) -> None:
    run([sys.executable, str(DISKGEN), "revert", str(image), "--undo", str(undo)])
    undo.unlink()


def bench_tool(tool: Tool, ctx: Ctx, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    undo = ctx.workdir / "mutation.undo"
    figures: dict[str, Any] = {}
    tool.setup()
    try:
        quiet = before_phase()
        log(f"{tool.name}: full backup")
        full = tool.backup("full")
        full.waited_quiet = quiet
        figures["full_backup"] = full.figures()
        figures["size_after_full"] = tool.repo_size()

        mutation = mutate(ctx.image, undo, args.fraction, args.mutate_seed)
        try:
            quiet = before_phase()
            log(f"{tool.name}: incremental backup")
            incr = tool.backup("incremental")
            incr.waited_quiet = quiet
            figures["incremental_backup"] = incr.figures()
            figures["size_after_incremental"] = tool.repo_size()
            figures["growth_incremental"] = (
                figures["size_after_incremental"]["bytes"] - figures["size_after_full"]["bytes"]
            )
            figures["local_cache"] = tool.cache_size()

            target = ctx.workdir / f"restore-{tool.name}"
            shutil.rmtree(target, ignore_errors=True)
            quiet = before_phase()
            log(f"{tool.name}: restore of the incremental point")
            rest, restored = tool.restore(target)
            rest.waited_quiet = quiet
            figures["restore"] = rest.figures()
            # restic and borg leave the restored data in the page cache; vmvault fsyncs it. `sync`
            # right after gives the time until the restored disk is durable, for every tool alike.
            flush = run_measured(["sync"])
            figures["restore_durable_seconds"] = round(rest.seconds + flush.seconds, 3)
            log(f"{tool.name}: checking the restored disk")
            figures["restore_check"] = check_restore(tool.name, restored, reference_raw(ctx.image, ctx.workdir))
            shutil.rmtree(target, ignore_errors=True)
        finally:
            revert(ctx.image, undo)
    finally:
        tool.teardown()
    return figures, mutation


# ---- summary -----------------------------------------------------------------------------------

TIMED = ("full_backup", "incremental_backup", "restore")


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric leaf over the repetitions; booleans: all must hold."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool):
            return all(values)
        if isinstance(first, (int, float)):
            med = statistics.median(values)
            return int(med) if isinstance(first, int) else round(med, 3)
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        return first

    return {k: merge([r[k] for r in runs]) for k in runs[0]}


def cleanest_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per timed phase, the repetition during which other processes used the least CPU.

    For a shared machine: the least disturbed run is the best estimate of the tool's own speed.
    Sizes, checks and the rest come from the median."""
    out = median_figures(runs)
    for phase in TIMED:
        best = min(runs, key=lambda r: r[phase]["foreign_cpu_s"])
        out[phase] = best[phase]
        if phase == "restore":
            out["restore_durable_seconds"] = best["restore_durable_seconds"]
    return out


def evaluate(tools: dict[str, dict[str, Any]], source_allocated: int) -> list[dict[str, Any]]:
    v = tools.get("vmvault")
    targets: list[dict[str, Any]] = []

    def ratio(other: str, phase: str) -> float | None:
        if v is None or other not in tools:
            return None
        return float(tools[other][phase]["seconds"]) / max(float(v[phase]["seconds"]), 1e-9)

    def add(name: str, value: float | None, target: str, ok: bool | None, unit: str = "") -> None:
        targets.append(
            {
                "name": name,
                "value": None if value is None else round(value, 3),
                "unit": unit,
                "target": target,
                "met": ok,
            }
        )

    def at_least(name: str, other: str, phase: str, want: float) -> None:
        r = ratio(other, phase)
        add(name, r, f">= {want}x faster than {other}", None if r is None else r >= want, "x")

    at_least("full_backup_vs_borg", "borg", "full_backup", FULL_VS_BORG)
    at_least("full_backup_vs_restic", "restic", "full_backup", FULL_VS_RESTIC)
    at_least("incremental_vs_restic", "restic", "incremental_backup", INCR_VS_RESTIC)
    at_least("restore_vs_restic", "restic", "restore", RESTORE_VS_RESTIC)
    if v is not None:
        alloc = v["restore_check"]["allocated_bytes"]
        add(
            "restore_sparse_allocated",
            alloc,
            f"<= {SPARSE_SLACK:.2f} x source allocation ({source_allocated} B)",
            alloc <= SPARSE_SLACK * source_allocated,
            "bytes",
        )
        add(
            "vault_growth_incremental",
            v["growth_incremental"],
            f"<= {GROWTH_MAX} bytes",
            v["growth_incremental"] <= GROWTH_MAX,
            "bytes",
        )
        if "restic" in tools:
            frac = v["size_after_incremental"]["bytes"] / tools["restic"]["size_after_incremental"]["bytes"]
            add("vault_size_vs_restic", frac, f"<= {VAULT_VS_RESTIC} of restic's repository", frac <= VAULT_VS_RESTIC)
        else:
            add("vault_size_vs_restic", None, f"<= {VAULT_VS_RESTIC} of restic's repository", None)
        rss = max(v[p]["max_rss_bytes"] for p in TIMED)
        add("peak_rss", rss, f"<= {RSS_MAX} bytes (300 MiB)", rss <= RSS_MAX, "bytes")
    for name, t in tools.items():
        add(f"restore_identical_{name}", None, "restored disk == image at that point", t["restore_check"]["identical"])
    return targets


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(tools: dict[str, dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    names = list(tools)
    rows: list[tuple[str, Callable[[dict[str, Any]], float], Callable[[float], str]]] = [
        ("full backup (s)", lambda t: t["full_backup"]["seconds"], lambda x: f"{x:.1f}"),
        ("incremental backup (s)", lambda t: t["incremental_backup"]["seconds"], lambda x: f"{x:.1f}"),
        ("restore (s)", lambda t: t["restore"]["seconds"], lambda x: f"{x:.1f}"),
        ("restore + sync (s)", lambda t: t["restore_durable_seconds"], lambda x: f"{x:.1f}"),
        ("size after full", lambda t: t["size_after_full"]["bytes"], fmt_bytes),
        ("size after incremental", lambda t: t["size_after_incremental"]["bytes"], fmt_bytes),
        ("growth from incremental", lambda t: t["growth_incremental"], fmt_bytes),
        ("peak RSS (largest process)", lambda t: max(t[p]["max_rss_bytes"] for p in TIMED), fmt_bytes),
        ("peak RSS (process tree)", lambda t: max(t[p]["tree_peak_rss_bytes"] for p in TIMED), fmt_bytes),
        ("CPU s, full backup", lambda t: t["full_backup"]["user_s"] + t["full_backup"]["sys_s"], lambda x: f"{x:.1f}"),
        ("CPU s of other processes", lambda t: sum(t[p]["foreign_cpu_s"] for p in TIMED), lambda x: f"{x:.1f}"),
        ("restored allocation", lambda t: t["restore_check"]["allocated_bytes"], fmt_bytes),
    ]
    others = [n for n in names if n != "vmvault"] if "vmvault" in names else []
    head = ["figure"] + names + [f"{o}/vmvault" for o in others]
    table = [head]
    for label, get, fmt in rows:
        vals = {n: get(tools[n]) for n in names}
        line = [label] + [fmt(vals[n]) for n in names]
        for o in others:
            line.append(f"{vals[o] / vals['vmvault']:.2f}x" if vals["vmvault"] else "-")
        table.append(line)
    table.append(
        ["restore identical"]
        + ["yes" if tools[n]["restore_check"]["identical"] else "NO" for n in names]
        + ["" for _ in others]
    )
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for t in targets:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = t["value"]
        shown = "" if value is None else (fmt_bytes(value) if t["unit"] == "bytes" else f"{value:.2f}{t['unit']}")
        print(f"  {mark:6}  {t['name']:28} {shown:>12}   target {t['target']}")
    print()


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="image size (default 4G)")
    ap.add_argument("--quick", action="store_true", help="1G image: a smoke run (targets are indicative only)")
    ap.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of vmvault,restic,borg")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (default 1); see --stat")
    ap.add_argument("--fraction", type=float, default=0.01, help="fraction of the image mutated (default 0.01)")
    ap.add_argument("--mutate-seed", type=int, default=42)
    ap.add_argument(
        "--stat",
        choices=["median", "cleanest"],
        default="median",
        help="figures over repetitions: the median (default), or per phase the run least disturbed by "
        "other processes (for a shared machine); the JSON holds both",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    ap.add_argument("--workdir", type=Path, default=CACHE_DIR, help="scratch space (default /var/tmp/vmvault-bench)")
    ap.add_argument(
        "--vmvault-mode",
        choices=["auto", "cli", "api"],
        default="auto",
        help="drive vmvault by its CLI (preferred) or its engine API; auto: CLI when it works",
    )
    ap.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="run vmvault's phases under py-spy (raw collapsed stacks here); timings are then not comparable",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed phase wait up to this many seconds for other processes to leave the "
        f"CPUs idle (default 20, at most {QUIET_TOTAL:.0f} in all; 0: do not wait)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    if args.quick:
        args.size = "1G"
    tools_wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools_wanted) - set(ALL_TOOLS)
    if unknown or not tools_wanted:
        ap.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(ALL_TOOLS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    for exe in (
        (["restic"] if "restic" in tools_wanted else [])
        + (["borg"] if "borg" in tools_wanted else [])
        + ["qemu-img", "cmp"]
    ):
        if shutil.which(exe) is None:
            sys.exit(f"{exe} is missing (apt-get install restic borgbackup qemu-utils diffutils)")
    if args.profile_dir is not None:
        if _py_spy() == "py-spy":
            sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
        args.profile_dir.mkdir(parents=True, exist_ok=True)

    mode = args.vmvault_mode
    if "vmvault" in tools_wanted and mode == "auto":
        mode = "cli" if vmvault_cli_ready(VENV_BIN / "vmvault") else "api"
        if mode == "api":
            log("warning: the vmvault CLI is not usable yet; falling back to the engine API (vmvault_api_driver.py)")

    global QUIET_LIMIT
    QUIET_LIMIT = args.quiet_wait
    t_start = time.monotonic()
    base, composition = ensure_image(args.size, args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    image = workdir / "disk.raw"
    log(f"copying the image to {image}")
    run(["cp", "--sparse=always", str(base), str(image)])
    source_allocated = image.stat().st_blocks * 512
    ctx = Ctx(workdir=workdir, image=image, profile_dir=args.profile_dir)
    ctx.env["PATH"] = f"{VENV_BIN}:{ctx.env.get('PATH', '')}"
    factories: dict[str, Callable[[], Tool]] = {
        "vmvault": lambda: Vmvault(ctx, mode, fallback=args.vmvault_mode == "auto"),
        "restic": lambda: Restic(ctx),
        "borg": lambda: Borg(ctx),
    }
    tools = {name: factories[name]() for name in tools_wanted}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
    mutation: dict[str, Any] = {}
    try:
        for rep in range(args.repeat):
            for name, tool in tools.items():
                log(f"--- repetition {rep + 1}/{args.repeat}: {name}")
                figures, mutation = bench_tool(tool, ctx, args)
                runs[name].append(figures)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    vmv = tools.get("vmvault")
    if isinstance(vmv, Vmvault):
        mode = vmv.mode
    medians = {name: median_figures(r) for name, r in runs.items()}
    cleanest = {name: cleanest_figures(r) for name, r in runs.items()}
    chosen = cleanest if args.stat == "cleanest" else medians
    targets = evaluate(chosen, source_allocated)
    elapsed = time.monotonic() - t_start
    results = {
        "benchmark": "vmvault engine performance (bench/run_bench.py)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
        "config": {
            "size": args.size,
            "quick": args.quick,
            "seed": args.seed,
            "repeat": args.repeat,
            "fraction": args.fraction,
            "mutate_seed": args.mutate_seed,
            "tools": tools_wanted,
            "vmvault_mode": mode if "vmvault" in tools_wanted else None,
            "vmvault_cli_fallback_reason": vmv.fallback_reason if isinstance(vmv, Vmvault) else None,
            "profiled": args.profile_dir is not None,
            "page_cache_dropped": not _cache_warned,
            "peak_rss_source": "GNU time -v" if GNU_TIME.exists() else "getrusage(RUSAGE_CHILDREN)",
        },
        "versions": {name: tool.version() for name, tool in tools.items()},
        "image": {
            "base": str(base),
            "allocated_bytes": source_allocated,
            "composition": composition.get("written_bytes_by_kind"),
        },
        "mutation": mutation,
        "statistic": args.stat,
        "tools": chosen,
        "tools_median": medians,
        "tools_cleanest": cleanest,
        "runs": runs,
        "targets": targets,
        "all_targets_met": all(t["met"] is not False for t in targets),
        "elapsed_seconds": round(elapsed, 1),
    }
    noisy = [
        f"{name}/{p}"
        for name, runs_ in runs.items()
        for r in runs_
        for p in TIMED
        if r[p]["foreign_cpu_s"] > NOISE_SHARE * r[p]["seconds"]
    ]
    results["noisy_phases"] = noisy
    if noisy:
        log(f"warning: other processes used the CPUs during {', '.join(noisy)}: those timings are pessimistic")
    if parse_size(args.size) == 4 << 30 and elapsed > WALL_BUDGET_4G:
        log(f"warning: the benchmark took {elapsed:.0f}s, over the {WALL_BUDGET_4G}s budget at 4G")
    print_table(chosen, targets)
    print(f"  elapsed {elapsed:.0f}s; {args.size} image; {args.repeat} repetition(s), {args.stat}; vmvault via {mode}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"  results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
