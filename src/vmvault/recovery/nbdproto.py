"""The NBD protocol, read-only subset: fixed newstyle handshake, NBD_OPT_GO/INFO, simple replies.

Standard library only: the recovery script (script.py) embeds this file verbatim, so the same
code serves exports on the vmvault host and relays them on the machine that mounts them.

Server side: `negotiate()` runs the option phase (STARTTLS when a TLS context is given, refusing
everything else over TCP until TLS is up) and returns the chosen export; `serve()` runs the
transmission phase. Writes, trims and write-zeroes get EPERM; structured replies and metadata
contexts are refused (NBD_REP_ERR_UNSUP), so every client falls back to simple replies.
Client side: `connect_export()` does the handshake (optionally STARTTLS) and NBD_OPT_GO.
Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6

EPERM = 1
EIO = 5
EINVAL = 22
ESHUTDOWN = 108

MAX_REQUEST = 32 * 1024 * 1024  # largest read we answer (the de-facto limit of NBD clients)
MAX_OPTION = 64 * 1024  # option payloads are tiny; anything bigger is a broken or hostile client
PREFERRED_BLOCK = 64 * 1024
READ_ONLY_FLAGS = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN

_OPT_HEAD = struct.Struct(">8sII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")

Sock = socket.socket | ssl.SSLSocket


class ProtocolError(Exception):
    """The peer broke the protocol or went away; the connection is dropped."""


class Refused(Exception):
    """The server refused the export (unknown name, wrong or expired secret)."""


class Export(Protocol):
    size: int

    def pread(self, length: int, offset: int) -> bytes: ...


@dataclass
class Choice:
    """What lookup() returns: an export, or why not (sent to the client as the error text)."""

    export: Export | None = None
    error: str = ""
    policy: bool = False  # True: refused by policy (secret), False: unknown export
    deadline: float | None = None  # time.time() after which the connection is shut down


Lookup = Callable[[str], Choice]


def recv_exact(sock: Sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            raise ProtocolError("connection closed by peer")
        buf += part
    return bytes(buf)


def _discard(sock: Sock, n: int) -> None:
    while n > 0:
        n -= len(recv_exact(sock, min(n, 1 << 20)))


# ---- server: option haggling -----------------------------------------------------------------


def _reply(sock: Sock, opt: int, rep: int, data: bytes = b"") -> None:
    sock.sendall(_OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rep, len(data)) + data)


def _parse_info_request(data: bytes) -> tuple[str, list[int]]:
    if len(data) < 6:
        raise ValueError("short NBD_OPT_GO payload")
    (name_len,) = struct.unpack_from(">I", data)
    if 4 + name_len + 2 > len(data):
        raise ValueError("bad export name length")
    name = data[4 : 4 + name_len].decode("utf-8")
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise ValueError("bad information request count")
    return name, list(struct.unpack(f">{count}H", rest))


def negotiate(
    sock: socket.socket,
    lookup: Lookup,
    *,
    tls: ssl.SSLContext | None = None,
    names: Callable[[], list[str]] | None = None,
) -> tuple[Sock, Choice] | None:
    """The option phase. With tls, every option but STARTTLS/ABORT is refused until TLS is up.

    Returns the (possibly TLS-wrapped) socket and the chosen export, or None when the client
    aborted or was turned away.
    """
    conn: Sock = sock
    sock.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", recv_exact(conn, 4))
    no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
    secure = tls is None
    while True:
        magic, opt, length = _OPT_HEAD.unpack(recv_exact(conn, _OPT_HEAD.size))
        if magic != IHAVEOPT or length > MAX_OPTION:
            raise ProtocolError("bad option header")
        data = recv_exact(conn, length)
        if opt == OPT_ABORT:
            with contextlib.suppress(OSError):
                _reply(conn, opt, REP_ACK)
            return None
        if opt == OPT_STARTTLS:
            if tls is None or secure:
                why = b"TLS is not available on this socket" if tls is None else b"TLS is already on"
                _reply(conn, opt, REP_ERR_UNSUP if tls is None else REP_ERR_INVALID, why)
                continue
            _reply(conn, opt, REP_ACK)
            conn = tls.wrap_socket(sock, server_side=True)
            secure = True
            continue
        if not secure:
            if opt == OPT_EXPORT_NAME:
                return None  # no way to send an error here: just hang up
            _reply(conn, opt, REP_ERR_TLS_REQD, b"this export requires TLS (use an nbds:// URI)")
            continue
        chosen = _handle_option(conn, opt, data, lookup, names, no_zeroes)
        if chosen is not None:
            return conn, chosen


def _handle_option(
    conn: Sock, opt: int, data: bytes, lookup: Lookup, names: Callable[[], list[str]] | None, no_zeroes: bool
) -> Choice | None:
    if opt == OPT_EXPORT_NAME:
        choice = lookup(data.decode("utf-8", "replace"))
        if choice.export is None:
            raise ProtocolError(f"export refused: {choice.error}")
        conn.sendall(struct.pack(">QH", choice.export.size, READ_ONLY_FLAGS) + (b"" if no_zeroes else bytes(124)))
        return choice
    if opt in (OPT_INFO, OPT_GO):
        return _info_or_go(conn, opt, data, lookup)
    if opt == OPT_LIST:
        if names is None:
            _reply(conn, opt, REP_ERR_POLICY, b"listing exports is not allowed here")
            return None
        for name in names():
            raw = name.encode()
            _reply(conn, opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
        _reply(conn, opt, REP_ACK)
        return None
    _reply(conn, opt, REP_ERR_UNSUP, b"not supported by this read-only server")
    return None


def _info_or_go(conn: Sock, opt: int, data: bytes, lookup: Lookup) -> Choice | None:
    try:
        name, requests = _parse_info_request(data)
    except (ValueError, UnicodeDecodeError) as exc:
        _reply(conn, opt, REP_ERR_INVALID, str(exc).encode())
        return None
    choice = lookup(name)
    if choice.export is None:
        _reply(conn, opt, REP_ERR_POLICY if choice.policy else REP_ERR_UNKNOWN, choice.error.encode())
        return None
    _reply(conn, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, choice.export.size, READ_ONLY_FLAGS))
    if INFO_BLOCK_SIZE in requests:
        _reply(conn, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_REQUEST))
    _reply(conn, opt, REP_ACK)
    return choice if opt == OPT_GO else None


# ---- server: transmission --------------------------------------------------------------------


def _simple(conn: Sock, error: int, handle: int, data: bytes = b"") -> None:
    conn.sendall(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data)


def serve(conn: Sock, choice: Choice, on_error: Callable[[Exception], None] | None = None) -> None:
    """Answer requests until the client disconnects or the deadline passes (then ESHUTDOWN)."""
    export = choice.export
    assert export is not None
    while True:
        magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(recv_exact(conn, _REQUEST.size))
        if magic != REQUEST_MAGIC:
            raise ProtocolError("bad request magic")
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST:
                raise ProtocolError("oversized write")
            _discard(conn, length)
        if choice.deadline is not None and time.time() >= choice.deadline:
            _simple(conn, ESHUTDOWN, handle)
            return
        if cmd == CMD_DISC:
            return
        if cmd == CMD_READ:
            _read(conn, export, handle, offset, length, on_error)
        elif cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            _simple(conn, EPERM, handle)
        elif cmd in (CMD_FLUSH, CMD_CACHE):
            _simple(conn, 0, handle)
        else:
            _simple(conn, EINVAL, handle)


def _read(
    conn: Sock, export: Export, handle: int, offset: int, length: int, on_error: Callable[[Exception], None] | None
) -> None:
    if length > MAX_REQUEST or offset + length > export.size:
        _simple(conn, EINVAL, handle)
        return
    try:
        data = export.pread(length, offset)
    except Exception as exc:  # a damaged chunk fails this read only, and is reported
        if on_error is not None:
            on_error(exc)
        _simple(conn, EIO, handle)
        return
    _simple(conn, 0, handle, data)


# ---- client ----------------------------------------------------------------------------------


def _read_opt_reply(conn: Sock, opt: int) -> tuple[int, bytes]:
    magic, r_opt, rep, length = _OPT_REPLY.unpack(recv_exact(conn, _OPT_REPLY.size))
    if magic != REPLY_MAGIC_OPT or r_opt != opt or length > MAX_OPTION:
        raise ProtocolError("bad option reply from server")
    return rep, recv_exact(conn, length)


def _send_opt(conn: Sock, opt: int, data: bytes = b"") -> None:
    conn.sendall(_OPT_HEAD.pack(IHAVEOPT, opt, len(data)) + data)


def connect_export(
    sock: socket.socket, name: str, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> tuple[Sock, int, int]:
    """Client handshake on a connected socket: (STARTTLS), NBD_OPT_GO name -> (conn, size, flags).

    Raises Refused with the server's message when the export is refused.
    """
    conn: Sock = sock
    head = recv_exact(conn, 18)
    if head[:16] != NBDMAGIC + IHAVEOPT:
        raise ProtocolError("not a newstyle NBD server")
    (server_flags,) = struct.unpack(">H", head[16:])
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("the server does not speak fixed newstyle NBD")
    conn.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)))
    if tls is not None:
        _send_opt(conn, OPT_STARTTLS)
        rep, msg = _read_opt_reply(conn, OPT_STARTTLS)
        if rep != REP_ACK:
            raise Refused(f"the server refused TLS: {msg.decode('utf-8', 'replace')}")
        conn = tls.wrap_socket(sock, server_hostname=server_hostname)
    raw = name.encode()
    _send_opt(conn, OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    size, flags = -1, 0
    while True:
        rep, data = _read_opt_reply(conn, OPT_GO)
        if rep == REP_ACK:
            break
        if rep == REP_INFO and len(data) >= 12 and struct.unpack_from(">H", data)[0] == INFO_EXPORT:
            _kind, size, flags = struct.unpack_from(">HQH", data)
        elif rep >= 2**31:
            raise Refused(data.decode("utf-8", "replace") or f"export refused (NBD error {rep - 2**31})")
    if size < 0:
        raise ProtocolError("the server did not send the export size")
    return conn, size, flags
