"""Encrypted objects at rest: a segmented streaming AEAD format under a per-object data key.

The design is Google Tink's streaming AEAD (``AesGcmHkdfStreaming``), which implements
the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance" (CRYPTO 2015, section
7): the plaintext is cut into segments of ``segment_size`` bytes, each sealed on its own
with a nonce made of a per-object random prefix, the segment number and a last-segment
flag. Segments can be decrypted one at a time (streaming, ranged reads) while dropping,
reordering, duplicating or truncating segments, or splicing them between objects, fails
authentication. Unlike Tink, the key is not derived by HKDF from a master key: each
object gets a random data key (DEK), wrapped by a key-encryption key of a
``KeyProvider`` into the header, so key rotation rewraps 60-odd bytes and never
re-encrypts data; and every segment holds exactly ``segment_size`` plaintext bytes
(Tink shortens the first by the header length), which keeps range arithmetic simple.

Object layout (all integers big-endian)::

    fixed part, 16 bytes; the associated data of every segment
      0  3  magic b"IGE"
      3  1  format version (1)
      4  1  suite (1 = AES-256-GCM, 2 = SM4-GCM)
      5  4  segment size: plaintext bytes per segment (u32)
      9  7  nonce prefix (random)
    16  2  header length: total bytes of the header, this field and the envelope included
    key envelope (replaced by a rewrap; not part of the segments' associated data)
    18  1  key id length k (1..255)
    19  k  key id (UTF-8)
       4  key version (u32)
       2  wrapped data key length w (1..4096)
       w  wrapped data key: the DEK sealed by the KeyProvider with associated data
          fixed part || k || key id || key version
    segments: segment i = AEAD(DEK, nonce_i, plaintext_i, fixed part), 16-byte tag last;
    every segment but the last holds segment_size plaintext bytes, the last 1..segment_size
    (0 only when the whole object is empty); no plaintext length is stored.

The first 18 bytes (``HEADER_PREFIX_LENGTH``) say how long the header is. Errors are
``IntegrityError`` (anything that fails to parse or authenticate) and ``KeyNotFound``
(the key id and version the envelope names are not held); messages name the key and the
segment, never any plaintext.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from imaging_gateway.crypto.aead import TAG_SIZE, Aead, Bytes, Suite
from imaging_gateway.crypto.keyring import KeyProvider, check_key_id
from imaging_gateway.errors import IntegrityError, InvalidRequest

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "HEADER_PREFIX_LENGTH",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "TAG_SIZE",
    "Decryptor",
    "Encryptor",
    "FixedHeader",
    "Header",
    "KeyEnvelope",
    "SegmentCipher",
    "SegmentRange",
    "Suite",
    "ciphertext_length",
    "ciphertext_range",
    "decrypt",
    "decrypt_range",
    "decrypt_stream",
    "encrypt",
    "encrypt_stream",
    "header_length",
    "is_encrypted",
    "parse_header",
    "plaintext_length",
    "rewrap",
]

MAGIC = b"IGE"
FORMAT_VERSION = 1
NONCE_PREFIX_SIZE = 7
FIXED_LENGTH = 16
HEADER_PREFIX_LENGTH = FIXED_LENGTH + 2
"""Read this many bytes of an object to learn its header length (``header_length``)."""
DEFAULT_SEGMENT_SIZE = 64 * 1024
MIN_SEGMENT_SIZE = 4 * 1024
"""Writers' floor (below it the 16-byte tags cost more than 0.4 %); readers accept any size."""
MAX_SEGMENT_SIZE = 8 * 1024 * 1024
"""Bounds a reader's buffer: one segment."""
MAX_WRAPPED_DEK = 4096
MAX_SEGMENTS = 2**32  # the segment number is a u32 in the nonce

_FIXED = struct.Struct(">3sBBI7s")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_SEGMENT_NONCE_SUFFIX = struct.Struct(">IB")


