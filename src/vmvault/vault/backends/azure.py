"""Azure Blob backend (azure-storage-blob): ``azure://ACCOUNT/CONTAINER[/PREFIX]``.

The endpoint and key come from a connection string in ``VMVAULT_AZURE_<ACCOUNT>`` (the account
name upper-cased), else from ``AZURE_STORAGE_CONNECTION_STRING`` when its AccountName is the
account; Azurite's connection strings work the same way. Neither is ever logged or stored.

How each operation meets the contract (vault/backends/base.py):
- put: one Put Blob up to SINGLE_PUT bytes; larger objects are staged as blocks in parallel under
  random block ids and appear whole only with Put Block List (so two writers of one name never
  mix blocks, which the SDK's offset-numbered block ids would).
- put_if_absent: the same with ``If-None-Match: *``; 409/412 means the name exists.
- get: ranged Get Blob; a range starting at or past the end is empty (416 from the service).
- list: List Blobs lists committed blobs only; uncommitted blocks of a killed put are invisible
  and the service discards them (after a week).
- now: the ``Date`` header of a service response, so ages compare the store's own timestamps.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient

from vmvault.errors import AlreadyExists, InvalidInput, ObjectNotFound, StorageCredentialsError, StorageError
from vmvault.vault.backends.base import ObjectInfo, check_name
from vmvault.vault.backends.objectstore import ObjectStoreBackend
from vmvault.vault.backends.retry import Retrier

SINGLE_PUT = 8 * 1024 * 1024
BLOCK = 4 * 1024 * 1024
PARALLEL = 4
_URL_RE = re.compile(r"^azure://([a-z0-9]{3,24})/([a-z0-9](?:[a-z0-9-]{1,61})[a-z0-9])(?:/(.+))?$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


def parse_url(url: str) -> tuple[str, str, str]:
    """(account, container, prefix) of azure://ACCOUNT/CONTAINER[/PREFIX]."""
    m = _URL_RE.fullmatch(url.rstrip("/"))
    if not m or (m.group(3) and (check_name(m.group(3)) != m.group(3))):
        raise InvalidInput(
            f"invalid Azure storage location {url!r}",
            hint="use azure://ACCOUNT/CONTAINER[/PREFIX] (lower-case account and container names)",
        )
    return m.group(1), m.group(2), m.group(3) or ""


def connection_string(account: str) -> str:
    """The account's connection string from the environment (never from the URL or the catalog)."""
    var = f"VMVAULT_AZURE_{account.upper()}"
    value = os.environ.get(var)
    if value:
        return value
    fallback = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "")
    fields = dict(p.split("=", 1) for p in fallback.split(";") if "=" in p)
    if fallback and fields.get("AccountName") == account:
        return fallback
    raise StorageCredentialsError(
        f"no credentials for Azure storage account {account}",
        hint=f"set {var} to the account's connection string (or AZURE_STORAGE_CONNECTION_STRING "
        f"with AccountName={account})",
    )


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return True
    return isinstance(exc, HttpResponseError) and exc.status_code in _TRANSIENT_STATUS


class _Gather:
    """A seekable sink for the SDK's readinto that keeps the bytes it is handed instead of copying
    them: readall writes the download into a BytesIO, one more copy of every byte read (a restore
    reads its whole point this way). Writes of the SDK's parallel chunks come under its lock."""

    def __init__(self) -> None:
        self._pos = 0
        self._parts: list[tuple[int, bytes]] = []

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size()}[whence]
        self._pos = base + pos
        return self._pos

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._parts.append((self._pos, bytes(data)))  # bytes of bytes is the same object: no copy
        self._pos += len(data)
        return len(data)

    def size(self) -> int:
        return max((pos + len(part) for pos, part in self._parts), default=0)

    def value(self) -> bytes:
        if len(self._parts) == 1 and self._parts[0][0] == 0:
            return self._parts[0][1]
        whole = bytearray(self.size())
        for pos, part in self._parts:
            whole[pos : pos + len(part)] = part
        return bytes(whole)


def _download(blob: Any, offset: int, length: int | None) -> bytes:
    sink = _Gather()
    blob.download_blob(offset=offset, length=length, max_concurrency=PARALLEL).readinto(sink)
    return sink.value()


