"""The fleet: two servers and three agents on one PostgreSQL (issue #20's "done when", one scenario).

Real processes on a real PostgreSQL 15 (tests/pgserver.py): two `vmvault serve` with their own
homes and three `vmvault agent run` with their own homes, hosts h1, h2 and h3 (the "hosts" are this
machine), each agent with a BackupAgent token bound to its host and its own --allow-disks and
--allow-restores folders; each agent home unlocked the vault once with its passphrase (`vault
import`, done in process: fast) and runs without it. Nine VMs, three a host: eight small raw disk images of random data,
and on h1 a live QEMU VM added by its QMP socket (qemu-storage-daemon stands in for a running QEMU:
QMP, its disk held open; no guest boot needed). All nine are protected by one policy once both
servers run; the servers' clock (the test-only VMVAULT_TEST_CLOCK_OFFSET_S) has just passed its
slot, so the slot is due at once, however long the servers took to start on a loaded machine.

What a user relies on, checked here:
- one server schedules; when it is SIGKILLed in the middle of the slot (right after it queued the
  slot's first backup) the other takes over within 30 s, and every VM's slot runs exactly once,
  on its VM's host (the job's host and the agent's pid), never two jobs of a VM at once;
- on-demand backups through the surviving server; a second backup of a VM whose backup runs is
  refused, naming the running job;
- an agent SIGKILLed mid-backup (after its first pack): the job ends Failed `agent_lost` within the
  lease, no point; restarted, its next backup completes and restores; an agent stopped (SIGTERM) mid-backup:
  the job ends Cancelled, no point, the agent exits 0;
- the server does not choose which files of a host are read or written: a disk outside the agent's
  --allow-disks fails its backup, a restore outside its --allow-restores fails, naming the path
  and the fix, nothing written;
- restores of one VM per host (the live VM's among them) are byte-identical and run on its host;
- a file-recovery mount of a point of a VM of h2 runs on h2 (by its agent, under its allowed
  folder), a file read there is byte-identical, and its unmount runs there too.

The agents talk to server B (an agent follows one --server URL: in a deployment, a name in front of
the servers), and A is the one that schedules first and dies.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from files_support import build_disks, file_set, mounts_under
from helpers import PASSPHRASE, Cli, assert_same_image, copy_image, wait_for
from pgserver import PgServer
from test_agents import Agent
from test_scheduler import Serve, next_half_hour, policy_file

pytestmark = pytest.mark.xdist_group("realtime")  # real-time budgets: never beside another of them (docs/testing.md)

MiB = 1 << 20
LEASE_S = 8.0  # the servers' VMVAULT_AGENT_LEASE_S: a silent agent's jobs end agent_lost after it
HOSTS = ("h1", "h2", "h3")
# The nine VMs and their hosts: q1 is the live QEMU VM, the others raw disk images.
HOST_OF = {"q1": "h1", "a1": "h1", "a2": "h1", "b1": "h2", "b2": "h2", "b3": "h2", "c1": "h3", "c2": "h3", "c3": "h3"}
ZONE = "Asia/Kolkata"  # a half-hour offset: the slot is HH:00 or HH:30 there


class HostAgent(Agent):
    """An agent with this scenario's allowed folders (test_agents.Agent reads them at its start)."""

    def __init__(self, cli: Cli, server: str, host: str, disks: list[Path], restores: list[Path]) -> None:
        self.allowed, self.restores = disks, restores
        super().__init__(cli, server, host)


class Api:
    """Server B's REST API with an Owner token: the test's reads, without a CLI process each."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self.token = address, token

    def get(self, path: str) -> Any:
        url = path if path.startswith("http") else f"{self.address}{path}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def pages(self, path: str) -> list[Any]:
        found: list[Any] = []
        next_link: str | None = f"/api/v1{path}"
        while next_link:
            page = self.get(next_link)
            found += page["value"]
            next_link = page.get("nextLink")
        return found

    def jobs(self) -> list[dict[str, Any]]:
        """Every job: its properties (operation, status, startTime, endTime, host), its id and VM."""
        return [flat(job) for job in self.pages("/jobs")]

    def job(self, job_id: str) -> dict[str, Any]:
        """One job as `job show` gives it (with extendedInfo: trigger, scheduledFor, owner)."""
        return flat(self.get(f"/api/v1/jobs/{job_id}"))

    def points(self, vm: str) -> list[str]:
        """The VM's recovery points, newest first."""
        return [str(p["name"]) for p in self.pages(f"/items/{vm}/recoverypoints")]