@dataclass(frozen=True, slots=True)
class FixedHeader:
    """The part of the header every segment authenticates; a rewrap never changes it."""

    suite: Suite
    segment_size: int
    nonce_prefix: bytes
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return _FIXED.pack(
            MAGIC, self.version, self.suite.code, self.segment_size, self.nonce_prefix
        )

    @classmethod
    def decode(cls, data: Bytes) -> FixedHeader:
        """Parse the first 16 bytes; raises ``IntegrityError`` unless a valid fixed part."""
        if len(data) < FIXED_LENGTH:
            raise IntegrityError("encrypted object header is truncated")
        magic, version, code, segment_size, prefix = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise IntegrityError("not an encrypted object (no IGE magic)")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"encrypted object format version {version} is not supported")
        suite = Suite.from_code(code)
        if suite is None:
            raise IntegrityError(f"encrypted object names unknown suite {code}")
        if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
            raise IntegrityError(f"encrypted object segment size {segment_size} is out of bounds")
        return cls(suite=suite, segment_size=segment_size, nonce_prefix=prefix, version=version)


@dataclass(frozen=True, slots=True)
class KeyEnvelope:
    """Which key-encryption key (id, version) wrapped the data key, and the wrapped key."""

    key_id: str
    key_version: int
    wrapped_dek: bytes

    def encode(self) -> bytes:
        """Raises ``ValueError`` if a field does not fit the format."""
        kid = check_key_id(self.key_id)
        if not 1 <= len(self.wrapped_dek) <= MAX_WRAPPED_DEK:
            raise ValueError(f"wrapped data key must be 1..{MAX_WRAPPED_DEK} bytes")
        return (
            bytes([len(kid)])
            + kid
            + _U32.pack(self.key_version)
            + _U16.pack(len(self.wrapped_dek))
            + self.wrapped_dek
        )

    @classmethod
    def decode(cls, data: Bytes) -> KeyEnvelope:
        """Parse exactly one encoded envelope. Raises ``IntegrityError`` if malformed."""
        view = memoryview(data)
        try:
            k = view[0]
            if k == 0:
                raise IntegrityError("key envelope has an empty key id")
            key_id = bytes(view[1 : 1 + k]).decode("utf-8")
            check_key_id(key_id)
            (version,) = _U32.unpack_from(view, 1 + k)
            (w,) = _U16.unpack_from(view, 5 + k)
        except (IndexError, struct.error, UnicodeDecodeError, ValueError):
            raise IntegrityError("key envelope is malformed") from None
        if w == 0 or len(view) != 7 + k + w:
            raise IntegrityError("key envelope is malformed (lengths disagree)")
        return cls(key_id=key_id, key_version=version, wrapped_dek=bytes(view[7 + k :]))

    def aad(self, fixed: FixedHeader) -> bytes:
        """Associated data of the wrapped key: fixed part, key id, version (see ``_wrap_aad``)."""
        return _wrap_aad(fixed, self.key_id, self.key_version)


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed header: the fixed part and the key envelope."""

    fixed: FixedHeader
    envelope: KeyEnvelope

    def encode(self) -> bytes:
        env = self.envelope.encode()
        return self.fixed.encode() + _U16.pack(HEADER_PREFIX_LENGTH + len(env)) + env

    @property
    def length(self) -> int:
        """Bytes of the encoded header (where segment 0 starts)."""
        return (
            HEADER_PREFIX_LENGTH
            + 7
            + len(self.envelope.key_id.encode())
            + len(self.envelope.wrapped_dek)
        )


def is_encrypted(first_bytes: Bytes) -> bool:
    """True if the bytes start like an object of this format (magic, version, known suite).

    Plain DICOM objects (uploaded by hospitals directly) start with a 128-byte preamble
    and ``DICM`` (PS3.10 7.1); one whose preamble happens to begin ``IGE\\x01\\x01`` or
    ``IGE\\x01\\x02`` would be taken for encrypted and then fail loudly, never be misread.
    """
    return (
        len(first_bytes) >= 5
        and bytes(first_bytes[:3]) == MAGIC
        and first_bytes[3] == FORMAT_VERSION
        and Suite.from_code(first_bytes[4]) is not None
    )


def header_length(first_bytes: Bytes) -> int:
    """The total header length, from the first ``HEADER_PREFIX_LENGTH`` bytes.

    Raises ``IntegrityError`` if they are too few or not a valid fixed part.
    """
    if len(first_bytes) < HEADER_PREFIX_LENGTH:
        raise IntegrityError("encrypted object header is truncated")
    FixedHeader.decode(first_bytes)
    n: int = _U16.unpack_from(first_bytes, FIXED_LENGTH)[0]
    if n < HEADER_PREFIX_LENGTH + 9:
        raise IntegrityError(f"encrypted object header length {n} is too small")
    return n


def parse_header(data: Bytes) -> Header:
    """Parse the header at the start of ``data`` (bytes after it are ignored).

    Raises ``IntegrityError`` if it is truncated or malformed. Nothing is authenticated
    yet: that happens when the data key is unwrapped (``SegmentCipher.for_header``).
    """
    n = header_length(data)
    if len(data) < n:
        raise IntegrityError(f"encrypted object header is truncated ({len(data)} of {n} bytes)")
    fixed = FixedHeader.decode(data)
    envelope = KeyEnvelope.decode(memoryview(data)[HEADER_PREFIX_LENGTH:n])
    return Header(fixed=fixed, envelope=envelope)


def _wrap_aad(fixed: FixedHeader, key_id: str, version: int) -> bytes:
    # The wrapped DEK is bound to the whole fixed part and to the key id and version, so
    # an envelope moved to another object, or an edited id or version, fails to unwrap.
    kid = check_key_id(key_id)
    return fixed.encode() + bytes([len(kid)]) + kid + _U32.pack(version)


def _wrap(dek: bytes, fixed: FixedHeader, keys: KeyProvider) -> KeyEnvelope:
    # current() then wrap(): a rotation in between makes wrap use another version than
    # the AAD names; it is rare (an admin action), so try again a few times.
    for _ in range(3):
        key_id, version = keys.current()
        got_id, got_version, wrapped = keys.wrap(dek, _wrap_aad(fixed, key_id, version))
        if (got_id, got_version) == (key_id, version):
            return KeyEnvelope(key_id=key_id, key_version=version, wrapped_dek=wrapped)
    raise IntegrityError(f"key {key_id!r} kept changing version while wrapping a data key")


def _unwrap(envelope: KeyEnvelope, fixed: FixedHeader, keys: KeyProvider) -> bytes:
    dek = keys.unwrap(
        envelope.key_id, envelope.key_version, envelope.wrapped_dek, envelope.aad(fixed)
    )
    if len(dek) != fixed.suite.key_size:
        raise IntegrityError(
            f"data key under key {envelope.key_id!r} version {envelope.key_version} "
            f"is not a {fixed.suite} key"
        )
    return dek


def rewrap(
    envelope: KeyEnvelope, fixed: FixedHeader, keys: KeyProvider, *, to: KeyProvider | None = None
) -> KeyEnvelope:
    """The envelope re-wrapped under the current key of ``to`` (default ``keys``).

    Needs only the header: the data key is unwrapped with ``keys`` and wrapped again;
    the segments are untouched, since their associated data is the fixed part only.
    Store the result in place of the object's envelope (``Header(fixed, new).encode()``)
    or beside it, and pass it as ``envelope=`` when decrypting. Raises ``KeyNotFound``
    or ``IntegrityError`` as unwrapping does.
    """
    dek = _unwrap(envelope, fixed, keys)
    return _wrap(dek, fixed, keys if to is None else to)


def _segment_failed(index: int) -> IntegrityError:
    return IntegrityError(
        f"segment {index} of the encrypted object did not authenticate (altered, "
        "truncated, extended, reordered or taken from another object)"
    )


class SegmentCipher:
    """The data key of one object, sealing and opening its segments by number."""

    __slots__ = ("_aad", "_aead", "_prefix", "fixed")

    def __init__(self, fixed: FixedHeader, dek: bytes) -> None:
        self.fixed = fixed
        self._aead = Aead(fixed.suite, dek)
        self._aad = fixed.encode()
        self._prefix = fixed.nonce_prefix

    @classmethod
    def for_header(
        cls, header: Header, keys: KeyProvider, *, envelope: KeyEnvelope | None = None
    ) -> SegmentCipher:
        """Unwrap the data key of ``header`` (or of ``envelope``, kept apart after a rewrap).

        Raises ``KeyNotFound`` if the key id and version are not held, ``IntegrityError``
        if the wrapped key does not authenticate (wrong key, altered header or envelope).
        """
        env = header.envelope if envelope is None else envelope
        return cls(header.fixed, _unwrap(env, header.fixed, keys))

    def _nonce(self, index: int, *, last: bool) -> bytes:
        # Tink AesGcmHkdfStreaming / STREAM (Hoang-Reyhanitabar-Rogaway-Vizar 2015, sec. 7):
        # nonce = prefix (7) || segment number (u32 BE) || last-segment flag (1 byte).
        # The number pins each segment's position, the flag marks the end (truncation), the
        # random prefix with the per-object key keeps objects apart.
        if not 0 <= index < MAX_SEGMENTS:
            raise InvalidRequest("object has more segments than the format can number")
        return self._prefix + _SEGMENT_NONCE_SUFFIX.pack(index, 1 if last else 0)

    def seal(self, index: int, plaintext: Bytes, *, last: bool) -> bytes:
        return self._aead.seal(self._nonce(index, last=last), plaintext, self._aad)

    def open(self, index: int, ciphertext: Bytes, *, last: bool) -> bytes:
        """Verify and decrypt segment ``index``. Raises ``IntegrityError`` if it fails."""
        try:
            return self._aead.open(self._nonce(index, last=last), ciphertext, self._aad)
        except InvalidTag:
            raise _segment_failed(index) from None

    def open_into(self, index: int, ciphertext: Bytes, out: memoryview, *, last: bool) -> int:
        """``open`` into ``out`` (``len(ciphertext) - TAG_SIZE`` bytes); returns that length.

        Raises ``IntegrityError`` if the segment fails; ``out`` may then hold unverified
        bytes, so nothing of it may be used unless this returned.
        """
        try:
            return self._aead.open_into(self._nonce(index, last=last), ciphertext, self._aad, out)
        except InvalidTag:
            raise _segment_failed(index) from None

    def decrypt_range(self, plan: SegmentRange, data: Bytes) -> bytes:
        """Decrypt the bytes ``[plan.start, plan.end)`` of the object; return the range asked.

        Raises ``IntegrityError`` if ``data`` is not exactly that many bytes or a segment
        fails; the object's final segment is checked as final, so a truncated object
        fails when its end is read.
        """
        if plan.segment_size != self.fixed.segment_size:
            raise ValueError("range was planned for another segment size")
        if len(data) != plan.end - plan.start:
            raise IntegrityError(
                f"ranged read returned {len(data)} bytes, expected {plan.end - plan.start}"
            )
        if plan.segment_count == 0:
            return b""
        step = plan.segment_size + TAG_SIZE
        view = memoryview(data)
        parts = []
        for k in range(plan.segment_count):
            i = plan.first_segment + k
            parts.append(
                self.open(i, view[k * step : (k + 1) * step], last=i == plan.final_segment)
            )
        joined = b"".join(parts)
        return joined[plan.skip : plan.skip + plan.length]


class Encryptor:
    """Encrypts one object incrementally; memory stays within one segment plus the input.

    Concatenate everything ``update`` and ``finalize`` return: the first call's output
    starts with the header. The data key is random; ``keys`` wraps it under its current
    key. ``allow_small_segments`` lets tests go below ``MIN_SEGMENT_SIZE``.
    """

    def __init__(
        self,
        keys: KeyProvider,
        *,
        suite: Suite = Suite.AES_256_GCM,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        allow_small_segments: bool = False,
    ) -> None:
        """Raises ``ValueError`` if ``segment_size`` is out of bounds; ``KeyNotFound`` if
        the provider cannot wrap."""
        floor = 1 if allow_small_segments else MIN_SEGMENT_SIZE
        if not floor <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(
                f"segment size must be in [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}] bytes"
            )
        fixed = FixedHeader(
            suite=suite,
            segment_size=segment_size,
            nonce_prefix=secrets.token_bytes(NONCE_PREFIX_SIZE),
        )
        dek = secrets.token_bytes(suite.key_size)
        self.header = Header(fixed=fixed, envelope=_wrap(dek, fixed, keys))
        self._cipher = SegmentCipher(fixed, dek)
        self._size = segment_size
        self._pending = self.header.encode()
        self._held: Bytes = b""  # plaintext not yet sealed, at most one segment
        self._index = 0
        self._done = False

    @property
    def header_length(self) -> int:
        """Bytes of the header this encryptor writes (for ``ciphertext_length``)."""
        return self.header.length

    def update(self, data: Bytes) -> bytes:
        """Take more plaintext; return the ciphertext of every segment now complete.

        A full segment is held back until more data shows it is not the last.
        """
        if self._done:
            raise ValueError("encryptor already finalized")
        out = [self._pending] if self._pending else []
        self._pending = b""
        size, held = self._size, self._held
        if len(held) + len(data) <= size:
            if not held and isinstance(data, bytes):
                self._held = data  # immutable: held by reference, not copied
            else:
                grown = held if isinstance(held, bytearray) else bytearray(held)
                grown += data
                self._held = grown
            return b"".join(out)
        view = memoryview(data)
        pos = 0
        if held:  # complete the held segment: more data follows, so it is not the last
            pos = size - len(held)
            if pos:
                grown = held if isinstance(held, bytearray) else bytearray(held)
                grown += view[:pos]
                held = grown
            out.append(self._seal(held, last=False))
        while len(view) - pos > size:
            out.append(self._seal(view[pos : pos + size], last=False))
            pos += size
        # The rest (1..size bytes) waits to learn whether it is the last segment. A whole
        # chunk of immutable bytes is kept by reference (the common case: chunks of one
        # segment); a tail is copied, so neither a big chunk nor a buffer the caller
        # reuses is held on to.
        self._held = data if pos == 0 and isinstance(data, bytes) else bytearray(view[pos:])
        return b"".join(out)

    def finalize(self) -> bytes:
        """Seal the held bytes (possibly none) as the last segment; return it."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._done = True
        out = self._pending + self._seal(self._held, last=True)
        self._pending = b""
        self._held = b""
        return out

    def _seal(self, plaintext: Bytes, *, last: bool) -> bytes:
        sealed = self._cipher.seal(self._index, plaintext, last=last)
        self._index += 1
        return sealed


