"""WADO-RS retrieve (PS3.18 10.4): instances, metadata, frames, bulkdata, rendered, thumbnail.

The caller (an API handler, after the security gate has checked consent) passes the
``InstanceLocation``s the request may see; nothing here looks up authorization.

Every object is read from its store with the ETag the index recorded: an object that
vanished or changed since it was indexed is never served (it may be another patient's
now). Before the response starts that is an error the middleware turns into JSON; once
a multipart body has started, the connection is aborted (no closing boundary, and fewer
bytes than the Content-Length or no final chunk) so the client cannot mistake a cut body
for a whole one, and the abort is logged without keys, UIDs or patient data.

URIs this module writes into metadata, relative to ``bulkdata_base(instance)`` (the
instance's Retrieve Instance URL, ``.../studies/{study}/series/{series}/instances/{sop}``):

* ``{base}/bulkdata/{tag path}`` for every binary value longer than 768 bytes (pydicom's
  ``bulk_data_threshold`` 1024 counts base64 characters). The tag path is the element's
  tag as 8 upper-case hex digits, preceded for nested elements by each enclosing
  sequence's tag and the 0-based item index: ``00540016/0/00181072``
  (:func:`parse_tag_path` reads it back, :func:`retrieve_bulkdata` serves it).
* ``{base}/bulkdata/7FE00010`` (or 7FE00008 / 7FE00009) for the pixel data, served
  exactly like frames 1..n, one frame per part. A frame list URI
  (``{base}/frames/1,2,...,n``) would name the same bytes, but for a cine of thousands
  of frames it exceeds request-line limits (aiohttp's included), so it is not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import secrets
import struct
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
from aiohttp import web
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame, parse_basic_offsets
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from imaging_gateway.dicom.deflate import (
    DEFAULT_INFLATE_MAX_BYTES,
    InflateLimitExceeded,
    read_part10,
)
from imaging_gateway.dicom.headers import decode_text_values
from imaging_gateway.dicom.mediatypes import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    NATIVE_LITTLE_ENDIAN,
    Representation,
    select_bulkdata,
    select_frames,
    select_instances,
    select_rendered,
    select_thumbnail,
)
from imaging_gateway.dicom.temporal import normalize_dicom_json
from imaging_gateway.dicom.transcode import (
    can_decode,
    convert_frame,
    frame_why_not,
    single_frame_dataset,
    transcode_instance,
    why_not,
)
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import (
    GatewayError,
    IntegrityError,
    InvalidRequest,
    NotAcceptable,
    NotFound,
    StorageError,
)
from imaging_gateway.storage.base import ObjectStore, close_stream
from imaging_gateway.storage.zerocopy import (
    BodyOpener,
    OpenBody,
    Relay,
    RelayTargetGone,
    opens_bodies,
    relay_fd,
)

__all__ = [
    "BULK_DATA_THRESHOLD",
    "CHUNK_SIZE",
    "INFLATE_MAX_BYTES",
    "MAX_FRAME_LIST",
    "MAX_VIEWPORT",
    "STREAM_OUTCOME",
    "THUMBNAIL_VIEWPORT",
    "TRANSCODE_MAX_BYTES",
    "metadata",
    "parse_frame_list",
    "parse_quality",
    "parse_tag_path",
    "parse_viewport",
    "parse_window",
    "rendered",
    "representative_instance",
    "retrieve_bulkdata",
    "retrieve_frames",
    "retrieve_metadata",
    "retrieve_rendered",
    "retrieve_thumbnail",
    "stream_instances",
    "thumbnail",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK_SIZE: Final = 1 << 20
"""Bytes per read from the store and per write to the client while streaming."""
PREFETCH_INSTANCES: Final = 8
"""Instances read ahead, concurrently, while an earlier one is being sent."""
READ_AHEAD_CHUNKS: Final = 2
"""Chunks buffered per instance read ahead: memory <= PREFETCH x (READ_AHEAD + 1) x CHUNK."""
METADATA_CONCURRENCY: Final = 16
BULK_DATA_THRESHOLD: Final = 1024
"""pydicom's threshold, in base64 characters: binary values over 768 bytes become URIs."""
THUMBNAIL_VIEWPORT: Final = (128, 128)
DEFAULT_JPEG_QUALITY: Final = 90
MAX_FRAME_LIST: Final = 1024
"""Most frames one Retrieve Frames request may list (the instance's NumberOfFrames too)."""
MAX_VIEWPORT: Final = 65535
"""Largest viewport width or height: no image has more rows or columns (US, PS3.5 6.2)."""
INFLATE_MAX_BYTES: Final = DEFAULT_INFLATE_MAX_BYTES
"""Default bound on what a deflated object is inflated to when read whole (PS3.5 A.5)."""
TRANSCODE_MAX_BYTES: Final = 512 << 20
"""Default bound on the memory one transcoded instance may take (stored + decoded bytes)."""
STREAM_OUTCOME: Final = web.ResponseKey("stream_outcome", str)
"""Set on every streamed response: ``complete``, ``aborted`` or ``client-gone`` (for audit)."""

_DEFLATED: Final = "1.2.840.10008.1.2.1.99"
_IMPLICIT: Final = "1.2.840.10008.1.2"
_PIXEL_TAGS: Final = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
_EXTENDED_OFFSET_TABLE: Final = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS: Final = 0x7FE00002
_ITEM: Final = 0xFFFEE000
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
# ASCII digits: str.isdigit() also takes e.g. superscript two, which int() refuses.
_ASCII_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------
# Stores and versions


def _store(stores: Mapping[str, ObjectStore], instance: InstanceLocation) -> ObjectStore:
    try:
        return stores[instance.store]
    except KeyError:
        raise StorageError(f"store {instance.store!r} is not configured on this gateway") from None


def _changed(instance: InstanceLocation) -> StorageError:
    return StorageError(
        f"store {instance.store!r}: an object changed or was replaced since it was indexed; "
        "it is not served until the store is synced again"
    )


def _check_version(instance: InstanceLocation, etag: str, size: int) -> None:
    """Raise unless the object is the version the index recorded (ETag and size)."""
    if (instance.etag and etag != instance.etag) or size != instance.size:
        raise _changed(instance)


async def _read(store: ObjectStore, instance: InstanceLocation, offset: int, length: int) -> bytes:
    """A ranged read of the indexed version; raises ``StorageError`` if it changed."""
    read = await store.read_range(instance.key, offset, length)
    _check_version(instance, read.etag, read.total_size)
    return read.data


