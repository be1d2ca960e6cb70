"""Scale-out load test (issue 20): many VMs, one schedule slot, several servers on one PostgreSQL.

Not a timed test: a measurement, run by hand (as root: PostgreSQL 15 runs as the user postgres).

    sudo .venv/bin/python bench/scale_bench.py --vms 20 --jobs 10000          # a quick run, ~2 min
    sudo .venv/bin/python bench/scale_bench.py --out scale.json               # 200 VMs, 100,000 jobs
    sudo .venv/bin/python bench/scale_bench.py --agents 4                     # the jobs run on 4 agents

What it does, with real components only (tests/pgserver.py's PostgreSQL 15, real `vmvault serve`
processes, real disk images, real HTTP):

1. writes --vms small raw disk images (sparse, --image-mib each, 1 MiB of random data at a random
   place plus a few MiB of text), one vault, one daily policy, every VM protected by it;
2. starts --servers `vmvault serve` on one PostgreSQL catalog, their clock (the documented test-only
   VMVAULT_TEST_CLOCK_OFFSET_S) --lead seconds before the slot; with --agents N also N
   `vmvault agent run --host hN` (BackupAgent tokens, the VMs spread over h1..hN);
3. waits for every backup of the slot to end: slot-to-queued and slot-to-start (claimedAt) delays
   p50/p99, the slot's duration, failures (must be 0);
4. --clients threads (keep-alive HTTP) call GET /api/v1/jobs and GET /api/v1/items for --api-seconds
   on all servers: p50/p99 and requests/s;
5. inserts --jobs job rows straight into the catalog (a fixture for the measurement), then times
   GET /api/v1/jobs (first page, a deep page, one VM's jobs), counts the catalog's rows and prints
   EXPLAIN (ANALYZE, BUFFERS) of the SQL the service issues for those lists (captured from
   SQLAlchemy, not written by hand).

Prints a markdown table and writes the JSON summary (--out). docs/performance.md ("Scale-out")
quotes a run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/pgserver.py: the one PostgreSQL set-up of the project

MiB = 1 << 20
PASSPHRASE = "scale bench passphrase"  # a throw-away vault's, in the environment of the children only
POLICY = "Slot"
VAULT = "v1"


# ---- figures ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered) - 1e-9)))
    return ordered[rank - 1]


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50) * scale, 3),
        "p99": round(percentile(values, 99) * scale, 3),
        "max": round(max(values, default=0.0) * scale, 3),
        "mean": round(statistics.fmean(values) * scale, 3) if values else 0.0,
    }


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- disk images --------------------------------------------------------------------------------


def make_images(folder: Path, count: int, size_mib: int, seed: int = 20) -> list[Path]:
    """count sparse raw images: a zeroed first MiB (as a partition table's gap), 2 MiB of text, 1 MiB of
    random data at a random MiB, holes elsewhere."""
    rng = random.Random(seed)
    text = b"".join(f"vmvault scale bench line {i:08d}\n".encode() for i in range(2 * MiB // 32))[: 2 * MiB]
    paths = []
    for i in range(count):
        path = folder / f"vm{i:04d}.raw"
        if size_mib < 4:
            raise ValueError("--image-mib is at least 4")
        with path.open("wb") as f:
            f.truncate(size_mib * MiB)
            f.seek(rng.randrange(3, size_mib) * MiB)
            f.write(os.urandom(MiB))
            f.seek(MiB)
            f.write(text)
        paths.append(path)
    return paths


# ---- processes ----------------------------------------------------------------------------------


def vmvault_exe() -> str:
    exe = Path(sys.executable).parent / "vmvault"
    return str(exe) if exe.exists() else (shutil.which("vmvault") or "vmvault")


@dataclass
class Homes:
    root: Path
    catalog_url: str
    clock_offset_s: float = 0.0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_")}
        env.update({"VMVAULT_CATALOG": self.catalog_url, "VMVAULT_PASSPHRASE": PASSPHRASE, **extra})
        return env

    def cli(self, home: str, *args: str, catalog: bool = True) -> str:
        """One CLI call (-o json) on a home of its own (catalog False: the home's own SQLite); its stdout."""
        argv = [vmvault_exe(), "--home", str(self.root / home), "-o", "json", *args]
        env = self.env()
        if not catalog:
            env.pop("VMVAULT_CATALOG")
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    address: str = ""
    log: list[str] = field(default_factory=list)

    def drain(self) -> None:
        """Keep reading its stderr (a full pipe would stall it); kept for the report on failures."""
        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                del self.log[:-200]
        threading.Thread(target=pump, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_serve(homes: Homes, name: str, workers: int) -> Child:
    argv = [vmvault_exe(), "--home", str(homes.root / name), "serve", "--listen", "127.0.0.1:0", "--tick", "0.5",
            "--workers", str(workers), "--retention-every", "0", "--verify-every", "0"]
    env = homes.env(VMVAULT_TEST_CLOCK_OFFSET_S=f"{homes.clock_offset_s:.3f}")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    child = Child(name, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
    if found is None:
        proc.kill()
        raise RuntimeError(f"serve {name} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    child.address = found.group(1)
    child.drain()
    return child


def start_agent(homes: Homes, host: str, server: str, token: str, max_jobs: int) -> Child:
    """`vmvault agent run` (issue 20's contract): the token in VMVAULT_TOKEN, never in the arguments."""
    argv = [vmvault_exe(), "--home", str(homes.root / f"agent-{host}"), "--server", server, "agent", "run",
            "--host", host, "--max-jobs", str(max_jobs),
            "--allow-disks", str(homes.root / "disks")]  # the agent reads only disks in its allowed folders
    # The agent's host unlocks the vault once with its passphrase (its host key), then runs without it.
    homes.cli(f"agent-{host}", "vault", "import", str(homes.root / "vault"), catalog=False)
    env = homes.env(VMVAULT_TOKEN=token)
    env.pop("VMVAULT_CATALOG")  # an agent talks to the API only: no database credentials on its host
    env.pop("VMVAULT_PASSPHRASE")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    child = Child(f"agent-{host}", proc)
    child.drain()
    return child


# ---- set-up -------------------------------------------------------------------------------------


def policy_doc(slot: datetime) -> dict[str, Any]:
    return {
        "schedulePolicy": {
            "scheduleRunFrequency": "Daily", "scheduleRunTimes": [slot.strftime("2020-01-01T%H:%M:00Z")]
        },
        "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
        "timeZone": "UTC",
    }


@contextmanager
def service(homes: Homes) -> Iterator[Any]:
    """The service layer in this process, on the bench's catalog (set-up, fixtures, plans)."""
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=homes.root / "bench", passphrase=PASSPHRASE, catalog_url=homes.catalog_url)) as ctx:
        yield ctx


def set_up_local(homes: Homes, images: list[Path], slot: datetime) -> None:
    """Vault, policy and protected VMs in process (the servers' own host: fast)."""
    from vmvault.service import policies, protection, vaults, vms

    with service(homes) as ctx:
        vaults.create_vault(ctx, VAULT, storage_dir=homes.root / "vault")
        policies.create_policy(ctx, VAULT, POLICY, {"properties": policy_doc(slot)})
        for path in images:
            vms.add_vm(ctx, path.stem, [path])
            protection.enable_protection(ctx, path.stem, VAULT, policy=POLICY)


def set_up_agents(homes: Homes, images: list[Path], slot: datetime, agents: int) -> dict[str, str]:
    """The same through the CLI contract of issue 20 (`vm add --host`); returns host -> BackupAgent token."""
    homes.cli("admin", "vault", "create", VAULT, "--storage", str(homes.root / "vault"))
    policy = homes.root / "policy.json"
    policy.write_text(json.dumps({"properties": policy_doc(slot)}))
    homes.cli("admin", "policy", "create", POLICY, "--vault", VAULT, "--file", str(policy))

    def add(i: int, path: Path) -> None:
        homes.cli("admin", "vm", "add", path.stem, "--host", f"h{i % agents + 1}", "--disk", str(path))
        homes.cli("admin", "protection", "enable", path.stem, "--vault", VAULT, "--policy", POLICY)

    with ThreadPoolExecutor(4) as pool:  # 400 CLI calls: four at a time
        list(pool.map(add, range(len(images)), images))
    tokens = {}
    for n in range(1, agents + 1):
        printed = json.loads(homes.cli("admin", "token", "create", "--role", "BackupAgent", "--host", f"h{n}"))
        tokens[f"h{n}"] = str(printed["token"])
    return tokens


def reader_token(homes: Homes) -> str:
    from vmvault.service import tokens

    with service(homes) as ctx:
        return tokens.create_token(ctx, "BackupReader", name="scale-bench")[1]


# ---- the slot -------------------------------------------------------------------------------------


def slot_jobs(homes: Homes, slot_iso: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from vmvault.catalog.models import JobRow

    with service(homes) as ctx, ctx.catalog.read() as s:
        rows = s.scalars(select(JobRow).where(JobRow.operation == "Backup")).all()
        return [
            {"vm": r.vm, "status": r.status, "start": r.start_time, "end": r.end_time, "error": r.error,
             "claimed": (r.details or {}).get("claimedAt"),
             "pid": f"pid {r.owner_pid}", "host": (r.details or {}).get("host")}
            for r in rows
            if (r.details or {}).get("scheduledFor") == slot_iso
        ]


def wait_for_slot(homes: Homes, slot_iso: str, vms: int, timeout: float, say: Callable[[str], None]) -> list[Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        jobs = slot_jobs(homes, slot_iso)
        ended = [j for j in jobs if j["status"] != "InProgress"]
        line = f"slot: {len(jobs)}/{vms} queued, {len(ended)} ended"
        if line != last:
            say(line)
            last = line
        if len(ended) >= vms:
            return jobs
        if time.monotonic() > deadline:
            raise RuntimeError(f"the slot did not end in {timeout:.0f} s: {line}")
        time.sleep(2)


def slot_figures(jobs: list[dict[str, Any]], real_slot: datetime, names: dict[str, str]) -> dict[str, Any]:
    from vmvault.catalog.clock import from_iso

    def after(text: str | None) -> float | None:
        return (from_iso(text) - real_slot).total_seconds() if text else None

    queued = [d for d in (after(j["start"]) for j in jobs) if d is not None]
    started = [d for d in (after(j["claimed"]) for j in jobs) if d is not None]
    ended = [d for d in (after(j["end"]) for j in jobs) if d is not None]
    failed = [j for j in jobs if j["status"] != "Completed"]
    runners: dict[str, int] = {}
    for j in jobs:
        runner = names.get(j["pid"]) or j["host"] or j["pid"]  # one of our serves, else the host that ran it
        runners[runner] = runners.get(runner, 0) + 1
    return {
        "backups": len(jobs),
        "completed": len(jobs) - len(failed),
        "failed": len(failed),
        "failures": [{"vm": j["vm"], "status": j["status"], "error": j["error"]} for j in failed[:10]],
        "slot_to_queued_s": summary(queued),
        "slot_to_start_s": summary(started),
        "slot_to_last_end_s": round(max(ended, default=0.0), 1),
        "jobs_per_runner": runners,
    }


# ---- API load -----------------------------------------------------------------------------------


def api_load(addresses: list[str], token: str, paths: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """clients threads, one keep-alive connection each, calling paths in turn until the time is up."""
    lat: dict[str, list[float]] = {p: [] for p in paths}
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"}

    def client(n: int) -> None:
        where = urlsplit(addresses[n % len(addresses)])
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=60)
        mine: dict[str, list[float]] = {p: [] for p in paths}
        i = n
        while time.monotonic() < stop:
            path = paths[i % len(paths)]
            i += 1
            began = time.perf_counter()
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    with lock:
                        errors.append(f"{path}: HTTP {response.status}")
                    continue
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(f"{path}: {e}")
                conn.close()
                continue
            mine[path].append(time.perf_counter() - began)
        conn.close()
        with lock:
            for p in paths:
                lat[p].extend(mine[p])

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    total = sum(len(v) for v in lat.values())
    return {
        "clients": clients,
        "seconds": round(took, 1),
        "requests": total,
        "req_per_s": round(total / took, 1),
        "errors": len(errors),
        "first_errors": errors[:5],
        "per_path_ms": {p: summary(v, 1000) for p, v in lat.items()},
    }


def timed_gets(address: str, token: str, path: str, repeat: int) -> dict[str, Any]:
    where = urlsplit(address)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=120)
    took: list[float] = []
    size = 0
    for _ in range(repeat):
        began = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status} {body[:300]!r}")
        took.append(time.perf_counter() - began)
        size = len(body)
    conn.close()
    page = json.loads(body)
    return {**summary(took, 1000), "bytes": size, "rows": len(page["value"]), "next": bool(page.get("nextLink"))}


# ---- 100,000 jobs ---------------------------------------------------------------------------------


def insert_jobs(homes: Homes, count: int, vm_names: list[str]) -> float:
    """count ended job rows over the last 400 days (Backup mostly), in batches: the catalog after years."""
    from sqlalchemy import insert

    from vmvault.catalog.clock import to_iso
    from vmvault.catalog.models import JobRow

    rng = random.Random(100_000)
    now = datetime.now(UTC) - timedelta(hours=1)
    began = time.monotonic()
    with service(homes) as ctx:
        for first in range(0, count, 5000):
            rows = []
            for _ in range(first, min(count, first + 5000)):
                start = now - timedelta(seconds=rng.uniform(0, 400 * 86400))
                failed = rng.random() < 0.02
                operation = rng.choices(["Backup", "Restore", "Verify", "Retention"], [90, 3, 4, 3])[0]
                rows.append({
                    "id": str(uuid.uuid4()), "operation": operation,
                    "status": "Failed" if failed else "Completed",
                    "vm": rng.choice(vm_names) if operation != "Retention" else None, "vault": VAULT,
                    "start_time": to_iso(start), "end_time": to_iso(start + timedelta(seconds=rng.uniform(5, 600))),
                    "progress": {"percent": 100, "bytesRead": 8 * MiB, "bytesWritten": MiB},
                    "error": {"code": "disk_unreadable", "message": "bench", "recommendedAction": "none"}
                    if failed else None,
                    "owner_pid": 1, "owner_boot_id": "bench", "heartbeat": to_iso(start), "cancel_requested": False,
                    "details": {"trigger": "Scheduled", "policy": POLICY},
                })
            with ctx.catalog.write() as s:
                s.execute(insert(JobRow), rows)
        with ctx.catalog.write() as s:
            s.connection().exec_driver_sql("ANALYZE")
    return time.monotonic() - began


def catalog_rows(homes: Homes) -> dict[str, Any]:
    from sqlalchemy import text

    query = text(
        "SELECT relname, n_live_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables ORDER BY relname"
    )
    with service(homes) as ctx, ctx.catalog.read() as s:
        tables = {name: {"rows": int(rows), "bytes": int(size)} for name, rows, size in s.execute(query)}
        database = int(s.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    return {"tables": {k: v for k, v in tables.items() if v["rows"]}, "database_bytes": database}


def captured_sql(homes: Homes, call: Callable[[Any], object]) -> list[tuple[str, Any]]:
    """The statements (with their parameters) the service issues for one call."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []
    with service(homes) as ctx:
        def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            if statement.lstrip().upper().startswith("SELECT") and " jobs" in statement:
                seen.append((statement, params))
        event.listen(ctx.catalog.engine, "before_cursor_execute", record)
        try:
            call(ctx)
        finally:
            event.remove(ctx.catalog.engine, "before_cursor_execute", record)
    return seen


def explain(homes: Homes, statement: str, params: Any) -> str:
    with service(homes) as ctx, ctx.catalog.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params).all()
        return "\n".join(str(r[0]) for r in rows)


def job_list_plans(homes: Homes, vm: str, deep: int) -> dict[str, dict[str, str]]:
    """EXPLAIN ANALYZE of what GET /jobs asks the catalog: first page, deep page, one VM's jobs."""
    from vmvault.service import jobs

    calls: dict[str, Callable[[Any], object]] = {
        "GET /jobs, first page": lambda ctx: jobs.list_jobs_page(ctx, offset=0, top=200),
        f"GET /jobs, page at {deep}": lambda ctx: jobs.list_jobs_page(ctx, offset=deep, top=200),
        f"GET /jobs?vm={vm}": lambda ctx: jobs.list_jobs_page(ctx, vm=vm, offset=0, top=200),
        # The whole list: what GET /jobs read before 0042 for any page, and `job list` without --limit still does.
        "every job (job list without --limit)": lambda ctx: jobs.list_jobs(ctx),
    }
    if not hasattr(jobs, "list_jobs_page"):  # a vmvault from before the pages in SQL (0042): its one list
        calls = {"every job (one list per page)": lambda ctx: jobs.list_jobs(ctx)}
    plans = {}
    for name, call in calls.items():
        for statement, params in captured_sql(homes, call):
            plans[name] = {"sql": " ".join(statement.split()), "plan": explain(homes, statement, params)}
    return plans


# ---- the run --------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s, api, big = result["slot"], result["api"], result["jobs_100k"]
    out = [
        "| figure | value |", "|---|---:|",
        f"| VMs / servers / agents | {result['vms']} / {result['servers']} / {result['agents']} |",
        f"| backups completed / failed | {s['completed']} / {s['failed']} |",
        f"| slot → queued p50 / p99 (s) | {s['slot_to_queued_s']['p50']} / {s['slot_to_queued_s']['p99']} |",
        f"| slot → start p50 / p99 (s) | {s['slot_to_start_s']['p50']} / {s['slot_to_start_s']['p99']} |",
        f"| slot → last backup ended (s) | {s['slot_to_last_end_s']} |",
    ]
    for path, fig in api["per_path_ms"].items():
        out.append(f"| {path} at {api['clients']} clients p50 / p99 (ms) | {fig['p50']} / {fig['p99']} |")
    out.append(f"| API throughput (req/s, {api['errors']} errors) | {api['req_per_s']} |")
    for name, fig in big["gets_ms"].items():
        out.append(f"| {name} with {big['jobs']} jobs p50 / p99 (ms) | {fig['p50']} / {fig['p99']} |")
    after = big["api_under_load"]
    for path, fig in after["per_path_ms"].items():
        out.append(f"| {path} at {after['clients']} clients, {big['jobs']} jobs, p50 / p99 (ms) | "
                   f"{fig['p50']} / {fig['p99']} |")
    out.append(f"| API throughput with {big['jobs']} jobs (req/s, {after['errors']} errors) | {after['req_per_s']} |")
    out.append(f"| catalog size after the jobs (MiB) | {big['catalog']['database_bytes'] / MiB:.1f} |")
    out.append(f"| load average before / after | {result['load_before']} / {result['load_after']} |")
    return "\n".join(out)


def run(a: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    import pgserver

    why = pgserver.available()
    if why is not None:
        raise SystemExit(f"scale_bench: {why}")
    root = Path(tempfile.mkdtemp(prefix="vmvault-scale-"))
    pg = pgserver.PgServer().start()
    children: list[Child] = []
    result: dict[str, Any] = {"vms": a.vms, "servers": a.servers, "agents": a.agents, "workers": a.workers,
                              "image_mib": a.image_mib, "load_before": load_average(), "cpus": os.cpu_count()}
    try:
        pg.migrate_template()
        homes = Homes(root, pg.new_database())
        began = time.monotonic()
        (root / "disks").mkdir()
        images = make_images(root / "disks", a.vms, a.image_mib)
        say(f"{len(images)} images of {a.image_mib} MiB in {time.monotonic() - began:.1f} s")
        slot = (datetime.now(UTC) + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
        began = time.monotonic()
        tokens = set_up_agents(homes, images, slot, a.agents) if a.agents else set_up_local(homes, images, slot)
        token = reader_token(homes)
        say(f"set-up ({a.vms} protected VMs) in {time.monotonic() - began:.1f} s")

        # The servers' clock: --lead seconds before the slot once they are up (slot time in real time: real_slot).
        homes.clock_offset_s = (slot - timedelta(seconds=a.lead) - datetime.now(UTC)).total_seconds()
        real_slot = slot - timedelta(seconds=homes.clock_offset_s)
        for n in range(a.servers):
            children.append(start_serve(homes, f"serve{n + 1}", a.workers))
        addresses = [c.address for c in children]
        for host, agent_token in (tokens or {}).items():
            children.append(start_agent(homes, host, addresses[0], agent_token, a.max_jobs))
        say(f"{a.servers} servers, {a.agents} agents up; the slot in {(real_slot - datetime.now(UTC)).seconds} s")

        from vmvault.catalog.clock import to_iso

        jobs = wait_for_slot(homes, to_iso(slot), a.vms, a.slot_timeout, say)
        result["slot"] = slot_figures(jobs, real_slot, {f"pid {c.proc.pid}": c.name for c in children})
        say(json.dumps(result["slot"]))

        paths = ["/api/v1/jobs", "/api/v1/items"]
        result["api"] = api_load(addresses, token, paths, a.clients, a.api_seconds)
        say(json.dumps(result["api"]))

        for child in children[a.servers:]:
            child.stop()  # the agents: their heartbeats would only add noise to the job list figures
        names = [p.stem for p in images]
        took = insert_jobs(homes, a.jobs, names)
        say(f"{a.jobs} job rows inserted in {took:.1f} s")
        deep = max(0, (a.jobs // 200 - 1) * 200)
        gets = {
            "GET /jobs (first page)": "/api/v1/jobs",
            f"GET /jobs ($skipToken={deep})": f"/api/v1/jobs?$skipToken={deep}",
            f"GET /jobs?vm={names[0]}": f"/api/v1/jobs?vm={names[0]}",
            "GET /items": "/api/v1/items",
        }
        figures = {name: timed_gets(addresses[0], token, path, a.repeat) for name, path in gets.items()}
        result["jobs_100k"] = {
            "jobs": a.jobs,
            "insert_s": round(took, 1),
            "gets_ms": figures,
            "catalog": catalog_rows(homes),
            "plans": job_list_plans(homes, names[0], deep),
            "api_under_load": api_load(addresses, token, paths, a.clients, a.api_seconds / 2),
        }
        result["load_after"] = load_average()
        return result
    finally:
        for child in children:
            child.stop()
        if any(c.proc.returncode not in (0, -signal.SIGTERM) for c in children):
            for c in children:
                say(f"--- {c.name} (exit {c.proc.returncode}) ---\n" + "".join(c.log[-30:]))
        pg.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--image-mib", type=int, default=8, help="size of each sparse disk image")
    ap.add_argument("--servers", type=int, default=2, help="`vmvault serve` processes on the catalog")
    ap.add_argument("--workers", type=int, default=2, help="serve --workers")
    ap.add_argument("--agents", type=int, default=0, help="run the jobs on N agents (hosts h1..hN)")
    ap.add_argument("--max-jobs", type=int, default=2, help="agent run --max-jobs")
    ap.add_argument("--lead", type=float, default=20.0, help="seconds between the servers' start and the slot")
    ap.add_argument("--slot-timeout", type=float, default=3600.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--api-seconds", type=float, default=30.0)
    ap.add_argument("--jobs", type=int, default=100_000, help="job rows in the catalog for the list figures")
    ap.add_argument("--repeat", type=int, default=20, help="sequential GETs per list figure")
    ap.add_argument("--out", type=Path, help="write the JSON summary here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (homes, vault, images)")
    a = ap.parse_args(argv)
    if a.vms < 1 or a.servers < 1 or a.clients < 1 or a.jobs < 200 or a.agents < 0:
        ap.error("--vms, --servers and --clients are at least 1, --jobs at least 200, --agents at least 0")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse(argv)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {line}", file=sys.stderr, flush=True)

    result = run(a, say)
    for name, plan in result["jobs_100k"]["plans"].items():
        print(f"\n### {name}\n\n    {plan['sql']}\n\n" + "\n".join("    " + line for line in plan["plan"].splitlines()))
    print("\n" + markdown(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    errors = result["api"]["errors"] + result["jobs_100k"]["api_under_load"]["errors"]
    return 0 if result["slot"]["failed"] == 0 and errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
