"""The recovery script's program: mount a recovery point served by a vmvault host, on this machine.

Standard library only; script.py embeds it (with nbdproto.py and mount.py) in
`<vm>-<rp>-recover.sh`. Run as root:

    sh web1-<rp>-recover.sh [--dir DIR]      asks for the password, mounts, prints the paths
    sh web1-<rp>-recover.sh --unmount        unmounts everything and stops the relay

How it works: a small relay daemon (forked from the script, so the password stays in memory and
never appears on a command line) listens on a unix socket in /run/vmvault-recover/<session>/
(0700). Each local NBD connection is relayed over TLS to the vmvault host, which checks the
password (`<password>/<disk>` as the export name) and pins its CA (embedded in the script).
Block devices come from nbdfuse (Debian/Ubuntu: apt-get install libnbd-bin fuse3) or, when it is
missing, the kernel's nbd module with nbd-client; the file systems are then mounted read-only
exactly as on the vmvault host (mount.py). At expiry the relay unmounts everything and exits;
the host refuses the password from then on anyway.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vmvault.recovery import mount, nbdproto

PASSWORD_ENV = "VMVAULT_RECOVERY_PASSWORD"
BOOT_MARKER = "vmvault-recover-boot"  # in the script's `python3 -c` code, so on the relay's command line
RUN_BASE = Path("/run/vmvault-recover")
EXIT_REFUSED = 2
EXIT_USAGE = 64


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def _expiry(config: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(config["expires"]).replace("Z", "+00:00")).timestamp()


class Upstream:
    """Connections to the vmvault host's export: TLS with the pinned CA, the password in the name."""

    def __init__(self, config: dict[str, Any], password: str) -> None:
        self.host, self.port = str(config["host"]), int(config["port"])
        self.server_name = str(config["server_name"])
        self.password = password
        self.tls = ssl.create_default_context(cadata=str(config["ca_pem"]))
        self.tls.check_hostname = True

    def connect(self, disk: str) -> tuple[nbdproto.Sock, int, int]:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        try:
            conn, size, flags = nbdproto.connect_export(
                sock, f"{self.password}/{disk}", tls=self.tls, server_hostname=self.server_name
            )
        except BaseException:
            sock.close()
            raise
        conn.settimeout(None)
        return conn, size, flags


class _Remote:
    """An export as seen by the relay: its size, and the upstream connection to splice."""

    def __init__(self, conn: nbdproto.Sock, size: int) -> None:
        self.conn, self.size = conn, size

    def pread(self, length: int, offset: int) -> bytes:  # never called: bytes are relayed as they are
        raise OSError("relay export")


def _splice(local: nbdproto.Sock, remote: nbdproto.Sock) -> None:
    """Copy bytes both ways until either side closes (one thread: TLS objects are not shared)."""
    try:
        while True:
            waiting = isinstance(remote, ssl.SSLSocket) and remote.pending() > 0
            ready = [remote] if waiting else select.select([local, remote], [], [], 60)[0]
            for sock in ready:
                data = sock.recv(1 << 20)
                if not data:
                    return
                (remote if sock is local else local).sendall(data)
    except OSError:
        return
    finally:
        for s in (local, remote):
            with contextlib.suppress(OSError):
                s.close()


