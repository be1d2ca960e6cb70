"""`kill -9` of `vmvault serve` in the middle of a backup, and SIGTERM: no point, a healthy vault.

The engine's test hook VMVAULT_TEST_PAUSE_AFTER_PACK=<seconds> sleeps after each data pack it
publishes, so the kill lands while the backup runs, after it wrote data, without racing it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli, far_time_zone, vault_files, wait_for
from test_scheduler import Serve, ext4_image

pytestmark = pytest.mark.xdist_group("realtime")  # real-time budgets: never beside another of them (docs/testing.md)


@pytest.mark.timeout(300)
def test_kill_9_of_serve_mid_backup_then_sigterm(tmp_path: Path) -> None:
    cli = HostKeyCli(home=tmp_path / "home")
    disk = ext4_image(tmp_path / "disk.raw", 40)  # incompressible: three 16 MiB data packs
    # DefaultPolicy's slot hours away: a run across 20:30 UTC would queue a scheduled backup between
    # the two `backup now`s below (the second then refused as busy).
    cli.vault_create("v1", tmp_path / "v1", time_zone=far_time_zone())
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok
    paused = Cli(home=cli.home, extra_env={"VMVAULT_TEST_PAUSE_AFTER_PACK": "4"})

    serve = Serve(paused)
    killed = False
    try:
        job = cli.ok("backup", "now", "vm1", "--no-wait").json()
        assert job["properties"]["status"] == "InProgress"

        def far_enough() -> bool:
            shown = cli.ok("job", "show", job["name"]).json()
            percent = shown["properties"]["extendedInfo"]["progressPercentage"]
            return percent >= 30 and bool(vault_files(tmp_path / "v1", "data"))

        wait_for(far_enough, 120, "the backup to pass 30 % and publish a data pack", interval=0.3)
        running = cli.ok("job", "show", job["name"]).json()["properties"]
        assert running["status"] == "InProgress" and running["extendedInfo"]["owner"]["pid"] == serve.proc.pid
        serve.proc.send_signal(signal.SIGKILL)
        killed = True
        assert serve.stop(timeout=30) == -signal.SIGKILL
    finally:
        if not killed:
            serve.stop(signal.SIGKILL)

    # The next start of the service marks the job Failed, with a message.
    again = Serve(paused)
    try:
        failed = cli.ok("job", "show", job["name"]).json()["properties"]
        assert failed["status"] == "Failed", failed
        (error,) = failed["errorDetails"]
        assert error["errorCode"] == "process_died"
        assert f"pid {serve.proc.pid}" in error["errorString"] and "no recovery point" in error["errorString"]
        assert error["recommendations"] and error["recommendations"][0]
        assert cli.points("vm1") == []
        assert cli.ok("item", "show", "vm1").json()["properties"]["lastBackupStatus"] == "Failed"

        # SIGTERM while the next backup runs: it is cancelled cleanly and the service exits 0. New
        # random data, so the backup must write packs: under load the killed backup may have published
        # all of its packs before the kill, and the next one would then write none (all deduplicated).
        ext4_image(tmp_path / "disk2.raw", 40).replace(disk)
        queued = time.time() - 1  # file times have a coarse grain on some file systems
        second = cli.ok("backup", "now", "vm1", "--no-wait").json()

        def writing() -> bool:
            # A data pack written since the second backup was queued (the killed backup's packs may be
            # collected and written again under the same names meanwhile: the set of names alone can
            # stay the same).
            shown: dict[str, Any] = cli.ok("job", "show", second["name"]).json()["properties"]
            return shown["extendedInfo"]["owner"] is not None and any(
                _written_since(p, queued) for p in vault_files(tmp_path / "v1", "data")
            )

        wait_for(writing, 120, "the second backup to publish a data pack", interval=0.3)
    finally:
        code = again.stop(signal.SIGTERM)
    assert code == 0
    cancelled = cli.ok("job", "show", second["name"]).json()["properties"]
    assert cancelled["status"] == "Cancelled", cancelled
    assert "SIGTERM" in cancelled["errorDetails"][0]["errorString"]
    assert cli.points("vm1") == []
    r = cli.vault_verify("v1")
    assert r.ok, f"vault does not verify after a killed and a cancelled backup:\n{r}"

    # And the vault still takes a backup that restores.
    r = cli.backup_now("vm1")
    assert r.ok, str(r)
    assert len(cli.points("vm1")) == 1


def _written_since(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime >= when
    except FileNotFoundError:  # collected meanwhile
        return False
