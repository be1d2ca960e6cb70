"""bench/scale_bench.py's plumbing, cheaply: its arguments, figures and disk images (the full run is by hand).

The images must pass vmvault's own disk checks (`vm add` refuses files that look like text), else the
bench fails after starting PostgreSQL; the percentiles feed docs/performance.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vmvault.connectors.diskimage.images import disk_info

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale_bench.py"


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_arguments_figures_and_images(tmp_path: Path) -> None:
    sb = bench()
    a = sb.parse([])
    assert (a.vms, a.jobs, a.clients, a.agents, a.servers) == (200, 100_000, 50, 0, 2)  # issue 20's scale
    assert sb.parse(["--agents", "4", "--vms", "8"]).agents == 4
    for bad in (["--vms", "0"], ["--jobs", "10"], ["--agents", "-1"]):
        with pytest.raises(SystemExit):
            sb.parse(bad)
    values = [float(v) for v in range(1, 101)]
    assert (sb.percentile(values, 50), sb.percentile(values, 99), sb.percentile([], 50)) == (50.0, 99.0, 0.0)
    assert sb.summary([0.1, 0.2], 1000)["p99"] == 200.0

    first, second = sb.make_images(tmp_path, 2, 8)
    assert first.stat().st_size == 8 << 20 and first.read_bytes() != second.read_bytes()
    assert first.stat().st_blocks * 512 < 8 << 20  # sparse: 200 of them stay small
    for image in (first, second):
        assert disk_info(image, "raw").virtual_size == 8 << 20  # vm add accepts it
