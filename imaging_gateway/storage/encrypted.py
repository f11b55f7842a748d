"""EncryptedStore: the one read and write path of objects, encrypted at rest (envelope format).

``EncryptedStore(inner, keys, encrypt_writes=..., suite=..., segment_size=...)`` wraps any
adapter and implements the same ``ObjectStore`` protocol, so sync, WADO, STOW, seal and
the demo all read and write through it. It writes objects in the segmented streaming AEAD
format of ``crypto.envelope`` (a random data key per object, wrapped by the
``KeyProvider``'s current key) when ``encrypt_writes``, else plain; it reads both: an
object that does not start with the format's magic is passed through as it is (plain
objects that hospitals uploaded directly), with no extra request.

Sizes and offsets. Every offset and length a caller passes, and every size returned by
``read_range`` (``RangeRead.total_size``), ``stat`` and ``write_stream``, is in
*plaintext* bytes; an encrypted object's plaintext size follows from its stored size and
header (``envelope.plaintext_length``). ``list_page`` is the one exception: a listing
cannot see headers, so its ``ObjectInfo.size`` is the *stored* size (ciphertext for an
encrypted object, header and tags included). Callers must not compare a listed size with
a plaintext one: sync compares ETags only and records the plaintext size that its header
read's ``total_size`` gives, so the index and WADO's ``Content-Length`` hold plaintext
sizes for plain and encrypted objects alike.

Reads. ``read_range(key, 0, n)`` (sync's header read) is one ranged GET of the header
allowance (``HEADER_ALLOWANCE``, headers are ~100 bytes, at most a few hundred with a
KMS) plus the segments covering ``n`` plaintext bytes; the header is parsed, the segments
verified and decrypted. For an offset > 0 the header is needed first: parsed headers are
kept per key with the ETag they came from in a small bounded LRU, so a later read needs
one GET, checked against that ETag (a changed object is looked at again). ``read_stream``
decrypts incrementally and yields a segment's plaintext only after its tag verified; the
final segment is checked as final, so truncation fails at the end instead of looking
complete. Tampering, truncation and wrong keys raise ``IntegrityError`` or
``KeyNotFound`` whose message names the store and the object key (never plaintext).

Relayed reads. WADO-RS sends whole objects through ``zerocopy.Relay`` when the inner
store opens bodies (``S3Store.open_body``, plain HTTP). ``open_body`` lets the inner store
send the GET, reads the first bytes of the body from its socket and decides: a plain
object goes back as the inner body, spliced in the kernel as from an unwrapped store; an
encrypted one has its header parsed and its data key unwrapped (``_cipher``: sidecars
too) and becomes a ``DecryptingBody``, which the Relay receives, verifies and decrypts
whole segments at a time in two preallocated buffers and writes to the client socket. It
cannot be a splice (the plaintext exists only in the process), but each byte is copied
three times (into the process, by the cipher, out of it) against six or more through
aiohttp, with the same segment checks as ``read_stream`` and the same errors; its sizes
are plaintext, so a relay whose store connection ended early is resumed with
``read_stream`` from a plaintext offset. An object whose stored size the format cannot
have is left to ``read_stream`` (``open_body`` answers None).

Rewrap without reading bodies. An S3 object cannot be rewritten in place, and rewriting
it whole would read and write every body. So the in-object header keeps the key envelope
it was written with, and ``rewrap_object`` writes, for an object whose header names a
key version other than the current one, a *sidecar*: a small object at
``.imaging-gateway/envelopes/<key>`` in the same store holding the object's fixed header
part and a new ``KeyEnvelope`` (the same data key wrapped under the current version). It
reads only the object's header bytes and the sidecar, never the body. A reader first
unwraps with the header's envelope; only when that key version is not held (retired)
does it read the sidecar (cached, positive results only), whose envelope must be bound
to this very object: the wrap's associated data is the object's fixed header part
(random nonce prefix included), so a stale sidecar of a former object under the same key
fails to authenticate instead of decrypting anything. A re-run of rewrap skips objects
whose sidecar already holds the current version, so it resumes where it stopped. The
reserved prefix ``.imaging-gateway/`` is hidden from ``list_page`` and refused for
writes and deletes by callers; sync also skips it when it meets an unwrapped store.

Seal (``seal_object``): encrypting a plain object in place, so that a kill at any point
never leaves the key unreadable. (1) stream the plain object pinned to the ETag it was
probed at (``If-Match``), encrypt it into a staging object ``.imaging-gateway/seal/<key>``
while hashing the plaintext; (2) read the staging object back, decrypting (every tag
verified), and compare the hash; (3) re-check that the key still holds the version read
(``stat``); (4) copy the verified ciphertext over the key: one atomic PUT / multipart
completion (S3) or rename (fs), so readers see the whole plain object or the whole
encrypted one; (5) read the key back, decrypting, and compare the hash; (6) delete the
staging object. Killed before (4): the plain object is untouched (and a re-run redoes
it). Killed after (4): the key holds a complete, verified encrypted object and
``reconcile_seal`` (run first by every seal run) checks it against the staging copy,
restores from the staging copy if it does not decrypt, and removes the staging copy.
What this cannot rule out, short of conditional PUTs (``If-Match`` on writes, which not
every S3-compatible store supports): a client overwriting the key between (3) and (4)
loses that write to the sealed older version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, cast

from imaging_gateway.crypto.aead import Bytes
from imaging_gateway.crypto.envelope import (
    DEFAULT_SEGMENT_SIZE,
    FIXED_LENGTH,
    HEADER_PREFIX_LENGTH,
    TAG_SIZE,
    Encryptor,
    FixedHeader,
    Header,
    KeyEnvelope,
    SegmentCipher,
    Suite,
    ciphertext_range,
    header_length,
    is_encrypted,
    parse_header,
    plaintext_length,
    rewrap,
)
from imaging_gateway.crypto.keyring import KeyProvider
from imaging_gateway.errors import (
    GatewayError,
    IntegrityError,
    KeyNotFound,
    ObjectNotFound,
    StorageError,
    StoreUnavailable,
)
from imaging_gateway.storage.base import (
    ListPage,
    ObjectInfo,
    ObjectStore,
    RangeRead,
    close_stream,
)
from imaging_gateway.storage.zerocopy import (
    BodyOpener,
    DecryptingBody,
    OpenBody,
    opens_bodies,
)

log = logging.getLogger(__name__)

RESERVED_PREFIX = ".imaging-gateway/"
"""Keys the gateway keeps for itself in a store: never listed to callers, never indexed."""
ENVELOPE_PREFIX = RESERVED_PREFIX + "envelopes/"
SEAL_PREFIX = RESERVED_PREFIX + "seal/"
REWRAP_STATUS_KEY = RESERVED_PREFIX + "rewrap-status.json"
HEADER_ALLOWANCE = 512
"""Bytes read for a header before its length is known (a keyring header is ~100 bytes)."""
SIDECAR_MAGIC = b"IGS\x01"
MAX_SIDECAR = 8192
CACHE_SIZE = 4096
THREAD_MIN = 256 * 1024
"""SM4-GCM chunks this large are sealed or opened in a worker thread.

