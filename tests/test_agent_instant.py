"""`restore vm --instant` of a VM of another host: queued for that host's agent, which runs the
instant restore there with the server's code (service/agentinstant.py): the block export of the
point, qcow2 overlays backed by it, the new VM booted, the live copy, the export stopped.

Real processes: one `vmvault serve` (SQLite), one `agent run` for host h1 (its own home), the
test guest under TCG (initramfs, one raw data disk of random bytes the guest never mounts, so the
copy must equal the point byte for byte).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, assert_same_image, wait_for
from test_scheduler import Serve
from vmvault.proc import pid_alive

MiB = 1 << 20


def _agent(cli: Cli, server: str, log: Path, disks: list[Path], restores: Path) -> subprocess.Popen[str]:
    allow = [a for d in disks for a in ("--allow-disks", str(d))] + ["--allow-restores", str(restores)]
    argv = cli.argv("--server", server, "agent", "run", "--host", "h1", *allow, json_output=False)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.Popen(argv, env=cli.env(), stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL,
                                text=True)  # fmt: skip


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def running() -> Iterator[list[Any]]:
    procs: list[Any] = []
    yield procs
    for proc in reversed(procs):
        with contextlib.suppress(Exception):
            proc() if callable(proc) else proc.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_instant_restore_of_a_hosts_vm_boots_on_its_agent_and_moves_to_local_disks(
    tmp_path: Path, running: list[Any]
) -> None:
    from vm.machine import Guest, blank_disk
    from vmvault.connectors.qemu.qmp import QmpClient

    admin = Cli(home=tmp_path / "srv")
    admin.ok("vault", "create", "v1", "--storage", str(tmp_path / "v1"))
    serve = Serve(admin)
    running.append(serve.stop)
    server = serve.announce.split("listening on ")[1].split()[0]
    token = admin.ok("token", "create", "--role", "BackupAgent", "--host", "h1").json()["token"]
    agent_home = tmp_path / "agent-h1"
    assert Cli(home=agent_home).vault_import(tmp_path / "v1").ok  # the host's key opens the vault there

    disk = blank_disk(tmp_path, "d0", 8 * MiB, "raw")
    with open(disk.path, "r+b") as f:
        f.write(os.urandom(2 * MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    guest = Guest(tmp_path, [disk]).start()
    running.append(guest)
    admin.ok("vm", "add", "q1", "--host", "h1", "--qmp", str(guest.vmvault_qmp), "--guest-agent",
             str(guest.agent_socket))  # fmt: skip
    admin.ok("protection", "enable", "--vm", "q1", "--vault", "v1")
    restores = tmp_path / "restores"
    log = tmp_path / "agent.log"
    agent_cli = Cli(home=agent_home, passphrase=None, extra_env={"VMVAULT_TOKEN": token})
    agent = _agent(agent_cli, server, log, [tmp_path, guest.sockets], restores)
    running.append(lambda: _stop(agent))
    wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "agent h1 to register", interval=0.5)
    job = admin.ok("backup", "now", "q1", "--wait").json()["properties"]
    assert job["status"] == "Completed" and job["host"] == "h1", job
    rp = admin.point_ids("q1")[-1]
    guest.close()  # the copy runs alone: 2 shared cores

    # The attacker's target, outside the agent's --allow-restores: refused on h1, nothing made.
    outside = tmp_path / "outside"
    r = admin.fails("restore", "vm", "q1", "--rp", rp, "--name", "c0", "--target-dir", str(outside), "--instant")
    props = r.json()["properties"]
    assert props["host"] == "h1" and props["errorDetails"][0]["errorCode"] == "path_not_allowed", props
    assert not outside.exists() and not admin.run("vm", "show", "c0").ok

    # Into its roots: back once the VM runs on h1, the job InProgress; Completed when the copy is done.
    target = restores / "c1"
    r = admin.run("restore", "vm", "q1", "--rp", rp, "--name", "c1", "--target-dir", str(target), "--instant",
                  timeout=300)  # fmt: skip
    assert r.ok, f"{r}\n{log.read_text()}"
    props = r.json()["properties"]
    template = json.loads((target / "c1.json").read_text())
    qmp = Path(template["sockets"]["qmp"])
    running.append(lambda: _quit(qmp))
    assert props["host"] == "h1" and props["operation"] == "Restore", props
    assert "it runs on the vault's export" in r.stderr, r.stderr
    shown = admin.ok("vm", "show", "c1").json()
    assert shown["host"] == "h1" and shown["kind"] == "qmp", shown
    job_id = r.json()["name"]
    done = admin.run("job", "wait", job_id, "--timeout", "240", timeout=300)
    assert done.ok and done.json()["properties"]["status"] == "Completed", f"{done}\n{log.read_text()}"
    state = admin.ok("job", "show", job_id).json()["properties"]["extendedInfo"]["restore"]
    copy = target / "d0.qcow2"
    assert state["disks"] == [str(copy)] and state["exportClosed"] and state["files"] == [str(copy)], state
    assert not pid_alive(int(state["exportPid"])), "the export still runs after the switch-over"
    assert not Path(state["exportSocket"]).exists()
    with QmpClient(qmp).connect() as client:
        assert client.execute("query-status")["status"] == "running"
    _quit(qmp)
    assert_same_image(copy, disk.path)  # the guest never wrote to it: the point, byte for byte
    assert not list((agent_home / "instant").glob("*.json")), "the agent's journal outlived the job"


def _quit(qmp: Path) -> None:
    from vmvault.connectors.qemu.qmp import QmpClient

    with contextlib.suppress(Exception), QmpClient(qmp).connect() as client:
        client.quit()
    wait_for(lambda: not qmp.exists() or not _answers(qmp), 30, "QEMU to exit", interval=0.2)


def _answers(qmp: Path) -> bool:
    from vmvault.connectors.qemu.qmp import QmpClient

    try:
        with QmpClient(qmp).connect(greeting_timeout=1):
            return True
    except Exception:
        return False
