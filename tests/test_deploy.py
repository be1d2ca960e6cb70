"""deploy/: the systemd units pass `systemd-analyze verify`, and the Prometheus rules pass promtool
(syntax, and a rule test: a breached item fires VmvaultBackupMissed, a healthy one does not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
RULES = REPO / "deploy" / "prometheus" / "vmvault-alerts.yml"
DESCRIPTION = (
    "No good recovery point since the deadline of policy DefaultPolicy. "
    "See why with: vmvault job list --vm vm1; then: vmvault backup now --vm vm1"
)


def verify(tmp_path: Path, text: str, name: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on a copy whose ExecStart names this checkout's vmvault.

    verify refuses an ExecStart binary that does not exist; the units name /usr/local/bin/vmvault,
    the documented install path, which a test machine need not have.
    """
    exe = Path(sys.executable).parent / "vmvault"
    unit = tmp_path / name
    unit.write_text(text.replace("/usr/local/bin/vmvault", str(exe)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["vmvault.service", "vmvault-agent.service"])
def test_units_verify(tmp_path: Path, name: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    text = (UNITS / name).read_text()
    result = verify(tmp_path, text, name)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
    for line in ("ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure", "NoNewPrivileges=yes",
                 "EnvironmentFile=/etc/vmvault/vmvault.env"):  # fmt: skip
        assert line in text.splitlines(), line
    assert "CAP_SYS_ADMIN" in text and "PASSPHRASE=" not in text.replace("VMVAULT_PASSPHRASE=...", "")
    # the check can fail: a misspelt value is reported
    broken = verify(tmp_path, text.replace("ProtectSystem=strict", "ProtectSystem=strictly"), name)
    assert "strictly" in broken.stdout + broken.stderr, broken


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (make test-deps)")
    return found


def test_alert_rules_check_and_fire(tmp_path: Path) -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    labels = 'vm="vm1",vault="v1",policy="DefaultPolicy"'
    tests = tmp_path / "rules-test.yml"
    tests.write_text(f"""
rule_files: [{RULES}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vmvault_item_rpo_breached{{{labels}}}'
        values: '0 0 1 1 1 1 1 1 1 1'
      - series: 'vmvault_item_rpo_breached{{vm="vm2",vault="v1",policy="DefaultPolicy"}}'
        values: '0 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 4m
        alertname: VmvaultBackupMissed
        exp_alerts: []
      - eval_time: 9m
        alertname: VmvaultBackupMissed
        exp_alerts:
          - exp_labels: {{severity: critical, vm: vm1, vault: v1, policy: DefaultPolicy}}
            exp_annotations:
              summary: "VM vm1 missed its backup (vault v1)"
              description: "{DESCRIPTION}"
""")
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
