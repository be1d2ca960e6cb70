"""`kill -9` of a backup after it published a pack: no partial point, a healthy vault, a Failed job.

The engine's test-only hook VMVAULT_TEST_PAUSE_AFTER_PACK=<seconds> sleeps after publishing each
data pack, so the kill lands between a published pack and the end of the job without racing it.
"""

from __future__ import annotations

import signal
from pathlib import Path

from helpers import Cli, assert_same_image, copy_image, mutate_image, rp_id, vault_files, wait_for
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)


def test_kill_9_after_a_pack_leaves_no_point_and_a_failed_job(small_image: Path, tmp_path: Path) -> None:
    disk = copy_image(small_image, tmp_path / "disk.raw")
    prot = protect(Cli(home=tmp_path / "home"), disk, tmp_path / "vault")
    cli = prot.cli
    r = cli.backup_now(prot.vm)
    assert r.ok, str(r)
    points_before = cli.point_ids(prot.vm)
    assert len(points_before) == 1
    jobs_before = {j["name"] for j in cli.jobs()}

    # Change enough (incompressible) data that the next backup writes at least one new pack.
    mutate_image(disk, seed=5, fraction=0.4)
    packs_before = set(vault_files(prot.storage, "data"))

    paused = Cli(home=cli.home, extra_env={"VMVAULT_TEST_PAUSE_AFTER_PACK": "60"})
    proc = paused.popen(*cli.backup_args(prot.vm))
    try:
        wait_for(lambda: set(vault_files(prot.storage, "data")) - packs_before or proc.poll() is not None,
                 timeout=120, what="the backup to publish a data pack")
        assert proc.poll() is None, f"backup ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert cli.point_ids(prot.vm) == points_before, "a killed backup must not publish a recovery point"
    r = cli.vault_verify(prot.vault)
    assert r.ok, f"vault does not verify after a killed backup:\n{r}"

    killed = [j for j in cli.jobs() if j["name"] not in jobs_before and j["properties"]["operation"] == "Backup"]
    assert len(killed) == 1, f"expected the killed backup job in the job list: {killed}"
    assert killed[0]["properties"]["status"] == "Failed", f"the killed job should show as Failed: {killed[0]}"
    assert killed[0]["properties"]["errorDetails"], f"a Failed job should say why: {killed[0]}"

    r = cli.backup_now(prot.vm)
    assert r.ok, str(r)
    after = cli.points(prot.vm)
    assert len(after) == 2, after
    new = rp_id(after[-1])
    assert new not in points_before
    r = cli.restore_disks(prot.vm, new, tmp_path / "out")
    assert r.ok, str(r)
    (restored,) = list((tmp_path / "out").iterdir())
    assert_same_image(restored, disk)
    r = cli.vault_verify(prot.vault)
    assert r.ok, str(r)
