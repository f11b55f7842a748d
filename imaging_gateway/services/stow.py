"""STOW-RS (PS3.18 10.5): stream a request's DICOM parts into the write store and index them.

``POST /dicomweb/studies[/{study}]`` with ``multipart/related; type="application/dicom"``.
Each part is one PS3.10 file. It is read once, as it arrives: the first bytes (64 KiB,
more only while the header needs them, at most ``sync.max_header_bytes``) are parsed
with ``parse_header``, then that prefix and the rest of the part are streamed into the
write store (``gateway.write_store``) in 256 KiB chunks, so memory per request is bounded
whatever the size of a study. The object is indexed (and the store audited) in one
transaction right after its write, before the next part is read.

Key layout, relative to the write store's prefix::

    stow/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm

and under ``ownership = "prefix"`` below the caller's own key prefix
(``{hospital prefix}stow/...``), so a sync of the store gives it back to the caller; a
hospital without a prefix in ``[stores.hospitals]`` cannot store (403).

(UIDs are digits and dots, checked by the header parser, so a key is always a safe path.)
An existing object is never overwritten: under a per-key lock (``SqlIndex.object_lock``)
the gate is asked first, then the key is looked at, and only a key that holds nothing is
written. A write that fails or is cut leaves nothing behind (every adapter writes
atomically); an object whose indexing is refused is deleted again.

Per instance (PS3.18 Annex I, Table I.2-2 Failure Reason; PS3.7 Annex C for 0111 and 0124):

======  ==============================================================================
0xA700  refused, out of resources: header longer than ``sync.max_header_bytes`` (for a
        deflated object: once inflated), or the write store unavailable after its retries
0xA900  data set does not match its SOP class: a required UID missing or malformed, or
        the series already belongs to another of the caller's studies
0xA901  the StudyInstanceUID differs from the ``{study}`` of the request URL
0xC000  cannot understand: part not ``application/dicom``, not a PS3.10 file (no
        preamble and ``DICM``), not DICOM, truncated (in the header, or pixel data shorter
        than its element says), malformed multipart framing
0x0110  processing failure: the index or the store failed
0x0111  duplicate SOP instance: the SOPInstanceUID is already stored with other content
        (the stored object is left as it is)
0x0124  not authorized: the instance would add to, or replace part of, a study, series,
        patient record or SOP instance that another hospital produced, or it names
        another producing institution (InstitutionCodeSequence)
======  ==============================================================================

A re-sent instance whose bytes equal a stored copy's is a success and writes nothing.
The refusal 0x0124 tells the caller only that the UIDs it sent are taken by someone
else; it is the same whatever it is that is taken and never says whose, what patient,
or what else the study holds. (Storing cannot avoid revealing that much: the only
alternative is to accept the instance into another hospital's study.) Every such
refusal is audited as ``denied``.

Response (PS3.18 10.5.3): 200 all stored; 202 some stored and some failed; 409 none
stored (each failure in FailedSOPSequence); 400 malformed multipart with nothing
stored; 415 not ``multipart/related; type="application/dicom"``; 403 not a hospital;
503 when no write store is configured (as PS3.18 answers transactions an origin server
cannot handle, "a temporal or permanent state"); the body is ``application/dicom+json``
(or ``application/dicom+xml`` on request) with the study's RetrieveURL.

The service knows no HTTP framework: the handler hands it the request's parts as an
async iterator of :class:`StowPart` (the multipart reader is the handler's) and sends
the :class:`StowAnswer` it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from email.message import Message
from typing import Any, Final, Protocol

from imaging_gateway.dicom.dicomxml import dataset_to_xml
from imaging_gateway.dicom.headers import (
    NeedMoreData,
    NotParseable,
    check_pixel_data_extent,
    parse_header,
)
from imaging_gateway.dicom.mediatypes import Representation, select
from imaging_gateway.domain.qido import is_uid
from imaging_gateway.domain.records import ParsedHeader
from imaging_gateway.errors import (
    GatewayError,
    InvalidQuery,
    InvalidRequest,
    ObjectNotFound,
    StorageError,
    StoreNotEnabled,
    StoreUnavailable,
    UnsupportedMediaType,
)
from imaging_gateway.index.sql import IndexedObject, SqlIndex
from imaging_gateway.security.gate import AccessContext, Gate, StoreAttempt
from imaging_gateway.settings import Settings, StoreSettings
from imaging_gateway.storage.base import ObjectInfo, ObjectStore, close_stream

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "stow/"
DICOM: Final = "application/dicom"

OUT_OF_RESOURCES: Final = 0xA700
DATA_SET_MISMATCH: Final = 0xA900
STUDY_UID_MISMATCH: Final = 0xA901
CANNOT_UNDERSTAND: Final = 0xC000
PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
NOT_AUTHORIZED: Final = 0x0124

CHUNK: Final = 256 * 1024
# PS3.10 7.1: 128-byte preamble, then "DICM", then the file meta information.
_PREAMBLE_END: Final = 132
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN"})
_IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
_EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
_DEFLATED: Final = "1.2.840.10008.1.2.1.99"

# RFC 2046 5.1.1: bchars, 1-70 of them, the last not a space (aiohttp's reader refuses
# a longer one with ValueError when it is built).
_BOUNDARY: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

_RESPONSE_JSON = Representation("application/dicom+json")
_RESPONSE_PLAIN_JSON = Representation("application/json")
_RESPONSE_XML = Representation("application/dicom+xml")
_RESPONSE_OFFERS = (_RESPONSE_JSON, _RESPONSE_PLAIN_JSON, _RESPONSE_XML)


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """What became of one part: stored (``failure`` None) or the PS3.18 failure reason."""

    failure: int | None
    label: str
    """A short, PHI-free word for the audit log: ``stored``, ``identical``, ``A901``..."""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def stored(self) -> bool:
        return self.failure is None


# ---------------------------------------------------------------------------
# Pure parts


def failure_for(reason: str) -> int:
    """The Failure Reason for a ``NotParseable`` reason (``"<code>: <explanation>"``)."""
    code = reason.split(":", 1)[0]
    if code in ("missing-uid", "invalid-uid"):
        return DATA_SET_MISMATCH
    if code == "header-too-large":  # a deflated header inflating past the bound
        return OUT_OF_RESOURCES
    return CANNOT_UNDERSTAND


class StowPart(Protocol):
    """One part of a store request's ``multipart/related`` body, as the handler reads it."""

    @property
    def content_type(self) -> str | None:
        """The part's Content-Type header (None when it has none)."""

    @property
    def nested(self) -> bool:
        """Whether the part is itself a multipart body (refused; never read)."""

    async def read_chunk(self, size: int) -> bytes:
        """At most ``size`` more bytes of the part's body, ``b""`` at its end; raises
        anything when the framing breaks (taken as malformed)."""