Both AEADs release the GIL. SM4-GCM (~110 MB/s per core without SM4 instructions) would
hold the event loop ~9 ms per MiB; in a thread it runs beside it and concurrent streams
use several cores. AES-256-GCM (~3 GB/s) stays inline: measured over 8 concurrent
streams, the thread hand-off cost more (CPU and wall time) than it saved.
"""
_MAX_RESTARTS = 3

RewrapOutcome = Literal["plain", "current", "done", "rewrapped"]
SealOutcome = Literal["encrypted", "sealed", "changed", "gone"]
Fault = Callable[[str], None]
"""Called with a step name between the steps of a seal (tests inject a crash there)."""


def is_reserved(key: str) -> bool:
    """True for keys under ``RESERVED_PREFIX`` (sidecars, seal staging, status records)."""
    return key.startswith(RESERVED_PREFIX)


def sidecar_key(key: str) -> str:
    """Where the rewrapped envelope of object ``key`` is kept."""
    return ENVELOPE_PREFIX + key


@dataclass(frozen=True, slots=True)
class Layout:
    """What the first bytes of one version of an object say: plain, or its header."""

    etag: str
    stored_size: int
    header: Header | None
    """None for a plain object."""

    @property
    def plaintext_size(self) -> int:
        if self.header is None:
            return self.stored_size
        return plaintext_length(
            self.stored_size,
            header_length=self.header.length,
            segment_size=self.header.fixed.segment_size,
        )


def _encode_sidecar(fixed: FixedHeader, envelope: KeyEnvelope) -> bytes:
    return SIDECAR_MAGIC + fixed.encode() + envelope.encode()


def _decode_sidecar(data: bytes, fixed: FixedHeader) -> KeyEnvelope | None:
    """The envelope of a sidecar if it belongs to an object with this fixed part."""
    if not data.startswith(SIDECAR_MAGIC):
        return None
    body = data[len(SIDECAR_MAGIC) :]
    if body[:FIXED_LENGTH] != fixed.encode():
        return None  # a stale sidecar of a former object under the same key
    return KeyEnvelope.decode(body[FIXED_LENGTH:])


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _SegmentOpener:
    """``zerocopy.SegmentOpener`` of one object: its cipher, failures named with store and key."""

    tag_size = TAG_SIZE

    def __init__(self, store: EncryptedStore, key: str, cipher: SegmentCipher) -> None:
        self._store = store
        self._key = key
        self._cipher = cipher
        self.segment_size = cipher.fixed.segment_size
        self.threaded = cipher.fixed.suite is Suite.SM4_GCM

    def open_into(self, index: int, ciphertext: memoryview, out: memoryview, *, last: bool) -> int:
        try:
            return self._cipher.open_into(index, ciphertext, out, last=last)
        except IntegrityError as exc:
            raise self._store._named(self._key, exc) from None


async def _recv_more(sock: socket.socket, data: bytes, upto: int, timeout_s: float) -> bytes:
    """``data`` and what follows it in the socket, up to ``upto`` bytes.

    Fewer when the connection ends, fails or stalls for ``timeout_s`` first.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            while len(data) < upto:
                more = await loop.sock_recv(sock, upto - len(data))
                if not more:
                    break
                data += more
    except (OSError, TimeoutError):
        pass
    return data


