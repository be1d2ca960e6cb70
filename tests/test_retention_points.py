"""Retention in the product: each point records its rules and expiry, `policy set` recomputes them,
the Retention job deletes what expired (manifest first), and leaves pinned points for later.

Scheduled points are recorded as the scheduler's backups are (record_new_point, scheduled=True);
time passes through the test-only clock offset VMVAULT_TEST_CLOCK_OFFSET_S.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import Cli, rp_id
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)
from test_gc import whole_mib_disk

DAY = 24 * 3600


def later(cli: Cli, days: float) -> Cli:
    return Cli(home=cli.home, extra_env={"VMVAULT_TEST_CLOCK_OFFSET_S": str(int(days * DAY))})


def iso_plus(text: str, days: int) -> str:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00")) + timedelta(days=days)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def by_id(cli: Cli, vm: str) -> dict[str, dict[str, Any]]:
    """Each point's properties by its name (the id --rp takes)."""
    return {rp_id(p): p["properties"] for p in cli.points(vm)}


def in_process(cli: Cli) -> Any:
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    return context(load_settings(str(cli.home)))


def test_points_follow_the_policy_and_policy_set_recomputes(small_image: Path, tmp_path: Path) -> None:
    from vmvault.service.retention import record_new_point

    disk = whole_mib_disk(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli, vm = prot.cli, prot.vm
    assert cli.backup_now(vm).ok
    (first,) = cli.point_ids(vm)
    point = by_id(cli, vm)[first]
    assert point["retentionRules"] == ["RetainUntil", "Latest"]

    with in_process(cli) as ctx, ctx.catalog.write() as s:
        record_new_point(s, first, scheduled=True, now=ctx.now())
    point = by_id(cli, vm)[first]
    # DefaultPolicy: daily points kept 180 days (UTC).
    assert point["retentionRules"] == ["Daily", "Latest"]
    assert point["recoveryPointProperties"]["expiryTime"] == iso_plus(point["recoveryPointTime"], 180)
    assert point["recoveryPointProperties"]["ruleName"] == "Daily"

    policy = cli.ok("policy", "show", "DefaultPolicy", "--vault", prot.vault).json()
    props = policy.get("properties", policy)
    props["retentionPolicy"]["dailySchedule"]["retentionDuration"]["count"] = 7
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    cli.ok("policy", "set", "DefaultPolicy", "--vault", prot.vault, "--file", str(tmp_path / "policy.json"))
    expiry = by_id(cli, vm)[first]["recoveryPointProperties"]["expiryTime"]
    assert expiry == iso_plus(point["recoveryPointTime"], 7)

    assert cli.backup_now(vm).ok  # on-demand, kept 30 days; it takes the rule Latest
    second = cli.point_ids(vm)[1]
    points = by_id(cli, vm)
    assert points[first]["retentionRules"] == ["Daily"]
    assert points[second]["retentionRules"] == ["RetainUntil", "Latest"]

    # Six days on nothing has expired; eight days on the scheduled point has, unless it is pinned.
    result = later(cli, 6).ok("retention", "run", "--no-gc").json()
    assert result["vaults"][0]["deletedPoints"] == []
    pin = _pin(cli, first)
    try:
        result = later(cli, 8).ok("retention", "run", "--no-gc").json()
        entry = result["vaults"][0]
        assert entry["deletedPoints"] == [] and [p["id"] for p in entry["deferredPoints"]] == [first], entry
    finally:
        _unpin(cli, pin)
    result = later(cli, 8).ok("retention", "run", "--no-gc").json()
    assert [p["id"] for p in result["vaults"][0]["deletedPoints"]] == [first]
    assert cli.point_ids(vm) == [second]
    assert not (prot.storage / "points" / first).exists()
    assert cli.vault_verify(prot.vault).ok


def _pin(cli: Cli, rp: str) -> Any:
    from vmvault.catalog import repos
    from vmvault.service.vaultio import opened_vault
    from vmvault.vault.lock import add_pin

    with in_process(cli) as ctx:
        with ctx.catalog.read() as s:
            (row,) = repos.list_vaults(s)
        with opened_vault(ctx, row) as vault:
            return row, add_pin(vault, vault.read_manifest(rp), "a test", 3600)


def _unpin(cli: Cli, pinned: Any) -> None:
    from vmvault.service.vaultio import opened_vault
    from vmvault.vault.lock import remove_pin

    row, pin = pinned
    with in_process(cli) as ctx, opened_vault(ctx, row) as vault:
        remove_pin(vault, pin.pin_id)
