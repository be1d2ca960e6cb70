"""`restore vm` of a VM of another host: queued for that host's agent, which restores the point as a
new VM there (its disks in the agent's allowed restore roots, the copy defined on that host) with the
server's own restore code; the server registers the copy as a VM of that host.

Real processes on a real PostgreSQL 15 (tests/pgserver.py): one `vmvault serve`, one `agent run`
(host h1, its own home). The running VM is qemu-storage-daemon standing in for a QEMU (QMP, its
disk held open; no guest boot under TCG): the copy is defined (its template and launch script), not
started.

`restore replace-disks` of a VM of another host (the last test): a real serve and agent on SQLite,
a disk-image VM; the agent swaps the point's image in, and refuses any disk path outside its
--allow-disks folders (the fast contract test is in tests/test_agents.py).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import PASSPHRASE, Cli, assert_same_image, far_time_zone, first_run_owner_token, wait_for
from pgserver import PgServer
from test_agents import Agent, _agent_proc
from test_scheduler import Serve

MiB = 1 << 20


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    running: list[Any] = []
    yield running
    for proc in reversed(running):
        if isinstance(proc, Agent):
            proc.stop(signal.SIGKILL)
        elif isinstance(proc, Serve):
            proc.stop()
        else:
            proc.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restore_vm_of_a_hosts_vm_runs_on_its_agent_and_registers_the_copy_there(
    tmp_path: Path, pg_server: PgServer, procs: list[Any]
) -> None:
    from vm.machine import StorageDaemon, blank_disk, read_live

    url = pg_server.new_database()
    catalog = {"VMVAULT_CATALOG": url}
    admin = Cli(home=tmp_path / "setup", extra_env=catalog)
    # DefaultPolicy's slot hours away: no scheduled backup beside the test's (CI runs at any hour)
    admin.ok("vault", "create", "v1", "--storage", str(tmp_path / "v1"), "--timezone", far_time_zone())
    serve = Serve(Cli(home=tmp_path / "srv", extra_env=catalog))
    procs.append(serve)
    first_run_owner_token(serve.proc.stdout.readline() if serve.proc.stdout else "")
    server = serve.announce.split("listening on ")[1].split()[0]
    token = admin.ok("token", "create", "--role", "BackupAgent", "--host", "h1").json()["token"]
    home = tmp_path / "agent-h1"
    assert Cli(home=home).vault_import(tmp_path / "v1").ok  # the host's key: it opens the vault alone
    qsd = StorageDaemon(tmp_path, [blank_disk(tmp_path, "q0", 8 * MiB, "raw")]).start()
    procs.append(qsd)
    qsd.write(qsd.disks[0], [(0, os.urandom(2 * MiB)), (6 * MiB, os.urandom(MiB))])
    admin.ok("vm", "add", "q1", "--host", "h1", "--qmp", str(qsd.vmvault_qmp))
    admin.ok("protection", "enable", "--vm", "q1", "--vault", "v1")
    restores = tmp_path / "restores"
    Agent.allowed, Agent.restores = [tmp_path, qsd.sockets], [restores]
    agent = Agent(Cli(home=home, passphrase=None, extra_env={"VMVAULT_TOKEN": token}), server, "h1")
    procs.append(agent)
    wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "agent h1 to register", interval=0.5)
    job = admin.ok("backup", "now", "q1", "--wait").json()["properties"]
    assert job["status"] == "Completed" and job["host"] == "h1", job
    rp = admin.point_ids("q1")[-1]
    source = read_live(qsd.disks[0], tmp_path / "q0-at-backup.raw")

    # Refused, changing nothing: a name taken (before any job), replace-disks of the running VM (on
    # h1). (An instant restore runs on the agent too: tests/test_agent_instant.py.)
    r = admin.fails("restore", "vm", "q1", "--rp", rp, "--name", "q1")
    assert "q1" in r.output and "already" in r.output
    r = admin.fails("restore", "replace-disks", "q1", "--rp", rp)  # run on h1, refused there: its QEMU runs
    props = r.json()["properties"]
    assert props["host"] == "h1" and props["errorDetails"][0]["errorCode"] == "vm_running", props
    jobs_before = len(admin.ok("job", "list").json())

    # Outside the agent's restore roots: the job fails on h1, naming the path and the fix; nothing written.
    outside = tmp_path / "outside"
    r = admin.fails("restore", "vm", "q1", "--rp", rp, "--name", "c0", "--target-dir", str(outside))
    props = r.json()["properties"]
    error = props["errorDetails"][0]
    assert props["host"] == "h1" and error["errorCode"] == "path_not_allowed", props
    assert "agent run --allow-restores DIR" in error["recommendations"][0]
    assert not outside.exists() and not admin.run("vm", "show", "c0").ok
    assert len(admin.ok("job", "list").json()) == jobs_before + 1

    # Into its roots: the copy is made on h1 and registered as a VM of h1.
    target = restores / "c1"
    r = admin.run("restore", "vm", "q1", "--rp", rp, "--name", "c1", "--target-dir", str(target))
    assert r.ok, r.output
    props = r.json()["properties"]
    assert props["operation"] == "Restore" and props["host"] == "h1" and props["status"] == "Completed", props
    assert "queued to its host's agent" in r.stderr and "restored VM c1:" in r.stderr
    shown = admin.ok("vm", "show", "c1").json()
    assert shown["host"] == "h1" and shown["kind"] == "qmp", shown
    [disk] = shown["disks"]
    assert Path(disk["path"]).parent == target
    assert_same_image(Path(disk["path"]), source)
    script = target / "c1.sh"
    assert script.exists() and os.access(script, os.X_OK), sorted(p.name for p in target.iterdir())
    record = admin.ok("job", "show", r.json()["name"]).json()
    restore = record["properties"]["extendedInfo"]["restore"]
    assert restore["mode"] == "vm" and restore["name"] == "c1" and restore["launchScript"] == str(script)
    assert PASSPHRASE not in json.dumps(record)


def test_the_server_checks_an_agents_account_of_the_copy(tmp_path: Path) -> None:
    """A new VM the agent reports is of the source VM's kind, with every file in the job's target."""
    from vmvault.errors import InvalidInput
    from vmvault.service.agentwork import _checked_new_vm

    record = {"targetDir": "/var/lib/vmvault-restores/vms/c1"}
    good = {"kind": "qmp", "disks": [{"name": "d0", "path": "/var/lib/vmvault-restores/vms/c1/d0.raw"}],
            "definition": {"kind": "qmp"}, "files": ["/var/lib/vmvault-restores/vms/c1/c1.sh"], "view": {}}  # fmt: skip
    assert _checked_new_vm(good, record, "qmp", "j").kind == "qmp"
    bad = [
        {**good, "kind": "libvirt"},
        {**good, "disks": [{"name": "d0", "path": "/etc/shadow"}]},
        {**good, "files": ["/var/lib/vmvault-restores/vms/c1/../../../../etc/cron.d/x"]},
        {**good, "files": "/etc/passwd"},
        {**good, "definition": {"x": "y" * (300 << 10)}},
        "not a dict",
    ]
    for report in bad:
        with pytest.raises(InvalidInput, match="the agent reported a new VM"):
            _checked_new_vm(report, record, "qmp", "j")


# ---- restore replace-disks of a VM of another host (real serve and agent on SQLite) -------------------


def _set_disk_path(home: Path, vm: str, path: Path) -> None:
    """What a stolen server token (or a compromised server) could do: point a VM's disk elsewhere."""
    from vmvault.catalog import repos
    from vmvault.service.context import context
    from vmvault.settings import Settings

    with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx, ctx.catalog.write() as s:
        row = repos.get_vm(s, vm)
        row.disks = [{**d, "path": str(path)} for d in row.disks or []]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replace_disks_of_a_hosts_vm_runs_on_its_agent_inside_its_allowed_disk_roots_only(tmp_path: Path) -> None:
    """replace-disks of a disk-image VM of h1: queued for h1's agent, which swaps the point's image in
    with the server's own code (byte-identical, nothing left beside it). The attacker's version: the
    VM's disk path in the catalog changed to a file outside the agent's --allow-disks, or to a
    symlink in it that leads out: path_not_allowed on h1, that file untouched, nothing written."""
    from vmvault.service import protection, tokens, vaults
    from vmvault.service.context import context
    from vmvault.service.hostvms import add_host_vm
    from vmvault.settings import Settings

    home, disks, outside = tmp_path / "srv", tmp_path / "disks", tmp_path / "outside"
    disks.mkdir()
    outside.mkdir()
    disk = disks / "c1.raw"
    disk.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
    with context(Settings(home=home, passphrase=PASSPHRASE)) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        add_host_vm(ctx, "c1", "h1", [str(disk)])
        protection.enable_protection(ctx, "c1", "v1")
        _view, token = tokens.create_token(ctx, "BackupAgent", host="h1")
    agent_home = tmp_path / "agent-h1"
    assert Cli(home=agent_home).vault_import(tmp_path / "v1").ok
    admin = Cli(home=home)
    serve = Serve(admin)
    server = serve.announce.split("listening on ")[1].split()[0]
    log = tmp_path / "agent.log"
    agent = _agent_proc(Cli(home=agent_home, passphrase=None, extra_env={"VMVAULT_TOKEN": token}), server, "h1",
                        log, disks)  # fmt: skip
    try:
        wait_for(lambda: admin.run("host", "show", "h1").ok, 60, "agent h1 to register", interval=0.5)
        job = admin.ok("backup", "now", "c1", "--wait").json()["properties"]
        assert job["status"] == "Completed" and job["host"] == "h1", job
        rp = admin.point_ids("c1")[-1]
        at_backup = disk.read_bytes()
        with open(disk, "r+b") as f:  # the guest went on writing
            f.write(os.urandom(MiB))

        r = admin.run("restore", "replace-disks", "c1", "--rp", rp)
        assert r.ok, (r.output, log.read_text())
        props = r.json()["properties"]
        assert props["operation"] == "Restore" and props["host"] == "h1" and props["status"] == "Completed", props
        assert "queued to its host's agent" in r.stderr and f"replaced {disk}" in r.stderr, r.stderr
        assert disk.read_bytes() == at_backup
        assert sorted(p.name for p in disks.iterdir()) == ["c1.raw"]  # no stage, no original left
        restore = admin.ok("job", "show", r.json()["name"]).json()["properties"]["extendedInfo"]["restore"]
        assert restore["mode"] == "replace" and restore["replaced"] == [str(disk)], restore

        # The attacker's version: a disk outside --allow-disks, and a symlink in it leading out.
        victim = outside / "passwd"
        victim.write_text("root:x:0:0:root:/root:/bin/sh\n")
        link = disks / "link.raw"
        link.symlink_to(victim)
        for path in (victim, link):
            _set_disk_path(home, "c1", path)
            r = admin.fails("restore", "replace-disks", "c1", "--rp", rp)
            props = r.json()["properties"]
            error = props["errorDetails"][0]
            assert props["host"] == "h1" and error["errorCode"] == "path_not_allowed", props
            assert str(path) in error["errorString"] and "--allow-disks DIR" in error["recommendations"][0], error
            assert victim.read_text() == "root:x:0:0:root:/root:/bin/sh\n" and link.readlink() == victim
            assert sorted(p.name for p in outside.iterdir()) == ["passwd"]
            assert sorted(p.name for p in disks.iterdir()) == ["c1.raw", "link.raw"]
        assert disk.read_bytes() == at_backup
    finally:
        serve.stop()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
