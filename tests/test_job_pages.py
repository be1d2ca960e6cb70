"""GET /api/v1/jobs pages in the catalog (issue 20: the job list stays paginated and fast with 100,000 jobs).

The catalog answers one page (LIMIT/OFFSET in its SQL, in the order of the 0042 index), not the
whole table cut in Python; a vault-scoped token's pages are full pages of its vault's jobs. On
SQLite and on a real PostgreSQL 15. GET /items reads its items' figures in a few queries, not eight
per item. bench/scale_bench.py measures both lists with 200 VMs and 100,000 jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

from api_support import sandbox
from vmvault.catalog.clock import to_iso
from vmvault.catalog.models import JobRow
from vmvault.service import vaults


def job_rows(count: int) -> list[dict[str, Any]]:
    """count ended jobs, vault b for two in three, start times in pairs (ties the order must break)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        start = to_iso(base + timedelta(minutes=i // 2))
        rows.append({
            "id": str(uuid.uuid4()), "operation": "Backup", "status": "Completed", "vm": f"vm{i % 7}",
            "vault": "a" if i % 3 == 0 else "b", "start_time": start, "end_time": start, "progress": {},
            "error": None, "owner_pid": 1, "owner_boot_id": "test", "heartbeat": start, "cancel_requested": False,
        })
    return rows


@contextmanager
def job_selects(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs on jobs this engine runs meanwhile (statement, parameters)."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def all_pages(box: Any, token: str, path: str) -> list[list[dict[str, Any]]]:
    pages = []
    while path:
        r = box.call("GET", path, token)
        assert r.status_code == 200, r.text
        pages.append(r.json()["value"])
        path = r.json()["nextLink"]
    return pages


def test_job_list_pages_are_cut_by_the_catalog_in_a_stable_order(tmp_path: Path, catalog_url: str | None) -> None:
    with sandbox(tmp_path / "home", catalog_url=catalog_url) as box:
        for name in ("a", "b"):
            vaults.create_vault(box.ctx, name, storage_dir=tmp_path / name)
        rows = job_rows(450)
        with box.ctx.catalog.write() as s:
            s.execute(insert(JobRow), rows)
        newest_first = [r["id"] for r in sorted(rows, key=lambda r: (r["start_time"], r["id"]), reverse=True)]
        reader = box.token("BackupReader")

        with job_selects(box.ctx.catalog.engine) as selects:
            pages = all_pages(box, reader, "/api/v1/jobs")
        assert [len(p) for p in pages] == [200, 200, 50]
        assert [j["name"] for p in pages for j in p] == newest_first  # every job once, ties included
        lists = [(sql, params) for sql, params in selects if "ORDER BY" in sql]
        assert len(lists) == 3 and all("LIMIT" in sql for sql, _ in lists), lists  # not the whole table

        # A vault-scoped token: full pages of its vault's jobs (300 of the 450), not pages thinned out.
        scoped = all_pages(box, box.token("BackupReader", vault="b"), "/api/v1/jobs?$top=200")
        assert [len(p) for p in scoped] == [200, 100]
        assert [j["name"] for p in scoped for j in p] == [i for i in newest_first if i in
                                                          {r["id"] for r in rows if r["vault"] == "b"}]

        # limit caps the whole list; its pages still follow $top.
        capped = all_pages(box, reader, "/api/v1/jobs?limit=250&$top=200")
        assert [j["name"] for p in capped for j in p] == newest_first[:250] and len(capped) == 2
        past = box.call("GET", "/api/v1/jobs?$skipToken=" + "9" * 20, reader)  # beyond SQL's 64-bit OFFSET
        assert past.status_code == 200 and past.json() == {"value": [], "nextLink": None}, past.text
        vm_jobs = all_pages(box, reader, "/api/v1/jobs?vm=vm3&$top=50")
        assert [j["name"] for p in vm_jobs for j in p] == [i for i in newest_first if i in
                                                           {r["id"] for r in rows if r["vm"] == "vm3"}]


def test_cancelling_jobs_are_chosen_by_the_catalog_before_the_limit(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        vaults.create_vault(box.ctx, "a", storage_dir=tmp_path / "a")
        rows = job_rows(30)
        for i, row in enumerate(rows):
            row.update(vault="a", status="InProgress", cancel_requested=i < 3, end_time=None, vm=f"vm{i}")
        with box.ctx.catalog.write() as s:
            s.execute(insert(JobRow), rows)
        r = box.call("GET", "/api/v1/jobs?status=cancelling&limit=2", box.token("BackupReader"))
        assert r.status_code == 200, r.text
        found = r.json()["value"]
        assert [j["properties"]["status"] for j in found] == ["Cancelling", "Cancelling"]
        newest = sorted(rows[:3], key=lambda r: (r["start_time"], r["id"]), reverse=True)[:2]
        assert [j["name"] for j in found] == [r["id"] for r in newest]  # the newest two of the three


def test_item_list_reads_the_catalog_in_a_few_queries_with_each_items_figures(tmp_path: Path) -> None:
    """GET /items with 200 VMs was eight queries per item; now one per item (its last ended backup) and
    five for all; each item still shows its own points, oldest kept point and running backup."""
    from vmvault.catalog.models import RecoveryPointRow
    from vmvault.service import protection, vms

    with sandbox(tmp_path / "home") as box:
        vaults.create_vault(box.ctx, "a", storage_dir=tmp_path / "a")
        names = [f"vm{i}" for i in range(4)]
        for name in names:
            disk = tmp_path / f"{name}.raw"
            disk.write_bytes(bytes(1 << 20))
            vms.add_vm(box.ctx, name, [disk])
            protection.enable_protection(box.ctx, name, "a")
        with box.ctx.catalog.read() as s:
            ids = {vm.name: vm.id for vm in s.query(vms.VmRow)}
            vault_id = vaults.repos.get_vault(s, "a").id
        point = {"vault_id": vault_id, "consistency": "CrashConsistent", "retain_until": "2099-01-01", "disks": []}
        running = job_rows(1)[0] | {"vault": "a", "vm": "vm1", "status": "InProgress", "end_time": None}
        with box.ctx.catalog.write() as s:
            s.execute(insert(RecoveryPointRow), [
                point | {"id": "p1", "vm_id": ids["vm1"], "time": "2026-01-01T00:00:00.000000Z", "soft_deleted": True},
                point | {"id": "p2", "vm_id": ids["vm1"], "time": "2026-01-02T00:00:00.000000Z"},
                point | {"id": "p3", "vm_id": ids["vm1"], "time": "2026-01-03T00:00:00.000000Z"},
            ])  # fmt: skip
            s.execute(insert(JobRow), [running])
        with job_selects(box.ctx.catalog.engine) as selects:
            r = box.call("GET", "/api/v1/items", box.token("BackupReader"))
        assert r.status_code == 200, r.text
        found = {i["properties"]["friendlyName"]: i["properties"] for i in r.json()["value"]}
        assert sorted(found) == names
        vm1 = found["vm1"]
        assert vm1["lastRecoveryPoint"] == "2026-01-03T00:00:00.000000Z"
        assert vm1["extendedInfo"]["recoveryPointCount"] == 3
        assert vm1["extendedInfo"]["oldestRecoveryPoint"] == "2026-01-02T00:00:00.000000Z"  # p1 is soft-deleted
        assert vm1["backupInProgress"] == running["id"] and found["vm2"]["backupInProgress"] is None
        assert found["vm2"]["lastRecoveryPoint"] is None
        assert len(selects) <= len(names) + 3, [sql[:80] for sql, _ in selects]  # was 8 per item
