"""GET /metrics: a known sequence of jobs run through the real CLI, then `vmvault serve` scraped and
parsed with prometheus_client's own parser; the same text on the open --metrics-address."""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from helpers import Cli, far_time_zone
from portal_support import _owner_token
from test_scheduler import Serve

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str, token: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def status_of(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def vault_file_bytes(storage: Path) -> int:
    return sum(os.lstat(os.path.join(root, f)).st_size for root, _d, files in os.walk(storage) for f in files)


def test_metrics_match_the_jobs_run(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB) + os.urandom(MiB))
    # DefaultPolicy's slot hours away: run across 20:30 UTC, the serve below queued a scheduled backup
    # (a job more than `jobs`; the two scrapes could see it in two states)
    cli.vault_create("v1", tmp_path / "v1", time_zone=far_time_zone())
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok  # DefaultPolicy: daily
    first = cli.ok(*cli.backup_args("vm1")).json()
    second = cli.ok(*cli.backup_args("vm1")).json()  # the same data again: all deduplicated
    disk.unlink()
    failed = cli.fails(*cli.backup_args("vm1")).json()
    statuses = (first["properties"]["status"], second["properties"]["status"], failed["properties"]["status"])
    assert statuses == ("Completed", "Completed", "Failed")
    jobs = cli.jobs()
    points = cli.points("vm1")
    assert len(points) == 2

    port = free_port()
    serve = Serve(cli, "--metrics-address", f"127.0.0.1:{port}", "--retention-every", "0")
    try:
        base = serve.announce.split("listening on ", 1)[1].split(" ", 1)[0]
        assert f"metrics on http://127.0.0.1:{port}/metrics" in serve.announce, serve.announce
        token_line = serve.proc.stdout.readline() if serve.proc.stdout else ""
        token = _owner_token(token_line)  # serve names the 0600 file holding it
        assert status_of(f"{base}/metrics", None) == 401
        assert status_of(f"{base}/metrics", "not-a-token") == 401
        reader = cli.ok("token", "create", "--role", "BackupReader", "--name", "prom").json()
        assert status_of(f"{base}/metrics", token) == 200  # the first-run Owner token
        m = scrape(f"{base}/metrics", reader["token"])  # the least role reads it
        open_m = scrape(f"http://127.0.0.1:{port}/metrics", None)
    finally:
        assert serve.stop(signal.SIGTERM) == 0

    check_values(m, jobs, points, tmp_path / "v1", second)
    # the open address serves the same catalog numbers (bar what changed in between: none)
    for key in [k for k in m if k[0].startswith(("vmvault_jobs_total", "vmvault_item_last"))]:
        assert open_m[key] == m[key], key


def point_time(point: dict[str, Any]) -> datetime:
    """recoverypoint list's time (flat, or in Azure's shape: properties.recoveryPointTime)."""
    from vmvault.catalog.clock import from_iso

    return from_iso(point.get("time") or point["properties"]["recoveryPointTime"])


def check_values(
    m: dict[Any, float], jobs: list[dict[str, Any]], points: list[dict[str, Any]], storage: Path, second: Any
) -> None:
    def get(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    by_kind: dict[tuple[str, str], int] = {}
    for job in jobs:
        kind = (job["properties"]["operation"], job["properties"]["status"])
        by_kind[kind] = by_kind.get(kind, 0) + 1
    assert by_kind[("Backup", "Completed")] == 2 and by_kind[("Backup", "Failed")] == 1, by_kind
    for (operation, status), n in by_kind.items():
        assert get("vmvault_jobs_total", operation=operation, status=status) == n, (operation, status)
    assert get("vmvault_job_duration_seconds_count", operation="Backup") == 3
    assert get("vmvault_job_duration_seconds_bucket", operation="Backup", le="+Inf") == 3
    read = sum(j["properties"]["extendedInfo"]["bytesRead"] for j in jobs if j["properties"]["operation"] == "Backup")
    assert read > 0 and get("vmvault_job_read_bytes_total", operation="Backup") == read

    times = [point_time(p) for p in points]
    labels = {"vm": "vm1", "vault": "v1", "policy": "DefaultPolicy"}
    last = get("vmvault_item_last_successful_backup_timestamp_seconds", **labels)
    assert abs(last - max(times).timestamp()) < 1e-3
    deadline = get("vmvault_item_rpo_deadline_timestamp_seconds", **labels)
    assert last < deadline <= last + 25 * 3600  # daily policy: the next slot + 1 h grace
    assert get("vmvault_item_rpo_breached", **labels) == 0

    assert get("vmvault_vault_recovery_points", vault="v1") == 2
    assert get("vmvault_vault_stored_bytes", vault="v1") == vault_file_bytes(storage)
    logical, unique = get("vmvault_vault_logical_bytes", vault="v1"), get("vmvault_vault_unique_bytes", vault="v1")
    assert logical == 2 * 3 * MiB  # two points of 3 MiB of non-zero data each
    assert unique == 3 * MiB  # stored once
    assert get("vmvault_vault_dedup_ratio", vault="v1") == 2.0
    assert 0.9 < get("vmvault_vault_compression_ratio", vault="v1") < 1.1  # random data does not compress
    assert get("vmvault_vault_objects", vault="v1", type="data") >= 1


def test_scheduler_delay_and_queue(tmp_path: Path) -> None:
    """A slot missed while the service was down: queued (vmvault_jobs_queued), then claimed by a worker;
    the delay is the claim's time minus the slot's (injected scheduler clock, as test_scheduler.py)."""
    from vmvault.catalog import repos
    from vmvault.catalog.clock import from_iso
    from vmvault.service import metrics, protection, scheduler, vaults, vms, worker
    from vmvault.service.context import context
    from vmvault.settings import Settings

    def values(ctx: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text, _ = metrics.render(ctx)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text.decode()) for s in f.samples}  # fmt: skip

    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    with context(Settings(home=tmp_path / "home", passphrase="correct horse battery staple")) as ctx:
        vaults.create_vault(ctx, "v1", storage_dir=tmp_path / "v1")
        vms.add_vm(ctx, "vm1", [disk])
        protection.enable_protection(ctx, "vm1", "v1")  # DefaultPolicy: 20:30 UTC
        with ctx.catalog.write() as s:
            repos.update_protected_item(s, repos.get_vm(s, "vm1").id, schedule_anchor="2026-03-26T12:00:00.000000Z")
        (queued,) = scheduler.tick(ctx, datetime.fromisoformat("2026-03-29T09:00:00+00:00"))
        m = values(ctx)
        assert m[("vmvault_jobs_queued", ())] == 1
        assert ("vmvault_scheduler_delay_seconds", (("vm", "vm1"),)) not in m  # not started yet
        job = worker.claim_next(ctx)
        assert job is not None and job.id == queued
        m = values(ctx)
        assert m[("vmvault_jobs_queued", ())] == 0
        delay = (from_iso(job.details["claimedAt"]) - from_iso("2026-03-26T20:30:00.000000Z")).total_seconds()
        assert m[("vmvault_scheduler_delay_seconds", (("vm", "vm1"),))] == delay
