"""MinIO SDK adapter: the synchronous ``minio`` client on a bounded thread pool, with retries."""

from __future__ import annotations

import asyncio
import functools
import itertools
import ssl
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from imaging_gateway.errors import StorageError, StoreUnavailable
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ListPage, ObjectInfo, RangeRead
from imaging_gateway.storage.s3 import (
    PART_SIZE,
    RetryPolicy,
    TransientError,
    call_with_retries,
    classify_status,
    status_error,
)

T = TypeVar("T")

_SPOOL_IN_MEMORY = PART_SIZE
"""Bodies up to this size are buffered in memory; larger ones spill to a temporary file."""
_SPOOL_WRITE = 1 << 20
"""Chunks are gathered to this size before one (threaded) write to the spool."""

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.ProtocolError,  # connection reset / aborted, incomplete body
    urllib3.exceptions.TimeoutError,  # connect and read timeouts
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.MaxRetryError,
    urllib3.exceptions.DecodeError,
    ConnectionError,
    TimeoutError,
)

_SDK_ERRORS: tuple[type[BaseException], ...] = (
    S3Error,
    ServerError,
    InvalidResponseError,
    ValueError,  # the SDK's argument checks
    urllib3.exceptions.HTTPError,
    *_TRANSPORT_ERRORS,
)


def minio_error_status(exc: BaseException) -> tuple[int, str | None] | None:
    """(HTTP status, S3 code) carried by a MinIO SDK error; None for transport errors."""
    if isinstance(exc, S3Error):
        response = exc.response
        return (int(response.status) if response is not None else 500), exc.code
    if isinstance(exc, ServerError):
        return exc.status_code, None
    if isinstance(exc, InvalidResponseError):  # non-XML answer, e.g. from a proxy
        code = getattr(exc, "_code", 500)
        return (code if isinstance(code, int) else 500), None
    return None


def is_transient_minio_error(exc: BaseException) -> bool:
    """Whether an exception from the MinIO SDK / urllib3 is worth another attempt."""
    if isinstance(exc, urllib3.exceptions.SSLError):
        return False
    status = minio_error_status(exc)
    if status is not None:
        return classify_status(*status) == "retry"
    return isinstance(exc, _TRANSPORT_ERRORS)


class _Spool:
    """An append-only body buffer: memory up to a threshold, then a temporary file."""

    def __init__(self) -> None:
        self.file: BinaryIO = cast(
            BinaryIO, tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        )
        self.size = 0