class AzureBackend(ObjectStoreBackend):
    def __init__(self, url: str, container: ContainerClient, prefix: str) -> None:
        self._url = url
        self._container = container
        self._prefix = f"{prefix}/" if prefix else ""
        self.retrier = Retrier(url, _transient)

    @classmethod
    def from_url(cls, url: str) -> AzureBackend:
        account, container, prefix = parse_url(url)
        try:
            service = BlobServiceClient.from_connection_string(connection_string(account), retry_total=0)
        except ValueError as exc:
            raise StorageCredentialsError(
                f"the connection string for Azure storage account {account} is not valid",
                hint=f"check VMVAULT_AZURE_{account.upper()}",
            ) from exc
        return cls(url.rstrip("/"), service.get_container_client(container), prefix)

    def ensure_container(self) -> None:
        """Create the container when it does not exist (vault create)."""
        with contextlib.suppress(ResourceExistsError):
            self._call("create container", self._container.create_container)

    # ---- helpers ------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return self.retrier.call(what, fn)
        except ResourceNotFoundError:
            raise
        except (ResourceExistsError, ResourceModifiedError):
            raise
        except HttpResponseError as exc:
            if exc.status_code in (401, 403):
                raise StorageCredentialsError(
                    f"{what}: {self._url} refused the credentials ({exc.status_code})",
                    hint="check the account's connection string in the environment",
                ) from exc
            if exc.status_code in (404, 409, 412, 416):
                raise
            raise StorageError(f"{what} in {self._url} failed: {exc.reason or exc.status_code}") from exc

    def _missing(self, name: str) -> ObjectNotFound:
        return ObjectNotFound(f"vault object {name} is missing from {self._url}")

    # ---- writing ------------------------------------------------------------------------------
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self._upload(name, data, create_only=False)

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> None:
        try:
            self._upload(name, data, create_only=True)
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise AlreadyExists(f"vault object {name} already exists in {self._url}") from exc
        except HttpResponseError as exc:
            if exc.status_code in (409, 412):
                raise AlreadyExists(f"vault object {name} already exists in {self._url}") from exc
            raise

    def _upload(self, name: str, data: bytes | bytearray | memoryview, *, create_only: bool) -> None:
        blob = self._container.get_blob_client(self._key(name))
        # If-None-Match: * (upload_blob sets it itself when it must not overwrite)
        cond: dict[str, Any] = {"match_condition": MatchConditions.IfMissing} if create_only else {}
        view = memoryview(data).cast("B")
        if len(view) <= SINGLE_PUT:
            payload = bytes(view)
            self._call(f"write {name}", lambda: blob.upload_blob(payload, overwrite=not create_only))
            return
        tag = secrets.token_hex(8)  # this writer's block ids: another writer of the name never uses them
        ids = [base64.b64encode(f"{tag}-{i:08d}".encode()).decode() for i in range(0, len(view), BLOCK)]

        def stage(k: int) -> None:
            part = bytes(view[k * BLOCK : (k + 1) * BLOCK])
            self._call(f"write {name}", lambda: blob.stage_block(ids[k], part))

        with ThreadPoolExecutor(PARALLEL, thread_name_prefix="vmv-azput") as pool:
            list(pool.map(stage, range(len(ids))))
        blocks = [BlobBlock(block_id=i) for i in ids]
        self._call(f"write {name}", lambda: blob.commit_block_list(blocks, **cond))

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            self._call(f"delete {name}", lambda: self._container.delete_blob(key))
        except ResourceNotFoundError as exc:
            raise self._missing(name) from exc

    # ---- reading ------------------------------------------------------------------------------
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        blob = self._container.get_blob_client(self._key(name))
        if length == 0:
            self.stat(name)
            return b""
        try:
            return self._call(
                f"read {name}",
                lambda: _download(blob, offset, length),
            )
        except ResourceNotFoundError as exc:
            raise self._missing(name) from exc
        except HttpResponseError as exc:
            if exc.status_code == 416:  # the range starts at or past the end: the object exists
                return b""
            raise

    def stat(self, name: str) -> ObjectInfo:
        blob = self._container.get_blob_client(self._key(name))
        try:
            props = self._call(f"read {name}", blob.get_blob_properties)
        except ResourceNotFoundError as exc:
            raise self._missing(name) from exc
        return ObjectInfo(name, int(props.size), props.last_modified.timestamp())

    def _list(self, start: str) -> Iterator[ObjectInfo]:
        def page() -> list[ObjectInfo]:
            return [
                ObjectInfo(b.name[len(self._prefix) :], int(b.size), b.last_modified.timestamp())
                for b in self._container.list_blobs(name_starts_with=start)
            ]

        try:
            yield from self._call("list", page)
        except ResourceNotFoundError:
            return  # no container yet: no objects

    def now(self) -> float:
        seen: list[str] = []

        def hook(response: Any) -> None:
            seen.append(response.http_response.headers.get("Date", ""))

        with contextlib.suppress(ResourceNotFoundError):  # a 404 carries the Date header too
            self._call("read the clock", lambda: self._container.get_container_properties(raw_response_hook=hook))
        if not seen or not seen[-1]:
            raise StorageError(f"{self._url} gave no Date header: cannot judge ages by the store's clock")
        return parsedate_to_datetime(seen[-1]).timestamp()

    def delete_temporaries(self, older_than: float, dead_objects: frozenset[str] = frozenset()) -> int:
        return 0  # uncommitted blocks are invisible and the service discards them itself