class Decryptor:
    """Decrypts one object incrementally; returns a segment's plaintext only once verified.

    ``envelope`` replaces the header's key envelope (one rewrapped and kept elsewhere).
    ``finalize`` raises if the object ends without its final segment or runs past it.
    """

    def __init__(self, keys: KeyProvider, *, envelope: KeyEnvelope | None = None) -> None:
        self._keys = keys
        self._envelope = envelope
        self.header: Header | None = None
        self._cipher: SegmentCipher | None = None
        self._buf = bytearray()
        self._index = 0
        self._done = False

    def update(self, data: Bytes) -> bytes:
        """Take more ciphertext; return the plaintext of every segment now verified.

        Raises ``IntegrityError`` or ``KeyNotFound`` as soon as the header or a segment
        fails (a segment is known not to be the last once a byte after it arrives).
        """
        if self._done:
            raise ValueError("decryptor already finalized")
        buf = self._buf
        buf += data
        if self._cipher is None:
            if len(buf) < HEADER_PREFIX_LENGTH or len(buf) < header_length(buf):
                return b""
            self.header = parse_header(bytes(buf[: header_length(buf)]))
            self._cipher = SegmentCipher.for_header(
                self.header, self._keys, envelope=self._envelope
            )
            del buf[: self.header.length]
        step = self._cipher.fixed.segment_size + TAG_SIZE
        if len(buf) <= step:
            return b""
        out = []
        pos = 0
        with memoryview(buf) as view:
            while len(buf) - pos > step:
                out.append(self._cipher.open(self._index, view[pos : pos + step], last=False))
                self._index += 1
                pos += step
        del buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        """Verify the held bytes as the final segment; return its plaintext.

        Raises ``IntegrityError`` if the object was truncated (no final segment) or has
        bytes after it.
        """
        if self._done:
            raise ValueError("decryptor already finalized")
        self._done = True
        if self._cipher is None:
            raise IntegrityError("encrypted object is truncated inside its header")
        buf, self._buf = self._buf, bytearray()
        if len(buf) < TAG_SIZE:
            raise IntegrityError(
                f"encrypted object is truncated: it ends without its final segment "
                f"(after {self._index} segments)"
            )
        try:
            return self._cipher.open(self._index, buf, last=True)
        except IntegrityError:
            pass
        try:  # only to name the failure: is it a whole segment that is not the last?
            self._cipher.open(self._index, buf, last=False)
        except IntegrityError:
            raise IntegrityError(
                f"final segment {self._index} of the encrypted object did not authenticate "
                "(altered, extended, reordered or taken from another object)"
            ) from None
        raise IntegrityError(
            f"encrypted object is truncated: it ends after segment {self._index}, "
            "which is not its final segment"
        )


