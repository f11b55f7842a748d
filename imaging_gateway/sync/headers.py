"""Read one object's DICOM header with ranged GETs: 64 KiB first, more only when needed."""

from __future__ import annotations

import hashlib

from imaging_gateway.dicom.headers import (
    NeedMoreData,
    NotParseable,
    check_pixel_data_extent,
    parse_header,
)
from imaging_gateway.errors import IntegrityError, KeyNotFound
from imaging_gateway.index.sql import IndexedObject, QuarantinedObject
from imaging_gateway.storage.base import ObjectInfo, ObjectStore

# An object rewritten while its header is being read is read again from the start,
# at most this many times, before it is quarantined as unstable.
MAX_RESTARTS = 3
MAX_REASON = 500  # the quarantine table's reason column


async def read_header(
    store: ObjectStore,
    info: ObjectInfo,
    *,
    first_read: int,
    max_header: int,
    national_id_issuers: tuple[str, ...],
) -> tuple[IndexedObject | QuarantinedObject, int]:
    """Read and parse the header of ``info``; returns the outcome and the bytes read.

    Sizes are those the store's reads report (``RangeRead.total_size``): through an
    ``EncryptedStore`` the plaintext size of an encrypted object, never the listed
    (stored) size. Unreadable objects become ``QuarantinedObject`` with the reason,
    objects shorter than their pixel data says too (``truncated: ...``),
    including encrypted objects that fail authentication or whose key is not held
    (``integrity: ...``, naming store, object and key id, never content). Raises
    ``ObjectNotFound`` when the object vanished and ``StoreUnavailable`` when the store
    keeps failing.
    """
    try:
        return await _read_header(
            store,
            info,
            first_read=first_read,
            max_header=max_header,
            national_id_issuers=national_id_issuers,
        )
    except (IntegrityError, KeyNotFound) as exc:
        reason = f"integrity: {exc.message}"[:MAX_REASON]
        return QuarantinedObject(info.key, info.etag, info.size, reason), 0


async def _read_header(
    store: ObjectStore,
    info: ObjectInfo,
    *,
    first_read: int,
    max_header: int,
    national_id_issuers: tuple[str, ...],
) -> tuple[IndexedObject | QuarantinedObject, int]:
    if info.size == 0:
        return QuarantinedObject(info.key, info.etag, 0, "empty: zero-byte object"), 0
    bytes_read = 0
    for _ in range(MAX_RESTARTS + 1):
        first = await store.read_range(info.key, 0, min(first_read, max(info.size, 1)))
        etag, total = first.etag, first.total_size
        data = first.data
        bytes_read += len(data)
        if total == 0:
            return QuarantinedObject(info.key, etag, 0, "empty: zero-byte object"), bytes_read
        changed = False
        while True:
            complete = len(data) >= total
            try:
                header = parse_header(
                    data,
                    complete=complete,
                    national_id_issuers=national_id_issuers,
                    max_inflated_bytes=max_header,  # a deflated header, inflated
                )
                # A header read is 64 KiB: the pixel data's declared extent (or its
                # offset table) against the object's size is what shows a cut object.
                check_pixel_data_extent(data, header, object_size=total)
            except NotParseable as exc:
                return QuarantinedObject(info.key, etag, total, exc.reason), bytes_read
            except NeedMoreData as exc:
                if len(data) >= max_header:
                    reason = f"header-too-large: header exceeds {max_header} bytes"
                    return QuarantinedObject(info.key, etag, total, reason), bytes_read
                want = min(max(exc.at_least, 2 * len(data)), total, max_header)
                more = await store.read_range(info.key, len(data), want - len(data))
                bytes_read += len(more.data)
                if more.etag != etag:
                    changed = True
                    break
                if not more.data:
                    # The object is shorter than it claimed: parse what there is as complete.
                    total = len(data)
                    continue
                data += more.data
                continue
            digest = hashlib.sha256(data[: header.header_bytes]).hexdigest()
            last_modified = info.last_modified
            return (
                IndexedObject(info.key, etag, total, last_modified, header, digest),
                bytes_read,
            )
        if not changed:  # pragma: no cover - loop exits only through return or change
            break
    reason = "unstable: object kept changing while its header was read"
    return QuarantinedObject(info.key, info.etag, info.size, reason), bytes_read
