"""Encrypted object format: round trips, ranged reads, and every tampering refused."""

from __future__ import annotations

import os
import random
import secrets
import struct
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imaging_gateway.crypto.aead import Aead, Suite
from imaging_gateway.crypto.envelope import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_PREFIX_LENGTH,
    MIN_SEGMENT_SIZE,
    TAG_SIZE,
    Decryptor,
    Encryptor,
    Header,
    KeyEnvelope,
    SegmentCipher,
    ciphertext_length,
    ciphertext_range,
    decrypt,
    decrypt_range,
    decrypt_stream,
    encrypt,
    encrypt_stream,
    header_length,
    is_encrypted,
    parse_header,
    plaintext_length,
    rewrap,
)
from imaging_gateway.crypto.keyring import Keyring
from imaging_gateway.errors import IntegrityError, KeyNotFound

S = MIN_SEGMENT_SIZE  # the smallest segment a writer may choose
SUITES = [Suite.AES_256_GCM, Suite.SM4_GCM]
KEY_ID = "kek-110000"


def keyring(
    suite: Suite = Suite.AES_256_GCM,
    *,
    keys: dict[int, bytes] | None = None,
    current: int | None = None,
    key_id: str = KEY_ID,
) -> Keyring:
    keys = keys if keys is not None else {1: os.urandom(suite.key_size)}
    return Keyring(
        key_id=key_id,
        suite=suite,
        keys=keys,
        current=current if current is not None else max(keys),
        blind_index_key=os.urandom(32),
    )


def body_of(ct: bytes) -> bytes:
    return ct[parse_header(ct).length :]


def segments_of(ct: bytes, segment_size: int) -> list[bytes]:
    body = body_of(ct)
    step = segment_size + TAG_SIZE
    return [body[i : i + step] for i in range(0, len(body), step)]


