"""Retry, backoff and error classification of the S3 and MinIO adapters, against scripted fakes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import urllib3
from minio.error import S3Error, ServerError

from imaging_gateway.errors import ObjectNotFound, StorageError, StoreUnavailable
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.minio_store import MinioStore, is_transient_minio_error
from imaging_gateway.storage.s3 import (
    PART_SIZE,
    RetryPolicy,
    S3Store,
    TransientError,
    call_with_retries,
    classify_status,
    is_transient_error,
)

# ---------------------------------------------------------------------------
# Classification


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, "ok"),
        (204, None, "ok"),
        (206, None, "ok"),
        (500, "InternalError", "retry"),
        (502, None, "retry"),
        (503, "SlowDown", "retry"),
        (503, None, "retry"),
        (504, None, "retry"),
        (429, None, "retry"),
        (400, "RequestTimeout", "retry"),
        (400, "SlowDown", "retry"),
        (501, "NotImplemented", "fatal"),
        (404, "NoSuchKey", "not_found"),
        (404, "NoSuchBucket", "not_found"),
        (403, "AccessDenied", "denied"),
        (403, "SignatureDoesNotMatch", "denied"),
        (400, "InvalidArgument", "fatal"),
        (412, "PreconditionFailed", "fatal"),
        (416, "InvalidRange", "fatal"),
    ],
)
def test_classify_status(status: int, code: str | None, outcome: str) -> None:
    assert classify_status(status, code) == outcome


def test_transport_errors() -> None:
    transient = [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut short"),
        aiohttp.ServerTimeoutError("slow"),
        TimeoutError(),
        ConnectionResetError(),
    ]
    assert all(is_transient_error(e) for e in transient)
    tls = aiohttp.ClientSSLError.__new__(aiohttp.ClientSSLError)
    assert not is_transient_error(tls)
    assert not is_transient_error(ValueError("bug"))
    assert not is_transient_error(ObjectNotFound("s", "k"))


def _s3error(status: int, code: str) -> S3Error:
    return S3Error(SimpleNamespace(status=status), code, "m", "/b/k", "r", "h")  # type: ignore[arg-type]


def test_minio_errors() -> None:
    assert is_transient_minio_error(_s3error(503, "SlowDown"))
    assert is_transient_minio_error(_s3error(500, "InternalError"))
    assert is_transient_minio_error(ServerError("bad gateway", 502))
    assert is_transient_minio_error(urllib3.exceptions.ProtocolError("reset"))
    assert is_transient_minio_error(urllib3.exceptions.NewConnectionError(None, "refused"))  # type: ignore[arg-type]
    assert is_transient_minio_error(urllib3.exceptions.ReadTimeoutError(None, "/", "slow"))  # type: ignore[arg-type]
    assert not is_transient_minio_error(_s3error(404, "NoSuchKey"))
    assert not is_transient_minio_error(_s3error(403, "AccessDenied"))
    assert not is_transient_minio_error(urllib3.exceptions.SSLError("bad cert"))
    assert not is_transient_minio_error(ValueError("bad name"))


# ---------------------------------------------------------------------------
# Backoff and the retry loop


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(retries=8, base_delay_s=0.1, max_delay_s=1.0)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (8, 1.0)]:
        waits = [policy.delay(retry) for _ in range(400)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > 0.8 * ceiling  # the whole window is used ...
        assert min(waits) < 0.2 * ceiling  # ... from near zero (full jitter)
    # Retry-After is honoured, within the cap.
    assert policy.delay(1, retry_after=0.5) >= 0.5
    assert policy.delay(1, retry_after=30) <= 1.0


async def test_retry_loop_retries_transient_then_succeeds() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TransientError("HTTP 503 SlowDown")
        return "done"

    policy = RetryPolicy(retries=3, base_delay_s=0.001)
    assert await call_with_retries(policy, attempt, store="s", endpoint="e", op="op") == "done"
    assert calls == 3


async def test_retry_loop_gives_up_with_store_unavailable() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("cannot connect")

    policy = RetryPolicy(retries=2, base_delay_s=0.001)
    with pytest.raises(StoreUnavailable) as caught:
        await call_with_retries(policy, attempt, store="pacs", endpoint="http://h:1", op="stat")
    assert calls == 3
    assert str(caught.value) == (
        "store 'pacs' at http://h:1: stat failed after 3 attempts: cannot connect"
    )


async def test_retry_loop_does_not_retry_permanent_errors() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise ObjectNotFound("pacs", "k")

    with pytest.raises(ObjectNotFound):
        await call_with_retries(RetryPolicy(retries=5), attempt, store="s", endpoint="e", op="op")
    assert calls == 1


# ---------------------------------------------------------------------------
# A scripted HTTP/1.1 server standing in for S3


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None
    """Send only this many body bytes (with the full Content-Length), then drop the connection."""


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


def xml_error(status: int, code: str, **headers: str) -> Reply:
    body = f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()
    return Reply(status, body, {"Content-Type": "application/xml", **headers})


class FakeS3:
    """Answers request n with ``script[n]`` (the last one repeats), recording each request."""

    def __init__(self, *script: Reply) -> None:
        self.script = list(script)
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None
        self.endpoint = ""

    async def __aenter__(self) -> FakeS3:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Seen(method, target, headers, body))
                reply = self.script[min(len(self.seen), len(self.script)) - 1]
                out = [f"HTTP/1.1 {reply.status} X", f"Content-Length: {len(reply.body)}"]
                out += [f"{k}: {v}" for k, v in reply.headers.items()]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode())
                if method != "HEAD":
                    writer.write(reply.body[: reply.cut_after])
                await writer.drain()
                if reply.cut_after is not None:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def settings(endpoint: str, kind: str = "s3", retries: int = 3) -> StoreSettings:
    return StoreSettings(
        name="fake", kind=kind, bucket="bkt", prefix="p/", endpoint=endpoint,  # type: ignore[arg-type]
        access_key="AKFAKE", secret_key="fake-secret", retries=retries, timeout_s=5.0,
    )


FAST = RetryPolicy(retries=3, base_delay_s=0.001)


@pytest.fixture
async def s3() -> AsyncIterator[Any]:
    stores: list[S3Store] = []

    def make(fake: FakeS3, retries: int = 3) -> S3Store:
        store = S3Store(settings(fake.endpoint, retries=retries),
                        retry=RetryPolicy(retries=retries, base_delay_s=0.001))
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


def ranged(data: bytes, start: int, total: int, etag: str = "e1") -> Reply:
    return Reply(206, data, {
        "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}", "ETag": f'"{etag}"',
    })


async def test_s3_retries_throttling_then_reads(s3: Any) -> None:
    async with FakeS3(
        xml_error(503, "SlowDown"), xml_error(429, "TooManyRequests", **{"Retry-After": "0"}),
        ranged(b"abcd", 10, 100),
    ) as fake:
        got = await s3(fake).read_range("医院/患者 1.dcm", 10, 4)
    assert (got.data, got.etag, got.total_size) == (b"abcd", "e1", 100)
    assert len(fake.seen) == 3
    first = fake.seen[0]
    # Path-style, prefix applied, every byte of the key percent-encoded once.
    assert first.target == "/bkt/p/%E5%8C%BB%E9%99%A2/%E6%82%A3%E8%80%85%201.dcm"
    assert first.headers["range"] == "bytes=10-13"
    assert first.headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKFAKE/")
    assert "fake-secret" not in str(first.headers)
    assert all("authorization" in s.headers for s in fake.seen)  # each attempt is signed


async def test_s3_gives_up_after_retries(s3: Any) -> None:
    async with FakeS3(xml_error(500, "InternalError")) as fake:
        with pytest.raises(StoreUnavailable) as caught:
            await s3(fake, retries=2).stat("k.dcm")
    assert len(fake.seen) == 3
    message = str(caught.value)
    assert "store 'fake'" in message and fake.endpoint in message
    assert "after 3 attempts: HTTP 500" in message and "k.dcm" not in message


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (xml_error(404, "NoSuchKey"), ObjectNotFound, "no object"),
        (xml_error(404, "NoSuchBucket"), StorageError, "bucket 'bkt' does not exist"),
        (xml_error(403, "AccessDenied"), StorageError, "access denied"),
        (xml_error(400, "InvalidArgument"), StorageError, "HTTP 400 InvalidArgument"),
    ],
)
async def test_s3_permanent_errors_are_not_retried(
    s3: Any, reply: Reply, error: type[Exception], text: str
) -> None:
    async with FakeS3(reply) as fake:
        with pytest.raises(error, match=text) as caught:
            await s3(fake).read_range("k.dcm", 0, 10)
    assert len(fake.seen) == 1
    assert not isinstance(caught.value, StoreUnavailable)


async def test_s3_stream_resumes_after_a_cut_at_the_same_version(s3: Any) -> None:
    data = bytes(range(250)) * 4
    async with FakeS3(
        Reply(200, data, {"ETag": '"v1"'}, cut_after=500), ranged(data[500:], 500, 1000, "v1"),
    ) as fake:
        got = [c async for c in s3(fake).read_stream("k.dcm", chunk_size=100)]
    assert b"".join(got) == data and max(map(len, got)) <= 100
    resume = fake.seen[1]
    assert (resume.headers["range"], resume.headers["if-match"]) == ("bytes=500-", '"v1"')


async def test_s3_stream_refuses_a_changed_object(s3: Any) -> None:
    data = b"x" * 1000
    async with FakeS3(
        Reply(200, data, {"ETag": '"v1"'}, cut_after=500), xml_error(412, "PreconditionFailed"),
    ) as fake:
        with pytest.raises(StorageError, match="changed while it was being read"):
            [c async for c in s3(fake).read_stream("k.dcm", chunk_size=100)]


async def test_s3_put_signs_the_payload_hash(s3: Any) -> None:
    async with FakeS3(Reply(200, b"", {"ETag": '"e"'})) as fake:
        info = await s3(fake).write_stream("a b.dcm", _chunks(b"hello", b" world"))
    assert (info.size, info.etag) == (11, "e")
    put = fake.seen[0]
    assert (put.method, put.target, put.body) == ("PUT", "/bkt/p/a%20b.dcm", b"hello world")
    assert put.headers["x-amz-content-sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert put.headers["content-type"] == "application/dicom"


async def test_s3_multipart_failure_aborts_the_upload(s3: Any) -> None:
    initiated = Reply(200, b"<InitiateMultipartUploadResult><UploadId>u-1</UploadId>"
                           b"</InitiateMultipartUploadResult>")
    async with FakeS3(initiated, xml_error(400, "InvalidPart"), Reply(204)) as fake:
        with pytest.raises(StorageError, match="InvalidPart"):
            await s3(fake).write_stream("big.dcm", _chunks(b"x" * (PART_SIZE + 1)))
    assert [(s.method, s.target) for s in fake.seen] == [
        ("POST", "/bkt/p/big.dcm?uploads="),
        ("PUT", "/bkt/p/big.dcm?partNumber=1&uploadId=u-1"),
        ("DELETE", "/bkt/p/big.dcm?uploadId=u-1"),
    ]


async def test_minio_adapter_retries_and_maps_errors_the_same_way() -> None:
    async with FakeS3(xml_error(503, "SlowDown"), ranged(b"abcd", 0, 4)) as fake:
        store = MinioStore(settings(fake.endpoint, kind="minio"), retry=FAST)
        try:
            got = await store.read_range("k.dcm", 0, 4)
        finally:
            await store.close()
    assert (got.data, got.total_size, len(fake.seen)) == (b"abcd", 4, 2)

    async with FakeS3(xml_error(404, "NoSuchKey")) as fake:
        store = MinioStore(settings(fake.endpoint, kind="minio"), retry=FAST)
        try:
            with pytest.raises(ObjectNotFound):
                await store.read_range("k.dcm", 0, 4)
        finally:
            await store.close()
    assert len(fake.seen) == 1


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