async def _gather(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all, results in order; on the first error cancel the rest and raise that error."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ---------------------------------------------------------------------------
# Headers and the pixel data element


@dataclass(slots=True)
class _Header:
    """One instance's header as read from its first bytes, and where its pixel data lies."""

    dataset: Dataset
    transfer_syntax: str
    data: bytes
    """The bytes read from offset 0: the header and possibly what follows it."""
    whole: bool
    """``data`` is the whole object."""
    pixel_tag: int | None = None
    pixel_vr: str | None = None
    value_offset: int = 0
    """Offset in the object of the pixel data value (after the element header)."""
    value_length: int | None = None
    """Length of a native pixel data value; None for encapsulated (undefined length)."""
    inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES
    """Bound on the inflated dataset when a deflated object is parsed whole."""


async def _read_header_bytes(
    store: ObjectStore, instance: InstanceLocation, *, extra: int = 0
) -> tuple[bytes, bool]:
    """The header, the pixel data element header and ``extra`` bytes after it.

    A deflated object (no byte extent for its header) or one whose header length is
    unknown is read whole.
    """
    want = instance.header_bytes + 12 + extra
    if (
        instance.header_bytes <= 0
        or instance.TransferSyntaxUID == _DEFLATED
        or want >= instance.size
    ):
        return await _read(store, instance, 0, instance.size), True
    return await _read(store, instance, 0, want), False


def _too_large_to_inflate(instance: InstanceLocation, exc: InflateLimitExceeded) -> NotAcceptable:
    return NotAcceptable(
        f"store {instance.store!r}: a deflated object inflates to more than "
        f"{exc.max_bytes} bytes (gateway.inflate_max_bytes); it is sent only as stored "
        "(transfer-syntax=*)"
    )


def _read_whole(instance: InstanceLocation, data: bytes, max_inflated: int) -> Dataset:
    """The whole object parsed, a deflated one inflated at most ``max_inflated`` bytes."""
    try:
        return read_part10(data, max_inflated=max_inflated)
    except InflateLimitExceeded as exc:
        raise _too_large_to_inflate(instance, exc) from None


def _parse_header(
    instance: InstanceLocation,
    data: bytes,
    *,
    whole: bool,
    inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
) -> _Header:
    """Parse header bytes read from the indexed version; ``IntegrityError`` if unreadable,
    ``NotAcceptable`` if a deflated object inflates past ``inflate_max_bytes``."""
    try:
        ds = read_part10(data, max_inflated=inflate_max_bytes, stop_before_pixels=True)
    except InflateLimitExceeded as exc:
        raise _too_large_to_inflate(instance, exc) from None
    except Exception as exc:
        raise IntegrityError(
            f"store {instance.store!r}: an indexed object's header cannot be read "
            f"({type(exc).__name__})"
        ) from None
    implicit, little = ds.original_encoding
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    transfer_syntax = str(syntax or instance.TransferSyntaxUID or "").strip(" \x00")
    if not transfer_syntax:
        if implicit is not False:
            transfer_syntax = _IMPLICIT
        else:
            transfer_syntax = EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN
    header = _Header(ds, transfer_syntax, data, whole, inflate_max_bytes=inflate_max_bytes)
    if transfer_syntax == _DEFLATED or instance.header_bytes <= 0:
        # The pixel data sits inside the deflate stream (or we do not know where it
        # starts): find it by parsing the whole object when frames are asked for.
        _locate_pixels_by_parsing(instance, header)
        return header
    position = instance.header_bytes
    if position + 8 > len(data):
        return header
    order = "<" if little is not False else ">"
    group, element = struct.unpack_from(f"{order}HH", data, position)
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        return header
    vr_bytes = data[position + 4 : position + 6]
    if implicit is not True and vr_bytes.isalpha() and vr_bytes.isupper():
        if position + 12 > len(data):
            return header
        vr: str | None = vr_bytes.decode("ascii")
        (length,) = struct.unpack_from(f"{order}L", data, position + 8)
        value_offset = position + 12
    else:
        vr = None
        (length,) = struct.unpack_from(f"{order}L", data, position + 4)
        value_offset = position + 8
    header.pixel_tag = tag
    header.pixel_vr = vr
    header.value_offset = value_offset
    header.value_length = None if length == _UNDEFINED else length
    return header


def _locate_pixels_by_parsing(instance: InstanceLocation, header: _Header) -> None:
    """For a whole object read: note the pixel data tag (its bytes come from pydicom)."""
    if not header.whole:
        return
    try:
        full = read_part10(header.data, max_inflated=header.inflate_max_bytes)
    except InflateLimitExceeded as exc:
        raise _too_large_to_inflate(instance, exc) from None
    except Exception:
        return
    for tag in _PIXEL_TAGS:
        if tag in full:
            element = full[tag]
            header.pixel_tag = tag
            header.pixel_vr = element.VR
            header.value_length = None if element.is_undefined_length else len(element.value)
            return


async def _load_header(
    store: ObjectStore,
    instance: InstanceLocation,
    *,
    extra: int = 0,
    inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
) -> _Header:
    data, whole = await _read_header_bytes(store, instance, extra=extra)
    return await asyncio.to_thread(
        _parse_header, instance, data, whole=whole, inflate_max_bytes=inflate_max_bytes
    )


# ---------------------------------------------------------------------------
# multipart/related bodies (RFC 2387, RFC 2046 5.1; PS3.18 8.6)


@dataclass(frozen=True, slots=True)
class _Part:
    content_type: str
    length: int | None
    body: AsyncGenerator[bytes | OpenBody, None]
    """Bytes to write, or a store body for the response's ``Relay`` to splice through."""


class _ClientGone(Exception):
    """Writing to the client failed: it closed the connection."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError as exc:
        raise _ClientGone from exc


def _abort(request: web.Request) -> None:
    """Cut the connection: the body ends short of its Content-Length or its last chunk."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _part_head(boundary: str, content_type: str, length: int | None, *, first: bool) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return (head if first else "\r\n" + head).encode("ascii")


def _closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def _multipart_length(boundary: str, parts: Sequence[tuple[str, int]]) -> int:
    """Bytes of the whole body :func:`_send_multipart` writes for parts (type, length)."""
    total = len(_closing(boundary))
    for index, (content_type, length) in enumerate(parts):
        total += len(_part_head(boundary, content_type, length, first=index == 0)) + length
    return total


def _multipart_response(
    content_type: str,
    boundary: str,
    layout: Sequence[tuple[str, int]] | None,
    headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={**(headers or {}), "Content-Type": f"{content_type}; boundary={boundary}"}
    )
    if layout is not None:
        # Known length: aiohttp writes the chunks as they are, where its chunked
        # writer joins each one with its size line (a copy of every byte).
        response.content_length = _multipart_length(boundary, layout)
    else:
        response.enable_chunked_encoding()
    return response


async def _send_multipart(
    request: web.Request,
    content_type: str,
    parts: AsyncGenerator[_Part, None],
    *,
    layout: Sequence[tuple[str, int]] | None = None,
    boundary: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Stream ``parts`` as one ``multipart/related`` response.

    With ``layout`` (each part's content type and length, known in advance) the body is
    sent with its ``Content-Length``; otherwise chunked. ``boundary`` defaults to a
    random one; ``headers`` are added to the response's. Either way a cut body reads as
    cut: fewer bytes than Content-Length, or no last chunk. The first part's first
    chunk is read before anything is sent, so an error there propagates (the
    middleware answers it). After that, an error aborts the connection; a client that
    goes away ends the stream quietly. Either way the response is returned with
    :data:`STREAM_OUTCOME` set.
    """
    boundary = boundary or secrets.token_hex(16)
    if request.method == "HEAD" and layout is not None:
        # The index gives every header: nothing of the study is opened or read.
        await parts.aclose()
        response = _multipart_response(content_type, boundary, layout, headers)
        await response.prepare(request)
        await response.write_eof()
        response[STREAM_OUTCOME] = "complete"
        return response
    try:
        part = await anext(parts, None)
        if part is None:
            raise NotFound("nothing to retrieve")
        pending: bytes | OpenBody | None = await anext(part.body, None)
        response = _multipart_response(content_type, boundary, layout, headers)
        response[STREAM_OUTCOME] = "aborted"
        await response.prepare(request)
        if request.method == "HEAD":  # transcoded: the first part was needed for the headers
            await response.write_eof()
            response[STREAM_OUTCOME] = "complete"
            return response
        index = 0
        total = 0
        relay: Relay | None = None

        async def emit(item: bytes | OpenBody) -> int:
            nonlocal relay
            if not isinstance(item, OpenBody):
                await _write(response, item)
                return len(item)
            if relay is None:
                fd = relay_fd(request.transport)
                if fd is None or request.transport is None:
                    raise _ClientGone
                relay = Relay(request.transport, fd)
            try:
                return await relay.relay(item)
            except RelayTargetGone as exc:
                raise _ClientGone from exc

        try:
            while part is not None:
                try:
                    head = _part_head(boundary, part.content_type, part.length, first=index == 0)
                    await _write(response, head)
                    written = 0
                    if pending is not None:
                        written += await emit(pending)
                    async for chunk in part.body:
                        written += await emit(chunk)
                finally:
                    await part.body.aclose()
                if part.length is not None and written != part.length:
                    raise IntegrityError(f"part {index + 1} is not the length it announced")
                total += len(head) + written
                index += 1
                part = await anext(parts, None)
                pending = None
            closing = _closing(boundary)
            if response.content_length not in (None, total + len(closing)):
                raise IntegrityError("the body is not the length it announced")
            await _write(response, closing)
            try:
                await response.write_eof()
            except ConnectionError as exc:
                raise _ClientGone from exc
        except _ClientGone:
            response[STREAM_OUTCOME] = "client-gone"
            log.info("wado: client closed the connection during part %d", index + 1)
        except Exception as exc:
            detail = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            log.warning("wado: response aborted during part %d: %s", index + 1, detail)
            # Release the reads first: nothing may suspend between the abort and the
            # return, or a server that cancels handlers on disconnect cancels this one.
            await parts.aclose()
            _abort(request)
        else:
            response[STREAM_OUTCOME] = "complete"
        finally:
            if relay is not None:
                relay.close()
        return response
    finally:
        await parts.aclose()


def _with_syntax(content_type: str, transfer_syntax: str | None) -> str:
    """Name the parts' transfer syntax on the whole body too, when they all share one.

    Each part carries it anyway; some viewers (older cornerstone WADO-RS loaders) read
    the response's Content-Type instead of the part's to pick the frame decoder.
    """
    if transfer_syntax:
        return f"{content_type}; transfer-syntax={transfer_syntax}"
    return content_type


async def _single(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


# ---------------------------------------------------------------------------
# Retrieve Study / Series / Instance (PS3.18 10.4.1.1.1)


class _Pipe:
    """Runs a chunk source in its own task, at most ``depth`` chunks ahead of the reader.

    Started when created, so the instances of the prefetch window are read (first chunk
    and the start of the rest) while an earlier instance is still being sent.
    """

    def __init__(self, source: AsyncGenerator[bytes, None], depth: int) -> None:
        self._source = source
        self._queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=depth)
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for chunk in self._source:
                await self._queue.put(chunk)
        except Exception as exc:
            await self._queue.put(exc)
            return
        finally:
            await self._source.aclose()
        await self._queue.put(None)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The source's chunks in order; its error is raised here, where it occurred."""
        try:
            while (item := await self._queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop reading (cancels the task; the source closes its reads)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _instance_chunks(
    store: ObjectStore,
    instance: InstanceLocation,
    chunk_size: int,
    *,
    offset: int = 0,
    length: int | None = None,
    etag: str | None = None,
) -> AsyncGenerator[bytes, None]:
    """The indexed version of one object, chunk by chunk, or an error before its end.

    From ``offset``, ``length`` bytes (default: to the end). One ``read_stream`` pinned to
    the indexed ETag (``if_match``; ``etag`` when the store named another form of it):
    the store refuses another version before the first chunk and keeps any resume on
    this one. The byte count is checked on the way (more than the indexed size fails
    before those bytes go out; fewer fails at the end), so bytes of another version
    never end a part normally.
    """
    end = instance.size if length is None else offset + length
    stream = store.read_stream(
        instance.key, offset=offset, chunk_size=chunk_size,
        if_match=(etag or instance.etag) or None,
    )  # fmt: skip
    at = offset
    try:
        async for chunk in stream:
            if at + len(chunk) > end:
                if length is None:
                    raise _changed(instance)  # more than the indexed size
                chunk = chunk[: end - at]
            at += len(chunk)
            if chunk:
                yield chunk
            if length is not None and at == end:
                break
    finally:
        await close_stream(stream)
    if at != end:
        raise _changed(instance)


class _Opening:
    """The body of one object opened ahead for a relay: the GET sent, its head read.

    The bytes wait in the kernel (the socket's receive buffer) until the relay splices
    them (or decrypts them, for an encrypted object: its header is read and its data key
    unwrapped when it is opened), so reading ahead costs no process memory. A store
    that cannot open a body so (``open_body`` gives None) is streamed the ordinary way
    when its turn comes.
    """

    def __init__(self, store: ObjectStore, instance: InstanceLocation) -> None:
        self._store = store
        self._instance = instance
        opener = cast(BodyOpener, store)
        self._task = asyncio.create_task(
            opener.open_body(instance.key, if_match=instance.etag or None)
        )

    async def chunks(self, chunk_size: int) -> AsyncGenerator[bytes | OpenBody, None]:
        """The opened body (relayed by the sender), then the ordinary stream for any rest.

        Should the store's connection end early, the rest is read with ``read_stream``
        from where the relay stopped, pinned to the same version.
        """
        instance = self._instance
        body = await self._task
        if body is None:
            async for chunk in _instance_chunks(self._store, instance, chunk_size):
                yield chunk
            return
        try:
            if body.length != instance.size or (instance.etag and body.etag != instance.etag):
                raise _changed(instance)
            yield body
        finally:
            body.close()
        if body.delivered < instance.size:
            async with aclosing(_instance_chunks(
                self._store, instance, chunk_size, offset=body.delivered, etag=body.etag
            )) as rest:  # fmt: skip
                async for chunk in rest:
                    yield chunk

    async def close(self) -> None:
        """Cancel the open, or close the body opened and not relayed."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if not self._task.cancelled() and self._task.exception() is None:
            body = self._task.result()
            if body is not None:
                body.close()


def _instance_part_type(instance: InstanceLocation, syntax: str | None = None) -> str:
    return Representation(
        "application/dicom", syntax or instance.TransferSyntaxUID, multipart=True
    ).part_content_type


async def _transcoded(
    store: ObjectStore, instance: InstanceLocation, target: str, max_bytes: int, max_inflated: int
) -> bytes:
    """The indexed version of ``instance``, read whole, re-encoded in ``target`` off the loop."""
    data = await _read(store, instance, 0, instance.size)
    return await asyncio.to_thread(
        transcode_instance, data, target, max_bytes=max_bytes, max_inflated=max_inflated
    )


async def _instance_parts(
    instances: Sequence[InstanceLocation],
    stores: Mapping[str, ObjectStore],
    *,
    chunk_size: int,
    prefetch: int,
    targets: Sequence[str | None] | None = None,
    max_bytes: int = TRANSCODE_MAX_BYTES,
    max_inflated: int = INFLATE_MAX_BYTES,
    relay: bool = False,
) -> AsyncGenerator[_Part, None]:
    """One part per instance; the next ``prefetch`` instances are read ahead concurrently.

    ``targets[i]`` names the transfer syntax instance ``i`` is transcoded to (None: sent
    as stored). Only instances sent as stored are read ahead; a transcoded one is read
    whole and converted when its turn comes, so one at a time is in memory. With
    ``relay`` (the response can splice), instances of a store that opens bodies are
    opened ahead (``_Opening``) instead of read into ``_Pipe`` buffers.
    """
    window: deque[_Pipe | _Opening] = deque()
    ahead = [i for i in range(len(instances)) if targets is None or targets[i] is None]
    scheduled = 0
    try:
        for index, instance in enumerate(instances):
            while scheduled < len(ahead) and len(window) < prefetch:
                next_one = instances[ahead[scheduled]]
                next_store = _store(stores, next_one)
                if relay and opens_bodies(next_store):
                    window.append(_Opening(next_store, next_one))
                else:
                    source = _instance_chunks(next_store, next_one, chunk_size)
                    window.append(_Pipe(source, READ_AHEAD_CHUNKS))
                scheduled += 1
            target = None if targets is None else targets[index]
            if target is None:
                entry = window.popleft()
                body = entry.chunks(chunk_size) if isinstance(entry, _Opening) else entry.chunks()
                yield _Part(_instance_part_type(instance), instance.size, body)
            else:
                data = await _transcoded(
                    _store(stores, instance), instance, target, max_bytes, max_inflated
                )
                part_type = _instance_part_type(instance, target)
                yield _Part(part_type, len(data), _single(data))
                del data
    finally:
        for pipe in window:
            await pipe.close()


def _check_transcodable(instance: InstanceLocation, max_bytes: int) -> None:
    """``NotAcceptable`` when an instance is surely too large to transcode (index figures)."""
    pixels = (instance.Rows or 0) * (instance.Columns or 0) * max(instance.NumberOfFrames or 1, 1)
    if instance.size + pixels > max_bytes:
        raise NotAcceptable(
            f"an instance of {instance.size} bytes ({pixels} pixels) is too large to "
            f"transcode here (at most {max_bytes} bytes in memory); "
            "ask for transfer-syntax=* to get it as stored"
        )


async def stream_instances(
    request: web.Request,
    instances: Sequence[InstanceLocation],
    stores: Mapping[str, ObjectStore],
    *,
    accept: str | None,
    chunk_size: int = CHUNK_SIZE,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> web.StreamResponse:
    """Retrieve Study / Series / Instance: stream ``instances`` as multipart/related.

    The response is ``multipart/related; type="application/dicom"; boundary=<random>``
    with its ``Content-Length`` (from the indexed sizes: a cut body is visibly short),
    one part per instance in the order given, each part
    ``Content-Type: application/dicom; transfer-syntax=<stored>`` with its
    ``Content-Length``. Objects are copied from the store in ``chunk_size`` pieces, the next
    :data:`PREFETCH_INSTANCES` instances read concurrently while one is sent; memory holds
    at most about ``PREFETCH_INSTANCES x (READ_AHEAD_CHUNKS + 1) x chunk_size`` (24 MiB),
    whatever the study size. When the store opens bodies (``S3Store.open_body``, plain
    HTTP) and the client's connection is plain TCP, the bytes are spliced store socket ->
    client socket in the kernel instead (``storage.zerocopy``): the instances ahead are
    opened (request sent, head read) and wait in their sockets, so nothing is buffered in
    the process. Through an ``EncryptedStore`` over such a store, plain objects are
    spliced the same way and encrypted ones relayed decrypting (``DecryptingBody``:
    received, verified and decrypted segment by segment in two small buffers, written to
    the client socket); their sizes and offsets are plaintext, so the rest of a body
    whose store connection ended early is read as for a plain one.

    Transfer syntaxes are negotiated per stored syntax (``select_instances``): an instance
    whose stored syntax the client accepts is copied byte for byte, without parsing;
    another is read whole, transcoded off the event loop (``transcode_instance``) and
    sent with ``Content-Type: application/dicom; transfer-syntax=<sent>``, one such
    instance in memory at a time, each bounded by ``transcode_max_bytes`` (a deflated one
    inflated at most ``inflate_max_bytes``). A body with
    transcoded parts has no Content-Length (chunked; parts keep theirs).

    Raises, before anything is sent: ``NotFound`` (no instances), ``NotAcceptable``
    (no accepted syntax can be made for some stored one, or an instance to transcode is
    larger than ``transcode_max_bytes``), ``StorageError`` (a store is not
    configured, or the first object changed since it was indexed), ``ObjectNotFound``
    and ``StoreUnavailable`` from the first read. Later failures abort the connection
    and are logged; the returned response then has :data:`STREAM_OUTCOME` ``aborted``.
    """
    if not instances:
        raise NotFound("no instances to retrieve")
    choice = select_instances(
        accept, (i.TransferSyntaxUID for i in instances), producible=why_not
    )
    for instance in instances:
        _store(stores, instance)
    targets: list[str | None] = []
    for instance in instances:
        stored = instance.TransferSyntaxUID or None
        sent = choice.syntaxes[stored]
        targets.append(None if sent == stored else sent)
        if sent != stored:
            _check_transcodable(instance, transcode_max_bytes)
    representation = choice.representation
    content_type = _with_syntax(representation.content_type, representation.transfer_syntax)
    transcoding = any(target is not None for target in targets)
    relay = not transcoding and relay_fd(request.transport) is not None

    def parts() -> AsyncGenerator[_Part, None]:
        return _instance_parts(
            instances,
            stores,
            chunk_size=chunk_size,
            prefetch=PREFETCH_INSTANCES,
            targets=targets if transcoding else None,
            max_bytes=transcode_max_bytes,
            max_inflated=inflate_max_bytes,
            relay=relay,
        )

    if transcoding:  # part lengths are known only once each is transcoded
        return await _send_multipart(request, content_type, parts())
    layout = [(_instance_part_type(instance), instance.size) for instance in instances]
    etag = _representation_etag(content_type, instances)
    boundary = _boundary_of(etag)
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    total = _multipart_length(boundary, layout)
    if _etag_matches(request.headers.get("If-None-Match"), etag):
        return _sent_whole(web.Response(status=304, headers=headers))
    wanted = _wanted_range(request, etag, total)
    if wanted is None:
        return await _send_multipart(
            request, content_type, parts(), layout=layout, boundary=boundary, headers=headers
        )
    if wanted == "unsatisfiable":
        return _sent_whole(
            web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{total}"})
        )
    start, stop = wanted
    return await _send_range(
        request, f"{content_type}; boundary={boundary}", _body_segments(boundary, instances),
        stores, start, stop, total, headers, chunk_size=chunk_size,
    )  # fmt: skip


def _sent_whole(response: web.Response) -> web.Response:
    response[STREAM_OUTCOME] = "complete"  # nothing more to send than its headers
    return response


# ---------------------------------------------------------------------------
# Conditional and ranged retrieves (RFC 9110 8.8.3, 13.1, 14): a client that lost a
# large study half-way asks for the rest with Range and If-Range. The body of an
# as-stored retrieve is fixed by the indexed versions of its instances, so it has a
# strong ETag, a boundary derived from it (the same bytes on every request: byte
# ranges of one body are ranges of the next) and a known length. Transcoded bodies
# have neither and are always sent whole.


def _representation_etag(content_type: str, instances: Sequence[InstanceLocation]) -> str:
    """A strong ETag of the body: its content type and each part's indexed version."""
    digest = hashlib.sha256(content_type.encode("utf-8"))
    for i in instances:
        digest.update(b"\0".join(
            (i.store.encode(), i.key.encode(), i.etag.encode(), str(i.size).encode(),
             (i.TransferSyntaxUID or "").encode(), b"")
        ))  # fmt: skip
    return f'"{digest.hexdigest()[:40]}"'


def _boundary_of(etag: str) -> str:
    """The body's boundary: a hash of its ETag, which no part's bytes can contain by
    design (an object would have to hold a digest of its own ETag)."""
    return hashlib.sha256(b"multipart boundary " + etag.encode("ascii")).hexdigest()[:32]


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match (weak comparison): ``*`` or a list naming ``etag``."""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _wanted_range(
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


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of the body: literal bytes (part heads, the closing) or a whole object."""

    length: int
    data: bytes = b""
    instance: InstanceLocation | None = None


def _body_segments(boundary: str, instances: Sequence[InstanceLocation]) -> list[_Segment]:
    """The body :func:`_send_multipart` sends, as segments (same bytes, in order)."""
    out: list[_Segment] = []
    for index, instance in enumerate(instances):
        head = _part_head(boundary, _instance_part_type(instance), instance.size,
                          first=index == 0)  # fmt: skip
        out += [_Segment(len(head), head), _Segment(instance.size, instance=instance)]
    closing = _closing(boundary)
    return [*out, _Segment(len(closing), closing)]


async def _send_range(
    request: web.Request,
    content_type: str,
    segments: Sequence[_Segment],
    stores: Mapping[str, ObjectStore],
    start: int,
    stop: int,
    total: int,
    headers: Mapping[str, str],
    *,
    chunk_size: int,
) -> web.StreamResponse:
    """206 with bytes ``[start, stop)`` of the body; objects wholly outside are not read.

    Errors before the first byte propagate; later ones abort the connection, as for a
    whole body (:data:`STREAM_OUTCOME` tells which).
    """
    pieces: list[tuple[_Segment, int, int]] = []  # segment, offset in it, bytes
    position = 0
    for segment in segments:
        lo, hi = max(start, position), min(stop, position + segment.length)
        if lo < hi:
            pieces.append((segment, lo - position, hi - lo))
        position += segment.length

    async def body() -> AsyncGenerator[bytes, None]:
        for segment, offset, length in pieces:
            if segment.instance is None:
                yield segment.data[offset : offset + length]
            else:
                instance = segment.instance
                async with aclosing(_instance_chunks(
                    _store(stores, instance), instance, chunk_size, offset=offset, length=length
                )) as part:  # fmt: skip
                    async for chunk in part:
                        yield chunk

    chunks = body()
    try:
        first = await anext(chunks, b"")
        response = web.StreamResponse(status=206, headers={
            **headers, "Content-Type": content_type,
            "Content-Range": f"bytes {start}-{stop - 1}/{total}",
        })  # fmt: skip
        response.content_length = stop - start
        response[STREAM_OUTCOME] = "aborted"
        await response.prepare(request)
        try:
            await _write(response, first)
            async for chunk in chunks:
                await _write(response, chunk)
            await response.write_eof()
        except (_ClientGone, ConnectionError):
            response[STREAM_OUTCOME] = "client-gone"
        except Exception as exc:
            detail = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            log.warning("wado: ranged response aborted: %s", detail)
            await chunks.aclose()
            _abort(request)
        else:
            response[STREAM_OUTCOME] = "complete"
        return response
    finally:
        await chunks.aclose()


# ---------------------------------------------------------------------------
# Retrieve Metadata (PS3.18 10.4.1.1.2, F.2)


def _element_paths(ds: Dataset, prefix: str, paths: dict[int, str]) -> None:
    """Map each element object of ``ds`` (recursively) to its tag path."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:  # noqa: S112 - unreadable; _metadata_json logs and drops it
            continue
        path = f"{prefix}{int(tag):08X}"
        paths[id(element)] = path
        if element.VR == "SQ" and element.value:
            for index, item in enumerate(element.value):
                if isinstance(item, Dataset):
                    _element_paths(item, f"{path}/{index}/", paths)


def _int_value(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


_LAST: Final = float("inf")


def _metadata_json(
    instance: InstanceLocation, header: _Header, base: str
) -> tuple[tuple[float, str, float, str], dict[str, Any]]:
    """One instance's DICOM JSON (PS3.18 F.2) with BulkDataURIs, and its sort key."""
    ds = header.dataset
    # DICOM JSON is UTF-8 (PS3.18 F.2): text decoded with the instance's character sets.
    decode_text_values(ds)
    paths: dict[int, str] = {}
    _element_paths(ds, "", paths)

    def bulk_uri(element: Any) -> str:
        return f"{base}/bulkdata/{paths.get(id(element), f'{int(element.tag):08X}')}"

    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        try:
            out[f"{int(tag):08X}"] = ds[tag].to_json_dict(bulk_uri, BULK_DATA_THRESHOLD)
        except Exception as exc:
            # The tag only: pydicom's messages may quote the value.
            log.warning(
                "metadata: element (%04X,%04X) dropped: %s", tag >> 16, tag & 0xFFFF,
                type(exc).__name__,
            )  # fmt: skip
    if header.pixel_tag is not None:
        encapsulated = header.value_length is None
        vr = header.pixel_vr or ("OB" if encapsulated else _PIXEL_TAGS[header.pixel_tag])
        key = f"{header.pixel_tag:08X}"
        out[key] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/{key}"}
    # The stored transfer syntax, the attribute QIDO-RS instance results use for it.
    out.setdefault("00083002", {"vr": "UI", "Value": [header.transfer_syntax]})
    # Dates and times as QIDO-RS returns them: ACR-NEMA forms in the DICOM form (PS3.5 6.2).
    normalize_dicom_json(out)
    series_number = _int_value(ds, "SeriesNumber")
    instance_number = instance.InstanceNumber
    if instance_number is None:
        instance_number = _int_value(ds, "InstanceNumber")
    key_ = (
        _LAST if series_number is None else float(series_number),
        instance.SeriesInstanceUID,
        _LAST if instance_number is None else float(instance_number),
        instance.SOPInstanceUID,
    )
    return key_, dict(sorted(out.items()))


async def retrieve_metadata(
    instances: Sequence[InstanceLocation],
    stores: Mapping[str, ObjectStore],
    *,
    bulkdata_base: Callable[[InstanceLocation], str],
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> list[dict[str, Any]]:
    """Retrieve Study / Series / Instance Metadata as DICOM JSON objects (PS3.18 F.2).

    For each instance only its header is read (``header_bytes`` plus the pixel data
    element header, one ranged read; deflated objects whole), at most
    :data:`METADATA_CONCURRENCY` at a time. Binary values over 768 bytes and the pixel
    data become ``BulkDataURI``s under ``bulkdata_base(instance)`` (see the module
    docstring); ``AvailableTransferSyntaxUID`` (0008,3002) gives the stored transfer
    syntax. Elements after the pixel data are not included. The list is ordered by
    SeriesNumber, SeriesInstanceUID, InstanceNumber, SOPInstanceUID (missing numbers last).
    The caller serves it as ``application/dicom+json`` (see ``select_metadata``).

    Raises ``StorageError`` (store not configured, object changed since indexed),
    ``ObjectNotFound``, ``StoreUnavailable``, ``IntegrityError`` (header unreadable),
    ``NotAcceptable`` (a deflated object inflates past ``inflate_max_bytes``); the first
    failure cancels the other reads.
    """
    for instance in instances:
        _store(stores, instance)
    limit = asyncio.Semaphore(METADATA_CONCURRENCY)

    async def one(
        instance: InstanceLocation,
    ) -> tuple[tuple[float, str, float, str], dict[str, Any]]:
        base = bulkdata_base(instance).rstrip("/")
        async with limit:
            data, whole = await _read_header_bytes(_store(stores, instance), instance)
            header = await asyncio.to_thread(
                _parse_header, instance, data, whole=whole, inflate_max_bytes=inflate_max_bytes
            )
            return await asyncio.to_thread(_metadata_json, instance, header, base)

    results = await _gather([one(instance) for instance in instances])
    results.sort(key=lambda pair: pair[0])
    return [document for _, document in results]


metadata = retrieve_metadata
"""Alias of :func:`retrieve_metadata`."""


# ---------------------------------------------------------------------------
# Frames and pixel data (PS3.18 10.4.1.1.6 Pixel Data Resources)


def _frame_length(ds: Dataset) -> int:
    """Bytes of one native frame (PS3.5 8.1.1, PS3.3 C.7.6.3.1.2 for YBR_FULL_422)."""
    rows = _int_value(ds, "Rows")
    columns = _int_value(ds, "Columns")
    bits = _int_value(ds, "BitsAllocated")
    samples = _int_value(ds, "SamplesPerPixel") or 1
    if not rows or not columns or not bits:
        raise IntegrityError("pixel data without Rows, Columns or BitsAllocated")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "YBR_FULL_422":
        samples = 2  # two chroma samples shared by each pair of pixels
    total_bits = rows * columns * samples * bits
    if total_bits % 8:
        raise NotAcceptable(
            "frames of bit-packed pixel data that do not end on a byte boundary "
            "cannot be sent separately; retrieve the instance"
        )
    return total_bits // 8


class _FrameSource:
    """Reads single frames of one instance, touching only the byte ranges they occupy."""

    def __init__(self, store: ObjectStore, instance: InstanceLocation, header: _Header) -> None:
        self._store = store
        self._instance = instance
        self.header = header
        ds = header.dataset
        frames = _int_value(ds, "NumberOfFrames")
        self.number_of_frames = 1 if frames is None else frames
        self._offsets: list[tuple[int, int]] | None = None
        """Encapsulated: (offset, length) of each frame's items; None: not located yet."""
        self._pixel_bytes: bytes | None = None
        self._frame_length = 0
        if header.value_length is not None:
            self._frame_length = _frame_length(ds)

    @classmethod
    async def open(
        cls,
        store: ObjectStore,
        instance: InstanceLocation,
        *,
        inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
    ) -> _FrameSource:
        """Read the header (and the offset table); ``NotFound`` without pixel data,
        ``NotAcceptable`` for a deflated object inflating past ``inflate_max_bytes``."""
        frames = max(instance.NumberOfFrames or 1, 1)
        encapsulated = (instance.TransferSyntaxUID or _IMPLICIT) not in (
            NATIVE_LITTLE_ENDIAN | {EXPLICIT_VR_BIG_ENDIAN}
        )
        extra = 16 + 4 * frames if encapsulated else 0
        header = await _load_header(
            store, instance, extra=extra, inflate_max_bytes=inflate_max_bytes
        )
        if header.pixel_tag is None:
            raise NotFound("the instance has no pixel data")
        source = cls(store, instance, header)
        if header.value_length is not None:
            needed = source.number_of_frames * source._frame_length
            if header.value_length < needed:
                raise IntegrityError("pixel data is shorter than its frames")
            if header.value_offset and header.value_offset + needed > instance.size:
                # Whatever the index says: a frame that cannot be read whole is not sent.
                raise IntegrityError(
                    f"store {instance.store!r}: the object ends inside its pixel data "
                    "(truncated); its frames cannot be read whole"
                )
        return source

    @property
    def transfer_syntax(self) -> str:
        """The transfer syntax frames are offered in (as stored)."""
        return self.header.transfer_syntax

    @property
    def frame_syntax(self) -> str:
        """The transfer syntax of the bytes :meth:`frame` returns."""
        ts = self.header.transfer_syntax
        return EXPLICIT_VR_LITTLE_ENDIAN if ts in NATIVE_LITTLE_ENDIAN else ts

    def check(self, numbers: Sequence[int]) -> None:
        """``InvalidRequest`` for an empty list, numbers < 1, repeats or more numbers than
        the instance has frames; ``NotFound`` for a number past the last."""
        if not numbers:
            raise InvalidRequest("frames: the frame list is empty")
        n = self.number_of_frames
        if len(numbers) > n:
            raise InvalidRequest(
                f"frames: {len(numbers)} frames listed; the instance has {n} "
                f"frame{'s' if n != 1 else ''}"
            )
        if len(set(numbers)) != len(numbers):
            raise InvalidRequest("frames: a frame is listed twice")
        for number in numbers:
            if number < 1:
                raise InvalidRequest("frames: frame numbers start at 1")
            if number > self.number_of_frames:
                raise NotFound(
                    f"frame {number} does not exist; the instance has "
                    f"{self.number_of_frames} frame{'s' if self.number_of_frames != 1 else ''}"
                )

    async def _bytes(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; ``IntegrityError`` if the object ends first."""
        data = self.header.data
        if offset + length <= len(data):
            return data[offset : offset + length]
        got = await _read(self._store, self._instance, offset, length)
        if len(got) != length:
            raise IntegrityError(
                f"store {self._instance.store!r}: the object ends inside its pixel data "
                "(truncated); the frame cannot be read whole"
            )
        return got

    async def _whole_pixel_value(self) -> bytes:
        """The pixel data value from a full parse (deflated objects, odd layouts)."""
        if self._pixel_bytes is None:
            data = self.header.data
            if not self.header.whole:
                data = await _read(self._store, self._instance, 0, self._instance.size)
            full = await asyncio.to_thread(
                _read_whole, self._instance, data, self.header.inflate_max_bytes
            )
            tag = self.header.pixel_tag
            if tag is None or tag not in full:  # pragma: no cover - located before
                raise NotFound("the instance has no pixel data")
            self._pixel_bytes = bytes(full[tag].value)
        return self._pixel_bytes

    async def frame(self, number: int) -> bytes:
        """The bytes of frame ``number`` (1-based, checked): native or one compressed frame.

        Raises ``IntegrityError`` (malformed pixel data), ``StorageError`` (changed),
        ``ObjectNotFound``, ``StoreUnavailable``.
        """
        header = self.header
        if header.value_length is not None:
            size = self._frame_length
            if header.transfer_syntax == _DEFLATED or header.value_offset == 0:
                value = await self._whole_pixel_value()
                start = (number - 1) * size
                if start + size > len(value):
                    raise IntegrityError("pixel data is shorter than its frames")
                return value[start : start + size]
            return await self._bytes(header.value_offset + (number - 1) * size, size)
        if header.value_offset == 0:
            value = await self._whole_pixel_value()
            return await asyncio.to_thread(
                _frame_from_value, value, number - 1, self.number_of_frames
            )
        if self._offsets is None:
            self._offsets = await self._locate_frames()
        if not self._offsets:
            # No usable offset table for several frames: pydicom finds the frames in the
            # whole encapsulated value (PS3.5 A.4 allows fragments without an index).
            if self._pixel_bytes is None:
                self._pixel_bytes = await self._bytes(
                    header.value_offset, self._instance.size - header.value_offset
                )
            return await asyncio.to_thread(
                _frame_from_value, self._pixel_bytes, number - 1, self.number_of_frames
            )
        offset, length = self._offsets[number - 1]
        items = await self._bytes(offset, length)
        return _join_fragments(items)

    async def _locate_frames(self) -> list[tuple[int, int]]:
        """(offset, length) of each frame's fragment items, from EOT or BOT; [] if unknown."""
        header = self.header
        ds = header.dataset
        start = header.value_offset
        head = await self._bytes(start, 8)
        group, element, length = struct.unpack("<HHL", head)
        if (group << 16 | element) != _ITEM or length == _UNDEFINED or length % 4:
            raise IntegrityError("encapsulated pixel data does not start with an offset table")
        table = await self._bytes(start, 8 + length)
        first_item = start + 8 + length
        end = self._instance.size
        n = self.number_of_frames
        if _EXTENDED_OFFSET_TABLE in ds and _EXTENDED_OFFSET_TABLE_LENGTHS in ds:
            offsets = _uint64s(ds[_EXTENDED_OFFSET_TABLE].value)
            lengths = _uint64s(ds[_EXTENDED_OFFSET_TABLE_LENGTHS].value)
            if len(offsets) == n == len(lengths):
                frames = [(first_item + o, 8 + L) for o, L in zip(offsets, lengths, strict=True)]
                _check_ranges(frames, end)
                return frames
        try:
            basic = parse_basic_offsets(table)
        except Exception:
            raise IntegrityError("encapsulated pixel data has a malformed offset table") from None
        if basic and len(basic) == n:
            bounds = [first_item + o for o in basic] + [end]
            frames = [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]
            _check_ranges(frames, end)
            return frames
        if n == 1:
            return [(first_item, end - first_item)]
        return []


def _uint64s(value: Any) -> list[int]:
    raw = bytes(value or b"")
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8]))


def _check_ranges(frames: Sequence[tuple[int, int]], end: int) -> None:
    for offset, length in frames:
        if length <= 0 or offset + length > end:
            raise IntegrityError("encapsulated pixel data offsets point outside the object")


def _join_fragments(items: bytes) -> bytes:
    """The fragments in a run of encapsulated items (up to a delimiter or the end)."""
    _check_items(items)
    try:
        return b"".join(generate_fragments(items))
    except Exception:
        raise IntegrityError("encapsulated pixel data has malformed fragment items") from None


def _check_items(items: bytes) -> None:
    """``IntegrityError`` unless every item in ``items`` is whole (PS3.5 A.4).

    pydicom's ``generate_fragments`` hands back a short last fragment when the object
    ends inside it; such a frame must never be sent.
    """
    at = 0
    while at + 8 <= len(items):
        group, element, length = struct.unpack_from("<HHL", items, at)
        if (group << 16 | element) == _SEQUENCE_DELIMITER:
            return
        if (group << 16 | element) != _ITEM or length == _UNDEFINED:
            raise IntegrityError("encapsulated pixel data has malformed fragment items")
        at += 8 + length
    if at != len(items):
        raise IntegrityError(
            "the object ends inside its encapsulated pixel data (truncated); "
            "the frame cannot be read whole"
        )


def _frame_from_value(value: bytes, index: int, number_of_frames: int) -> bytes:
    _check_items(value)
    try:
        return bytes(get_frame(value, index, number_of_frames=number_of_frames))
    except Exception:
        raise IntegrityError("the frame cannot be found in the encapsulated pixel data") from None


async def _frame_parts(
    source: _FrameSource,
    numbers: Sequence[int],
    representation: Representation,
    *,
    max_bytes: int = TRANSCODE_MAX_BYTES,
) -> AsyncGenerator[_Part, None]:
    """One part per frame; converted off the loop when the chosen syntax is not the stored."""
    target = representation.transfer_syntax
    stored = source.frame_syntax
    for number in numbers:
        data = await source.frame(number)
        if target is not None and target != stored:
            data = await asyncio.to_thread(
                convert_frame, source.header.dataset, data, stored, target, max_bytes=max_bytes
            )
        yield _Part(representation.part_content_type, len(data), _single(data))


async def retrieve_frames(
    request: web.Request,
    instance: InstanceLocation,
    stores: Mapping[str, ObjectStore],
    frame_numbers: Sequence[int],
    *,
    accept: str | None,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> web.StreamResponse:
    """Retrieve Frames: the listed frames, one part each, in the order listed.

    Only the frames' byte ranges are read: for native pixel data computed from Rows,
    Columns, SamplesPerPixel and BitsAllocated; for encapsulated pixel data from the
    Extended or Basic Offset Table (one frame's items; the last frame up to the end of
    the object). Without an offset table a multi-frame value is read whole and split by
    pydicom; deflated objects are read whole (inflated at most ``inflate_max_bytes``,
    else ``NotAcceptable``). Uncompressed frames are sent as
    ``application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1`` (big endian as
    stored), compressed ones as stored in their image media type or, if the client asks
    with ``transfer-syntax=*`` or the stored UID, as ``application/octet-stream``.
    Otherwise, when the client asks for it, each frame is decoded to uncompressed
    ``application/octet-stream`` (Explicit VR LE, the default of 8.7.3) or encoded as
    ``image/dicom-rle`` or ``image/jp2`` (JPEG 2000 Lossless), off the event loop, each
    frame bounded by ``transcode_max_bytes``.

    Raises before anything is sent: ``NotAcceptable`` (see ``select_frames``),
    ``InvalidRequest`` (empty list, number < 1), ``NotFound`` (a frame past the last, no
    pixel data), ``IntegrityError``, ``StorageError``, ``ObjectNotFound``,
    ``StoreUnavailable``. A failure after the first part aborts the connection.
    """
    store = _store(stores, instance)
    select_frames(accept, instance.TransferSyntaxUID, producible=frame_why_not)  # before I/O
    source = await _FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
    representation = select_frames(accept, source.transfer_syntax, producible=frame_why_not)
    source.check(frame_numbers)
    parts = _frame_parts(source, frame_numbers, representation, max_bytes=transcode_max_bytes)
    content_type = _with_syntax(representation.content_type, representation.transfer_syntax)
    return await _send_multipart(request, content_type, parts)


# ---------------------------------------------------------------------------
# Bulkdata (PS3.18 10.4.1.1.5)


def parse_tag_path(text: str) -> tuple[int, ...]:
    """Read a bulkdata tag path: ``TAG`` or ``SEQTAG/ITEM/.../TAG`` (hex tags, 0-based items).

    Returns tags and item indexes alternating (an odd count, ending with a tag). Raises
    ``InvalidRequest`` for anything else.
    """
    segments = text.strip("/").split("/")
    if len(segments) % 2 == 0:
        raise InvalidRequest("a bulkdata path is TAG or SEQUENCE-TAG/ITEM-INDEX/.../TAG")
    out: list[int] = []
    for position, segment in enumerate(segments):
        if position % 2 == 0:
            if len(segment) != 8 or any(c not in "0123456789abcdefABCDEF" for c in segment):
                raise InvalidRequest("bulkdata tags are 8 hexadecimal digits")
            out.append(int(segment, 16))
        else:
            if not _ASCII_DIGITS.fullmatch(segment) or len(segment) > 6:
                raise InvalidRequest("bulkdata item indexes are decimal numbers from 0")
            out.append(int(segment))
    return tuple(out)


def _bulk_value(ds: Dataset, path: Sequence[int]) -> bytes:
    current = ds
    for position in range(0, len(path) - 1, 2):
        tag, index = path[position], path[position + 1]
        if tag not in current:
            raise NotFound("no bulk data at this path")
        element = current[tag]
        if element.VR != "SQ" or index >= len(element.value):
            raise NotFound("no bulk data at this path")
        current = element.value[index]
    tag = path[-1]
    if tag not in current:
        raise NotFound("no bulk data at this path")
    value = current[tag].value
    if not isinstance(value, bytes | bytearray) or not value:
        raise NotFound("no bulk data at this path")
    return bytes(value)


async def retrieve_bulkdata(
    request: web.Request,
    instance: InstanceLocation,
    stores: Mapping[str, ObjectStore],
    tag_path: str,
    *,
    accept: str | None,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> web.StreamResponse:
    """Serve a ``BulkDataURI`` written by :func:`retrieve_metadata`.

    The pixel data path (``7FE00010``, ``7FE00008``, ``7FE00009``) is served as frames
    1..n exactly like :func:`retrieve_frames` (transcoded the same way). Any other path gives one
    ``application/octet-stream`` part with the element's value bytes as stored (little
    endian unless the object is Explicit VR Big Endian); only elements before the pixel
    data (the header) are found.

    Raises ``InvalidRequest`` (malformed path), ``NotAcceptable``, ``NotFound`` (no such
    binary element), ``IntegrityError``, ``StorageError``, ``ObjectNotFound``,
    ``StoreUnavailable``.
    """
    path = parse_tag_path(tag_path)
    store = _store(stores, instance)
    if len(path) == 1 and path[0] in _PIXEL_TAGS:
        select_frames(accept, instance.TransferSyntaxUID, producible=frame_why_not)
        source = await _FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
        if source.header.pixel_tag != path[0]:
            raise NotFound("no bulk data at this path")
        representation = select_frames(accept, source.transfer_syntax, producible=frame_why_not)
        numbers = range(1, source.number_of_frames + 1)
        source.check(numbers)
        parts = _frame_parts(source, numbers, representation, max_bytes=transcode_max_bytes)
        content_type = _with_syntax(representation.content_type, representation.transfer_syntax)
        return await _send_multipart(request, content_type, parts)
    representation = select_bulkdata(accept)
    header = await _load_header(store, instance, inflate_max_bytes=inflate_max_bytes)
    value = _bulk_value(header.dataset, path)

    async def one() -> AsyncGenerator[_Part, None]:
        yield _Part(representation.part_content_type, len(value), _single(value))

    return await _send_multipart(request, representation.content_type, one())


# ---------------------------------------------------------------------------
# Rendered and thumbnail (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1)


def _first_number(value: Any) -> float | None:
    """The first of a possibly multi-valued number (WindowCenter may hold several)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _window_linear(
    values: npt.NDArray[np.float64], center: float, width: float
) -> npt.NDArray[np.uint8]:
    """PS3.3 C.11.2.1.2.1 linear VOI function onto 0..255."""
    width = max(width, 1.0)
    scaled = (values - (center - 0.5)) / max(width - 1.0, 1e-9) + 0.5
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _stretch(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    out: npt.NDArray[np.uint8] = np.rint((values - low) / (high - low) * 255.0).astype(np.uint8)
    return out


def _to_8bit(values: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    if bits > 8:
        values = np.right_shift(values.astype(np.uint32), bits - 8)
    out: npt.NDArray[np.uint8] = np.clip(values, 0, 255).astype(np.uint8)
    return out


def _display(
    pixels: npt.NDArray[Any], ds: Dataset, window: tuple[float, float] | None
) -> npt.NDArray[np.uint8]:
    """8-bit grey or RGB for display: Modality LUT, VOI (window), MONOCHROME1 inversion."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        return _to_8bit(rgb, int(descriptor[2]) if int(descriptor[2]) in (8, 16) else 16)
    if pixels.ndim == 3 or photometric not in _MONOCHROME:
        bits = _int_value(ds, "BitsStored") or _int_value(ds, "BitsAllocated") or 8
        return _to_8bit(pixels, bits)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if window is None:
        center = _first_number(ds.get("WindowCenter"))
        width = _first_number(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width)
    if window is not None:
        out = _window_linear(values, window[0], window[1])
    elif "VOILUTSequence" in ds:
        out = _stretch(np.asarray(apply_voi_lut(values, ds), dtype=np.float64))
    else:
        out = _stretch(values)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _render(
    header: Dataset,
    frame: bytes,
    syntax: str,
    *,
    media_type: str,
    window: tuple[float, float] | None,
    quality: int,
    viewport: tuple[int, int] | None,
) -> bytes:
    ds = single_frame_dataset(header, frame, syntax)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise IntegrityError(f"the frame cannot be decoded ({type(exc).__name__})") from None
    image = Image.fromarray(np.ascontiguousarray(_display(pixels, ds, window)))
    if viewport is not None:
        width, height = image.size
        # PS3.18 8.3.5.1.3 lets the server keep the aspect and size down; enlarging adds
        # no information and its cost grows with the viewport, not with the image.
        scale = min(viewport[0] / width, viewport[1] / height, 1.0)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _check_render_parameters(
    window: tuple[float, float] | None, quality: int | None, viewport: tuple[int, int] | None
) -> None:
    if window is not None and not window[1] > 0:
        raise InvalidRequest("the window width must be greater than 0")
    if quality is not None and not 1 <= quality <= 100:
        raise InvalidRequest("quality is 1 to 100")
    if viewport is not None and not all(1 <= v <= MAX_VIEWPORT for v in viewport):
        raise InvalidRequest(f"viewport: width and height are 1 to {MAX_VIEWPORT} pixels")


async def _render_instance(
    instance: InstanceLocation,
    stores: Mapping[str, ObjectStore],
    representation: Representation,
    *,
    window: tuple[float, float] | None,
    quality: int | None,
    viewport: tuple[int, int] | None,
    frame: int,
    inflate_max_bytes: int,
) -> tuple[bytes, str]:
    _check_render_parameters(window, quality, viewport)
    store = _store(stores, instance)
    source = await _FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
    source.check([frame])
    syntax = source.frame_syntax
    if UID(syntax).is_encapsulated and not can_decode(syntax):
        raise NotAcceptable(
            f"instances in transfer syntax {syntax} cannot be rendered here "
            "(no decoder installed); retrieve the frames or the instance"
        )
    data = await source.frame(frame)
    body = await asyncio.to_thread(
        _render,
        source.header.dataset,
        data,
        syntax,
        media_type=representation.media_type,
        window=window,
        quality=quality or DEFAULT_JPEG_QUALITY,
        viewport=viewport,
    )
    return body, representation.media_type


async def retrieve_rendered(
    instance: InstanceLocation,
    stores: Mapping[str, ObjectStore],
    *,
    accept: str | None,
    window: tuple[float, float] | None = None,
    quality: int | None = None,
    viewport: tuple[int, int] | None = None,
    frame: int = 1,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> tuple[bytes, str]:
    """Retrieve Rendered Instance / Frame: one frame as JPEG (default) or PNG.

    Reads the header and that frame's bytes only, decodes with pydicom (native, RLE, and
    JPEG baseline/extended and JPEG 2000 through Pillow), applies the Modality LUT, the
    window (``window`` = (center, width) in modality units, else the header's first
    WindowCenter/WindowWidth, else a VOI LUT, else min-max), inverts MONOCHROME1, and
    passes colour through. ``viewport`` = (width, height, each 1 to :data:`MAX_VIEWPORT`)
    scales the image down to fit, keeping its aspect ratio; it is never enlarged, so the
    output is at most the frame's own size. ``quality`` (1-100, default 90) applies to JPEG. Returns
    (body, media type).

    Raises ``NotAcceptable`` (Accept refuses JPEG and PNG, or no decoder for the stored
    syntax: JPEG Lossless, JPEG-LS, HTJ2K, video), ``InvalidRequest`` (parameters),
    ``NotFound`` (no pixel data, frame past the last), ``IntegrityError`` (undecodable),
    ``StorageError``, ``ObjectNotFound``, ``StoreUnavailable``.
    """
    representation = select_rendered(accept)
    return await _render_instance(
        instance, stores, representation,
        window=window, quality=quality, viewport=viewport, frame=frame,
        inflate_max_bytes=inflate_max_bytes,
    )  # fmt: skip


async def retrieve_thumbnail(
    instance: InstanceLocation,
    stores: Mapping[str, ObjectStore],
    *,
    accept: str | None,
    viewport: tuple[int, int] | None = None,
    quality: int | None = None,
    frame: int = 1,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> tuple[bytes, str]:
    """Retrieve Thumbnail: like :func:`retrieve_rendered`, shrunk to fit ``viewport``.

    The viewport defaults to :data:`THUMBNAIL_VIEWPORT` (128 x 128) and a thumbnail is
    never enlarged. For a study or series thumbnail pass
    :func:`representative_instance` of its instances. Raises what
    :func:`retrieve_rendered` raises.
    """
    representation = select_thumbnail(accept)
    return await _render_instance(
        instance, stores, representation,
        window=None, quality=quality, viewport=viewport or THUMBNAIL_VIEWPORT, frame=frame,
        inflate_max_bytes=inflate_max_bytes,
    )  # fmt: skip


rendered = retrieve_rendered
"""Alias of :func:`retrieve_rendered`."""
thumbnail = retrieve_thumbnail
"""Alias of :func:`retrieve_thumbnail`."""


def representative_instance(instances: Sequence[InstanceLocation]) -> InstanceLocation:
    """The image a study or series thumbnail shows: the middle image of its largest series.

    Only instances with Rows (images) count; ties go to the lower SeriesInstanceUID.
    Raises ``NotFound`` when there is no image.
    """
    images = [i for i in instances if i.Rows]
    if not images:
        raise NotFound("no image to make a thumbnail from")
    series: dict[str, list[InstanceLocation]] = {}
    for image in images:
        series.setdefault(image.SeriesInstanceUID, []).append(image)
    uid = min(series, key=lambda s: (-len(series[s]), s))
    members = sorted(
        series[uid],
        key=lambda i: (i.InstanceNumber is None, i.InstanceNumber or 0, i.SOPInstanceUID),
    )
    return members[(len(members) - 1) // 2]


# ---------------------------------------------------------------------------
# Request parameters (PS3.18 8.3.3.1 frame lists, 8.3.5.1 rendering parameters)


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` -> [1, 3, 5] (order kept).

    Raises ``InvalidRequest`` (naming ``frames``) when malformed, when a frame is listed
    twice (each repeat would be read and sent again: PS3.18 8.3.3.1 lists frames, it
    does not ask for copies) or when more than :data:`MAX_FRAME_LIST` frames are listed.
    The instance's own bound (its NumberOfFrames) is checked once its header is read.
    """
    pieces = text.split(",")
    if len(pieces) > MAX_FRAME_LIST:
        raise InvalidRequest(
            f"frames: at most {MAX_FRAME_LIST} frames a request ({len(pieces)} listed); "
            "retrieve the pixel data's bulk data URI for all frames"
        )
    numbers: list[int] = []
    seen: set[int] = set()
    for piece in pieces:
        piece = piece.strip()
        if not _ASCII_DIGITS.fullmatch(piece) or len(piece) > 9:
            raise InvalidRequest("frames: a frame list is comma-separated frame numbers from 1")
        number = int(piece)
        if number < 1:
            raise InvalidRequest("frames: frame numbers start at 1")
        if number in seen:
            raise InvalidRequest(f"frames: frame {number} is listed twice")
        seen.add(number)
        numbers.append(number)
    return numbers


def parse_window(text: str) -> tuple[float, float]:
    """``"center,width[,linear]"`` -> (center, width). ``InvalidRequest`` if malformed.

    Only the ``linear`` VOI LUT function is supported (``linear-exact`` and ``sigmoid``
    are refused).
    """
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) not in (2, 3) or (len(pieces) == 3 and pieces[2].lower() != "linear"):
        raise InvalidRequest("window is center,width[,linear]")
    try:
        center, width = float(pieces[0]), float(pieces[1])
    except ValueError:
        raise InvalidRequest("window center and width are numbers") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise InvalidRequest("the window width must be greater than 0")
    return center, width


def parse_viewport(text: str) -> tuple[int, int]:
    """``"vw,vh"`` -> (vw, vh), each 1 to :data:`MAX_VIEWPORT`.

    Source regions (sx,sy,sw,sh) and impossible sizes are refused: ``InvalidRequest``.
    """
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) != 2 or not all(_ASCII_DIGITS.fullmatch(p) and len(p) <= 9 for p in pieces):
        raise InvalidRequest("viewport is width,height in pixels")
    width, height = int(pieces[0]), int(pieces[1])
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise InvalidRequest(f"viewport: width and height are 1 to {MAX_VIEWPORT} pixels")
    return width, height


def parse_quality(text: str) -> int:
    """``"75"`` -> 75 (1-100). ``InvalidRequest`` otherwise."""
    text = text.strip()
    if not _ASCII_DIGITS.fullmatch(text) or not 1 <= int(text) <= 100:
        raise InvalidRequest("quality is 1 to 100")
    return int(text)