class MinioStore:
    """An S3 bucket (optional key prefix) through the MinIO Python SDK.

    The SDK is synchronous (urllib3): every call runs on this store's own thread pool,
    sized like its urllib3 connection pool (``settings.max_connections``), so one slow
    store cannot starve the event loop's default executor. urllib3's own retries are off;
    the same ``RetryPolicy`` and error classification as ``S3Store`` apply.
    """

    def __init__(
        self,
        settings: StoreSettings,
        *,
        retry: RetryPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(settings.endpoint)
        if parts.scheme not in {"http", "https"} or not parts.netloc or not settings.bucket:
            raise StorageError(
                f"store {settings.name!r}: a MinIO store needs an http(s) endpoint and a bucket"
            )
        self.name = settings.name
        self._settings = settings
        self._endpoint = settings.endpoint.rstrip("/")
        self._bucket = settings.bucket
        self._prefix = settings.prefix
        self._retry = retry or RetryPolicy(retries=settings.retries)
        secure = parts.scheme == "https"
        # A given context (system trust plus tls.ca_file) replaces certifi's bundle; it is
        # this store's own, as urllib3 sets options on the context it is handed.
        context = ssl_context if secure and settings.verify_tls else None
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=settings.max_connections,
            block=True,
            timeout=urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
            retries=False,
            cert_reqs="CERT_REQUIRED" if settings.verify_tls else "CERT_NONE",
            ca_certs=certifi.where() if secure and context is None else None,
            ssl_context=context,
        )
        self._client = Minio(
            parts.netloc,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=secure,
            region=settings.region,
            http_client=self._http,
            cert_check=settings.verify_tls,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_connections, thread_name_prefix=f"minio-{settings.name}"
        )

    def __repr__(self) -> str:
        return (
            f"MinioStore(name={self.name!r}, endpoint={self._endpoint!r}, bucket={self._bucket!r})"
        )

    # -- plumbing -----------------------------------------------------------

    def _full(self, key: str) -> str:
        if not key:
            raise StorageError(f"store {self.name!r}: empty object key")
        return self._prefix + key

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _translate(self, exc: BaseException, op: str, key: str | None) -> BaseException:
        """The gateway error for an SDK exception (``TransientError`` when retryable).

        SDK exceptions name the bucket and key, and urllib3's the request path, so
        none of their text is carried into the gateway's messages.
        """
        if isinstance(exc, urllib3.exceptions.SSLError):
            return StorageError(f"store {self.name!r}: TLS failure talking to {self._endpoint}")
        if isinstance(exc, ValueError):  # the SDK's own argument checks
            return StorageError(f"store {self.name!r}: {op}: the SDK refused the key ({exc})")
        status = minio_error_status(exc)
        if status is None:
            if isinstance(exc, _TRANSPORT_ERRORS):
                return TransientError(_describe_transport(exc))
            return StorageError(f"store {self.name!r} at {self._endpoint}: {op} failed")
        code_status, code = status
        return status_error(
            store=self.name,
            endpoint=self._endpoint,
            bucket=self._bucket,
            op=op,
            key=key,
            status=code_status,
            code=code,
        )

    async def _call(
        self, op: str, key: str | None, fn: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        """Run one SDK call in the pool, translating errors, with retries."""

        async def attempt() -> T:
            try:
                return await self._run(fn, *args, **kw)
            except _SDK_ERRORS as exc:
                raise self._translate(exc, op, key) from None

        return await call_with_retries(
            self._retry, attempt, store=self.name, endpoint=self._endpoint, op=op
        )

    # -- ObjectStore ----------------------------------------------------------

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        """List up to ``limit`` (1..1000) objects with keys after ``start_after``.

        Keys come back without the store prefix, in the server's listing order. The SDK
        pages 1000 keys at a time, so the page is cut from its stream (one more key is
        pulled to learn whether more follow). Raises ``StorageError``, ``StoreUnavailable``.
        """
        limit = max(1, min(limit, 1000))
        after = self._prefix + start_after if start_after else None

        def page() -> list[Any]:
            listing = self._client.list_objects(
                self._bucket, prefix=self._prefix or None, recursive=True, start_after=after
            )
            return list(itertools.islice(listing, limit + 1))

        found = await self._call("list", None, page)
        cut = len(self._prefix)
        objects = [
            ObjectInfo(
                key=obj.object_name[cut:],
                size=int(obj.size or 0),
                etag=(obj.etag or "").strip('"'),
                last_modified=_aware(obj.last_modified),
            )
            for obj in found[:limit]
            if obj.object_name
            and obj.object_name.startswith(self._prefix)
            and len(obj.object_name) > cut
        ]
        return ListPage(objects=objects, is_truncated=len(found) > limit)

    async def stat(self, key: str) -> ObjectInfo:
        """Size, ETag, last-modified.

        Raises ``ObjectNotFound``, ``StorageError``, ``StoreUnavailable``.
        """
        obj = await self._call("stat", key, self._client.stat_object, self._bucket, self._full(key))
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=(obj.etag or "").strip('"'),
            last_modified=_aware(obj.last_modified),
        )

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        """Ranged GET; past the end gives empty data.

        Raises like ``stat``; ``ValueError`` on a negative offset or length.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            info = await self.stat(key)
            return RangeRead(b"", offset, info.etag, info.size)
        full = self._full(key)

        def read() -> RangeRead | None:
            try:
                resp = self._client.get_object(self._bucket, full, offset=offset, length=length)
            except S3Error as exc:
                if exc.code == "InvalidRange":
                    return None
                raise
            try:
                data = resp.read()
                etag = (resp.headers.get("ETag") or "").strip('"')
                total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
                size = int(total) if total.isdigit() else offset + len(data)
                if resp.status == 200:  # Range ignored: cut the window out ourselves
                    size, data = len(data), data[offset : offset + length]
                return RangeRead(data, offset, etag, size)
            finally:
                resp.close()
                resp.release_conn()

        result = await self._call("read_range", key, read)
        if result is None:
            info = await self.stat(key)
            return RangeRead(b"", offset, info.etag, info.size)
        return result

    async def read_stream(
        self,
        key: str,
        *,
        offset: int = 0,
        chunk_size: int = 1 << 20,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream from ``offset`` in pieces of at most ``chunk_size``, each read on the pool.

        One GET; a connection lost mid-stream resumes at the last byte delivered, pinned
        to the first ETag (``If-Match``). ``if_match`` pins the first GET too (its ETag is
        checked as well, in case a server ignores the header). Raises ``ObjectNotFound``,
        ``StorageError`` (including "object changed while it was being read"),
        ``StoreUnavailable``. Offset past the end yields nothing.
        """
        if offset < 0 or chunk_size <= 0:
            raise ValueError("offset must be >= 0 and chunk_size > 0")
        full = self._full(key)
        pos = offset
        etag: str | None = if_match or None

        def open_at(at: int, pinned: str | None) -> Any:
            headers: dict[str, str | list[str] | tuple[str]] | None = (
                {"If-Match": f'"{pinned}"'} if pinned else None
            )
            try:
                return self._client.get_object(
                    self._bucket, full, offset=at, request_headers=headers
                )
            except S3Error as exc:
                if exc.code == "InvalidRange":
                    return None
                raise

        stalls = 0  # consecutive broken bodies without progress
        while True:
            resp = await self._call("read_stream", key, open_at, pos, etag)
            if resp is None:
                return
            failed: BaseException | None = None
            try:
                got = (resp.headers.get("ETag") or "").strip('"')
                if etag and got and got != etag:
                    raise StorageError(
                        f"store {self.name!r}: object changed while it was being read"
                    )
                etag = etag or got or None
                while True:
                    try:
                        chunk: bytes = await self._run(resp.read, chunk_size)
                    except _SDK_ERRORS as exc:
                        failed = exc
                        break
                    if not chunk:
                        return
                    pos += len(chunk)
                    stalls = 0
                    yield chunk
            finally:
                resp.close()
                resp.release_conn()
            assert failed is not None  # the loop above only falls through on a failure
            if not is_transient_minio_error(failed):
                raise self._translate(failed, "read_stream", key) from None
            stalls += 1
            if stalls > self._retry.retries:
                raise StoreUnavailable(
                    f"store {self.name!r} at {self._endpoint}: read_stream failed after "
                    f"{stalls} attempts: {_describe_transport(failed)}"
                ) from None
            await asyncio.sleep(self._retry.delay(stalls))

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str = "application/dicom"
    ) -> ObjectInfo:
        """Spool the stream (memory up to 8 MiB, then a temp file), then ``put_object`` it.

        A known length lets the SDK choose one PUT or 8 MiB parts and lets a failed upload
        be retried from the spool. Raises ``StorageError``, ``StoreUnavailable``.
        """
        full = self._full(key)
        spool = _Spool()
        try:
            pending = bytearray()
            async for chunk in chunks:
                pending += chunk
                if len(pending) >= _SPOOL_WRITE:
                    await self._run(spool.file.write, bytes(pending))
                    spool.size += len(pending)
                    pending.clear()
            if pending:
                await self._run(spool.file.write, bytes(pending))
                spool.size += len(pending)
                pending.clear()

            def put() -> Any:
                spool.file.seek(0)
                return self._client.put_object(
                    self._bucket,
                    full,
                    spool.file,
                    spool.size,
                    content_type=content_type,
                    part_size=PART_SIZE,
                    num_parallel_uploads=1,
                )

            result = await self._call("write", key, put)
        finally:
            await self._run(spool.file.close)
        date = result.http_headers.get("Date") if result.http_headers else None
        return ObjectInfo(
            key=key,
            size=spool.size,
            etag=(result.etag or "").strip('"'),
            last_modified=_http_date(date),
        )

    async def delete(self, key: str) -> None:
        """Delete one object; a missing key is fine.

        Raises ``StorageError``, ``StoreUnavailable``.
        """
        full = self._full(key)

        def remove() -> None:
            try:
                self._client.remove_object(self._bucket, full)
            except S3Error as exc:
                if exc.code != "NoSuchKey":
                    raise

        await self._call("delete", key, remove)

    async def close(self) -> None:
        """Stop the thread pool (after running calls finish) and drop pooled connections."""
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        self._http.clear()

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist. Raises ``StorageError``, ``StoreUnavailable``."""

        def ensure() -> None:
            if not self._client.bucket_exists(self._bucket):
                try:
                    self._client.make_bucket(self._bucket, location=self._settings.region)
                except S3Error as exc:
                    if exc.code != "BucketAlreadyOwnedByYou":
                        raise

        await self._call("ensure_bucket", None, ensure)


def _describe_transport(exc: BaseException) -> str:
    """Name a urllib3/OS error without its text (which carries the request path)."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _describe_transport(exc.reason)
    if isinstance(exc, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
        return "cannot connect (connection refused or unreachable)"
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    return type(exc).__name__


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _http_date(value: str | None) -> datetime:
    if value:
        try:
            return parsedate_to_datetime(value).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)