@dataclass(frozen=True, slots=True)
class StowAnswer:
    """The store response: status, body and its media type."""

    status: int
    body: bytes
    content_type: str


def _media_type(value: str) -> Message:
    """``value`` parsed as a MIME Content-Type (type, subtype and parameters)."""
    message = Message()
    message["Content-Type"] = value
    return message


def object_key(header: ParsedHeader) -> str:
    """The write store key of an instance: ``stow/{study}/{series}/{sop}.dcm``."""
    return (
        f"{KEY_PREFIX}{header.study.StudyInstanceUID}/{header.series.SeriesInstanceUID}"
        f"/{header.instance.SOPInstanceUID}.dcm"
    )


def request_boundary(content_type: str | None) -> str:
    """The multipart boundary of a STOW-RS request, after checking its media type.

    Raises ``UnsupportedMediaType`` unless the body is ``multipart/related`` of
    ``application/dicom`` parts (the ``type`` parameter; PS3.18 10.5.1.1), and
    ``InvalidRequest`` when it has no boundary.
    """
    if not content_type:
        raise UnsupportedMediaType(
            'send the instances as multipart/related; type="application/dicom"'
        )
    mime = _media_type(content_type)
    part_type = str(mime.get_param("type", "") or "").split(";", 1)[0].strip().lower()
    if mime.get_content_type() != "multipart/related" or part_type != DICOM:
        raise UnsupportedMediaType(
            'only multipart/related; type="application/dicom" is accepted (PS3.10 files, '
            "one per part)"
        )
    boundary = str(mime.get_param("boundary", "") or "")
    if not boundary:
        raise InvalidRequest("the multipart/related Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise InvalidRequest(
            "boundary: 1-70 characters of letters, digits and '()+_,-./:=? (RFC 2046 5.1.1), "
            "not ending with a space"
        )
    return boundary