def flat(job: dict[str, Any]) -> dict[str, Any]:
    """A job resource's properties, with its id and VM's name."""
    return {**job["properties"], "id": job["name"], "vm": job["properties"]["entityFriendlyName"]}


def lock_info(home: Path) -> dict[str, Any]:
    """What a serve publishes in HOME/serve.lock (pid, listen, leader)."""
    try:
        info: dict[str, Any] = json.loads((home / "serve.lock").read_text() or "{}")
        return info
    except (OSError, ValueError):
        return {}


def set_up(tmp_path: Path, url: str, disks: dict[str, Path], slot: datetime) -> tuple[str, dict[str, str]]:
    """One vault; the slot's policy "Soon" and a far one "Later"; the disk VMs on their hosts (not
    protected yet), x1 (a disk outside its agent's folders) protected by Later; an Owner token and a
    BackupAgent token per host (in process: fast). Returns the Owner token and the agents' tokens."""
    from vmvault.service import policies, protection, tokens, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.settings import Settings

    local = slot.astimezone(ZoneInfo(ZONE))
    soon = policy_file(tmp_path, local.strftime("%H:%M"), ZONE)
    later = policy_file(tmp_path, (local + timedelta(hours=12)).strftime("%H:%M"), ZONE)
    with context(Settings(home=tmp_path / "setup", passphrase=PASSPHRASE, catalog_url=url)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        policies.create_policy(ctx, "v1", "Soon", json.loads(soon.read_text()))
        policies.create_policy(ctx, "v1", "Later", json.loads(later.read_text()))
        for name, disk in disks.items():
            add_host_vm(ctx, name, HOST_OF[name], [str(disk)])
        add_host_vm(ctx, "x1", "h2", ["/etc/hostname"], formats=["raw"])
        protection.enable_protection(ctx, "x1", "v1", policy="Later")  # its slot is 12 hours after Soon's
        owner = tokens.create_token(ctx, tokens.OWNER)[1]
        agents = {host: tokens.create_token(ctx, tokens.AGENT, host=host)[1] for host in HOSTS}
    return owner, agents


def unlock(home: Path, storage: Path) -> None:
    """A host unlocks the vault once with its passphrase (`vault import` in the agent's home, in
    process: fast): its own host key opens it from then on."""
    from vmvault.service import vaults
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx:
        vaults.import_vault(ctx, storage)


def protect(tmp_path: Path, url: str) -> None:
    """Protect the nine VMs by Soon, whose slot the servers' clock has passed: due at once."""
    from vmvault.service import protection
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "setup", catalog_url=url)) as ctx:
        for name in HOST_OF:
            protection.enable_protection(ctx, name, "v1", policy="Soon")


def ended(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any]]:
    """A `backup now`/`restore disks` process's exit code and the job it printed (its stderr in "stderr")."""
    out, err = proc.communicate(timeout=300)
    try:
        return proc.returncode, {**json.loads(out)["properties"], "stderr": err}
    except (ValueError, KeyError):
        raise AssertionError(f"no job printed: {out!r} {err!r}") from None


def restore(cli: Cli, vm: str, rp: str, target: Path) -> subprocess.Popen[str]:
    return cli.popen("restore", "disks", "--vm", vm, "--rp", rp, "--target-dir", str(target))


def check_serve(serve: Serve, password: str, owner: str) -> Api:
    """A serve answers the API on the shared catalog; the catalog's password is not in its process
    arguments nor in what it prints. Its API."""
    assert password not in Path(f"/proc/{serve.proc.pid}/cmdline").read_text()
    assert "catalog postgresql://vmvault:***@127.0.0.1" in serve.announce and password not in serve.announce
    api = Api(serve.announce.split("listening on ")[1].split()[0], owner)
    assert api.get("/healthz")["pid"] == serve.proc.pid
    assert sorted(i["properties"]["friendlyName"] for i in api.pages("/items")) == ["x1"]  # the others: not yet
    return api


