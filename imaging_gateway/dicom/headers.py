"""Parse one DICOM object's header (whole, or a prefix from a ranged read) into index records."""

from __future__ import annotations

import datetime
import io
import re
import struct
import zlib
from collections.abc import Iterable
from typing import Any

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.domain.records import (
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
    "parse_header",
]

DEFAULT_NATIONAL_ID_ISSUERS: tuple[str, ...] = ("CN-RESIDENT-ID",)

# PS3.10 7.1: 128-byte preamble, then the "DICM" prefix.
_PREAMBLE_END = 132
# Groups a dataset without preamble can plausibly start with: file meta (0002), directory
# (0004), identifying (0008). Anything else is not read as DICOM (pydicom's force=True
# would happily parse a PNG into garbage elements).
_START_GROUPS = frozenset({0x0002, 0x0004, 0x0008})
# Bytes past a cut that the parser needs at least to see the next element's header.
_LOOKAHEAD = 12
# PS3.5 9.1: UIDs are dot-separated digit components, at most 64 characters.
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX = 64
_DATE_RE = re.compile(r"[0-9]{8}")
# PS3.5 6.2 TM: HH[MM[SS[.F{1,6}]]]
_TIME_RE = re.compile(r"[0-9]{2}(?:[0-9]{2}(?:[0-9]{2}(?:\.[0-9]{1,6})?)?)?")
# pydicom 3.0 decodes ISO 2022 IR 58 fragments with Python's gb2312 codec, which keeps
# the G1 designation escape (PS3.5 6.1.2.5.3, Annex K.2) in the text: strip it.
_IR58_ESCAPE = "\x1b$)A"
_VR_CHARS = range(0x41, 0x5B)
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
        self.first_short: tuple[int, int, int] | None = None
        """(position, requested size, bytes returned) of the first short read."""
        self._intercept = intercept_read_all

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            if self._intercept:
                raise _DeflatedDataset(self.tell())
            return super().read()
        chunk = super().read(size)
        if len(chunk) < size:
            position = self.tell() - len(chunk)
            self.need = max(self.need, position + size)
            self.short_reads += 1
            if chunk or size > 8:
                self.hard_overrun = True
            if self.first_short is None:
                self.first_short = (position, size, len(chunk))
        return chunk