class EncryptedStore:
    """An ``ObjectStore`` that encrypts writes (when asked) and reads plain and encrypted objects.

    See the module docstring for sizes, rewrap sidecars and the seal procedure. Raises
    what ``inner`` raises, plus ``IntegrityError`` and ``KeyNotFound`` naming the store
    and the object key.
    """

    def __init__(
        self,
        inner: ObjectStore,
        keys: KeyProvider,
        *,
        encrypt_writes: bool,
        suite: Suite = Suite.AES_256_GCM,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.keys = keys
        self.encrypt_writes = encrypt_writes
        self.suite = suite
        self.segment_size = segment_size
        self._cache_size = max(1, cache_size)
        self._layouts: OrderedDict[str, Layout] = OrderedDict()
        self._sidecars: OrderedDict[tuple[str, bytes], KeyEnvelope] = OrderedDict()

    def __repr__(self) -> str:
        return f"EncryptedStore({self.inner!r}, encrypt_writes={self.encrypt_writes})"

    # -- errors ------------------------------------------------------------------

    def _where(self, key: str) -> str:
        return f"store {self.name!r}: object {key!r}"

    def _named(self, key: str, exc: GatewayError) -> GatewayError:
        """The same error with the store and object key in front of its message."""
        if isinstance(exc, KeyNotFound):
            if exc.where:
                return exc
            return KeyNotFound(exc.key_id, exc.version, held=exc.held, where=self._where(key))
        if isinstance(exc, IntegrityError) and not exc.message.startswith("store "):
            return IntegrityError(f"{self._where(key)}: {exc.message}")
        return exc

    def _changed(self, key: str) -> StorageError:
        return StorageError(f"{self._where(key)}: object changed while it was being read")

    def _refuse_reserved(self, key: str) -> None:
        if is_reserved(key):
            raise StorageError(
                f"store {self.name!r}: key refused: {RESERVED_PREFIX} is reserved for the gateway"
            )

    # -- caches ------------------------------------------------------------------

    def _remember(self, key: str, layout: Layout) -> None:
        self._layouts[key] = layout
        self._layouts.move_to_end(key)
        while len(self._layouts) > self._cache_size:
            self._layouts.popitem(last=False)

    def _forget(self, key: str) -> None:
        self._layouts.pop(key, None)

    def cached_layout(self, key: str) -> Layout | None:
        """The last layout seen for ``key`` (its ETag says which version), if cached."""
        layout = self._layouts.get(key)
        if layout is not None:
            self._layouts.move_to_end(key)
        return layout

    # -- headers -----------------------------------------------------------------

    async def _layout_from(self, key: str, first: RangeRead) -> Layout:
        """Parse the layout from a read at offset 0 (reading the rest of a long header)."""
        data = first.data
        if not is_encrypted(data[:5]):
            layout = Layout(first.etag, first.total_size, None)
            self._remember(key, layout)
            return layout
        try:
            n = header_length(data)
            if len(data) < n <= first.total_size:
                more = await self.inner.read_range(key, len(data), n - len(data))
                if more.etag != first.etag:
                    raise self._changed(key)
                data = data + more.data
            header = parse_header(data)
            layout = Layout(first.etag, first.total_size, header)
            layout.plaintext_size  # noqa: B018 - raises IntegrityError for a cut object
        except (IntegrityError, KeyNotFound) as exc:
            raise self._named(key, exc) from None
        self._remember(key, layout)
        return layout

    async def layout(self, key: str) -> Layout:
        """Read the header bytes of ``key`` (one ranged GET) and say what the object is.

        Raises ``ObjectNotFound``, ``IntegrityError`` (a malformed or cut header),
        ``StorageError``, ``StoreUnavailable``.
        """
        first = await self.inner.read_range(key, 0, HEADER_ALLOWANCE)
        return await self._layout_from(key, first)

    async def _sidecar(
        self, key: str, header: Header, *, cached: bool = True
    ) -> KeyEnvelope | None:
        """The rewrapped envelope kept beside ``key`` for this object, or None."""
        slot = (key, header.fixed.encode())
        if cached and slot in self._sidecars:
            self._sidecars.move_to_end(slot)
            return self._sidecars[slot]
        try:
            read = await self.inner.read_range(sidecar_key(key), 0, MAX_SIDECAR)
        except ObjectNotFound:
            return None
        try:
            envelope = _decode_sidecar(read.data, header.fixed)
        except IntegrityError as exc:
            raise self._named(key, IntegrityError(f"envelope sidecar: {exc.message}")) from None
        if envelope is not None:
            self._sidecars[slot] = envelope
            while len(self._sidecars) > self._cache_size:
                self._sidecars.popitem(last=False)
        return envelope

    async def _cipher(self, key: str, header: Header) -> SegmentCipher:
        """The object's data key: from its header, or from its sidecar once that key is retired.

        Raises ``KeyNotFound`` or ``IntegrityError`` naming the store and object key.
        """
        try:
            return SegmentCipher.for_header(header, self.keys)
        except KeyNotFound as missing:
            first_error: GatewayError = missing
        except IntegrityError as exc:
            raise self._named(key, exc) from None
        for cached in (True, False):
            envelope = await self._sidecar(key, header, cached=cached)
            if envelope is None:
                break
            try:
                return SegmentCipher.for_header(header, self.keys, envelope=envelope)
            except KeyNotFound as exc:
                first_error = exc  # a cached sidecar may be older than a newer rewrap
            except IntegrityError as exc:
                raise self._named(key, exc) from None
        raise self._named(key, first_error) from None

    # -- ObjectStore: listing and stat ------------------------------------------------

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        """The inner listing without reserved keys; sizes are *stored* sizes (see module)."""
        after = start_after
        while True:
            page = await self.inner.list_page(start_after=after, limit=limit)
            objects = [o for o in page.objects if not is_reserved(o.key)]
            if objects or not page.is_truncated or not page.objects:
                return ListPage(objects=objects, is_truncated=page.is_truncated)
            after = page.objects[-1].key  # a page of reserved keys only: look further

    async def stat(self, key: str) -> ObjectInfo:
        """ETag and last-modified of the object, with its *plaintext* size.

        A HEAD, plus a header read unless the version's header is cached. Raises
        ``ObjectNotFound``, ``IntegrityError``, ``StorageError``, ``StoreUnavailable``.
        """
        info = await self.inner.stat(key)
        layout = self.cached_layout(key)
        if layout is None or layout.etag != info.etag:
            layout = await self.layout(key)
        return ObjectInfo(
            key=key, size=layout.plaintext_size, etag=layout.etag, last_modified=info.last_modified
        )

    # -- ObjectStore: reads --------------------------------------------------------

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        """Up to ``length`` plaintext bytes at plaintext ``offset``; ``total_size`` is plaintext.

        Offset 0: one ranged GET covering header and segments. Otherwise one GET when the
        object's header is cached, two when not. Raises ``ObjectNotFound``,
        ``IntegrityError`` / ``KeyNotFound`` (naming store and key), ``StorageError``
        (changed while read), ``StoreUnavailable``; ``ValueError`` on negative arguments.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        for _ in range(_MAX_RESTARTS):
            layout = self.cached_layout(key) if offset > 0 and length > 0 else None
            if layout is not None:
                got = await self._read_planned(key, layout, offset, length)
                if got is not None:
                    return got
                self._forget(key)  # the object changed since: look at it again
            segments = -(-length // self.segment_size) if offset == 0 else 0
            first = await self.inner.read_range(
                key, 0, HEADER_ALLOWANCE + length + segments * TAG_SIZE
            )
            layout = await self._layout_from(key, first)
            if layout.header is None:
                if offset == 0:
                    return RangeRead(first.data[:length], 0, first.etag, first.total_size)
                got = await self._read_planned(key, layout, offset, length)
            else:
                got = await self._read_planned(key, layout, offset, length, have=first.data)
            if got is not None:
                return got
        raise self._changed(key)

    async def _read_planned(
        self, key: str, layout: Layout, offset: int, length: int, *, have: bytes = b""
    ) -> RangeRead | None:
        """Read with a known layout; None if the object is no longer that version."""
        if layout.header is None:
            read = await self.inner.read_range(key, offset, length)
            return read if read.etag == layout.etag else None
        header = layout.header
        total = layout.plaintext_size
        plan = ciphertext_range(
            header_length=header.length,
            segment_size=header.fixed.segment_size,
            object_size=layout.stored_size,
            start=min(offset, total),
            end=min(offset + length, total),
        )
        if plan.segment_count == 0:
            return RangeRead(b"", offset, layout.etag, total)
        if plan.end <= len(have):
            data = have[plan.start : plan.end]
        else:
            start = max(plan.start, len(have))
            read = await self.inner.read_range(key, start, plan.end - start)
            if read.etag != layout.etag or read.total_size != layout.stored_size:
                return None
            data = have[plan.start :] + read.data if plan.start < len(have) else read.data
        cipher = await self._cipher(key, header)
        try:
            plain = cipher.decrypt_range(plan, data)
        except IntegrityError as exc:
            raise self._named(key, exc) from None
        return RangeRead(plain, offset, layout.etag, total)

    async def read_stream(
        self,
        key: str,
        *,
        offset: int = 0,
        chunk_size: int = 1 << 20,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream plaintext from plaintext ``offset``; each segment is verified before it goes out.

        One GET from offset 0 (the header comes with the body); from an offset > 0 the
        header is read first unless cached. A plain object streams through unchanged.
        Raises ``IntegrityError`` / ``KeyNotFound`` (naming store and key) at the point
        the object fails, before any unverified byte; otherwise as ``inner.read_stream``.
        """
        if offset < 0 or chunk_size <= 0:
            raise ValueError("offset must be >= 0 and chunk_size > 0")
        if offset == 0:
            async for chunk in self._stream_from_start(key, chunk_size, if_match):
                yield chunk
            return
        for attempt in range(2):
            layout = self.cached_layout(key)
            fresh = layout is None or (if_match is not None and layout.etag != if_match)
            if fresh:
                layout = await self.layout(key)
            assert layout is not None
            if if_match is not None and layout.etag != if_match:
                raise self._changed(key)
            stream = self._stream_from(key, layout, offset, chunk_size)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except StorageError as exc:
                if fresh or attempt or isinstance(exc, ObjectNotFound | StoreUnavailable):
                    raise
                self._forget(key)  # the cached version is gone: look again once
                continue
            try:
                yield first
                async for chunk in stream:
                    yield chunk
            finally:
                await close_stream(stream)
            return

    async def _stream_from(
        self, key: str, layout: Layout, offset: int, chunk_size: int
    ) -> AsyncIterator[bytes]:
        if layout.header is None:
            async for chunk in self.inner.read_stream(
                key, offset=offset, chunk_size=chunk_size, if_match=layout.etag
            ):
                yield chunk
            return
        header = layout.header
        total = layout.plaintext_size
        if offset >= total:
            return
        plan = ciphertext_range(
            header_length=header.length,
            segment_size=header.fixed.segment_size,
            object_size=layout.stored_size,
            start=offset,
            end=total,
        )
        cipher = await self._cipher(key, header)
        source = self.inner.read_stream(
            key, offset=plan.start, chunk_size=max(chunk_size, 1 << 16), if_match=layout.etag
        )
        async for chunk in self._decrypt(
            key, cipher, source, first=plan.first_segment, final=plan.final_segment,
            skip=plan.skip, chunk_size=chunk_size,
        ):
            yield chunk

    # -- the zero-copy relay (storage.zerocopy) ------------------------------------------

    @property
    def can_open_bodies(self) -> bool:
        """Bodies can be opened for a relay when the wrapped store opens them.

        Not in a store that writes SM4-GCM: where the cipher itself is the limit (~110
        MB/s a core without SM4 instructions), the ordinary path is faster, as it
        decrypts the instances it reads ahead on every core (measured: 0.87 and 0.92 of
        the bare one-core SM4 rate in two runs, the relay 0.80, one body at a time). SM4
        objects met in an AES store are still relayed, decrypted in a worker thread.
        """
        return self.suite is not Suite.SM4_GCM and opens_bodies(self.inner)

    async def open_body(self, key: str, *, if_match: str | None = None) -> OpenBody | None:
        """The object's body opened for ``zerocopy.Relay``: plain spliced, encrypted decrypted.

        The inner store opens the body (one GET; None when it cannot: the caller takes
        ``read_stream``). Its first bytes (those that came with the response head, more
        from the socket if needed) tell a plain object, returned as the inner body for a
        splice, from an encrypted one: its header is parsed and its data key unwrapped
        (``_cipher``, sidecars included), and a ``DecryptingBody`` is returned whose
        ``length`` is the plaintext size. Why not a splice: every segment has to be
        verified and decrypted in the process. What it costs instead: the ciphertext is
        copied kernel -> user once, decrypted into a second buffer, written user ->
        kernel once (``Relay._relay_decrypting``), segments opened exactly as
        ``read_stream`` opens them, with the same errors. An object whose stored size no
        object of the format has (cut or extended by a partial segment), or whose
        connection ends inside its header, is left to ``read_stream`` (None), which
        reports it where it meets it. Raises ``IntegrityError`` (malformed header) and
        ``KeyNotFound`` naming store and key, and what the inner ``open_body`` raises.
        """
        if not opens_bodies(self.inner):
            return None
        body = await cast(BodyOpener, self.inner).open_body(key, if_match=if_match)
        if body is None:
            return None
        try:
            return await self._open_body(key, body)
        except BaseException:
            body.close()
            raise

    async def _open_body(self, key: str, body: OpenBody) -> OpenBody | None:
        wanted = min(body.length, HEADER_PREFIX_LENGTH)
        head = await _recv_more(body.sock, body.initial, wanted, body.timeout_s)
        if len(head) < wanted:
            body.close()
            return None  # the connection ended at once: a fresh read
        if not is_encrypted(head[:5]):
            body.initial = head
            self._remember(key, Layout(body.etag, body.length, None))
            return body
        try:
            wanted = min(header_length(head), body.length)
        except IntegrityError as exc:
            raise self._named(key, exc) from None
        head = await _recv_more(body.sock, head, wanted, body.timeout_s)
        if len(head) < wanted:
            body.close()
            return None  # the connection ended inside the header: a fresh read
        try:
            header = parse_header(head)  # IntegrityError if longer than the object
        except IntegrityError as exc:
            raise self._named(key, exc) from None
        layout = Layout(body.etag, body.length, header)
        try:
            length = layout.plaintext_size
        except IntegrityError:
            body.close()
            return None
        cipher = await self._cipher(key, header)
        self._remember(key, layout)
        stored = body.length - header.length
        # The first segment is verified now, while the body is opened ahead: an object
        # that fails there is refused before any of it is sent (for the first instance,
        # before the response starts, as read_stream's first chunk would be). The relay
        # opens it again (one segment: microseconds with AES).
        first = min(header.fixed.segment_size + TAG_SIZE, stored)
        segments = await _recv_more(body.sock, head[header.length :], first, body.timeout_s)
        if len(segments) < first:
            body.close()
            return None  # the connection ended inside the first segment: a fresh read
        opener = _SegmentOpener(self, key, cipher)
        scratch = memoryview(bytearray(first - TAG_SIZE))

        def verify() -> int:
            return opener.open_into(0, memoryview(segments)[:first], scratch, last=first == stored)

        if opener.threaded:
            await asyncio.to_thread(verify)
        else:
            verify()
        return DecryptingBody(
            body, opener=opener, length=length, stored=stored, initial=segments
        )

    async def _stream_from_start(
        self, key: str, chunk_size: int, if_match: str | None
    ) -> AsyncIterator[bytes]:
        source = self.inner.read_stream(key, chunk_size=chunk_size, if_match=if_match)
        try:
            head = bytearray()
            async for chunk in source:
                head += chunk
                if len(head) >= HEADER_PREFIX_LENGTH:
                    break
            if not is_encrypted(head[:5]):
                for i in range(0, len(head), chunk_size):
                    yield bytes(head[i : i + chunk_size])
                async for chunk in source:
                    yield chunk
                return
            try:
                n = header_length(head)
                while len(head) < n:
                    more = await anext(source, None)
                    if more is None:
                        break
                    head += more
                header = parse_header(head)
            except IntegrityError as exc:
                raise self._named(key, exc) from None
            cipher = await self._cipher(key, header)
            rest = bytes(head[header.length :])
            async for chunk in self._decrypt(
                key, cipher, source, first=0, final=None, skip=0, chunk_size=chunk_size,
                initial=rest,
            ):
                yield chunk
        finally:
            await close_stream(source)

    async def _decrypt(
        self,
        key: str,
        cipher: SegmentCipher,
        source: AsyncIterator[bytes],
        *,
        first: int,
        final: int | None,
        skip: int,
        chunk_size: int,
        initial: bytes = b"",
    ) -> AsyncIterator[bytes]:
        """Open segments ``first..`` from ``source``; the last one the stream holds is the
        final one (``final``, when known, must agree)."""
        step = cipher.fixed.segment_size + TAG_SIZE
        threaded = cipher.fixed.suite is Suite.SM4_GCM
        held = bytearray()  # the start of a segment not yet known not to be the last
        index = first

        def opened(data: Bytes) -> bytes:
            nonlocal index
            if final is not None and index >= final:
                raise IntegrityError(f"encrypted object has bytes after its final segment {final}")
            plain = cipher.open(index, data, last=False)
            index += 1
            return plain

        def out(parts: list[bytes]) -> list[bytes]:
            nonlocal skip
            if not parts:
                return []
            plain = parts[0] if len(parts) == 1 else b"".join(parts)
            if skip:
                plain, skip = plain[skip:], 0
            if len(plain) <= chunk_size:
                return [plain] if plain else []
            return [plain[i : i + chunk_size] for i in range(0, len(plain), chunk_size)]

        def take(chunk: Bytes) -> list[bytes]:
            # Segments are opened straight from the chunk; only the bytes of the segment
            # that straddles chunks are copied (a segment is known not to be the last once
            # a byte after it arrived).
            nonlocal held
            parts: list[bytes] = []
            view = memoryview(chunk)
            pos = 0
            if held:
                need = step - len(held)
                if len(view) <= need:
                    held += view
                    return []
                held += view[:need]
                pos = need
                parts.append(opened(held))
            while len(view) - pos > step:
                parts.append(opened(view[pos : pos + step]))
                pos += step
            held = bytearray(view[pos:])
            return out(parts)

        try:
            for piece in take(initial):
                yield piece
            async for chunk in source:
                pieces = (
                    await asyncio.to_thread(take, chunk)
                    if threaded and len(chunk) >= THREAD_MIN
                    else take(chunk)
                )
                for piece in pieces:
                    yield piece
            if final is not None and index != final:
                raise IntegrityError(
                    f"encrypted object is truncated: it ends before its final segment {final}"
                )
            if len(held) < TAG_SIZE:
                raise IntegrityError(
                    f"encrypted object is truncated: it ends without its final segment "
                    f"(after {index} segments)"
                )
            last = cipher.open(index, held, last=True)
        except (IntegrityError, KeyNotFound) as exc:
            raise self._named(key, exc) from None
        for piece in out([last]):
            yield piece

    # -- ObjectStore: writes ---------------------------------------------------------

    async def _write_encrypted(
        self, key: str, chunks: AsyncIterable[Bytes], *, content_type: str
    ) -> tuple[ObjectInfo, int]:
        """Encrypt ``chunks`` into ``key`` of the inner store: (its info, plaintext size)."""
        try:
            enc = Encryptor(self.keys, suite=self.suite, segment_size=self.segment_size)
        except KeyNotFound as exc:
            raise self._named(key, exc) from None
        count = 0
        threaded = self.suite is Suite.SM4_GCM

        async def sealed() -> AsyncIterator[bytes]:
            nonlocal count
            async for chunk in chunks:
                count += len(chunk)
                piece = (
                    await asyncio.to_thread(enc.update, chunk)
                    if threaded and len(chunk) >= THREAD_MIN
                    else enc.update(chunk)
                )
                if piece:
                    yield piece
            yield enc.finalize()

        info = await self.inner.write_stream(key, sealed(), content_type=content_type)
        self._remember(key, Layout(info.etag, info.size, enc.header))
        return info, count

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str = "application/dicom"
    ) -> ObjectInfo:
        """Write (encrypted when ``encrypt_writes``); the returned size is the plaintext size.

        Memory holds one segment plus what the inner adapter buffers. Raises
        ``StorageError`` (also for a reserved key), ``StoreUnavailable``, ``KeyNotFound``.
        """
        self._refuse_reserved(key)
        self._forget(key)
        if not self.encrypt_writes:
            return await self.inner.write_stream(key, chunks, content_type=content_type)
        info, count = await self._write_encrypted(key, chunks, content_type=content_type)
        return ObjectInfo(key=key, size=count, etag=info.etag, last_modified=info.last_modified)

    async def delete(self, key: str) -> None:
        """Delete the object and its envelope sidecar, if any. Raises ``StorageError``."""
        self._refuse_reserved(key)
        self._forget(key)
        await self.inner.delete(key)
        await self.inner.delete(sidecar_key(key))

    async def close(self) -> None:
        await self.inner.close()

    # -- key rotation: rewrap -------------------------------------------------------

    async def rewrap_object(self, key: str) -> RewrapOutcome:
        """Make the data key of ``key`` available under the current key version.

        Reads the header (and the sidecar), never the body; writes a sidecar when the
        header's version is not current and no sidecar holds the current one yet.
        Returns ``plain``, ``current``, ``done`` (sidecar already current) or
        ``rewrapped``. Raises ``ObjectNotFound``, ``KeyNotFound`` / ``IntegrityError``
        (naming store and key: neither the header's nor the sidecar's key is held, or
        one fails to authenticate), ``StorageError``, ``StoreUnavailable``.
        """
        layout = await self.layout(key)
        header = layout.header
        if header is None:
            return "plain"
        current = self.keys.current()
        own = header.envelope
        if (own.key_id, own.key_version) == current:
            return "current"
        side = await self._sidecar(key, header, cached=False)
        if side is not None and (side.key_id, side.key_version) == current:
            return "done"
        try:
            try:
                new = rewrap(own, header.fixed, self.keys)
            except KeyNotFound:
                if side is None:
                    raise
                new = rewrap(side, header.fixed, self.keys)
        except (KeyNotFound, IntegrityError) as exc:
            raise self._named(key, exc) from None
        await self.inner.write_stream(
            sidecar_key(key),
            _one(_encode_sidecar(header.fixed, new)),
            content_type="application/octet-stream",
        )
        self._sidecars[(key, header.fixed.encode())] = new
        return "rewrapped"

    async def read_status(self) -> dict[str, object] | None:
        """The record the last complete rewrap of this store left, or None."""
        try:
            read = await self.inner.read_range(REWRAP_STATUS_KEY, 0, 1 << 16)
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(read.data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    async def write_status(self, doc: dict[str, object]) -> None:
        """Record a finished rewrap (``keys retire`` checks it)."""
        await self.inner.write_stream(
            REWRAP_STATUS_KEY,
            _one(json.dumps(doc, sort_keys=True).encode()),
            content_type="application/json",
        )

    # -- seal: encrypt plain objects in place ------------------------------------------

    async def _digest(self, key: str, etag: str) -> str:
        digest = hashlib.sha256()
        async for chunk in self.read_stream(key, if_match=etag):
            digest.update(chunk)
        return digest.hexdigest()

    async def seal_object(self, key: str, *, fault: Fault | None = None) -> SealOutcome:
        """Replace the plain object ``key`` by its encrypted form, verified (module docstring).

        Returns ``encrypted`` (already), ``sealed``, ``changed`` (the object changed
        while being sealed: left as it is for the next run) or ``gone``. Raises
        ``IntegrityError`` if a read-back does not match (the plain object or the
        staging copy is kept), ``StorageError``, ``StoreUnavailable``, ``KeyNotFound``.
        """
        step = fault or (lambda _name: None)
        try:
            layout = await self.layout(key)
        except ObjectNotFound:
            return "gone"
        if layout.header is not None:
            return "encrypted"
        stage = SEAL_PREFIX + key
        digest = hashlib.sha256()

        read_failed: list[StorageError] = []

        async def plain() -> AsyncIterator[bytes]:
            try:
                async for chunk in self.inner.read_stream(key, if_match=layout.etag):
                    digest.update(chunk)
                    yield chunk
            except StorageError as exc:
                read_failed.append(exc)  # the source's failure, told apart from the write's
                raise

        try:
            staged, _ = await self._write_encrypted(
                stage, plain(), content_type="application/octet-stream"
            )
        except StorageError as exc:
            if not read_failed or isinstance(exc, StoreUnavailable):
                raise
            if isinstance(exc, ObjectNotFound):
                return "gone"
            return "changed"  # If-Match refused: a new version; the next run seals it
        want = digest.hexdigest()
        step("staged")
        if await self._digest(stage, staged.etag) != want:
            await self.inner.delete(stage)
            raise IntegrityError(f"{self._where(key)}: sealed copy does not read back the same")
        step("verified")
        try:
            now = await self.inner.stat(key)
        except ObjectNotFound:
            await self.inner.delete(stage)
            return "gone"
        if now.etag != layout.etag:
            await self.inner.delete(stage)
            return "changed"
        final = await self._copy_raw(stage, staged.etag, key)
        step("replaced")
        if await self._digest(key, final.etag) != want:
            raise IntegrityError(
                f"{self._where(key)}: sealed object does not read back the same; the verified "
                f"copy is kept at {stage!r} and the next seal run restores it"
            )
        step("checked")
        await self.inner.delete(stage)
        return "sealed"

    async def _copy_raw(self, source: str, etag: str, target: str) -> ObjectInfo:
        self._forget(target)
        return await self.inner.write_stream(
            target,
            self.inner.read_stream(source, if_match=etag),
            content_type="application/octet-stream",
        )

    async def reconcile_seal(self) -> int:
        """Finish the seals a killed run left half done (staging copies); returns how many.

        For each staging copy: if the object reads back as the staging copy's plaintext,
        drop the copy; if the object is encrypted but does not read (the crash came
        mid-way through an unverified replace), restore it from the verified copy; if it
        is still plain or gone, drop the copy (the main pass seals it again). Raises
        ``StorageError``, ``StoreUnavailable``.
        """
        # Keys under the prefix come right after it in any listing order (byte order, or
        # SeaweedFS's directory walk), so the scan stops at the first key outside it.
        stages: list[ObjectInfo] = []
        after: str | None = SEAL_PREFIX
        while after is not None:
            page = await self.inner.list_page(start_after=after, limit=1000)
            mine = [o for o in page.objects if o.key.startswith(SEAL_PREFIX)]
            stages.extend(mine)
            outside = len(mine) < len(page.objects)
            after = mine[-1].key if mine and page.is_truncated and not outside else None
        for info in stages:
            key = info.key[len(SEAL_PREFIX) :]
            try:
                want = await self._digest(info.key, info.etag)
            except (IntegrityError, KeyNotFound, ObjectNotFound):
                await self.inner.delete(info.key)  # an unverified copy: never restored from
                continue
            try:
                layout = await self.layout(key)
            except ObjectNotFound:
                await self.inner.delete(info.key)
                continue
            if layout.header is not None:
                try:
                    ok = await self._digest(key, layout.etag) == want
                except (IntegrityError, KeyNotFound):
                    ok = False
                if not ok:
                    final = await self._copy_raw(info.key, info.etag, key)
                    if await self._digest(key, final.etag) != want:
                        raise IntegrityError(
                            f"{self._where(key)}: restoring from {info.key!r} did not read back"
                        )
            await self.inner.delete(info.key)
        return len(stages)