def is_dicom_part(content_type: str | None) -> bool:
    """Whether a part's Content-Type is ``application/dicom`` (absent: the request's type)."""
    if content_type is None or not content_type.strip():
        return True
    return _media_type(content_type).get_content_type() == DICOM


@dataclass(frozen=True, slots=True)
class PixelExtent:
    """What the end of a PS3.10 stream must look like for its pixel data to be whole."""

    end: int | None = None
    """Defined-length pixel data: the stream is at least this long."""
    delimiter: bytes | None = None
    """Undefined length (encapsulated): the stream ends with this Sequence Delimitation Item."""

    def whole(self, size: int, tail: bytes) -> bool:
        if self.end is not None:
            return size >= self.end
        if self.delimiter is not None:
            return tail.endswith(self.delimiter)
        return True


def pixel_extent(head: bytes, header: ParsedHeader) -> PixelExtent:
    """Where the pixel data element at ``header.header_bytes`` of ``head`` ends.

    Empty (nothing to check) for deflated objects, whose header has no byte extent, and
    when no pixel data element starts there. An encapsulated value must be followed by
    its Sequence Delimitation Item (PS3.5 A.4), taken here to end the object: the rare
    object with data elements after encapsulated pixel data is refused as truncated.
    """
    syntax = header.instance.TransferSyntaxUID
    offset = header.header_bytes
    if syntax == _DEFLATED or offset + 12 > len(head):
        return PixelExtent()
    order = ">" if syntax == _EXPLICIT_VR_BIG_ENDIAN else "<"
    group, element = struct.unpack_from(f"{order}HH", head, offset)
    if (group << 16 | element) not in _PIXEL_TAGS:
        return PixelExtent()
    vr = head[offset + 4 : offset + 6]
    if syntax == _IMPLICIT_VR_LITTLE_ENDIAN or not vr.isalpha():
        size, (length,) = 8, struct.unpack_from(f"{order}L", head, offset + 4)
    elif vr in _LONG_VRS:
        size, (length,) = 12, struct.unpack_from(f"{order}L", head, offset + 8)
    else:
        size, (length,) = 8, struct.unpack_from(f"{order}H", head, offset + 6)
    if length == 0xFFFFFFFF:
        return PixelExtent(delimiter=struct.pack(f"{order}HHL", 0xFFFE, 0xE0DD, 0))
    return PixelExtent(end=offset + size + length)


def response_status(results: Sequence[InstanceResult]) -> int:
    """PS3.18 10.5.3.1: 200 all stored, 202 some stored, 409 none stored."""
    stored = sum(1 for r in results if r.stored)
    if stored == len(results):
        return 200
    return 202 if stored else 409


