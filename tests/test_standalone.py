"""The repository stands alone: a copy of it with nothing beside it installs, builds its own test
images and passes a part of its suite, with vmvault installed from a wheel into a fresh venv made
from Debian's Python (as README.md tells an admin to do)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT

DEBIAN_PYTHON = "/usr/bin/python3"


def _tracked_and_new_files() -> list[str]:
    """What a clone of this checkout holds (committed files, plus new ones not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                         check=True, capture_output=True)
    return [name for name in out.stdout.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


def _lone_copy(parent: Path) -> Path:
    copy = parent / "vmvault"
    for name in _tracked_and_new_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, copy / name)
    return copy


def test_no_file_mentions_a_folder_beside_the_repository() -> None:
    needle = "../" + "shared"  # split, so this file does not match itself
    offenders = [name for name in _tracked_and_new_files()
                 if needle in (REPO_ROOT / name).read_text(errors="replace")]
    assert offenders == [], f"files that read outside the clone: {offenders}"


@pytest.mark.slow
def test_a_lone_copy_installs_from_a_wheel_and_passes_a_roundtrip(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    copy = _lone_copy(empty)
    assert sorted(p.name for p in empty.iterdir()) == ["vmvault"]  # nothing beside the copy

    # A wheel, installed into a fresh venv of Debian's Python with only the runtime lock.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "-w", str(tmp_path / "dist"), str(copy)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    wheels = sorted((tmp_path / "dist").glob("vmvault-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "-r", str(copy / "requirements.lock"), str(wheels[0])], check=True, capture_output=True)
    exe = venv / "bin" / "vmvault"
    assert subprocess.run([str(exe), "--help"], capture_output=True, text=True).returncode == 0

    # The copy's own tests, its own image generator (an empty cache: it must build the image
    # itself) and the installed wheel; nothing of this checkout is on the path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_") and k != "PYTHONPATH"}
    env.update(VMVAULT_TEST_EXE=str(exe), VMVAULT_TEST_CACHE=str(tmp_path / "cache"))
    test = "tests/test_roundtrip.py::test_restore_in_source_format_is_identical[raw-first-point]"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=copy, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"the lone copy's roundtrip failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}"
    assert "1 passed" in p.stdout, p.stdout
    assert any((tmp_path / "cache").glob("img-*.raw")), "the copy did not build its own test image"


def _make_variable(name: str) -> set[str]:
    out = subprocess.run(["make", "-s", f"print-{name}"], cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_make_run_installs_only_what_the_service_needs() -> None:
    service = _make_variable("APT_PACKAGES")
    tests = _make_variable("TEST_APT_PACKAGES") | _make_variable("NODE_APT_PACKAGES")
    test_only = {"chromium", "restic", "borgbackup", "gdisk", "postgresql", "nodejs", "npm"}
    assert not service & test_only, f"make run would install test tools: {service & test_only}"
    assert test_only <= tests, f"make test does not install {test_only - tests}"
    runtime_lock = (REPO_ROOT / "requirements.lock").read_text().lower()
    for tool in ("playwright", "pytest", "pytest-xdist", "mypy", "ruff", "schemathesis", "moto"):
        assert f"\n{tool}==" not in runtime_lock, f"{tool} is in the service's requirements.lock"
    assert "playwright==" in (REPO_ROOT / "requirements-dev.lock").read_text().lower()