class Relay:
    """The daemon: a local NBD endpoint per disk name, relayed to the host, until expiry."""

    def __init__(self, upstream: Upstream, state: State) -> None:
        self.upstream, self.state = upstream, state
        self.stop = threading.Event()

    def lookup(self, name: str) -> nbdproto.Choice:
        try:
            conn, size, _flags = self.upstream.connect(name)
        except nbdproto.Refused as exc:
            return nbdproto.Choice(error=str(exc), policy=True)
        except (OSError, nbdproto.ProtocolError, ssl.SSLError) as exc:
            return nbdproto.Choice(error=f"cannot reach the vmvault host: {exc}")
        return nbdproto.Choice(export=_Remote(conn, size))

    def handle(self, conn: socket.socket) -> None:
        try:
            agreed = nbdproto.negotiate(conn, self.lookup)
        except (nbdproto.ProtocolError, OSError):
            conn.close()
            return
        if agreed is None:
            conn.close()
            return
        local, choice = agreed
        assert isinstance(choice.export, _Remote)
        _splice(local, choice.export.conn)

    def serve(self, deadline: float) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.state.socket.unlink(missing_ok=True)
        listener.bind(str(self.state.socket))
        listener.listen(16)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        # Unmount a moment before the host's deadline, while the export still answers.
        self.stop.wait(max(0.0, deadline - time.time() - 1.0))
        done = self.state.teardown(_say)
        listener.close()
        self.state.socket.unlink(missing_ok=True)
        if not done.problems:
            shutil.rmtree(self.state.dir, ignore_errors=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


class State:
    """What this machine holds for one session: /run/vmvault-recover/<session>/state.json."""

    def __init__(self, session_id: str) -> None:
        base = RUN_BASE if os.access("/run", os.W_OK) else Path("/tmp/vmvault-recover")
        self.dir = base / session_id
        self.file = self.dir / "state.json"
        self.socket = self.dir / "relay.sock"
        self.fuse_root = self.dir / "fuse"
        self.log = self.dir / "relay.log"

    def load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.file.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def save(self, data: dict[str, Any]) -> None:
        tmp = self.file.with_name(".state.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.file)

    def teardown(self, log: mount.Log) -> mount.Cleanup:
        data = self.load()
        roots = [Path(data["target"])] if data.get("target") else []
        devices = [Path(d) for d in data.get("nbd_devices", [])]
        done = mount.cleanup(roots, [self.fuse_root, *devices], log)
        for device in devices:
            subprocess.run(["nbd-client", "-d", str(device)], capture_output=True, check=False)
        if data.get("target"):
            mount.remove_volume_dirs(Path(data["target"]), list(data.get("disks", [])))
            if data.get("created_target"):
                with contextlib.suppress(OSError):
                    Path(data["target"]).rmdir()
        if not done.problems:
            with contextlib.suppress(OSError):
                self.file.unlink()
        return done


def _relay_pid_alive(state: State) -> int:
    pid = int(state.load().get("relay_pid") or 0)
    if pid <= 0:
        return 0
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return 0
    return pid if BOOT_MARKER.encode() in cmdline else 0


def _read_password() -> str:
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV].strip()
    if sys.stdin.isatty():
        return getpass.getpass("Password (shown by 'vmvault files script'): ").strip()
    return sys.stdin.readline().strip()


def _start_relay(upstream: Upstream, state: State, deadline: float) -> int:
    """Double-fork the relay daemon; returns its pid once its socket is listening."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child
        os.close(read_end)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        log = os.open(state.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.write(write_end, str(os.getpid()).encode())
        os.close(write_end)
        try:
            Relay(upstream, state).serve(deadline)
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    relay_pid = int(os.read(read_end, 32) or b"0")
    os.close(read_end)
    for _ in range(600):
        if state.socket.exists():
            return relay_pid
        time.sleep(0.05)
    raise OSError("the relay did not start")


def _attach_disks(config: dict[str, Any], state: State, log_file: Any) -> tuple[dict[str, str], list[str]]:
    """Each disk as a local file (nbdfuse) or block device (kernel nbd); returns (disk -> path, nbd devices)."""
    paths: dict[str, str] = {}
    devices: list[str] = []
    for disk in config["disks"]:
        uri = f"nbd+unix:///{disk}?socket={state.socket}"
        if shutil.which("nbdfuse"):
            fuse_dir = state.fuse_root / disk
            mount.start_nbdfuse(uri, fuse_dir, log_file)
            paths[disk] = str(fuse_dir / "disk")
        else:
            device = _kernel_nbd(state, disk)
            devices.append(device)
            paths[disk] = device
    return paths, devices


def _kernel_nbd(state: State, disk: str) -> str:
    """The kernel-nbd path (no nbdfuse): nbd-client on the relay's socket. Not testable in CI."""
    if not shutil.which("nbd-client"):
        raise OSError("neither nbdfuse nor nbd-client is installed: apt-get install libnbd-bin fuse3 (or nbd-client)")
    if not Path("/sys/module/nbd").exists():
        subprocess.run(["modprobe", "nbd"], capture_output=True, check=False)
    for sysdir in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if (sysdir / "size").read_text().strip() == "0" and not (sysdir / "pid").exists():
            device = f"/dev/{sysdir.name}"
            r = subprocess.run(
                ["nbd-client", "-unix", str(state.socket), device, "-name", disk, "-readonly"],
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                raise OSError(f"nbd-client failed: {r.stderr.strip()}")
            return device
    raise OSError("no free /dev/nbd* device (is the nbd kernel module loaded?)")


def _parse_args(argv: list[str]) -> dict[str, Any] | None:
    opts: dict[str, Any] = {"unmount": False, "dir": None}
    it = iter(argv)
    for arg in it:
        if arg == "--unmount":
            opts["unmount"] = True
        elif arg == "--dir":
            opts["dir"] = next(it, None)
        elif arg.startswith("--dir="):
            opts["dir"] = arg.split("=", 1)[1]
        else:
            return None
    return opts


def unmount(state: State) -> int:
    pid = _relay_pid_alive(state)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(1200):
            if not _relay_pid_alive(state):
                break
            time.sleep(0.05)
    done = state.teardown(_say)
    if done.problems:
        return _fail("some mounts could not be released: " + "; ".join(done.problems))
    shutil.rmtree(state.dir, ignore_errors=True)
    _say("unmounted")
    return 0


def main(config: dict[str, Any], argv: list[str]) -> int:
    opts = _parse_args(argv)
    if opts is None:
        return _fail("usage: sh SCRIPT [--dir DIR] | --unmount", EXIT_USAGE)
    if os.geteuid() != 0:
        return _fail("run this script as root (it attaches loop devices and mounts file systems)")
    state = State(str(config["session"]))
    if opts["unmount"]:
        return unmount(state)
    if _relay_pid_alive(state):
        data = state.load()
        _say(f"already mounted under {data.get('target')}; unmount with: sh {sys.argv[0]} --unmount")
        return 0
    deadline = _expiry(config)
    if deadline <= time.time():
        return _fail(
            f"this script expired at {config['expires']}; generate a new one with 'vmvault files script'", EXIT_REFUSED
        )
    return _mount(config, opts, state, deadline)


def _mount(config: dict[str, Any], opts: dict[str, Any], state: State, deadline: float) -> int:
    upstream = Upstream(config, _read_password())
    try:  # check the password before changing anything on this machine
        conn, _size, _flags = upstream.connect(str(config["disks"][0]))
        conn.close()
    except nbdproto.Refused as exc:
        return _fail(f"the vmvault host refused: {exc}", EXIT_REFUSED)
    except (OSError, nbdproto.ProtocolError, ssl.SSLError) as exc:
        return _fail(f"cannot reach the vmvault host {upstream.host}:{upstream.port}: {exc}")
    target = Path(opts["dir"] or Path.cwd() / f"{config['vm']}-{config['rp']}").absolute()
    if target.is_dir() and any(target.iterdir()):
        return _fail(f"{target} is not empty; choose another directory with --dir")
    state.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state.dir, 0o700)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    state.save(
        {"target": str(target), "created_target": created, "disks": list(config["disks"]), "expires": config["expires"]}
    )
    relay_pid = _start_relay(upstream, state, deadline)
    state.save({**state.load(), "relay_pid": relay_pid})
    try:
        with open(state.log, "ab") as log_file:
            paths, devices = _attach_disks(config, state, log_file)
        state.save({**state.load(), "nbd_devices": devices})
        volumes = [v for disk, path in paths.items() for v in mount.mount_disk(path, disk, target, lambda _m: None)]
    except BaseException as exc:
        unmount(state)
        return _fail(f"mounting failed: {exc}")
    state.save({**state.load(), "volumes": [v.to_dict() for v in volumes]})
    for v in volumes:
        what = v.path if v.status == "mounted" else f"not mounted ({v.reason})"
        _say(f"{v.disk} partition {v.partition} ({v.fstype or '?'}): {what}")
    _say(f"mounted read-only until {config['expires']}; unmount earlier with: sh {sys.argv[0]} --unmount")
    return 0
