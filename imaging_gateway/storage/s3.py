"""S3 adapter: botocore-SigV4-signed requests over one shared aiohttp session, with retries."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote_plus, urlsplit

import aiohttp
from botocore.auth import EMPTY_SHA256_HASH, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from yarl import URL

from imaging_gateway.errors import ObjectNotFound, StorageError, StoreUnavailable
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ListPage, ObjectInfo, RangeRead
from imaging_gateway.storage.sigv4 import SigV4Signer
from imaging_gateway.storage.zerocopy import OpenBody

log = logging.getLogger(__name__)

T = TypeVar("T")

PART_SIZE = 8 * 1024 * 1024
"""Multipart part size; a body up to this size goes in one PUT."""
_READ_BUFFER = 256 * 1024
"""aiohttp's per-connection read buffer (it pauses the socket at twice this)."""
_HASH_IN_THREAD = 256 * 1024
"""Bodies larger than this are SHA-256 hashed off the event loop (hashlib releases the GIL)."""
_MAX_HEAD = 64 * 1024
"""Longest response head ``open_body`` accepts."""
_HEAD_READ = 16 * 1024
"""Bytes asked of the socket per read of a response head (what follows stays in the kernel)."""

# ---------------------------------------------------------------------------
# Retry policy and failure classification (shared with the MinIO adapter)

Outcome = Literal["ok", "retry", "not_found", "denied", "fatal"]

RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
"""S3 error codes worth another attempt whatever the HTTP status they come with."""


_PERMANENT_5XX = frozenset({501, 505})
"""Not Implemented / HTTP Version Not Supported: the server will say the same again."""


def classify_status(status: int, code: str | None = None) -> Outcome:
    """Map an S3 answer (HTTP status, XML error code) to what the adapter does with it.

    2xx is ``ok``; 5xx (but 501, 505), 429 and throttling/timeout codes are ``retry``; 404 is
    ``not_found``; 403 is ``denied``; anything else is ``fatal`` (retrying cannot cure it).
    """
    if 200 <= status < 300:
        return "ok"
    if (
        (status >= 500 and status not in _PERMANENT_5XX)
        or status == 429
        or (code is not None and code in RETRYABLE_CODES)
    ):
        return "retry"
    if status == 404:
        return "not_found"
    if status == 403:
        return "denied"
    return "fatal"


_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,  # refused, reset, server disconnected, socket timeouts
    aiohttp.ClientPayloadError,  # body cut short
    TimeoutError,
    ConnectionError,
)


def status_error(
    *,
    store: str,
    endpoint: str,
    bucket: str,
    op: str,
    key: str | None,
    status: int,
    code: str | None,
    message: str = "",
    retry_after: float | None = None,
) -> Exception:
    """The error an unwanted S3 status means, for every S3-speaking adapter.

    ``TransientError`` when retrying may help; otherwise ``ObjectNotFound`` or
    ``StorageError`` with a message that names the store, never the key or credentials.
    """
    outcome = classify_status(status, code)
    what = f"HTTP {status}" + (f" {code}" if code else "")
    if outcome == "retry":
        return TransientError(what, retry_after=retry_after)
    if outcome == "not_found":
        if code == "NoSuchBucket" or key is None:
            return StorageError(f"store {store!r}: bucket {bucket!r} does not exist at {endpoint}")
        return ObjectNotFound(store, key)
    if outcome == "denied":
        return StorageError(
            f"store {store!r}: access denied by {endpoint} on {op} ({what}); "
            "check the store's credentials and bucket policy"
        )
    if status == 412:
        return StorageError(f"store {store!r}: object changed while it was being read")
    detail = f": {message}" if message else ""
    return StorageError(f"store {store!r} at {endpoint}: {op} failed: {what}{detail}")


def is_transient_error(exc: BaseException) -> bool:
    """Whether a transport-level exception is worth another attempt.

    Connection failures, resets, truncated bodies and timeouts are; TLS verification
    failures are not (they are configuration errors that retrying cannot cure).
    """
    if isinstance(exc, aiohttp.ClientSSLError):
        return False
    return isinstance(exc, _TRANSIENT_EXCEPTIONS)


