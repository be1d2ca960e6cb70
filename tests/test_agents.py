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
from helpers import PASSPHRASE, Cli, assert_same_image, far_time_zone, stop_process, wait_for
from test_scheduler import Serve
from vmvault.service.agentwork import API_VERSION as API  # what agents of this version speak

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
        assert "agent API version 99" in error["message"] and f"speaks agent API version {API}" in error["message"]
        assert "install the server's vmvault version" in error["hint"]
        assert box.call("GET", "/api/v1/vms", token).status_code == 403  # an agent token reads nothing
        r = box.call("POST", "/api/v1/agents/h1/register", token, json={**body, "apiVersion": API})
        assert r.status_code == 200 and r.json()["apiVersion"] == API
        r = box.call("POST", "/api/v1/agents/h1/heartbeat", token, json={"running": [], "hypervisors": _domains("x")})
        assert r.status_code == 200 and r.json() == {"cancel": [], "endSessions": []}, r.text
        from vmvault.service import hosts

        assert hosts.show_host(box.ctx, "h1")["details"]["hypervisors"]["libvirtDomains"][0]["state"] == "x"


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
            agentwork.register(ctx, host, {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1,
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

def _backed_up_here_then_moved(ctx: Any, storage: Path, disk: Path, tracking: dict[str, str] | None = None) -> str:
    """VM r1 of disk, protected in a new vault v1 and backed up on this host, then moved to host h2
    (with its change tracking, if given); the point's id."""
    from vmvault.catalog.models import VmRow
    from vmvault.service import backups, protection, vaults, vms

    vaults.create_vault(ctx, "v1", storage_dir=storage)
    vms.add_vm(ctx, "r1", [disk])
    protection.enable_protection(ctx, "r1", "v1")
    rp = str(backups.backup_now(ctx, "r1").result.rp_id)
    with ctx.catalog.write() as s:
        row = s.get(VmRow, vms.show_vm(ctx, "r1")["id"])
        assert row is not None
        row.host = "h2"
        if tracking is not None:
            row.definition = {**(row.definition or {}), "tracking": tracking}
    return rp



def test_a_restore_of_another_hosts_vm_is_queued_for_its_agent_alone(tmp_path: Path) -> None:
    """restore disks of a VM of h2: queued (nothing written here), claimed by h2's agent only, with
    the point, the target on h2 and the disks of h2's VMs; the agent's word on its files is checked."""
    from vmvault.errors import InvalidInput
    from vmvault.service import agentwork, jobs, restores
    from vmvault.service.context import context
    from vmvault.service.worker import claim_next
    from vmvault.settings import Settings

    disk = tmp_path / "r1.raw"
    disk.write_bytes(os.urandom(MiB))
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        rp = _backed_up_here_then_moved(ctx, tmp_path / "v1", disk)
        with pytest.raises(InvalidInput, match="not an absolute path on its host"):
            restores.restore_disks(ctx, "r1", rp, "relative/dir")
        target = tmp_path / "on-h2"
        outcome = restores.restore_disks(ctx, "r1", rp, target)
        job = outcome.job
        assert job["status"] == "InProgress" and job["operation"] == "Restore" and not target.exists()
        for host in ("h1", "h2"):
            agentwork.register(ctx, host, {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1})
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


def test_a_replace_disks_of_another_hosts_vm_is_queued_for_its_agent_and_checked_there(tmp_path: Path) -> None:
    """replace-disks of a VM of h2 (through the API): queued (nothing written here), claimed by h2's
    agent only, with the point and the VM's disks as the catalog has them. The agent's plan refuses a disk outside its
    allowed disk roots, a disk of another VM of its host, a QMP socket outside them, and a symlink
    swapped in after the plan; a completed replace records the disks the server named (not the
    agent's word) and forgets the VM's changed-block tracking."""
    from vmvault.catalog.models import VmRow
    from vmvault.errors import PathNotAllowed
    from vmvault.service import agentwork, jobs, restore_vm
    from vmvault.service.paths import build_policy
    from vmvault.service.worker import claim_next
    from vmvault.settings import Settings

    disks = tmp_path / "disks"
    disks.mkdir()
    disk = disks / "r1.raw"
    disk.write_bytes(os.urandom(MiB))
    with sandbox(tmp_path / "home") as box:
        ctx = box.ctx
        rp = _backed_up_here_then_moved(ctx, tmp_path / "v1", disk, tracking={"chain": "c"})
        before = disk.read_bytes()
        r = box.call("POST", "/api/v1/items/r1/restore/replace-disks", box.token("BackupOperator", "v1"),
                     json={"rp": "latest"})  # fmt: skip
        assert r.status_code == 202, r.text
        job = jobs.show_job(ctx, r.json()["name"])
        assert job["status"] == "InProgress" and job["operation"] == "Restore" and disk.read_bytes() == before
        for host in ("h1", "h2"):
            agentwork.register(ctx, host, {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1})
        assert claim_next(ctx) is None and agentwork.claim(ctx, "h1", 1) is None
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["jobId"] == job["id"] and package["operation"] == "Restore"
        assert package["restore"] == {"mode": "replace", "recoveryPoint": rp, "disks": [
            {"name": "disk0", "path": str(disk), "format": "raw", "bytes": package["restore"]["disks"][0]["bytes"]}]}
        assert PASSPHRASE not in json.dumps(package)

        # On the agent: only paths in its allowed disk roots, resolved.
        agent = Settings(home=tmp_path / "agent")
        elsewhere = build_policy(agent, disks=[str(tmp_path / "other")])
        with pytest.raises(PathNotAllowed, match=f"disk path {disk} is outside .* on host of VM 'r1'"):
            restore_vm.plan_replace_on_host(package, elsewhere)
        policy = build_policy(agent, disks=[str(disks)])
        shared = {**package, "hostDisks": [{"vm": "r2", "paths": [str(disk)]}]}
        with pytest.raises(PathNotAllowed, match="is a disk of VM 'r2'"):
            restore_vm.plan_replace_on_host(shared, policy)
        qmp = {**package, "vm": {**package["vm"], "definition": {"qmp": str(tmp_path / "qmp.sock")}}}
        with pytest.raises(PathNotAllowed, match=r"qmp\.sock is outside"):
            restore_vm.plan_replace_on_host(qmp, policy)
        plan, recheck = restore_vm.plan_replace_on_host(package, policy)
        assert plan.disks == [("disk0", disk, "raw")] and plan.vm_id == package["vm"]["id"]
        recheck(disk)
        disk.rename(tmp_path / "moved.raw")
        disk.symlink_to(tmp_path / "moved.raw")  # swapped for a symlink leading out after the plan
        with pytest.raises(PathNotAllowed, match="outside"):
            recheck(disk)
        disk.unlink()
        (tmp_path / "moved.raw").rename(disk)

        lost = agentwork.lost_error(_job_row(ctx, job["id"]), "gone")
        assert f"vmvault restore replace-disks r1 --rp {rp}" in lost["recommendedAction"], lost
        assert str(disk) in lost["message"] and "vmvault-original" in lost["message"], lost
        ended = agentwork.finish(ctx, "h2", job["id"], {"status": "Completed", "files": ["/etc/passwd"]})
        assert ended["status"] == "Completed" and ended["host"] == "h2"
        followed = restore_vm.follow_replace(ctx, job["id"]).result
        assert followed == {"vm": "r1", "point": rp, "replaced": [str(disk)]}, followed
        with ctx.catalog.read() as s:
            row = s.get(VmRow, package["vm"]["id"])
            assert row is not None and row.definition.get("tracking") is None, row.definition


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
        agentwork.register(ctx, "h2", {"version": "x", "apiVersion": API, "bootId": "other-boot", "pid": 1})
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
        agentwork.register(ctx, "h2", {"version": "x", "apiVersion": API, "bootId": "other-boot", "pid": 1})
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


class _Run:
    """backups.BackupRun of a backup run here in the test (what the agent's AgentRun is on a host)."""

    def __init__(self) -> None:
        import threading

        self.cancel = threading.Event()
        self.details: dict[str, Any] | None = {}
        self.warnings: list[dict[str, Any]] = []

    def progress(self, progress: Any) -> None:
        pass


def _backup_as_agent(ctx: Any, host: str, vm: str) -> tuple[str, str]:
    """Claim vm's queued job for host's agent and publish its point with the engine (the agent's part):
    (job id, point id); nothing is reported to the catalog."""
    from vmvault.service import agentwork, backups
    from vmvault.service.backups import LocalBooks, plan_backup
    from vmvault.service.quiesce import budget_for
    from vmvault.service.vaultio import opened_vault

    job_id = backups.backup_now(ctx, vm).job["id"]
    package = agentwork.claim(ctx, host, 2**22 + 7)
    assert package is not None and package["jobId"] == job_id
    plan = plan_backup(ctx, vm, package["retainUntil"])
    with opened_vault(ctx, plan.vault) as vault:
        manifest = backups.run_backup_into(vault, plan, job_id, _Run(), LocalBooks(ctx, plan), budget_for(ctx, plan),
                                           str(ctx.settings.home))  # fmt: skip
    return job_id, manifest.rp_id


def test_a_late_finish_after_agent_lost_adopts_the_published_point_and_invents_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent cut off from the server completed its backup; meanwhile the server failed the job
    agent_lost. Its late finish adopts the point the vault holds (the manifest is the truth), never
    a point that is not there or that is another job's."""
    from vmvault.catalog import repos
    from vmvault.catalog.models import HostRow
    from vmvault.errors import IntegrityError, NotFound
    from vmvault.service import agentwork, backups, jobs, protection, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.service.vaultio import opened_vault
    from vmvault.settings import Settings

    monkeypatch.setenv("VMVAULT_AGENT_LEASE_S", "3")
    disk = tmp_path / "c1.raw"
    disk.write_bytes(os.urandom(2 * MiB))
    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        add_host_vm(ctx, "c1", "h1", [str(disk)])
        protection.enable_protection(ctx, "c1", "v1")
        agentwork.register(ctx, "h1", {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1})
        first_job, first_rp = _backup_as_agent(ctx, "h1", "c1")
        agentwork.finish(ctx, "h1", first_job, {"status": "Completed", "recoveryPoint": first_rp})
        disk.write_bytes(os.urandom(MiB) + disk.read_bytes()[MiB:])
        job_id, rp = _backup_as_agent(ctx, "h1", "c1")  # published; then the agent is cut off
        with ctx.catalog.write() as s:
            row = s.get(HostRow, "h1")
            assert row is not None
            row.last_heartbeat = "2000-01-01T00:00:00.000000Z"
        assert agentwork.fail_lost_agents(ctx) == [job_id]
        assert jobs.show_job(ctx, job_id)["error"]["code"] == "agent_lost"

        # The attacker's (or a confused agent's) versions: nothing is recorded, the job stays Failed.
        with pytest.raises(NotFound, match="has no recovery point 'feedfacefeedface'"):
            agentwork.finish(ctx, "h1", job_id, {"status": "Completed", "recoveryPoint": "feedfacefeedface"})
        with pytest.raises(IntegrityError, match=f"'{first_rp}' in vault 'v1' is not the point of job"):
            agentwork.finish(ctx, "h1", job_id, {"status": "Completed", "recoveryPoint": first_rp})
        with pytest.raises(NotFound, match="not run by the agent of host 'h2'"):
            agentwork.finish(ctx, "h2", job_id, {"status": "Completed", "recoveryPoint": rp})
        assert jobs.show_job(ctx, job_id)["status"] == "Failed"
        assert [p["id"] for p in backups.list_recovery_points(ctx, "c1")] == [first_rp]

        late = {"status": "Completed", "recoveryPoint": rp, "progress": {"bytesRead": 2 * MiB},
                "warnings": [{"code": "quiesce_failed", "message": "crash-consistent"}]}  # fmt: skip
        ended = agentwork.finish(ctx, "h1", job_id, late)
        assert ended["status"] == "CompletedWithWarnings" and ended["progress"]["percent"] == 100.0, ended
        details = _job_row(ctx, job_id).details
        assert details["recoveryPoint"] == rp, details
        assert "after the server had failed it agent_lost" in details["reconciled"], details
        assert agentwork.finish(ctx, "h1", job_id, late)["status"] == "CompletedWithWarnings"  # said twice: same
        listed = [p["id"] for p in backups.list_recovery_points(ctx, "c1")]
        with ctx.catalog.read() as s:
            vault_row = repos.get_vault(s, "v1")
            s.expunge(vault_row)
        with opened_vault(ctx, vault_row) as vault:
            assert sorted(vault.list_recovery_points()) == sorted(listed) == sorted([first_rp, rp])


def _domains(state: str, uuid: str = "u-web") -> dict[str, Any]:
    return {"libvirtUri": "qemu:///system", "libvirtDomains": [{"name": "web", "uuid": uuid, "state": state}]}


def test_a_libvirt_vm_follows_its_running_domain_to_the_host_it_was_migrated_to(tmp_path: Path) -> None:
    """A libvirt domain is backed up by the host where it runs: after a live migration (every host of a
    cluster may define it) its VM's jobs go to the host whose agent reports it running."""
    from vmvault.catalog import repos
    from vmvault.service import agentwork, backups, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_libvirt_vm
    from vmvault.settings import Settings

    def beat(host: str, state: str, uuid: str = "u-web") -> None:
        agentwork.heartbeat(ctx, host, [], hypervisors=_domains(state, uuid))

    def host_of(vm: str) -> str:
        return str(vms.show_vm(ctx, vm)["host"])

    with context(Settings(home=tmp_path / "home", passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        add_host_libvirt_vm(ctx, "web", "h1", "web")  # its UUID is not known yet: matched by name
        protection.enable_protection(ctx, "web", "v1")
        for host in ("h1", "h2", "h3"):
            state = "running" if host != "h3" else "shut off"
            agentwork.register(ctx, host, {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1,
                                           "hypervisors": _domains(state)})  # fmt: skip
        assert host_of("web") == "h1"  # h2 says running too, but so does its own host: it stays
        beat("h1", "shut off")  # migrated to h2: h1 defines it, shut off
        assert host_of("web") == "h1"  # nobody reported it running since
        beat("h2", "running")
        assert host_of("web") == "h2"
        job = backups.backup_now(ctx, "web").job
        assert agentwork.claim(ctx, "h1", 7) is None
        package = agentwork.claim(ctx, "h2", 7)
        assert package is not None and package["jobId"] == job["id"]
        beat("h2", "shut off")
        beat("h1", "running")  # migrated back while h2's job runs: the VM stays until it ends
        assert host_of("web") == "h2"
        agentwork.finish(ctx, "h2", job["id"], {"status": "Failed", "error": {"code": "x", "message": "stop"}})
        beat("h1", "running")
        assert host_of("web") == "h1"
        # Once its UUID is known, a domain of the same name elsewhere (another domain) does not take it.
        with ctx.catalog.write() as s:
            row = repos.get_vm(s, "web")
            row.definition = {**row.definition, "uuid": "u-web"}
        beat("h1", "shut off")
        beat("h3", "running", uuid="u-other")
        assert host_of("web") == "h1"
        beat("h3", "running")
        assert host_of("web") == "h3"


def test_backoff_doubles_to_its_bound_with_jitter() -> None:
    from vmvault.service.agentrun import Backoff

    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(40)]
    for step, delay in enumerate(delays):
        base = min(30.0, 2.0**step)
        assert base / 2 <= delay <= base, (step, delay)
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered: a fleet cut off together spreads out
    assert backoff.reset() and not backoff.reset() and backoff.next_delay() <= 1.0


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


# ---- an agent cut off from its server (real processes, SQLite: no PostgreSQL needed) -------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _agent_proc(cli: Cli, server: str, host: str, log: Path, *allow: Path) -> subprocess.Popen[str]:
    """`vmvault agent run` with its log in a file (read while it runs)."""
    args = [a for d in allow for a in ("--allow-disks", str(d), "--allow-restores", str(d))]
    argv = cli.argv("--server", server, "agent", "run", "--host", host, *args, json_output=False)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.Popen(argv, env=cli.env(), stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL,
                                text=True)  # fmt: skip


def _fail_agent_lost(home: Path, host: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the leader does to an agent silent for a lease (here while the one server is down)."""
    from vmvault.catalog.models import HostRow
    from vmvault.service import agentwork
    from vmvault.service.context import context
    from vmvault.settings import Settings

    monkeypatch.setenv("VMVAULT_AGENT_LEASE_S", "2")
    with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx:
        with ctx.catalog.write() as s:
            row = s.get(HostRow, host)
            assert row is not None
            row.last_heartbeat = "2000-01-01T00:00:00.000000Z"
        return agentwork.fail_lost_agents(ctx)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_agent_cut_off_from_its_server_waits_goes_on_and_its_point_is_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent starts before its server and waits for it (backoff), registers when it comes and runs
    a backup; the server dies mid-backup: the job goes on to publish its point, the agent keeps
    reporting its end, and the server, back after another server failed the job agent_lost,
    adopts the point (the catalog agrees with the vault; the point restores byte-identical). A
    refused token exits at once."""
    from vmvault.service import protection, tokens, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.settings import Settings

    home, disk = tmp_path / "srv", tmp_path / "c1.raw"
    halves = [os.urandom(MiB), os.urandom(MiB)]
    disk.write_bytes(halves[0] + halves[1] + bytes(2 * MiB))
    with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx:
        # DefaultPolicy's slot hours away: no scheduled backup beside the test's (CI runs at any hour)
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1", time_zone=far_time_zone())
        add_host_vm(ctx, "c1", "h1", [str(disk)])
        protection.enable_protection(ctx, "c1", "v1")
        _view, token = tokens.create_token(ctx, "BackupAgent", host="h1")
    agent_home = tmp_path / "agent-h1"
    assert Cli(home=agent_home).vault_import(tmp_path / "v1").ok
    pause = tmp_path / "pause"
    pause.mkdir()
    agent_cli = Cli(home=agent_home, passphrase=None,
                    extra_env={"VMVAULT_TOKEN": token, "VMVAULT_TEST_PAUSE_AFTER_DEDUP": str(pause)})  # fmt: skip
    port = _free_port()
    server, log = f"http://127.0.0.1:{port}", tmp_path / "agent.log"
    admin, serves = Cli(home=home), []
    agent = _agent_proc(agent_cli, server, "h1", log, tmp_path)
    try:
        # No server yet: the agent waits (it used to exit 69), saying so once per backoff step.
        wait_for(lambda: "try 2, next in" in log.read_text(), 30, "the agent to retry", interval=0.2)
        assert agent.poll() is None, log.read_text()
        serves.append(Serve(admin, "--listen", f"127.0.0.1:{port}"))
        wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "the agent to register", interval=0.5)
        refused = _agent_proc(Cli(home=tmp_path / "agent-bad", passphrase=None, extra_env={"VMVAULT_TOKEN": "vmv_x"}),
                              server, "h1", tmp_path / "bad.log")  # fmt: skip
        assert refused.wait(30) != 0, "a refused token must stop the agent at once"
        said = (tmp_path / "bad.log").read_text()
        assert "token" in said.lower() and "try 2" not in said and "vmv_x" not in said, said

        proc = admin.popen("backup", "now", "c1", "--wait")
        out, _err = proc.communicate(timeout=300)
        code, job = proc.returncode, json.loads(out)
        assert code == 0 and job["properties"]["status"] == "Completed" and job["properties"]["host"] == "h1", job

        # The second backup (the halves swapped: every chunk is a dedup hit) pauses at its first hit;
        # the server dies there; the job goes on and publishes its point while the server is down.
        disk.write_bytes(halves[1] + halves[0] + bytes(2 * MiB))
        job_id = admin.ok("backup", "now", "c1", "--no-wait").json()["name"]
        wait_for(lambda: (pause / "paused").exists(), 60, "the agent to be mid-backup", interval=0.2)
        assert serves.pop().stop() == 0
        (pause / "resume").touch()
        wait_for(lambda: f"job {job_id}: reporting its end (Completed) failed" in log.read_text(), 60,
                 "the agent to report the end to a server that is down", interval=0.2)  # fmt: skip
        assert _fail_agent_lost(home, "h1", monkeypatch) == [job_id]  # as the leader would, a lease later
        serves.append(Serve(admin, "--listen", f"127.0.0.1:{port}"))
        wait_for(lambda: admin.ok("job", "show", job_id).json()["properties"]["status"] == "Completed", 60,
                 "the late finish to be adopted", interval=0.5)  # fmt: skip
        points = admin.point_ids("c1")
        assert len(points) == 2
        with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx:
            detail = _job_row(ctx, job_id).details
        # Adopted by the restarted server's reconcile (its start) or by the agent's late finish, whichever
        # came first; the other finds it done (the agent's report is not refused).
        assert detail["recoveryPoint"] == points[-1] and "the agent of host 'h1'" in detail["reconciled"], detail
        wait_for(lambda: f"job {job_id}: backup of c1 published point {points[-1]}" in log.read_text(), 30,
                 "the agent to hear that its end is recorded", interval=0.2)  # fmt: skip
        assert "its end was not recorded" not in log.read_text()
        stored = sorted(p.name for p in (tmp_path / "v1" / "points").iterdir())
        assert stored == sorted(points), (stored, points)
        restored = tmp_path / "restored"
        assert admin.restore_disks("c1", points[-1], restored).ok
        assert_same_image(restored / "disk0.raw", disk)
    finally:
        for serve in serves:
            serve.stop()
        stop_process(agent)
    assert agent.returncode == 0, log.read_text()
