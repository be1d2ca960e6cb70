"""Several `vmvault serve` on one PostgreSQL catalog (tests/pgserver.py: a real PostgreSQL 15).

Real processes, real HTTP, real backups: both servers answer the API, exactly one schedules, and
when the scheduling server is SIGKILLed in the middle of a slot the other one takes over within
30 s; every VM's slot runs exactly once (the VMs the dead leader had not queued yet run once
after the takeover, the one it had queued is not queued again).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from helpers import PASSPHRASE, Cli, first_run_owner_token, wait_for
from pgserver import PgServer
from test_scheduler import Serve, next_half_hour, policy_file

pytestmark = pytest.mark.xdist_group("realtime")  # real-time budgets: never beside another of them (docs/testing.md)

MiB = 1 << 20
VMS = ("vm1", "vm2", "vm3", "vm4")


def lock_info(home: Path) -> dict[str, Any]:
    """What a serve publishes in HOME/serve.lock (pid, listen, leader)."""
    try:
        info: dict[str, Any] = json.loads((home / "serve.lock").read_text() or "{}")
        return info
    except (OSError, ValueError):
        return {}


def get_json(url: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, json.loads(response.read())


def set_up(tmp_path: Path, url: str, policy: Path) -> None:
    """One vault, a daily policy at the slot, four protected VMs with small raw disks (in process: fast)."""
    from vmvault.service import policies, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "setup", passphrase=PASSPHRASE, catalog_url=url)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        policies.create_policy(ctx, "v1", "Soon", json.loads(policy.read_text()))
        for name in VMS:
            disk = tmp_path / f"{name}.raw"
            disk.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
            vms.add_vm(ctx, name, [disk])
            protection.enable_protection(ctx, name, "v1", policy="Soon")


def finish(serve: Serve) -> str:
    """Stop a serve (SIGTERM) if it still runs; its stderr (the log)."""
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(60)
    log = serve.proc.stderr.read() if serve.proc.stderr else ""
    for pipe in (serve.proc.stdout, serve.proc.stderr):
        if pipe is not None:
            pipe.close()
    return log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_servers_one_schedules_and_a_killed_leader_loses_no_slot_and_runs_none_twice(
    tmp_path: Path, pg_server: PgServer
) -> None:
    url = pg_server.new_database()
    catalog = {"VMVAULT_CATALOG": url}  # the URL with its password only ever in the environment
    slot = next_half_hour(datetime.now(UTC) + timedelta(hours=3))
    kolkata = slot.astimezone(ZoneInfo("Asia/Kolkata"))
    set_up(tmp_path, url, policy_file(tmp_path, kolkata.strftime("%H:%M"), "Asia/Kolkata"))
    setup = Cli(home=tmp_path / "setup", extra_env=catalog)

    # Both servers read a clock 20 s before the slot; A dies (SIGKILL, test hook) right after it
    # queued the slot's first backup: the middle of the slot.
    offset = (slot - timedelta(seconds=20) - datetime.now(UTC)).total_seconds()
    env = {**catalog, "VMVAULT_TEST_CLOCK_OFFSET_S": f"{offset:.3f}"}
    cli_a = Cli(home=tmp_path / "a", extra_env={**env, "VMVAULT_TEST_KILL_AT": "schedule:queued"})
    cli_b = Cli(home=tmp_path / "b", extra_env=env)
    a = Serve(cli_a)
    b: Serve | None = None
    try:
        token_line = a.proc.stdout.readline() if a.proc.stdout else ""
        token = first_run_owner_token(token_line)  # one catalog: A's first-run token works on B too
        wait_for(lambda: lock_info(cli_a.home).get("leader") is True, 30, "server A to schedule", interval=0.2)
        b = Serve(cli_b)
        time.sleep(2.5)  # B tried the scheduling lock at least once meanwhile (every 2 s)
        assert lock_info(cli_b.home).get("leader") is False, "two servers schedule at once"
        for serve in (a, b):
            # The catalog's password: not in the process arguments, not in what serve prints.
            assert pg_server.password not in Path(f"/proc/{serve.proc.pid}/cmdline").read_text()
            assert "catalog postgresql://vmvault:***@127.0.0.1" in serve.announce
            assert pg_server.password not in serve.announce
            address = serve.announce.split("listening on ")[1].split()[0]
            status, health = get_json(f"{address}/healthz", token)
            assert status == 200 and health["pid"] == serve.proc.pid and health["leader"] is (serve is a)
            status, listed = get_json(f"{address}/api/v1/items", token)
            assert status == 200 and sorted(i["properties"]["friendlyName"] for i in listed["value"]) == list(VMS)

        assert a.proc.wait(120) == -signal.SIGKILL, "the leader did not die at its crash point"
        died = time.monotonic()
        wait_for(lambda: lock_info(cli_b.home).get("leader") is True, 30, "server B to take over", interval=0.2)
        takeover = time.monotonic() - died
        assert takeover < 30, f"took {takeover:.1f} s"

        def backups() -> list[dict[str, Any]]:
            return [j for j in setup.jobs() if j["properties"]["operation"] == "Backup"]

        def all_ended() -> bool:
            found = backups()
            return len(found) >= len(VMS) and all(j["properties"]["status"] != "InProgress" for j in found)

        wait_for(all_ended, 240, "every VM's scheduled backup to end", interval=1.0)
        time.sleep(3)  # several more ticks of B: nothing is queued again
        runs = backups()
        per_vm = sorted(j["properties"]["entityFriendlyName"] for j in runs)
        assert per_vm == list(VMS), f"each slot exactly once: {per_vm}"
        expected_slot = slot.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        for job in runs:
            info = setup.ok("job", "show", job["name"]).json()["properties"]
            assert info["extendedInfo"]["scheduledFor"] == expected_slot
            assert info["extendedInfo"]["trigger"] == "Scheduled"
            # A could have claimed its one queued job in the instant before it died: then that
            # job ran (and ended Failed, its process gone): still once. All others B ran to the end.
            if info["status"] != "Completed":
                assert info["error"]["code"] == "process_died" and info["extendedInfo"]["owner"]["pid"] == a.proc.pid
            else:
                assert info["extendedInfo"]["owner"]["pid"] == b.proc.pid
        (host,) = setup.ok("host", "list").json()  # both serves run on this machine: one Server host
        assert host["role"] == "Server" and host["state"] == "Online"
        assert str(b.proc.pid) in setup.ok("host", "show", host["name"]).json()["details"]["servers"]
        completed = [j for j in runs if j["properties"]["status"] == "Completed"]
        assert len(completed) >= len(VMS) - 1
        print(f"takeover after the leader's death: {takeover:.1f} s")
    finally:
        logs = "".join(finish(serve) for serve in (a, b) if serve is not None)
    assert "scheduler: took the scheduling lock" in logs
    assert pg_server.password not in logs
