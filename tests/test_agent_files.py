"""File recovery of a VM of another host: `files mount`/`files unmount` queue a job its host's agent
runs there (service/hostfiles.py on the server, service/agentfiles.py on the agent).

The contract test runs in process (the server's side, the agent's checks of hostile input); the
scenario runs a real `vmvault serve` (SQLite) and a real `vmvault agent run` (its own home, host h1)
with real FUSE/loop mounts of a cached disk image with known files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from files_support import build_disks, check_volume_files, file_set, mounts_under, wait_until_clean
from helpers import PASSPHRASE, Cli, copy_image, far_time_zone, first_run_owner_token, wait_for
from test_scheduler import Serve
from vmvault.service.agentwork import API_VERSION as API  # what agents of this version speak

MiB = 1 << 20


def _session_report(sid: str, rp: str, mountpoint: str, state: str = "Active", **extra: Any) -> dict[str, Any]:
    volume = {"disk": "disk0", "partition": 1, "fstype": "ext4", "path": f"{mountpoint}/disk0-part1",
              "status": "mounted", "driver": "kernel", "reason": "", "size": MiB}  # fmt: skip
    return {"id": sid, "recoveryPoint": rp, "state": state, "mountpoint": mountpoint,
            "expires": "2099-01-01T00:00:00.000000Z", "ended": None, "endReason": None, "volumes": [volume],
            **extra}  # fmt: skip


def test_a_mount_of_another_hosts_vm_is_its_agents_and_its_reports_are_checked(tmp_path: Path) -> None:
    """files mount of a VM of h2: queued (nothing mounted here), claimed by h2's agent only; its
    session reports are checked, recorded with the host, ended by the agent or as agent_lost."""
    from vmvault.catalog.models import HostRow, VmRow
    from vmvault.errors import AlreadyExists, InvalidInput, PathNotAllowed
    from vmvault.service import agentfiles, agentwork, backups, files, jobs, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.service.paths import build_policy
    from vmvault.settings import Settings

    disk = tmp_path / "m1.raw"
    disk.write_bytes(os.urandom(MiB))
    settings = Settings(home=tmp_path / "home", passphrase=PASSPHRASE)
    with context(settings) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "m1", [disk])
        protection.enable_protection(ctx, "m1", "v1")
        rp = backups.backup_now(ctx, "m1").result.rp_id  # backed up here, then the VM moves to h2
        api = ctx.remote(build_policy(settings, restores=[str(tmp_path / "restores")]))
        with pytest.raises(PathNotAllowed, match="/etc/m1"):  # an API caller's mount point: in the server's roots
            files.mount_point(api, "m1", rp, mountpoint="/etc/m1")
        with ctx.catalog.write() as s:
            row = s.get(VmRow, vms.show_vm(ctx, "m1")["id"])
            assert row is not None
            row.host = "h2"
        with pytest.raises(InvalidInput, match="not an absolute path on its host"):
            files.mount_point(ctx, "m1", rp, mountpoint="relative/mnt")
        where = "/srv/h2/mnt/m1"
        job = files.mount_point(ctx, "m1", rp, mountpoint=where, duration="2h").job
        assert job["status"] == "InProgress" and job["operation"] == "FileRecoveryMount"
        assert not Path(where).exists() and files.list_sessions(ctx, "m1") == []
        for host in ("h1", "h2"):
            agentwork.register(ctx, host, {"version": "x", "apiVersion": API, "bootId": "b", "pid": 1})
        assert agentwork.claim(ctx, "h1", 1) is None
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["jobId"] == job["id"] and package["operation"] == "FileRecoveryMount"
        assert package["files"] == {"recoveryPoint": rp, "mountpoint": where, "durationS": 7200, "disks": ["disk0"]}
        assert PASSPHRASE not in json.dumps(package)

        # The agent's word is checked: a bad session id, a volume outside its mount point.
        for bad in (_session_report("../../x", rp, where),
                    {**_session_report("abcdef012345", rp, where),
                     "volumes": [{"disk": "disk0", "path": "/etc", "status": "mounted"}]}):  # fmt: skip
            with pytest.raises(InvalidInput):
                agentwork.finish(ctx, "h2", job["id"], {"status": "Completed", "sessions": [bad]})
        assert files.list_sessions(ctx, "m1") == []
        ended = agentwork.finish(ctx, "h2", job["id"], {"status": "Completed",
                                                        "sessions": [_session_report("abcdef012345", rp, where)]})
        assert ended["status"] == "Completed" and ended["host"] == "h2"
        [shown] = files.list_sessions(ctx, "m1")
        assert shown["host"] == "h2" and shown["mountpoint"] == where and shown["paths"] == [f"{where}/disk0-part1"]
        with pytest.raises(InvalidInput, match=f"mounted on host h2 at {where}") as browse:
            files.browse(ctx, "m1", "")
        assert f"on host h2, under {where}" in str(browse.value.hint)
        with pytest.raises(AlreadyExists, match="already mounted on /srv/h2/mnt/m1 on host h2"):
            files.mount_point(ctx, "m1", rp, mountpoint="/srv/h2/elsewhere")
        assert files.reap(ctx) == []  # the server never tears down a mount of another host

        # Unmount: queued for h2's agent, which reports the session ended.
        unmount = files.unmount(ctx, "m1").job
        package = agentwork.claim(ctx, "h2", 4242)
        assert package is not None and package["files"] == {"sessions": ["abcdef012345"]}
        gone = _session_report("abcdef012345", rp, where, state="Ended", endReason="Unmounted",
                               ended="2026-01-01T00:00:00.000000Z")  # fmt: skip
        agentwork.finish(ctx, "h2", unmount["id"], {"status": "Completed", "sessions": [gone]})
        [shown] = files.list_sessions(ctx, "m1", include_ended=True)
        assert shown["state"] == "Ended" and shown["endReason"] == "Unmounted"

        # The agent's heartbeat reports a session its owner ended at expiry (on h2, on its own).
        job = files.mount_point(ctx, "m1", rp).job
        assert agentwork.claim(ctx, "h2", 4242) is not None
        agentwork.finish(ctx, "h2", job["id"], {"status": "Completed",
                                                "sessions": [_session_report("fedcba987654", rp, "/h2home/m")]})
        expired = _session_report("fedcba987654", rp, "/h2home/m", state="Ended", endReason="Expired",
                                  ended="2026-01-01T00:00:00.000000Z")  # fmt: skip
        assert agentwork.heartbeat(ctx, "h2", [], [expired]) == {"cancel": [], "endSessions": []}
        shown = files.list_sessions(ctx, "m1", include_ended=True)[0]
        assert (shown["id"], shown["state"], shown["endReason"]) == ("fedcba987654", "Ended", "Expired")

        # A lost agent's sessions end agent_lost; a live one it still reports is then ended by it.
        job = files.mount_point(ctx, "m1", rp).job
        assert agentwork.claim(ctx, "h2", 4242)["files"]["mountpoint"] is None  # type: ignore[index]
        agentwork.finish(ctx, "h2", job["id"], {"status": "Completed",
                                                "sessions": [_session_report("0123456789ab", rp, "/h2home/m")]})
        live = _session_report("0123456789ab", rp, "/h2home/m")
        assert agentwork.heartbeat(ctx, "h2", [], [live]) == {"cancel": [], "endSessions": []}  # unchanged
        assert files.list_sessions(ctx, "m1")[0]["state"] == "Active"
        with ctx.catalog.write() as s:
            host_row = s.get(HostRow, "h2")
            assert host_row is not None
            host_row.last_heartbeat = "2000-01-01T00:00:00.000000Z"
        agentwork.fail_lost_agents(ctx)
        shown = files.list_sessions(ctx, "m1", include_ended=True)[0]
        assert shown["state"] == "Ended" and shown["endReason"] == "agent_lost", shown
        answer = agentwork.heartbeat(ctx, "h2", [], [_session_report("0123456789ab", rp, "/h2home/m")])
        assert answer["endSessions"] == ["0123456789ab"]
        assert jobs.show_job(ctx, job["id"])["host"] == "h2"

    # On the agent: a mount point named by the server lies in its allowed folders, symlinks resolved.
    allowed = tmp_path / "mnt-ok"
    allowed.mkdir()
    (allowed / "link").symlink_to(tmp_path / "outside")
    policy = build_policy(Settings(home=tmp_path / "agent-home"), restores=[str(allowed)])
    assert agentfiles.checked_mountpoint(str(allowed / "m1"), policy, "m1") == allowed / "m1"
    for raw in ("relative", f"{allowed}/../x", f"{allowed}//m1", f"{allowed}/m1/", f"{allowed}/./m1"):
        with pytest.raises(InvalidInput, match="not a normalised absolute path"):
            agentfiles.checked_mountpoint(raw, policy, "m1")
    for raw in (str(allowed / "link" / "m1"), "/etc/m1"):
        with pytest.raises(PathNotAllowed, match="is outside the allowed") as refused:
            agentfiles.checked_mountpoint(raw, policy, "m1")
        assert "agent run --allow-restores DIR" in str(refused.value.hint)
    with pytest.raises(InvalidInput, match="invalid disk name"):
        agentfiles._name("disk", "../../etc")


# ---- the scenario: a real serve and a real agent ------------------------------------------------


def _agent(cli: Cli, server: str, allowed: Path) -> subprocess.Popen[str]:
    return cli.popen("--server", server, "agent", "run", "--host", "h1", "--allow-restores", str(allowed),
                     json_output=False)  # fmt: skip


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _owner_pid(agent_home: Path, session_id: str) -> int:
    """The session owner's pid, from the agent's own home catalog (the server never sees it)."""
    from vmvault.recovery.session import get_row
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=agent_home)) as ctx:
        row = get_row(ctx, session_id)
        assert row is not None and row.owner_pid > 0
        return row.owner_pid


def _state(admin: Cli, session_id: str) -> tuple[str, str | None]:
    found = [s for s in admin.ok("files", "list", "f1", "--all").json() if s["id"] == session_id]
    return (found[0]["state"], found[0]["endReason"]) if found else ("", None)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_files_mount_of_a_vm_of_host_h1_runs_on_its_agent_and_unmounts_there(tmp_path: Path) -> None:
    from vmvault.catalog.models import VmRow
    from vmvault.service import backups, protection, vaults, vms
    from vmvault.service.context import context
    from vmvault.settings import Settings

    disk = copy_image(build_disks()["disk1"], tmp_path / "f1-disk1.raw")  # MBR: FAT16 and ext4, known files
    srv = tmp_path / "srv"
    with context(Settings(home=srv, passphrase=PASSPHRASE)) as ctx:
        # DefaultPolicy's slot hours away: no scheduled backup beside the test's (CI runs at any hour)
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1", time_zone=far_time_zone())
        vms.add_vm(ctx, "f1", [disk])
        protection.enable_protection(ctx, "f1", "v1")
        rp = backups.backup_now(ctx, "f1").result.rp_id  # then f1 moves to host h1
        with ctx.catalog.write() as s:
            row = s.get(VmRow, vms.show_vm(ctx, "f1")["id"])
            assert row is not None
            row.host = "h1"
    admin = Cli(home=srv, passphrase=None)
    serve = Serve(Cli(home=srv))
    agent: subprocess.Popen[str] | None = None
    try:
        owner = first_run_owner_token(serve.proc.stdout.readline() if serve.proc.stdout else "")
        server = serve.announce.split("listening on ")[1].split()[0]
        token = admin.ok("token", "create", "--role", "BackupAgent", "--host", "h1").json()["token"]
        agent_home = tmp_path / "agent-h1"
        assert Cli(home=agent_home).vault_import(tmp_path / "v1").ok  # this host's key opens the vault
        allowed = tmp_path / "mnt-ok"
        agent_cli = Cli(home=agent_home, passphrase=None, extra_env={"VMVAULT_TOKEN": token})
        agent = _agent(agent_cli, server, allowed)
        wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "agent h1 to register", interval=0.3)

        # A mount point outside the agent's allowed folders: refused on h1, nothing mounted there.
        outside = tmp_path / "outside" / "f1"
        r = admin.fails("files", "mount", "f1", "--rp", rp, "--mountpoint", str(outside))
        assert "path_not_allowed" in r.output and str(outside) in r.output, r.output
        assert "agent run --allow-restores DIR" in r.output
        assert not outside.exists() and admin.ok("files", "list", "f1").json() == []

        where = allowed / "f1"
        r = admin.ok("files", "mount", "f1", "--rp", rp, "--mountpoint", str(where))
        session = r.json()
        assert session["host"] == "h1" and session["state"] == "Active" and session["mountpoint"] == str(where)
        job_id = r.stderr.split("as job ")[1].split()[0]
        assert admin.ok("job", "show", job_id).json()["properties"]["host"] == "h1"
        volumes = {v["partition"]: v for v in session["volumes"]}
        ext4 = Path(volumes[5]["path"])
        assert volumes[5]["status"] == "mounted" and ext4 == where / "disk0-part5", session
        assert (ext4 / "big.bin").read_bytes() == file_set("ext4", 1)["big.bin"]  # byte-identical
        check_volume_files(ext4, "ext4", version=1)
        listed = admin.ok("files", "list", "f1").json()
        assert [(s["host"], s["mountpoint"], s["state"]) for s in listed] == [("h1", str(where), "Active")]
        assert str(ext4) in listed[0]["paths"]
        r = admin.fails("files", "browse", "f1")
        assert "mounted on host h1" in r.output

        # Mounting again (through the API this time) extends the session (on the agent too: its
        # owner reads the new expiry there).
        api = Cli(home=tmp_path / "operator", passphrase=None, extra_env={"VMVAULT_TOKEN": owner})
        again = api.ok("--server", server, "files", "mount", "f1", "--rp", rp, "--duration", "2d").json()
        assert again["id"] == session["id"] and again["expires"] > session["expires"]

        ended = admin.ok("files", "unmount", "f1").json()
        assert [(s["id"], s["state"], s["endReason"]) for s in ended] == [(session["id"], "Ended", "Unmounted")]
        assert mounts_under(where) == [] and not ext4.exists()
        wait_until_clean(agent_home, {**session, "export": {"unixSocket": None, "tlsAddress": None}})

        # A crash on h1: the agent and the session's owner are killed, the mounts stay behind. The
        # restarted agent reconciles them before claiming anything, and the server learns it.
        session = admin.ok("files", "mount", "f1", "--rp", rp, "--mountpoint", str(where)).json()
        _stop(agent, signal.SIGKILL)
        os.kill(_owner_pid(agent_home, session["id"]), signal.SIGKILL)
        assert mounts_under(where), "the crash left no mounts: nothing to reconcile"
        agent = _agent(agent_cli, server, allowed)
        wait_for(lambda: _state(admin, session["id"]) == ("Ended", "OwnerDied"), 60, "the leftovers reconciled",
                 interval=0.3)  # fmt: skip
        assert mounts_under(where) == []
        wait_until_clean(agent_home, {**session, "export": {"unixSocket": None, "tlsAddress": None}})
    finally:
        if agent is not None:
            _stop(agent)
        serve.stop()
