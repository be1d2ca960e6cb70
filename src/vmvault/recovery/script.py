"""`vmvault files script`: a self-contained shell script that mounts a recovery point elsewhere.

The script is plain text a reviewer can read before running it as root: a short sh header, a
small Python bootstrap, then the session's settings (JSON) and the exact source of the modules it
runs (nbdproto.py, mount.py, client.py: standard library only). The bootstrap loads those
sections as modules and calls client.main(). No password is written into it: the script asks for
the one `vmvault files script` printed (or reads VMVAULT_RECOVERY_PASSWORD).
"""

from __future__ import annotations

import json
from pathlib import Path

from vmvault.recovery import client, tlscert

MODULES = ("nbdproto", "mount", "client")
SECTION = "#### vmvault:"

# No single quote may appear in the bootstrap: sh holds it in '...'.
BOOT = f"""# {client.BOOT_MARKER}
import json, sys, types
path = sys.argv[1]
sys.argv = sys.argv[1:]
text = open(path, encoding="utf-8").read()
pkg = types.ModuleType("vmvault"); pkg.__path__ = []
rec = types.ModuleType("vmvault.recovery"); rec.__path__ = []
pkg.recovery = rec
sys.modules.update({{"vmvault": pkg, "vmvault.recovery": rec}})
config = None
for section in text.split("\\n{SECTION}")[1:]:
    head, _, body = section.partition("\\n")
    kind, _, name = head.partition(" ")
    if kind == "config":
        config = json.loads(body)
    elif kind == "module":
        mod = types.ModuleType("vmvault.recovery." + name)
        mod.__file__ = path
        sys.modules[mod.__name__] = mod
        setattr(rec, name, mod)
        exec(compile(body, path + " (" + name + ")", "exec"), mod.__dict__)
sys.exit(sys.modules["vmvault.recovery.client"].main(config, sys.argv[1:]))
"""

assert "'" not in BOOT

HEADER = """#!/bin/sh
# vmvault file recovery: VM {vm}, recovery point {rp} (session {session_id})
# Served by {host}:{port} until {expires} (UTC); the host refuses this script afterwards.
#
# Run as root on the machine that needs the files:
#   sudo sh {name}              asks for the password 'vmvault files script' printed, then mounts
#                               the point's file systems read-only under ./{vm}-{rp}/
#                               (or --dir DIR) and prints their paths
#   sudo sh {name} --unmount    unmounts everything (this also happens by itself at expiry)
# Needs python3, and nbdfuse (Debian/Ubuntu: apt-get install libnbd-bin fuse3) or the nbd kernel
# module with nbd-client; ntfs-3g for NTFS volumes; fusefat where the kernel has no vfat driver.
# Everything below is the program it runs: read it before running it as root.
"""


def _source(module: str) -> str:
    text = (Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8")
    if f"\n{SECTION}" in text:
        raise RuntimeError(f"{module}.py contains the section marker")
    return text


def render(
    *, session_id: str, vm: str, rp: str, host: str, port: int, ca_pem: str, disks: list[str], expires: str
) -> str:
    name = f"{vm}-{rp}-recover.sh"
    config = {
        "session": session_id,
        "vm": vm,
        "rp": rp,
        "host": host,
        "port": port,
        "ca_pem": ca_pem,
        "server_name": tlscert.session_hostname(session_id),
        "disks": disks,
        "expires": expires,
    }
    parts = [
        HEADER.format(vm=vm, rp=rp, session_id=session_id, host=host, port=port, expires=expires, name=name),
        f"VMV_BOOT='{BOOT}'\n",
        'exec python3 -c "$VMV_BOOT" "$0" "$@"\n',
        f"{SECTION}config\n{json.dumps(config, indent=1)}\n",
    ]
    parts += [f"{SECTION}module {m}\n{_source(m)}" for m in MODULES]
    return "".join(parts)