def parse_header(
    data: bytes,
    *,
    complete: bool,
    national_id_issuers: frozenset[str] | tuple[str, ...] = DEFAULT_NATIONAL_ID_ISSUERS,
) -> ParsedHeader:
    """Parse the header of one DICOM object into a :class:`ParsedHeader`.

    ``data`` is the object's first bytes (e.g. a 64 KiB ranged GET); ``complete`` says
    whether it is the whole object. Reading stops before top-level pixel data
    ((7FE0,0010), (7FE0,0008), (7FE0,0009)); pixel data is never decoded.

    Raises:
        NeedMoreData: ``complete`` is False and the header is not wholly inside ``data``
            (including ``data`` ending exactly where an element before pixel data would
            start). ``at_least`` is a lower bound of the total size to read next; it may
            exceed the object's size, in which case read the whole object and call again
            with ``complete=True``.
        NotParseable: the object cannot be indexed: ``empty``, ``not-dicom``,
            ``truncated`` (only with ``complete=True``), ``missing-uid``, ``invalid-uid``
            or ``unreadable``. The reason holds tag numbers and keywords, never values.
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

    probe = _Probe(data, intercept_read_all=True)
    try:
        ds: Dataset = dcmread(probe, stop_before_pixels=True, force=True)
    except _DeflatedDataset as deflated:
        return _parse_deflated(data, deflated.offset, complete, national_id_issuers)
    except Exception as exc:
        _raise_for_cut(probe, data, complete)
        raise NotParseable(f"unreadable: {_scrub(exc)}") from None
    if probe.short_reads and (not complete or probe.hard_overrun):
        _raise_for_cut(probe, data, complete)
    file_meta: Dataset = ds.file_meta
    if complete and not len(ds) and len(file_meta):
        raise NotParseable("truncated: object ends after the file meta information")
    header_bytes = min(probe.tell(), size)
    implicit, little = ds.original_encoding
    cut_pixels = complete and _pixel_data_cut(
        data, header_bytes, implicit=implicit is not False, little=little is not False
    )
    return _records(
        ds,
        file_meta,
        transfer_syntax=_transfer_syntax(file_meta, ds),
        header_bytes=header_bytes,
        issuers=frozenset(national_id_issuers),
        extra_warnings=("truncated-pixel-data",) if cut_pixels else (),
    )


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


def _plausible_dataset_start(data: bytes) -> bool:
    """Whether ``data`` begins with a tag a preamble-less dataset could start with."""
    if len(data) < 8:
        return False
    return (
        int.from_bytes(data[0:2], "little") in _START_GROUPS
        or int.from_bytes(data[0:2], "big") in _START_GROUPS
    )


def _raise_for_cut(probe: _Probe, data: bytes, complete: bool) -> None:
    """Raise NeedMoreData / NotParseable(truncated) if the probe saw a read past the end."""
    if not probe.short_reads:
        return
    if not complete:
        raise NeedMoreData(max(len(data) + 1, probe.need + _LOOKAHEAD))
    raise NotParseable(f"truncated: {_describe_cut(probe, data)}")


def _describe_cut(probe: _Probe, data: bytes) -> str:
    """Name the element the object ends in, from the element header before the short read."""
    if probe.first_short is None:  # pragma: no cover - only called after a short read
        return "object ends inside the header"
    position, size, got = probe.first_short
    if size <= 8 and got == 0 and position == len(data):
        return "object ends inside a sequence before its delimiter"
    if size <= 8:
        return "object ends inside an element header"
    for order in ("<", ">"):
        tag = _tag_before_value(data, position, size, order)
        if tag is not None:
            return f"object ends inside element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"object ends inside an element value at byte {position}"


def _tag_before_value(data: bytes, position: int, length: int, order: str) -> int | None:
    """The tag of the element whose value of ``length`` bytes starts at ``position``."""
    # Implicit VR (tag, 4-byte length) or explicit VR with a 4-byte length (tag, VR, 00 00, len).
    if position >= 8 and struct.unpack_from(f"{order}L", data, position - 4)[0] == length:
        if (
            position >= 12
            and data[position - 8] in _VR_CHARS
            and data[position - 7] in _VR_CHARS
            and data[position - 6 : position - 4] == b"\0\0"
        ):
            group, element = struct.unpack_from(f"{order}HH", data, position - 12)
        else:
            group, element = struct.unpack_from(f"{order}HH", data, position - 8)
        return int(group) << 16 | int(element)
    # Explicit VR with a 2-byte length (tag, VR, len).
    if (
        position >= 8
        and length < 0x10000
        and struct.unpack_from(f"{order}H", data, position - 2)[0] == length
        and data[position - 4] in _VR_CHARS
        and data[position - 3] in _VR_CHARS
    ):
        group, element = struct.unpack_from(f"{order}HH", data, position - 8)
        return int(group) << 16 | int(element)
    return None


def _parse_deflated(
    data: bytes,
    meta_end: int,
    complete: bool,
    issuers: frozenset[str] | tuple[str, ...],
) -> ParsedHeader:
    """Parse a Deflated Explicit VR Little Endian object (PS3.5 A.5) from a prefix.

    The dataset after the file meta is one raw deflate stream; a prefix of the stream
    inflates to a prefix of the dataset, which is then checked like any other prefix.
    """
    meta_probe = _Probe(data[:meta_end], intercept_read_all=False)
    try:
        file_meta: Dataset = dcmread(meta_probe, force=True).file_meta
    except Exception as exc:  # pragma: no cover - the meta parsed a moment ago
        raise NotParseable(f"unreadable: {_scrub(exc)}") from None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[meta_end:])
    except zlib.error:
        raise NotParseable("unreadable: invalid deflate stream") from None
    stream_ended = inflater.eof
    probe = _Probe(inflated, intercept_read_all=False)

    def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
        return tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)

    try:
        ds = read_dataset(
            probe, is_implicit_VR=False, is_little_endian=True, stop_when=at_pixel_data
        )
        failure: Exception | None = None
    except Exception as exc:
        failure = exc
    cut = probe.short_reads and (not stream_ended or probe.hard_overrun or failure is not None)
    if cut:
        if complete:
            if not stream_ended:
                raise NotParseable("truncated: deflate stream ends inside the header")
            raise NotParseable(f"truncated: {_describe_cut(probe, inflated)}")
        consumed = len(data) - meta_end - len(inflater.unused_data)
        ratio = consumed / len(inflated) if inflated else 1.0
        estimate = meta_end + int((probe.need + _LOOKAHEAD) * ratio) + 4096
        raise NeedMoreData(max(len(data) + 1, 2 * len(data), estimate))
    if failure is not None:
        raise NotParseable(f"unreadable: {_scrub(failure)}")
    warnings: tuple[str, ...] = ()
    if complete and not stream_ended:
        warnings = ("truncated-pixel-data",)
    if complete and not len(ds):
        raise NotParseable("truncated: object ends after the file meta information")
    return _records(
        ds,
        file_meta,
        transfer_syntax=_transfer_syntax(file_meta, ds),
        header_bytes=len(data),
        issuers=frozenset(issuers),
        extra_warnings=warnings,
    )


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
    """Reads fields of one dataset, turning malformed optional values into warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)

    def value(self, ds: Dataset, keyword: str) -> Any:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            return None
        try:
            return ds[tag].value
        except Exception:
            self.warn(f"unreadable-field: {keyword}")
            return None

    def text(self, ds: Dataset, keyword: str) -> str | None:
        value = self.value(ds, keyword)
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            self.warn(f"unreadable-field: {keyword}")
            return None
        parts = value if isinstance(value, MultiValue | list) else [value]
        text = "\\".join(str(part) for part in parts).replace(_IR58_ESCAPE, "")
        text = text.strip(" \x00")
        if "\ufffd" in text:
            self.warn(f"undecodable-text: {keyword}")
        return text or None

    def person_name(self, ds: Dataset, keyword: str) -> str | None:
        value = self.value(ds, keyword)
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            self.warn(f"unreadable-field: {keyword}")
            return None
        parts = value if isinstance(value, MultiValue | list) else [value]
        text = "\\".join(_normalize_pn(str(part)) for part in parts).strip("\\")
        if "\ufffd" in text:
            self.warn(f"undecodable-text: {keyword}")
        return text or None

    def date(self, ds: Dataset, keyword: str) -> str | None:
        text = self.text(ds, keyword)
        if text is None:
            return None
        if _DATE_RE.fullmatch(text):
            try:
                datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
            except ValueError:
                pass
            else:
                return text
        self.warn(f"invalid-date: {keyword}")
        return None

    def time(self, ds: Dataset, keyword: str) -> str | None:
        text = self.text(ds, keyword)
        if text is None:
            return None
        if _TIME_RE.fullmatch(text):
            return text
        self.warn(f"invalid-time: {keyword}")
        return None

    def integer(self, ds: Dataset, keyword: str) -> int | None:
        value = self.value(ds, keyword)
        if value is None or value == "":
            return None
        if isinstance(value, MultiValue | list):
            if len(value) != 1:
                self.warn(f"invalid-int: {keyword}")
                return None
            value = value[0]
        try:
            number = int(value)
            if isinstance(value, float | str) and float(value) != number:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            self.warn(f"invalid-int: {keyword}")
            return None
        return number

    def uid(self, ds: Dataset, keyword: str, fallback: tuple[Dataset, str] | None) -> str:
        """A required UID; raises NotParseable if missing or malformed."""
        tag = tag_for_keyword(keyword)
        try:
            value = ds[tag].value if tag in ds else None
        except Exception:
            raise NotParseable(f"invalid-uid: {keyword}") from None
        if value is None or value == "":
            if fallback is None:
                raise NotParseable(f"missing-uid: {keyword}")
            return self.uid(fallback[0], fallback[1], None)
        if isinstance(value, MultiValue | list) or not isinstance(value, str):
            raise NotParseable(f"invalid-uid: {keyword}")
        text = value.strip(" \x00")
        if not text:
            if fallback is None:
                raise NotParseable(f"missing-uid: {keyword}")
            return self.uid(fallback[0], fallback[1], None)
        if len(text) > _UID_MAX or not _UID_RE.fullmatch(text):
            raise NotParseable(f"invalid-uid: {keyword}")
        return text


