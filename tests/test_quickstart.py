"""`make run` runs examples/quickstart.sh: keep it working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT


def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_")}
    env["VMVAULT_HOME"] = str(tmp_path / "home")
    env["VMVAULT"] = str(Path(sys.executable).parent / "vmvault")
    p = subprocess.run(["bash", str(REPO_ROOT / "examples" / "quickstart.sh")], env=env, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"quickstart failed:\n{p.stdout}\n{p.stderr}"
    assert "restored byte-identically" in p.stdout, p.stdout
