"""The cache of answers retrieved from other provinces, on a real encrypted local store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.federation.cache import PREFIX, RetrieveCache
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.factory import open_store

BODY = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"DICM" + os.urandom(300_000)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EncryptedStore]:
    (tmp_path / "cache").mkdir()
    inner = open_store(StoreSettings(name="cache", kind="fs", path=tmp_path / "cache"))
    ring = FileKeyring.create(tmp_path / "keyring.json", setting="test", key_id="cache")
    s = EncryptedStore(inner, ring, encrypt_writes=True)
    yield s
    await s.close()


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _put(cache: RetrieveCache, key: str, body: bytes, etag: str = '"v1"') -> bool:
    fill = cache.fill(key, etag=etag, content_type="multipart/related; boundary=b",
                      length=len(body))
    assert fill is not None
    async for chunk in _chunks(body):
        await fill.put(chunk)
    return await fill.finish()


async def _read(cache: RetrieveCache, key: str) -> bytes:
    answer = await cache.lookup(key)
    assert answer is not None
    return b"".join([c async for c in cache.body(answer)])


async def test_an_entry_round_trips_encrypted_and_survives_a_restart(
        store: EncryptedStore, tmp_path: Path) -> None:
    cache = RetrieveCache(store, max_bytes=10 << 20, ttl_s=3600)
    key = cache.key("440000", "studies/1.2.3", [("a", "1")], "application/dicom")
    assert key.startswith(PREFIX + "440000/")
    assert await cache.lookup(key) is None
    assert await _put(cache, key, BODY)
    answer = await cache.lookup(key)
    assert answer is not None
    assert (answer.etag, answer.length) == ('"v1"', len(BODY))
    assert answer.content_type == "multipart/related; boundary=b"
    assert await _read(cache, key) == BODY
    # At rest: no byte of the answer, not even the DICOM magic, in the store's files.
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for path in files:
        raw = path.read_bytes()
        assert b"DICM" not in raw and BODY[-64:] not in raw and b"boundary" not in raw
    # Another representation or resource is another entry.
    assert cache.key("440000", "studies/1.2.3", [("a", "1")], "*/*") != key
    assert cache.key("310000", "studies/1.2.3", [("a", "1")], "application/dicom") != key
    # A new process finds it.
    again = RetrieveCache(store, max_bytes=10 << 20, ttl_s=3600)
    await again.load()
    assert len(again) == 1 and await _read(again, key) == BODY


async def test_entries_expire_and_the_bound_evicts_the_least_recently_used(
        store: EncryptedStore) -> None:
    clock = Clock()
    cache = RetrieveCache(store, max_bytes=3 * len(BODY) + 1000, ttl_s=60, clock=clock)
    keys = [cache.key("440000", f"studies/1.{n}", [], None) for n in range(4)]
    for key in keys[:3]:
        assert await _put(cache, key, BODY)
        clock.now += 1
    assert await cache.lookup(keys[0]) is not None  # now the most recently used
    assert await _put(cache, keys[3], BODY)
    assert cache.size <= cache.max_bytes
    assert await cache.lookup(keys[1]) is None  # the least recently used went
    assert all([await cache.lookup(k) is not None for k in (keys[0], keys[2], keys[3])])
    clock.now += 61
    assert await cache.lookup(keys[0]) is None
    assert not (await store.list_page()).objects or all(
        o.key != keys[0] for o in (await store.list_page()).objects)
    # Too large to hold: not even tried.
    assert cache.fill(keys[0], etag='"x"', content_type="x", length=cache.max_bytes) is None


async def test_a_broken_copy_leaves_no_entry(store: EncryptedStore) -> None:
    cache = RetrieveCache(store, max_bytes=10 << 20, ttl_s=3600)
    key = cache.key("440000", "studies/9", [], None)
    fill = cache.fill(key, etag='"v1"', content_type="x", length=len(BODY))
    assert fill is not None
    await fill.put(BODY[:70000])
    await fill.abort()
    short = cache.fill(key, etag='"v1"', content_type="x", length=len(BODY))
    assert short is not None
    await short.put(BODY[:-1])  # the peer's answer ended one byte early
    assert not await short.finish()
    await asyncio.sleep(0)
    assert await cache.lookup(key) is None
    assert [o.key for o in (await store.list_page()).objects] == []


async def test_a_tampered_entry_is_a_miss_not_garbage(store: EncryptedStore, tmp_path: Path
                                                      ) -> None:
    cache = RetrieveCache(store, max_bytes=10 << 20, ttl_s=3600)
    key = cache.key("440000", "studies/7", [], None)
    assert await _put(cache, key, BODY)
    (path,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    raw = bytearray(path.read_bytes())
    raw[200] ^= 1  # inside the first segment, which holds the entry's head
    path.write_bytes(bytes(raw))
    assert await cache.lookup(key) is None
    assert not path.exists()