def encrypt(
    data: Bytes,
    keys: KeyProvider,
    *,
    suite: Suite = Suite.AES_256_GCM,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    allow_small_segments: bool = False,
) -> bytes:
    """Encrypt a whole object held in memory (see ``Encryptor``)."""
    enc = Encryptor(
        keys, suite=suite, segment_size=segment_size, allow_small_segments=allow_small_segments
    )
    return enc.update(data) + enc.finalize()


def decrypt(data: Bytes, keys: KeyProvider, *, envelope: KeyEnvelope | None = None) -> bytes:
    """Decrypt a whole object held in memory. Raises as ``Decryptor`` does."""
    dec = Decryptor(keys, envelope=envelope)
    return dec.update(data) + dec.finalize()


async def encrypt_stream(
    chunks: AsyncIterable[Bytes],
    keys: KeyProvider,
    *,
    suite: Suite = Suite.AES_256_GCM,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Encrypt a stream of plaintext chunks into a stream of ciphertext chunks."""
    enc = Encryptor(keys, suite=suite, segment_size=segment_size)
    async for chunk in chunks:
        out = enc.update(chunk)
        if out:
            yield out
    yield enc.finalize()


async def decrypt_stream(
    chunks: AsyncIterable[Bytes], keys: KeyProvider, *, envelope: KeyEnvelope | None = None
) -> AsyncIterator[bytes]:
    """Decrypt a stream of ciphertext chunks; each plaintext chunk is verified before it
    is yielded. Raises as ``Decryptor`` does, at the point the stream goes wrong."""
    dec = Decryptor(keys, envelope=envelope)
    async for chunk in chunks:
        out = dec.update(chunk)
        if out:
            yield out
    last = dec.finalize()
    if last:
        yield last


def ciphertext_length(plaintext_length: int, *, header_length: int, segment_size: int) -> int:
    """Size of the encrypted object of ``plaintext_length`` bytes (header included)."""
    if plaintext_length < 0:
        raise ValueError("plaintext length must be >= 0")
    segments = max(1, -(-plaintext_length // segment_size))
    return header_length + plaintext_length + segments * TAG_SIZE


def plaintext_length(ciphertext_length: int, *, header_length: int, segment_size: int) -> int:
    """Plaintext size of an encrypted object of ``ciphertext_length`` bytes (header included).

    Raises ``IntegrityError`` if no object of this format has that size (truncated or
    extended by a partial segment).
    """
    body = ciphertext_length - header_length
    step = segment_size + TAG_SIZE
    if body < TAG_SIZE:
        raise IntegrityError("encrypted object is too short to hold its final segment")
    segments = -(-body // step)
    last = body - (segments - 1) * step
    if last < TAG_SIZE or (segments > 1 and last == TAG_SIZE):
        raise IntegrityError(
            f"encrypted object size {ciphertext_length} is not a valid size for segment "
            f"size {segment_size} (truncated or extended)"
        )
    return body - segments * TAG_SIZE


@dataclass(frozen=True, slots=True)
class SegmentRange:
    """The segments a plaintext range touches and the ciphertext bytes that hold them."""

    start: int
    """First ciphertext byte to fetch (offset in the object)."""
    end: int
    """One past the last ciphertext byte to fetch (HTTP ``Range: bytes=start-(end-1)``)."""
    first_segment: int
    segment_count: int
    final_segment: int
    """Number of the object's last segment (sealed with the last-segment flag)."""
    segment_size: int
    skip: int
    """Plaintext bytes to drop from the front of the first segment."""
    length: int
    """Plaintext bytes the range yields (after clamping to the object's end)."""
    plaintext_length: int
    """Plaintext size of the whole object."""


def ciphertext_range(
    *, header_length: int, segment_size: int, object_size: int, start: int, end: int
) -> SegmentRange:
    """Plan a ranged read of plaintext ``[start, end)`` of an object of ``object_size`` bytes.

    ``end`` is clamped to the plaintext length; an empty range plans no segments. Raises
    ``ValueError`` unless ``0 <= start <= end``, ``IntegrityError`` if ``object_size`` is
    not a valid size (``plaintext_length``).
    """
    if not 0 <= start <= end:
        raise ValueError("range must satisfy 0 <= start <= end")
    total = plaintext_length(object_size, header_length=header_length, segment_size=segment_size)
    final = max(1, -(-total // segment_size)) - 1
    end = min(end, total)
    if start >= end:
        return SegmentRange(
            start=header_length,
            end=header_length,
            first_segment=0,
            segment_count=0,
            final_segment=final,
            segment_size=segment_size,
            skip=0,
            length=0,
            plaintext_length=total,
        )
    step = segment_size + TAG_SIZE
    first, last = start // segment_size, (end - 1) // segment_size
    return SegmentRange(
        start=header_length + first * step,
        end=min(header_length + (last + 1) * step, object_size),
        first_segment=first,
        segment_count=last - first + 1,
        final_segment=final,
        segment_size=segment_size,
        skip=start - first * segment_size,
        length=end - start,
        plaintext_length=total,
    )


def decrypt_range(
    header: Header,
    keys: KeyProvider,
    plan: SegmentRange,
    data: Bytes,
    *,
    envelope: KeyEnvelope | None = None,
) -> bytes:
    """Unwrap the data key and decrypt one planned range (``SegmentCipher.decrypt_range``).

    Raises ``KeyNotFound`` or ``IntegrityError``.
    """
    return SegmentCipher.for_header(header, keys, envelope=envelope).decrypt_range(plan, data)
