"""Where API and portal callers may point vmvault: the server's allowed roots (docs/security.md).

An API or portal caller (a token holder) is not root on the host, yet the paths it sends are
opened by a root process. The API and the portal therefore run the service with a PathPolicy in
their context (Context.paths); the local CLI, run by root, has none and is not restricted.

Each path is resolved (symlinks, ``..``) before it is compared with the roots, and the resolved
path is what the service then uses, so a symlink swapped in later cannot redirect it. Whatever
the configuration says, vmvault's home, its catalog and its host keys are never reachable: a root
may not be the home or lie in the host keys, and a root that contains the home does not give
access to it (only a root inside the home, such as the default /var/lib/vmvault/vaults, does).

One exception to "resolve first": LVM volumes are symlinks (/dev/vg0/lv -> /dev/dm-3). A disk path
that is a symlink in an allowed disk root under /dev and leads to a block device is accepted as
given (only root writes /dev).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from vmvault.errors import InvalidInput, PathNotAllowed
from vmvault.service.validate import absolute
from vmvault.settings import Settings, read_settings_file

if TYPE_CHECKING:
    from vmvault.service.context import Context

DEFAULT_DISKS = ("/var/lib/libvirt/images", "/var/lib/vmvault/images")
DEFAULT_VAULTS = ("/var/lib/vmvault/vaults",)
# The restore folder of the root home (Settings.restores_dir, outside the 0700 home): on a hypervisor
# host, the folder of the server's default target for that host's VMs and its agent's default root.
DEFAULT_RESTORES = ("/var/lib/vmvault-restores",)
CATALOG_FILES = ("catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal")
DEVICES = Path("/dev")


class Rule(StrEnum):
    """Which roots a path must lie in (the name is what `serve` and settings.toml call them)."""

    DISKS = "allow-disks"
    VAULTS = "allow-vaults"
    RESTORES = "allow-restores"


_WHAT = {Rule.DISKS: "disk", Rule.VAULTS: "vault storage", Rule.RESTORES: "restore target"}


@dataclass(frozen=True)
class PathPolicy:
    """The allowed roots of each kind (resolved once, at serve start) and the home they never reach."""

    home: Path
    roots: dict[Rule, tuple[Path, ...]]

    def check(self, rule: Rule, raw: str | Path) -> Path:
        """The path to use (resolved), or PathNotAllowed naming the path, the rule and the admin's fix."""
        text = str(raw)
        if "\0" in text:
            raise InvalidInput(f"{_WHAT[rule]} path {text!r} holds a NUL byte", hint="give a plain absolute path")
        if not text.startswith("/"):
            raise InvalidInput(f"{_WHAT[rule]} path '{text}' is not absolute", hint="give an absolute server path")
        lexical = Path(os.path.normpath(text))
        if rule is Rule.DISKS:
            device = self._device_link(lexical)
            if device is not None:
                return device
        resolved = Path(os.path.realpath(lexical))
        in_home = resolved.is_relative_to(self.home)
        if in_home and self._is_own(resolved):
            raise self._home(rule, text, resolved, "vmvault's own home, catalog or host keys", own=True)
        if not any(self._reaches(root, resolved) for root in self.roots[rule]):
            if in_home and any(resolved.is_relative_to(root) for root in self.roots[rule]):
                raise self._home(
                    rule, text, resolved, f"inside vmvault's home {self.home}, which a root around it does not open"
                )
            raise self.outside_error(rule, text, resolved)
        return resolved

    def _reaches(self, root: Path, path: Path) -> bool:
        """path is in root, and not in the home unless root itself is inside the home."""
        if not path.is_relative_to(root):
            return False
        return not path.is_relative_to(self.home) or root.is_relative_to(self.home)

    def _is_own(self, resolved: Path) -> bool:
        return (
            resolved == self.home or resolved.is_relative_to(self.home / "keys") or resolved in self.protected_files()
        )

    def _home(self, rule: Rule, text: str, resolved: Path, why: str, *, own: bool = False) -> PathNotAllowed:
        hint = f"use a path under {self._roots_text(rule)}"
        if not own:
            hint += f" outside the home, or have the admin allow a folder inside it (e.g. --{rule.value} DIR)"
        return PathNotAllowed(
            f"{_WHAT[rule]} path {text} resolves to {resolved}, {why} (rule: the home is never an allowed path)",
            hint=hint,
        )

    def protected_files(self) -> tuple[Path, ...]:
        return tuple(self.home / name for name in CATALOG_FILES)

    def _device_link(self, lexical: Path) -> Path | None:
        """An LVM-style symlink to a block device, in an allowed disk root under /dev: the link as given."""
        link = Path(os.path.realpath(lexical.parent)) / lexical.name
        try:
            if not link.is_symlink() or not stat.S_ISBLK(os.stat(link).st_mode):
                return None
        except OSError:
            return None
        if any(root.is_relative_to(DEVICES) and link.parent.is_relative_to(root) for root in self.roots[Rule.DISKS]):
            return link
        return None

    def outside_error(self, rule: Rule, text: str, resolved: Path) -> PathNotAllowed:
        shown = text if str(resolved) == text else f"{text} (resolved: {resolved})"
        return PathNotAllowed(
            f"{_WHAT[rule]} path {shown} is outside the allowed {_WHAT[rule]} roots ({self._roots_text(rule)}) "
            f"(rule: {rule.value})",
            hint=f"use a path under one of them, or have the admin allow its folder: "
            f"vmvault serve --{rule.value} DIR (or {rule.value} in {self.home / 'settings.toml'})",
        )

    def _roots_text(self, rule: Rule) -> str:
        return ", ".join(str(r) for r in self.roots[rule]) or "none configured"


