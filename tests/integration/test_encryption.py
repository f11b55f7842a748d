"""Encryption at rest on real stores (SeaweedFS S3, local directory): reads, sync, rewrap, seal."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.dicom.synthetic import SyntheticInstance, corrupt_samples, generate_instances
from imaging_gateway.errors import IntegrityError, KeyNotFound
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import Settings, StoreSettings, load_settings
from imaging_gateway.storage.base import ListPage, ObjectInfo, ObjectStore, RangeRead
from imaging_gateway.storage.encrypted import (
    HEADER_ALLOWANCE,
    MAX_SIDECAR,
    RESERVED_PREFIX,
    SEAL_PREFIX,
    EncryptedStore,
)
from imaging_gateway.storage.factory import open_store
from imaging_gateway.storage.maintenance import rewrap_store, seal_store
from imaging_gateway.sync.runner import SyncRunner
from tests.support.indexdump import dump_index
from tests.support.seaweed import SeaweedServer

KINDS = ["fs", pytest.param("s3", marks=pytest.mark.seaweedfs)]
SEGMENT = 4096


@dataclass
class CountingStore:
    """A real adapter with every read it serves counted (calls and bytes)."""

    inner: ObjectStore
    name: str = ""
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    streams: list[tuple[str, int]] = field(default_factory=list)
    bytes_read: int = 0

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def reset(self) -> None:
        self.ranges.clear()
        self.streams.clear()
        self.bytes_read = 0

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        return await self.inner.list_page(start_after=start_after, limit=limit)

    async def stat(self, key: str) -> ObjectInfo:
        return await self.inner.stat(key)

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        self.ranges.append((key, offset, length))
        read = await self.inner.read_range(key, offset, length)
        self.bytes_read += len(read.data)
        return read

    async def read_stream(self, key: str, *, offset: int = 0, chunk_size: int = 1 << 20,
                          if_match: str | None = None) -> AsyncIterator[bytes]:
        self.streams.append((key, offset))
        async for chunk in self.inner.read_stream(key, offset=offset, chunk_size=chunk_size,
                                                  if_match=if_match):
            self.bytes_read += len(chunk)
            yield chunk

    async def write_stream(self, key: str, chunks: Any, *,
                           content_type: str = "application/dicom") -> ObjectInfo:
        return await self.inner.write_stream(key, chunks, content_type=content_type)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(scope="session")
def enc_bucket(seaweedfs: SeaweedServer) -> str:
    return seaweedfs.make_bucket(f"enc-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=KINDS)
def raw_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """A fresh store: a directory, or a prefix of a SeaweedFS bucket."""
    if request.param == "fs":
        (tmp_path / "store").mkdir()
        return StoreSettings(name="bj", kind="fs", path=tmp_path / "store")
    weed: SeaweedServer = request.getfixturevalue("seaweedfs")
    return StoreSettings(
        name="bj", kind="s3", bucket=request.getfixturevalue("enc_bucket"),
        prefix=f"t-{uuid.uuid4().hex[:10]}/", endpoint=weed.endpoint,
        access_key=weed.access_key, secret_key=weed.secret_key, retries=2, timeout_s=10.0,
    )


@pytest.fixture
async def raw(raw_settings: StoreSettings) -> AsyncIterator[CountingStore]:
    store = CountingStore(open_store(raw_settings))
    yield store
    await store.close()


@pytest.fixture
def ring(tmp_path: Path) -> FileKeyring:
    return FileKeyring.create(tmp_path / "keys" / "keyring.json", setting="t", key_id="bj")


def encrypted(raw: ObjectStore, ring: FileKeyring, **kw: Any) -> EncryptedStore:
    return EncryptedStore(raw, ring, encrypt_writes=True, segment_size=SEGMENT, **kw)


async def one(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(store: ObjectStore, key: str, **kw: Any) -> bytes:
    return b"".join([c async for c in store.read_stream(key, **kw)])


async def raw_objects(store: ObjectStore) -> dict[str, bytes]:
    """Every object of the bare store, reserved keys included, as the bucket holds it."""
    out: dict[str, bytes] = {}
    after: str | None = None
    while True:
        page = await store.list_page(start_after=after, limit=1000)
        for o in page.objects:
            out[o.key] = await read_all(store, o.key)
        if not page.is_truncated or not page.objects:
            return out
        after = page.objects[-1].key


def phi_of(instances: list[SyntheticInstance]) -> set[bytes]:
    """Identifying strings of the corpus in the encodings its objects use."""
    out: set[bytes] = set()
    for i in instances:
        out.add(i.national_id.encode())
        out.add(i.patient_id.encode())
        for group in i.patient_name.split("="):
            if len(group) >= 4:
                for codec in ("utf-8", "gb18030"):
                    out.add(group.encode(codec))
    return {p for p in out if len(p) >= 4}


def corpus(seed: int = 5, patients: int = 3) -> list[SyntheticInstance]:
    return list(generate_instances(seed=seed, patients=patients, studies_per_patient=1,
                                   pixel_mode="small", instances_per_series=2))


# ---------------------------------------------------------------------------
# Reads


async def test_plain_objects_read_through_with_no_extra_request(
    raw: CountingStore, ring: FileKeyring
) -> None:
    data = os.urandom(200_000)
    written = await raw.write_stream("plain/a.dcm", one(data))
    store = encrypted(raw, ring)
    raw.reset()
    got = await store.read_range("plain/a.dcm", 0, 65536)
    assert (got.data, got.total_size, got.etag) == (data[:65536], len(data), written.etag)
    assert len(raw.ranges) == 1 and not raw.streams  # one ranged GET, as without encryption
    raw.reset()
    assert (await store.read_range("plain/a.dcm", 150_000, 10)).data == data[150_000:150_010]
    assert len(raw.ranges) == 1  # the layout (plain) was cached with its ETag
    assert await read_all(store, "plain/a.dcm") == data
    assert await read_all(store, "plain/a.dcm", offset=12345) == data[12345:]
    assert (await store.stat("plain/a.dcm")).size == len(data)


@pytest.mark.parametrize("suite", list(Suite))
async def test_ranged_reads_and_streams_equal_plaintext_slices(
    raw: CountingStore, tmp_path: Path, suite: Suite
) -> None:
    ring = FileKeyring.create(tmp_path / "sk.json", setting="t", key_id="bj", suite=suite)
    n = 10 * SEGMENT + 123
    data = os.urandom(n)
    info = await EncryptedStore(raw, ring, encrypt_writes=True, suite=suite,
                                segment_size=SEGMENT).write_stream("r.dcm", one(data, 5000))
    assert info.size == n
    stored = await raw.stat("r.dcm")
    assert stored.size > n and stored.etag == info.etag
    assert data[:64] not in (await raw.read_range("r.dcm", 0, n + 1000)).data

    rng = random.Random(7)
    edges = [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT, n - 1, n, n + 5]
    offsets = edges + [rng.randrange(n) for _ in range(25)]
    lengths = [0, 1, 100, SEGMENT, SEGMENT + 1, 3 * SEGMENT, n]
    store = EncryptedStore(raw, ring, encrypt_writes=True, segment_size=SEGMENT)
    for offset in offsets:
        for length in lengths:
            got = await store.read_range("r.dcm", offset, length)
            assert got.data == data[offset : offset + length], (offset, length)
            assert (got.total_size, got.etag) == (n, info.etag)
    for offset in edges[:-1] + offsets[-5:]:
        fresh = EncryptedStore(raw, ring, encrypt_writes=False)  # no cached header
        assert await read_all(fresh, "r.dcm", offset=offset, chunk_size=3000) == data[offset:]
    assert await read_all(store, "r.dcm", offset=n + 10) == b""

    # Sync's header read of a fresh store: one ranged GET for header and segments.
    fresh = EncryptedStore(raw, ring, encrypt_writes=False)
    raw.reset()
    got = await fresh.read_range("r.dcm", 0, 2 * SEGMENT)
    assert got.data == data[: 2 * SEGMENT] and len(raw.ranges) == 1
    assert raw.ranges[0][2] <= HEADER_ALLOWANCE + 2 * (SEGMENT + 16)
    raw.reset()
    assert (await fresh.read_range("r.dcm", 5 * SEGMENT, 10)).data == data[5 * SEGMENT :][:10]
    assert len(raw.ranges) == 1  # the header was cached with the object's ETag
    assert (await fresh.stat("r.dcm")).size == n


# ---------------------------------------------------------------------------
# Sync


def sync_settings(tmp_path: Path, name: str, store: Path) -> Settings:
    d = tmp_path / name
    d.mkdir()
    (d / "gateway.toml").write_text(f"""
