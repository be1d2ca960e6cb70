"""A throttling store (503/429 for a share of requests, from a fault-injecting proxy in front of
Azurite) slows a backup down but it completes, verifies and restores byte-identical; the job
records how many requests were retried."""

from __future__ import annotations

from pathlib import Path

import pytest

import objstores
from helpers import Cli, assert_same_image, head_of_image, protect

pytestmark = pytest.mark.slow


def test_a_backup_through_a_throttling_store_completes_and_verifies(
    azurite: objstores.Server, small_image: Path, tmp_path: Path
) -> None:
    proxy = objstores.ThrottlingProxy(azurite.port, share=0.15)
    try:
        var = f"VMVAULT_AZURE_{objstores.DEV_ACCOUNT.upper()}"
        env = {var: objstores.connection_string(objstores.DEV_ACCOUNT, objstores.DEV_KEY, proxy.port)}
        disk = head_of_image(small_image, tmp_path / "disk.raw", 8 << 20)
        prot = protect(Cli(home=tmp_path / "home", extra_env=env), disk, objstores.fresh_azure_url())  # type: ignore[arg-type]
        cli = prot.cli
        backup = cli.backup_now(prot.vm)
        assert backup.ok, str(backup)
        assert proxy.throttled > 5, (proxy.throttled, proxy.forwarded)
        job = next(j for j in cli.jobs() if j["properties"]["operation"] == "Backup")
        retries = cli.ok("job", "show", job["name"]).json()["properties"]["extendedInfo"]["storageRetries"]
        assert retries > 0, "the job does not say its requests were retried"
        verify = cli.vault_verify(prot.vault)
        assert verify.ok, str(verify)
        (rp,) = cli.point_ids(prot.vm)
        r = cli.restore_disks(prot.vm, rp, tmp_path / "out")
        assert r.ok, str(r)
        (restored,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".raw"]
        assert_same_image(restored, disk)
    finally:
        proxy.stop()
