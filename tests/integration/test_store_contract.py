"""One contract for every ObjectStore adapter: S3 and MinIO SDK on SeaweedFS, local directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway.crypto.envelope import ciphertext_length
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.errors import ObjectNotFound, StorageError, StoreUnavailable
from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.base import ObjectInfo, ObjectStore
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.factory import open_store
from imaging_gateway.storage.s3 import PART_SIZE
from tests.support.seaweed import SeaweedServer

_weed = pytest.mark.seaweedfs
ADAPTERS = [pytest.param("s3", marks=_weed), pytest.param("minio", marks=_weed), "fs"]
REMOTE = [pytest.param("s3", marks=_weed), pytest.param("minio", marks=_weed)]

MakeStore = Callable[..., ObjectStore]

# Keys that trip up quoting, XML and ordering: unicode, spaces, '+', '%', '~', a
# directory next to a sibling that sorts below '/', and DICOM-UID-like segments.
KEYS = [
    "医院/患者 1.dcm",
    "医院/患者 2.dcm",
    "医院 2/x.dcm",
    "with space/a b.dcm",
    "plus+sign.dcm",
    "percent%41.dcm",
    "tilde~.dcm",
    "1.2.840.1/1.dcm",
    "1.2.840.1.5/1.dcm",
    "a.dcm",
    "a/b/c.dcm",
    "a-b.dcm",
    "Z.dcm",
]


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def contract_buckets(seaweedfs: SeaweedServer) -> dict[str, str]:
    """One fresh bucket per remote adapter; each test works under its own key prefix in it."""
    run = uuid.uuid4().hex[:8]
    return {kind: seaweedfs.make_bucket(f"contract-{kind}-{run}") for kind in ("s3", "minio")}


def _remote_settings(
    kind: str, weed: SeaweedServer, bucket: str, prefix: str, **override: Any
) -> StoreSettings:
    values: dict[str, Any] = {
        "name": f"contract-{kind}",
        "kind": kind,
        "bucket": bucket,
        "prefix": prefix,
        "endpoint": weed.endpoint,
        "access_key": weed.access_key,
        "secret_key": weed.secret_key,
        "retries": 2,
        "timeout_s": 10.0,
        "max_connections": 16,
    }
    values.update(override)
    return StoreSettings(**values)


@pytest.fixture(params=ADAPTERS)
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., StoreSettings]:
    """Settings factory for the adapter under test: ``(prefix="") -> StoreSettings``."""
    kind: str = request.param
    if kind == "fs":
        root = tmp_path / "root"
        root.mkdir()

        def local(prefix: str = "") -> StoreSettings:
            return StoreSettings(name="contract-fs", kind="fs", path=root, prefix=prefix)

        return local
    weed: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket = request.getfixturevalue("contract_buckets")[kind]
    base = f"t-{uuid.uuid4().hex[:10]}/"

    def remote(prefix: str = "") -> StoreSettings:
        return _remote_settings(kind, weed, bucket, base + prefix)

    return remote


@pytest.fixture(params=["plain", "encrypted"])
def encryption(request: pytest.FixtureRequest, tmp_path: Path) -> FileKeyring | None:
    """Every contract test runs on the bare adapter and through ``EncryptedStore`` over it."""
    if request.param == "plain":
        return None
    return FileKeyring.create(tmp_path / "keyring.json", setting="test", key_id="contract")


@pytest.fixture
async def make_store(
    store_settings: Callable[..., StoreSettings], encryption: FileKeyring | None
) -> AsyncIterator[MakeStore]:
    """``make_store(prefix="")`` opens the adapter under test; all are closed afterwards."""
    opened: list[ObjectStore] = []

    def make(prefix: str = "") -> ObjectStore:
        store = open_store(store_settings(prefix))
        if encryption is not None:
            # 4 KiB segments: every test's objects cross segment boundaries.
            store = EncryptedStore(store, encryption, encrypt_writes=True, segment_size=4096)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
def store(make_store: MakeStore) -> ObjectStore:
    return make_store()


def kind_of(store: ObjectStore) -> str:
    """The adapter's class name (of the inner adapter of an ``EncryptedStore``)."""
    if isinstance(store, EncryptedStore):
        store = store.inner
    return type(store).__name__