def describe_error(exc: BaseException) -> str:
    """A one-line description of a transport error that names no URL, key or credential."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        return f"cannot connect ({type(os_error).__name__}: {os_error.strerror or os_error})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


class TransientError(Exception):
    """One attempt failed in a way another attempt may cure; ``reason`` is safe to show."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base * 2**(n-1)))."""

    retries: int = 5
    """Further attempts after the first."""
    base_delay_s: float = 0.1
    max_delay_s: float = 10.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); honours Retry-After."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (retry - 1)))
        wait = random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay_s))
        return wait


async def call_with_retries(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    *,
    store: str,
    endpoint: str,
    op: str,
) -> T:
    """Run ``attempt`` until it returns, raises a non-transient error, or retries run out.

    ``attempt`` signals a curable failure by raising ``TransientError``. Raises
    ``StoreUnavailable`` naming the store, endpoint, operation and last reason once
    ``policy.retries`` further attempts have failed too.
    """
    failures = 0
    while True:
        try:
            return await attempt()
        except TransientError as exc:
            last = exc
        failures += 1
        if failures > policy.retries:
            raise StoreUnavailable(
                f"store {store!r} at {endpoint}: {op} failed after {failures} attempt"
                f"{'s' if failures > 1 else ''}: {last.reason}"
            ) from last
        delay = policy.delay(failures, last.retry_after)
        log.debug("store %r: %s: %s; retry %d in %.2fs", store, op, last.reason, failures, delay)
        await asyncio.sleep(delay)


# ---------------------------------------------------------------------------
# Small helpers


def _host_header(endpoint: str) -> str:
    """The Host header for ``endpoint`` as the signer and aiohttp both write it."""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def _strip_etag(value: str | None) -> str:
    return (value or "").strip().strip('"')


def _http_date(value: str | None) -> datetime:
    if value:
        try:
            return parsedate_to_datetime(value).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)


def _iso_date(value: str | None) -> datetime:
    if value:
        try:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)


def _parse_xml(body: bytes) -> tuple[ET.Element, str]:
    """Root element and its namespace prefix (``{uri}`` or empty)."""
    # The body comes from the configured object store (not from gateway users), and
    # Python's bundled expat refuses entity-expansion bombs.
    root = ET.fromstring(body)  # noqa: S314
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    return root, ns


def _error_code(body: bytes) -> tuple[str | None, str]:
    """(Code, Message) of an S3 XML error body; (None, "") when there is none."""
    if not body:
        return None, ""
    try:
        root, ns = _parse_xml(body)
    except ET.ParseError:
        return None, ""
    return root.findtext(f"{ns}Code"), (root.findtext(f"{ns}Message") or "")[:200]


def _query(params: Mapping[str, str]) -> str:
    """A query string in SigV4 canonical encoding (what the signer and the wire both see)."""
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in params.items())


async def _sha256_hex(data: bytes) -> str:
    if len(data) > _HASH_IN_THREAD:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


async def _fill(it: AsyncIterator[bytes], buf: bytearray, size: int) -> bool:
    """Append chunks from ``it`` to ``buf`` until it holds ``size`` bytes; True when exhausted."""
    while len(buf) < size:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            return True
        buf += chunk
    return False


class _Chunker:
    """Cuts a response body into pieces of ``size`` bytes (the last may be shorter).

    Takes aiohttp's buffered pieces as they arrived (``readchunk`` does not copy) and
    joins them once per chunk; re-cutting through a bytearray copied every byte three
    times, ``read(n)`` twice.
    """

    def __init__(self, content: aiohttp.StreamReader, size: int) -> None:
        self._content = content
        self._size = size
        self._carry = b""

    async def next(self) -> bytes:
        """The next chunk; empty at the end of the body."""
        pieces: list[bytes] = []
        got = 0
        if self._carry:
            pieces.append(self._carry)
            got = len(self._carry)
            self._carry = b""
        while got < self._size:
            piece, end_of_http_chunk = await self._content.readchunk()
            if not piece:
                if end_of_http_chunk:
                    continue
                break
            pieces.append(piece)
            got += len(piece)
        if got > self._size:
            last = pieces[-1]
            keep = len(last) - (got - self._size)
            pieces[-1], self._carry = last[:keep], last[keep:]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


