"""WADO-RS retrieve use cases (PS3.18 10.4): instances, metadata, frames, bulkdata, rendered.

Every retrieve takes the ``ReleasedInstances`` the gate gave the request
(``RetrieveService.locate``: ``Gate.locate`` checks consent and writes the audit record),
never a bare location, so nothing reads a store for a request the gate did not see; and
nothing here knows aiohttp: a retrieve yields :class:`Part`s (content type, length,
body chunks or store bodies to relay) that ``api/streaming.py`` writes to the client,
with multipart/related framing from ``dicom/multipart.py``. Pixel data and frame
location, bulk data paths and rendering are pure functions in ``dicom/pixels.py`` and
``dicom/rendering.py``; this module does the reads they need.

Every object is read from its store with the ETag the index recorded: an object that
vanished or changed since it was indexed is never served (it may be another patient's
now). Before the first part is read that is an error the middleware turns into JSON;
once a body has started, the error surfaces from the part being read and the handler
cuts the connection, so the client cannot mistake a cut body for a whole one.

URIs this module writes into metadata, relative to ``bulkdata_base(instance)`` (the
instance's Retrieve Instance URL, ``.../studies/{study}/series/{series}/instances/{sop}``):

* ``{base}/bulkdata/{tag path}`` for every binary value longer than 768 bytes (pydicom's
  ``bulk_data_threshold`` 1024 counts base64 characters). The tag path is the element's
  tag as 8 upper-case hex digits, preceded for nested elements by each enclosing
  sequence's tag and the 0-based item index: ``00540016/0/00181072``
  (``dicom.pixels.parse_tag_path`` reads it back, :func:`retrieve_bulkdata` serves it).
* ``{base}/bulkdata/7FE00010`` (or 7FE00008 / 7FE00009) for the pixel data, served
  exactly like frames 1..n, one frame per part. A frame list URI
  (``{base}/frames/1,2,...,n``) would name the same bytes, but for a cine of thousands
  of frames it exceeds request-line limits (aiohttp's included), so it is not used.
"""

from __future__ import annotations

import asyncio
import logging
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
from typing import Any, Final, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID

from imaging_gateway.dicom.deflate import DEFAULT_INFLATE_MAX_BYTES
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
from imaging_gateway.dicom.multipart import closing, part_head, with_syntax
from imaging_gateway.dicom.pixels import (
    DEFLATED,
    IMPLICIT,
    ITEM,
    PIXEL_TAGS,
    UNDEFINED,
    Header,
    bulk_value,
    frame_extents,
    frame_from_value,
    frame_length,
    int_value,
    join_fragments,
    parse_header,
    parse_tag_path,
    read_whole,
)
from imaging_gateway.dicom.rendering import (
    DEFAULT_JPEG_QUALITY,
    THUMBNAIL_VIEWPORT,
    check_render_parameters,
    render,
)
from imaging_gateway.dicom.temporal import normalize_dicom_json
from imaging_gateway.dicom.transcode import (
    can_decode,
    convert_frame,
    frame_why_not,
    transcode_instance,
    why_not,
)
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import (
    IntegrityError,
    InvalidQuery,
    InvalidRequest,
    NotAcceptable,
    NotFound,
    StorageError,
)
from imaging_gateway.security.access import AccessContext
from imaging_gateway.security.gate import Gate, ReleasedInstances
from imaging_gateway.storage.base import ObjectStore, close_stream
from imaging_gateway.storage.zerocopy import (
    BodyOpener,
    OpenBody,
    opens_bodies,
)

__all__ = [
    "BULK_DATA_THRESHOLD",
    "CHUNK_SIZE",
    "INFLATE_MAX_BYTES",
    "PREFETCH_INSTANCES",
    "TRANSCODE_MAX_BYTES",
    "FrameSource",
    "InstanceRetrieval",
    "Multipart",
    "Part",
    "ReleasedInstances",
    "RetrieveService",
    "metadata",
    "rendered",
    "representative_instance",
    "retrieve_bulkdata",
    "retrieve_frames",
    "retrieve_instances",
    "retrieve_metadata",
    "retrieve_rendered",
    "retrieve_thumbnail",
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
INFLATE_MAX_BYTES: Final = DEFAULT_INFLATE_MAX_BYTES
"""Default bound on what a deflated object is inflated to when read whole (PS3.5 A.5)."""
TRANSCODE_MAX_BYTES: Final = 512 << 20
"""Default bound on the memory one transcoded instance may take (stored + decoded bytes)."""


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
# Headers


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
        or instance.TransferSyntaxUID == DEFLATED
        or want >= instance.size
    ):
        return await _read(store, instance, 0, instance.size), True
    return await _read(store, instance, 0, want), False


