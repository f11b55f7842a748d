"""Bounded inflation of Deflated Explicit VR Little Endian objects (PS3.5 A.5).

pydicom inflates a deflated dataset whole with ``zlib.decompress`` and no output limit:
a 1 MB object can inflate to gigabytes (a decompression bomb). Everything here inflates
with an output limit and says so when the limit is reached.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.filereader import read_dataset

__all__ = ["DEFAULT_INFLATE_MAX_BYTES", "InflateLimitExceeded", "inflate", "read_part10"]

DEFAULT_INFLATE_MAX_BYTES = 64 * 1024 * 1024
"""Default bound on what one deflated dataset may inflate to (``gateway.inflate_max_bytes``)."""
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_STEP = 1 << 20


class InflateLimitExceeded(Exception):
    """A deflate stream inflates to more than ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the deflated dataset inflates to more than {max_bytes} bytes")
        self.max_bytes = max_bytes


def inflate(stream: bytes, *, max_bytes: int) -> bytes:
    """A raw deflate stream (no zlib header, PS3.5 A.5) inflated, at most ``max_bytes``.

    The stream is first inflated in steps of :data:`_STEP` bytes that are counted and
    dropped, so refusing a bomb never holds more than one step; only a stream within the
    bound is inflated again and kept. Raises ``InflateLimitExceeded`` beyond the bound
    and ``zlib.error`` for an invalid stream; a stream that ends early gives what it
    inflates to (``zlib.decompress`` would raise).
    """
    counter = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    rest = stream
    while True:
        out = counter.decompress(rest, _STEP)
        total += len(out)
        if total > max_bytes:
            raise InflateLimitExceeded(max_bytes)
        rest = counter.unconsumed_tail
        if counter.eof or (not rest and len(out) < _STEP):
            break
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream, max_bytes + 1)


class _MetaOnly(io.BytesIO):
    """A BytesIO that stops pydicom where it reads the rest of the object to inflate it."""

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            raise _AtDeflatedDataset(self.tell())
        return super().read(size)


class _AtDeflatedDataset(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def _at_pixel_data(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def read_part10(data: bytes, *, max_inflated: int, stop_before_pixels: bool = False) -> FileDataset:
    """``dcmread(BytesIO(data), force=True)``, with a deflated dataset inflated at most
    ``max_inflated`` bytes (any other object is read exactly as pydicom reads it).

    Raises ``InflateLimitExceeded``, and what ``dcmread`` raises for unreadable data.
    """
    try:
        return dcmread(_MetaOnly(data), force=True, stop_before_pixels=stop_before_pixels)
    except _AtDeflatedDataset as at:
        offset = at.offset
    # As pydicom's read_partial does for this syntax, with a bounded inflate.
    meta = dcmread(io.BytesIO(data[:offset]), force=True)
    inflated = inflate(data[offset:], max_bytes=max_inflated)
    dataset = read_dataset(
        io.BytesIO(inflated),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=_at_pixel_data if stop_before_pixels else None,
    )
    ds = FileDataset(io.BytesIO(inflated), dataset, meta.preamble, meta.file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds
