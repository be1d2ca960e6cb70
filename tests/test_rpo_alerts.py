"""Missed-backup alerts: the RPO rule (domain.rpo), and an alert raised once and resolved once,
delivered to a real local webhook and a real SMTP server (aiosmtpd), as tests/test_notify.py does."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

from helpers import PASSPHRASE, Cli, wait_for
from test_notify import Hooks, smtp, webhook  # noqa: F401 (fixtures)
from test_scheduler import Serve

MiB = 1 << 20
HOUR = timedelta(hours=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_rpo_rule_daily_and_weekly() -> None:
    from vmvault.domain.policy import default_policy, parse_policy, to_properties
    from vmvault.domain.rpo import rpo_breached, rpo_deadline

    daily = default_policy()  # every day at 20:30 UTC
    since = utc("2026-03-01T08:00:00")
    last = utc("2026-03-01T20:31:00")
    assert rpo_deadline(daily, last, since, HOUR) == utc("2026-03-02T21:30:00")  # one interval + grace
    assert not rpo_breached(daily, last, since, utc("2026-03-02T21:29:59"), HOUR)
    assert rpo_breached(daily, last, since, utc("2026-03-02T21:30:01"), HOUR)
    # never backed up: counted from when protection started (its first slot must produce a point)
    assert rpo_deadline(daily, None, since, HOUR) == utc("2026-03-01T21:30:00")

    props = to_properties(daily)
    props["schedulePolicy"] = {**props["schedulePolicy"], "scheduleRunFrequency": "Weekly",
                               "scheduleRunDays": ["Monday"]}  # fmt: skip
    props["retentionPolicy"] = {
        "weeklySchedule": {"daysOfTheWeek": ["Monday"], "retentionDuration": {"count": 4, "durationType": "Weeks"}}
    }
    weekly = parse_policy(props)
    monday = utc("2026-03-02T20:31:00")
    assert rpo_deadline(weekly, monday, since, HOUR) == utc("2026-03-09T21:30:00")
    assert not rpo_breached(weekly, monday, since, utc("2026-03-08T12:00:00"), HOUR)


def setup_item(cli: Cli, tmp_path: Path, url: str, server: str | None) -> Path:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB) + b"vmvault" * 1000 + bytes(MiB))
    cli.vault_create("v1", tmp_path / "v1")
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok  # DefaultPolicy: daily at 20:30 UTC
    cli.ok("vault", "notify", "add", "v1", "--webhook", url)  # events "failed": alerts reach it too
    if server is not None:
        cli.ok("vault", "notify", "add", "v1", "--email", "ops@example.com", "--smtp", server)
    return disk


def newest_point(cli: Cli) -> tuple[str, datetime]:
    from vmvault.catalog.clock import from_iso

    points = [(p["name"], from_iso(p["properties"]["recoveryPointTime"])) for p in cli.points("vm1")]
    return max(points, key=lambda p: p[1])


def test_missed_backup_alert_fires_once_and_clears(
    cli: Cli, tmp_path: Path, webhook: tuple[str, Hooks], smtp: tuple[str, list[Any]]  # noqa: F811
) -> None:
    from vmvault.service import notify, rpo
    from vmvault.service.context import context
    from vmvault.settings import Settings

    url, hooks = webhook
    server, mails = smtp
    setup_item(cli, tmp_path, url, server)
    cli.ok(*cli.backup_args("vm1"))
    first_point, first_time = newest_point(cli)
    # The clock is injected (as tests/test_scheduler.py does): three days later, no backup since.
    late = first_time + timedelta(days=3)
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        (alert_id,) = rpo.check_alerts(ctx, now=late)
        assert notify.deliver_pending(ctx) == 2
        assert rpo.check_alerts(ctx, now=late + HOUR) == [], "an open alert is not raised again"
        assert notify.deliver_pending(ctx) == 0

    (post,) = [p["body"] for p in hooks.posts]
    assert post["event"] == "RpoBreached" and post["vault"] == "v1"
    alert = post["alert"]
    assert (alert["id"], alert["vm"], alert["lastGoodPoint"]) == (alert_id, "vm1", first_point)
    assert alert["resolved"] is None and alert["policy"] == "DefaultPolicy"
    (mail,) = mails
    message = message_from_bytes(mail.content)
    assert message["Subject"] == "[vmvault] RPO breached: vm1"
    text = message.get_payload(decode=True).decode()
    assert "missed its backup" in text and "vmvault backup now --vm vm1" in text

    cli.ok(*cli.backup_args("vm1"))  # a good backup (stamped by the real clock)
    second_point, second_time = newest_point(cli)
    with context(Settings(home=cli.home, passphrase=PASSPHRASE)) as ctx:
        assert rpo.check_alerts(ctx, now=second_time + timedelta(minutes=1)) == [alert_id]
        assert notify.deliver_pending(ctx) == 2
        assert rpo.check_alerts(ctx, now=second_time + timedelta(minutes=2)) == []
    resolved = hooks.posts[1]["body"]
    assert resolved["event"] == "RpoResolved" and resolved["alert"]["id"] == alert_id
    assert resolved["alert"]["resolvedBy"] == second_point and resolved["alert"]["resolved"]
    assert message_from_bytes(mails[1].content)["Subject"] == "[vmvault] RPO resolved: vm1"
    assert len(hooks.posts) == 2 and len(mails) == 2


def test_serve_raises_the_alert(cli: Cli, tmp_path: Path, webhook: tuple[str, Hooks]) -> None:  # noqa: F811
    """The scheduler loop of a real `vmvault serve` checks RPOs: its clock is 3 days ahead (test-only
    VMVAULT_TEST_CLOCK_OFFSET_S), so the never backed up item is past its first slot + grace."""
    url, hooks = webhook
    setup_item(cli, tmp_path, url, None)
    cli.extra_env["VMVAULT_TEST_CLOCK_OFFSET_S"] = str(3 * 24 * 3600)
    serve = Serve(cli, "--retention-every", "0")
    try:
        wait_for(lambda: any(p["body"].get("event") == "RpoBreached" for p in hooks.posts), 60, "the RPO alert")
    finally:
        assert serve.stop() == 0
    alerts = [p["body"]["alert"] for p in hooks.posts if p["body"].get("event") == "RpoBreached"]
    assert len(alerts) == 1 and alerts[0]["vm"] == "vm1", json.dumps(hooks.posts)
