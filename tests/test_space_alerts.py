"""Vault free-space alerts: a vault on a real small file system (a 64 MiB tmpfs) filled past the
threshold raises one alert to a real webhook and SMTP server, cleared when space is freed; the
metrics report the same free space."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PASSPHRASE, Cli
from test_notify import Hooks, smtp, webhook  # noqa: F401 (fixtures)

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def metric(ctx: Any, name: str) -> float:
    from vmvault.service.metrics import render

    text, _type = render(ctx)
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("vault") == "v1":
                return float(sample.value)
    raise AssertionError(f"{name} not in the metrics")


def test_space_alert_raised_once_and_resolved(
    cli: Cli, small_fs: Path, webhook: tuple[str, Hooks], smtp: tuple[str, list[Any]]  # noqa: F811
) -> None:
    from vmvault.service import notify, space
    from vmvault.service.context import context
    from vmvault.settings import Settings

    url, hooks = webhook
    server, mails = smtp
    cli.vault_create("v1", small_fs / "v1")
    cli.ok("vault", "notify", "add", "v1", "--webhook", url)
    cli.ok("vault", "notify", "add", "v1", "--email", "ops@example.com", "--smtp", server)
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert space.check_space_alerts(ctx, 10.0) == []  # an empty 64 MiB file system
        filler = small_fs / "filler.bin"
        filler.write_bytes(os.urandom(60 * MiB))  # beside the vault, on its file system
        st = os.statvfs(small_fs)
        assert metric(ctx, "vmvault_vault_free_bytes") == st.f_bavail * st.f_frsize
        assert metric(ctx, "vmvault_vault_filesystem_bytes") == 64 * MiB
        (alert_id,) = space.check_space_alerts(ctx, 10.0)
        assert space.check_space_alerts(ctx, 10.0) == [], "raised once"
        assert notify.deliver_pending(ctx) == 2
        post = hooks.posts[0]["body"]
        assert post["event"] == "VaultSpaceLow" and post["alert"]["id"] == alert_id
        assert post["alert"]["freePercent"] < 10 and post["alert"]["thresholdPercent"] == 10.0
        message = message_from_bytes(mails[0].content)
        assert message["Subject"] == "[vmvault] Vault space low: v1"
        assert "vmvault vault gc v1" in message.get_payload(decode=True).decode()

        filler.unlink()
        assert space.check_space_alerts(ctx, 10.0) == [alert_id]
        assert notify.deliver_pending(ctx) == 2
        assert hooks.posts[1]["body"]["event"] == "VaultSpaceResolved"
        assert message_from_bytes(mails[1].content)["Subject"] == "[vmvault] Vault space back: v1"
        assert space.check_space_alerts(ctx, 10.0) == []
