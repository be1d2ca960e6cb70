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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, assert_same_image, stop_process, wait_for
from test_scheduler import Serve
from vmvault.proc import pid_alive

MiB = 1 << 20


def _agent(cli: Cli, server: str, log: Path, disks: list[Path], restores: Path) -> subprocess.Popen[str]:
    allow = [a for d in disks for a in ("--allow-disks", str(d))] + ["--allow-restores", str(restores)]
    argv = cli.argv("--server", server, "agent", "run", "--host", "h1", *allow, json_output=False)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.Popen(argv, env=cli.env(), stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL,
                                text=True)  # fmt: skip


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
    # The copy throttled (1 MiB/s: 8 s for the disk), so that a cancel arrives while it runs.
    agent_cli = Cli(home=agent_home, passphrase=None,
                    extra_env={"VMVAULT_TOKEN": token, "VMVAULT_INSTANT_STREAM_SPEED": str(MiB)})  # fmt: skip
    agent = _agent(agent_cli, server, log, [tmp_path, guest.sockets], restores)
    running.append(lambda: stop_process(agent))
    wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "agent h1 to register", interval=0.5)
    job = admin.ok("backup", "now", "q1", "--wait").json()["properties"]
    assert job["status"] == "Completed" and job["host"] == "h1", job
    rp = admin.point_ids("q1")[-1]
    guest.close()  # the copy runs alone: 2 shared cores

    # Through a server (--server, an operator's token): back once the VM runs on h1; job cancel
    # reaches the agent: the VM and the export stop, the copy and its VM record go.
    operator = admin.ok("token", "create", "--role", "BackupOperator").json()["token"]
    remote = Cli(home=tmp_path / "elsewhere", passphrase=None, extra_env={"VMVAULT_TOKEN": operator})
    r = remote.run("--server", server, "restore", "vm", "q1", "--rp", rp, "--name", "c2", "--target-dir",
                   str(restores / "c2"), "--instant", timeout=300)  # fmt: skip
    assert r.ok and r.json()["properties"]["status"] == "InProgress", f"{r}\n{log.read_text()}"
    assert r.json()["properties"]["extendedInfo"]["restore"]["vmRunning"], r.json()
    cancelled = r.json()["name"]
    qemu_pid = int(Path(json.loads((restores / "c2" / "c2.json").read_text())["pidFile"]).read_text())
    export_pid = int(admin.ok("job", "show", cancelled).json()["properties"]["extendedInfo"]["restore"]["exportPid"])
    remote.ok("--server", server, "job", "cancel", cancelled)
    done = admin.run("job", "wait", cancelled, "--timeout", "120", timeout=200)
    props = done.json()["properties"]
    assert props["status"] == "Cancelled", f"{done}\n{log.read_text()}"
    assert "stopped and removed" in props["errorDetails"][0]["errorString"], props
    assert not pid_alive(qemu_pid) and not pid_alive(export_pid)
    assert not admin.run("vm", "show", "c2").ok
    left = sorted(p.name for p in (restores / "c2").iterdir())
    assert left == ["c2-instant.log"], left  # only the export's log (as on a server): what happened

    # The attacker's target, outside the agent's --allow-restores: refused on h1, nothing made.
    outside = tmp_path / "outside"
    r = admin.fails("restore", "vm", "q1", "--rp", rp, "--name", "c0", "--target-dir", str(outside), "--instant")
    props = r.json()["properties"]
    assert props["host"] == "h1" and props["errorDetails"][0]["errorCode"] == "path_not_allowed", props
    assert not outside.exists() and not admin.run("vm", "show", "c0").ok
    jobs_before = len(admin.ok("job", "list").json())
    r = admin.fails("restore", "vm", "q1", "--rp", rp, "--name", "c0", "--instant", "--format", "raw")
    assert "qcow2" in r.output and len(admin.ok("job", "list").json()) == jobs_before, r.output

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
    assert done.json()["properties"]["host"] == "h1"
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
    for leftover in qmp.parent.glob("*.sock"):  # QEMU leaves its sockets behind
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        qmp.parent.rmdir()


