"""Azure reads keep the SDK's bytes instead of copying them through a BytesIO (readall's way):
a read the SDK splits into parallel chunks (over its 32 MiB single GET) still comes back whole
and in order, against a real Azurite."""

from __future__ import annotations

import os

import pytest

import objstores
from vmvault.vault.backends import open_backend
from vmvault.vault.backends.azure import _Gather


def test_a_read_over_the_single_get_size_comes_back_whole_and_in_order(
    azurite: objstores.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in azurite.env.items():
        monkeypatch.setenv(name, value)
    backend = open_backend(objstores.fresh_azure_url())
    backend.ensure_container()
    data = os.urandom((32 << 20) + 3 * 4096 + 5)  # the rest after the first GET: parallel 4 MiB chunks
    backend.put("big", data)
    assert backend.get("big") == data
    assert backend.get("big", 7, (32 << 20) + 100) == data[7 : 7 + (32 << 20) + 100]
    assert backend.get("big", len(data) - 10, 100) == data[-10:]  # a range past the end is cut short


def test_the_sink_keeps_a_single_read_as_is_and_places_parallel_chunks_by_offset() -> None:
    one = _Gather()
    part = b"x" * 100
    one.seek(one.tell())
    one.write(part)
    assert one.value() is part  # no copy of a read that came in one GET
    many = _Gather()
    many.write(b"ab")
    many.seek(6)
    many.write(b"gh")
    many.seek(2)
    many.write(b"cdef")
    assert many.value() == b"abcdefgh"
