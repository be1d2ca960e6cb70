"""Test helpers: real disk images, a CLI driver, vault file helpers.

Everything here runs the real product: `.venv/bin/vmvault` as a subprocess, real images built by
tools/diskgen.py (the project's own generator), real qemu-img. Nothing is mocked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DISKGEN = REPO_ROOT / "tools" / "diskgen.py"
CACHE_DIR = Path(os.environ.get("VMVAULT_TEST_CACHE", "/var/tmp/vmvault-test-cache"))
PASSPHRASE = "correct horse battery staple"

MiB = 1 << 20
# Not a multiple of 64 KiB (the default chunk size) nor of 512: the last chunk is partial.
BIG_IMAGE_SIZE = 512 * MiB + 12345
SMALL_IMAGE_SIZE = 48 * MiB + 12345


def _vmvault_exe() -> str:
    chosen = os.environ.get("VMVAULT_TEST_EXE")  # another installation (tests/test_standalone.py)
    if chosen:
        return chosen
    exe = Path(sys.executable).parent / "vmvault"
    if exe.exists():
        return str(exe)
    found = shutil.which("vmvault")
    if found is None:
        pytest.fail("vmvault is not installed in this environment: run 'make deps'")
    return found


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def build_image(size: int, seed: int) -> Path:
    """A realistic raw disk image of exactly `size` bytes, cached across sessions (read-only use).

    The image is built in whole MiB by tools/diskgen.py; the odd tail is then filled with seeded
    random bytes so the last, partial chunk holds data too. The cache key holds a hash of the
    generator, so a changed recipe builds anew.
    """
    script_hash = hashlib.sha256(DISKGEN.read_bytes()).hexdigest()[:12]
    key = f"img-{size}-s{seed}-diskgen-{script_hash}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    final = CACHE_DIR / f"{key}.raw"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return final
        tmp = CACHE_DIR / f"{key}.tmp.raw"
        mib = size // MiB
        subprocess.run(
            [sys.executable, str(DISKGEN), "make", "--out", str(tmp), "--size", f"{mib}M", "--seed", str(seed),
             "--workdir", str(CACHE_DIR)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        tail = size - mib * MiB
        if tail:
            with open(tmp, "r+b") as f:
                f.seek(mib * MiB)
                f.write(random.Random(seed).randbytes(tail))
        os.truncate(tmp, size)
        assert tmp.stat().st_size == size
        Path(f"{tmp}.json").unlink(missing_ok=True)
        os.rename(tmp, final)
        return final


def copy_image(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def head_of_image(src: Path, dst: Path, size: int) -> Path:
    """The first `size` bytes of a test image (its partition table, file system start and data):
    for tests that need realistic content but not the whole image, to stay fast."""
    with src.open("rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def mutate_image(path: Path, seed: int, fraction: float = 0.01) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(DISKGEN), "mutate", str(path), "--seed", str(seed), "--fraction", str(fraction),
         "--contig", str(4 * MiB)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def files_equal(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def qemu_raw_view(raw: Path, scratch: Path) -> Path:
    """The disk as a VM sees it: `qemu-img convert -O raw` (QEMU sizes disks in whole 512-byte sectors).

    vmvault restores raw disks identical to this; for a source whose size is a multiple of 512 it is
    the source itself.
    """
    if raw.stat().st_size % 512 == 0:
        return raw
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), str(scratch)], check=True)
    return scratch


def assert_same_image(restored: Path, expected: Path) -> None:
    """Same disk content: `cmp` when both are raw files, else `qemu-img compare`.

    qcow2 (and QEMU in general) sizes disks in whole 512-byte sectors, so a raw image of an odd
    size shows up rounded up to the next sector once it went through a qcow2: between different
    formats only that rounding is allowed, and the padding must read as zeros.
    """
    got, want = qemu_img_info(restored), qemu_img_info(expected)
    if got["format"] == want["format"] == "raw":
        reference = qemu_raw_view(expected, restored.parent / f".{restored.name}.reference")
        try:
            r = subprocess.run(["cmp", str(restored), str(reference)], capture_output=True, text=True)
        finally:
            if reference != expected:
                reference.unlink()
        assert r.returncode == 0, f"{restored} differs from {expected} as QEMU reads it: {r.stdout}{r.stderr}"
        return
    got_size, want_size = got["virtual-size"], want["virtual-size"]
    assert got_size in (want_size, -(-want_size // 512) * 512), f"virtual size {got_size}, expected {want_size}"
    # Not strict (-s): that would also compare allocation (holes vs written zeros), not content.
    r = subprocess.run(["qemu-img", "compare", "-f", got["format"], "-F", want["format"], str(restored),
                        str(expected)], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img compare {restored} {expected}: {r.stdout}{r.stderr}"


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(path)],
                         check=True, capture_output=True, text=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def to_qcow2(src: Path, dst: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(dst)], check=True)
    return dst


# ---------------------------------------------------------------------------------------------
# Files of a directory tree
# ---------------------------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def vault_files(storage: Path, kind: str) -> list[Path]:
    """Complete files of one kind of vault object ('data', 'index', 'tree', 'points', 'keys', 'config')."""
    if kind == "config":  # both copies (docs/format.md, "Copies")
        return [p for p in (storage / "config", storage / "config.2") if p.is_file()]
    return sorted(p for p in (storage / kind).rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(f"not JSON from {' '.join(self.args)}:\n{self}") from exc

    def __str__(self) -> str:
        cmd = " ".join(self.args)
        return f"$ {cmd}\n[exit {self.returncode}]\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def allow_args(*roots: Path) -> list[str]:
    """`vmvault serve` flags letting API callers use paths under roots (disks, vaults and restores)."""
    return [f"--allow-{kind}={root}" for root in roots for kind in ("disks", "vaults", "restores")]


@dataclass
class Cli:
    """Drives `vmvault --home HOME -o json ...` as a subprocess."""

    home: Path
    passphrase: str | None = PASSPHRASE
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMVAULT_")}
        if self.passphrase is not None:
            env["VMVAULT_PASSPHRASE"] = self.passphrase
        env.update(self.extra_env)
        return env

    def argv(self, *args: str, json_output: bool = True) -> list[str]:
        base = [_vmvault_exe(), "--home", str(self.home)]
        if json_output:
            base += ["-o", "json"]
        return base + list(args)

    def run(self, *args: str, json_output: bool = True, timeout: float = 600) -> Result:
        argv = self.argv(*args, json_output=json_output)
        p = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return Result(argv, p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, json_output: bool = True, timeout: float = 600) -> Result:
        r = self.run(*args, json_output=json_output, timeout=timeout)
        assert r.ok, f"command failed:\n{r}"
        return r

    def fails(self, *args: str, json_output: bool = True, timeout: float = 600) -> Result:
        r = self.run(*args, json_output=json_output, timeout=timeout)
        assert not r.ok, f"command should have failed:\n{r}"
        assert "Traceback" not in r.output, f"a failure must be reported without a traceback:\n{r}"
        return r

    def popen(self, *args: str, json_output: bool = True) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args, json_output=json_output), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    # ---- the commands the tests use (one place to follow CLI changes) ---------------------------

    def vault_create(self, name: str, storage: Path, *, time_zone: str | None = None) -> Any:
        zone = ["--timezone", time_zone] if time_zone else []
        return self.ok("vault", "create", name, "--storage", str(storage), *zone).json()

    def vault_import(self, storage: Path, name: str | None = None) -> Result:
        args = ["vault", "import", str(storage)]
        if name:
            args += ["--name", name]
        return self.run(*args)

    def vault_verify(self, name: str) -> Result:
        return self.run("vault", "verify", name)

    def vm_add(self, name: str, *disks: Path) -> Result:
        args = ["vm", "add", name]
        for d in disks:
            args += ["--disk", str(d)]
        return self.run(*args)

    def protection_enable(self, vm: str, vault: str) -> Result:
        return self.run("protection", "enable", "--vm", vm, "--vault", vault)

    def backup_args(self, vm: str, retain_until: str | None = None) -> list[str]:
        args = ["backup", "now", "--vm", vm]
        if retain_until:
            args += ["--retain-until", retain_until]
        return args

    def backup_now(self, vm: str, retain_until: str | None = None) -> Result:
        return self.run(*self.backup_args(vm, retain_until))

    def points(self, vm: str) -> list[dict[str, Any]]:
        """The VM's points, oldest first (`recoverypoint list` prints them newest first, as Azure)."""
        data = self.ok("recoverypoint", "list", "--vm", vm).json()
        return list(reversed(data))

    def point_ids(self, vm: str) -> list[str]:
        return [rp_id(p) for p in self.points(vm)]

    def restore_disks(self, vm: str, rp: str, target: Path, *, fmt: str | None = None, force: bool = False) -> Result:
        args = ["restore", "disks", "--vm", vm, "--rp", rp, "--target-dir", str(target)]
        if fmt:
            args += ["--format", fmt]
        if force:
            args.append("--force")
        return self.run(*args)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.ok("job", "list").json())

    def vms(self) -> list[dict[str, Any]]:
        return list(self.ok("vm", "list").json())


