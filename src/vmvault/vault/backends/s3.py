"""S3 backend (boto3): ``s3://BUCKET[/PREFIX]``.

Credentials, region and endpoint come from the standard AWS variables and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for
S3-compatible stores, ``~/.aws/config``); none is ever logged or stored.

How each operation meets the contract (vault/backends/base.py):
- put: one PutObject up to SINGLE_PUT bytes; larger objects are a multipart upload whose parts
  go in parallel, visible only once CompleteMultipartUpload succeeds (a killed put leaves an
  unfinished upload, invisible to listings, which ``delete_temporaries`` aborts after the grace).
- put_if_absent: the same with ``If-None-Match: *``; 412 means the name exists (409, a
  concurrent conditional write, is retried and then sees the winner's 412).
- get: ranged GetObject; a range starting at or past the end is empty (416).
- delete: S3 deletes a missing key without complaint, so a HeadObject first tells ObjectNotFound.
- now: the ``Date`` header of a response, so ages compare the store's own timestamps.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from vmvault.errors import AlreadyExists, InvalidInput, ObjectNotFound, StorageCredentialsError, StorageError
from vmvault.vault.backends.base import ObjectInfo, check_name
from vmvault.vault.backends.objectstore import ObjectStoreBackend
from vmvault.vault.backends.retry import Retrier

SINGLE_PUT = 8 * 1024 * 1024
PART = 8 * 1024 * 1024  # S3's minimum part is 5 MiB
PARALLEL = 4
_URL_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.+))?$")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "ConditionalRequestConflict"}  # fmt: skip
T = TypeVar("T")


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET[/PREFIX]."""
    m = _URL_RE.fullmatch(url.rstrip("/"))
    if not m or (m.group(2) and check_name(m.group(2)) != m.group(2)):
        raise InvalidInput(f"invalid S3 storage location {url!r}", hint="use s3://BUCKET[/PREFIX]")
    return m.group(1), m.group(2) or ""


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return _status(exc) in _TRANSIENT_STATUS or _code(exc) in _TRANSIENT_CODES
    return isinstance(exc, BotoCoreError) and not isinstance(exc, NoCredentialsError)


