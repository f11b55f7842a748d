"""The decrypting relay (``EncryptedStore.open_body`` -> ``zerocopy.Relay``) over socket pairs.

The "store" is one end of a socket pair holding the object's bytes (all of them, or
fewer: its connection dropped), the client another, behind a real asyncio transport;
the body comes through ``EncryptedStore.open_body`` as it does from S3.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway.crypto.aead import TAG_SIZE, Suite
from imaging_gateway.crypto.envelope import encrypt, parse_header
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.errors import IntegrityError
from imaging_gateway.storage import zerocopy
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.zerocopy import DecryptingBody, OpenBody, Relay

SEGMENT = 1000
STEP = SEGMENT + TAG_SIZE
KEY = "studies/one.dcm"
PLAIN = os.urandom(23 * SEGMENT + 321)  # 24 segments, the last one short


class SocketStore:
    """A store whose ``open_body`` hands out a socket pair's end holding ``data[:sent]``."""

    name = "unit"

    def __init__(self, data: bytes, *, sent: int | None = None, initial: int = 0) -> None:
        self.data = data
        self.sent = len(data) if sent is None else sent
        self.initial = initial
        self.released: list[bool] = []

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        assert key == KEY
        ours, theirs = socket.socketpair()
        ours.sendall(self.data[self.initial : self.sent])
        ours.close()  # all sent, or the connection dropped there
        theirs.setblocking(False)

        def release(sock: socket.socket, whole: bool) -> None:
            self.released.append(whole)
            sock.close()

        return OpenBody(
            theirs,
            length=len(self.data),
            etag="v1",
            initial=self.data[: self.initial],
            timeout_s=5.0,
            release=release,
        )


@pytest.fixture
def ring(tmp_path: Path) -> FileKeyring:
    return FileKeyring.create(tmp_path / "keyring.json", setting="test", key_id="unit")


def sealed(ring: FileKeyring, plain: bytes = PLAIN, suite: Suite = Suite.AES_256_GCM) -> bytes:
    return encrypt(plain, ring, suite=suite, segment_size=SEGMENT, allow_small_segments=True)


def header_of(data: bytes) -> int:
    return parse_header(data).length


async def relayed(store: SocketStore, ring: FileKeyring) -> tuple[OpenBody, bytes, Any]:
    """Open the body through an ``EncryptedStore``, relay it: (body, client bytes, error)."""
    encrypted = EncryptedStore(store, ring, encrypt_writes=True)  # type: ignore[arg-type]
    body = await encrypted.open_body(KEY)
    assert body is not None
    loop = asyncio.get_running_loop()
    ours, client = socket.socketpair()
    client.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    received = bytearray()

    async def read() -> None:
        while data := await loop.sock_recv(client, 1 << 16):
            received.extend(data)

    reader = asyncio.create_task(read())
    relay = Relay(transport, ours.fileno())  # type: ignore[arg-type]
    error: BaseException | None = None
    try:
        await relay.relay(body)
    except IntegrityError as exc:
        error = exc
    finally:
        relay.close()
        body.close()
        transport.close()
    await asyncio.wait_for(reader, 5)
    client.close()
    return body, bytes(received), error