def _answers(qmp: Path) -> bool:
    from vmvault.connectors.qemu.qmp import QmpClient

    try:
        with QmpClient(qmp).connect(greeting_timeout=1):
            return True
    except Exception:
        return False


def test_the_server_checks_an_agents_instant_restore_reports(tmp_path: Path, catalog_url: str | None) -> None:
    """What an agent reports of its instant restore (service/hostinstant.py), the attacker's version:
    disks outside the job's target, keys the server owns, a new VM of another kind or with files
    elsewhere, another host's job. Only the VM this job registered is ever removed."""
    from helpers import PASSPHRASE
    from vmvault.catalog import repos
    from vmvault.errors import InvalidInput, NotFound
    from vmvault.service import agentwork, hostinstant
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.service.jobs import Operation, create_job
    from vmvault.settings import Settings

    target = "/var/lib/vmvault-restores/vms/c1"
    record = {"mode": "vm", "instant": True, "newVm": "c1", "targetDir": target, "recoveryPoint": "rp"}
    with context(Settings(home=tmp_path / "srv", passphrase=PASSPHRASE, catalog_url=catalog_url)) as ctx:
        add_host_vm(ctx, "q1", "h1", ["/vms/q1.raw"])
        with ctx.catalog.read() as s:
            kind = repos.get_vm(s, "q1").kind
        job_id = create_job(ctx, Operation.RESTORE, vm="q1", vault=None, queued=True,
                            details={"restore": record}).id  # fmt: skip
        claimed = agentwork._claim_row(ctx, "h1", 4242)
        assert claimed is not None and claimed.id == job_id

        def restore() -> dict[str, Any]:
            with ctx.catalog.read() as s:
                return dict(repos.get_job(s, job_id).details["restore"])

        with pytest.raises(InvalidInput, match="disks outside"):
            hostinstant.report(ctx, "h1", job_id, {"restore": {"disks": ["/etc/shadow"]}})
        with pytest.raises(InvalidInput, match="disks outside"):
            hostinstant.report(ctx, "h1", job_id, {"restore": {"disks": [f"{target}/../../../etc/x"]}})
        with pytest.raises(NotFound):
            hostinstant.report(ctx, "h2", job_id, {"restore": {"state": "Copying"}})
        hostinstant.report(ctx, "h1", job_id, {"restore": {"state": "Copying", "vmRunning": True,
                                                           "targetDir": "/etc", "newVm": "q1", "id": "x"}})  # fmt: skip
        assert restore() == {**record, "state": "Copying", "vmRunning": True}

        good = {"kind": kind, "disks": [{"name": "d0", "path": f"{target}/d0.qcow2"}], "definition": {},
                "files": [f"{target}/c1.sh"], "view": {}}  # fmt: skip
        for bad in ({**good, "kind": "libvirt" if kind != "libvirt" else "qmp"},
                    {**good, "files": ["/etc/cron.d/x"]}):  # fmt: skip
            with pytest.raises(InvalidInput, match="the agent reported a new VM"):
                hostinstant.report(ctx, "h1", job_id, {"newVm": bad})
        answer = hostinstant.report(ctx, "h1", job_id, {"newVm": good, "error": {"code": "export_lost"}})
        assert answer["name"] == "c1" and answer["cancel"] is False
        with ctx.catalog.read() as s:
            assert repos.get_vm(s, "c1").host == "h1" and repos.get_job(s, job_id).error["code"] == "export_lost"
        assert restore()["id"] == answer["id"]
        hostinstant.report(ctx, "h1", job_id, {"error": None, "unregister": True})
        with ctx.catalog.read() as s:
            assert repos.find_vm(s, "c1") is None and repos.find_vm(s, "q1") is not None
            assert repos.get_job(s, job_id).error is None

        # The agent lost mid-copy: the job ends agent_lost and the VM it registered is forgotten.
        hostinstant.report(ctx, "h1", job_id, {"newVm": good})
        with ctx.catalog.write() as s:
            assert agentwork._end_lost(s, "h1", "the agent of host 'h1' restarted") == [job_id]
        with ctx.catalog.read() as s:
            assert repos.find_vm(s, "c1") is None and repos.find_vm(s, "q1") is not None
            error = repos.get_job(s, job_id).error
        assert error["code"] == "agent_lost" and "--instant" in error["recommendedAction"], error


