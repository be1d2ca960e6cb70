"""Azure's JSON for scripts (#15): Azure's tutorial commands, with `vmvault` as the program name.

The CLI runs as a subprocess on a real vault; the API through its ASGI app over HTTP (TestClient).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from api_support import PASSPHRASE, sandbox
from helpers import Cli, assert_same_image, copy_image, protect
from vmvault.service import azure_shape


def _tsv(cli: Cli, *args: str) -> str:
    return cli.ok(*args, "-o", "tsv", json_output=False).stdout


def test_azure_tutorial_commands_give_azures_answers(cli: Cli, tmp_path: Path, small_image: Path) -> None:
    disk = copy_image(small_image, tmp_path / "disk.raw")
    prot = protect(cli, disk, tmp_path / "vault")
    assert cli.backup_now(prot.vm).ok
    assert cli.backup_now(prot.vm).ok

    # az backup recoverypoint list ... --query [0].name -o tsv: the newest point, a name --rp takes.
    az_args = ("--vault-name", prot.vault, "--container-name", prot.vm, "--item-name", prot.vm)
    newest = _tsv(cli, "recoverypoint", "list", *az_args, "--query", "[0].name").strip()
    listed = cli.ok("recoverypoint", "list", prot.vm).json()
    times = [p["properties"]["recoveryPointTime"] for p in listed]
    assert times == sorted(times, reverse=True) and len(times) == 2, "newest first, as Azure"
    assert newest == listed[0]["name"] and newest != listed[1]["name"]
    assert listed[0]["id"] == f"/vaults/{prot.vault}/backupProtectedItems/{prot.vm}/recoveryPoints/{newest}"
    assert listed[0]["type"] == azure_shape.POINT_TYPE
    assert listed[0]["properties"]["objectType"] == "IaasVMRecoveryPoint"
    assert listed[0]["properties"]["recoveryPointType"] in ("AppConsistent", "FileSystemConsistent", "CrashConsistent")
    r = cli.restore_disks(prot.vm, newest, tmp_path / "out")
    assert r.ok, str(r)
    assert_same_image(tmp_path / "out" / "disk0.raw", disk)
    r = cli.fails("recoverypoint", "list", prot.vm, "--vault-name", "elsewhere")
    assert r.returncode == 66 and "elsewhere" in r.stderr, r

    # A failed backup, then: az backup job list --query "[?properties.status=='Completed']".
    moved = tmp_path / "moved.raw"
    shutil.move(disk, moved)
    cli.fails(*cli.backup_args(prot.vm))
    shutil.move(moved, disk)
    jobs = cli.ok("job", "list").json()
    completed = cli.ok("job", "list", "--query", "[?properties.status=='Completed']").json()
    assert completed == [j for j in jobs if j["properties"]["status"] == "Completed"]
    assert [j["properties"]["operation"] for j in completed] == ["Restore", "Backup", "Backup", "ConfigureBackup"]
    (failed,) = cli.ok("job", "list", "--query", "[?properties.status=='Failed']").json()
    assert failed["id"] == f"/vaults/{prot.vault}/backupJobs/{failed['name']}"
    props = failed["properties"]
    assert (props["jobType"], props["backupManagementType"]) == ("AzureIaaSVMJob", "AzureIaasVM")
    assert (props["entityFriendlyName"], props["operation"]) == (prot.vm, "Backup")
    (error,) = props["errorDetails"]
    assert error["errorCode"] == "not_found" and str(disk) in error["errorString"] and error["recommendations"]
    assert props["duration"].startswith("PT") and props["duration"].endswith("S")

    # az backup item show -o json: Azure's item.
    item = cli.ok("item", "show", prot.vm, "--vault-name", prot.vault).json()
    assert (item["id"], item["name"], item["type"]) == (
        f"/vaults/{prot.vault}/backupProtectedItems/{prot.vm}", prot.vm, azure_shape.ITEM_TYPE
    )  # fmt: skip
    p = item["properties"]
    assert (p["protectedItemType"], p["friendlyName"], p["protectionState"]) == (
        "Microsoft.Compute/virtualMachines", prot.vm, "Protected"
    )  # fmt: skip
    health = (p["lastBackupStatus"], p["healthStatus"], p["protectionStatus"])
    assert health == ("Failed", "ActionRequired", "Unhealthy")
    assert (p["policyName"], p["policyId"]) == ("DefaultPolicy", f"/vaults/{prot.vault}/backupPolicies/DefaultPolicy")
    assert (p["isScheduledForDeferredDelete"], p["deferredDeleteTimeInUTC"]) == (False, None)
    assert p["extendedInfo"]["recoveryPointCount"] == 2
    assert p["extendedInfo"]["oldestRecoveryPoint"] == times[-1] and p["lastRecoveryPoint"] == times[0]

    # job show: Azure's extendedInfo (tasksList, propertyBag) with vmvault's own fields beside them.
    backup = next(j for j in completed if j["properties"]["operation"] == "Backup")
    shown = cli.ok("job", "show", backup["name"]).json()["properties"]["extendedInfo"]
    assert [t["taskId"] for t in shown["tasksList"]] == ["Transfer data to vault (disk0)"]
    assert shown["propertyBag"]["VM Name"] == prot.vm and shown["recoveryPoint"] == newest
    assert shown["progressPercentage"] == 100

    # az's -o tsv and -o table of a --query.
    lines = _tsv(cli, "job", "list").splitlines()
    assert lines == [f"{j['id']}\t{j['name']}\t\t{j['type']}" for j in jobs], "sorted keys; an object prints empty"
    assert _tsv(cli, "job", "list", "--query", "[].[name, properties.status]").splitlines() == [
        f"{j['name']}\t{j['properties']['status']}" for j in jobs
    ]
    assert _tsv(cli, "item", "show", prot.vm, "--query", "properties.isScheduledForDeferredDelete") == "false\n"
    table = cli.ok("job", "list", "--query", "[].{Operation: properties.operation, Status: properties.status}",
                   "-o", "table", json_output=False).stdout.splitlines()  # fmt: skip
    assert table[0].split() == ["Operation", "Status"] and set(table[1]) <= {"-", " "}
    rows = [[j["properties"]["operation"], j["properties"]["status"]] for j in jobs]
    assert [line.split() for line in table[2:]] == rows
    vault = cli.ok("vault", "show", prot.vault).json()
    assert (vault["id"], vault["type"], vault["properties"]["provisioningState"]) == (
        f"/vaults/{prot.vault}", "Microsoft.RecoveryServices/vaults", "Succeeded"
    )  # fmt: skip
    assert vault["properties"]["redundancySettings"]["standardTierStorageRedundancy"] == "LocallyRedundant"


def test_bad_query_is_refused_before_anything_runs(cli: Cli, tmp_path: Path) -> None:
    r = cli.fails("vault", "create", "v1", "--storage", str(tmp_path / "v1"), "--query", "[?name==")
    assert r.returncode == 64 and "--query" in r.stderr and "JMESPath" in r.stderr, r
    assert not (tmp_path / "v1").exists()
    r = cli.fails("vault", "list", "-o", "yaml")
    assert r.returncode == 64 and "-o tsv" in r.stderr, r


def test_vault_name_alias_and_cancelling_status(cli: Cli, tmp_path: Path, small_image: Path) -> None:
    """--vault-name works as --vault; a job asked to stop and still running shows as Cancelling."""
    from vmvault.catalog import repos
    from vmvault.service import backups
    from vmvault.service.context import context
    from vmvault.settings import Settings

    cli.vault_create("v1", tmp_path / "v1")
    assert cli.vm_add("vm1", copy_image(small_image, tmp_path / "d.raw")).ok
    enabled = cli.ok("protection", "enable", "--vm", "vm1", "--vault-name", "v1").json()
    assert enabled["properties"]["vaultName"] == "v1"
    settings = Settings(home=cli.home, passphrase=cli.passphrase)
    with context(settings) as ctx:
        queued = backups.backup_now(ctx, "vm1", queue=True).job  # no service runs: it stays InProgress
        with ctx.catalog.write() as s:  # what `job cancel` records while a running job's owner has not stopped yet
            repos.get_job(s, queued["id"]).cancel_requested = True
    (job,) = cli.ok("job", "list", "--status", "Cancelling").json()
    assert (job["name"], job["properties"]["status"]) == (queued["id"], "Cancelling")
    assert cli.ok("job", "show", queued["id"]).json()["properties"]["extendedInfo"]["cancelRequested"] is True
    assert cli.ok("job", "list", "--status", "Completed", "--query", "length(@)").json() == 1


def test_rest_lists_are_pages_with_next_links(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        owner = box.token("Owner")
        for name in ("a", "b", "c"):
            r = box.call("POST", "/api/v1/vaults", owner, json={"name": name, "passphrase": PASSPHRASE})
            assert r.status_code == 201 and r.json()["id"] == f"/vaults/{name}", r.text
        first = box.call("GET", "/api/v1/vaults?$top=2", owner).json()
        assert [v["name"] for v in first["value"]] == ["a", "b"] and first["nextLink"], first
        second = box.call("GET", first["nextLink"], owner).json()
        assert [v["name"] for v in second["value"]] == ["c"] and second["nextLink"] is None, second
        whole = box.call("GET", "/api/v1/vaults", owner).json()
        assert whole == {"value": first["value"] + second["value"], "nextLink": None}
        policies = box.call("GET", "/api/v1/vaults/a/policies?$top=1", owner).json()
        assert [p["name"] for p in policies["value"]] == ["DefaultPolicy"] and policies["nextLink"] is None
        for bad in ("$top=0", "$top=201", "$skipToken=x", "$skipToken=-1"):
            r = box.call("GET", f"/api/v1/vaults?{bad}", owner)
            assert r.status_code == 422 and r.json()["code"] == "invalid_input", (bad, r.text)
        jobs: Any = box.call("GET", "/api/v1/jobs?$top=5&operation=Backup", owner).json()
        assert jobs == {"value": [], "nextLink": None}
