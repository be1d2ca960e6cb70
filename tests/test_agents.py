"""Agents on hypervisor hosts (`vmvault agent run`, service/agentrun.py; the server's side service/agentwork.py).

The fast tests check the contract: what a BackupAgent token may reach, the API version check,
claims by host, agent_lost and orphans in process, and the agent's refusal of plain http:// to a
non-loopback server. Real agents (processes with their own homes and host names, on a real
PostgreSQL 15) run in the fleet scenario, tests/test_fleet.py: two servers, three agents, nine VMs,
a killed agent's job ending agent_lost, a stopped agent's Cancelled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from api_support import sandbox
from helpers import PASSPHRASE, Cli

MiB = 1 << 20
LEASE_S = 6.0


# ---- fast: the contract -------------------------------------------------------------------------


def test_an_agent_of_another_api_version_is_refused_naming_both_versions_and_the_fix(tmp_path: Path) -> None:
    from vmvault.service import tokens

    with sandbox(tmp_path / "home") as box:
        _view, token = tokens.create_token(box.ctx, "BackupAgent", host="h1")
        body = {"version": "9.9", "apiVersion": 99, "bootId": "b", "pid": 1234}
        r = box.call("POST", "/api/v1/agents/h1/register", token, json=body)
        assert r.status_code == 409, r.text
        error = r.json()
        assert error["code"] == "agent_version_mismatch"
        assert "agent API version 99" in error["message"] and "speaks agent API version 1" in error["message"]
        assert "install the server's vmvault version" in error["hint"]
        assert box.call("GET", "/api/v1/vms", token).status_code == 403  # an agent token reads nothing
        r = box.call("POST", "/api/v1/agents/h1/register", token, json={**body, "apiVersion": 1})
        assert r.status_code == 200 and r.json()["apiVersion"] == 1


def test_token_create_binds_only_a_backup_agent_to_a_host(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    made = cli.ok("token", "create", "--role", "BackupAgent", "--host", "h1").json()
    assert made["role"] == "BackupAgent" and made["host"] == "h1" and made["token"].startswith("vmv_")
    r = cli.fails("token", "create", "--role", "BackupAgent")
    assert "bound to one host" in r.output and "--host NAME" in r.output
    r = cli.fails("token", "create", "--role", "BackupOperator", "--host", "h1")
    assert "--host binds only BackupAgent tokens" in r.output


def test_claims_follow_the_vms_host(tmp_path: Path) -> None:
    """A queued backup of a VM of h2: h1's agent and the server never claim it; h2's agent does,
    with everything but a passphrase."""
    from vmvault.errors import Busy, NotFound
    from vmvault.service import agentwork, backups, hostvms, jobs, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.service.worker import claim_next
    from vmvault.settings import Settings

    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        add_host_vm(ctx, "b1", "h2", ["/var/lib/h2/b1.raw"])  # not a file here: nothing is opened
        protection.enable_protection(ctx, "b1", "v1")
        job = backups.backup_now(ctx, "b1").job  # a VM of another host: queued, even without a serve
        assert job["status"] == "InProgress"
        found = {"libvirtUri": "qemu:///system", "libvirtDomains": [
            {"name": "web", "uuid": "u-web", "state": "running"}, "not a domain"]}  # fmt: skip
        for host in ("h1", "h2"):
            agentwork.register(ctx, host, {"version": "x", "apiVersion": 1, "bootId": "b", "pid": 1,
                                           "hypervisors": found})  # fmt: skip
        assert hostvms.discover_on_host(ctx, "h2") == [
            {"name": "web", "uuid": "u-web", "state": "running", "connect": "qemu:///system", "host": "h2"}]
        assert claim_next(ctx) is None
        assert agentwork.claim(ctx, "h1", 1) is None
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["jobId"] == job["id"]
        assert package["vm"]["disks"][0]["path"] == "/var/lib/h2/b1.raw"
        assert package["vault"]["storage"] == str(tmp_path / "v1") and package["previousPoint"] is None
        assert PASSPHRASE not in json.dumps(package)
        with pytest.raises(Exception, match="not run by the agent of host 'h1'"):
            agentwork.progress(ctx, "h1", job["id"], {}, None)
        assert agentwork.heartbeat(ctx, "h2", [job["id"]]) == {"cancel": []}

        # The manifest is the truth: a point the vault does not hold is never recorded.
        with pytest.raises(NotFound, match="has no recovery point 'feedfacefeedface'"):
            agentwork.finish(ctx, "h2", job["id"], {"status": "Completed", "recoveryPoint": "feedfacefeedface"})
        assert jobs.show_job(ctx, job["id"])["status"] == "InProgress"
        assert backups.list_recovery_points(ctx, "b1") == []

        # `job cancel` reaches the agent through its heartbeat.
        jobs.cancel_job(ctx, job["id"])
        assert agentwork.heartbeat(ctx, "h2", [job["id"]]) == {"cancel": [job["id"]]}
        ended = agentwork.finish(ctx, "h2", job["id"], {"status": "Cancelled", "error": {"code": "cancelled",
                                                         "message": "stopped", "recommendedAction": None}})
        assert ended["status"] == "Cancelled" and ended["host"] == "h2"
        with pytest.raises(Busy):  # ended: the agent is told to stop, nothing changes
            agentwork.progress(ctx, "h2", job["id"], {}, None)

        # A running VM of h2 by its QMP socket there: never probed from here, described by the agent.
        hostvms.add_host_qmp_vm(ctx, "q1", "h2", "/run/h2/q1.qmp")
        listed = {v["name"]: v for v in vms.list_vms_with_status(ctx)}
        assert listed["q1"]["powerState"] == "unknown" and listed["q1"]["agent"] == "on host h2"
        protection.enable_protection(ctx, "q1", "v1")
        queued = backups.backup_now(ctx, "q1").job
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["jobId"] == queued["id"] and package["vm"]["kind"] == "qmp"
        assert package["vm"]["disks"] == [] and package["vm"]["definition"]["describeOnHost"] is True


def test_a_restore_of_another_hosts_vm_is_queued_for_its_agent_alone(tmp_path: Path) -> None:
    """restore disks of a VM of h2: queued (nothing written here), claimed by h2's agent only, with
    the point, the target on h2 and the disks of h2's VMs; the agent's word on its files is checked."""
    from vmvault.catalog.models import VmRow
    from vmvault.errors import InvalidInput
    from vmvault.service import agentwork, backups, jobs, protection, restores, vaults, vms
    from vmvault.service.context import context
    from vmvault.service.worker import claim_next
    from vmvault.settings import Settings

    disk = tmp_path / "r1.raw"
    disk.write_bytes(os.urandom(MiB))
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "r1", [disk])
        protection.enable_protection(ctx, "r1", "v1")
        rp = backups.backup_now(ctx, "r1").result.rp_id  # backed up here, then the VM moves to h2
        with ctx.catalog.write() as s:
            row = s.get(VmRow, vms.show_vm(ctx, "r1")["id"])
            assert row is not None
            row.host = "h2"
        with pytest.raises(InvalidInput, match="not an absolute path on its host"):
            restores.restore_disks(ctx, "r1", rp, "relative/dir")
        target = tmp_path / "on-h2"
        outcome = restores.restore_disks(ctx, "r1", rp, target)
        job = outcome.job
        assert job["status"] == "InProgress" and job["operation"] == "Restore" and not target.exists()
        for host in ("h1", "h2"):
            agentwork.register(ctx, host, {"version": "x", "apiVersion": 1, "bootId": "b", "pid": 1})
        assert claim_next(ctx) is None  # the server's workers never run it
        assert agentwork.claim(ctx, "h1", 1) is None
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["jobId"] == job["id"] and package["operation"] == "Restore"
        assert package["restore"] == {"recoveryPoint": rp, "targetDir": str(target), "format": None, "force": False,
                                      "disks": None, "files": ["disk0.raw"]}  # fmt: skip
        assert package["hostDisks"] == [{"vm": "r1", "paths": [str(disk)]}]
        # On the agent: a file name from the server that is a path, or a disk of the host's VM, is refused.
        from vmvault.errors import PathNotAllowed
        from vmvault.service.paths import disk_owners

        with pytest.raises(InvalidInput, match="named a restored file"):
            restores.check_target_on_host(target, ["../../etc/passwd"], True, {})
        with pytest.raises(PathNotAllowed, match="is a disk of VM 'r1'"):
            restores.check_target_on_host(tmp_path, ["r1.raw"], True, disk_owners([("r1", [str(disk)])]))
        assert PASSPHRASE not in json.dumps(package)
        with pytest.raises(InvalidInput, match="files outside"):  # an agent's report is checked
            agentwork.finish(ctx, "h2", job["id"], {"status": "Completed", "files": ["/etc/passwd"]})
        ended = agentwork.finish(ctx, "h2", job["id"], {"status": "Completed", "files": [str(target / "disk0.raw")]})
        assert ended["status"] == "Completed" and ended["host"] == "h2"
        assert restores.follow_restore(ctx, job["id"]).result == [target / "disk0.raw"]
        lost = agentwork.lost_error(_job_row(ctx, job["id"]), "gone")
        assert f"vmvault restore disks r1 --rp {rp} --target-dir {target}" in lost["recommendedAction"]
        assert jobs.show_job(ctx, job["id"])["status"] == "Completed"


def _job_row(ctx: Any, job_id: str) -> Any:
    from vmvault.catalog import repos

    with ctx.catalog.read() as s:
        row = repos.get_job(s, job_id)
        s.expunge(row)
        return row


def test_a_silent_agents_jobs_end_agent_lost_and_the_pid_reaper_leaves_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmvault.catalog import repos
    from vmvault.catalog.models import HostRow
    from vmvault.service import agentwork, backups, jobs, protection, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.settings import Settings

    monkeypatch.setenv("VMVAULT_AGENT_LEASE_S", "3")
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        add_host_vm(ctx, "b1", "h2", ["/var/lib/h2/b1.raw"])
        protection.enable_protection(ctx, "b1", "v1")
        job_id = backups.backup_now(ctx, "b1").job["id"]
        agentwork.register(ctx, "h2", {"version": "x", "apiVersion": 1, "bootId": "other-boot", "pid": 1})
        assert agentwork.claim(ctx, "h2", 2**22 + 7) is not None  # a pid that does not run here
        assert jobs.reap_dead_jobs(ctx) == 0  # the pid/boot rules do not judge an agent's job
        assert agentwork.fail_lost_agents(ctx) == []  # its heartbeat is fresh
        with ctx.catalog.write() as s:
            row = s.get(HostRow, "h2")
            assert row is not None
            row.last_heartbeat = "2000-01-01T00:00:00.000000Z"
        assert agentwork.fail_lost_agents(ctx) == [job_id]
        job = jobs.show_job(ctx, job_id)
        assert job["status"] == "Failed" and job["error"]["code"] == "agent_lost"
        assert "host 'h2' stopped heartbeating" in job["error"]["message"]
        assert "vmvault backup now b1" in job["error"]["recommendedAction"]
        assert backups.backup_now(ctx, "b1").job["status"] == "InProgress"  # the VM is free again

        # An agent that is alive but no longer runs a job it claimed (its report of the end was lost).
        agentwork.register(ctx, "h2", {"version": "x", "apiVersion": 1, "bootId": "other-boot", "pid": 1})
        package = agentwork.claim(ctx, "h2", 2**22 + 7)
        assert package is not None
        assert agentwork.heartbeat(ctx, "h2", []) == {"cancel": []}  # just claimed: not an orphan yet
        assert jobs.show_job(ctx, package["jobId"])["status"] == "InProgress"
        with ctx.catalog.write() as s:
            repos.update_job_details(s, package["jobId"], {**package["details"], "agentHost": "h2",
                                                           "claimedAt": "2000-01-01T00:00:00.000000Z"})
        agentwork.heartbeat(ctx, "h2", [])
        orphan = jobs.show_job(ctx, package["jobId"])
        assert orphan["status"] == "Failed" and "no longer runs this job" in orphan["error"]["message"]


def test_agent_refuses_plain_http_to_a_non_loopback_server_and_a_token_in_argv(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home", passphrase=None, extra_env={"VMVAULT_TOKEN": "vmv_x"})
    r = cli.fails("--server", "http://192.0.2.10:8080", "agent", "run", "--host", "h1")
    assert "not a loopback address" in r.output and "https://192.0.2.10:8080" in r.output
    r = Cli(home=tmp_path / "home", passphrase=None).fails("--server", "http://127.0.0.1:9", "agent", "run",
                                                             "--host", "h1")  # fmt: skip
    assert "VMVAULT_TOKEN or --token-file" in r.output
    r = cli.fails("agent", "run", "--host", "h1", "--token", "vmv_x")
    assert "--token" in r.output  # no such option: a token is never an argument


# ---- real agents ----------------------------------------------------------------------------------
# Agent is what tests/test_fleet.py and tests/test_agent_restore_vm.py run.


class Agent:
    """`vmvault agent run` as a child process on its own home."""

    allowed: list[Path] = []  # --allow-disks of every agent (set by the scenario)
    restores: list[Path] = []  # --allow-restores of every agent

    def __init__(self, cli: Cli, server: str, host: str) -> None:
        self.cli, self.host = cli, host
        allow = [a for d in self.allowed for a in ("--allow-disks", str(d))]
        allow += [a for d in self.restores for a in ("--allow-restores", str(d))]
        self.proc = cli.popen("--server", server, "agent", "run", "--host", host, *allow, json_output=False)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log = self.proc.stderr.read() if self.proc.stderr and not self.proc.stderr.closed else ""
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return log