@pytest.fixture(params=[1, 3, 1000], ids=["batch-1", "batch-3", "batch-big"])
def batch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Segments the relay opens at a time (1: each verified segment goes out on its own)."""
    monkeypatch.setattr(zerocopy, "DECRYPT_BATCH", request.param * STEP)
    return int(request.param)


@pytest.mark.parametrize("suite", [Suite.AES_256_GCM, Suite.SM4_GCM])
@pytest.mark.parametrize("initial", ["none", "part-of-header", "header-and-segments"])
async def test_whole_object_is_byte_exact(
    ring: FileKeyring, batch: int, suite: Suite, initial: str
) -> None:
    data = sealed(ring, suite=suite)
    header = header_of(data)
    first = {"none": 0, "part-of-header": 7, "header-and-segments": header + 2 * STEP + 5}
    store = SocketStore(data, initial=first[initial])
    body, got, error = await relayed(store, ring)
    assert error is None
    assert isinstance(body, DecryptingBody)
    assert got == PLAIN
    assert body.delivered == body.length == len(PLAIN)
    assert store.released == [True], "the whole body was read: the connection is reusable"


async def test_empty_object_checks_its_only_segment(ring: FileKeyring) -> None:
    body, got, error = await relayed(SocketStore(sealed(ring, b"")), ring)
    assert error is None and got == b"" and body.length == 0


@pytest.mark.parametrize("cut", [0, 1, SEGMENT // 2, STEP - 1])
async def test_connection_drop_delivers_whole_segments_only(
    ring: FileKeyring, batch: int, cut: int
) -> None:
    """The store's connection ends inside segment 5: segments 0..4 go out, the caller
    resumes at plaintext offset 5 x segment (``delivered``)."""
    data = sealed(ring)
    store = SocketStore(data, sent=header_of(data) + 5 * STEP + cut)
    body, got, error = await relayed(store, ring)
    assert error is None
    assert body.delivered == 5 * SEGMENT and got == PLAIN[: 5 * SEGMENT]
    assert store.released == [False], "a body not read to its end closes its connection"


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x80]) + data[pos + 1 :]


@pytest.mark.parametrize("suite", [Suite.AES_256_GCM, Suite.SM4_GCM])
@pytest.mark.parametrize(
    "damage", ["tampered", "cut-at-boundary", "cut-mid-segment", "extra-bytes", "tag"]
)
async def test_a_bad_segment_is_never_sent(
    ring: FileKeyring, batch: int, suite: Suite, damage: str
) -> None:
    data = sealed(ring, suite=suite)
    header = header_of(data)
    final = 23
    damaged, bad = {
        "tampered": (_flip(data, header + 9 * STEP + 10), 9),
        "tag": (_flip(data, header + 10 * STEP - 1), 9),
        # the final segment gone: the one before it fails as final
        "cut-at-boundary": (data[: header + final * STEP], final - 1),
        "cut-mid-segment": (data[: header + 12 * STEP + 200], 12),
        "extra-bytes": (data + b"\x00" * 40, final),
    }[damage]
    body, got, error = await relayed(SocketStore(damaged), ring)
    assert isinstance(body, DecryptingBody)
    assert isinstance(error, IntegrityError)
    assert f"segment {bad} " in error.message and KEY in error.message, error.message
    assert PLAIN[bad * SEGMENT : bad * SEGMENT + 16] not in got
    if batch == 1:  # each segment goes out as soon as it verified, the bad one never
        assert got == PLAIN[: bad * SEGMENT]
    else:  # verified segments of the failing batch are held back too
        assert len(got) <= bad * SEGMENT and PLAIN.startswith(got)
    assert len(got) % SEGMENT == 0


async def test_impossible_size_is_left_to_the_ordinary_path(ring: FileKeyring) -> None:
    """A stored size no object of the format has: ``read_stream`` reports it, not the relay."""
    data = sealed(ring)
    store = SocketStore(data[: header_of(data) + 5 * STEP + 3])  # 3 bytes: less than a tag
    encrypted = EncryptedStore(store, ring, encrypt_writes=True)  # type: ignore[arg-type]
    assert await encrypted.open_body(KEY) is None
    assert store.released == [False]


async def test_malformed_header_names_the_object(ring: FileKeyring) -> None:
    data = sealed(ring)
    store = SocketStore(data[:3] + b"\x01\x01" + data[5:16] + b"\x00\x05" + data[18:])
    encrypted = EncryptedStore(store, ring, encrypt_writes=True)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=KEY):
        await encrypted.open_body(KEY)
    assert store.released == [False]


@pytest.mark.parametrize("initial", [0, 3, 200])
async def test_plain_object_is_spliced(ring: FileKeyring, initial: int) -> None:
    plain = b"\x00" * 128 + b"DICM" + os.urandom(50_000)
    store = SocketStore(plain, initial=initial)
    body, got, error = await relayed(store, ring)
    assert error is None
    assert type(body) is OpenBody
    assert got == plain and body.delivered == len(plain)
    assert store.released == [True]