def listed_size(store: ObjectStore, key: str, size: int) -> int:
    """What a listing shows for an object of ``size`` bytes written through ``store``:
    the stored size, which for an encrypted object counts its header and tags."""
    if not isinstance(store, EncryptedStore):
        return size
    layout = store.cached_layout(key)
    assert layout is not None and layout.header is not None
    return ciphertext_length(
        size, header_length=layout.header.length, segment_size=store.segment_size
    )


async def chunked(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def put(store: ObjectStore, key: str, data: bytes, size: int = 1 << 20) -> ObjectInfo:
    return await store.write_stream(key, chunked(data, size))


async def read_all(store: ObjectStore, key: str, **kw: Any) -> bytes:
    return b"".join([c async for c in store.read_stream(key, **kw)])


async def list_all(store: ObjectStore, limit: int) -> list[list[ObjectInfo]]:
    pages: list[list[ObjectInfo]] = []
    after: str | None = None
    while True:
        page = await store.list_page(start_after=after, limit=limit)
        pages.append(page.objects)
        assert len(page.objects) <= limit
        if not page.is_truncated:
            return pages
        assert page.objects, "a truncated page must not be empty"
        after = page.objects[-1].key
        assert len(pages) < 100


def seaweed_order(key: str) -> list[str]:
    """SeaweedFS lists directory by directory: keys compare by path segments."""
    return key.split("/")


# ---------------------------------------------------------------------------
# Listing


async def test_list_pages_cover_every_key_once_in_order(store: ObjectStore) -> None:
    infos = await asyncio.gather(*(put(store, k, f"body of {k}".encode()) for k in KEYS))
    written = {i.key: i for i in infos}

    whole = await store.list_page(limit=1000)
    assert not whole.is_truncated
    order = [o.key for o in whole.objects]
    assert sorted(order) == sorted(KEYS)
    for o in whole.objects:
        w = written[o.key]
        assert (o.size, o.etag) == (listed_size(store, o.key, w.size), w.etag)
        assert o.last_modified.tzinfo is not None

    for limit in (1, 2, 5, len(KEYS), len(KEYS) + 1):
        pages = await list_all(store, limit)
        assert [o.key for page in pages for o in page] == order, f"limit={limit}"
        # Exact page count: the last page says "no more" even when it is full.
        assert len(pages) == max(1, -(-len(KEYS) // limit)), f"limit={limit}"

    # start_after any listed key resumes right after it; after the last, nothing.
    for i, key in enumerate(order):
        page = await store.list_page(start_after=key, limit=1000)
        assert [o.key for o in page.objects] == order[i + 1 :]
    last = await store.list_page(start_after=order[-1], limit=3)
    assert (last.objects, last.is_truncated) == ([], False)


async def test_list_order(store: ObjectStore) -> None:
    """LocalStore (like AWS S3 and MinIO) lists in UTF-8 byte order; SeaweedFS does not.

    SeaweedFS walks its filer directory by directory, so ``1.2.840.1/1.dcm`` comes
    before ``1.2.840.1.5/1.dcm`` although '.' < '/'. Paging is still consistent
    (previous test); only the order differs. This test pins both behaviours so a
    change in either is noticed.
    """
    await asyncio.gather(*(put(store, k, b"x") for k in KEYS))
    order = [o.key for o in (await store.list_page(limit=1000)).objects]
    if kind_of(store) == "LocalStore":
        assert order == sorted(KEYS)
    else:
        assert order == sorted(KEYS, key=seaweed_order)
        assert order != sorted(KEYS)


async def test_empty_store_lists_nothing(store: ObjectStore) -> None:
    page = await store.list_page()
    assert (page.objects, page.is_truncated) == ([], False)


async def test_prefix_isolation(make_store: MakeStore) -> None:
    root = make_store()
    scoped = make_store("a/")
    for key in ("a/1.dcm", "a/sub/2.dcm", "a.dcm", "ab/3.dcm", "b/4.dcm"):
        await put(root, key, key.encode())

    assert [o.key for o in (await scoped.list_page()).objects] == ["1.dcm", "sub/2.dcm"]
    page = await scoped.list_page(start_after="1.dcm", limit=1)
    assert ([o.key for o in page.objects], page.is_truncated) == (["sub/2.dcm"], False)
    assert (await scoped.stat("sub/2.dcm")).size == len(b"a/sub/2.dcm")
    assert (await scoped.read_range("1.dcm", 0, 100)).data == b"a/1.dcm"
    with pytest.raises(ObjectNotFound):
        await scoped.stat("a/1.dcm")
    with pytest.raises(ObjectNotFound):
        await scoped.stat("a.dcm")

    await put(scoped, "new.dcm", b"new")
    assert (await root.read_range("a/new.dcm", 0, 10)).data == b"new"
    await scoped.delete("new.dcm")
    with pytest.raises(ObjectNotFound):
        await root.stat("a/new.dcm")
    assert len((await root.list_page()).objects) == 5


# ---------------------------------------------------------------------------
# Reading


async def test_stat(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(minutes=5)
    written = await put(store, "医院/患者 1.dcm", b"0123456789")
    info = await store.stat("医院/患者 1.dcm")
    assert info.key == "医院/患者 1.dcm"
    assert info.size == 10
    assert info.etag == written.etag and info.etag and '"' not in info.etag
    assert before < info.last_modified < datetime.now(UTC) + timedelta(minutes=5)


async def test_read_range(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes, every position distinct mod 256
    await put(store, "with space/r.dcm", data)
    etag = (await store.stat("with space/r.dcm")).etag

    cases = [(0, 100), (500, 100), (1000, 100), (0, 1024), (0, 5000), (1023, 1), (7, 0)]
    for offset, length in cases:
        got = await store.read_range("with space/r.dcm", offset, length)
        assert got.data == data[offset : offset + length], (offset, length)
        assert (got.offset, got.etag, got.total_size) == (offset, etag, 1024)
    for offset in (1024, 5000):  # at or past the end: empty, still with version and size
        got = await store.read_range("with space/r.dcm", offset, 10)
        assert (got.data, got.etag, got.total_size) == (b"", etag, 1024)

    # Many concurrent ranged reads share the adapter's connections.
    reads = await asyncio.gather(
        *(store.read_range("with space/r.dcm", i, 64) for i in range(0, 1024, 4))
    )
    assert all(r.data == data[r.offset : r.offset + 64] for r in reads)


async def test_missing_key(store: ObjectStore) -> None:
    await put(store, "present.dcm", b"x")
    with pytest.raises(ObjectNotFound):
        await store.stat("absent.dcm")
    with pytest.raises(ObjectNotFound):
        await store.read_range("absent.dcm", 0, 10)
    with pytest.raises(ObjectNotFound):
        await read_all(store, "absent.dcm")
    with pytest.raises(ObjectNotFound):
        await store.stat("present.dcm/below")


async def test_stream_large_object_in_bounded_chunks(store: ObjectStore) -> None:
    """~20 MB written as a multi-part stream, read back chunk by chunk with bounded memory."""
    data = os.urandom(20_000_000 + 3)
    info = await put(store, "big/study.dcm", data, size=1_000_000)
    assert info.size == len(data)
    stat = await store.stat("big/study.dcm")
    assert (stat.size, stat.etag) == (len(data), info.etag)

    chunk_size = 1 << 20
    digest = hashlib.sha256()
    sizes: list[int] = []
    tracemalloc.start()
    try:
        async for chunk in store.read_stream("big/study.dcm", chunk_size=chunk_size):
            sizes.append(len(chunk))
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.digest() == hashlib.sha256(data).digest()
    assert max(sizes) <= chunk_size and sum(sizes) == len(data)
    assert peak < 8 * chunk_size, f"peak {peak} bytes while streaming {len(data)}"

    tail = await read_all(store, "big/study.dcm", offset=len(data) - 10, chunk_size=4)
    assert tail == data[-10:]
    assert await read_all(store, "big/study.dcm", offset=len(data) + 5) == b""


# ---------------------------------------------------------------------------
# Writing and deleting


@pytest.mark.parametrize("size", [0, 1, PART_SIZE, 2 * PART_SIZE])
async def test_write_sizes_around_the_part_size(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    info = await put(store, "w.dcm", data, size=3 * 1024 * 1024 + 1)
    assert info.size == size
    assert (await store.stat("w.dcm")).etag == info.etag
    assert await read_all(store, "w.dcm") == data
    got = await store.read_range("w.dcm", 0, 16)
    assert (got.data, got.total_size) == (data[:16], size)


async def test_write_small_in_many_chunks(store: ObjectStore) -> None:
    data = b"".join(f"line {i}\n".encode() for i in range(2000))
    info = await put(store, "small.dcm", data, size=7)
    assert info.size == len(data)
    assert await read_all(store, "small.dcm", chunk_size=1000) == data


async def test_overwrite_changes_the_etag(store: ObjectStore) -> None:
    first = await put(store, "o.dcm", b"A" * 100)
    etags = {first.etag}
    for body in (b"B" * 100, b"A" * 100, b"C" * 100):  # same size each time
        info = await put(store, "o.dcm", body)
        assert (await store.stat("o.dcm")).etag == info.etag
        assert (await store.read_range("o.dcm", 0, 200)).data == body
        if body != b"A" * 100:
            assert info.etag not in etags
        etags.add(info.etag)


async def test_read_stream_if_match_pins_the_version(store: ObjectStore) -> None:
    """With the ETag the caller holds: that version, or ``StorageError`` before any byte."""
    data = os.urandom(3_000_000)
    old = await put(store, "m.dcm", data)
    assert await read_all(store, "m.dcm", if_match=old.etag, chunk_size=65536) == data
    assert await read_all(store, "m.dcm", if_match=old.etag, offset=1000) == data[1000:]
    # A stream already open keeps its version: all of it, or an error, never new bytes.
    stream = store.read_stream("m.dcm", if_match=old.etag, chunk_size=65536)
    got = bytearray(await anext(stream))
    new = await put(store, "m.dcm", data[::-1])
    assert new.etag != old.etag
    try:
        async for chunk in stream:
            got += chunk
    except StorageError:
        assert data.startswith(got)
    else:
        assert got == data
    finally:
        await stream.aclose()
    stale = store.read_stream("m.dcm", if_match=old.etag)
    with pytest.raises(StorageError) as refused:
        await anext(stale)
    assert not isinstance(refused.value, ObjectNotFound)
    await stale.aclose()
    assert await read_all(store, "m.dcm", if_match=new.etag) == data[::-1]
    with pytest.raises(ObjectNotFound):
        await read_all(store, "absent.dcm", if_match=new.etag)


async def test_delete(store: ObjectStore) -> None:
    await put(store, "d/1.dcm", b"x")
    await put(store, "d/2.dcm", b"y")
    await store.delete("d/1.dcm")
    with pytest.raises(ObjectNotFound):
        await store.stat("d/1.dcm")
    assert [o.key for o in (await store.list_page()).objects] == ["d/2.dcm"]
    await store.delete("d/1.dcm")  # again: fine
    await store.delete("never/was.dcm")
    await store.delete("d/2.dcm")
    assert (await store.list_page()).objects == []


async def test_write_of_failing_stream_leaves_nothing(store: ObjectStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * PART_SIZE
        yield b"y" * 1024
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        await store.write_stream("broken.dcm", broken())
    with pytest.raises(ObjectNotFound):
        await store.stat("broken.dcm")
    assert (await store.list_page()).objects == []


# ---------------------------------------------------------------------------
# Remote stores only: failures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", REMOTE)
async def test_unreachable_endpoint_gives_store_unavailable(kind: str) -> None:
    settings = StoreSettings(
        name=f"down-{kind}",
        kind=kind,
        bucket="nowhere",
        endpoint=f"http://127.0.0.1:{_closed_port()}",
        access_key="AKTEST",
        secret_key="very-secret-value",
        retries=2,
        timeout_s=2.0,
    )
    store = open_store(settings)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.read_range("x.dcm", 0, 10)
    finally:
        await store.close()
    message = str(caught.value)
    assert f"down-{kind}" in message and settings.endpoint in message
    assert "after 3 attempts" in message
    assert "very-secret-value" not in message and "x.dcm" not in message


@pytest.mark.parametrize("kind", REMOTE)
async def test_missing_bucket_and_bad_credentials(kind: str, seaweedfs: SeaweedServer) -> None:
    missing = open_store(_remote_settings(kind, seaweedfs, f"no-such-{uuid.uuid4().hex[:8]}", ""))
    denied = open_store(
        _remote_settings(kind, seaweedfs, "anything", "", secret_key="wrong-secret-key")
    )
    try:
        with pytest.raises(StorageError, match="does not exist") as gone:
            await missing.list_page()
        assert not isinstance(gone.value, StoreUnavailable)
        with pytest.raises(StorageError, match="access denied") as refused:
            await denied.stat("x.dcm")
        assert "wrong-secret-key" not in str(refused.value)
    finally:
        await missing.close()
        await denied.close()


@pytest.mark.parametrize("kind", REMOTE)
async def test_store_at_bucket_root(kind: str, seaweedfs: SeaweedServer) -> None:
    """No prefix: the adapter works on a whole (fresh) bucket, created by ensure_bucket."""
    settings = _remote_settings(kind, seaweedfs, f"root-{kind}-{uuid.uuid4().hex[:8]}", "")
    store = open_store(settings)
    try:
        await store.ensure_bucket()
        await store.ensure_bucket()  # already there: fine
        for key in ("b.dcm", "a/1.dcm", "c d.dcm"):
            await put(store, key, key.encode())
        page = await store.list_page(limit=2)
        assert page.is_truncated and len(page.objects) == 2
        rest = await store.list_page(start_after=page.objects[-1].key)
        keys = [o.key for o in page.objects + rest.objects]
        assert sorted(keys) == ["a/1.dcm", "b.dcm", "c d.dcm"]
    finally:
        await store.close()


# ---------------------------------------------------------------------------
# LocalStore only: keys must stay inside the root


@pytest.fixture
def local_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    root.mkdir()
    yield root


@pytest.mark.parametrize(
    "key", ["../escape.dcm", "/etc/passwd", "a/../../x", "a//b", "./a", "a/.", "", "x.igw-tmp"]
)
async def test_local_refuses_unsafe_keys(local_root: Path, key: str) -> None:
    store = open_store(StoreSettings(name="fs", kind="fs", path=local_root))
    with pytest.raises(StorageError, match="key refused") as refused:
        await store.write_stream(key, chunked(b"x"))
    assert not isinstance(refused.value, ObjectNotFound)
    with pytest.raises(StorageError, match="key refused"):
        await store.stat(key)
    assert list(local_root.parent.rglob("*escape*")) == []


def _overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


async def test_local_stream_refuses_a_file_changed_in_place(local_root: Path) -> None:
    """Same inode, same size, new content: caught before the last chunk is handed out."""
    store = open_store(StoreSettings(name="fs", kind="fs", path=local_root))
    data = os.urandom(100_000)
    await put(store, "p.dcm", data)
    stream = store.read_stream("p.dcm", chunk_size=10_000)
    got = bytearray(await anext(stream))
    _overwrite_in_place(local_root / "p.dcm", 50_000, b"\0" * 16)
    with pytest.raises(StorageError, match="changed"):
        async for chunk in stream:
            got += chunk
    assert len(got) < len(data)


async def test_local_refuses_symlinks_out_of_the_root(local_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"secret")
    (local_root / "link").symlink_to(outside, target_is_directory=True)
    store = open_store(StoreSettings(name="fs", kind="fs", path=local_root))
    with pytest.raises(StorageError, match="outside the root"):
        await store.read_range("link/secret.dcm", 0, 10)
    with pytest.raises(StorageError, match="outside the root"):
        await store.write_stream("link/new.dcm", chunked(b"x"))
    assert (await store.list_page()).objects == []  # symlinks are not listed


async def test_local_listing_scales_by_page(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-level tree of 2,000 files pages in order without re-walking what it passed."""
    names = [f"{a:02d}/{b:02d}/{c:03d}.dcm" for a in range(4) for b in range(10) for c in range(50)]
    for name in names:
        path = local_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    store = open_store(StoreSettings(name="fs", kind="fs", path=local_root))
    seen = [o.key for page in await list_all(store, 150) for o in page]
    assert seen == sorted(names)

    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: Any) -> Any:
        scanned.append(os.path.relpath(path, local_root))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    # Resuming deep inside the tree reads only the directories on the way there.
    page = await store.list_page(start_after="03/09/047.dcm", limit=10)
    assert [o.key for o in page.objects] == ["03/09/048.dcm", "03/09/049.dcm"]
    assert scanned == [".", "03", os.path.join("03", "09")]


async def test_local_listing_matches_sorted_keys_for_any_start_after(local_root: Path) -> None:
    """Randomized: every page equals the byte-ordered slice after ``start_after``."""
    rng = random.Random(20240611)
    alphabet = ["a", "b", ".", "-", " ", "é", "医", "0"]

    def segment() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))).strip() or "x"

    keys: set[str] = set()
    while len(keys) < 300:
        key = "/".join(segment() for _ in range(rng.randint(1, 3)))
        if key in (".", "..") or any(p in (".", "..") for p in key.split("/")):
            continue
        # A file and a directory cannot share a name on disk.
        if any(k.startswith(key + "/") or key.startswith(k + "/") for k in keys):
            continue
        keys.add(key)
    for key in keys:
        path = local_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    ordered = sorted(keys)

    for prefix in ("", "a", "a/", "é", "b.", "医"):
        store = open_store(StoreSettings(name="fs", kind="fs", path=local_root, prefix=prefix))
        scoped = [k[len(prefix) :] for k in ordered if k.startswith(prefix) and k != prefix]
        probes = [None, *rng.sample(scoped, min(10, len(scoped)))]
        probes += ["".join(rng.choice([*alphabet, "/"]) for _ in range(rng.randint(1, 5)))
                   for _ in range(20)]
        for after in probes:
            limit = rng.choice([1, 3, 50, 1000])
            page = await store.list_page(start_after=after, limit=limit)
            expected = [k for k in scoped if after is None or k > after]
            got = [o.key for o in page.objects]
            assert got == expected[:limit], (prefix, after, limit)
            assert page.is_truncated == (len(expected) > limit)


async def test_local_writes_race_deletes_that_prune_their_directories(local_root: Path) -> None:
    """A delete prunes directories it leaves empty; a write making the same directory at
    that moment is retried, never refused as if a parent were a file (seal does this)."""
    store = open_store(StoreSettings(name="fs", kind="fs", path=local_root))

    async def churn(n: int) -> None:
        for round_ in range(20):
            key = f"deep/a/b/c/{n}-{round_}.dcm"
            await store.write_stream(key, chunked(b"x"))
            await store.delete(key)

    await asyncio.gather(*(churn(n) for n in range(16)))
    assert (await store.list_page()).objects == []
    await store.write_stream("deep/a", chunked(b"file"))
    with pytest.raises(StorageError, match="a parent segment is an existing object"):
        await store.write_stream("deep/a/b.dcm", chunked(b"x"))
