"""schemathesis over every operation of the OpenAPI document (count asserted), with a Contributor token.

Every built-in check (server errors, status codes, content types, headers, response schemas,
positive data accepted, negative data rejected, ignored auth, unsupported methods), in three
passes: generated data aimed at the objects that exist (so success answers are checked against
their schemas too), generated data anywhere, and negative data. Fixed seed, bounded examples,
sandboxed home. Paths the server would write to (a vault's storageDir, a restore's targetDir) are
pinned under the sandbox, and notification targets to a closed local port, whatever was generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from api_support import make_ext4_image, sandbox
from vmvault.service import backups, protection, vaults, vms

OPERATIONS = 56  # every /api/v1 route (tests/test_api_roles.py TABLE)
EXAMPLES = 10
# Schema-valid requests may still be refused by the service's own checks, with the documented
# 422 (a policy document Azure would refuse, a name with characters vmvault does not allow) or
# 423 (a job already runs); every other status stays as schemathesis expects.
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "422", "423"]}}}
)
PASSES = (("known", GenerationMode.POSITIVE), ("any", GenerationMode.POSITIVE), ("any", GenerationMode.NEGATIVE))


def _pin_paths(case: Any, scratch: Path) -> None:
    """Where the server would write or send: under the sandbox, or a closed local port."""
    if isinstance(case.body, dict):
        for key, value in (("storageDir", str(scratch / "dir")), ("targetDir", str(scratch / "dir")),
                           ("webhook", "http://127.0.0.1:9/hook"), ("smtp", "127.0.0.1:9")):  # fmt: skip
            if key in case.body:
                case.body[key] = value


def test_every_operation_conforms_to_its_schema(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        vaults.create_vault(box.ctx, "main")
        vms.add_vm(box.ctx, "vm1", [make_ext4_image(tmp_path / "vm1.raw", 8, {"a.txt": b"a"})])
        protection.enable_protection(box.ctx, "vm1", "main")
        job = backups.backup_now(box.ctx, "vm1").job
        known = {"vault": "main", "vm": "vm1", "policy": "DefaultPolicy", "job_id": job["id"]}
        headers = box.headers(box.token("BackupContributor"))
        schema = schemathesis.openapi.from_asgi("/openapi.json", box.app, config=CONFIG)
        results = list(schema.get_all_operations())
        assert all(isinstance(r, Ok) for r in results), [r for r in results if not isinstance(r, Ok)]
        operations = [r.ok() for r in results if isinstance(r, Ok)]
        assert len(operations) == OPERATIONS + 1  # + the public GET /health
        scratch = tmp_path / "scratch"
        failures: list[str] = []
        details: list[str] = []
        statuses: dict[int, int] = {}
        for number, operation in enumerate(operations):
            for where, mode in PASSES:
                fixed = {k: v for k, v in known.items() if where == "known" and "{" + k + "}" in operation.path}

                @seed(20261125 + number)
                @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
                def run(case: Any) -> None:
                    _pin_paths(case, scratch)
                    response = case.call(headers=headers)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    try:
                        case.validate_response(response, headers=headers)
                    except FailureGroup as group:
                        titles = sorted({failure.title for failure in group.exceptions})
                        label = f"{mode.value} {case.method} {case.path} -> {response.status_code}"  # noqa: B023 (run now)
                        failures.append(f"{label}: {titles}")
                        details.append(str(group)[:1500])

                try:
                    run()
                except Unsatisfiable:  # nothing to negate (no parameter, no body): GET /health, GET /vms, ...
                    assert mode is GenerationMode.NEGATIVE, operation.label
        assert not failures, "\n".join(sorted(set(failures))) + "\n\n" + "\n".join(details[:5])
        assert not any(status >= 500 for status in statuses), statuses
        # The success answers were checked too, not only errors: 200s, 201s and 202s (jobs).
        assert {200, 201, 202} <= statuses.keys(), statuses


def _named_schema(schema: dict[str, Any]) -> bool:
    """A $ref to a component (a documented resource), or an array of them."""
    return "$ref" in schema or "$ref" in schema.get("items", {})


def test_every_operation_documents_its_answer_its_errors_and_the_token(tmp_path: Path) -> None:
    """A route added without a response model (an undocumented bare object) fails here."""
    with sandbox(tmp_path / "home") as box:
        document = box.client.get("/openapi.json").json()
    operations = [
        (m, p, op) for p, ops in document["paths"].items() if p.startswith("/api/v1/") for m, op in ops.items()
    ]
    assert len(operations) == OPERATIONS
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path, op in operations:
        label = f"{method.upper()} {path}"
        assert op["security"] == [{"HTTPBearer": []}], label
        success = [status for status in op["responses"] if status.startswith("2")]
        assert len(success) == 1, label
        content = op["responses"][success[0]].get("content", {})
        if success[0] == "204":
            assert not content, label
        elif "application/octet-stream" in content:
            assert path.endswith("/files/download"), label
        else:
            assert _named_schema(content["application/json"]["schema"]), label
        for status in ("400", "401", "403", "404", "409", "422", "423", "502", "503"):
            error = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert error.rsplit("/", 1)[1] in ("ErrorBody", "ValidationErrorBody"), (label, status)
