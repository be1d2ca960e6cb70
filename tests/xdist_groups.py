"""Two tests at a time: pytest-xdist, `-n 2 --dist loadgroup` (Makefile; docs/testing.md, "Two at a time").

Its hooks are imported by tests/conftest.py; tests/test_xdist_groups.py runs a small suite with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# With --dist loadgroup every test is its own unit of work unless it carries @pytest.mark.xdist_group(NAME):
# the tests of one group run on one worker, one after another. Two kinds of groups:
# - a module whose tests share a module- or class-scoped fixture (a booted guest, a backed-up vault, a
#   server's world) is one group named after the module, added here, so that fixture is built once, not
#   once per worker (a module that names a group of its own keeps it);
# - groups named in the test files for tests that must not overlap (see docs/testing.md, "Two at a time").

_SHARED_SCOPES = ("module", "class", "package")

# Seconds of each file's longest unit of work (its group, or its slowest test) in a whole run on two workers
# (session 6, tests/ on this shared 2-core machine at load 3 to 10): under xdist the units are handed out in
# this order, longest first, so the two workers end near the same time instead of one idling while the
# other runs a long scenario it took last. A file not listed comes after, in its own order.
SLOW_FILES: dict[str, float] = {
    "test_pg_quiesce.py": 783,  # the `realtime` group (all six files of it): one unit of about 13 minutes
    "test_quiesce_budget.py": 783,
    "test_qemu_point_in_time.py": 783,
    "test_scheduler_crash.py": 783,
    "test_fleet.py": 783,
    "test_scheduler.py": 783,
    "test_api_remote_cli.py": 259,
    "test_agents.py": 199,
    "test_kill_sweep.py": 147,
    "test_damage_points.py": 133,
    "test_libvirt_backup.py": 117,
    "test_vault_keys.py": 99,
    "test_grs.py": 98,
    "test_bad_input.py": 87,
    "test_corruption.py": 85,
    "test_objstore_vaults.py": 79,
    "test_files_mount.py": 75,
    "test_api_schemathesis.py": 64,
    "test_libvirt_instant.py": 59,
    "test_standalone.py": 58,
    "test_agent_instant.py": 57,
    "test_hostile_disk.py": 55,
    "test_dr_drill.py": 54,
    "test_files_script.py": 53,
    "test_libvirt_restore.py": 51,
    "test_azure_json.py": 50,
    "test_restore_instant.py": 47,
    "test_roundtrip.py": 47,
    "test_qemu_consistency.py": 46,
    "test_portal.py": 45,
    "test_gc.py": 40,
}


def _shares_a_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope in _SHARED_SCOPES for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    # before every other hook (xdist's turns the groups into node ids): the groups and the order
    for item in items:
        if item.get_closest_marker("xdist_group") is None and _shares_a_fixture(item):
            item.add_marker(pytest.mark.xdist_group(Path(str(item.path)).stem))
    if hasattr(config, "workerinput"):  # only under xdist: a single-process run keeps the files' order
        items.sort(key=lambda item: -SLOW_FILES.get(Path(str(item.path)).name, 0.0))
    yield
    # after them: xdist 3.8 sends a test of group NAME to its scheduler as "<node id>@NAME" by setting
    # `item._nodeid`, which pytest 9 no longer reads (the id is `item._id`): without this every group
    # silently falls apart into single tests. Give the node id its suffix where xdist could not.
    if getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})  # fmt: skip
            if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
                _set_node_id(item, f"{item.nodeid}@{'_'.join(names)}")


def _set_node_id(item: pytest.Item, node_id: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(node_id)
    else:
        item._nodeid = node_id


def pytest_configure(config: pytest.Config) -> None:
    # xdist hands out groups by their number of tests unless told not to; the order above (longest first)
    # balances the two workers better than a count of tests, which says nothing of their time.
    if config.getoption("dist", "no") == "loadgroup":
        config.option.loadscopereorder = False