_CLIENTS: dict[tuple[str, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE")  # fmt: skip


def _client() -> Any:
    """One S3 client per process and environment: making one loads botocore's models (slow), and a
    client is thread-safe. Keyed by the AWS variables, kept only in memory."""
    key = tuple(os.environ.get(v, "") for v in _ENV)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=16,
                            connect_timeout=10, read_timeout=60)  # fmt: skip
            client = _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return client


class S3Backend(ObjectStoreBackend):
    def __init__(self, url: str, client: Any, bucket: str, prefix: str) -> None:
        self._url = url
        self._s3 = client
        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self.retrier = Retrier(url, _transient)

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        bucket, prefix = parse_url(url)
        return cls(url.rstrip("/"), _client(), bucket, prefix)

    def ensure_container(self) -> None:
        """Create the bucket when it does not exist (vault create)."""
        try:
            self._call("create bucket", lambda: self._s3.head_bucket(Bucket=self._bucket))
        except ClientError as exc:
            if _status(exc) != 404:
                raise
            self._call("create bucket", lambda: self._s3.create_bucket(Bucket=self._bucket))

    # ---- helpers ------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return self.retrier.call(what, fn)
        except NoCredentialsError as exc:
            raise StorageCredentialsError(
                f"{what}: no AWS credentials for {self._url}",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)",
            ) from exc
        except ClientError as exc:
            if _status(exc) in (401, 403):
                raise StorageCredentialsError(
                    f"{what}: {self._url} refused the credentials ({_code(exc)})",
                    hint="check the AWS credentials in the environment and the bucket's policy",
                ) from exc
            if _status(exc) in (404, 412, 416):
                raise
            raise StorageError(f"{what} in {self._url} failed: {_code(exc) or _status(exc)}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} in {self._url} failed: {exc}") from exc

    def _missing(self, name: str) -> ObjectNotFound:
        return ObjectNotFound(f"vault object {name} is missing from {self._url}")

    # ---- writing ------------------------------------------------------------------------------
    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self._upload(name, data, {})

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> None:
        try:
            self._upload(name, data, {"IfNoneMatch": "*"})
        except ClientError as exc:
            if _status(exc) == 412:
                raise AlreadyExists(f"vault object {name} already exists in {self._url}") from exc
            raise

    def _upload(self, name: str, data: bytes | bytearray | memoryview, cond: dict[str, str]) -> None:
        key = self._key(name)
        view = memoryview(data).cast("B")
        if len(view) <= SINGLE_PUT:
            body = bytes(view)
            self._call(f"write {name}", lambda: self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, **cond))
            return
        upload = self._call(f"write {name}", lambda: self._s3.create_multipart_upload(Bucket=self._bucket, Key=key))
        upload_id = upload["UploadId"]

        def part(k: int) -> dict[str, Any]:
            body = bytes(view[k * PART : (k + 1) * PART])
            done = self._call(f"write {name}", lambda: self._s3.upload_part(
                Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumber=k + 1, Body=body))  # fmt: skip
            return {"PartNumber": k + 1, "ETag": done["ETag"]}

        try:
            with ThreadPoolExecutor(PARALLEL, thread_name_prefix="vmv-s3put") as pool:
                parts = list(pool.map(part, range((len(view) + PART - 1) // PART)))
            done = {"Parts": parts}
            self._call(f"write {name}", lambda: self._s3.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload=done, **cond))  # fmt: skip
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):  # else delete_temporaries aborts it later
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
            raise

    def delete(self, name: str) -> None:
        self.stat(name)  # S3 deletes a missing key silently; the contract says ObjectNotFound
        key = self._key(name)
        self._call(f"delete {name}", lambda: self._s3.delete_object(Bucket=self._bucket, Key=key))

    # ---- reading ------------------------------------------------------------------------------
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if length == 0:
            self.stat(name)
            return b""
        extra: dict[str, str] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"

        def fetch() -> bytes:
            body = self._s3.get_object(Bucket=self._bucket, Key=key, **extra)["Body"]
            return bytes(body.read())

        try:
            return self._call(f"read {name}", fetch)
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._missing(name) from exc
            if _status(exc) == 416:  # the range starts at or past the end: the object exists
                return b""
            raise

    def stat(self, name: str) -> ObjectInfo:
        key = self._key(name)
        try:
            head = self._call(f"read {name}", lambda: self._s3.head_object(Bucket=self._bucket, Key=key))
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._missing(name) from exc
            raise
        return ObjectInfo(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def _list(self, start: str) -> Iterator[ObjectInfo]:
        token: dict[str, str] = {}
        while True:
            args = {"Bucket": self._bucket, "Prefix": start, **token}
            try:
                page = self._call("list", lambda args=args: self._s3.list_objects_v2(**args))  # type: ignore[misc]
            except ClientError as exc:
                if _status(exc) == 404:
                    return  # no bucket yet: no objects
                raise
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(self._prefix) :], int(item["Size"]), item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def now(self) -> float:
        try:
            head = self._call("read the clock", lambda: self._s3.head_bucket(Bucket=self._bucket))
            date = head["ResponseMetadata"]["HTTPHeaders"].get("date", "")
        except ClientError as exc:
            date = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date", "")
        if not date:
            raise StorageError(f"{self._url} gave no Date header: cannot judge ages by the store's clock")
        return parsedate_to_datetime(date).timestamp()

    def delete_temporaries(self, older_than: float, dead_objects: frozenset[str] = frozenset()) -> int:
        """Abort unfinished multipart uploads (of puts that died) older than older_than, or at once
        when they are the upload of one of dead_objects (a dead job's pack)."""
        now, aborted = self.now(), 0
        found = self._call("list uploads", lambda: self._s3.list_multipart_uploads(
            Bucket=self._bucket, Prefix=self._prefix))  # fmt: skip
        for up in found.get("Uploads", []):
            dead = str(up["Key"]).rsplit("/", 1)[-1] in dead_objects
            if not dead and now - up["Initiated"].timestamp() < older_than:
                continue
            try:
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=up["Key"], UploadId=up["UploadId"])
            except ClientError:
                continue
            aborted += 1
        return aborted