async def _load_header(
    store: ObjectStore,
    instance: InstanceLocation,
    *,
    extra: int = 0,
    inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
) -> Header:
    data, whole = await _read_header_bytes(store, instance, extra=extra)
    return await asyncio.to_thread(
        parse_header, instance, data, whole=whole, inflate_max_bytes=inflate_max_bytes
    )


# ---------------------------------------------------------------------------
# Parts (the handler frames them as multipart/related: api/streaming.py)


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a multipart/related body: its Content-Type, its Content-Length (None:
    unknown until read) and its body, read as it is sent."""

    content_type: str
    length: int | None
    body: AsyncGenerator[bytes | OpenBody, None]
    """Bytes to write, or a store body for the response's ``Relay`` to splice through."""


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
) -> AsyncGenerator[Part, None]:
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
                yield Part(_instance_part_type(instance), instance.size, body)
            else:
                data = await _transcoded(
                    _store(stores, instance), instance, target, max_bytes, max_inflated
                )
                part_type = _instance_part_type(instance, target)
                yield Part(part_type, len(data), _single(data))
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


@dataclass(frozen=True, slots=True)
class InstanceRetrieval:
    """A Retrieve Study / Series / Instance, negotiated and checked, not yet read.

    ``content_type`` is the body's (without its boundary); :meth:`parts` gives one part
    per instance in the order given. ``layout`` (each part's content type and length,
    from the indexed sizes) is known when every instance is sent as stored: the body
    then has a Content-Length, a strong ETag and byte ranges (:meth:`byte_range`). It is
    None when some instance is transcoded (part lengths are known only once each is).
    """

    instances: Sequence[InstanceLocation]
    stores: Mapping[str, ObjectStore]
    content_type: str
    layout: Sequence[tuple[str, int]] | None
    targets: Sequence[str | None] | None
    """``targets[i]``: the syntax instance ``i`` is transcoded to (None: as stored)."""
    chunk_size: int
    transcode_max_bytes: int
    inflate_max_bytes: int

    def parts(self, *, relay: bool) -> AsyncGenerator[Part, None]:
        """The parts, the next :data:`PREFETCH_INSTANCES` instances read ahead concurrently.

        With ``relay`` (the response can splice: ``storage.zerocopy``) the instances of a
        store that opens bodies are opened ahead and their parts yield ``OpenBody``s.
        Errors surface when the part they concern is read.
        """
        return _instance_parts(
            self.instances,
            self.stores,
            chunk_size=self.chunk_size,
            prefetch=PREFETCH_INSTANCES,
            targets=self.targets,
            max_bytes=self.transcode_max_bytes,
            max_inflated=self.inflate_max_bytes,
            relay=relay,
        )

    def byte_range(self, boundary: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``[start, stop)`` of the whole body framed with ``boundary`` (as stored
        only: ``layout`` is not None); objects wholly outside the range are not read."""
        return _body_range(
            _body_segments(boundary, self.instances), self.stores, start, stop,
            chunk_size=self.chunk_size,
        )  # fmt: skip


def retrieve_instances(
    released: ReleasedInstances,
    stores: Mapping[str, ObjectStore],
    *,
    accept: str | None,
    chunk_size: int = CHUNK_SIZE,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> InstanceRetrieval:
    """Retrieve Study / Series / Instance: ``instances`` as multipart/related parts.

    The body is ``multipart/related; type="application/dicom"``, one part per instance
    in the order given, each part ``Content-Type: application/dicom;
    transfer-syntax=<stored>`` with its ``Content-Length``. Objects are copied from the
    store in ``chunk_size`` pieces, the next :data:`PREFETCH_INSTANCES` instances read
    concurrently while one is sent; memory holds at most about ``PREFETCH_INSTANCES x
    (READ_AHEAD_CHUNKS + 1) x chunk_size`` (24 MiB), whatever the study size. When the
    store opens bodies (``S3Store.open_body``, plain HTTP) and the response can splice
    (``parts(relay=True)``), the instances ahead are opened instead (request sent, head
    read) and wait in their sockets, so nothing is buffered in the process. Through an
    ``EncryptedStore`` over such a store, plain objects are spliced the same way and
    encrypted ones relayed decrypting (``DecryptingBody``); their sizes and offsets are
    plaintext, so the rest of a body whose store connection ended early is read as for
    a plain one.

    Transfer syntaxes are negotiated per stored syntax (``select_instances``): an instance
    whose stored syntax the client accepts is copied byte for byte, without parsing;
    another is read whole, transcoded off the event loop (``transcode_instance``) and
    sent with ``Content-Type: application/dicom; transfer-syntax=<sent>``, one such
    instance in memory at a time, each bounded by ``transcode_max_bytes`` (a deflated one
    inflated at most ``inflate_max_bytes``). A body with transcoded parts has no
    ``layout`` (no Content-Length; parts keep theirs).

    Raises, before anything is read: ``NotFound`` (no instances), ``NotAcceptable`` (no
    accepted syntax can be made for some stored one, or an instance to transcode is
    larger than ``transcode_max_bytes``), ``StorageError`` (a store is not configured).
    Reading the parts raises ``StorageError`` (an object changed since it was indexed),
    ``ObjectNotFound`` and ``StoreUnavailable``.
    """
    instances = released.instances
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
    content_type = with_syntax(representation.content_type, representation.transfer_syntax)
    transcoding = any(target is not None for target in targets)
    layout = (
        None if transcoding
        else [(_instance_part_type(instance), instance.size) for instance in instances]
    )  # fmt: skip
    return InstanceRetrieval(
        instances=instances,
        stores=stores,
        content_type=content_type,
        layout=layout,
        targets=targets if transcoding else None,
        chunk_size=chunk_size,
        transcode_max_bytes=transcode_max_bytes,
        inflate_max_bytes=inflate_max_bytes,
    )


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of the body: literal bytes (part heads, the closing) or a whole object."""

    length: int
    data: bytes = b""
    instance: InstanceLocation | None = None


def _body_segments(boundary: str, instances: Sequence[InstanceLocation]) -> list[_Segment]:
    """The body of :meth:`InstanceRetrieval.parts` framed with ``boundary``, as segments
    (the same bytes, in order)."""
    out: list[_Segment] = []
    for index, instance in enumerate(instances):
        head = part_head(boundary, _instance_part_type(instance), instance.size,
                          first=index == 0)  # fmt: skip
        out += [_Segment(len(head), head), _Segment(instance.size, instance=instance)]
    end = closing(boundary)
    return [*out, _Segment(len(end), end)]


async def _body_range(
    segments: Sequence[_Segment],
    stores: Mapping[str, ObjectStore],
    start: int,
    stop: int,
    *,
    chunk_size: int,
) -> AsyncGenerator[bytes, None]:
    """Bytes ``[start, stop)`` of the body the segments make, reading only the objects
    (and the byte ranges of them) that the range covers."""
    pieces: list[tuple[_Segment, int, int]] = []  # segment, offset in it, bytes
    position = 0
    for segment in segments:
        lo, hi = max(start, position), min(stop, position + segment.length)
        if lo < hi:
            pieces.append((segment, lo - position, hi - lo))
        position += segment.length
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


_LAST: Final = float("inf")


def _metadata_json(
    instance: InstanceLocation, header: Header, base: str
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
        vr = header.pixel_vr or ("OB" if encapsulated else PIXEL_TAGS[header.pixel_tag])
        key = f"{header.pixel_tag:08X}"
        out[key] = {"vr": vr, "BulkDataURI": f"{base}/bulkdata/{key}"}
    # The stored transfer syntax, the attribute QIDO-RS instance results use for it.
    out.setdefault("00083002", {"vr": "UI", "Value": [header.transfer_syntax]})
    # Dates and times as QIDO-RS returns them: ACR-NEMA forms in the DICOM form (PS3.5 6.2).
    normalize_dicom_json(out)
    series_number = int_value(ds, "SeriesNumber")
    instance_number = instance.InstanceNumber
    if instance_number is None:
        instance_number = int_value(ds, "InstanceNumber")
    key_ = (
        _LAST if series_number is None else float(series_number),
        instance.SeriesInstanceUID,
        _LAST if instance_number is None else float(instance_number),
        instance.SOPInstanceUID,
    )
    return key_, dict(sorted(out.items()))


async def retrieve_metadata(
    released: ReleasedInstances,
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
    instances = released.instances
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
                parse_header, instance, data, whole=whole, inflate_max_bytes=inflate_max_bytes
            )
            return await asyncio.to_thread(_metadata_json, instance, header, base)

    results = await _gather([one(instance) for instance in instances])
    results.sort(key=lambda pair: pair[0])
    return [document for _, document in results]


metadata = retrieve_metadata
"""Alias of :func:`retrieve_metadata`."""


# ---------------------------------------------------------------------------
# Frames and pixel data (PS3.18 10.4.1.1.6 Pixel Data Resources)


class FrameSource:
    """Reads single frames of one instance, touching only the byte ranges they occupy."""

    def __init__(self, store: ObjectStore, instance: InstanceLocation, header: Header) -> None:
        self._store = store
        self._instance = instance
        self.header = header
        ds = header.dataset
        frames = int_value(ds, "NumberOfFrames")
        self.number_of_frames = 1 if frames is None else frames
        self._offsets: list[tuple[int, int]] | None = None
        """Encapsulated: (offset, length) of each frame's items; None: not located yet."""
        self._pixel_bytes: bytes | None = None
        self.frame_length = 0
        if header.value_length is not None:
            self.frame_length = frame_length(ds)

    @classmethod
    async def open(
        cls,
        store: ObjectStore,
        instance: InstanceLocation,
        *,
        inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
    ) -> FrameSource:
        """Read the header (and the offset table); ``NotFound`` without pixel data,
        ``NotAcceptable`` for a deflated object inflating past ``inflate_max_bytes``."""
        frames = max(instance.NumberOfFrames or 1, 1)
        encapsulated = (instance.TransferSyntaxUID or IMPLICIT) not in (
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
            needed = source.number_of_frames * source.frame_length
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
                read_whole, self._instance, data, self.header.inflate_max_bytes
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
            size = self.frame_length
            if header.transfer_syntax == DEFLATED or header.value_offset == 0:
                value = await self._whole_pixel_value()
                start = (number - 1) * size
                if start + size > len(value):
                    raise IntegrityError("pixel data is shorter than its frames")
                return value[start : start + size]
            return await self._bytes(header.value_offset + (number - 1) * size, size)
        if header.value_offset == 0:
            value = await self._whole_pixel_value()
            return await asyncio.to_thread(
                frame_from_value, value, number - 1, self.number_of_frames
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
                frame_from_value, self._pixel_bytes, number - 1, self.number_of_frames
            )
        offset, length = self._offsets[number - 1]
        items = await self._bytes(offset, length)
        return join_fragments(items)

    async def _locate_frames(self) -> list[tuple[int, int]]:
        """(offset, length) of each frame's fragment items, from EOT or BOT; [] if unknown."""
        header = self.header
        start = header.value_offset
        head = await self._bytes(start, 8)
        group, element, length = struct.unpack("<HHL", head)
        if (group << 16 | element) != ITEM or length == UNDEFINED or length % 4:
            raise IntegrityError("encapsulated pixel data does not start with an offset table")
        table = await self._bytes(start, 8 + length)
        first_item = start + 8 + length
        return frame_extents(
            header.dataset, table, first_item, self._instance.size, self.number_of_frames
        )


async def _frame_parts(
    source: FrameSource,
    numbers: Sequence[int],
    representation: Representation,
    *,
    max_bytes: int = TRANSCODE_MAX_BYTES,
) -> AsyncGenerator[Part, None]:
    """One part per frame; converted off the loop when the chosen syntax is not the stored."""
    target = representation.transfer_syntax
    stored = source.frame_syntax
    for number in numbers:
        data = await source.frame(number)
        if target is not None and target != stored:
            data = await asyncio.to_thread(
                convert_frame, source.header.dataset, data, stored, target, max_bytes=max_bytes
            )
        yield Part(representation.part_content_type, len(data), _single(data))


@dataclass(frozen=True, slots=True)
class Multipart:
    """A multipart/related body to send: its content type (without the boundary) and
    its parts, read as they are sent."""

    content_type: str
    parts: AsyncGenerator[Part, None]


async def retrieve_frames(
    released: ReleasedInstances,
    stores: Mapping[str, ObjectStore],
    frame_numbers: Sequence[int],
    *,
    accept: str | None,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> Multipart:
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

    ``released`` names one instance (the first is served).

    Raises before anything is sent: ``NotAcceptable`` (see ``select_frames``),
    ``InvalidRequest`` (empty list, number < 1), ``NotFound`` (a frame past the last, no
    pixel data), ``IntegrityError``, ``StorageError``, ``ObjectNotFound``,
    ``StoreUnavailable``. Reading the parts raises the same errors (after the first
    part is sent, the handler aborts the connection).
    """
    instance = released.instances[0]
    store = _store(stores, instance)
    select_frames(accept, instance.TransferSyntaxUID, producible=frame_why_not)  # before I/O
    source = await FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
    representation = select_frames(accept, source.transfer_syntax, producible=frame_why_not)
    source.check(frame_numbers)
    parts = _frame_parts(source, frame_numbers, representation, max_bytes=transcode_max_bytes)
    content_type = with_syntax(representation.content_type, representation.transfer_syntax)
    return Multipart(content_type, parts)


# ---------------------------------------------------------------------------
# Bulkdata (PS3.18 10.4.1.1.5)


async def retrieve_bulkdata(
    released: ReleasedInstances,
    stores: Mapping[str, ObjectStore],
    tag_path: str,
    *,
    accept: str | None,
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES,
    inflate_max_bytes: int = INFLATE_MAX_BYTES,
) -> Multipart:
    """Serve a ``BulkDataURI`` written by :func:`retrieve_metadata`.

    The pixel data path (``7FE00010``, ``7FE00008``, ``7FE00009``) is served as frames
    1..n exactly like :func:`retrieve_frames` (transcoded the same way). Any other path gives one
    ``application/octet-stream`` part with the element's value bytes as stored (little
    endian unless the object is Explicit VR Big Endian); only elements before the pixel
    data (the header) are found.

    ``released`` names one instance (the first is served). Raises ``InvalidRequest``
    (malformed path), ``NotAcceptable``, ``NotFound`` (no such binary element),
    ``IntegrityError``, ``StorageError``, ``ObjectNotFound``, ``StoreUnavailable``.
    """
    instance = released.instances[0]
    path = parse_tag_path(tag_path)
    store = _store(stores, instance)
    if len(path) == 1 and path[0] in PIXEL_TAGS:
        select_frames(accept, instance.TransferSyntaxUID, producible=frame_why_not)
        source = await FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
        if source.header.pixel_tag != path[0]:
            raise NotFound("no bulk data at this path")
        representation = select_frames(accept, source.transfer_syntax, producible=frame_why_not)
        numbers = range(1, source.number_of_frames + 1)
        source.check(numbers)
        parts = _frame_parts(source, numbers, representation, max_bytes=transcode_max_bytes)
        content_type = with_syntax(representation.content_type, representation.transfer_syntax)
        return Multipart(content_type, parts)
    representation = select_bulkdata(accept)
    header = await _load_header(store, instance, inflate_max_bytes=inflate_max_bytes)
    value = bulk_value(header.dataset, path)

    async def one() -> AsyncGenerator[Part, None]:
        yield Part(representation.part_content_type, len(value), _single(value))

    return Multipart(representation.content_type, one())


# ---------------------------------------------------------------------------
# Rendered and thumbnail (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5.1)


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
    check_render_parameters(window, quality, viewport)
    store = _store(stores, instance)
    source = await FrameSource.open(store, instance, inflate_max_bytes=inflate_max_bytes)
    source.check([frame])
    syntax = source.frame_syntax
    if UID(syntax).is_encapsulated and not can_decode(syntax):
        raise NotAcceptable(
            f"instances in transfer syntax {syntax} cannot be rendered here "
            "(no decoder installed); retrieve the frames or the instance"
        )
    data = await source.frame(frame)
    body = await asyncio.to_thread(
        render,
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
    released: ReleasedInstances,
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

    Of a study or series (several instances released) the representative image is
    rendered (:func:`representative_instance`).

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
    instances = released.instances
    instance = instances[0] if len(instances) == 1 else representative_instance(instances)
    return await _render_instance(
        instance, stores, representation,
        window=window, quality=quality, viewport=viewport, frame=frame,
        inflate_max_bytes=inflate_max_bytes,
    )  # fmt: skip


async def retrieve_thumbnail(
    released: ReleasedInstances,
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
    never enlarged. It shows :func:`representative_instance` of the released instances.
    Raises what :func:`retrieve_rendered` raises.
    """
    representation = select_thumbnail(accept)
    instance = representative_instance(released.instances)
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
# The use case as the API calls it


@dataclass(frozen=True, slots=True)
class RetrieveService:
    """WADO-RS for the API: the gate releases, the functions above read (one per app)."""

    gate: Gate
    stores: Mapping[str, ObjectStore]
    transcode_max_bytes: int = TRANSCODE_MAX_BYTES
    inflate_max_bytes: int = INFLATE_MAX_BYTES

    async def locate(
        self,
        ctx: AccessContext,
        *,
        action: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        problem: str | None = None,
    ) -> ReleasedInstances:
        """The instances the caller may read, released and audited by the gate.

        ``problem``: what is wrong with the request's path UIDs (the handler's parse),
        refused as ``InvalidQuery`` and audited without the UIDs, which no study can
        have. Raises ``NotFound`` (audited) as ``Gate.locate`` does.
        """
        if problem is not None:
            await self.gate.refused_input(ctx, action=action, reason=problem)
            raise InvalidQuery(problem)
        return await self.gate.locate(
            ctx, action=action, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
        )

    def instances(self, released: ReleasedInstances, *, accept: str | None) -> InstanceRetrieval:
        """Retrieve Study / Series / Instance (:func:`retrieve_instances`)."""
        return retrieve_instances(
            released, self.stores, accept=accept,
            transcode_max_bytes=self.transcode_max_bytes,
            inflate_max_bytes=self.inflate_max_bytes,
        )  # fmt: skip

    async def metadata(
        self, released: ReleasedInstances, *, bulkdata_base: Callable[[InstanceLocation], str]
    ) -> list[dict[str, Any]]:
        """Retrieve Metadata (:func:`retrieve_metadata`)."""
        return await retrieve_metadata(
            released, self.stores, bulkdata_base=bulkdata_base,
            inflate_max_bytes=self.inflate_max_bytes,
        )  # fmt: skip

    async def frames(
        self, released: ReleasedInstances, numbers: Sequence[int], *, accept: str | None
    ) -> Multipart:
        """Retrieve Frames (:func:`retrieve_frames`)."""
        return await retrieve_frames(
            released, self.stores, numbers, accept=accept,
            transcode_max_bytes=self.transcode_max_bytes,
            inflate_max_bytes=self.inflate_max_bytes,
        )  # fmt: skip

    async def bulkdata(
        self, released: ReleasedInstances, tag_path: str, *, accept: str | None
    ) -> Multipart:
        """A BulkDataURI's value (:func:`retrieve_bulkdata`)."""
        return await retrieve_bulkdata(
            released, self.stores, tag_path, accept=accept,
            transcode_max_bytes=self.transcode_max_bytes,
            inflate_max_bytes=self.inflate_max_bytes,
        )  # fmt: skip

    async def rendered(
        self,
        released: ReleasedInstances,
        *,
        thumbnail: bool,
        accept: str | None,
        window: tuple[float, float] | None,
        quality: int | None,
        viewport: tuple[int, int] | None,
        frame: int,
    ) -> tuple[bytes, str]:
        """Retrieve Rendered (:func:`retrieve_rendered`) or Thumbnail (``thumbnail``)."""
        if thumbnail:
            return await retrieve_thumbnail(
                released, self.stores, accept=accept, viewport=viewport, quality=quality,
                frame=frame, inflate_max_bytes=self.inflate_max_bytes,
            )  # fmt: skip
        return await retrieve_rendered(
            released, self.stores, accept=accept, window=window, quality=quality,
            viewport=viewport, frame=frame, inflate_max_bytes=self.inflate_max_bytes,
        )  # fmt: skip

    async def ended(self, released: ReleasedInstances, *, outcome: str, bytes_sent: int) -> None:
        """How a streamed retrieve ended: one short of its body gets its follow-up
        audit record (``Gate.retrieve_ended``); a complete one needs none."""
        if outcome != "complete":
            await self.gate.retrieve_ended(released, outcome=outcome, bytes_sent=bytes_sent)