def _ui(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def store_response(
    results: Sequence[InstanceResult], *, retrieve_base: str, study_uid: str | None
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) as a DICOM JSON dataset.

    RetrieveURL (type 2) names the study: the request's, else the one study the
    instances belong to; empty when they belong to several.
    """
    studies = {r.study_uid for r in results if r.study_uid}
    study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    dataset: dict[str, Any] = {
        "00081190": {"vr": "UR", "Value": [f"{retrieve_base}/studies/{study}"]}
        if study
        else {"vr": "UR"}
    }
    failed = [
        {
            "00081150": _ui(r.sop_class_uid),
            "00081155": _ui(r.sop_instance_uid),
            "00081197": {"vr": "US", "Value": [r.failure]},
        }
        for r in results
        if r.failure is not None
    ]
    referenced = [
        {
            "00081150": _ui(r.sop_class_uid),
            "00081155": _ui(r.sop_instance_uid),
            "00081190": {
                "vr": "UR",
                "Value": [
                    f"{retrieve_base}/studies/{r.study_uid}/series/{r.series_uid}"
                    f"/instances/{r.sop_instance_uid}"
                ],
            },
        }
        for r in results
        if r.failure is None
    ]
    if failed:
        dataset["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        dataset["00081199"] = {"vr": "SQ", "Value": referenced}
    return dataset


# ---------------------------------------------------------------------------
# Streaming one part


class _Malformed(Exception):
    """The multipart framing broke (or the client went away) inside a part."""


class _Truncated(Exception):
    """The part ended before its pixel data did; raised inside a write to abort it."""


class _Refused(Exception):
    def __init__(self, failure: int, label: str | None = None) -> None:
        super().__init__(failure)
        self.failure = failure
        self.label = label or f"{failure:04X}"


class _Part:
    """One body part, read in bounded chunks; reader errors become ``_Malformed``."""

    def __init__(self, part: StowPart) -> None:
        self._part = part

    async def read(self, size: int = CHUNK) -> bytes:
        try:
            return await self._part.read_chunk(size)
        except Exception as exc:
            raise _Malformed() from exc

    async def drain(self) -> None:
        while await self.read():
            pass


async def _read_head(
    part: _Part, *, first: int, limit: int, issuers: tuple[str, ...]
) -> tuple[bytes, bool, ParsedHeader]:
    """Read and parse the header; returns (bytes read, whether that is the whole part, header).

    Holds at most ``limit`` bytes (plus a pixel data element header). Raises
    ``_Refused`` for a part that is not a whole, readable PS3.10 file.
    """
    head = bytearray()
    ended = False
    want = first

    async def fill(target: int) -> None:
        nonlocal ended
        while len(head) < target and not ended:
            chunk = await part.read(min(CHUNK, target - len(head)))
            if chunk:
                head.extend(chunk)
            else:
                ended = True

    while True:
        await fill(want)
        if len(head) < _PREAMBLE_END or head[128:_PREAMBLE_END] != b"DICM":
            raise _Refused(CANNOT_UNDERSTAND, "not-part10")
        try:
            header = parse_header(
                bytes(head), complete=ended, national_id_issuers=issuers, max_inflated_bytes=limit
            )
        except NeedMoreData as exc:
            if len(head) >= limit:
                raise _Refused(OUT_OF_RESOURCES, "header-too-large") from None
            want = min(max(exc.at_least, 2 * len(head)), limit)
            continue
        except NotParseable as exc:
            raise _Refused(failure_for(exc.reason), exc.reason.split(":", 1)[0]) from None
        if ended:
            # The whole part is here: its pixel data (native length, or encapsulated
            # items up to their delimiter) must end inside it. A longer part is checked
            # at its end while it streams (pixel_extent).
            try:
                check_pixel_data_extent(bytes(head), header, object_size=len(head))
            except NotParseable:
                raise _Refused(CANNOT_UNDERSTAND, "truncated") from None
        if header.instance.TransferSyntaxUID != _DEFLATED:
            # The pixel data element's own header, for the truncation check while streaming
            # (a header parsed from a prefix lies wholly inside it: 12 bytes more at most).
            await fill(header.header_bytes + 12)
        return bytes(head), ended, header


async def _write_chunks(head: bytes, part: _Part, extent: PixelExtent) -> AsyncIterator[bytes]:
    """``head`` then the rest of the part; raises ``_Truncated`` at the end if it is short."""
    yield head
    size = len(head)
    tail = head[-8:]
    while chunk := await part.read():
        size += len(chunk)
        tail = (tail + chunk)[-8:]
        yield chunk
    if not extent.whole(size, tail):
        raise _Truncated()


async def _same_content(head: bytes, part: _Part, stored: AsyncIterator[bytes]) -> bool:
    """Whether the part's bytes equal ``stored``'s; reads the part to its end either way.

    Raises what reading ``stored`` raises (``ObjectNotFound``, ``StorageError``).
    """
    same = True
    pending = b""
    exhausted = False
    try:
        chunk = head
        while chunk:
            view = memoryview(chunk)
            while same and view:
                if not pending:
                    try:
                        pending = await anext(stored)
                    except StopAsyncIteration:
                        exhausted = True
                        same = False
                        break
                n = min(len(pending), len(view))
                if view[:n] != pending[:n]:
                    same = False
                    break
                view = view[n:]
                pending = pending[n:]
            chunk = await part.read()
        if same and not pending and not exhausted:
            async for rest in stored:
                if rest:
                    same = False
                    break
        return same and not pending
    finally:
        await close_stream(stored)


# ---------------------------------------------------------------------------
# The transaction


@dataclass
class _Stow:
    """One store request: who, where, and what became of each part so far."""

    ctx: AccessContext
    gate: Gate
    index: SqlIndex
    stores: Mapping[str, ObjectStore]
    settings: Settings
    target: StoreSettings
    study_uid: str | None
    results: list[InstanceResult]
    attempts: list[StoreAttempt]
    index_down: bool = False

    @property
    def store(self) -> ObjectStore:
        return self.stores[self.target.name]

    def result(
        self, header: ParsedHeader | None, failure: int | None, label: str
    ) -> InstanceResult:
        if header is None:
            return InstanceResult(failure, label)
        return InstanceResult(
            failure,
            label,
            sop_class_uid=header.instance.SOPClassUID,
            sop_instance_uid=header.instance.SOPInstanceUID,
            study_uid=header.study.StudyInstanceUID,
            series_uid=header.series.SeriesInstanceUID,
        )

    def fail(self, header: ParsedHeader | None, failure: int, label: str) -> None:
        outcome = "denied" if failure == NOT_AUTHORIZED else "error"
        self.results.append(self.result(header, failure, label))
        self.attempts.append(StoreAttempt(header, outcome, label))

    async def part(self, reader: StowPart) -> None:
        """Store one part; raises ``_Malformed`` when the framing breaks inside it."""
        part = _Part(reader)
        header: ParsedHeader | None = None
        try:
            if not is_dicom_part(reader.content_type):
                raise _Refused(CANNOT_UNDERSTAND, "not-application-dicom")
            sync = self.settings.sync
            head, ended, header = await _read_head(
                part,
                first=sync.header_read_bytes,
                limit=sync.max_header_bytes,
                issuers=self.settings.gateway.national_id_issuers,
            )
            if self.index_down:
                raise _Refused(PROCESSING_FAILURE)
            self.admissible(header)
            stored = await self.place(part, head, ended, header)
        except _Refused as refused:
            self.fail(header, refused.failure, refused.label)
            await part.drain()
            return
        except _Malformed:
            self.fail(header, CANNOT_UNDERSTAND, "malformed")
            raise
        self.results.append(self.result(header, None, stored))
        if stored == "identical":
            self.attempts.append(StoreAttempt(header, "ok", stored))

    def key(self, header: ParsedHeader) -> str:
        """The write store key of ``header``'s instance for the caller.

        Under ``prefix`` ownership the key is under one of the caller's key prefixes, the
        first under which a sync gives the object back to the caller. Raises
        ``_Refused`` (not authorized) when the caller has no such prefix.
        """
        key = object_key(header)
        if self.target.ownership != "prefix":
            return key
        hospital = self.ctx.principal.hospital or ""
        prefix = self.target.key_prefix_for(hospital, key)
        if prefix is None:
            raise _Refused(NOT_AUTHORIZED)
        return prefix + key

    def admissible(self, header: ParsedHeader) -> None:
        """The checks that need no index: the request's study, the producing hospital."""
        if self.study_uid is not None and header.study.StudyInstanceUID != self.study_uid:
            raise _Refused(STUDY_UID_MISMATCH)
        caller = self.ctx.principal.hospital
        # An instance that names another producing institution is not the caller's to
        # store, whatever the write store's ownership: under "store" or "prefix" ownership
        # the code decides nothing at sync, but it is what the object says of itself.
        named = header.study.institution_code
        if named is not None and named != caller:
            raise _Refused(NOT_AUTHORIZED)
        # A later sync of the write store makes the producer by the store's ownership
        # rule (its hospital, the key's prefix, or the object's institution code): it
        # must be the caller (or nobody).
        producer = self.target.producer(self.key(header), named)
        if producer is not None and producer != caller:
            raise _Refused(NOT_AUTHORIZED)

    async def place(self, part: _Part, head: bytes, ended: bool, header: ParsedHeader) -> str:
        """Write the part under its key (or find it there already) and index it.

        Returns ``stored``, ``adopted`` or ``identical``; raises ``_Refused``.
        """
        key = self.key(header)
        digest = hashlib.sha256(head[: header.header_bytes]).hexdigest()
        try:
            async with self.index.object_lock(self.target.name, key):
                check = await self.gate.check_store(self.ctx, header, store=self.target.name)
                if check.verdict == "refused":
                    raise _Refused(NOT_AUTHORIZED)
                if check.verdict == "inconsistent":
                    raise _Refused(DATA_SET_MISMATCH)
                if check.copies:
                    copy = next((c for c in check.copies if c.header_sha256 == digest), None)
                    if copy is None:
                        raise _Refused(DUPLICATE_SOP_INSTANCE)
                    if copy.store not in self.stores:  # no longer configured: cannot compare
                        raise _Refused(PROCESSING_FAILURE)
                    stream = self.stores[copy.store].read_stream(copy.key)
                    if not await _same_content(head, part, stream):
                        raise _Refused(DUPLICATE_SOP_INSTANCE)
                    return "identical"
                existing = await self.stat(key)
                if existing is not None:
                    # Written by an earlier request that did not get to index it.
                    if not await _same_content(head, part, self.store.read_stream(key)):
                        raise _Refused(DUPLICATE_SOP_INSTANCE)
                    await self.record(
                        IndexedObject(
                            key,
                            existing.etag,
                            existing.size,
                            existing.last_modified,
                            header,
                            digest,
                        ),
                        note="adopted",
                        written=False,
                    )
                    return "adopted"
                extent = PixelExtent() if ended else pixel_extent(head, header)
                try:
                    info = await self.store.write_stream(key, _write_chunks(head, part, extent))
                except _Truncated:
                    raise _Refused(CANNOT_UNDERSTAND, "truncated") from None
                await self.record(
                    IndexedObject(key, info.etag, info.size, info.last_modified, header, digest),
                    note="stored",
                    written=True,
                )
                return "stored"
        except StoreUnavailable:
            raise _Refused(OUT_OF_RESOURCES) from None
        except StorageError:
            raise _Refused(PROCESSING_FAILURE) from None
        except GatewayError:
            # The index (or the audit log in it) is unreachable: fail the rest fast.
            self.index_down = True
            raise _Refused(PROCESSING_FAILURE) from None

    async def stat(self, key: str) -> ObjectInfo | None:
        try:
            return await self.store.stat(key)
        except ObjectNotFound:
            return None

    async def record(self, item: IndexedObject, *, note: str, written: bool) -> None:
        """Index and audit ``item``; on refusal or failure delete what this request wrote."""
        try:
            verdict = await self.gate.record_store(
                self.ctx,
                self.index,
                store=self.target.name,
                province=self.settings.gateway.province,
                item=item,
                note=note,
            )
        except GatewayError:
            if written:
                await self.discard(item.key)
            raise
        if verdict == "new":
            return
        if written:
            await self.discard(item.key)
        if verdict == "refused":
            raise _Refused(NOT_AUTHORIZED)
        raise _Refused(DUPLICATE_SOP_INSTANCE if verdict == "indexed" else DATA_SET_MISMATCH)

    async def discard(self, key: str) -> None:
        try:
            await self.store.delete(key)
        except GatewayError as exc:
            # No key in the log: it holds UIDs. The object stays unindexed until removed
            # (or until a sync of the write store indexes it).
            log.warning("stow: could not delete an object it refused to index: %s", exc.code)


async def store_instances(
    parts: AsyncIterator[StowPart],
    *,
    content_type: str | None,
    accept: str | None,
    ctx: AccessContext,
    gate: Gate,
    index: SqlIndex,
    stores: Mapping[str, ObjectStore],
    settings: Settings,
    study_uid: str | None,
    retrieve_base: str,
) -> StowAnswer:
    """Store Instances (PS3.18 10.5) of a request for a hospital; see the module docstring.

    ``parts``: the request body's parts, read only after ``content_type`` (the request's)
    was checked; ``accept``: the request's Accept header.

    Raises ``Forbidden`` (not a hospital, or not the write store's hospital),
    ``InvalidQuery`` (a ``study_uid`` that is not a UID), ``StoreNotEnabled`` (no write
    store), ``NotAcceptable`` (Accept allows no DICOM JSON or XML),
    ``UnsupportedMediaType``, ``InvalidRequest`` (no boundary or one RFC 2046 does not
    allow, no parts, or malformed multipart before anything was stored) and
    ``IndexUnavailable`` (nothing
    stored and the audit log unreachable); each is audited, except when the audit log
    itself is unreachable. Per-instance failures are in the response, not raised.
    """
    name = settings.gateway.write_store
    target = settings.store(name) if name is not None else None
    # A {study} that is no UID (PS3.5 9.1) is refused, audited without it: the audit
    # log's column holds 64 characters, and no study has it.
    malformed_study = study_uid is not None and not is_uid(study_uid)
    await gate.authorize_store(
        ctx,
        store_hospitals=target.producing_hospitals if target else None,
        study_uid=None if malformed_study else study_uid,
    )
    try:
        if malformed_study:
            raise InvalidQuery(
                "study: not a valid UID (PS3.5 9.1: digits and dots, at most 64 characters)"
            )
        if target is None:
            raise StoreNotEnabled(
                "this gateway stores no instances (STOW-RS): no gateway.write_store is configured"
            )
        representation = select(accept, _RESPONSE_OFFERS, what="the store response")
        request_boundary(content_type)
    except GatewayError as exc:
        await gate.audit_store(
            ctx,
            store=name or "",
            attempts=[StoreAttempt(None, "error", f"status-{exc.status}")],
        )
        raise
    stow = _Stow(ctx, gate, index, stores, settings, target, study_uid, [], [])
    while True:
        try:
            part = await anext(parts, None)
        except Exception:
            stow.fail(None, CANNOT_UNDERSTAND, "malformed")
            break
        if part is None:
            break
        if part.nested:
            stow.fail(None, CANNOT_UNDERSTAND, "nested-multipart")
            continue
        try:
            await stow.part(part)
        except _Malformed:
            break
    return await _answer(stow, representation, retrieve_base)


async def _answer(stow: _Stow, representation: Representation, retrieve_base: str) -> StowAnswer:
    results = stow.results
    stored = any(r.stored for r in results)
    malformed = any(r.label in ("malformed", "nested-multipart") for r in results)
    if not results or (malformed and not stored):
        # PS3.18 10.5.3.1: 400, nothing stored because of bad syntax.
        attempts = stow.attempts or [StoreAttempt(None, "error", "no-parts")]
        await stow.gate.audit_store(stow.ctx, store=stow.target.name, attempts=attempts)
        detail = "the multipart body is malformed" if results else "the request has no parts"
        raise InvalidRequest(f"nothing was stored: {detail}")
    try:
        await stow.gate.audit_store(stow.ctx, store=stow.target.name, attempts=stow.attempts)
    except GatewayError:
        # An identical re-send is a store without its record now: answer it as failed.
        # Refusals stored nothing; only their records are lost.
        results = [
            replace(r, failure=PROCESSING_FAILURE) if r.label == "identical" else r for r in results
        ]
        if not any(r.stored for r in results):
            raise
        log.warning("stow: the audit records of refused instances could not be written")
    dataset = store_response(results, retrieve_base=retrieve_base, study_uid=stow.study_uid)
    status = response_status(results)
    if representation is _RESPONSE_XML:
        return StowAnswer(status, dataset_to_xml(dataset), representation.media_type)
    # Exactly the media type, no charset parameter (JSON is UTF-8; RFC 8259): clients
    # such as dicomweb-client compare the Content-Type as a whole.
    return StowAnswer(status, json.dumps(dataset).encode("utf-8"), representation.media_type)


@dataclass(frozen=True, slots=True)
class StowService:
    """STOW-RS for the API (one per app): the write store, the index and the gate."""

    gate: Gate
    index: SqlIndex
    stores: Mapping[str, ObjectStore]
    settings: Settings

    async def store(
        self,
        ctx: AccessContext,
        parts: AsyncIterator[StowPart],
        *,
        content_type: str | None,
        accept: str | None,
        study_uid: str | None,
        retrieve_base: str,
    ) -> StowAnswer:
        """Store Instances (:func:`store_instances`); raises what it raises."""
        return await store_instances(
            parts, content_type=content_type, accept=accept, ctx=ctx, gate=self.gate,
            index=self.index, stores=self.stores, settings=self.settings,
            study_uid=study_uid, retrieve_base=retrieve_base,
        )  # fmt: skip
