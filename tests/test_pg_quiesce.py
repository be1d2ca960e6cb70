"""A live backup of a busy PostgreSQL guest under libvirt (TCG), its fsfreeze hook slow as a big checkpoint is.

The guest (tests/vm/pgguest.py: Debian minbase, postgresql-15, qemu-guest-agent) runs a commit
workload. Its fsfreeze hook (/etc/qemu/fsfreeze-hook.d/50-postgres) runs CHECKPOINT, records what
is committed (count and max id) and sleeps /etc/vmv-hook-sleep seconds; qemu-ga answers nothing
meanwhile. Budgets are shrunk for the test (`vm update --quiesce-timeout`); users get 60 s.

1. A freeze of about 20 s (the hook's CHECKPOINT, psql calls and a 14 s sleep), budget 45 s: the
   backup is consistent; the point restored and booted runs PostgreSQL, pg_amcheck --heapallindexed
   is clean, every row committed before the freeze is there.
2. The same hook, budget 10 s (about twice the budget): vmvault gives up, thaws the late freeze once
   the agent answers, retries once, and ends CrashConsistent with the warning quiesce_timeout; the
   workload resumes.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli
from vm.guest import GuestImage
from vm.libvirtd import Domain, libvirtd  # noqa: F401  (the session fixture)
from vm.live import backup, latest_point, restore_raw, warning_codes, warnings
from vm.machine import Disk
from vm.pgguest import PgImage, build_pg_guest, pg_disk

# real-time budgets: never beside another of them (docs/testing.md)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("realtime")]

VM = "pg1"
PG_BIN = "/usr/lib/postgresql/15/bin"  # pg_amcheck has no /usr/bin wrapper
PG_UP_TIMEOUT = 300  # TCG on a shared CPU: PostgreSQL's start (and crash recovery) can be slow
# The hook's sleep; with its CHECKPOINT and two psql calls under TCG the freeze takes about 20 s.
HOOK_SLEEP_S = 14
WORKLOAD = """#!/bin/sh
# one autocommitted insert after another, as fast as the guest goes
i=0
while :; do i=$((i+1)); echo "insert into t(v) values ('row $i');"; done | su postgres -c 'psql -q -d app'
"""


@dataclass
class Lab:
    workdir: Path
    image: PgImage
    domain: Domain
    cli: Cli

    def psql(self, sql: str, domain: Domain | None = None, db: str = "app") -> str:
        out = (domain or self.domain).sh(f'su postgres -c "psql -Atq -d {db} -c \\"{sql}\\""', timeout=300)
        return str(out.stdout).strip()

    def rows(self, domain: Domain | None = None) -> int:
        return int(self.psql("select count(*) from t", domain))

    def hook_sleeps(self, seconds: int) -> None:
        self.domain.sh(f"echo {seconds} > /etc/vmv-hook-sleep; : > /var/log/vmv-hook.log")

    def hook_log(self) -> list[str]:
        return [line.split()[0] for line in self.domain.sh("cat /var/log/vmv-hook.log").stdout.splitlines() if line]


def _boot(domain: Domain) -> None:
    domain.define().start()
    deadline = time.monotonic() + PG_UP_TIMEOUT
    while True:
        result = domain.agent_client().run("/bin/sh", ["-c", "su postgres -c 'psql -Atq -c \"select 1\"'"], timeout=60)
        if result.ok:
            return
        assert time.monotonic() < deadline, f"PostgreSQL did not start in {domain.name}: {result.output()}"
        time.sleep(2)


@pytest.fixture(scope="module")
def lab(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:  # noqa: F811
    started = time.monotonic()
    image = build_pg_guest()
    if image.build_seconds:
        print(f"\nPostgreSQL guest image built in {image.build_seconds:.0f} s", file=sys.stderr)
    workdir = tmp_path_factory.mktemp("pg")
    kernel = GuestImage(image.vmlinux, image.initrd, image.key)
    domain = Domain(f"vmvpg-{secrets.token_hex(4)}", workdir, [pg_disk(workdir, image)], image=kernel,
                    cmdline="vmv.root=/dev/vda", memory_mib=512)  # fmt: skip
    try:
        _boot(domain)
        print(f"PostgreSQL guest up after {time.monotonic() - started:.0f} s", file=sys.stderr)
        lab = Lab(workdir, image, domain, HostKeyCli(home=workdir / "home"))
        lab.psql("create database app", db="postgres")
        lab.psql("create table t(id bigserial primary key, v text not null, at timestamptz default now())")
        lab.psql("create index t_v on t(v)")
        domain.write_file("/root/workload.sh", WORKLOAD.encode(), "755")
        domain.sh("setsid /root/workload.sh </dev/null >/dev/null 2>&1 &")
        lab.cli.vault_create("v1", workdir / "vault")
        lab.cli.ok("vm", "add", VM, "--libvirt", domain.name, "--quiesce-timeout", "45")
        assert lab.cli.protection_enable(VM, "v1").ok
        yield lab
    finally:
        domain.close()


def _wait_rows_grow(lab: Lab, timeout: float = 120) -> None:
    before = lab.rows()
    deadline = time.monotonic() + timeout
    while lab.rows() <= before:
        assert time.monotonic() < deadline, "the commit workload does not commit"
        time.sleep(1)


def _quiesce(lab: Lab, job: dict[str, Any]) -> dict[str, Any]:
    shown = lab.cli.ok("job", "show", str(job["name"])).json()
    info: dict[str, Any] = shown["properties"]["extendedInfo"]["quiesce"]
    return info


def test_a_slow_checkpoint_hook_within_the_budget_gives_a_consistent_point_that_restores(lab: Lab) -> None:
    _wait_rows_grow(lab)
    lab.hook_sleeps(HOOK_SLEEP_S)
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed", job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "FileSystemConsistent", point
    assert lab.hook_log() == ["freeze", "freeze-done", "thaw"], lab.hook_log()
    figures = _quiesce(lab, job)
    print(f"\nPostgreSQL guest quiesce figures: {figures}", file=sys.stderr)
    assert figures["freezeSeconds"] >= HOOK_SLEEP_S and figures["attempts"] == 1, figures
    count, max_id = (int(x) for x in lab.domain.sh("cat /var/lib/vmv-before-freeze").stdout.split("|"))
    assert count > 0, "the workload committed nothing before the freeze"
    _wait_rows_grow(lab)  # thawed: the workload goes on

    disks = restore_raw(lab.cli, VM, point, lab.workdir / "restored")
    restored = Domain(f"vmvpgr-{secrets.token_hex(4)}", lab.workdir / "restored",
                      [Disk("os0", disks["vda"], "raw")], image=lab.domain.image, cmdline="vmv.root=/dev/vda",
                      memory_mib=512)  # fmt: skip
    try:
        _boot(restored)
        assert lab.psql(f"select count(*) from t where id <= {max_id}", restored) == str(count), (
            "rows committed before the freeze are missing from the restored database"
        )
        amcheck = f"{PG_BIN}/pg_amcheck --install-missing --all --heapallindexed"
        check = restored.agent_client().run("/bin/sh", ["-c", f"su postgres -c '{amcheck}' 2>&1"], timeout=600)
        assert check.ok, f"pg_amcheck found problems: {check.output()}"
    finally:
        restored.close()


def test_a_hook_twice_the_budget_ends_crash_consistent_with_a_warning_and_the_workload_resumes(lab: Lab) -> None:
    lab.cli.ok("vm", "update", VM, "--quiesce-timeout", "10")
    lab.hook_sleeps(HOOK_SLEEP_S)  # with its CHECKPOINT and psql calls: about 20 s, twice the budget
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "CompletedWithWarnings", job
    assert warning_codes(job) == ["quiesce_timeout"], job
    assert "10 s quiesce budget" in warnings(job)[0]["message"], job
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "CrashConsistent"
    assert lab.hook_log() == ["freeze", "freeze-done", "thaw"] * 2, lab.hook_log()
    assert lab.domain.agent_client().guest_fsfreeze_status() == "thawed"
    assert _quiesce(lab, job)["attempts"] == 2
    _wait_rows_grow(lab)