# Commands that need the passphrase itself: the host key does not exist yet (create) or is another
# home's (import). Every other command opens the vault with this home's host key.
_NEEDS_PASSPHRASE = {("vault", "create"), ("vault", "import")}


@dataclass
class HostKeyCli(Cli):
    """A Cli that gives the passphrase to `vault create` and `vault import` only.

    A passphrase given to any other command that names a vault is checked against its key file
    (scrypt: about 0.35 s of CPU per command); the host key opens the vault without it. For test
    files that are not about passphrases (what protect_host_key_only does, for a whole driver).
    """

    def env_for(self, args: tuple[str, ...]) -> dict[str, str]:
        if tuple(args[:2]) in _NEEDS_PASSPHRASE:
            return self.env()
        return Cli(home=self.home, passphrase=None, extra_env=self.extra_env).env()

    def run(self, *args: str, json_output: bool = True, timeout: float = 600) -> Result:
        argv = self.argv(*args, json_output=json_output)
        p = subprocess.run(argv, env=self.env_for(args), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return Result(argv, p.returncode, p.stdout, p.stderr)


def rp_id(point: dict[str, Any]) -> str:
    for key in ("name", "id", "rpId", "rp_id"):
        if key in point:
            return str(point[key])
    raise AssertionError(f"no id in recovery point {point}")


@dataclass
class Protected:
    """A VM with one disk, protected into a vault, in its own home."""

    cli: Cli
    vm: str
    vault: str
    storage: Path
    disk: Path


def protect(cli: Cli, disk: Path, storage: Path, vm: str = "vm1", vault: str = "v1") -> Protected:
    cli.vault_create(vault, storage)
    r = cli.vm_add(vm, disk)
    assert r.ok, str(r)
    r = cli.protection_enable(vm, vault)
    assert r.ok, str(r)
    return Protected(cli, vm, vault, storage, disk)


def protect_host_key_only(cli: Cli, disk: Path, storage: Path, vm: str = "vm1", vault: str = "v1") -> Protected:
    """protect(), with a CLI driver that gives the passphrase to `vault create` only.

    This host's key opens the vault from then on; a passphrase given to a later command that names
    the vault is checked against its key file (scrypt: about 0.35 s of CPU per command). For tests
    that are not about passphrases (tests/test_vault_keys.py is).
    """
    cli.vault_create(vault, storage)
    quick = replace(cli, passphrase=None)
    r = quick.vm_add(vm, disk)
    assert r.ok, str(r)
    r = quick.protection_enable(vm, vault)
    assert r.ok, str(r)
    return Protected(quick, vm, vault, storage, disk)


# DefaultPolicy runs daily at 20:30 in its vault's time zone: 20:30 UTC, or 11:30 UTC in Tokyo.
FAR_ZONES = {"UTC": (20, 30), "Asia/Tokyo": (11, 30)}


def far_time_zone(now: datetime | None = None) -> str:
    """The vault time zone ("UTC" or "Asia/Tokyo") whose DefaultPolicy slot is at least 9 hours away.

    For a test that runs `vmvault serve` (its scheduler) with VMs under DefaultPolicy: in UTC, a
    run across 20:30 UTC would get a scheduled backup mid-test (a `backup now` refused as busy,
    one job more than counted). CI runs at any hour, so the zone is chosen when the vault is made.
    """
    moment = now or datetime.now(UTC)

    def ahead(zone: str) -> timedelta:
        hour, minute = FAR_ZONES[zone]
        slot = moment.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return (slot - moment) % timedelta(days=1)

    return max(FAR_ZONES, key=ahead)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def first_run_owner_token(line: str) -> str:
    """The first-run Owner token from `vmvault serve`'s banner line: serve prints only the path of
    the 0600 file that holds it, never the token."""
    import re
    import stat

    found = re.search(r"first-run Owner token in (\S+) ", line)
    assert found and "vmv_" not in line, f"the token must not be printed: {line!r}"
    path = Path(found.group(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    return path.read_text().strip()


@contextmanager
def opened_vault(prot: Protected) -> Iterator[Any]:
    """The protected VM's vault, opened in this process with the home's host key (closed after)."""
    from vmvault.vault.store import Vault

    vault = Vault.open(prot.storage, prot.cli.home)
    try:
        yield vault
    finally:
        vault.close()


@contextmanager
def crossable_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder under /var/tmp that every user may cross (pytest's tmp_path lies in a 0700
    one, which QEMU as libvirt-qemu could not cross); removed at the end."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stop_process(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """SIGTERM a process that still runs and wait for it; SIGKILL it if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
