"""The ObjectStore protocol every adapter implements, and the values it passes."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing or a stat sees it."""

    key: str
    size: int
    etag: str
    """Opaque version tag, without quotes; changes whenever the content changes."""
    last_modified: datetime
    """Timezone-aware (UTC)."""


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a listing in key order; ``is_truncated`` says whether more follow."""

    objects: list[ObjectInfo]
    is_truncated: bool


@dataclass(frozen=True, slots=True)
class RangeRead:
    """Bytes read from ``offset`` plus the object's version and total size at read time."""

    data: bytes
    offset: int
    etag: str
    total_size: int


@runtime_checkable
class ObjectStore(Protocol):
    """An S3-like bucket (with optional key prefix) seen through one adapter.

    Keys passed in and returned are relative to the store's prefix. Every method
    raises ``ObjectNotFound`` for a missing key and ``StoreUnavailable`` once retries
    with backoff are exhausted on connection errors, 5xx and throttling.
    """

    name: str

    async def list_page(self, *, start_after: str | None = None, limit: int = 1000) -> ListPage:
        """List up to ``limit`` objects with keys strictly after ``start_after``, in key order."""
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """Size, ETag and last-modified of one object."""
        ...

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        """Read up to ``length`` bytes from ``offset`` (fewer at the end of the object)."""
        ...

    def read_stream(
        self,
        key: str,
        *,
        offset: int = 0,
        chunk_size: int = 1 << 20,
        if_match: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream the object (from ``offset``) in chunks of at most ``chunk_size`` bytes.

        One read of the object (one GET on S3), resumed where it stopped if the
        connection drops; every chunk comes from the version the first read found, and a
        change of version during the stream raises ``StorageError``. With ``if_match``
        (an ETag, without quotes) the object must be that version: ``StorageError``
        before the first chunk otherwise, so a caller holding an ETag verifies and
        streams with one request.
        """
        ...

    async def write_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, content_type: str = "application/dicom"
    ) -> ObjectInfo:
        """Write an object from a stream of chunks (replaces an object under the same key)."""
        ...

    async def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


async def close_stream(stream: AsyncIterator[bytes]) -> None:
    """Close a ``read_stream`` iterator early (an async generator: releases its GET);
    other iterators need no closing."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
