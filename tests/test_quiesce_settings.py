"""A VM's quiesce budget (catalog column, `vm update`/`vm add --quiesce-timeout`, VMVAULT_QUIESCE_TIMEOUT)
and a policy's snapshotConsistencyType, without a guest (the behaviour is in test_quiesce_budget.py and
test_pg_quiesce.py)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import Cli
from vmvault.domain.policy import PolicyError, only_crash_consistent, parse_policy


def test_vm_update_sets_the_budget_and_0_goes_back_to_the_setting(cli: Cli, small_image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    shutil.copyfile(small_image, disk)
    cli.ok("vm", "add", "db1", "--disk", str(disk))
    shown = cli.ok("vm", "update", "db1", "--quiesce-timeout", "120").json()
    assert shown == {"vm": "db1", "quiesceTimeoutSeconds": 120, "quiesceTimeoutSource": "vm",
                     "frozenWindowSeconds": 10.0}  # fmt: skip
    tuned = replace(cli, extra_env={"VMVAULT_QUIESCE_TIMEOUT": "90", "VMVAULT_FROZEN_WINDOW": "5"})
    shown = tuned.ok("vm", "update", "db1", "--quiesce-timeout", "0").json()
    assert shown["quiesceTimeoutSeconds"] == 90 and shown["quiesceTimeoutSource"] == "setting", shown
    assert shown["frozenWindowSeconds"] == 5, shown


def test_a_bad_budget_is_refused_with_nothing_changed(cli: Cli, small_image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    shutil.copyfile(small_image, disk)
    cli.ok("vm", "add", "db1", "--disk", str(disk))
    cli.ok("vm", "update", "db1", "--quiesce-timeout", "45")
    for bad in ("-5", "100000"):
        r = cli.fails("vm", "update", "db1", "--quiesce-timeout", bad)
        assert r.returncode == 64 and "out of range" in r.stderr and "1-3600" in r.stderr, r
    assert cli.ok("vm", "update", "db1", "--quiesce-timeout", "45").json()["quiesceTimeoutSeconds"] == 45
    r = cli.fails("vm", "update", "nosuch", "--quiesce-timeout", "30")
    assert "VM 'nosuch' not found" in r.stderr, r
    r = cli.fails("vm", "add", "db2", "--disk", str(disk), "--quiesce-timeout", "30")
    assert "--quiesce-timeout goes with --qmp or --libvirt" in r.stderr, r
    assert "db2" not in [v["name"] for v in cli.ok("vm", "list").json()]


POLICY = {
    "schedulePolicy": {"scheduleRunFrequency": "Daily", "scheduleRunTimes": ["2020-01-01T23:00:00Z"]},
    "retentionPolicy": {"dailySchedule": {"retentionDuration": {"count": 7, "durationType": "Days"}}},
}


@pytest.mark.parametrize(("value", "crash_only"), [(None, False), ("Default", False), ("OnlyCrashConsistent", True)])
def test_snapshot_consistency_type(value: str | None, crash_only: bool) -> None:
    props = {**POLICY, **({"snapshotConsistencyType": value} if value else {})}
    parse_policy(props)
    assert only_crash_consistent(props) is crash_only
    assert only_crash_consistent({"properties": props}) is crash_only


def test_an_unknown_snapshot_consistency_type_is_refused() -> None:
    with pytest.raises(PolicyError, match="snapshotConsistencyType"):
        parse_policy({**POLICY, "snapshotConsistencyType": "OnlyAppConsistent"})
