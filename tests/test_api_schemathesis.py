"""schemathesis over every operation of the OpenAPI document (count asserted), with a Contributor token.

Fixed seed, bounded examples, sandboxed home: no server error, every error is {code, message, hint}.
Paths the server would write to (a vault's storageDir, a restore's targetDir) are pinned under the
sandbox, whatever was generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, seed, settings

from api_support import make_ext4_image, sandbox
from vmvault.service import protection, vaults, vms

OPERATIONS = 35  # every /api/v1 route (tests/test_api_roles.py TABLE)
EXAMPLES = 8


def test_no_server_error_on_any_operation(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        vaults.create_vault(box.ctx, "main")
        vms.add_vm(box.ctx, "vm1", [make_ext4_image(tmp_path / "vm1.raw", 8)])
        protection.enable_protection(box.ctx, "vm1", "main")
        headers = box.headers(box.token("BackupContributor"))
        schema = schemathesis.openapi.from_asgi("/openapi.json", box.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == OPERATIONS + 1  # + the public GET /health
        scratch = tmp_path / "scratch"
        failures: list[str] = []
        statuses: dict[int, int] = {}
        for number, operation in enumerate(operations):

            @seed(20261125 + number)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def run(case: Any) -> None:
                if isinstance(case.body, dict):
                    for key in ("storageDir", "targetDir"):
                        if key in case.body:
                            case.body[key] = str(scratch / "dir")
                response = case.call(headers=headers)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                label = f"{case.method} {case.formatted_path} -> {response.status_code}"
                if response.status_code >= 500:
                    failures.append(f"{label}: {response.text[:300]}")
                elif response.status_code >= 400:
                    body = response.json()
                    if not {"code", "message", "hint"} <= body.keys():
                        failures.append(f"{label}: not an error document: {body}")

            run()
        assert not failures, "\n".join(failures[:20])
        assert sum(statuses.values()) >= len(operations), statuses
        assert any(200 <= status < 300 for status in statuses), statuses
