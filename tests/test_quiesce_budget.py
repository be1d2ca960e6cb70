"""The quiesce budget of live backups on a plain QEMU guest (the tiny guest, its fsfreeze hook made slow).

A hook in /etc/qemu/fsfreeze-hook.d sleeps before the file systems freeze, as a database's
checkpoint does; qemu-ga answers nothing while it runs. Budgets are shrunk per VM
(`vm update --quiesce-timeout`) to keep the tests short; the defaults (60 s) are what users get.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import Cli, HostKeyCli
from test_policy import weekly_props
from vm.live import backup, ext4_file, fell_back, latest_point, protect_running, restore_raw, warning_codes, warnings
from vm.machine import Disk, Guest, ext4_disk

# real-time budgets: never beside another of them (docs/testing.md)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("realtime")]

MiB = 1 << 20
VM = "slowhook"
HOOK = "/etc/qemu/fsfreeze-hook.d/slow"
HOOK_LOG = "/run/slow-hook.log"
SLEEP_FILE = "/run/hook-sleep"


@dataclass
class Lab:
    guest: Guest
    cli: Cli
    data: Disk

    def hook_sleeps(self, seconds: int) -> None:
        self.guest.sh(f"echo {seconds} > {SLEEP_FILE}; : > {HOOK_LOG}")

    def hook_log(self) -> list[str]:
        return [line.split()[0] for line in self.guest.sh(f"cat {HOOK_LOG}").stdout.splitlines() if line]

    def budget(self, seconds: int) -> None:
        shown = self.cli.ok("vm", "update", VM, "--quiesce-timeout", str(seconds)).json()
        assert shown["quiesceTimeoutSeconds"] == seconds and shown["quiesceTimeoutSource"] == "vm", shown


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("quiesce-budget")
    data = ext4_disk(workdir, "data0", 64 * MiB)
    guest = Guest(workdir, [data])
    guest.start()
    try:
        hook = (f'#!/bin/sh\necho "$1 $(date +%s)" >> {HOOK_LOG}\necho "vmv-hook: $1" > /dev/console\n'
                f'[ "$1" = freeze ] && sleep "$(cat {SLEEP_FILE} 2>/dev/null || echo 0)"\nexit 0\n')  # fmt: skip
        guest.write_file(HOOK, hook.encode(), "755")
        cli = HostKeyCli(home=workdir / "home")
        protect_running(cli, workdir / "vault", VM, guest.vmvault_qmp, guest.agent_socket)
        yield Lab(guest, cli, data)
    finally:
        guest.close()


def _quiesce_details(lab: Lab, job: dict[str, object]) -> dict[str, float]:
    shown = lab.cli.ok("job", "show", str(job["name"])).json()
    details: dict[str, float] = shown["properties"]["extendedInfo"]["quiesce"] or {}
    return details


def test_a_freeze_hook_slower_than_the_old_10_s_deadline_still_gives_a_consistent_point(lab: Lab) -> None:
    lab.budget(30)
    lab.hook_sleeps(11)  # the old thaw guard gave up after 10 s and the job died of a BrokenPipeError
    job = backup(lab.cli, VM)
    assert job["properties"]["status"] == "Completed", job
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "FileSystemConsistent"
    assert lab.hook_log() == ["freeze", "thaw"], "one freeze, one thaw"
    assert lab.guest.freeze_status() == "thawed"
    figures = _quiesce_details(lab, job)
    assert figures["freezeSeconds"] >= 11 and figures["attempts"] == 1, figures
    assert 0 <= figures["frozenSeconds"] < 10 and "thawSeconds" in figures and "snapshotSeconds" in figures, figures


def test_a_freeze_past_the_budget_is_thawed_retried_once_and_gives_a_crash_consistent_point(lab: Lab) -> None:
    lab.budget(4)
    lab.hook_sleeps(8)  # twice the budget
    started = time.monotonic()
    job = backup(lab.cli, VM)
    took = time.monotonic() - started
    assert job["properties"]["status"] == "CompletedWithWarnings", job
    assert warning_codes(job) == ["quiesce_timeout"], job
    (note,) = warnings(job)
    assert "4 s quiesce budget" in note["message"] and "--quiesce-timeout" in note["recommendedAction"], note
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "CrashConsistent"
    # Each late freeze was thawed as soon as the agent answered again; the retry came after that.
    assert lab.hook_log() == ["freeze", "thaw", "freeze", "thaw"], lab.hook_log()
    assert lab.guest.freeze_status() == "thawed"
    assert took >= 16, f"two attempts of an 8 s hook took only {took:.0f} s"
    lab.guest.sh("echo resumed > /mnt/data0/after; sync")  # the guest writes again
    assert _quiesce_details(lab, job)["attempts"] == 2


def _slow_snapshots(lab: Lab, hold: str) -> Cli:
    """A 3 s frozen window, and snapshots held frozen longer (testhooks.py: "6" every attempt, "6:1" the first)."""
    env = {"VMVAULT_FROZEN_WINDOW": "3", "VMVAULT_TEST_SLOW_SNAPSHOT": hold}
    return HostKeyCli(home=lab.cli.home, extra_env=env)


def _assert_nothing_left_behind(lab: Lab) -> None:
    """No fleece node, block job or export in QEMU; at most one vmvault bitmap per disk (the chain's)."""
    nodes = lab.guest.qmp("query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vmv-")], nodes
    assert not lab.guest.qmp("query-block-jobs") and not lab.guest.qmp("query-block-exports")
    ours = {n["node-name"]: [b["name"] for b in n.get("dirty-bitmaps", []) if b.get("name", "").startswith("vmv-")]
            for n in nodes}  # fmt: skip
    assert all(len(names) <= 1 for names in ours.values()) and any(ours.values()), ours
    assert lab.guest.freeze_status() == "thawed"
    assert not list((lab.cli.home / "fleece").rglob("*.qcow2")), "a fleece overlay file was left behind"


