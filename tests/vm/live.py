"""Helpers of the live-VM tests: vmvault driven through its CLI against real QEMU processes."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from helpers import Cli, rp_id

JOB_TIMEOUT = 600


def add_running_vm(cli: Cli, name: str, qmp: Path, agent: Path | None = None) -> dict[str, Any]:
    args = ["vm", "add", name, "--qmp", str(qmp)]
    if agent is not None:
        args += ["--guest-agent", str(agent)]
    vm: dict[str, Any] = cli.ok(*args).json()
    return vm


def protect_running(cli: Cli, storage: Path, name: str, qmp: Path, agent: Path | None = None) -> None:
    if not any(v["name"] == "v1" for v in cli.ok("vault", "list").json()):
        cli.vault_create("v1", storage)
    add_running_vm(cli, name, qmp, agent)
    r = cli.protection_enable(name, "v1")
    assert r.ok, str(r)


def backup(cli: Cli, vm: str, *, ok: bool = True) -> dict[str, Any]:
    """Run a backup job; returns the job (asserting it did not fail unless ok=False)."""
    r = cli.run(*cli.backup_args(vm), timeout=JOB_TIMEOUT)
    assert "Traceback" not in r.output, str(r)
    job: dict[str, Any] = r.json()
    if ok:
        assert r.ok and job["properties"]["status"] in ("Completed", "CompletedWithWarnings"), str(r)
    return job


def warnings(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The warnings of a job in Azure's shape (its first errorDetails entry carries them)."""
    details = job["properties"]["errorDetails"]
    return list(details[0].get("warnings") or []) if details else []


def warning_codes(job: dict[str, Any]) -> list[str]:
    return [w["code"] for w in warnings(job)]


def fell_back(job: dict[str, Any]) -> bool:
    return "cbt_fallback" in warning_codes(job)


def latest_point(cli: Cli, vm: str) -> dict[str, Any]:
    points = cli.points(vm)
    assert points, f"VM {vm} has no recovery point"
    return points[-1]


def restore_raw(cli: Cli, vm: str, point: dict[str, Any], target: Path) -> dict[str, Path]:
    """The point's disks as raw files under target, by disk name."""
    r = cli.restore_disks(vm, rp_id(point), target, fmt="raw", force=True)
    assert r.ok, str(r)
    return {p.stem: p for p in target.iterdir() if p.suffix == ".raw"}


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return proc.stdout


def ext4_file(image: Path, path: str) -> bytes | None:
    """A file's bytes from an ext4 image (None when absent)."""
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    if b"File not found" in proc.stderr:
        return None
    return proc.stdout


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read proc's stderr until a line holds needle (the test hooks announce themselves there).

    Reads the raw descriptor: select() on a buffered text stream misses lines that are already
    in its buffer (several lines arriving at once), and the hook then waits for ever.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        data = os.read(fd, 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace") + "\n"
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} from vmvault within {timeout:.0f} s; stderr so far:\n{''.join(seen)}")
