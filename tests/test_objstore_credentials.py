"""A vault on object storage without credentials here: the error names the store and the variable to set.

Not a passphrase problem: the code is `storage_credentials` (exit 77), and nothing is created.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import Cli


def test_vault_create_on_azure_without_credentials_names_the_variable(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home", extra_env={"AZURE_STORAGE_CONNECTION_STRING": ""})
    r = cli.run("vault", "create", "v1", "--storage", "azure://fleetbackups/vault1")
    assert r.returncode == 77, str(r)
    error = json.loads(r.stderr.splitlines()[-1])["error"]
    assert error["code"] == "storage_credentials", error
    assert "fleetbackups" in error["message"]
    assert "VMVAULT_AZURE_FLEETBACKUPS" in error["recommendedAction"]
    assert cli.ok("vault", "list").json() == []


def test_vault_create_on_s3_without_credentials_names_the_variables(tmp_path: Path) -> None:
    none = str(tmp_path / "none")
    no_aws = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_CONFIG_FILE": none,
              "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # fmt: skip
    cli = Cli(home=tmp_path / "home", extra_env=no_aws)
    r = cli.run("vault", "create", "v1", "--storage", "s3://fleet-backups/vault1")
    assert r.returncode == 77, str(r)
    error = json.loads(r.stderr.splitlines()[-1])["error"]
    assert error["code"] == "storage_credentials", error
    assert "AWS_ACCESS_KEY_ID" in error["recommendedAction"]
    assert cli.ok("vault", "list").json() == []