def test_an_agent_restarting_stops_and_removes_what_a_killed_instant_restore_left(tmp_path: Path) -> None:
    """The journal a killed agent left (HOME/instant/JOB.json) at its next start: the VM quit (here
    qemu-storage-daemon standing in, over the same QMP), the export process of the point stopped,
    the copy's files and run directory removed. A pid that is no longer the export is left alone."""
    from dataclasses import asdict

    from helpers import PASSPHRASE
    from vm.machine import StorageDaemon, blank_disk
    from vmvault.connectors.contract import NewVm
    from vmvault.connectors.workfiles import copy_run_dir
    from vmvault.service import backups, protection, vaults, vms
    from vmvault.service.agentinstant import journals, reconcile
    from vmvault.service.context import context
    from vmvault.settings import Settings

    image = tmp_path / "d1.raw"
    image.write_bytes(os.urandom(MiB))
    with context(Settings(home=tmp_path / "srv", passphrase=PASSPHRASE)) as ctx:
        uuid = vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")["uuid"]
        vms.add_vm(ctx, "d1", [image])
        protection.enable_protection(ctx, "d1", "v1")
        rp = backups.backup_now(ctx, "d1", queue=False).result.rp_id
    home = tmp_path / "agent-h1"
    assert Cli(home=home).vault_import(tmp_path / "v1").ok  # the host's key: the export opens the vault with it

    target = tmp_path / "restores" / "c9"
    target.mkdir(parents=True)
    run_dir = copy_run_dir(target, "c9")
    run_dir.mkdir(parents=True, mode=0o700)
    config = {"home": str(home), "storage_dir": str(tmp_path / "v1"), "vault_uuid": uuid, "rp_id": rp,
              "unix": str(run_dir / "vault.sock"), "ready": str(run_dir / "export.ready")}  # fmt: skip
    (run_dir / "export.json").write_text(json.dumps(config))
    export = subprocess.Popen([sys.executable, "-m", "vmvault.recovery.nbdserver", str(run_dir / "export.json")],
                              start_new_session=True, stderr=subprocess.DEVNULL)  # fmt: skip
    vm = StorageDaemon(tmp_path, [blank_disk(tmp_path, "o0", MiB, "raw")]).start()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: (run_dir / "export.ready").exists(), 60, "the export to serve", interval=0.1)
        created = [target / "disk0.qcow2", target / "c9.json", target / "c9.sh"]
        for path in created:
            path.touch()
        handle = {"template": {"name": "c9", "sockets": {"qmp": str(vm.vmvault_qmp)}, "pidFile": ""}}
        folder = journals(Settings(home=home))
        folder.mkdir(parents=True)
        (folder / "j1.json").write_text(json.dumps({
            "jobId": "j1", "vm": asdict(NewVm("qmp", [], {}, [], {}, handle)), "exportPid": export.pid,
            "created": [str(p) for p in created], "runDir": str(run_dir)}))  # fmt: skip
        (folder / "j2.json").write_text(json.dumps({"jobId": "j2", "vm": None, "exportPid": stranger.pid,
                                                    "created": [], "runDir": str(tmp_path / "gone")}))  # fmt: skip

        done = reconcile(Settings(home=home))
        assert len(done) == 2 and "j1" in done[0], done
        assert export.wait(10) == 0 and vm.proc is not None and vm.proc.wait(30) is not None
        assert stranger.poll() is None, "a pid that is not the export was signalled"
        assert not any(p.exists() for p in created) and not run_dir.exists()
        assert not list(folder.iterdir())
    finally:
        for proc in (export, stranger):
            proc.kill()
            proc.wait()
        vm.close()