_ADDRESS_TTL_S = 300.0
"""How long ``open_body`` keeps the endpoint's resolved address (aiohttp's DNS cache TTL)."""
_AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, Any]


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP response head (through its blank line) and the body bytes read with it.

    Raises ``EOFError`` if the connection closes first, ``ValueError`` if the head is
    longer than ``_MAX_HEAD``.
    """
    buf = b""
    while True:
        data = await loop.sock_recv(sock, _HEAD_READ)
        if not data:
            raise EOFError
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[: end + 4], buf[end + 4 :]
        if len(buf) > _MAX_HEAD:
            raise ValueError("response head too long")


async def _read_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    while len(buf) < count:
        data = await loop.sock_recv(sock, count - len(buf))
        if not data:
            break
        buf += data
    return buf


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(HTTP version, status, fields by lower-case name) of a response head, or ValueError."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/") or not rest[:3].isdigit():
        raise ValueError("not an HTTP response")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError("malformed header field")
        fields[name.strip().lower()] = value.strip()
    return version, int(rest[:3]), fields


async def _skip(content: aiohttp.StreamReader, count: int) -> None:
    """Drop the first ``count`` bytes of a body (fewer if it ends first)."""
    while count > 0:
        piece = await content.read(min(count, 1 << 16))
        if not piece:
            return
        count -= len(piece)


# ---------------------------------------------------------------------------
# The adapter

_RETRY_IN_STREAM: tuple[type[BaseException], ...] = (TransientError, *_TRANSIENT_EXCEPTIONS)

_Handler = Callable[[aiohttp.ClientResponse], Awaitable[T]]


class S3Store:
    """An S3 bucket (path-style addressing, optional key prefix) over SigV4 + aiohttp.

    One ``aiohttp.ClientSession`` (created on first use, inside the running loop) carries
    every request, with at most ``settings.max_connections`` connections; the signer and
    credentials are built once. Payloads are signed with their real SHA-256, so the
    server verifies body integrity even over plain HTTP.
    """

    def __init__(
        self,
        settings: StoreSettings,
        *,
        retry: RetryPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not settings.endpoint or not settings.bucket:
            raise StorageError(f"store {settings.name!r}: an S3 store needs endpoint and bucket")
        self.name = settings.name
        # Verifies https endpoints (None: aiohttp's default, the system trust store);
        # ``verify_tls = false`` on the store turns verification off for it alone.
        self._ssl: ssl.SSLContext | bool = (ssl_context or True) if settings.verify_tls else False
        self._settings = settings
        self._endpoint = settings.endpoint.rstrip("/")
        self._prefix = settings.prefix
        self._bucket_url = f"{self._endpoint}/{quote(settings.bucket, safe='')}"
        # Given to the signer so it need not parse every URL for it (and sent as is).
        self._host = _host_header(self._endpoint)
        self._retry = retry or RetryPolicy(retries=settings.retries)
        self._credentials: Credentials | None = None
        self._signer: SigV4Signer | None = None
        if settings.access_key and settings.secret_key:
            self._credentials = Credentials(settings.access_key, settings.secret_key)
            self._signer = SigV4Signer(settings.access_key, settings.secret_key, settings.region)
        self._http: aiohttp.ClientSession | None = None
        self._idle: list[socket.socket] = []
        """Kept-alive connections of ``open_body``."""
        self._address: tuple[float, _AddressInfo] | None = None

    def __repr__(self) -> str:
        return (
            f"S3Store(name={self.name!r}, endpoint={self._endpoint!r}, "
            f"bucket={self._settings.bucket!r})"
        )

    # -- plumbing -----------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            s = self._settings
            connector = aiohttp.TCPConnector(
                limit=s.max_connections,
                limit_per_host=s.max_connections,
                ttl_dns_cache=300,
                keepalive_timeout=30,
                ssl=self._ssl,
            )
            self._http = aiohttp.ClientSession(
                connector=connector,
                # No total deadline (streams may be long); a stalled connect or read fails.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=s.timeout_s, sock_read=s.timeout_s
                ),
                auto_decompress=False,
                # Bodies are read in 1 MiB chunks: a 64 KiB buffer (the default) pauses
                # and resumes the socket sixteen times per chunk.
                read_bufsize=_READ_BUFFER,
                skip_auto_headers=("Accept-Encoding",),
                headers={"User-Agent": "imaging-gateway"},
            )
        return self._http

    def _object_url(self, key: str) -> str:
        if not key:
            raise StorageError(f"store {self.name!r}: empty object key")
        return f"{self._bucket_url}/{quote(self._prefix + key, safe='/')}"

    def _sign(
        self, method: str, url: str, headers: Mapping[str, str], payload_sha256: str
    ) -> dict[str, str]:
        if self._signer is None:
            return dict(headers)
        return self._signer.sign(method, url, headers, payload_sha256, host=self._host)

    async def _fail(self, resp: aiohttp.ClientResponse, op: str, key: str | None) -> None:
        """Raise the error an unwanted status means (``TransientError`` when retryable)."""
        body = b"" if resp.method == "HEAD" else await resp.read()
        code, message = _error_code(body)
        header = resp.headers.get("Retry-After")
        raise status_error(
            store=self.name,
            endpoint=self._endpoint,
            bucket=self._settings.bucket,
            op=op,
            key=key,
            status=resp.status,
            code=code,
            message=message,
            retry_after=float(header) if header and header.isdigit() else None,
        )

    async def _send(
        self,
        op: str,
        method: str,
        url: str,
        handle: _Handler[T],
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        payload_sha256: str = EMPTY_SHA256_HASH,
        accept: frozenset[int] = frozenset({200}),
    ) -> T:
        """Send one signed request with retries; ``handle`` turns an accepted response into T."""
        hdrs: Mapping[str, str] = headers or {}

        async def attempt() -> T:
            signed = self._sign(method, url, hdrs, payload_sha256)
            try:
                async with self._session().request(
                    method,
                    URL(url, encoded=True),
                    headers=signed,
                    data=body or None,
                    allow_redirects=False,
                ) as resp:
                    if resp.status not in accept:
                        await self._fail(resp, op, key)
                    return await handle(resp)
            except aiohttp.ClientSSLError as exc:
                raise StorageError(
                    f"store {self.name!r}: TLS failure talking to {self._endpoint} "
                    f"({type(exc).__name__})"
                ) from exc
            except _TRANSIENT_EXCEPTIONS as exc:
                raise TransientError(describe_error(exc)) from exc

        return await call_with_retries(
            self._retry, attempt, store=self.name, endpoint=self._endpoint, op=op
        )

    def _info_from_headers(self, key: str, resp: aiohttp.ClientResponse) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(resp.headers.get("Content-Length", "0")),
            etag=_strip_etag(resp.headers.get("ETag")),
            last_modified=_http_date(resp.headers.get("Last-Modified")),
        )

    # -- ObjectStore ----------------------------------------------------------

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        """List up to ``limit`` (1..1000) objects with keys after ``start_after``.

        Keys are returned without the store prefix, in the server's listing order: UTF-8
        byte order on AWS and MinIO, but path-segment order on SeaweedFS 4.x (it walks its
        filer tree, so "a.b/x" follows "a/x"). ``start_after`` is consistent either way.
        Raises ``StorageError`` (bucket missing, access denied) or ``StoreUnavailable``.
        """
        params = {
            "list-type": "2",
            "encoding-type": "url",
            "max-keys": str(max(1, min(limit, 1000))),
        }
        if self._prefix:
            params["prefix"] = self._prefix
        if start_after:
            params["start-after"] = self._prefix + start_after
        url = f"{self._bucket_url}?{_query(params)}"
        body = await self._send("list", "GET", url, _read_body)
        try:
            return self._parse_listing(body)
        except (ET.ParseError, ValueError) as exc:
            raise StorageError(
                f"store {self.name!r} at {self._endpoint}: unreadable listing ({exc})"
            ) from exc

    def _parse_listing(self, body: bytes) -> ListPage:
        root, ns = _parse_xml(body)
        url_encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"
        cut = len(self._prefix)
        objects: list[ObjectInfo] = []
        for item in root.iterfind(f"{ns}Contents"):
            raw_key = item.findtext(f"{ns}Key") or ""
            key = unquote_plus(raw_key) if url_encoded else raw_key
            if not key.startswith(self._prefix) or len(key) == cut:
                continue
            objects.append(
                ObjectInfo(
                    key=key[cut:],
                    size=int(item.findtext(f"{ns}Size") or "0"),
                    etag=_strip_etag(item.findtext(f"{ns}ETag")),
                    last_modified=_iso_date(item.findtext(f"{ns}LastModified")),
                )
            )
        truncated = (root.findtext(f"{ns}IsTruncated") or "false").strip().lower() == "true"
        return ListPage(objects=objects, is_truncated=truncated)

    async def stat(self, key: str) -> ObjectInfo:
        """HEAD one object. Raises ``ObjectNotFound``, ``StorageError``, ``StoreUnavailable``."""

        async def handle(resp: aiohttp.ClientResponse) -> ObjectInfo:
            return self._info_from_headers(key, resp)

        return await self._send("stat", "HEAD", self._object_url(key), handle, key=key)

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        """Ranged GET of ``length`` bytes at ``offset``; past the end gives empty data.

        ETag and total size come from the same response (Content-Range), so they describe
        the version the bytes came from. Raises ``ObjectNotFound``, ``StorageError``,
        ``StoreUnavailable``; ``ValueError`` for a negative offset or length.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            info = await self.stat(key)
            return RangeRead(b"", offset, info.etag, info.size)

        async def handle(resp: aiohttp.ClientResponse) -> RangeRead | None:
            if resp.status == 416:
                return None
            etag = _strip_etag(resp.headers.get("ETag"))
            if resp.status == 206:
                data = await resp.read()
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                size = int(total) if total.isdigit() else offset + len(data)
                return RangeRead(data, offset, etag, size)
            # 200: the server ignored Range; skip to offset without holding the whole object.
            size = int(resp.headers.get("Content-Length", "-1"))
            seen = 0
            out = bytearray()
            async for piece in resp.content.iter_chunked(1 << 16):
                lo = max(offset - seen, 0)
                seen += len(piece)
                if lo < len(piece):
                    out += piece[lo : lo + length - len(out)]
                if len(out) >= length:
                    break
            return RangeRead(bytes(out), offset, etag, size if size >= 0 else seen)

        read = await self._send(
            "read_range",
            "GET",
            self._object_url(key),
            handle,
            key=key,
            headers={"Range": f"bytes={offset}-{offset + length - 1}"},
            accept=frozenset({200, 206, 416}),
        )
        if read is None:  # offset at or past the end (or an empty object)
            info = await self.stat(key)
            return RangeRead(b"", offset, info.etag, info.size)
        return read

    async def read_stream(
        self,
        key: str,
        *,
        offset: int = 0,
        chunk_size: int = 1 << 20,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the object from ``offset`` in ``chunk_size`` pieces (the last may be shorter).

        One GET; a connection lost mid-stream is resumed from the last byte delivered,
        pinned to the first response's ETag (``If-Match``), within the retry budget.
        ``if_match`` pins the first GET too (and its ETag is checked in case a server
        ignores the header). Raises ``ObjectNotFound``, ``StorageError`` (including
        "object changed while it was being read"), ``StoreUnavailable``. Offset past the
        end yields nothing.
        """
        if offset < 0 or chunk_size <= 0:
            raise ValueError("offset must be >= 0 and chunk_size > 0")
        url = self._object_url(key)
        pos = offset
        etag: str | None = if_match or None
        failures = 0
        while True:
            headers: dict[str, str] = {}
            if pos > 0:
                headers["Range"] = f"bytes={pos}-"
            if etag:
                headers["If-Match"] = f'"{etag}"'
            try:
                async with self._session().get(
                    URL(url, encoded=True),
                    headers=self._sign("GET", url, headers, EMPTY_SHA256_HASH),
                    allow_redirects=False,
                ) as resp:
                    if resp.status == 416:
                        return
                    if resp.status not in (200, 206):
                        await self._fail(resp, "read_stream", key)
                    got = _strip_etag(resp.headers.get("ETag"))
                    if etag and got and got != etag:  # If-Match ignored by the server
                        raise StorageError(
                            f"store {self.name!r}: object changed while it was being read"
                        )
                    etag = etag or got or None
                    if resp.status == 200 and pos > 0:  # Range ignored: skip what was sent
                        await _skip(resp.content, pos)
                    chunker = _Chunker(resp.content, chunk_size)
                    while chunk := await chunker.next():
                        pos += len(chunk)
                        failures = 0  # progress: the budget is per stall, not per stream
                        yield chunk
                    return
            except aiohttp.ClientSSLError as exc:
                raise StorageError(
                    f"store {self.name!r}: TLS failure talking to {self._endpoint}"
                ) from exc
            except _RETRY_IN_STREAM as exc:
                reason = exc.reason if isinstance(exc, TransientError) else describe_error(exc)
                retry_after = exc.retry_after if isinstance(exc, TransientError) else None
                failures += 1
                if failures > self._retry.retries:
                    raise StoreUnavailable(
                        f"store {self.name!r} at {self._endpoint}: read_stream failed after "
                        f"{failures} attempts: {reason}"
                    ) from exc
                await asyncio.sleep(self._retry.delay(failures, retry_after))

    @property
    def can_open_bodies(self) -> bool:
        """``open_body`` can hand over bodies: a plain-HTTP endpoint (``zerocopy.opens_bodies``).

        Over https every body would come back None, and WADO would give up its read-ahead
        for nothing.
        """
        return self._endpoint.startswith("http://")

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        """GET the whole object and return its body unread, for a zero-copy relay.

        The request goes out on a socket of this adapter's own (kept alive and reused
        when a body was read to its end), the response head is read, and the body is
        left in the kernel for ``zerocopy.Relay`` to splice to a client. Pinned like
        ``read_stream`` (``If-Match``, and the ETag checked). Returns None when the body
        cannot be relayed so (an https endpoint, or a response without Content-Length):
        use ``read_stream``. Raises ``ObjectNotFound``, ``StorageError`` (including
        "object changed while it was being read"), ``StoreUnavailable``.
        """
        if not self.can_open_bodies:
            return None
        url = self._object_url(key)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"If-Match": f'"{if_match}"'} if if_match else {}

        async def attempt() -> OpenBody | None:
            signed = self._sign("GET", url, headers, EMPTY_SHA256_HASH)
            lines = [f"GET {target} HTTP/1.1"]
            lines += [f"{name}: {value}" for name, value in signed.items()]
            lines.append("User-Agent: imaging-gateway\r\n\r\n")
            request = "\r\n".join(lines).encode("ascii")
            for fresh in (False, True):
                sock = None if fresh else self._idle_socket()
                reused = sock is not None
                try:
                    async with asyncio.timeout(self._settings.timeout_s):
                        sock = sock or await self._connect()
                        loop = asyncio.get_running_loop()
                        await loop.sock_sendall(sock, request)
                        head, initial = await _read_head(loop, sock)
                except (OSError, TimeoutError, EOFError) as exc:
                    if sock is not None:
                        sock.close()
                    if reused and not isinstance(exc, TimeoutError):
                        continue  # an idle connection the server had closed: a new one
                    reason = "connection closed" if isinstance(exc, EOFError) else None
                    raise TransientError(reason or describe_error(exc)) from exc
                except BaseException:
                    if sock is not None:
                        sock.close()
                    raise
                return await self._body_from(sock, key, head, initial, if_match)
            raise TransientError("connection closed")  # pragma: no cover - loop returns

        try:
            return await call_with_retries(
                self._retry, attempt, store=self.name, endpoint=self._endpoint, op="read_stream"
            )
        except ValueError:
            raise StorageError(
                f"store {self.name!r} at {self._endpoint}: unreadable response head"
            ) from None

    async def _body_from(
        self, sock: socket.socket, key: str, head: bytes, initial: bytes, if_match: str | None
    ) -> OpenBody | None:
        """Check a response head; the ``OpenBody`` of a 200, or the error it means."""
        try:
            version, status, fields = _parse_head(head)
            length = int(fields.get("content-length", "-1"))
            if status != 200:
                if 0 < length <= _MAX_HEAD and len(initial) < length:
                    async with asyncio.timeout(self._settings.timeout_s):
                        initial += await _read_exactly(sock, length - len(initial))
                sock.close()
                code, message = _error_code(initial)
                retry_after = fields.get("retry-after", "")
                raise status_error(
                    store=self.name,
                    endpoint=self._endpoint,
                    bucket=self._settings.bucket,
                    op="read_stream",
                    key=key,
                    status=status,
                    code=code,
                    message=message,
                    retry_after=float(retry_after) if retry_after.isdigit() else None,
                )
            if length < 0 or "transfer-encoding" in fields or len(initial) > length:
                sock.close()
                return None
            etag = _strip_etag(fields.get("etag"))
            if if_match and etag and etag != if_match:  # If-Match ignored by the server
                sock.close()
                raise StorageError(f"store {self.name!r}: object changed while it was being read")
        except BaseException:
            sock.close()
            raise
        keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"

        def release(done: socket.socket, whole: bool) -> None:
            self._release_socket(done, reusable=keep and whole)

        return OpenBody(
            sock,
            length=length,
            etag=etag or (if_match or ""),
            initial=initial,
            timeout_s=self._settings.timeout_s,
            release=release,
        )

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._address is None or now - self._address[0] > _ADDRESS_TTL_S:
            split = urlsplit(self._endpoint)
            infos = await loop.getaddrinfo(
                split.hostname, split.port or 80, type=socket.SOCK_STREAM
            )
            first = infos[0]
            self._address = (now, (first[0], first[1], first[2], first[4]))
        family, kind, proto, address = self._address[1]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _idle_socket(self) -> socket.socket | None:
        """A kept-alive connection the server has not closed meanwhile, if any."""
        while self._idle:
            sock = self._idle.pop()
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return sock  # open and quiet: usable
            except OSError:
                pass
            sock.close()  # closed by the server, or it sent bytes nobody asked for
        return None

    def _release_socket(self, sock: socket.socket, *, reusable: bool) -> None:
        if reusable and len(self._idle) < self._settings.max_connections:
            self._idle.append(sock)
        else:
            sock.close()

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str = "application/dicom"
    ) -> ObjectInfo:
        """Write an object: one PUT up to 8 MiB, else a multipart upload of 8 MiB parts.

        Memory holds at most one part (plus the caller's chunk). A failed or cancelled
        multipart upload is aborted. Raises ``StorageError``, ``StoreUnavailable``.
        """
        url = self._object_url(key)
        it = aiter(chunks)
        buf = bytearray()
        exhausted = await _fill(it, buf, PART_SIZE + 1)
        if exhausted and len(buf) <= PART_SIZE:
            body = bytes(buf)
            buf.clear()
            return await self._put_single(key, url, body, content_type)

        upload_id = await self._initiate(key, url, content_type)
        size = 0
        etags: list[str] = []
        try:
            while True:
                if not exhausted:
                    exhausted = await _fill(it, buf, PART_SIZE)
                if not buf:
                    break
                with memoryview(buf) as view:
                    part = bytes(view[:PART_SIZE])
                del buf[:PART_SIZE]
                size += len(part)
                etags.append(await self._upload_part(key, url, upload_id, len(etags) + 1, part))
                del part
                if exhausted and not buf:
                    break
            etag, date = await self._complete(key, url, upload_id, etags)
        except BaseException:
            await asyncio.shield(self._abort(url, upload_id))
            raise
        return ObjectInfo(key=key, size=size, etag=etag, last_modified=date)

    async def _put_single(self, key: str, url: str, body: bytes, content_type: str) -> ObjectInfo:
        digest = await _sha256_hex(body)

        async def handle(resp: aiohttp.ClientResponse) -> ObjectInfo:
            return ObjectInfo(
                key=key,
                size=len(body),
                etag=_strip_etag(resp.headers.get("ETag")),
                last_modified=_http_date(resp.headers.get("Date")),
            )

        return await self._send(
            "write",
            "PUT",
            url,
            handle,
            key=key,
            body=body,
            payload_sha256=digest,
            headers={"Content-Type": content_type},
        )

    async def _initiate(self, key: str, url: str, content_type: str) -> str:
        body = await self._send(
            "write (initiate multipart)",
            "POST",
            f"{url}?uploads=",
            _read_body,
            key=key,
            headers={"Content-Type": content_type},
        )
        root, ns = _parse_xml(body)
        upload_id = root.findtext(f"{ns}UploadId")
        if not upload_id:
            raise StorageError(f"store {self.name!r}: multipart upload not started (no UploadId)")
        return upload_id

    async def _upload_part(
        self, key: str, url: str, upload_id: str, number: int, part: bytes
    ) -> str:
        digest = await _sha256_hex(part)
        part_url = f"{url}?{_query({'partNumber': str(number), 'uploadId': upload_id})}"

        async def handle(resp: aiohttp.ClientResponse) -> str:
            return _strip_etag(resp.headers.get("ETag"))

        return await self._send(
            "write (upload part)",
            "PUT",
            part_url,
            handle,
            key=key,
            body=part,
            payload_sha256=digest,
        )

    async def _complete(
        self, key: str, url: str, upload_id: str, etags: list[str]
    ) -> tuple[str, datetime]:
        parts = "".join(
            f'<Part><PartNumber>{n}</PartNumber><ETag>"{etag}"</ETag></Part>'
            for n, etag in enumerate(etags, start=1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()

        async def handle(resp: aiohttp.ClientResponse) -> tuple[str, datetime]:
            answer = await resp.read()
            root, ns = _parse_xml(answer)
            if root.tag.rpartition("}")[2] == "Error":
                # S3 may report a failure of CompleteMultipartUpload inside a 200 answer.
                code = root.findtext(f"{ns}Code")
                if classify_status(500, code) == "retry":
                    raise TransientError(f"HTTP 200 with error {code}")
                raise StorageError(f"store {self.name!r}: multipart upload failed ({code})")
            etag = _strip_etag(root.findtext(f"{ns}ETag"))
            return etag, _http_date(resp.headers.get("Date"))

        return await self._send(
            "write (complete multipart)",
            "POST",
            f"{url}?{_query({'uploadId': upload_id})}",
            handle,
            key=key,
            body=body,
            payload_sha256=hashlib.sha256(body).hexdigest(),
            headers={"Content-Type": "application/xml"},
        )

    async def _abort(self, url: str, upload_id: str) -> None:
        try:
            await self._send(
                "write (abort multipart)",
                "DELETE",
                f"{url}?{_query({'uploadId': upload_id})}",
                _discard,
                key=None,
                accept=frozenset({200, 204, 404}),
            )
        except Exception as exc:  # the original error matters more; leave a trace
            log.warning("store %r: aborting a multipart upload failed: %s", self.name, exc)

    async def delete(self, key: str) -> None:
        """Delete one object; a missing key is fine.

        Raises ``StorageError``, ``StoreUnavailable``.
        """
        await self._send(
            "delete",
            "DELETE",
            self._object_url(key),
            _discard,
            key=key,
            accept=frozenset({200, 204, 404}),
        )

    async def close(self) -> None:
        """Close the HTTP session and its connections."""
        while self._idle:
            self._idle.pop().close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- extras -------------------------------------------------------------------

    def presign_get(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL for ``key`` valid for ``expires_s`` seconds (plain URL if anonymous).

        The URL carries a signature: never log it.
        """
        url = self._object_url(key)
        if self._credentials is None:
            return url
        request = AWSRequest(method="GET", url=url)
        S3SigV4QueryAuth(
            self._credentials, "s3", self._settings.region, expires=expires_s
        ).add_auth(request)
        signed: str = request.url
        return signed

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist. Raises ``StorageError``, ``StoreUnavailable``."""
        exists = await self._send(
            "ensure_bucket",
            "HEAD",
            self._bucket_url,
            _is_ok,
            key=None,
            accept=frozenset({200, 404}),
        )
        if exists:
            return
        body = b""
        if self._settings.region != "us-east-1":
            body = (
                "<CreateBucketConfiguration><LocationConstraint>"
                f"{self._settings.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()

        async def created(resp: aiohttp.ClientResponse) -> None:
            if resp.status == 409:
                code, _ = _error_code(await resp.read())
                if code != "BucketAlreadyOwnedByYou":
                    raise StorageError(
                        f"store {self.name!r}: bucket {self._settings.bucket!r} exists and "
                        f"belongs to someone else ({code})"
                    )

        await self._send(
            "ensure_bucket",
            "PUT",
            self._bucket_url,
            created,
            key=None,
            body=body,
            payload_sha256=hashlib.sha256(body).hexdigest(),
            accept=frozenset({200, 409}),
        )


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.read()


async def _discard(resp: aiohttp.ClientResponse) -> None:
    await resp.release()


async def _is_ok(resp: aiohttp.ClientResponse) -> bool:
    return resp.status == 200