def finish_serve(serve: Serve) -> str:
    """Stop a serve (SIGTERM) if it still runs; its stderr (the log)."""
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(60)
    log = serve.proc.stderr.read() if serve.proc.stderr and not serve.proc.stderr.closed else ""
    for pipe in (serve.proc.stdout, serve.proc.stderr):
        if pipe is not None:
            pipe.close()
    return log


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """What the scenario started, stopped at the end whatever happened (SIGKILL: nothing to wait for)."""
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        if isinstance(proc, Agent):
            proc.stop(signal.SIGKILL)
        elif isinstance(proc, Serve):
            if proc.proc.poll() is None:
                proc.proc.kill()
            proc.proc.wait()
            finish_serve(proc)
        else:
            proc.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_servers_three_agents_nine_vms_a_killed_leader_and_a_killed_agent(
    tmp_path: Path, pg_server: PgServer, procs: list[Any]
) -> None:
    from vm.machine import StorageDaemon, blank_disk, read_live

    phases: list[str] = []  # how long each part took (printed at the end)
    last = [time.monotonic()]

    def mark(what: str) -> None:
        phases.append(f"{what}: {time.monotonic() - last[0]:.1f} s")
        last[0] = time.monotonic()

    url = pg_server.new_database()
    catalog = {"VMVAULT_CATALOG": url}  # the URL with its password only ever in the environment
    folder = tmp_path / "disks"  # the agents' --allow-disks (with the QMP socket's folder)
    folder.mkdir()
    restored = tmp_path / "restored"  # the agents' --allow-restores
    restored.mkdir()
    disks = {vm: folder / f"{vm}.raw" for vm in HOST_OF if vm != "q1"}
    for disk in disks.values():
        disk.write_bytes(os.urandom(2 * MiB) + bytes(MiB) + os.urandom(MiB))
    slot = next_half_hour(datetime.now(UTC) + timedelta(hours=3))
    owner, agent_tokens = set_up(tmp_path, url, disks, slot)
    # The CLI on the catalog (queues jobs for the hosts' agents, follows them); the setup home's own
    # host key opens the vault, so no passphrase (and no scrypt) in each command.
    admin = Cli(home=tmp_path / "setup", passphrase=None, extra_env=catalog)

    # The live VM of h1, added by its QMP socket there (nothing probed here: its agent describes it
    # at its first backup, the slot's).
    qsd = StorageDaemon(folder, [blank_disk(folder, "q0", 8 * MiB, "raw")]).start()
    procs.append(qsd)
    qsd.write(qsd.disks[0], [(0, os.urandom(2 * MiB)), (5 * MiB, os.urandom(MiB))])
    adding = admin.popen("vm", "add", "q1", "--host", "h1", "--qmp", str(qsd.vmvault_qmp))
    homes = {host: tmp_path / f"agent-{host}" for host in HOSTS}
    for home in homes.values():
        unlock(home, tmp_path / "v1")
    out, err = adding.communicate(timeout=120)
    added = json.loads(out)
    assert adding.returncode == 0 and added["host"] == "h1" and added["disks"] == [], err
    mark("catalog, vault and disks set up")
    agent_clis = {h: Cli(home=homes[h], passphrase=None, extra_env={"VMVAULT_TOKEN": agent_tokens[h]}) for h in HOSTS}

    # Both servers read a clock that has just passed the slot; the VMs are protected once both run,
    # so the slot is due then, whatever the machine's load made their start cost. A dies (SIGKILL,
    # test hook) right after it queued the slot's first backup: the middle of the slot.
    offset = (slot - datetime.now(UTC)).total_seconds()
    env = {**catalog, "VMVAULT_TEST_CLOCK_OFFSET_S": f"{offset:.3f}", "VMVAULT_AGENT_LEASE_S": str(LEASE_S)}
    cli_a = Cli(home=tmp_path / "a", extra_env={**env, "VMVAULT_TEST_KILL_AT": "schedule:queued"})
    cli_b = Cli(home=tmp_path / "b", extra_env=env)
    a = Serve(cli_a)
    procs.append(a)
    api_a = check_serve(a, pg_server.password, owner)
    wait_for(lambda: lock_info(cli_a.home).get("leader") is True, 30, "server A to schedule", interval=0.2)
    assert api_a.get("/healthz")["leader"] is True
    mark("server A up and scheduling")
    b = Serve(cli_b)
    procs.append(b)
    b_started = time.monotonic()
    api = check_serve(b, pg_server.password, owner)  # the agents' server, and the test's reads
    server = api.address
    agent_pids: dict[str, set[int]] = {h: set() for h in HOSTS}  # every run of each host's agent

    def start_agent(host: str, **hooks: str) -> HostAgent:
        cli = agent_clis[host]
        cli = Cli(home=cli.home, passphrase=None, extra_env={**cli.extra_env, **hooks})
        agent = HostAgent(cli, server, host, [folder, qsd.sockets], [restored])
        procs.append(agent)
        agent_pids[host].add(agent.proc.pid)
        return agent

    agents = {host: start_agent(host) for host in HOSTS}
    for host, agent in agents.items():  # a token is never an argument
        assert agent_tokens[host] not in Path(f"/proc/{agent.proc.pid}/cmdline").read_text()
    time.sleep(max(0.0, 2.5 - (time.monotonic() - b_started)))  # B tried the scheduling lock (every 2 s)
    assert lock_info(cli_b.home).get("leader") is False, "two servers schedule at once"
    assert api.get("/healthz")["leader"] is False
    assert a.proc.poll() is None and lock_info(cli_a.home).get("leader") is True
    mark("server B up, agents started")
    deaths: list[float] = []  # when A died, seen at once (protect() may still run then)

    def watch_a() -> None:
        a.proc.wait()
        deaths.append(time.monotonic())

    watch = threading.Thread(target=watch_a, daemon=True)
    watch.start()
    protect(tmp_path, url)

    # ---- the slot: A queues one backup and dies; B takes over and queues the other eight --------
    watch.join(120)
    assert a.proc.poll() == -signal.SIGKILL, "the leader did not die at its crash point"
    (died,) = deaths
    wait_for(lambda: lock_info(cli_b.home).get("leader") is True, 30, "server B to take over", interval=0.2)
    takeover = time.monotonic() - died
    assert takeover < 30, f"took {takeover:.1f} s"

    def slot_ended() -> bool:
        found = [j for j in api.jobs() if j["operation"] == "Backup"]
        return len(found) >= len(HOST_OF) and all(j["status"] != "InProgress" for j in found)

    wait_for(slot_ended, 180, "every VM's scheduled backup to end", interval=0.5)
    slot_done = time.monotonic()
    hosts = {h["name"]: h for h in api.pages("/hosts")}
    assert {h: (hosts[h]["role"], hosts[h]["state"]) for h in HOSTS} == {h: ("Agent", "Online") for h in HOSTS}
    (machine,) = [h for h in hosts.values() if h["role"] == "Server"]  # both serves run on this machine
    assert machine["state"] == "Online"
    assert str(b.proc.pid) in api.get(f"/api/v1/hosts/{machine['name']}")["details"]["servers"]
    shown = api.get("/api/v1/vms/q1")  # described on h1: its disk and QEMU's format
    assert [(d["name"], d["format"]) for d in shown["disks"]] == [("q0", "raw")], shown

    mark("the slot")

    # ---- on demand, through the surviving server; restores of the slot's points, on their hosts;
    # a disk outside its agent's folders, a restore outside them: refused ---------------------------
    remote = Cli(home=tmp_path / "remote", passphrase=None, extra_env={"VMVAULT_TOKEN": owner})
    on_demand = {vm: remote.popen("--server", server, "backup", "now", vm, "--wait") for vm in ("a1", "b1", "c1")}
    outside_disk = admin.popen("backup", "now", "x1", "--wait")
    targets = {vm: restored / vm for vm in ("q1", "b2", "c2")}
    restores = {vm: restore(admin, vm, api.points(vm)[0], targets[vm]) for vm in ("q1", "b2")}  # the slot's
    outside = tmp_path / "outside"
    refused = restore(admin, "b3", api.points("b3")[0], outside)
    for vm, proc in on_demand.items():
        code, job = ended(proc)
        assert code == 0 and job["status"] == "Completed" and job["host"] == HOST_OF[vm], job
    code, job = ended(outside_disk)
    error = job["errorDetails"][0]
    assert code != 0 and job["host"] == "h2" and error["errorCode"] == "path_not_allowed", job
    assert "/etc/hostname" in error["errorString"] and "agent run --allow-disks DIR" in error["recommendations"][0]
    code, job = ended(refused)
    error = job["errorDetails"][0]
    assert code != 0 and job["host"] == "h2" and error["errorCode"] == "path_not_allowed", job
    assert str(outside) in error["errorString"] and "agent run --allow-restores DIR" in error["recommendations"][0]
    assert not outside.exists()
    for vm, proc in restores.items():
        code, job = ended(proc)
        assert code == 0 and job["operation"] == "Restore" and job["host"] == HOST_OF[vm], job
        assert f"restored {targets[vm]}/" in job["stderr"], job
    assert_same_image(targets["q1"] / "q0.raw", read_live(qsd.disks[0], tmp_path / "q0-now.raw"))
    assert_same_image(targets["b2"] / "disk0.raw", disks["b2"])

    mark("on-demand backups, restores")

    # ---- agents stopped mid-backup: h3's SIGKILLed after its first pack, h1's SIGTERMed ---------
    for host in ("h1", "h3"):
        agents[host].proc.send_signal(signal.SIGTERM)  # with nothing running: a clean exit
    for host in ("h1", "h3"):
        assert agents[host].proc.wait(60) == 0
        agents[host].stop()
    pause = tmp_path / "pause"
    pause.mkdir()
    killed = start_agent("h3", VMVAULT_TEST_KILL_AT="pack:published")
    stopped = start_agent("h1", VMVAULT_TEST_PAUSE_AFTER_DEDUP=str(pause))  # held at its first dedup hit
    disks["c2"].write_bytes(os.urandom(4 * MiB))  # new data: the backup publishes packs
    disks["a2"].write_bytes(disks["b1"].read_bytes() + os.urandom(MiB))  # starts with data the vault holds
    before = {vm: api.points(vm) for vm in ("a2", "c2")}
    lost = admin.popen("backup", "now", "c2", "--wait")
    cancelled = admin.popen("backup", "now", "a2", "--wait")
    assert killed.proc.wait(120) == -signal.SIGKILL
    killed_at = time.monotonic()
    wait_for(lambda: (pause / "paused").exists(), 120, "h1's agent to be mid-backup", interval=0.1)
    (running,) = [j for j in api.jobs() if j["vm"] == "a2" and j["status"] == "InProgress"]
    twice = remote.run("--server", server, "backup", "now", "a2")  # never two backups of a VM at once
    assert twice.returncode == 75, twice
    assert f"a Backup job for VM 'a2' is already running (job {running['id']}" in twice.stderr
    stopped.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the agent handles the signal before the backup goes on
    (pause / "resume").touch()
    assert stopped.proc.wait(60) == 0
    code, job = ended(cancelled)
    assert code != 0 and job["status"] == "Cancelled" and job["host"] == "h1", job
    assert "the agent was stopped (SIGTERM)" in job["errorDetails"][0]["errorString"]
    code, job = ended(lost)
    lost_after = time.monotonic() - killed_at
    error = job["errorDetails"][0]
    assert code != 0 and job["status"] == "Failed" and job["host"] == "h3", job
    assert error["errorCode"] == "agent_lost" and "the agent of host 'h3' stopped heartbeating" in error["errorString"]
    assert "vmvault backup now c2" in error["recommendations"][0]
    assert lost_after < LEASE_S + 15, f"agent_lost after {lost_after:.1f} s"
    assert {vm: api.points(vm) for vm in ("a2", "c2")} == before, "a partial point became a recovery point"

    mark("agents stopped mid-backup")

    # ---- h3's agent restarted: it reconciles, its next backup works and restores, on h3 -----------
    agents = {**agents, "h1": stopped, "h3": start_agent("h3")}  # h1's stays stopped
    code, job = ended(admin.popen("backup", "now", "c2", "--wait"))
    assert code == 0 and job["status"] == "Completed" and job["host"] == "h3", job
    (point, *older) = api.points("c2")
    assert older == before["c2"]
    code, job = ended(restore(admin, "c2", point, targets["c2"]))
    assert code == 0 and job["operation"] == "Restore" and job["host"] == "h3", job
    assert_same_image(targets["c2"] / "disk0.raw", disks["c2"])
    # A file-recovery mount of a VM of h2 (a disk with file systems and known files) runs on h2,
    # by its agent, under its allowed folder; its files are readable there; the unmount runs there too.
    image = copy_image(build_disks()["disk1"], folder / "f2.raw")
    admin.ok("vm", "add", "f2", "--host", "h2", "--disk", str(image), "--format", "raw")
    # Under "Later", whose slot is 12 hours after the servers' clock: no scheduled backup beside this
    # one. (DefaultPolicy's 20:30 UTC fell between this machine's clock and theirs, 3 h on, when run at
    # 17:30-20:30 UTC; protected on their clock, it still fell in this part of the test when their
    # clock crossed 20:30.)
    admin.ok("protection", "enable", "--vm", "f2", "--vault", "v1", "--policy", "Later")
    code, job = ended(admin.popen("backup", "now", "f2", "--wait"))
    assert code == 0 and job["status"] == "Completed" and job["host"] == "h2", job
    where = restored / "f2-files"
    r = admin.ok("files", "mount", "f2", "--rp", api.points("f2")[0], "--mountpoint", str(where))
    session = r.json()
    assert session["host"] == "h2" and session["state"] == "Active" and session["mountpoint"] == str(where)
    assert api.job(r.stderr.split("as job ")[1].split()[0])["host"] == "h2"
    ext4 = where / "disk0-part5"
    assert (ext4 / "big.bin").read_bytes() == file_set("ext4", 1)["big.bin"]  # byte-identical, read on h2
    ended_sessions = admin.ok("files", "unmount", "f2").json()
    assert [(e["id"], e["state"]) for e in ended_sessions] == [(session["id"], "Ended")]
    assert mounts_under(where) == []

    mark("h3's agent restarted, backup and restore")

    # ---- the whole history: each slot once, each job on its VM's host, never two at once --------
    expected_slot = slot.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    history = [api.job(j["id"]) for j in api.jobs() if j["operation"] in ("Backup", "Restore")]
    scheduled = sorted(j["vm"] for j in history if j["extendedInfo"]["trigger"] == "Scheduled")
    assert scheduled == sorted(HOST_OF), f"each VM's slot exactly once: {scheduled}"
    for job in history:
        info = job["extendedInfo"]
        assert job["host"] == HOST_OF.get(job["vm"], "h2"), job  # x1 is h2's
        assert info["owner"]["pid"] in agent_pids[job["host"]], job  # run by that host's agent
        if info["trigger"] == "Scheduled":
            assert job["status"] == "Completed" and info["scheduledFor"] == expected_slot, job
    for vm in HOST_OF:
        spans = sorted((j["startTime"], j["endTime"]) for j in history if j["vm"] == vm)
        for (_start, end), (start, _end) in itertools.pairwise(spans):
            assert end <= start, f"two jobs of VM {vm} at once: {spans}"

    stopping = [b.proc, agents["h2"].proc, agents["h3"].proc]
    for proc in stopping:
        proc.send_signal(signal.SIGTERM)  # all at once; nothing runs: clean exits
    for proc in stopping:
        proc.wait(60)  # (once: a second SIGTERM after the handlers are restored would kill it)
    agent_logs = "".join(agent.stop() for agent in agents.values())
    assert [agent.proc.returncode for agent in agents.values()] == [0, 0, 0]
    logs = finish_serve(a) + finish_serve(b)
    assert "scheduler: took the scheduling lock" in logs
    assert pg_server.password not in logs + agent_logs
    assert not any(token in logs + agent_logs for token in [owner, *agent_tokens.values()])
    mark("history checked, everything stopped")
    print(f"takeover {takeover:.1f} s; slot done {slot_done - died:.1f} s after the leader's death; agent_lost "
          f"{lost_after:.1f} s after the agent's; " + "; ".join(phases))