def _normalize_pn(name: str) -> str:
    """PN text as pydicom shows it: no escape leftovers, no padding, no empty trailing groups."""
    groups = name.replace(_IR58_ESCAPE, "").strip(" \x00").split("=")
    while groups and not groups[-1].strip():
        groups.pop()
    return "=".join(groups)


def _records(
    ds: Dataset,
    file_meta: Dataset,
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

    patient_id = read.text(ds, "PatientID") or ""
    issuer = read.text(ds, "IssuerOfPatientID")
    patient = PatientRecord(
        PatientID=patient_id,
        IssuerOfPatientID=issuer,
        PatientName=read.person_name(ds, "PatientName"),
        PatientBirthDate=read.date(ds, "PatientBirthDate"),
        PatientSex=read.text(ds, "PatientSex"),
        national_id=_national_id(read, ds, patient_id, issuer, issuers),
    )
    study = StudyRecord(
        StudyInstanceUID=study_uid,
        StudyDate=read.date(ds, "StudyDate"),
        StudyTime=read.time(ds, "StudyTime"),
        AccessionNumber=read.text(ds, "AccessionNumber"),
        StudyID=read.text(ds, "StudyID"),
        StudyDescription=read.text(ds, "StudyDescription"),
        ReferringPhysicianName=read.person_name(ds, "ReferringPhysicianName"),
        InstitutionName=read.text(ds, "InstitutionName"),
        institution_code=_institution_code(read, ds),
    )
    series = SeriesRecord(
        SeriesInstanceUID=series_uid,
        Modality=read.text(ds, "Modality"),
        SeriesNumber=read.integer(ds, "SeriesNumber"),
        SeriesDescription=read.text(ds, "SeriesDescription"),
        BodyPartExamined=read.text(ds, "BodyPartExamined"),
        SeriesDate=read.date(ds, "SeriesDate"),
    )
    instance = InstanceRecord(
        SOPInstanceUID=sop_uid,
        SOPClassUID=sop_class,
        InstanceNumber=read.integer(ds, "InstanceNumber"),
        TransferSyntaxUID=transfer_syntax,
        Rows=read.integer(ds, "Rows"),
        Columns=read.integer(ds, "Columns"),
        NumberOfFrames=read.integer(ds, "NumberOfFrames"),
    )
    charset = read.value(ds, "SpecificCharacterSet")
    if isinstance(charset, MultiValue | list):
        charset_text: str | None = "\\".join(str(part) for part in charset)
    else:
        charset_text = str(charset) if charset is not None else None
    for warning in extra_warnings:
        read.warn(warning)
    return ParsedHeader(
        patient=patient,
        study=study,
        series=series,
        instance=instance,
        SpecificCharacterSet=charset_text or None,
        header_bytes=header_bytes,
        warnings=tuple(read.warnings),
    )


def _items(read: _Reader, ds: Dataset, keyword: str) -> list[Dataset]:
    value = read.value(ds, keyword)
    if value is None:
        return []
    try:
        return [item for item in value if isinstance(item, Dataset)]
    except TypeError:
        read.warn(f"unreadable-field: {keyword}")
        return []


def _institution_code(read: _Reader, ds: Dataset) -> str | None:
    items = _items(read, ds, "InstitutionCodeSequence")
    return read.text(items[0], "CodeValue") if items else None


def _national_id(
    read: _Reader,
    ds: Dataset,
    patient_id: str,
    issuer: str | None,
    issuers: frozenset[str],
) -> str | None:
    """The GB 11643 number from OtherPatientIDsSequence (or the PatientID) of a known issuer."""
    candidate: str | None = None
    for item in _items(read, ds, "OtherPatientIDsSequence"):
        if read.text(item, "IssuerOfPatientID") in issuers:
            candidate = read.text(item, "PatientID") or ""
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