def test_a_snapshot_past_the_frozen_window_once_is_undone_and_retried_into_a_consistent_point(
    lab: Lab, tmp_path: Path
) -> None:
    lab.budget(30)
    lab.hook_sleeps(0)
    lab.guest.sh("echo between > /mnt/data0/between; sync")
    job = backup(_slow_snapshots(lab, "6:1"), VM)
    assert job["properties"]["status"] == "Completed" and not fell_back(job), job
    point = latest_point(lab.cli, VM)
    assert point["properties"]["recoveryPointType"] == "FileSystemConsistent"
    # The undone attempt's bitmaps were folded back: the retried incremental holds what was written before it.
    assert ext4_file(restore_raw(lab.cli, VM, point, tmp_path / "out")["data0"], "/between") == b"between\n"
    figures = _quiesce_details(lab, job)
    assert figures["snapshotAttempts"] == 2 and "3 s frozen window" in str(figures["snapshotRetryReason"]), figures
    assert lab.hook_log().count("freeze") == 2, lab.hook_log()
    _assert_nothing_left_behind(lab)
    assert not fell_back(backup(lab.cli, VM)), "the next backup is no longer incremental"


def test_a_snapshot_past_the_frozen_window_twice_gives_a_crash_consistent_point_and_leaves_nothing(lab: Lab) -> None:
    lab.budget(30)
    lab.hook_sleeps(0)
    job = backup(_slow_snapshots(lab, "6"), VM)
    assert job["properties"]["status"] == "CompletedWithWarnings", job
    assert warning_codes(job) == ["quiesce_timeout"], job
    (note,) = warnings(job)
    assert "3 s frozen window twice" in note["message"] and "VMVAULT_FROZEN_WINDOW" in note["recommendedAction"], note
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "CrashConsistent"
    assert _quiesce_details(lab, job)["snapshotAttempts"] == 2
    assert lab.hook_log().count("freeze") == 2, lab.hook_log()
    _assert_nothing_left_behind(lab)


def test_a_vm_killed_during_its_freeze_is_thawed_by_the_guard_when_the_agent_answers(lab: Lab) -> None:
    lab.budget(60)
    lab.hook_sleeps(5)
    # Watched on the console (a host file): the agent answers nothing while its hook runs.
    console = lab.guest.console
    seen = console.read_text(errors="replace").count("vmv-hook: ")
    proc = lab.cli.popen(*lab.cli.backup_args(VM))

    def hook_calls() -> list[str]:
        lines = console.read_text(errors="replace").split("vmv-hook: ")[seen + 1 :]
        return [line.split()[0] for line in lines if line.split()]

    try:
        deadline = time.monotonic() + 120
        while hook_calls() != ["freeze"]:
            assert time.monotonic() < deadline and proc.poll() is None, f"the freeze hook did not start: {hook_calls()}"
            time.sleep(0.2)
    finally:
        proc.kill()  # vmvault dies inside its freeze call; its guard outlives it
        proc.wait()
    deadline = time.monotonic() + 120
    while hook_calls() != ["freeze", "thaw"]:
        assert time.monotonic() < deadline, f"the guard did not thaw the late freeze: {hook_calls()}"
        time.sleep(1)
    assert lab.guest.freeze_status() == "thawed"


def test_an_only_crash_consistent_policy_skips_the_quiesce(lab: Lab, tmp_path: Path) -> None:
    props = copy.deepcopy(weekly_props())
    props["snapshotConsistencyType"] = "OnlyCrashConsistent"
    path = tmp_path / "crash.json"
    path.write_text(json.dumps(props))
    lab.cli.ok("policy", "create", "CrashOnly", "--vault", "v1", "--file", str(path))
    lab.cli.ok("protection", "update", "--vm", VM, "--policy", "CrashOnly")
    lab.hook_sleeps(0)
    job = backup(lab.cli, VM)
    # (a killed run before this one leaves QEMU leftovers: leftovers_reconciled is fine here)
    assert set(warning_codes(job)) <= {"leftovers_reconciled"}, job
    assert latest_point(lab.cli, VM)["properties"]["recoveryPointType"] == "CrashConsistent"
    assert lab.hook_log() == [], "the guest was quiesced although the policy says OnlyCrashConsistent"
    props["snapshotConsistencyType"] = "Sometimes"
    path.write_text(json.dumps(props))
    r = lab.cli.fails("policy", "create", "Bad", "--vault", "v1", "--file", str(path))
    assert "snapshotConsistencyType" in r.stderr, r
