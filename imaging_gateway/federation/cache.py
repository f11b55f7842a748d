"""An encrypted, size-bounded local cache of answers retrieved from other provinces.

The retrieve proxy (``api.federation``) keeps whole ``200`` answers of a holding province
(study, series and instance bodies, frames, rendered images) in a store of their own
(``federation.cache_store``), written through the gateway's one write path: the store is
opened like every other (``EncryptedStore``), and the settings refuse a cache unless
``[encryption]`` is on, so a cached study is envelope-encrypted at rest like everything
else the gateway writes.

A cached answer never stands in for the holding province's decision. The next retrieve
of the same resource still goes to the peer, signed for this caller, with
``If-None-Match: <ETag>``; the peer checks the assertion and consent as for any retrieve
and answers 304 only if it would send the same bytes; only then is the cached copy
served. What the cache saves is the transfer between provinces, not the check.

Each entry is one object, ``{PREFIX}{sha256 of province, path, query, Accept}``, holding
a 4-byte length, a small JSON head (ETag, Content-Type, body length, when stored) and the
body. Entries expire ``ttl_s`` after they were stored; the store is kept under
``max_bytes`` by evicting the least recently used entry. The in-memory table of entries
is rebuilt from a listing at start-up (stored sizes, last-modified times).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from imaging_gateway.errors import GatewayError
from imaging_gateway.storage.base import ObjectStore

log = logging.getLogger(__name__)

PREFIX: Final = "federation-cache/"
_HEAD_LENGTH: Final = struct.Struct(">I")
_MAX_HEAD: Final = 4096
_QUEUE_CHUNKS: Final = 8


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a retrieve needs to serve an entry: its version, type, length and body offset."""

    key: str
    etag: str
    content_type: str
    length: int
    offset: int


@dataclass(slots=True)
class _Entry:
    size: int
    """Bytes of the entry (the bound counts these; the listing's stored sizes at start-up)."""
    stored_at: float


class RetrieveCache:
    """The cache over ``store``; ``load()`` it once before use."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        """Least recently used first."""
        self._bytes = 0
        """The entries' sizes, summed."""

    @property
    def size(self) -> int:
        return self._bytes

    def _remember(self, key: str, entry: _Entry) -> None:
        self._forget(key)
        self._entries[key] = entry
        self._bytes += entry.size

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    def __len__(self) -> int:
        return len(self._entries)

    async def load(self) -> None:
        """Learn the entries already in the store (oldest first). Raises ``StorageError``."""
        found: list[tuple[float, str, int]] = []
        after: str | None = None
        while True:
            page = await self.store.list_page(start_after=after, limit=1000)
            for o in page.objects:
                if o.key.startswith(PREFIX):
                    found.append((o.last_modified.timestamp(), o.key, o.size))
            if not page.is_truncated or not page.objects:
                break
            after = page.objects[-1].key
        for stored_at, key, size in sorted(found):
            self._remember(key, _Entry(size, stored_at))
        await self._evict()
        log.info("federation cache: %d entries, %d bytes", len(self), self.size)

    @staticmethod
    def key(province: str, path: str, query: Sequence[tuple[str, str]], accept: str | None) -> str:
        """The entry of one representation of one resource of one province."""
        digest = hashlib.sha256()
        for part in (province, path, json.dumps(sorted(query)), accept or ""):
            digest.update(part.encode("utf-8") + b"\0")
        return f"{PREFIX}{province}/{digest.hexdigest()}"

    async def lookup(self, key: str) -> CachedAnswer | None:
        """The entry under ``key`` if it is there and fresh; None otherwise (never raises:
        an entry that cannot be read is dropped and counts as a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.stored_at > self.ttl_s:
            await self.drop(key)
            return None
        try:
            first = await self.store.read_range(key, 0, _HEAD_LENGTH.size + _MAX_HEAD)
            (n,) = _HEAD_LENGTH.unpack_from(first.data)
            head = json.loads(first.data[_HEAD_LENGTH.size : _HEAD_LENGTH.size + n])
            answer = CachedAnswer(
                key=key,
                etag=str(head["etag"]),
                content_type=str(head["content_type"]),
                length=int(head["length"]),
                offset=_HEAD_LENGTH.size + n,
            )
        except (GatewayError, ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("federation cache: dropping an unreadable entry: %s", type(exc).__name__)
            await self.drop(key)
            return None
        self._entries.move_to_end(key)
        return answer

    def body(self, answer: CachedAnswer, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The cached body; raises as the store's ``read_stream`` does (``IntegrityError``
        for an entry that was tampered with, before any byte of it)."""
        return self.store.read_stream(answer.key, offset=answer.offset, chunk_size=chunk_size)

    def fill(self, key: str, *, etag: str, content_type: str, length: int) -> Fill | None:
        """A writer of a new entry from an answer being proxied, or None when an answer of
        ``length`` bytes cannot be held (over half the bound)."""
        if length > self.max_bytes // 2:
            return None
        head = json.dumps(
            {"etag": etag, "content_type": content_type, "length": length,
             "stored_at": self._clock()}
        ).encode("utf-8")  # fmt: skip
        if len(head) > _MAX_HEAD:
            return None
        return Fill(self, key, _HEAD_LENGTH.pack(len(head)) + head, length)

    async def drop(self, key: str) -> None:
        """Forget and delete one entry; a store that fails leaves it to a later eviction."""
        self._forget(key)
        try:
            await self.store.delete(key)
        except GatewayError as exc:
            log.warning("federation cache: could not delete an entry: %s", exc.message)

    async def _added(self, key: str, size: int) -> None:
        self._remember(key, _Entry(size, self._clock()))
        await self._evict()

    async def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if now - e.stored_at > self.ttl_s]:
            await self.drop(key)
        while self._entries and self.size > self.max_bytes:
            await self.drop(next(iter(self._entries)))


class Fill:
    """A new entry written while its answer streams to the client.

    ``put`` each chunk as it is sent, then ``finish`` (the entry counts only if every
    announced byte arrived) or ``abort``. The write runs as its own task behind a small
    queue: memory stays bounded, and a cache that cannot keep up slows the copy, never
    grows a buffer. Nothing a failed fill does reaches the client: the entry is dropped.
    """

    def __init__(self, cache: RetrieveCache, key: str, head: bytes, length: int) -> None:
        self._cache = cache
        self._key = key
        self._length = length
        self._received = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self._task = asyncio.create_task(cache.store.write_stream(key, self._chunks(head)))

    async def _chunks(self, head: bytes) -> AsyncIterator[bytes]:
        yield head
        while (chunk := await self._queue.get()) is not None:
            yield chunk
        if self._received != self._length:
            raise ValueError("the answer is not the length it announced")

    async def put(self, chunk: bytes) -> None:
        if not self._task.done():
            self._received += len(chunk)
            await self._queue.put(chunk)

    async def finish(self) -> bool:
        """Complete the entry; True when it was stored."""
        if not self._task.done():
            await self._queue.put(None)
        try:
            info = await self._task
        except (GatewayError, ValueError, OSError) as exc:
            log.warning("federation cache: entry not stored: %s", type(exc).__name__)
            await self._cache.drop(self._key)
            return False
        await self._cache._added(self._key, info.size)
        return True

    async def abort(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])  # never raises the write's own error
        await self._cache.drop(self._key)
