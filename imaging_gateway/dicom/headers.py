"""Parse one DICOM object's header (whole, or a prefix from a ranged read) into index records."""

from __future__ import annotations

import codecs
import dataclasses
import io
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any, Final

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filereader import ENCODED_VR, read_dataset, read_partial, read_sequence
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, PersonName
from pydicom.values import convert_string, convert_UI, convert_value

from imaging_gateway.dicom.deflate import DEFAULT_INFLATE_MAX_BYTES
from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.dicom.temporal import normalize_date, normalize_time
from imaging_gateway.domain.attributes import EntityLevel, header_attributes
from imaging_gateway.domain.records import (
    RECORD_TYPES,
    InstanceRecord,
    ParsedHeader,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

__all__ = [
    "DEFAULT_NATIONAL_ID_ISSUERS",
    "NeedMoreData",
    "NotParseable",
    "check_pixel_data_extent",
    "decode_text_values",
    "parse_header",
]

DEFAULT_NATIONAL_ID_ISSUERS: tuple[str, ...] = ("CN-RESIDENT-ID",)

# PS3.10 7.1: 128-byte preamble, then the "DICM" prefix.
_PREAMBLE_END = 132
# Groups a dataset without preamble can plausibly start with: file meta (0002), directory
# (0004), identifying (0008). Anything else is not read as DICOM (pydicom's force=True
# would happily parse a PNG into garbage elements).
_START_GROUPS = frozenset({0x0002, 0x0004, 0x0008})
# Granularity of header_bytes for deflated objects.
_DEFLATE_STEP = 4096
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Bytes past a cut that the parser needs at least to see the next element's header.
_LOOKAHEAD = 12
# PS3.5 9.1: UIDs are dot-separated digit components, at most 64 characters.
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX = 64
# pydicom 3.0 decodes ISO 2022 IR 58 fragments with Python's gb2312 codec, which keeps
# the G1 designation escape (PS3.5 6.1.2.5.3, Annex K.2) in the text: strip it.
_IR58_ESCAPE = "\x1b$)A"
_VR_CHARS = range(0x41, 0x5B)
# pydicom's codec for text without (0008,0005) and for the ASCII-only VRs.
_DEFAULT_ENCODINGS = ["iso8859"]
_IR58_ENCODINGS = (["iso_ir_58"], ["iso8859", "iso_ir_58"])
# Attributes of the table read by hand in _records: the identity UIDs (required, with
# their file meta fallbacks), PatientID (blank means no identity) and the transfer
# syntax (from the file meta or the deflate check, not an element of the dataset).
_BY_HAND: Final = frozenset(
    {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID",
     "AvailableTransferSyntaxUID"}
)  # fmt: skip


def _read_order(level: EntityLevel) -> tuple[tuple[str, str, str, bool], ...]:
    """(keyword, column, VR, whether its record has a field) of the table's header
    attributes of ``level`` read generically: in the record's field order (the order
    their warnings come in), then the attributes the record has no field for."""
    fields = [f.name for f in dataclasses.fields(RECORD_TYPES[level])]
    attrs = [a for a in header_attributes(level) if a.keyword not in _BY_HAND]
    for a in attrs:
        if a.integer and a.vr not in ("IS", "US"):  # pragma: no cover - a table mistake
            # Read as text it would land in an integer column: refuse at import.
            raise ValueError(f"{a.keyword}: no header reader for VR {a.vr} yet")
    attrs.sort(key=lambda a: fields.index(a.column) if a.column in fields else len(fields))
    return tuple((a.keyword, a.column or a.keyword, a.vr, a.column in fields) for a in attrs)


_READ: Final = {level: _read_order(level) for level in RECORD_TYPES}
# Elements the records need beyond the table's: the character set, the national identity
# (OtherPatientIDsSequence), the institution code (InstitutionCodeSequence, CodeValue),
# the file meta fallbacks and the transfer syntax.
_KEYWORDS = [
    "SpecificCharacterSet", "PatientID", "OtherPatientIDsSequence", "InstitutionCodeSequence",
    "CodeValue", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    *(keyword for read in _READ.values() for keyword, *_ in read),
    "MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
]  # fmt: skip
# Text of these VRs is ASCII (PS3.5 6.2): decoded without the dataset's character set.
_ASCII_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - the keywords above are all in the dictionary
        raise KeyError(keyword)
    return int(tag)


_TAGS: dict[str, int] = {keyword: _tag(keyword) for keyword in _KEYWORDS}
_BASE_TAGS: dict[str, BaseTag] = {keyword: BaseTag(tag) for keyword, tag in _TAGS.items()}
# Top-level elements the records need; pydicom seeks past the others' values.
_TOP_LEVEL_TAGS = [tag for keyword, tag in _TAGS.items() if keyword != "CodeValue"]
# PS3.5 7.1.2: explicit VRs with a reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


class NeedMoreData(Exception):
    """The header runs past the end of the bytes given; read at least ``at_least`` bytes."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"need at least {at_least} bytes of the object")
        self.at_least = at_least
        """Total bytes from the start of the object the parser needs next (a lower bound)."""


class NotParseable(Exception):
    """The object cannot be indexed; ``reason`` is ``"<code>: <explanation>"``, never PHI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _DeflatedDataset(Exception):
    """Raised by the probe when pydicom reaches for a deflated dataset (PS3.5 A.5)."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Probe(io.BytesIO):
    """A BytesIO that notes every read asking for bytes past its end.

    pydicom stops silently on a cut element (a short read simply ends the dataset), so
    instead of trusting its result we watch what it asked for: if no read reached past
    the end, the parse of this prefix is byte-for-byte the parse of the whole object.
    """

    def __init__(self, data: bytes, *, intercept_read_all: bool) -> None:
        super().__init__(data)
        self.size = len(data)
        self.need = 0
        """Largest end offset a read asked for beyond the data."""
        self.short_reads = 0
        self.hard_overrun = False
        """A short read that is not a clean stop at the end on an element boundary."""
        self._intercept = intercept_read_all

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = _BYTESIO_READ(self, size)
        if len(chunk) == size:  # the common case, kept cheap: pydicom reads per element
            return chunk
        if size is None or size < 0:
            if self._intercept:
                self.seek(-len(chunk), io.SEEK_CUR)
                raise _DeflatedDataset(self.tell())
            return chunk
        position = self.tell() - len(chunk)
        self.need = max(self.need, position + size)
        self.short_reads += 1
        if chunk or size > 8 or position != self.size:
            self.hard_overrun = True
        return chunk


_BYTESIO_READ = io.BytesIO.read


def parse_header(
    data: bytes,
    *,
    complete: bool,
    national_id_issuers: frozenset[str] | tuple[str, ...] = DEFAULT_NATIONAL_ID_ISSUERS,
    max_inflated_bytes: int = DEFAULT_INFLATE_MAX_BYTES,
) -> ParsedHeader:
    """Parse the header of one DICOM object into a :class:`ParsedHeader`.

    ``data`` is the object's first bytes (e.g. a 64 KiB ranged GET); ``complete`` says
    whether it is the whole object. Reading stops before top-level pixel data
    ((7FE0,0010), (7FE0,0008), (7FE0,0009)); pixel data is never decoded. A result from a
    prefix is always identical to the result from the whole object, except that only a
    whole object can carry the ``truncated-pixel-data`` warning.

    ``header_bytes`` is where the pixel data element starts (or the object's size when it
    has none). For Deflated Explicit VR Little Endian, where the header has no byte extent,
    it is the file meta plus the deflate stream up to the header, in whole 4 KiB steps
    (enough to parse the header; it may exceed the object's size). A deflated dataset is
    inflated at most ``max_inflated_bytes`` (a 1 MB object can inflate to gigabytes); a
    header that does not end within them is ``header-too-large``.

    Raises:
        NeedMoreData: ``complete`` is False and the header is not wholly inside ``data``
            (including ``data`` ending exactly where an element before pixel data would
            start). ``at_least`` (> ``len(data)``) is a lower bound of the total size to
            read next; fetching more at once saves round trips. It may exceed the object's
            size: then read the whole object and call again with ``complete=True``.
        NotParseable: the object cannot be indexed. ``reason`` starts with ``empty``,
            ``not-dicom``, ``truncated`` (only with ``complete=True``), ``missing-uid``,
            ``invalid-uid``, ``header-too-large`` (deflated) or ``unreadable``, then
            ``": "`` and an explanation naming at
            most tags and keywords, never values.
    """
    size = len(data)
    if size == 0:
        if complete:
            raise NotParseable("empty: zero-byte object")
        raise NeedMoreData(_PREAMBLE_END)
    has_prefix = size >= _PREAMBLE_END and data[128:132] == b"DICM"
    if not has_prefix and not _plausible_dataset_start(data):
        if size < _PREAMBLE_END and not complete:
            raise NeedMoreData(_PREAMBLE_END)
        raise NotParseable("not-dicom: no DICM preamble and no valid dataset start")

    if has_prefix:
        fast = _read_explicit_le(data, complete=complete, issuers=national_id_issuers)
        if fast is not None:
            return fast
    return _read_with_pydicom(
        data, complete=complete, issuers=national_id_issuers, max_inflated=max_inflated_bytes
    )


def _read_with_pydicom(
    data: bytes,
    *,
    complete: bool,
    issuers: frozenset[str] | tuple[str, ...],
    max_inflated: int,
) -> ParsedHeader:
    """parse_header for any object pydicom reads, watching its reads for cuts."""
    size = len(data)
    probe = _Probe(data, intercept_read_all=True)
    top = _TopLevel(probe)
    try:
        # dcmread(stop_before_pixels=True) is read_partial stopping at pixel data; we pass
        # our own stop condition to also learn where each top-level element ends.
        ds: Dataset = read_partial(probe, stop_when=top, force=True, specific_tags=_TOP_LEVEL_TAGS)
    except _DeflatedDataset as deflated:
        return _parse_deflated(
            data, deflated.offset, complete=complete, issuers=issuers, max_inflated=max_inflated
        )
    except Exception as exc:
        _raise_for_cut(probe, top, complete=complete, failed=True)
        raise NotParseable(f"unreadable: {_scrub(exc)}") from None
    _raise_for_cut(probe, top, complete=complete, failed=False)
    file_meta: Dataset = ds.file_meta
    header_bytes = min(probe.tell(), size)
    implicit, little = ds.original_encoding
    cut_pixels = (
        complete
        and top.at_pixel_data
        and _pixel_data_cut(
            data, header_bytes, implicit=implicit is not False, little=little is not False
        )
    )
    return _records(
        ds,
        file_meta,
        transfer_syntax=_transfer_syntax(file_meta, ds),
        header_bytes=header_bytes,
        issuers=frozenset(issuers),
        extra_warnings=("truncated-pixel-data",) if cut_pixels else (),
    )


# --- Fast path: Explicit VR Little Endian Part 10 objects whose header is wholly present ---
#
# Most objects in a province's buckets are Explicit VR Little Endian (or an encapsulated
# syntax, which encodes the dataset the same way) with the whole header inside the first
# ranged read. For those, walking the elements here and building the datasets pydicom
# would build is ~4x cheaper than read_partial, whose per-element generator, stream reads
# and Dataset bookkeeping dominated sync CPU. The walk mirrors pydicom 3.0's
# read_partial / data_element_generator / read_sequence element for element; wherever the
# object departs from the plain well-formed case (another transfer syntax, a cut, an
# undefined-length value other than a sequence, an unknown VR, delimiters out of place,
# a command set) it gives up and the pydicom path above reads the object, so odd objects
# get exactly pydicom's handling. tests/unit/test_dicom_headers_fast.py checks that both
# paths give the same result on pydicom's own test files (whole and cut), on every prefix
# of synthetic instances, and on randomly corrupted headers.


class _Unsure(Exception):
    """The fast walk cannot vouch for matching pydicom on this object."""


# Explicit VR -> (its name, whether it has the reserved field and a 4-byte length).
_VRS: dict[bytes, tuple[str, bool]] = {
    vr: (vr.decode("ascii"), vr.decode("ascii") in EXPLICIT_VR_LENGTH_32)
    for vr in ENCODED_VR
    if len(vr) == 2
}
_ELEMENT_HEADER = struct.Struct("<HH2sH").unpack_from
_ITEM_HEADER = struct.Struct("<HHL").unpack_from
_LENGTH_32 = struct.Struct("<L").unpack_from
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_CHARSET = 0x00080005
_TRANSFER_SYNTAX = BaseTag(_TAGS["TransferSyntaxUID"])
# pydicom always keeps (0008,0005) beside the tags asked for.
_KEPT_TOP_LEVEL = frozenset(_TOP_LEVEL_TAGS) | {_CHARSET}
_NOT_FAST = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
) | frozenset(PrivateTransferSyntaxes)
# (0002,0000) UL, length 4: the file meta start that pydicom's VR test always passes.
_META_START = b"\x02\x00\x00\x00UL\x04\x00"
# How a walk of elements ends (pydicom: stop_when, bytelength, or an item delimiter).
_META, _TOP, _DEFINED_ITEM, _UNDEFINED_ITEM = range(4)


class _ElementMap:
    """One dataset's elements as the fast walk read them; a pydicom Dataset when needed.

    The records mostly read raw values straight from ``_dict``; a value that needs
    pydicom's conversion (code extensions, multi-valued character sets) gets a Dataset
    built over the same elements, as pydicom's reader would have built it.
    """

    __slots__ = ("_dataset", "_dict", "_parent_encoding")

    def __init__(self, elements: dict[BaseTag, Any], parent_encoding: str | list[str]) -> None:
        self._dict = elements
        self._parent_encoding = parent_encoding
        self._dataset: Dataset | None = None

    def _pydicom(self) -> Dataset:
        if self._dataset is None:
            self._dataset = Dataset(self._dict, parent_encoding=self._parent_encoding)
        return self._dataset

    def get_item(self, tag: BaseTag) -> Any:
        return self._pydicom().get_item(tag)

    def __contains__(self, tag: int) -> bool:
        return tag in self._dict

    def __getitem__(self, tag: int) -> Any:
        return self._pydicom()[tag]


_Dataset = Dataset | _ElementMap


def _read_explicit_le(
    data: bytes, *, complete: bool, issuers: frozenset[str] | tuple[str, ...]
) -> ParsedHeader | None:
    """The header of a Part 10 Explicit VR Little Endian object, or None to ask pydicom."""
    try:
        ds, file_meta, transfer_syntax, header_bytes, at_pixel_data = _walk_explicit_le(
            data, complete=complete
        )
    except Exception:  # _Unsure, or anything the checks did not foresee
        return None
    cut_pixels = (
        complete
        and at_pixel_data
        and _pixel_data_cut(data, header_bytes, implicit=False, little=True)
    )
    return _records(
        ds,
        file_meta,
        transfer_syntax=transfer_syntax,
        header_bytes=header_bytes,
        issuers=frozenset(issuers),
        extra_warnings=("truncated-pixel-data",) if cut_pixels else (),
    )


def _walk_explicit_le(
    data: bytes, *, complete: bool
) -> tuple[_ElementMap, _ElementMap, str, int, bool]:
    """Walk file meta and dataset; raises _Unsure where pydicom must decide."""
    # PS3.10 7.1: the file meta group follows the prefix and is Explicit VR Little Endian.
    if data[_PREAMBLE_END : _PREAMBLE_END + 8] != _META_START:
        raise _Unsure
    meta, offset, _ = _elements(data, _PREAMBLE_END, len(data), _META, None, "iso8859")
    if offset >= len(data):
        raise _Unsure  # nothing after the meta: pydicom's guesses apply
    # pydicom: file_meta.get("TransferSyntaxUID"), a UI value (PS3.5 6.2).
    element = meta.get(_TRANSFER_SYNTAX)
    if element is None or element.VR != "UI" or not element.value:
        raise _Unsure
    transfer_syntax = convert_UI(element.value, True)
    if not isinstance(transfer_syntax, str) or transfer_syntax in _NOT_FAST:
        raise _Unsure
    if data[offset : offset + 2] == b"\x00\x00":
        raise _Unsure  # a command set (group 0000), read by pydicom as implicit VR
    elements, end, at_pixel_data = _elements(
        data, offset, len(data), _TOP, _KEPT_TOP_LEVEL, "iso8859"
    )
    if not at_pixel_data and not (complete and elements):
        raise _Unsure  # the header may go on past these bytes
    name = transfer_syntax.strip(" \x00")
    if not name:
        raise _Unsure
    return (
        _ElementMap(elements, "iso8859"),
        _ElementMap(meta, "iso8859"),
        name,
        end,
        at_pixel_data,
    )


def _elements(
    data: bytes,
    offset: int,
    limit: int,
    mode: int,
    kept: frozenset[int] | None,
    encoding: str | list[str],
) -> tuple[dict[BaseTag, Any], int, bool]:
    """Walk data elements from ``offset`` as pydicom's data_element_generator does.

    Keeps the elements in ``kept`` (all when None) as pydicom's RawDataElements, and a
    top-level sequence as the list of its items. Returns them, the offset where the walk
    ended, and whether it ended at top-level pixel data (offset = that element's start).
    ``limit`` is the end of a defined-length item, else the end of ``data``.
    """
    size = len(data)
    header = _ELEMENT_HEADER
    vrs = _VRS
    top = mode == _TOP
    elements: dict[BaseTag, Any] = {}
    while True:
        if offset + 8 > limit:
            if offset == limit and (top or mode == _DEFINED_ITEM):
                return elements, offset, False
            raise _Unsure
        group, number, vr_bytes, length = header(data, offset)
        tag = group << 16 | number
        if group == 0x0002:
            pass
        elif mode == _META:
            return elements, offset, False
        elif group == 0xFFFE:
            if tag == _ITEM_END and mode == _UNDEFINED_ITEM:
                return elements, offset + 8, False
            raise _Unsure
        # pydicom reads an element without VR letters as implicit VR (and a whole
        # dataset or item whose first element has none); an unknown VR with a guessed
        # 2-byte length. Neither is the plain case.
        vr, long = vrs.get(vr_bytes) or _no_vr()
        value_offset = offset + 8
        if long:
            if offset + 12 > size:
                raise _Unsure
            (length,) = _LENGTH_32(data, value_offset)
            value_offset += 4
        if top and tag in _PIXEL_TAGS:
            return elements, offset, True
        keep = kept is None or tag in kept
        if length == _UNDEFINED:
            if vr != "SQ":
                raise _Unsure  # pydicom reads to a delimiter, or infers an implicit SQ for UN
            # Sequences inside items are walked only: the records never read them.
            build = keep and top
            items, offset = _sequence(data, value_offset, None, encoding, build=build)
            if build:
                elements[BaseTag(tag)] = items
            continue
        end = value_offset + length
        if end > limit:
            raise _Unsure
        if keep:
            if top and vr == "SQ":
                # pydicom keeps a defined-length sequence as bytes, which _Reader.items
                # reads with read_sequence and the default encoding; so does this.
                items, _ = _sequence(data, value_offset, end, _DEFAULT_ENCODINGS, build=True)
                elements[BaseTag(tag)] = items
            else:
                value = data[value_offset:end] if length else _empty_raw(vr)
                if tag == _CHARSET:
                    encoding = convert_encodings(convert_string(value or b"", True))
                elements[BaseTag(tag)] = RawDataElement(
                    BaseTag(tag), vr, length, value, value_offset, False, True
                )
        offset = end


def _no_vr() -> tuple[str, bool]:
    raise _Unsure


def _empty_raw(vr: str) -> bytes | None:
    """What pydicom's generator stores for an empty value (b"" or None, by VR and config)."""
    value = empty_value_for_VR(vr, raw=True)
    return value if value is None or isinstance(value, bytes) else None


def _sequence(
    data: bytes, offset: int, end: int | None, encoding: str | list[str], *, build: bool
) -> tuple[list[_ElementMap], int]:
    """The items of a sequence value (PS3.5 7.5) from ``offset`` to ``end`` (None: undefined).

    Items are read as pydicom's read_sequence reads them when ``build``; otherwise the
    value is only walked to find where it ends. Returns the items and the end offset.
    """
    size = len(data)
    items: list[_ElementMap] = []
    while True:
        if end is not None and offset >= end:
            if offset != end:
                raise _Unsure
            return items, offset
        if offset + 8 > size:
            raise _Unsure
        group, number, length = _ITEM_HEADER(data, offset)
        tag = group << 16 | number
        if tag == _SEQUENCE_END:
            if end is not None:
                raise _Unsure
            return items, offset + 8
        if tag != _ITEM:
            raise _Unsure
        offset += 8
        if length == _UNDEFINED:
            elements, offset, _ = _elements(data, offset, size, _UNDEFINED_ITEM, None, encoding)
        else:
            item_end = offset + length
            if item_end > (size if end is None else end):
                raise _Unsure
            elements, offset, _ = _elements(data, offset, item_end, _DEFINED_ITEM, None, encoding)
        if build:
            items.append(_ElementMap(elements, encoding))


class _TopLevel:
    """pydicom ``stop_when`` hook: stops at pixel data, notes where each top-level value ends.

    pydicom calls it with each top-level element's tag and length once the element header
    is read (``_is_implicit_vr`` may call it once more for the first element).
    """

    def __init__(self, probe: _Probe) -> None:
        self._probe = probe
        self.tag: int | None = None
        self.value_end: int | None = None
        """End offset of the last element's value; None for undefined length."""
        self.at_pixel_data = False

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            self.at_pixel_data = True
            return True
        self.tag = int(tag)
        self.value_end = None if length == 0xFFFFFFFF else self._probe.tell() + length
        return False


def _raise_for_cut(probe: _Probe, top: _TopLevel, *, complete: bool, failed: bool) -> None:
    """Raise NeedMoreData / NotParseable(truncated) if the parse reached past the data.

    Without a read past the end, the parse of a prefix is the parse of the whole object.
    With one, a partial object always needs more; a whole object is only accepted when it
    ends cleanly where a top-level element would start (all reads past the end were
    element-header reads of nothing, at the very end, and the last value is whole).
    """
    if not probe.short_reads:
        return
    if not complete:
        raise NeedMoreData(max(probe.size + 1, probe.need + _LOOKAHEAD))
    if top.tag is None:
        raise NotParseable("truncated: object ends before its dataset")
    # An undefined-length value that is cut makes pydicom fail or read past the end in big
    # chunks; one that parsed ended with its delimiter.
    cut_in_value = top.value_end is not None and top.value_end > probe.size
    if not (failed or probe.hard_overrun or cut_in_value):
        return
    tag = f"({top.tag >> 16:04X},{top.tag & 0xFFFF:04X})"
    if cut_in_value or failed:
        raise NotParseable(f"truncated: object ends inside element {tag}")
    raise NotParseable(f"truncated: object ends inside an element header after {tag}")


def _pixel_data_cut(data: bytes, offset: int, *, implicit: bool, little: bool) -> bool:
    """Whether a defined-length pixel data element at ``offset`` runs past the end of data."""
    order = "<" if little else ">"
    if offset + 8 > len(data):
        return False
    group, element = struct.unpack_from(f"{order}HH", data, offset)
    if group != 0x7FE0 or element not in (0x0008, 0x0009, 0x0010):
        return False
    if implicit:
        header, (length,) = 8, struct.unpack_from(f"{order}L", data, offset + 4)
    elif not (data[offset + 4] in _VR_CHARS and data[offset + 5] in _VR_CHARS):
        # pydicom reads an element without VR letters as implicit VR; so do we.
        header, (length,) = 8, struct.unpack_from(f"{order}L", data, offset + 4)
    elif data[offset + 4 : offset + 6] in _LONG_VRS:
        if offset + 12 > len(data):
            return True
        header, (length,) = 12, struct.unpack_from(f"{order}L", data, offset + 8)
    else:
        header, (length,) = 8, struct.unpack_from(f"{order}H", data, offset + 6)
    return bool(length != 0xFFFFFFFF and offset + header + length > len(data))


def check_pixel_data_extent(data: bytes, header: ParsedHeader, *, object_size: int) -> None:
    """Raise ``NotParseable("truncated: ...")`` if the object is shorter than its header says.

    ``data`` is the object's first bytes as given to :func:`parse_header` (its header
    and whatever followed in the same read), ``object_size`` the whole object's size
    (from the listing or the read). Only what ``data`` shows is checked, so a sync
    needs no read beyond its header read:

    * a defined-length pixel data value (native) must end inside the object;
    * encapsulated pixel data (PS3.5 A.4): its Basic Offset Table must end inside the
      object, the last frame it declares must start inside it (with room for an item
      header), and every fragment item seen in ``data`` must end inside it; when
      ``data`` is the whole object, the fragments must end with the Sequence Delimitation
      Item. A whole Deflated object whose deflate stream ends before its end is truncated
      (``truncated-pixel-data`` from :func:`parse_header`); a deflated prefix cannot be
      checked without inflating the whole object, and is not.
    """
    if "truncated-pixel-data" in header.warnings:
        raise NotParseable("truncated: the object ends inside its pixel data")
    syntax = header.instance.TransferSyntaxUID
    offset = header.header_bytes
    if syntax == DeflatedExplicitVRLittleEndian or offset + 8 > len(data):
        return
    little = syntax != ExplicitVRBigEndian
    order = "<" if little else ">"
    group, element = struct.unpack_from(f"{order}HH", data, offset)
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        return
    name = f"({group:04X},{element:04X})"
    vr = data[offset + 4 : offset + 6]
    if syntax == ImplicitVRLittleEndian or not (vr[0] in _VR_CHARS and vr[1] in _VR_CHARS):
        size, (length,) = 8, struct.unpack_from(f"{order}L", data, offset + 4)
    elif vr in _LONG_VRS:
        if offset + 12 > len(data):
            return
        size, (length,) = 12, struct.unpack_from(f"{order}L", data, offset + 8)
    else:
        size, (length,) = 8, struct.unpack_from(f"{order}H", data, offset + 6)
    value = offset + size
    if length != _UNDEFINED:
        if value + length > object_size:
            raise NotParseable(
                f"truncated: pixel data {name} declares {length} bytes; the object ends "
                f"{value + length - object_size} bytes short of them"
            )
        return
    _check_fragments(data, value, object_size, order)


def _check_fragments(data: bytes, at: int, object_size: int, order: str) -> None:
    """The encapsulated items from ``at`` (the Basic Offset Table first) against the size."""
    item = struct.Struct(f"{order}HHL").unpack_from
    if at + 8 > len(data):
        return
    group, element, length = item(data, at)
    if (group << 16 | element) != _ITEM or length == _UNDEFINED:
        return  # malformed, not short: pydicom's problem when the pixels are read
    first = at + 8 + length
    if first > object_size:
        raise NotParseable("truncated: the object ends inside its Basic Offset Table")
    if length and first <= len(data):
        offsets = struct.unpack_from(f"{order}{length // 4}L", data, at + 8)
        last = first + max(offsets)
        if last + 8 > object_size:
            raise NotParseable(
                f"truncated: the object ends before the last frame its Basic Offset Table "
                f"declares ({len(offsets)} frames)"
            )
    at = first
    while at + 8 <= len(data):
        group, element, length = item(data, at)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or length == _UNDEFINED:
            return
        if at + 8 + length > object_size:
            raise NotParseable("truncated: the object ends inside a pixel data fragment")
        at += 8 + length
    if len(data) >= object_size:
        raise NotParseable(
            "truncated: encapsulated pixel data ends without its Sequence Delimitation Item"
        )


def _plausible_dataset_start(data: bytes) -> bool:
    """Whether ``data`` begins with a tag a preamble-less dataset could start with."""
    if len(data) < 8:
        return False
    return (
        int.from_bytes(data[0:2], "little") in _START_GROUPS
        or int.from_bytes(data[0:2], "big") in _START_GROUPS
    )


def _parse_deflated(
    data: bytes,
    meta_end: int,
    *,
    complete: bool,
    issuers: frozenset[str] | tuple[str, ...],
    max_inflated: int,
) -> ParsedHeader:
    """Parse a Deflated Explicit VR Little Endian object (PS3.5 A.5) from a prefix.

    The dataset after the file meta is one raw deflate stream; a prefix of the stream
    inflates to a prefix of the dataset, which is then checked like any other prefix.
    At most ``max_inflated`` bytes are inflated: a prefix of the dataset too.
    """
    try:
        file_meta: Dataset = read_partial(io.BytesIO(data[:meta_end]), force=True).file_meta
    except Exception as exc:  # pragma: no cover - the same bytes parsed a moment ago
        raise NotParseable(f"unreadable: {_scrub(exc)}") from None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[meta_end:], max_inflated)
    except zlib.error:
        raise NotParseable("unreadable: invalid deflate stream") from None
    stream_ended = inflater.eof
    # Output stopped at the bound with input left: what follows is not known here.
    bounded = not stream_ended and bool(inflater.unconsumed_tail)
    probe = _Probe(inflated, intercept_read_all=False)
    top = _TopLevel(probe)
    failure: Exception | None = None
    try:
        ds = read_dataset(
            probe,
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=top,
            specific_tags=_TOP_LEVEL_TAGS,
        )
    except Exception as exc:
        failure = exc
    if probe.short_reads and not stream_ended:
        if bounded:
            raise NotParseable(
                f"header-too-large: the deflated header inflates past {max_inflated} bytes"
            )
        if complete:
            raise NotParseable("truncated: deflate stream ends inside the header")
        # Guess the compressed size from the ratio so far; pixel data is deflated too, so
        # ask generously.
        consumed = len(data) - meta_end - len(inflater.unused_data)
        ratio = consumed / len(inflated) if inflated else 1.0
        estimate = meta_end + int((probe.need + _LOOKAHEAD) * ratio) + 4096
        raise NeedMoreData(max(len(data) + 1, 2 * len(data), estimate))
    # The stream ended (the inflated dataset is whole) or the header ended before the cut.
    _raise_for_cut(probe, top, complete=stream_ended, failed=failure is not None)
    if failure is not None:
        raise NotParseable(f"unreadable: {_scrub(failure)}")
    cut_pixels = complete and not stream_ended and not bounded and top.at_pixel_data
    return _records(
        ds,
        file_meta,
        transfer_syntax=_transfer_syntax(file_meta, ds),
        header_bytes=meta_end + _deflated_extent(data[meta_end:], probe.tell()),
        issuers=frozenset(issuers),
        extra_warnings=("truncated-pixel-data",) if cut_pixels else (),
    )


def _deflated_extent(stream: bytes, inflated_needed: int) -> int:
    """How much of a deflate stream, in whole steps of _DEFLATE_STEP, inflates to the header.

    A deflated header has no byte extent in the object; this is the same for every prefix
    that holds the header (the output of each step depends only on the input so far), so
    the result does not depend on how much was read. It may exceed the object's size.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    produced = 0
    offset = 0
    while produced < inflated_needed and offset < len(stream):
        produced += len(inflater.decompress(stream[offset : offset + _DEFLATE_STEP]))
        offset += _DEFLATE_STEP
    return offset


def _scrub(exc: BaseException) -> str:
    """A short description of a pydicom error with anything quoted (maybe a value) removed."""
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(exc)).replace("\n", " ")
    return f"{type(exc).__name__}: {message}"[:200]


def _transfer_syntax(file_meta: Dataset, ds: Dataset) -> str:
    """The transfer syntax from the file meta, else the encoding pydicom found."""
    try:
        value = file_meta.get("TransferSyntaxUID")
    except Exception:
        value = None
    if value is not None:
        text = str(value).strip(" \x00")
        if text:
            return text
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


class _Reader:
    """Reads fields of one dataset; malformed optional values become warnings, not errors.

    Values are decoded from the raw element bytes where that is unambiguous (ASCII VRs,
    and text in a single character set without escape sequences), which is several times
    faster than pydicom's conversion; everything else goes through pydicom.
    """

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def element(self, ds: _Dataset, keyword: str) -> Any:
        """The raw or converted element, or None when absent or unreadable."""
        tag = _BASE_TAGS[keyword]
        # Fast path of Dataset.get_item: a raw element already read, or an absent one.
        element = ds._dict.get(tag)
        if element is None:
            return None
        if element.__class__ is RawDataElement and element.value is not None:
            return element
        try:
            return ds.get_item(tag)
        except Exception:
            self.warn(f"unreadable-field: {keyword}")
            return None

    def converted(self, ds: _Dataset, keyword: str) -> Any:
        """The value as pydicom converts it, or None when absent or unreadable."""
        tag = _TAGS[keyword]
        try:
            return ds[tag].value if tag in ds else None
        except Exception:
            self.warn(f"unreadable-field: {keyword}")
            return None

    def encodings(self, ds: _Dataset, inherited: list[str]) -> list[str]:
        """Python codecs for the text of ``ds`` (PS3.5 7.5.3: items inherit the parent's)."""
        values = self.strings(ds, "SpecificCharacterSet", _DEFAULT_ENCODINGS)
        if values is None:
            return inherited
        try:
            return list(convert_encodings(values if len(values) > 1 else values[0]))
        except Exception:  # pragma: no cover - pydicom only raises in RAISE mode
            self.warn("unreadable-field: SpecificCharacterSet")
            return inherited

    def strings(self, ds: _Dataset, keyword: str, encodings: list[str]) -> list[str] | None:
        """The values of a string element, decoded and stripped; None when absent."""
        element = self.element(ds, keyword)
        if element is None:
            return None
        if not element.is_raw:
            parts = self._parts(element.value, keyword)
        elif element.value is None:
            return None
        else:
            text = _decode_raw(element.value, encodings)
            if text is None:
                parts = self._parts(self.converted(ds, keyword), keyword)
            else:
                # Fast path: the same result as the general clean-up below.
                if "\x1b" not in text:
                    if "\\" in text:
                        parts = [part.strip(" \x00") for part in text.split("\\")]
                    else:
                        parts = [text.strip(" \x00")]
                    if "\ufffd" in text:
                        self.warn(f"undecodable-text: {keyword}")
                    return parts
                parts = text.split("\\")
        parts = [part.replace(_IR58_ESCAPE, "").strip(" \x00") for part in parts]
        if any("\ufffd" in part for part in parts):
            self.warn(f"undecodable-text: {keyword}")
        return parts

    def _parts(self, value: Any, keyword: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, bytes | bytearray):
            self.warn(f"unreadable-field: {keyword}")
            return []
        if isinstance(value, MultiValue | list | tuple):
            return [str(part) for part in value]
        return [str(value)]

    def text(self, ds: _Dataset, keyword: str, encodings: list[str]) -> str | None:
        parts = self.strings(ds, keyword, encodings)
        if parts is None:
            return None
        return "\\".join(parts).strip("\\") or None

    def person_name(self, ds: _Dataset, keyword: str, encodings: list[str]) -> str | None:
        parts = self.strings(ds, keyword, encodings)
        if parts is None:
            return None
        return "\\".join(_normalize_pn(part) for part in parts).strip("\\") or None

    def date(self, ds: _Dataset, keyword: str) -> str | None:
        """A DA value as ``YYYYMMDD`` (ACR-NEMA ``YYYY.MM.DD`` too); None with a warning
        when it is not a calendar date."""
        text = self.text(ds, keyword, _DEFAULT_ENCODINGS)
        if text is None:
            return None
        date = normalize_date(text)
        if date is None:
            self.warn(f"invalid-date: {keyword}")
        return date

    def time(self, ds: _Dataset, keyword: str) -> str | None:
        """A TM value as ``HH[MM[SS[.F]]]`` (ACR-NEMA ``HH:MM:SS.F`` too); None with a
        warning when it is not a time of day."""
        text = self.text(ds, keyword, _DEFAULT_ENCODINGS)
        if text is None:
            return None
        time = normalize_time(text)
        if time is None:
            self.warn(f"invalid-time: {keyword}")
        return time

    def integer_string(self, ds: _Dataset, keyword: str) -> int | None:
        """An IS value (PS3.5 6.2); None with a warning when it is not one integer."""
        text = self.text(ds, keyword, _DEFAULT_ENCODINGS)
        if text is None:
            return None
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
        self.warn(f"invalid-int: {keyword}")
        return None

    def unsigned_short(self, ds: _Dataset, keyword: str) -> int | None:
        """A US value (PS3.5 6.2); None with a warning unless exactly one value."""
        element = self.element(ds, keyword)
        if element is None:
            return None
        if element.is_raw:
            raw = element.value
            if not raw:
                return None
            if len(raw) == 2:
                order = "<" if element.is_little_endian else ">"
                return int(struct.unpack(f"{order}H", raw)[0])
            value = self.converted(ds, keyword)
        else:
            value = element.value
        if isinstance(value, int):
            return value
        self.warn(f"invalid-int: {keyword}")
        return None

    def uid(self, ds: _Dataset, keyword: str, fallback: tuple[_Dataset, str] | None) -> str:
        """A required UID; raises NotParseable if missing or malformed."""
        parts = self.strings(ds, keyword, _DEFAULT_ENCODINGS)
        if parts is None or not any(parts):
            if fallback is not None:
                fallback_parts = self.strings(fallback[0], fallback[1], _DEFAULT_ENCODINGS)
                if fallback_parts is not None and any(fallback_parts):
                    return self.uid(fallback[0], fallback[1], None)
            raise NotParseable(f"missing-uid: {keyword}")
        if len(parts) != 1:
            raise NotParseable(f"invalid-uid: {keyword}")
        text = parts[0]
        if len(text) > _UID_MAX or not _UID_RE.fullmatch(text):
            raise NotParseable(f"invalid-uid: {keyword}")
        return text

    def items(self, ds: _Dataset, keyword: str) -> list[_Dataset]:
        """The items of a sequence; [] when absent or unreadable."""
        found = ds._dict.get(_BASE_TAGS[keyword])
        if found.__class__ is list:  # items the fast walk read
            return list(found)
        element = self.element(ds, keyword)
        if element is None:
            return []
        try:
            if element.is_raw:
                # A defined-length sequence still in bytes: parse it directly (what
                # pydicom's conversion does, without its bookkeeping).
                raw = element.value or b""
                value = read_sequence(
                    io.BytesIO(raw),
                    is_implicit_VR=element.is_implicit_VR,
                    is_little_endian=element.is_little_endian,
                    bytelength=len(raw),
                    encoding=_DEFAULT_ENCODINGS,
                )
            else:
                value = element.value
            return [item for item in value if isinstance(item, Dataset)]
        except Exception:
            self.warn(f"unreadable-field: {keyword}")
            return []


def _decode_raw(raw: bytes, encodings: list[str]) -> str | None:
    """Decode a raw text value where no code extension is involved; None means ask pydicom.

    GB18030, GBK and UTF-8 are decoded before splitting on backslash (a GBK trail byte can
    be 0x5C). ISO 2022 IR 58 is GB2312 in G1 (PS3.5 K.2), so with ASCII as G0 the value is
    EUC-CN once the escape sequences are removed; this also reads the common vendor form
    that omits the escapes, which pydicom decodes as Latin-1.
    """
    if encodings in _IR58_ENCODINGS:
        text = raw.replace(b"\x1b$)A", b"").replace(b"\x1b(B", b"")
        return text.decode("gb18030", errors="replace")
    if len(encodings) != 1 or b"\x1b" in raw:
        return None
    codec = _codec_name(encodings[0])
    if codec is None:
        return None
    try:
        return raw.decode(codec, errors="replace")
    except LookupError:  # pragma: no cover - a codec that is not a text encoding
        return None


_CODEC_NAMES: dict[str, str | None] = {}


def _codec_name(encoding: str) -> str | None:
    """The canonical name of a Python codec (cheaper to decode with); None if unknown."""
    try:
        return _CODEC_NAMES[encoding]
    except KeyError:
        pass
    try:
        name: str | None = codecs.lookup(encoding).name
    except LookupError:
        name = None
    _CODEC_NAMES[encoding] = name
    return name


def _normalize_pn(name: str) -> str:
    """PN text as pydicom shows it: no escape leftovers, no padding, no empty trailing groups."""
    groups = name.replace(_IR58_ESCAPE, "").strip(" \x00").split("=")
    while groups and not groups[-1].strip():
        groups.pop()
    return "=".join(groups)


def _records(
    ds: _Dataset,
    file_meta: _Dataset,
    *,
    transfer_syntax: str,
    header_bytes: int,
    issuers: frozenset[str],
    extra_warnings: Iterable[str],
) -> ParsedHeader:
    """Build the records; raises NotParseable for a missing or malformed required UID."""
    read = _Reader()
    study_uid = read.uid(ds, "StudyInstanceUID", None)
    series_uid = read.uid(ds, "SeriesInstanceUID", None)
    sop_uid = read.uid(ds, "SOPInstanceUID", (file_meta, "MediaStorageSOPInstanceUID"))
    sop_class = read.uid(ds, "SOPClassUID", (file_meta, "MediaStorageSOPClassUID"))

    charset = read.strings(ds, "SpecificCharacterSet", _DEFAULT_ENCODINGS)
    encodings = read.encodings(ds, _DEFAULT_ENCODINGS)
    patient_id = read.text(ds, "PatientID", encodings) or ""
    if not patient_id.strip():
        patient_id = ""  # blank: no identity (PatientRecord.identified)
    extra: list[tuple[str, Any]] = []
    patient_values = _read_level(read, ds, "patient", encodings, extra)
    issuer = patient_values.get("IssuerOfPatientID")
    patient = PatientRecord(
        PatientID=patient_id,
        **patient_values,
        national_id=_national_id(read, ds, encodings, patient_id, issuer, issuers),
    )
    code_items = read.items(ds, "InstitutionCodeSequence")
    study_values = _read_level(read, ds, "study", encodings, extra)
    study = StudyRecord(
        StudyInstanceUID=study_uid,
        **study_values,
        institution_code=(
            read.text(code_items[0], "CodeValue", read.encodings(code_items[0], encodings))
            if code_items
            else None
        ),
    )
    series = SeriesRecord(
        SeriesInstanceUID=series_uid, **_read_level(read, ds, "series", encodings, extra)
    )
    instance_values = _read_level(read, ds, "instance", encodings, extra)
    instance = InstanceRecord(
        SOPInstanceUID=sop_uid,
        SOPClassUID=sop_class,
        TransferSyntaxUID=transfer_syntax,
        **instance_values,
    )
    for warning in extra_warnings:
        read.warn(warning)
    return ParsedHeader(
        patient=patient,
        study=study,
        series=series,
        instance=instance,
        SpecificCharacterSet="\\".join(charset) if charset and any(charset) else None,
        header_bytes=header_bytes,
        warnings=tuple(read.warnings),
        extra=tuple(extra),
    )


# How each VR is read: the _Reader method, and which character sets its text takes
# (None: no text decoding; True: the dataset's; False: the default, ASCII VRs).
_READERS: Final[dict[str, tuple[Callable[..., Any], bool | None]]] = {
    "PN": (_Reader.person_name, True),
    "DA": (_Reader.date, None),
    "TM": (_Reader.time, None),
    "IS": (_Reader.integer_string, None),
    "US": (_Reader.unsigned_short, None),
}
# Per level: (keyword, column, reader, character sets, whether its record has a field),
# worked out once: a header read is on the sync's hot path.
_READ_PLAN: Final = {
    level: tuple(
        (keyword, column, *_READERS.get(vr, (_Reader.text, vr not in _ASCII_VRS)), in_record)
        for keyword, column, vr, in_record in read
    )
    for level, read in _READ.items()
}


def _read_level(
    read: _Reader,
    ds: _Dataset,
    level: EntityLevel,
    encodings: list[str],
    extra: list[tuple[str, Any]],
) -> dict[str, Any]:
    """The values of the table's header attributes of ``level`` read by VR: record field
    -> value; those without a record field are appended to ``extra`` by keyword."""
    values: dict[str, Any] = {}
    for keyword, column, reader, text, in_record in _READ_PLAN[level]:
        if text is None:
            value = reader(read, ds, keyword)
        else:
            value = reader(read, ds, keyword, encodings if text else _DEFAULT_ENCODINGS)
        if in_record:
            values[column] = value
        else:
            extra.append((keyword, value))
    return values


def _national_id(
    read: _Reader,
    ds: _Dataset,
    encodings: list[str],
    patient_id: str,
    issuer: str | None,
    issuers: frozenset[str],
) -> str | None:
    """The GB 11643 number from OtherPatientIDsSequence (or the PatientID) of a known issuer."""
    candidate: str | None = None
    for item in read.items(ds, "OtherPatientIDsSequence"):
        item_encodings = read.encodings(item, encodings)
        if read.text(item, "IssuerOfPatientID", item_encodings) in issuers:
            candidate = read.text(item, "PatientID", item_encodings) or ""
            break
    if candidate is None and issuer in issuers:
        candidate = patient_id
    if candidate is None:
        return None
    normalized = candidate.strip().upper()
    if is_valid_resident_id(normalized):
        return normalized
    read.warn("national-id-checksum-invalid")
    return None


# ECMA-35 (ISO 2022) escape sequence: ESC, intermediate bytes, a final byte.
_ESCAPE_SEQUENCE = re.compile("\x1b[\x20-\x2f]*[\x30-\x7e]?")
_UTF8 = ["UTF8"]
# The VRs whose values (0008,0005) applies to (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def decode_text_values(ds: Dataset) -> None:
    """Decode every text value of ``ds`` to Unicode in place, as the index decodes it.

    For payloads that are UTF-8 whatever the object's character sets (DICOM JSON,
    PS3.18 F.2; the Native DICOM Model, PS3.19 A.1): each SH, LO, ST, LT, UC, UT and PN
    value, in sequence items too, is decoded with the character sets in force where it
    stands ((0008,0005) of its dataset, else of the enclosing one, PS3.5 7.5.3), with
    the index's decoder where pydicom's is wrong (ISO 2022 IR 58, whose G1 escape
    sequences pydicom keeps in the text; GBK/GB18030 trail bytes that are backslashes),
    and no escape sequence is left in any value. Every (0008,0005) then says
    ``ISO_IR 192``, and the top level gets one if it had none. Elements pydicom cannot
    convert are left as they are (the caller decides what to do with them).
    Raises nothing.
    """
    marked: list[Dataset] = []
    _decode_dataset(ds, _DEFAULT_ENCODINGS, marked)
    for dataset in marked:
        dataset.SpecificCharacterSet = "ISO_IR 192"
    if "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"


def _decode_dataset(ds: Dataset, inherited: list[str], marked: list[Dataset]) -> None:
    encodings = inherited
    if _CHARSET in ds:
        marked.append(ds)
        try:
            value = ds[_CHARSET].value
            values = list(value) if isinstance(value, MultiValue) else [value or ""]
            encodings = list(convert_encodings(values if len(values) > 1 else values[0]))
        except Exception:  # noqa: S110 - unreadable: the enclosing sets stay in force
            pass
    for tag in list(ds.keys()):
        try:
            raw = ds.get_item(tag)
            element = ds[tag]
        except Exception:  # noqa: S112 - not convertible: left for the caller
            continue
        vr = element.VR
        if vr == "SQ":
            for item in element.value or []:
                if isinstance(item, Dataset):
                    _decode_dataset(item, encodings, marked)
            continue
        if vr not in _TEXT_VRS or element.value is None:
            continue
        value = element.value
        if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
            text = _decode_raw(raw.value, encodings)
            if text is not None:
                # pydicom splits, strips and builds the PN objects as it always does,
                # from the UTF-8 form of the text decoded here.
                utf8 = raw._replace(value=text.encode("utf-8"), length=-1)
                value = convert_value(vr, utf8, _UTF8)
        value = _without_escapes(vr, value)
        if value is not element.value:
            ds[tag] = DataElement(tag, vr, value)


def _without_escapes(vr: str, value: Any) -> Any:
    """``value`` without ISO 2022 escape sequences (the same object when it has none)."""
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    texts = [str(v) for v in values]
    if not any("\x1b" in text for text in texts):
        return value
    clean = [_ESCAPE_SEQUENCE.sub("", text) for text in texts]
    out: list[Any] = [PersonName(t) if vr == "PN" else t for t in clean]
    return out if len(out) > 1 else out[0]
