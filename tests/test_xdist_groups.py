"""The suite's groups hold under pytest-xdist (tests/xdist_groups.py): the tests of a module that
shares a module-scoped fixture, and the tests of a named group, each run on one worker.

xdist 3.8 on pytest 9 silently dropped every group (docs/testing.md, "Two at a time"); this runs a
small suite on two real workers and fails if a group is split again by an upgrade of either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO_ROOT

SUITE = '''
import os, pytest

def _log(name):
    with open(os.environ["GROUPS_LOG"], "a") as f:
        f.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER')}\\n")

@pytest.fixture(scope="module")
def shared():
    _log("fixture")

@pytest.mark.parametrize("n", range(6))
def test_shared(shared, n):
    _log(f"shared{n}")

@pytest.mark.xdist_group("named")
@pytest.mark.parametrize("n", range(6))
def test_named(n):
    _log(f"named{n}")

@pytest.mark.parametrize("n", range(6))
def test_alone(n):
    _log(f"alone{n}")
'''


def test_a_module_fixture_and_a_named_group_each_stay_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "conftest.py").write_text("from xdist_groups import pytest_collection_modifyitems, pytest_configure\n")
    log = tmp_path / "log"
    env = {**os.environ, "GROUPS_LOG": str(log), "PYTHONPATH": str(REPO_ROOT / "tests")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                        "loadgroup", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ran = [line.split() for line in log.read_text().splitlines()]
    workers = {kind: {w for name, w in ran if name.startswith(kind)} for kind in ("fixture", "shared", "named")}
    assert len(workers["fixture"]) == 1 and [n for n, _ in ran].count("fixture") == 1, ran
    assert workers["shared"] == workers["fixture"], ran
    assert len(workers["named"]) == 1, ran
    assert {w for name, w in ran} <= {"gw0", "gw1"}, ran
