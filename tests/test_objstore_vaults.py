"""Vaults on object storage, end to end through the CLI: Azure Blob (Azurite) and S3 (moto).

The same backup and restore as on a directory: a full and an incremental point restore
byte-identical; kill -9 of a backup into object storage leaves no partial point and the next
backup succeeds; the credentials never reach the catalog, the logs, the job records or the vault.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

import objstores
from helpers import Cli, assert_same_image, copy_image, head_of_image, mutate_image, protect, wait_for
from vmvault.vault.backends import open_backend

pytestmark = pytest.mark.slow


@pytest.fixture(params=["azure", "s3"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str]]:
    """(a fresh vault URL, the environment holding its credentials)."""
    server: objstores.Server = request.getfixturevalue("azurite" if request.param == "azure" else "moto_s3")
    for var, value in server.env.items():
        monkeypatch.setenv(var, value)  # for this process's look at the store
    url = objstores.fresh_azure_url() if request.param == "azure" else objstores.fresh_s3_url()
    return url, dict(server.env)


def _packs(url: str) -> set[str]:
    return {info.name for info in open_backend(url).list("data")}


def _points(url: str) -> set[str]:
    return {info.name for info in open_backend(url).list("points")}


def test_backup_restore_and_kill_9_on_object_storage(
    store: tuple[str, dict[str, str]], small_image: Path, tmp_path: Path
) -> None:
    url, env = store
    disk = head_of_image(small_image, tmp_path / "disk.raw", 16 << 20)  # small: the store, not the disk, is tested
    prot = protect(Cli(home=tmp_path / "home", extra_env=env), disk, url)  # type: ignore[arg-type]
    cli = prot.cli
    assert cli.ok("vault", "show", prot.vault).json()["properties"]["storageDir"] == url

    # Full, then incremental: both restore byte-identical.
    expected = [copy_image(disk, tmp_path / "expected-0.raw")]
    assert cli.backup_now(prot.vm).ok
    mutate_image(disk, seed=7, fraction=0.05)
    expected.append(copy_image(disk, tmp_path / "expected-1.raw"))
    second = cli.backup_now(prot.vm)
    assert second.ok, str(second)
    points = cli.point_ids(prot.vm)
    assert len(points) == 2
    for n, rp in enumerate(points):
        out = tmp_path / f"out-{n}"
        r = cli.restore_disks(prot.vm, rp, out)
        assert r.ok, str(r)
        (restored,) = [p for p in out.iterdir() if p.is_file()]
        assert_same_image(restored, expected[n])
        shutil.rmtree(out)

    # kill -9 after a pack reached the store: no partial point, and the next backup succeeds.
    mutate_image(disk, seed=8, fraction=0.3)
    packs_before, points_before = _packs(url), _points(url)
    paused = Cli(home=cli.home, extra_env={**env, "VMVAULT_TEST_PAUSE_AFTER_PACK": "60"})
    proc = paused.popen(*cli.backup_args(prot.vm))
    try:
        wait_for(lambda: bool(_packs(url) - packs_before) or proc.poll() is not None, 120,
                 "the backup to publish a data pack", interval=0.5)  # fmt: skip
        assert proc.poll() is None, f"backup ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert _points(url) == points_before, "a killed backup left a recovery point"
    assert cli.point_ids(prot.vm) == points
    third = cli.backup_now(prot.vm)
    assert third.ok, str(third)
    assert len(cli.point_ids(prot.vm)) == 3
    verify = cli.vault_verify(prot.vault)
    assert verify.ok, str(verify)

    # Object storage records how many requests were retried; the credentials are nowhere.
    newest = next(j for j in cli.jobs() if j["properties"]["operation"] == "Backup")
    shown = cli.ok("job", "show", newest["name"]).json()
    assert shown["properties"]["extendedInfo"]["storageRetries"] == 0, shown  # no throttling here
    secrets = [value.split("AccountKey=")[1].split(";")[0] if "AccountKey=" in value else value
               for var, value in env.items() if var.startswith("VMVAULT_AZURE") or var == "AWS_SECRET_ACCESS_KEY"]
    secrets = [s for s in secrets if len(s) > 6] + ([] if "s3://" in url else [objstores.DEV_KEY])  # fmt: skip
    leaked = [str(f) for f in cli.home.rglob("*") if f.is_file() and any(s.encode() in f.read_bytes() for s in secrets)]
    assert leaked == [], f"credentials written to {leaked}"
    everything = b"".join(open_backend(url).get(i.name) for i in open_backend(url).list())
    assert not any(s.encode() in everything for s in secrets)

    # Another host imports the vault from its URL (credentials from its own environment).
    other = Cli(home=tmp_path / "home2", extra_env=env)
    imported = other.vault_import(url, "v9")  # type: ignore[arg-type]
    assert imported.ok, str(imported)
    assert other.point_ids(prot.vm) == cli.point_ids(prot.vm)
