"""HTTP header values built from untrusted names (file names inside a guest's file system)."""

from __future__ import annotations

import re
import urllib.parse

_ASCII_SAFE = re.compile(r"[^A-Za-z0-9._ ()+-]")


def content_disposition(name: str) -> str:
    """`attachment` with an ASCII fallback and the exact name RFC 5987-encoded (RFC 6266).

    The name comes from a guest's file system: any byte but NUL and '/', so non-ASCII, quotes,
    backslashes, CR/LF. The fallback keeps only harmless ASCII; `filename*` carries the real name,
    percent-encoded as UTF-8 (surrogate escapes of undecodable bytes become their bytes).
    """
    fallback = _ASCII_SAFE.sub("_", name).strip(" .") or "download"
    raw = name.encode("utf-8", "surrogateescape")
    encoded = urllib.parse.quote(raw, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