[gateway]
data_dir = "data"
[index]
url = "sqlite:///{d / "index.sqlite3"}"
[sync]
page_size = 5
[[stores]]
name = "bj"
kind = "fs"
path = "{store}"
""", encoding="utf-8")
    return load_settings(d / "gateway.toml", environ={})


async def run_sync(settings: Settings, store: ObjectStore, **kw: Any) -> tuple[dict[str, int],
                                                                              dict[str, Any]]:
    index = await SqlIndex.open(settings.index)
    try:
        runner = SyncRunner(settings, index, store)
        await runner.start(**kw)
        job = await runner.run()
        assert job.status == "succeeded"
        return job.counters, await dump_index(index)
    finally:
        await index.close()


def without_etags(dump: dict[str, Any]) -> dict[str, Any]:
    """Instances and quarantine rows without their ETags (the stored bytes differ)."""
    out = dict(dump)
    out["instances"] = sorted(r[:2] + r[3:] for r in dump["instances"])
    out["quarantine"] = sorted(r[:2] + r[3:] for r in dump["quarantine"])
    return out


async def test_sync_over_an_encrypted_store_gives_the_plain_index(
    tmp_path: Path, ring: FileKeyring, raw: CountingStore
) -> None:
    """The plain corpus in a directory; the same corpus encrypted in the store under test."""
    objs = {i.key: i.data for i in corpus()}
    objs.update({key: data for key, data, _ in corrupt_samples()})
    plain_root, enc_root = tmp_path / "plain", tmp_path / "unused"  # runner gets the store
    plain = open_store(StoreSettings(name="bj", kind="fs", path=plain_root))
    enc = encrypted(raw, ring)
    for key, data in objs.items():
        await plain.write_stream(key, one(data))
        await enc.write_stream(key, one(data))
    # Plain objects a hospital put beside the encrypted ones are read too.
    await enc.inner.write_stream("upload/plain.dcm", one(corpus(seed=9, patients=1)[0].data))
    await plain.write_stream("upload/plain.dcm", one(corpus(seed=9, patients=1)[0].data))

    c_plain, d_plain = await run_sync(sync_settings(tmp_path, "p", plain_root), plain)
    c_enc, d_enc = await run_sync(sync_settings(tmp_path, "e", enc_root), enc)
    assert without_etags(d_enc) == without_etags(d_plain)  # same sizes, headers, reasons
    assert {r[3] for r in d_enc["instances"]} == {r[3] for r in d_plain["instances"]}
    for name in ("listed", "indexed", "quarantined"):
        assert c_enc[name] == c_plain[name]

    # Incremental: nothing changed, nothing read (listed sizes are stored sizes; the
    # index compares ETags).
    settings = load_settings(tmp_path / "e" / "gateway.toml", environ={})
    again, d_again = await run_sync(settings, enc)
    assert (again["unchanged"], again["indexed"], again["bytes_read"]) == (len(objs) + 1, 0, 0)
    assert d_again == d_enc


async def test_integrity_failures_are_quarantined_with_the_reason(
    tmp_path: Path, ring: FileKeyring
) -> None:
    root = tmp_path / "enc"
    enc = encrypted(open_store(StoreSettings(name="bj", kind="fs", path=root)), ring)
    instances = corpus(seed=8, patients=2)
    for i in instances:
        await enc.write_stream(i.key, one(i.data))
    # Objects of one segment (~2 KiB): sync's header read covers them whole, so their
    # end is verified too. (A larger object cut at a segment boundary passes a 64 KiB
    # header read; its retrieval fails at the end, see test_wado_service.)
    tampered, truncated, miskeyed, unknown = (i.key for i in instances[:4])
    body = (root / tampered).read_bytes()
    pos = len(body) // 2
    (root / tampered).write_bytes(body[:pos] + bytes([body[pos] ^ 1]) + body[pos + 1 :])
    (root / truncated).write_bytes((root / truncated).read_bytes()[:-100])
    impostor = FileKeyring.create(tmp_path / "other.json", setting="t", key_id="bj")
    stranger = FileKeyring.create(tmp_path / "stranger.json", setting="t", key_id="elsewhere")
    for key, keys in ((miskeyed, impostor), (unknown, stranger)):
        data = next(i.data for i in instances if i.key == key)
        await encrypted(enc.inner, keys).write_stream(key, one(data))

    _, dump = await run_sync(sync_settings(tmp_path, "s", root), enc)
    reasons = {key: reason for _, key, _, reason in dump["quarantine"]}
    assert set(reasons) == {tampered, truncated, miskeyed, unknown}
    for key, reason in reasons.items():
        assert reason.startswith("integrity: "), reason
        assert f"store 'bj': object {key!r}" in reason
    assert "did not authenticate" in reasons[tampered]
    assert "key 'elsewhere' version 1 is not in the keyring" in reasons[unknown]
    assert len(dump["instances"]) == len(instances) - 4
    for i in instances:
        assert all(i.national_id not in r for r in reasons.values())

    # Reads refuse them before any unverified byte.
    for key in (tampered, truncated, miskeyed):
        got = bytearray()
        with pytest.raises(IntegrityError, match="store 'bj': object"):
            async for chunk in enc.read_stream(key, chunk_size=SEGMENT):
                got += chunk
        original = next(i.data for i in instances if i.key == key)
        assert original.startswith(bytes(got)) and len(got) < len(original)
    with pytest.raises(KeyNotFound, match="store 'bj': object"):
        await enc.read_range(unknown, 0, 100)


# ---------------------------------------------------------------------------
# No PHI in the bucket


async def test_no_phi_in_the_bucket_after_seal(raw: CountingStore, ring: FileKeyring) -> None:
    instances = corpus(seed=12, patients=4)
    for i in instances:
        await raw.write_stream(i.key, one(i.data))
    secrets = phi_of(instances)
    before = b"".join((await raw_objects(raw)).values())
    assert all(s in before for s in {i.national_id.encode() for i in instances})

    store = encrypted(raw, ring)
    tally = await seal_store(store, concurrency=3)
    assert tally.counters.get("sealed") == len(instances), tally.counters
    after = await raw_objects(raw)
    assert not [k for k in after if k.startswith(RESERVED_PREFIX)]  # staging removed
    blob = b"".join(after.values())
    leaked = [s for s in secrets if s in blob]
    assert not leaked, f"{len(leaked)} identifying strings in the sealed bucket"
    for i in instances:
        assert (await store.layout(i.key)).header is not None
        assert await read_all(store, i.key) == i.data
    again = await seal_store(store)
    assert again.counters.get("encrypted") == len(instances) and "sealed" not in again.counters


# ---------------------------------------------------------------------------
# Rewrap and retire


async def test_rewrap_reads_headers_only_then_retire(raw: CountingStore, ring: FileKeyring) -> None:
    datas = {f"k/{n}.dcm": os.urandom(200_000 + n) for n in range(6)}
    store = encrypted(raw, ring)
    for key, data in datas.items():
        await store.write_stream(key, one(data))
    await raw.write_stream("k/plain.dcm", one(b"plain object"))
    for step in (2, 3):
        assert ring.rotate() == step
        raw.reset()
        tally = await rewrap_store(encrypted(raw, ring), concurrency=4)
        assert tally.counters["rewrapped"] == len(datas) and tally.counters["plain"] == 1
        assert not raw.streams, "rewrap must not stream any object"
        assert all(length <= max(HEADER_ALLOWANCE, MAX_SIDECAR) for _, _, length in raw.ranges)
        assert raw.bytes_read < (len(datas) + 1) * 1024, raw.bytes_read
        again = await rewrap_store(encrypted(raw, ring))
        assert again.counters["done"] == len(datas)  # a re-run resumes: nothing to do
        status = await encrypted(raw, ring).read_status()
        assert status is not None and status["version"] == step and status["complete"] is True
        ring.retire(step - 1)
        reader = encrypted(raw, ring)
        for key, data in datas.items():
            assert await read_all(reader, key) == data
            assert (await reader.read_range(key, 100_000, 50)).data == data[100_000:100_050]
    assert ring.versions == (3,)
    # New writes use the current version: no sidecar needed.
    await store.write_stream("k/new.dcm", one(b"new" * 5000))
    assert (await rewrap_store(encrypted(raw, ring))).counters["current"] == 1


# ---------------------------------------------------------------------------
# Seal killed and resumed


class Killed(Exception):
    pass


def kill_at(step: str, *, after: int) -> Any:
    seen = {"n": 0}

    def fault(name: str) -> None:
        if name == step:
            seen["n"] += 1
            if seen["n"] > after:
                raise Killed(step)

    return fault


@pytest.mark.parametrize("step", ["staged", "verified", "replaced", "checked"])
async def test_seal_killed_at_any_step_resumes_and_loses_nothing(
    raw: CountingStore, ring: FileKeyring, step: str
) -> None:
    instances = corpus(seed=13, patients=2)
    for i in instances:
        await raw.write_stream(i.key, one(i.data))
    with pytest.raises(Killed):
        await seal_store(encrypted(raw, ring), concurrency=1, fault=kill_at(step, after=1))
    reader = encrypted(raw, ring)
    for i in instances:  # every object readable, whatever its state
        assert await read_all(reader, i.key) == i.data
    if step == "replaced":
        # The worst case: the replace went wrong unnoticed (here: bytes flipped after it).
        # The verified staging copy is still there and the next run restores from it.
        stage = next(k for k in await raw_objects(raw) if k.startswith(SEAL_PREFIX))
        key = stage[len(SEAL_PREFIX) :]
        body = await read_all(raw, key)
        await raw.write_stream(key, one(body[:-1] + bytes([body[-1] ^ 1])))
        with pytest.raises(IntegrityError):
            await read_all(encrypted(raw, ring), key)
    tally = await seal_store(encrypted(raw, ring), concurrency=2)
    assert tally.counters["reconciled"] == 1  # the second object's staging copy
    after = await raw_objects(raw)
    assert not [k for k in after if k.startswith(RESERVED_PREFIX)]
    reader = encrypted(raw, ring)
    for i in instances:
        assert (await reader.layout(i.key)).header is not None, i.key
        assert await read_all(reader, i.key) == i.data