def small(data: bytes, keys: Keyring, *, segment_size: int = 16) -> bytes:
    """An object with tiny segments, so a few hundred bytes span many of them."""
    return encrypt(
        data, keys, suite=keys.suite, segment_size=segment_size, allow_small_segments=True
    )


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("size", [0, 1, S - 1, S, S + 1, 5 * S + 123])
def test_round_trip(suite: Suite, size: int) -> None:
    keys = keyring(suite)
    pt = os.urandom(size)
    ct = encrypt(pt, keys, suite=suite, segment_size=S)
    header = parse_header(ct)
    assert header.fixed.suite is suite and header.fixed.segment_size == S
    assert (header.envelope.key_id, header.envelope.key_version) == (KEY_ID, 1)
    assert len(ct) == ciphertext_length(size, header_length=header.length, segment_size=S)
    assert plaintext_length(len(ct), header_length=header.length, segment_size=S) == size
    assert len(segments_of(ct, S)) == max(1, -(-size // S))
    assert size < 16 or pt not in ct  # short ones may occur in random bytes by chance
    assert decrypt(ct, keys) == pt


@pytest.mark.parametrize("suite", SUITES)
def test_default_segment_size_round_trip(suite: Suite) -> None:
    keys = keyring(suite)
    pt = os.urandom(3 * DEFAULT_SEGMENT_SIZE + 17)
    ct = encrypt(pt, keys, suite=suite)
    assert parse_header(ct).fixed.segment_size == DEFAULT_SEGMENT_SIZE
    assert len(segments_of(ct, DEFAULT_SEGMENT_SIZE)) == 4
    assert decrypt(ct, keys) == pt


@pytest.mark.parametrize("suite", SUITES)
def test_segments_follow_the_documented_layout(suite: Suite) -> None:
    """Segment i opens with the bare primitive: nonce prefix || u32 i || last flag, AAD = fixed part."""
    keys = keyring(suite)
    pt = os.urandom(2 * S + 5)
    ct = encrypt(pt, keys, suite=suite, segment_size=S)
    h = parse_header(ct)
    dek = keys.unwrap(
        h.envelope.key_id, h.envelope.key_version, h.envelope.wrapped_dek, h.envelope.aad(h.fixed)
    )
    fixed = ct[:16]
    assert fixed[:5] == b"IGE\x01" + bytes([suite.code])
    assert struct.unpack(">I", fixed[5:9])[0] == S and fixed[9:16] == h.fixed.nonce_prefix
    assert struct.unpack(">H", ct[16:18])[0] == h.length == len(h.encode())
    for i, seg in enumerate(segments_of(ct, S)):
        nonce = h.fixed.nonce_prefix + struct.pack(">IB", i, 1 if i == 2 else 0)
        if suite is Suite.AES_256_GCM:
            got = AESGCM(dek).decrypt(nonce, seg, fixed)
        else:
            dec = Cipher(algorithms.SM4(dek), modes.GCM(nonce, seg[-16:])).decryptor()
            dec.authenticate_additional_data(fixed)
            got = dec.update(seg[:-16]) + dec.finalize()
        assert got == pt[i * S : (i + 1) * S]


def test_sm4_gcm_known_answer_rfc8998() -> None:
    """RFC 8998 appendix A.1 (SM4-GCM test vector)."""
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    iv = bytes.fromhex("00001234567800000000ABCD")
    aad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    pt = bytes.fromhex(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    )
    ct = bytes.fromhex(
        "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
        "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    )
    tag = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")
    aead = Aead(Suite.SM4_GCM, key)
    assert aead.seal(iv, pt, aad) == ct + tag
    assert aead.open(iv, ct + tag, aad) == pt


@pytest.fixture
def fixed_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same data key, nonce prefix and wrap nonce on every call, so outputs compare byte for byte."""
    monkeypatch.setattr(secrets, "token_bytes", lambda n: b"\x5a" * n)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("chunk", [1, 7, S - 1, S, S + 1, 3 * S + 5])
@pytest.mark.usefixtures("fixed_randomness")
def test_chunked_writer_equals_one_shot(suite: Suite, chunk: int) -> None:
    keys = keyring(suite)
    pt = os.urandom(4 * S + 99)
    one_shot = encrypt(pt, keys, suite=suite, segment_size=S)
    enc = Encryptor(keys, suite=suite, segment_size=S)
    parts = [enc.update(pt[i : i + chunk]) for i in range(0, len(pt), chunk)]
    parts.append(enc.finalize())
    assert b"".join(parts) == one_shot
    # memory stays within a segment: nothing is held back beyond one segment's plaintext
    assert all(len(p) <= max(chunk, S) + 2 * (S + TAG_SIZE) for p in parts)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("chunk", [1, 5, 17, S + TAG_SIZE, S + TAG_SIZE + 1, 10_000])
def test_chunked_reader(suite: Suite, chunk: int) -> None:
    keys = keyring(suite)
    pt = os.urandom(3 * S + 1)
    ct = encrypt(pt, keys, suite=suite, segment_size=S)
    dec = Decryptor(keys)
    out = [dec.update(ct[i : i + chunk]) for i in range(0, len(ct), chunk)]
    out.append(dec.finalize())
    assert b"".join(out) == pt
    assert dec.header is not None and dec.header.envelope.key_version == 1


def test_writer_emits_header_first_and_holds_a_full_last_segment() -> None:
    keys = keyring()
    enc = Encryptor(keys, segment_size=S)
    first = enc.update(b"x" * S)
    assert first == enc.header.encode()  # the full segment may be the last: held back
    assert len(enc.update(b"y")) == S + TAG_SIZE
    assert len(enc.finalize()) == 1 + TAG_SIZE
    with pytest.raises(ValueError):
        enc.update(b"z")


@pytest.mark.parametrize("view", [False, True])
def test_writer_copies_input_the_caller_may_reuse(*, view: bool) -> None:
    keys = keyring()
    pt = os.urandom(2 * S + 10)
    enc = Encryptor(keys, segment_size=S)
    parts = []
    for i in range(0, len(pt), S + 5):
        scratch = bytearray(pt[i : i + S + 5])
        parts.append(enc.update(memoryview(scratch) if view else scratch))
        scratch[:] = b"\xff" * len(scratch)  # the caller reuses its buffer
    parts.append(enc.finalize())
    assert decrypt(b"".join(parts), keys) == pt


def test_reader_never_yields_an_unverified_segment() -> None:
    keys = keyring()
    pt = os.urandom(3 * S)
    ct = bytearray(encrypt(pt, keys, segment_size=S))
    h = parse_header(bytes(ct))
    ct[h.length + (S + TAG_SIZE) + 10] ^= 1  # inside segment 1
    dec = Decryptor(keys)
    got = bytearray()
    with pytest.raises(IntegrityError, match="segment 1"):
        for i in range(len(ct)):
            got += dec.update(ct[i : i + 1])
    assert bytes(got) == pt[:S]  # segment 0 only, released once its tag verified


def test_whole_single_segment_released_only_at_finalize() -> None:
    keys = keyring()
    ct = encrypt(b"hello", keys, segment_size=S)
    dec = Decryptor(keys)
    assert all(dec.update(ct[i : i + 1]) == b"" for i in range(len(ct)))
    assert dec.finalize() == b"hello"


async def test_async_streams_round_trip_and_detect_truncation() -> None:
    keys = keyring(Suite.SM4_GCM)
    pt = os.urandom(2 * S + 3)

    async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    ct = b"".join(
        [
            c
            async for c in encrypt_stream(
                chunks(pt, 1000), keys, suite=Suite.SM4_GCM, segment_size=S
            )
        ]
    )
    assert decrypt(ct, keys) == pt
    assert b"".join([c async for c in decrypt_stream(chunks(ct, 333), keys)]) == pt
    with pytest.raises(IntegrityError, match="truncated"):
        async for _ in decrypt_stream(chunks(ct[: -(3 + TAG_SIZE)], 333), keys):
            pass


def test_segment_size_bounds() -> None:
    keys = keyring()
    for bad in (0, S - 1, 8 * 1024 * 1024 + 1):
        with pytest.raises(ValueError, match="segment size"):
            Encryptor(keys, segment_size=bad)
    Encryptor(keys, segment_size=8 * 1024 * 1024)
    Encryptor(keys, segment_size=16, allow_small_segments=True)


# --- header and lengths -----------------------------------------------------------------


def test_header_parse_encode_and_length_from_prefix() -> None:
    keys = keyring(key_id="kms:arn/中文-key")
    ct = encrypt(b"abc", keys, segment_size=S)
    h = parse_header(ct)
    assert h.encode() == ct[: h.length]
    assert header_length(ct[:HEADER_PREFIX_LENGTH]) == h.length
    assert h.envelope.key_id == "kms:arn/中文-key"
    assert KeyEnvelope.decode(h.envelope.encode()) == h.envelope
    with pytest.raises(IntegrityError, match="truncated"):
        header_length(ct[: HEADER_PREFIX_LENGTH - 1])
    with pytest.raises(IntegrityError, match="truncated"):
        parse_header(ct[: h.length - 1])


def test_is_encrypted() -> None:
    keys = keyring()
    assert is_encrypted(encrypt(b"", keys)[:8])
    assert is_encrypted(encrypt(b"", keyring(Suite.SM4_GCM), suite=Suite.SM4_GCM)[:5])
    assert not is_encrypted(b"\0" * 128 + b"DICM")  # a plain DICOM Part 10 file
    assert not is_encrypted(b"IGE")  # too short to tell
    assert not is_encrypted(b"IGE\x02\x01")  # unknown format version
    assert not is_encrypted(b"IGE\x01\x09")  # unknown suite
    with pytest.raises(IntegrityError, match="magic"):
        decrypt(b"\0" * 128 + b"DICM" + b"\0" * 100, keys)


def test_length_functions_are_inverse_and_refuse_impossible_sizes() -> None:
    hl, seg = 94, 16
    valid = {ciphertext_length(n, header_length=hl, segment_size=seg): n for n in range(200)}
    assert len(valid) == 200
    for size in range(hl, max(valid) + 1):
        if size in valid:
            assert plaintext_length(size, header_length=hl, segment_size=seg) == valid[size]
        else:
            with pytest.raises(IntegrityError):
                plaintext_length(size, header_length=hl, segment_size=seg)
    with pytest.raises(IntegrityError):
        plaintext_length(hl + TAG_SIZE - 1, header_length=hl, segment_size=seg)


# --- ranged reads -----------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 32, 33, 150])
def test_every_range_equals_the_plaintext_slice(suite: Suite, size: int) -> None:
    keys = keyring(suite)
    pt = os.urandom(size)
    ct = small(pt, keys)
    h = parse_header(ct)
    cipher = SegmentCipher.for_header(h, keys)
    for start in range(size + 2):
        for end in range(start, size + 3):
            plan = ciphertext_range(
                header_length=h.length, segment_size=16, object_size=len(ct), start=start, end=end
            )
            want = pt[start:end]
            assert plan.length == len(want) and plan.plaintext_length == size
            if want:  # only the segments the range touches are fetched
                assert plan.segment_count == (min(end, size) - 1) // 16 - start // 16 + 1
                assert plan.end - plan.start <= plan.segment_count * (16 + TAG_SIZE)
            assert cipher.decrypt_range(plan, ct[plan.start : plan.end]) == want


@pytest.mark.parametrize("suite", SUITES)
def test_ranges_at_default_segment_boundaries(suite: Suite) -> None:
    keys = keyring(suite)
    seg = DEFAULT_SEGMENT_SIZE
    pt = os.urandom(3 * seg + 100)
    ct = encrypt(pt, keys, suite=suite)
    h = parse_header(ct)
    points = sorted(
        {0, 1, len(pt) - 1, len(pt)} | {k * seg + d for k in (1, 2, 3) for d in (-1, 0, 1)}
    )
    for start in points:
        for end in points:
            if end < start:
                continue
            plan = ciphertext_range(
                header_length=h.length, segment_size=seg, object_size=len(ct), start=start, end=end
            )
            assert decrypt_range(h, keys, plan, ct[plan.start : plan.end]) == pt[start:end]


def test_ranged_read_detects_truncated_end_and_short_fetch() -> None:
    keys = keyring()
    pt = os.urandom(100)
    ct = small(pt, keys)
    h = parse_header(ct)
    cut = ct[: -(100 - 96 + TAG_SIZE)]  # drop the whole final segment: a valid-looking size
    plan = ciphertext_range(
        header_length=h.length, segment_size=16, object_size=len(cut), start=90, end=96
    )
    with pytest.raises(IntegrityError, match="segment 5"):
        decrypt_range(h, keys, plan, cut[plan.start : plan.end])
    plan = ciphertext_range(
        header_length=h.length, segment_size=16, object_size=len(ct), start=0, end=40
    )
    with pytest.raises(IntegrityError, match="ranged read returned"):
        decrypt_range(h, keys, plan, ct[plan.start : plan.end - 1])
    with pytest.raises(IntegrityError, match="not a valid size"):
        ciphertext_range(
            header_length=h.length, segment_size=16, object_size=len(ct) - 5, start=0, end=1
        )
    with pytest.raises(ValueError):
        ciphertext_range(
            header_length=h.length, segment_size=16, object_size=len(ct), start=5, end=4
        )


# --- tampering --------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_every_header_byte_flip_is_refused(suite: Suite) -> None:
    keys = keyring(suite)
    pt = os.urandom(3 * 16 + 5)
    ct = small(pt, keys)
    n = parse_header(ct).length
    for i in range(n):
        for mask in (0x01, 0x80):
            bad = bytearray(ct)
            bad[i] ^= mask
            with pytest.raises((IntegrityError, KeyNotFound)):
                decrypt(bytes(bad), keys)


@pytest.mark.parametrize("suite", SUITES)
def test_fixed_part_flip_is_refused_with_a_separate_envelope(suite: Suite) -> None:
    keys = keyring(suite)
    ct = small(os.urandom(40), keys)
    env = parse_header(ct).envelope
    for i in range(16):
        bad = bytearray(ct)
        bad[i] ^= 0x04
        with pytest.raises(IntegrityError):
            decrypt(bytes(bad), keys, envelope=env)


@pytest.mark.parametrize("suite", SUITES)
def test_ciphertext_byte_flips_are_refused(suite: Suite) -> None:
    keys = keyring(suite)
    ct = encrypt(os.urandom(3 * S + 50), keys, suite=suite, segment_size=S)
    n = parse_header(ct).length
    rng = random.Random(1234)
    step = S + TAG_SIZE
    edges = {n + k * step + d for k in range(4) for d in (-1, 0, 1, step - TAG_SIZE, step - 1)}
    positions = sorted(
        {p for p in edges if n <= p < len(ct)}
        | {rng.randrange(n, len(ct)) for _ in range(150)}
        | {len(ct) - 1}
    )
    for p in positions:
        bad = bytearray(ct)
        bad[p] ^= 1 << rng.randrange(8)
        with pytest.raises(IntegrityError):
            decrypt(bytes(bad), keys)


@pytest.mark.parametrize("suite", SUITES)
def test_truncation_anywhere_is_refused(suite: Suite) -> None:
    keys = keyring(suite)
    ct = small(os.urandom(4 * 16 + 7), keys)
    for cut in range(len(ct)):  # every segment boundary, every mid-segment point, the header
        with pytest.raises(IntegrityError):
            decrypt(ct[:cut], keys)


def test_truncation_at_a_boundary_is_named() -> None:
    keys = keyring()
    ct = encrypt(os.urandom(3 * S), keys, segment_size=S)
    with pytest.raises(IntegrityError, match="truncated: it ends after segment 1"):
        decrypt(ct[: -(S + TAG_SIZE)], keys)


@pytest.mark.parametrize("suite", SUITES)
def test_reordered_dropped_or_duplicated_segments_are_refused(suite: Suite) -> None:
    keys = keyring(suite)
    ct = small(os.urandom(4 * 16 + 3), keys)
    head = ct[: parse_header(ct).length]
    segs = segments_of(ct, 16)
    variants = [
        [segs[1], segs[0], *segs[2:]],  # swap two
        [segs[0], segs[2], segs[1], *segs[3:]],
        [*segs[:2], segs[3], segs[2], segs[4]],
        [segs[0], *segs[2:]],  # drop a middle one
        [segs[0], segs[0], *segs[1:]],  # duplicate
        segs[:-1],  # drop the final one
    ]
    for v in variants:
        with pytest.raises(IntegrityError):
            decrypt(head + b"".join(v), keys)


@pytest.mark.parametrize("suite", SUITES)
def test_segment_spliced_from_another_object_is_refused(suite: Suite) -> None:
    keys = keyring(suite)
    a_pt, b_pt = os.urandom(3 * 16), os.urandom(3 * 16)
    a, b = small(a_pt, keys), small(b_pt, keys)
    a_head, b_head = a[: parse_header(a).length], b[: parse_header(b).length]
    a_segs, b_segs = segments_of(a, 16), segments_of(b, 16)
    for i in range(3):
        spliced = [*a_segs[:i], b_segs[i], *a_segs[i + 1 :]]
        with pytest.raises(IntegrityError, match=f"segment {i}"):
            decrypt(a_head + b"".join(spliced), keys)
    with pytest.raises(IntegrityError, match="segment 0"):  # B's header on A's body
        decrypt(b_head + b"".join(a_segs), keys)
    with pytest.raises(IntegrityError, match="did not authenticate"):  # B's envelope for A
        decrypt(a, keys, envelope=parse_header(b).envelope)


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("extra", [b"\0", b"x" * TAG_SIZE, b"y" * (16 + TAG_SIZE), b"z" * 1000])
def test_data_after_the_final_segment_is_refused(suite: Suite, extra: bytes) -> None:
    keys = keyring(suite)
    for size in (0, 16, 40):
        ct = small(os.urandom(size), keys)
        with pytest.raises(IntegrityError):
            decrypt(ct + extra, keys)
        with pytest.raises(IntegrityError):
            decrypt(ct + segments_of(ct, 16)[-1], keys)  # the final segment again


# --- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_wrong_kek_is_refused_naming_the_key(suite: Suite) -> None:
    marker = b"PATIENT-NAME^SECRET"
    ct = encrypt(marker * 10, keyring(suite), suite=suite, segment_size=S)
    with pytest.raises(
        IntegrityError, match=rf"key '{KEY_ID}' version 1 did not authenticate"
    ) as exc:
        decrypt(ct, keyring(suite))
    assert "PATIENT" not in str(exc.value)


def test_missing_version_or_key_id_is_named() -> None:
    v1, v2 = os.urandom(32), os.urandom(32)
    ct = encrypt(b"data", keyring(keys={1: v1}))
    with pytest.raises(
        KeyNotFound, match=rf"key '{KEY_ID}' version 1 is not in the keyring"
    ) as exc:
        decrypt(ct, keyring(keys={2: v2}))
    assert (exc.value.key_id, exc.value.version) == (KEY_ID, 1)
    with pytest.raises(KeyNotFound, match=rf"key '{KEY_ID}' version 1"):
        decrypt(ct, keyring(keys={1: v1}, key_id="kek-440000"))


def test_edited_key_version_is_refused_even_if_that_version_is_held() -> None:
    keys = keyring(keys={1: os.urandom(32), 2: os.urandom(32)}, current=1)
    ct = bytearray(encrypt(b"data", keys))
    h = parse_header(bytes(ct))
    pos = HEADER_PREFIX_LENGTH + 1 + len(KEY_ID) + 3  # last byte of the u32 version
    assert ct[pos] == 1
    ct[pos] = 2
    assert parse_header(bytes(ct)).envelope.key_version == 2 != h.envelope.key_version
    with pytest.raises(IntegrityError, match="version 2 did not authenticate"):
        decrypt(bytes(ct), keys)


@pytest.mark.parametrize("suite", SUITES)
def test_rewrap_changes_only_the_envelope(suite: Suite) -> None:
    k1, k2 = os.urandom(suite.key_size), os.urandom(suite.key_size)
    old = keyring(suite, keys={1: k1})
    pt = os.urandom(2 * 16 + 9)
    ct = small(pt, old)
    h = parse_header(ct)
    rotated = keyring(suite, keys={1: k1, 2: k2})
    new_env = rewrap(h.envelope, h.fixed, rotated)
    assert (new_env.key_id, new_env.key_version) == (KEY_ID, 2)
    assert new_env.wrapped_dek != h.envelope.wrapped_dek
    only_new = keyring(suite, keys={2: k2})  # version 1 deleted after the rewrap
    # 1) envelope kept apart: the object itself is untouched
    assert decrypt(ct, only_new, envelope=new_env) == pt
    with pytest.raises(KeyNotFound, match="version 1"):
        decrypt(ct, only_new)
    # 2) header rewritten: same segments, same fixed part, new envelope
    rewritten = Header(fixed=h.fixed, envelope=new_env).encode() + body_of(ct)
    assert body_of(rewritten) == body_of(ct)
    assert decrypt(rewritten, only_new) == pt
    # ranged reads with either form
    plan = ciphertext_range(
        header_length=len(rewritten) - len(body_of(ct)),
        segment_size=16,
        object_size=len(rewritten),
        start=10,
        end=30,
    )
    assert (
        decrypt_range(parse_header(rewritten), only_new, plan, rewritten[plan.start : plan.end])
        == pt[10:30]
    )
    # 3) to another provider (e.g. moving to a KMS)
    other = keyring(suite, key_id="kms-key")
    moved = rewrap(new_env, h.fixed, only_new, to=other)
    assert moved.key_id == "kms-key" and decrypt(ct, other, envelope=moved) == pt
    # the rewrapped envelope is bound to this object's fixed part
    other_fixed = parse_header(small(b"x", old)).fixed
    with pytest.raises(IntegrityError):
        rewrap(h.envelope, other_fixed, rotated)


class _RotatingMidWrap:
    """A provider whose current version changes between current() and wrap()."""

    def __init__(self, inner: Keyring, flips: int) -> None:
        self.inner, self.flips, self.calls = inner, flips, 0

    def current(self) -> tuple[str, int]:
        return self.inner.key_id, 1 if self.calls < self.flips else 2

    def wrap(self, dek: bytes, aad: bytes) -> tuple[str, int, bytes]:
        self.calls += 1
        return self.inner.wrap(dek, aad)

    def unwrap(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
        return self.inner.unwrap(key_id, version, wrapped, aad)


def test_wrap_retries_when_rotation_races() -> None:
    inner = keyring(keys={1: os.urandom(32), 2: os.urandom(32)}, current=2)
    provider = _RotatingMidWrap(inner, flips=1)
    ct = encrypt(b"data", provider)
    assert parse_header(ct).envelope.key_version == 2 and provider.calls == 2
    assert decrypt(ct, inner) == b"data"
    with pytest.raises(IntegrityError, match="kept changing"):
        encrypt(b"data", _RotatingMidWrap(inner, flips=10))
