"""Where pixel data lies, its frames and bulk data, from an instance's bytes (PS3.5 7.5, A.4).

Pure functions on DICOM bytes, no I/O: the retrieve service (``services/retrieve.py``)
reads the byte ranges and hands them here. A header is parsed from the first bytes of
an object (``InstanceLocation.header_bytes``, the pixel data element header and what was
asked after it); native frames are located from Rows, Columns, SamplesPerPixel and
BitsAllocated, encapsulated ones from the Extended or Basic Offset Table; bulk data tag
paths (``00540016/0/00181072``, written into metadata) are read back here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame, parse_basic_offsets

from imaging_gateway.dicom.deflate import (
    DEFAULT_INFLATE_MAX_BYTES,
    InflateLimitExceeded,
    read_part10,
)
from imaging_gateway.dicom.mediatypes import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import IntegrityError, InvalidRequest, NotAcceptable, NotFound

__all__ = [
    "DEFLATED",
    "IMPLICIT",
    "PIXEL_TAGS",
    "Header",
    "bulk_value",
    "check_items",
    "frame_extents",
    "frame_from_value",
    "frame_length",
    "int_value",
    "join_fragments",
    "parse_header",
    "parse_tag_path",
    "read_whole",
]

DEFLATED: Final = "1.2.840.10008.1.2.1.99"
IMPLICIT: Final = "1.2.840.10008.1.2"
PIXEL_TAGS: Final = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
ITEM: Final = 0xFFFEE000
UNDEFINED: Final = 0xFFFFFFFF
_EXTENDED_OFFSET_TABLE: Final = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS: Final = 0x7FE00002
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
# ASCII digits: str.isdigit() also takes e.g. superscript two, which int() refuses.
_ASCII_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------
# Headers and the pixel data element


@dataclass(slots=True)
class Header:
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


def _too_large_to_inflate(instance: InstanceLocation, exc: InflateLimitExceeded) -> NotAcceptable:
    return NotAcceptable(
        f"store {instance.store!r}: a deflated object inflates to more than "
        f"{exc.max_bytes} bytes (gateway.inflate_max_bytes); it is sent only as stored "
        "(transfer-syntax=*)"
    )


def read_whole(instance: InstanceLocation, data: bytes, max_inflated: int) -> Dataset:
    """The whole object parsed, a deflated one inflated at most ``max_inflated`` bytes."""
    try:
        return read_part10(data, max_inflated=max_inflated)
    except InflateLimitExceeded as exc:
        raise _too_large_to_inflate(instance, exc) from None


def parse_header(
    instance: InstanceLocation,
    data: bytes,
    *,
    whole: bool,
    inflate_max_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
) -> Header:
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
            transfer_syntax = IMPLICIT
        else:
            transfer_syntax = EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN
    header = Header(ds, transfer_syntax, data, whole, inflate_max_bytes=inflate_max_bytes)
    if transfer_syntax == DEFLATED or instance.header_bytes <= 0:
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
    if tag not in PIXEL_TAGS:
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
    header.value_length = None if length == UNDEFINED else length
    return header


def _locate_pixels_by_parsing(instance: InstanceLocation, header: Header) -> None:
    """For a whole object read: note the pixel data tag (its bytes come from pydicom)."""
    if not header.whole:
        return
    try:
        full = read_part10(header.data, max_inflated=header.inflate_max_bytes)
    except InflateLimitExceeded as exc:
        raise _too_large_to_inflate(instance, exc) from None
    except Exception:
        return
    for tag in PIXEL_TAGS:
        if tag in full:
            element = full[tag]
            header.pixel_tag = tag
            header.pixel_vr = element.VR
            header.value_length = None if element.is_undefined_length else len(element.value)
            return


def int_value(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Frames (PS3.5 8.1.1 native, A.4 encapsulated)


def frame_length(ds: Dataset) -> int:
    """Bytes of one native frame (PS3.5 8.1.1, PS3.3 C.7.6.3.1.2 for YBR_FULL_422)."""
    rows = int_value(ds, "Rows")
    columns = int_value(ds, "Columns")
    bits = int_value(ds, "BitsAllocated")
    samples = int_value(ds, "SamplesPerPixel") or 1
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


def frame_extents(
    ds: Dataset, table: bytes, first_item: int, end: int, n: int
) -> list[tuple[int, int]]:
    """(offset, length) of each of ``n`` frames' fragment items, from EOT or BOT; [] if unknown.

    ``table`` is the Basic Offset Table item (its 8-byte header and value), ``first_item``
    the object offset of the first fragment item after it, ``end`` the object's size.
    Raises ``IntegrityError`` for a malformed table or offsets outside the object.
    """
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


def join_fragments(items: bytes) -> bytes:
    """The fragments in a run of encapsulated items (up to a delimiter or the end)."""
    check_items(items)
    try:
        return b"".join(generate_fragments(items))
    except Exception:
        raise IntegrityError("encapsulated pixel data has malformed fragment items") from None


def check_items(items: bytes) -> None:
    """``IntegrityError`` unless every item in ``items`` is whole (PS3.5 A.4).

    pydicom's ``generate_fragments`` hands back a short last fragment when the object
    ends inside it; such a frame must never be sent.
    """
    at = 0
    while at + 8 <= len(items):
        group, element, length = struct.unpack_from("<HHL", items, at)
        if (group << 16 | element) == _SEQUENCE_DELIMITER:
            return
        if (group << 16 | element) != ITEM or length == UNDEFINED:
            raise IntegrityError("encapsulated pixel data has malformed fragment items")
        at += 8 + length
    if at != len(items):
        raise IntegrityError(
            "the object ends inside its encapsulated pixel data (truncated); "
            "the frame cannot be read whole"
        )


def frame_from_value(value: bytes, index: int, number_of_frames: int) -> bytes:
    check_items(value)
    try:
        return bytes(get_frame(value, index, number_of_frames=number_of_frames))
    except Exception:
        raise IntegrityError("the frame cannot be found in the encapsulated pixel data") from None


# ---------------------------------------------------------------------------
# Bulkdata tag paths (PS3.18 10.4.1.1.5)


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


def bulk_value(ds: Dataset, path: Sequence[int]) -> bytes:
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