def build_policy(
    settings: Settings,
    *,
    disks: Iterable[str] | None = None,
    vaults: Iterable[str] | None = None,
    restores: Iterable[str] | None = None,
    default_restores: Iterable[str] | None = None,
) -> PathPolicy:
    """The policy of `vmvault serve`: flags beat HOME/settings.toml beat the defaults (per kind).

    The default restore root is the home's restores_dir (outside the home), or default_restores
    (an agent: DEFAULT_RESTORES, where the server's default target for its host's VMs lies).

    Raises InvalidInput (serve refuses to start) for a relative root, the home itself, or a root
    inside the host keys.
    """
    try:
        file_values = read_settings_file(settings.settings_file)
    except ValueError as exc:
        raise InvalidInput(str(exc), hint=f"fix {settings.settings_file} (see docs/security.md)") from None
    home = Path(os.path.realpath(settings.home))
    given = {Rule.DISKS: disks, Rule.VAULTS: vaults, Rule.RESTORES: restores}
    restore_roots = tuple(default_restores) if default_restores is not None else (str(settings.restores_dir),)
    defaults = {Rule.DISKS: DEFAULT_DISKS, Rule.VAULTS: DEFAULT_VAULTS, Rule.RESTORES: restore_roots}
    roots: dict[Rule, tuple[Path, ...]] = {}
    for rule in Rule:
        flagged = list(given[rule] or [])
        raw = flagged or file_values.get(rule.value) or list(defaults[rule])
        roots[rule] = tuple(_check_root(rule, r, home) for r in raw)
    return PathPolicy(home=home, roots=roots)


def _check_root(rule: Rule, raw: str, home: Path) -> Path:
    if not raw.startswith("/"):
        raise InvalidInput(f"--{rule.value} {raw} is not an absolute path", hint=f"e.g. --{rule.value} /srv/vmvault")
    root = Path(os.path.realpath(raw))
    if root == home or root.is_relative_to(home / "keys"):
        raise InvalidInput(
            f"--{rule.value} {raw} is vmvault's home or its host keys ({root}): API callers would reach the "
            "catalog and the keys",
            hint=f"allow a folder inside the home (e.g. {home / 'vaults'}) or outside it",
        )
    return root


# ---- what the service calls ---------------------------------------------------------------------------


def allowed(ctx: Context, rule: Rule, raw: str | Path) -> Path:
    """The path the service should use: checked and resolved for API/portal callers, as given for the CLI."""
    if ctx.paths is None:
        return absolute(raw)
    return ctx.paths.check(rule, raw)


def recheck_dir(ctx: Context, rule: Rule, path: Path) -> None:
    """Just before writing into a checked directory: refuse it if a symlink was swapped in since the check."""
    recheck_dir_in(ctx.paths, rule, path)


def recheck_dir_in(policy: PathPolicy | None, rule: Rule, path: Path) -> None:
    """recheck_dir with the policy itself (an agent has no context: agent run --allow-restores)."""
    if policy is not None and Path(os.path.realpath(path)) != path:
        raise policy.outside_error(rule, str(path), Path(os.path.realpath(path)))


def registered_disks(ctx: Context) -> dict[Path, list[str]]:
    """Every registered VM's disks (resolved) -> the names of the VMs that have it."""
    from vmvault.catalog import repos

    with ctx.catalog.read() as s:
        rows = [(vm.name, [str(d.get("path") or "") for d in vm.disks or []]) for vm in repos.list_vms(s)]
    return disk_owners(rows)


def disk_owners(rows: Iterable[tuple[str, list[str]]]) -> dict[Path, list[str]]:
    """(VM name, its disk paths) -> each disk (resolved here) -> the names of the VMs that have it."""
    owners: dict[Path, list[str]] = {}
    for name, paths in rows:
        for p in filter(None, paths):
            owners.setdefault(Path(os.path.realpath(p)), []).append(name)
    return owners


def refuse_registered(ctx: Context, files: Iterable[Path], *, allow_vm: str | None = None) -> None:
    """A restore never overwrites a disk of a registered VM (CLI included), whatever --force says."""
    refuse_owned(registered_disks(ctx), files, allow_vm=allow_vm)


def refuse_owned(disks: dict[Path, list[str]], files: Iterable[Path], *, allow_vm: str | None = None) -> None:
    """refuse_registered with the disks given (an agent: those of its host's VMs, from the server)."""
    for path in files:
        if not os.path.lexists(path):
            continue
        others = [name for name in disks.get(Path(os.path.realpath(path)), []) if name != allow_vm]
        if others:
            owner = others[0]
            raise PathNotAllowed(
                f"{path} is a disk of VM '{owner}' (rule: a restore never overwrites a registered VM's disk, "
                "even with force)",
                hint=f"restore into another directory, or replace that VM's disks with: "
                f"vmvault restore replace-disks {owner} --rp RP",
            )
