"""Conditional and ranged retrieves (RFC 9110 8.8.3, 13.1, 14): ETags, If-None-Match, Range.

A client that lost a large study half-way asks for the rest with Range and If-Range.
The body of an as-stored retrieve is fixed by the indexed versions of its instances, so
it has a strong ETag, a boundary derived from it (the same bytes on every request: byte
ranges of one body are ranges of the next) and a known length. Transcoded bodies have
neither and are always sent whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from aiohttp import web

from imaging_gateway.domain.records import InstanceLocation

__all__ = ["boundary_of", "etag_matches", "representation_etag", "wanted_range"]


def representation_etag(content_type: str, instances: Sequence[InstanceLocation]) -> str:
    """A strong ETag of the body: its content type and each part's indexed version."""
    digest = hashlib.sha256(content_type.encode("utf-8"))
    for i in instances:
        digest.update(b"\0".join(
            (i.store.encode(), i.key.encode(), i.etag.encode(), str(i.size).encode(),
             (i.TransferSyntaxUID or "").encode(), b"")
        ))  # fmt: skip
    return f'"{digest.hexdigest()[:40]}"'


def boundary_of(etag: str) -> str:
    """The body's boundary: a hash of its ETag, which no part's bytes can contain by
    design (an object would have to hold a digest of its own ETag)."""
    return hashlib.sha256(b"multipart boundary " + etag.encode("ascii")).hexdigest()[:32]


def etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match (weak comparison): ``*`` or a list naming ``etag``."""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def wanted_range(
    request: web.Request, etag: str, total: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The one byte range ``[start, stop)`` asked for, or None to send the whole body.

    Ignored (whole body) unless GET with a single well-formed ``bytes`` range, and when
    If-Range names another version (strong comparison) or a date (no Last-Modified
    here); several ranges are answered whole too, as RFC 9110 allows.
    """
    if request.method != "GET" or "Range" not in request.headers:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        return None  # malformed or several ranges
    start, stop = wanted.start, wanted.stop
    if start < 0:  # a suffix: the last -start bytes
        start, stop = max(total + start, 0), total
    stop = total if stop is None else min(stop, total)
    if start >= total or start >= stop:
        return "unsatisfiable"
    return start, stop
