"""parse_header: records from real and synthetic headers; truncation is never silent."""

from __future__ import annotations

import dataclasses
import io
import struct

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imaging_gateway.dicom.headers import NeedMoreData, NotParseable, parse_header
from imaging_gateway.dicom.temporal import normalize_date, normalize_dicom_json, normalize_time
from imaging_gateway.domain.records import ParsedHeader
from tests.factories import (
    NATIONAL_ID,
    PYDICOM_DATA,
    SOP_UID,
    dataset_bytes,
    make_instance,
    make_instance_bytes,
    minimal_dataset,
    pydicom_file,
    undefined_lengths,
    valid_resident_id,
)

# Cut inputs make pydicom warn (a cut UID, an unknown "GB180" charset); that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REASON_CODES = ("empty", "not-dicom", "truncated", "missing-uid", "invalid-uid", "unreadable")
PIXEL_WARNING = "truncated-pixel-data"


def without_pixel_warning(header: ParsedHeader) -> ParsedHeader:
    """The header as a prefix read returns it (only a whole object shows cut pixel data)."""
    kept = tuple(w for w in header.warnings if w != PIXEL_WARNING)
    return dataclasses.replace(header, warnings=kept)


def assert_prefixes(raw: bytes, *, step: int = 1, start: int = 0) -> ParsedHeader:
    """Every prefix either asks for more (past its end) or parses exactly like the whole."""
    full = parse_header(raw, complete=True)
    expected = without_pixel_warning(full)
    stop = min(len(raw), full.header_bytes + 64)
    parsed_from: int | None = None
    for cut in [*range(start, stop, step), stop]:
        try:
            header = parse_header(raw[:cut], complete=False)
        except NeedMoreData as more:
            assert more.at_least > cut, (cut, more.at_least)
            assert parsed_from is None, f"parsed at {parsed_from} but not at {cut}"
            continue
        assert header == expected, f"prefix of {cut} bytes parsed differently"
        parsed_from = parsed_from if parsed_from is not None else cut
    assert parsed_from is not None or full.header_bytes >= len(raw)
    return full


def follow_need_more(raw: bytes, start: int) -> ParsedHeader:
    """Read like the sync job: start with ``start`` bytes, fetch what NeedMoreData asks."""
    size = start
    for _ in range(10_000):
        complete = size >= len(raw)
        try:
            return parse_header(raw[:size], complete=complete)
        except NeedMoreData as more:
            assert not complete
            assert more.at_least > size
            size = min(len(raw), more.at_least)
    raise AssertionError("no progress")


def pixel_data_offset(raw: bytes, *, little: bool = True) -> int:
    return raw.rfind(b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10")


# --- fields -------------------------------------------------------------------------


def test_minimal_dataset_fields() -> None:
    raw = dataset_bytes(minimal_dataset())
    header = parse_header(raw, complete=True)
    assert header.patient.PatientID == "0119031140"
    assert header.patient.IssuerOfPatientID == "H11010100013"
    assert header.patient.PatientName == "Wang^XiaoDong=王^小东"
    assert header.patient.PatientBirthDate == "19491231"
    assert header.patient.PatientSex == "M"
    assert header.patient.national_id == NATIONAL_ID
    assert header.study.StudyDate == "20250314"
    assert header.study.StudyTime == "083015.123"
    assert header.study.AccessionNumber == "A250314001"
    assert header.study.StudyID == "1001"
    assert header.study.StudyDescription == "胸部CT平扫"
    assert header.study.ReferringPhysicianName == "Li^JianHua=李^建华"
    assert header.study.InstitutionName == "北京协和医院"
    assert header.study.institution_code == "H11010100013"
    assert header.series.Modality == "CT"
    assert header.series.SeriesNumber == 2
    assert header.series.SeriesDescription == "胸部平扫 5mm"
    assert header.series.BodyPartExamined == "CHEST"
    assert header.series.SeriesDate == "20250314"
    assert header.instance.SOPInstanceUID == SOP_UID
    assert header.instance.InstanceNumber == 7
    assert header.instance.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (header.instance.Rows, header.instance.Columns) == (4, 4)
    assert header.instance.NumberOfFrames is None
    assert header.SpecificCharacterSet == "GB18030"
    assert header.header_bytes == pixel_data_offset(raw)
    assert header.warnings == ()


def test_patient_id_may_be_missing() -> None:
    header = parse_header(dataset_bytes(minimal_dataset(PatientID=None)), complete=True)
    assert header.patient.PatientID == ""


@pytest.mark.parametrize(
    ("keyword", "reason"),
    [
        ("StudyInstanceUID", "missing-uid: StudyInstanceUID"),
        ("SeriesInstanceUID", "missing-uid: SeriesInstanceUID"),
    ],
)
def test_missing_required_uid(keyword: str, reason: str) -> None:
    with pytest.raises(NotParseable) as info:
        parse_header(dataset_bytes(minimal_dataset(**{keyword: None})), complete=True)
    assert info.value.reason == reason


def test_sop_uids_fall_back_to_file_meta() -> None:
    ds = minimal_dataset()
    raw = dataset_bytes(ds)
    del ds.SOPInstanceUID
    del ds.SOPClassUID
    buffer = io.BytesIO()
    ds.save_as(buffer)  # keeps the file meta written above
    header = parse_header(buffer.getvalue(), complete=True)
    assert header.instance.SOPInstanceUID == SOP_UID
    assert header.instance.SOPClassUID == parse_header(raw, complete=True).instance.SOPClassUID


def test_sop_uid_missing_everywhere() -> None:
    raw = dataset_bytes(minimal_dataset(SOPInstanceUID=None), file_meta=False)
    with pytest.raises(NotParseable) as info:
        parse_header(raw, complete=True)
    assert info.value.reason == "missing-uid: SOPInstanceUID"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyInstanceUID", "1.2.3.abc"),
        ("SeriesInstanceUID", "1.2..3"),
        ("SOPInstanceUID", "1." + "2" * 64),
        ("StudyInstanceUID", "1.2.3\\1.2.4"),
    ],
)
def test_invalid_uid(keyword: str, value: str) -> None:
    ds = minimal_dataset()
    tag = ds[keyword].tag
    ds[tag] = pydicom.DataElement(tag, "UI", value, validation_mode=pydicom.config.IGNORE)
    raw = dataset_bytes(ds, file_meta=False)
    with pytest.raises(NotParseable) as info:
        parse_header(raw, complete=True)
    assert info.value.reason == f"invalid-uid: {keyword}"


def with_values(ds: Dataset, values: dict[int, tuple[str, str]]) -> bytes:
    """``ds`` as bytes with elements set to (malformed) values pydicom would not accept."""
    placeholders = {}
    for number, (tag, (vr, value)) in enumerate(values.items()):
        if vr == "IS":  # pydicom refuses to hold a malformed IS: patch the bytes instead
            # Same length as the value (so the element length stays right), unlikely elsewhere.
            placeholder = "+-"[number % 2] + "7" * (len(value) - 1)
            placeholders[placeholder.encode()] = value.encode()
            value = placeholder
        ds[tag] = pydicom.DataElement(tag, vr, value, validation_mode=pydicom.config.IGNORE)
    raw = dataset_bytes(ds)
    for placeholder, value in placeholders.items():
        assert raw.count(placeholder) == 1
        raw = raw.replace(placeholder, value)
    return raw


def test_malformed_optional_fields_become_warnings_without_values() -> None:
    raw = with_values(
        minimal_dataset(),
        {
            0x00080020: ("DA", "2025-03-14"),  # StudyDate
            0x00080030: ("TM", "8:30"),  # StudyTime
            0x00100030: ("DA", "19490231"),  # PatientBirthDate: no such day
            0x00200011: ("IS", "2A"),  # SeriesNumber
            0x00200013: ("IS", "1\\2"),  # InstanceNumber
        },
    )
    header = parse_header(raw, complete=True)
    assert header.study.StudyDate is None
    assert header.study.StudyTime is None
    assert header.patient.PatientBirthDate is None
    assert header.series.SeriesNumber is None
    assert header.instance.InstanceNumber is None
    assert set(header.warnings) == {
        "invalid-date: StudyDate",
        "invalid-time: StudyTime",
        "invalid-date: PatientBirthDate",
        "invalid-int: SeriesNumber",
        "invalid-int: InstanceNumber",
    }
    for value in ("2025", "8:30", "1949", "2A"):
        assert all(value not in warning for warning in header.warnings)


def test_acr_nema_dates_and_times_are_read_in_the_dicom_form() -> None:
    """PS3.5 6.2: readers accept the ACR-NEMA 300 forms YYYY.MM.DD and HH:MM:SS.frac;
    the records hold the DICOM form (what QIDO-RS matches and returns)."""
    # pydicom's own file: StudyDate 1997.04.24, StudyTime 14:04:38.
    header = parse_header(pydicom_file("ExplVR_BigEnd.dcm"), complete=True)
    assert (header.study.StudyDate, header.study.StudyTime) == ("19970424", "140438")
    assert not [w for w in header.warnings if w.startswith(("invalid-date", "invalid-time"))]
    raw = with_values(
        minimal_dataset(),
        {
            0x00080020: ("DA", "1993.08.22"),  # StudyDate
            0x00080030: ("TM", "07:09:07.0705"),  # StudyTime
            0x00080021: ("DA", "1993.02.29"),  # SeriesDate: no such day
            0x00100030: ("DA", "1949.12.31"),  # PatientBirthDate
        },
    )
    header = parse_header(raw, complete=True)
    assert (header.study.StudyDate, header.study.StudyTime) == ("19930822", "070907.0705")
    assert header.patient.PatientBirthDate == "19491231"
    assert header.series.SeriesDate is None
    assert header.warnings == ("invalid-date: SeriesDate",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("19930822", "19930822"),
        ("1993.08.22", "19930822"),
        ("1993.0822", None),
        ("1993-08-22", None),
        ("1993.02.30", None),
        ("199308", None),
    ],
)
def test_normalize_date(value: str, expected: str | None) -> None:
    assert normalize_date(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("070907.0705", "070907.0705"),
        ("07:09:07.0705", "070907.0705"),
        ("07:09:07", "070907"),
        ("07:09", "0709"),
        ("07", "07"),
        ("235960", "235960"),
        ("0709:07", None),
        ("07:0907", None),
        ("7:09", None),
        ("24:00", None),
        ("0760", None),
        ("070907.", None),
        ("07:09:07.1234567", None),
    ],
)
def test_normalize_time(value: str, expected: str | None) -> None:
    assert normalize_time(value) == expected


def test_normalize_dicom_json_rewrites_dates_and_times_in_sequences_too() -> None:
    dataset = {
        "00080020": {"vr": "DA", "Value": ["1997.04.24"]},
        "00080030": {"vr": "TM", "Value": ["14:04:38", "not a time"]},
        "00081111": {"vr": "SQ", "Value": [{"00080021": {"vr": "DA", "Value": ["2001.02.03"]}}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "1997.04.24"}]},
        "00080023": {"vr": "DA"},
    }
    normalize_dicom_json(dataset)
    assert dataset == {
        "00080020": {"vr": "DA", "Value": ["19970424"]},
        "00080030": {"vr": "TM", "Value": ["140438", "not a time"]},
        "00081111": {"vr": "SQ", "Value": [{"00080021": {"vr": "DA", "Value": ["20010203"]}}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "1997.04.24"}]},
        "00080023": {"vr": "DA"},
    }


def national_id_dataset(number: str, issuer: str = "CN-RESIDENT-ID") -> Dataset:
    ds = minimal_dataset()
    ds.OtherPatientIDsSequence[0].PatientID = number
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = issuer
    return ds


def test_national_id_valid_and_invalid() -> None:
    number = valid_resident_id()
    good = parse_header(dataset_bytes(national_id_dataset(number)), complete=True)
    assert good.patient.national_id == number
    assert good.warnings == ()
    bad_number = number[:-1] + ("0" if number[-1] != "0" else "1")
    bad = parse_header(dataset_bytes(national_id_dataset(bad_number)), complete=True)
    assert bad.patient.national_id is None
    assert bad.warnings == ("national-id-checksum-invalid",)
    assert all(bad_number not in warning for warning in bad.warnings)


def test_national_id_lower_case_x_is_normalised() -> None:
    header = parse_header(dataset_bytes(national_id_dataset(NATIONAL_ID.lower())), complete=True)
    assert header.patient.national_id == NATIONAL_ID


def test_national_id_only_from_configured_issuers() -> None:
    raw = dataset_bytes(national_id_dataset(NATIONAL_ID, issuer="HK-ID"))
    assert parse_header(raw, complete=True).patient.national_id is None
    header = parse_header(raw, complete=True, national_id_issuers=frozenset({"HK-ID"}))
    assert header.patient.national_id == NATIONAL_ID


def test_national_id_from_patient_id_of_a_national_issuer() -> None:
    ds = minimal_dataset(
        OtherPatientIDsSequence=None, PatientID=NATIONAL_ID, IssuerOfPatientID="CN-RESIDENT-ID"
    )
    header = parse_header(dataset_bytes(ds), complete=True)
    assert header.patient.national_id == NATIONAL_ID


# --- character sets -------------------------------------------------------------------


CHARSET_FILES = sorted(p.name for p in (PYDICOM_DATA / "charset_files").glob("*.dcm"))


@pytest.mark.parametrize("name", CHARSET_FILES)
def test_charset_files_match_pydicom(name: str) -> None:
    raw = pydicom_file(name, "charset_files")
    reference = pydicom.dcmread(io.BytesIO(raw))
    if "StudyInstanceUID" not in reference:
        with pytest.raises(NotParseable, match="missing-uid"):
            parse_header(raw, complete=True)
        return
    header = parse_header(raw, complete=True)
    names = reference.get("PatientName")
    if names is None:
        assert header.patient.PatientName is None
    else:
        values = names if isinstance(names, pydicom.multival.MultiValue) else [names]
        assert header.patient.PatientName == "\\".join(str(v) for v in values)
    assert header.study.StudyDescription == (reference.get("StudyDescription") or None)
    assert header.SpecificCharacterSet == "\\".join(
        reference.SpecificCharacterSet
        if isinstance(reference.SpecificCharacterSet, pydicom.multival.MultiValue)
        else [reference.SpecificCharacterSet]
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),  # ISO_IR 192
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),  # GB18030
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 87
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),  # ISO 2022 IR 149
        ("chrFren.dcm", "Buc^Jérôme"),  # ISO_IR 100
    ],
)
def test_charset_file_names(name: str, expected: str) -> None:
    header = parse_header(pydicom_file(name, "charset_files"), complete=True)
    assert header.patient.PatientName == expected


# PS3.5 Annex K.2, example 2: "Zhang^XiaoDong=张^小东=" in \ISO 2022 IR 58.
ANNEX_K_IR58 = bytes.fromhex("5A68616E675E5869616F446F6E673D1B242941D5C55E1B242941D0A1B6AB3D20")


def with_pn_bytes(charset: list[str] | str, value: bytes, text: bytes | None = None) -> bytes:
    ds = minimal_dataset(SpecificCharacterSet=charset)
    ds.add(pydicom.DataElement(0x00100010, "PN", value))
    if text is not None:
        ds.add(pydicom.DataElement(0x00081030, "LO", text))
    return dataset_bytes(ds)


@pytest.mark.parametrize(
    "charset", [["", "ISO 2022 IR 58"], ["ISO 2022 IR 6", "ISO 2022 IR 58"], "ISO 2022 IR 58"]
)
def test_iso_2022_ir_58_annex_k(charset: list[str] | str) -> None:
    description = b"\x1b$)A" + "胸部CT平扫".encode("gb2312")
    header = parse_header(with_pn_bytes(charset, ANNEX_K_IR58, description), complete=True)
    assert header.patient.PatientName == "Zhang^XiaoDong=张^小东"
    assert header.study.StudyDescription == "胸部CT平扫"


def test_iso_2022_ir_58_without_escapes_vendor_form() -> None:
    # Many Chinese devices write GB2312 bytes under "\ISO 2022 IR 58" without ESC $ ) A.
    raw = with_pn_bytes(["", "ISO 2022 IR 58"], "Zhang^San=张^三".encode("gb2312"))
    assert parse_header(raw, complete=True).patient.PatientName == "Zhang^San=张^三"


@pytest.mark.parametrize("charset", ["GBK", "GB18030"])
def test_gbk_trail_byte_backslash_is_not_a_delimiter(charset: str) -> None:
    name = "Li^Sheng=李^乗僜"  # 乗 is 81 5C in GBK: its trail byte is a backslash
    assert b"\\" in name.encode("gbk")
    raw = dataset_bytes(minimal_dataset(SpecificCharacterSet=charset, PatientName=name))
    assert parse_header(raw, complete=True).patient.PatientName == name


def test_gb18030_four_byte_characters() -> None:
    name = "Wang^Xin=王^𠀾鑫"  # 𠀾 is outside the BMP: a four-byte GB18030 sequence
    raw = dataset_bytes(minimal_dataset(SpecificCharacterSet="GB18030", PatientName=name))
    assert parse_header(raw, complete=True).patient.PatientName == name


def test_undecodable_text_is_a_warning() -> None:
    raw = with_pn_bytes("ISO_IR 192", b"Wang^Xiao=\xff\xfe")
    header = parse_header(raw, complete=True)
    assert header.warnings == ("undecodable-text: PatientName",)


# --- transfer syntaxes ------------------------------------------------------------------


MR_VARIANTS = [
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("MR_small_expb.dcm", ExplicitVRBigEndian),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
]


@pytest.mark.parametrize(("name", "syntax"), MR_VARIANTS)
def test_same_records_in_every_transfer_syntax(name: str, syntax: str) -> None:
    raw = pydicom_file(name)
    header = parse_header(raw, complete=True)
    reference = parse_header(pydicom_file("MR_small.dcm"), complete=True)
    assert header.instance.TransferSyntaxUID == syntax
    for part in ("patient", "study", "series"):
        assert getattr(header, part) == getattr(reference, part)
    assert header.instance.SOPInstanceUID == reference.instance.SOPInstanceUID
    assert header.instance.Rows == 64
    little = syntax != ExplicitVRBigEndian
    assert header.header_bytes == pixel_data_offset(raw, little=little)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("ExplVR_LitEndNoMeta.dcm", ExplicitVRLittleEndian),
        ("ExplVR_BigEndNoMeta.dcm", ExplicitVRBigEndian),
        ("rtplan.dcm", ImplicitVRLittleEndian),  # no preamble, no meta
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
        ("ExplVR_BigEnd.dcm", ExplicitVRBigEndian),
    ],
)
def test_other_encodings(name: str, syntax: str) -> None:
    raw = pydicom_file(name)
    header = parse_header(raw, complete=True)
    reference = pydicom.dcmread(io.BytesIO(raw), force=True)
    assert header.instance.TransferSyntaxUID == syntax
    assert header.study.StudyInstanceUID == reference.StudyInstanceUID
    assert header.instance.SOPInstanceUID == reference.SOPInstanceUID


def test_encapsulated_pixel_data_header_stops_before_pixels() -> None:
    raw = pydicom_file("JPEG2000.dcm")
    header = parse_header(raw, complete=True)
    assert header.header_bytes == pixel_data_offset(raw)
    # The whole pixel data element header (tag, VR, reserved, length) must be there.
    with pytest.raises(NeedMoreData):
        parse_header(raw[: header.header_bytes + 11], complete=False)
    assert parse_header(raw[: header.header_bytes + 12], complete=False) == header


# --- truncation -------------------------------------------------------------------------


PREFIX_CASES = {
    "explicit LE, undefined-length sequences": (ExplicitVRLittleEndian, True, True),
    "implicit LE, no file meta": (ImplicitVRLittleEndian, False, False),
    "explicit BE": (ExplicitVRBigEndian, True, False),
    "deflated": (DeflatedExplicitVRLittleEndian, True, True),
}


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_every_prefix_of_a_small_file(case: str) -> None:
    syntax, meta, undefined = PREFIX_CASES[case]
    ds = minimal_dataset()
    if undefined:
        undefined_lengths(ds)
    full = assert_prefixes(dataset_bytes(ds, transfer_syntax=syntax, file_meta=meta))
    assert full.patient.national_id == NATIONAL_ID


@pytest.mark.parametrize(
    "name",
    ["MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm", "rtplan.dcm", "chrH32.dcm"],
)
def test_prefixes_of_pydicom_files(name: str) -> None:
    folder = "charset_files" if name.startswith("chr") else "test_files"
    assert_prefixes(pydicom_file(name, folder), step=11)


@pytest.mark.parametrize("charset", ["GB18030", "ISO 2022 IR 58"])
def test_prefixes_of_a_synthetic_ct(charset: str) -> None:
    assert_prefixes(make_instance_bytes(charset=charset), step=7, start=1)


@pytest.mark.parametrize("start", [0, 1, 131, 132, 200, 700])
def test_following_need_more_data_reaches_the_full_header(start: int) -> None:
    ds = undefined_lengths(minimal_dataset())
    raw = dataset_bytes(ds)
    assert follow_need_more(raw, start) == parse_header(raw, complete=True)


def test_exact_element_boundary_before_pixel_data_needs_more() -> None:
    raw = dataset_bytes(minimal_dataset())
    pixels = pixel_data_offset(raw)
    with pytest.raises(NeedMoreData) as info:
        parse_header(raw[:pixels], complete=False)
    assert info.value.at_least > pixels
    # A whole object without pixel data ends on an element boundary: that is complete.
    header = parse_header(raw[:pixels], complete=True)
    assert header.header_bytes == pixels


def test_complete_but_cut_is_truncated_at_every_offset() -> None:
    ds = undefined_lengths(minimal_dataset())
    raw = dataset_bytes(ds)
    full = parse_header(raw, complete=True)
    # A cut where an element starts leaves a shorter but whole object.
    boundaries = element_boundaries(ds, raw) | element_boundaries(ds.file_meta, raw) | {132}
    for cut in range(1, full.header_bytes):
        if cut in boundaries:
            continue
        with pytest.raises(NotParseable) as info:
            parse_header(raw[:cut], complete=True)
        expected = "not-dicom" if cut < 132 else "truncated"
        assert info.value.reason.startswith(expected), (cut, info.value.reason)


def element_boundaries(ds: Dataset, raw: bytes) -> set[int]:
    """Offsets where the top-level elements of ``ds`` start in ``raw``."""
    offsets = set()
    for element in ds:
        tag = struct.pack("<HH", element.tag.group, element.tag.element)
        at = raw.find(tag, 132)
        if at > 0:
            offsets.add(at)
    return offsets


def test_cut_element_is_named_in_the_reason() -> None:
    raw = dataset_bytes(minimal_dataset())
    at = raw.find("胸部平扫".encode("gb18030"))
    with pytest.raises(NotParseable) as info:
        parse_header(raw[: at + 3], complete=True)
    assert info.value.reason == "truncated: object ends inside element (0008,103E)"


def test_truncated_pixel_data_is_a_warning_for_whole_objects() -> None:
    header = parse_header(pydicom_file("MR_truncated.dcm"), complete=True)
    assert header.warnings == (PIXEL_WARNING,)


def test_realistic_ct_from_a_64_kib_range() -> None:
    instance = make_instance(modality="CT", pixel_mode="realistic", charset="GB18030")
    assert len(instance.data) > 512 * 512 * 2
    ranged = parse_header(instance.data[:65536], complete=False)
    assert ranged == parse_header(instance.data, complete=True)
    assert ranged.header_bytes == pixel_data_offset(instance.data)


# --- what is not indexable ----------------------------------------------------------------


def test_empty_object() -> None:
    with pytest.raises(NotParseable) as info:
        parse_header(b"", complete=True)
    assert info.value.reason == "empty: zero-byte object"
    with pytest.raises(NeedMoreData):
        parse_header(b"", complete=False)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        b"%PDF-1.7\n" + b"x" * 300,
        "不是DICOM文件\n".encode() * 20,
        b"short",
        pydicom_file("zipMR.gz"),
        pydicom_file("no_meta.dcm"),  # starts one byte into a dataset
    ],
)
def test_not_dicom(data: bytes) -> None:
    with pytest.raises(NotParseable) as info:
        parse_header(data, complete=True)
    assert info.value.reason == "not-dicom: no DICM preamble and no valid dataset start"


def test_short_prefix_could_still_be_a_preamble() -> None:
    with pytest.raises(NeedMoreData) as info:
        parse_header(bytes(64), complete=False)
    assert info.value.at_least >= 132


TEST_FILES = sorted(p.name for p in (PYDICOM_DATA / "test_files").iterdir() if p.is_file())


@pytest.mark.parametrize("name", TEST_FILES)
def test_every_pydicom_test_file_parses_or_has_a_reason(name: str) -> None:
    raw = pydicom_file(name)
    for data, complete in ((raw, True), (raw[:65536], len(raw) <= 65536), (raw[:300], False)):
        try:
            header = parse_header(data, complete=complete)
        except NeedMoreData as more:
            assert not complete
            assert more.at_least > len(data)
        except NotParseable as error:
            code, _, explanation = error.reason.partition(": ")
            assert code in REASON_CODES and explanation
        else:
            assert header.header_bytes > 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan_truncated.dcm", "truncated"),
        ("meta_missing_tsyntax.dcm", "missing-uid: StudyInstanceUID"),
        ("JPEGLSNearLossless_08.dcm", "missing-uid: StudyInstanceUID"),
        ("UN_sequence.dcm", "missing-uid: StudyInstanceUID"),
    ],
)
def test_malformed_pydicom_files(name: str, reason: str) -> None:
    with pytest.raises(NotParseable) as info:
        parse_header(pydicom_file(name), complete=True)
    assert info.value.reason.startswith(reason)


def test_reasons_carry_no_patient_data() -> None:
    ds = minimal_dataset(PatientName="Secret^Name", PatientID="P1234567")
    raw = dataset_bytes(ds)
    reasons = set()
    for cut in range(0, len(raw), 3):
        try:
            parse_header(raw[:cut], complete=True)
        except NotParseable as error:
            reasons.add(error.reason)
    assert reasons
    for reason in reasons:
        assert "Secret" not in reason and "P1234567" not in reason and "1949" not in reason


def test_reasons_are_stable_for_the_corrupt_samples() -> None:
    from imaging_gateway.dicom.synthetic import corrupt_samples

    for key, data, prefix in corrupt_samples():
        with pytest.raises(NotParseable) as info:
            parse_header(data, complete=True)
        assert info.value.reason.startswith(prefix + ":"), key


def test_read_only_the_header() -> None:
    # The pixel data of this object is garbage; a header parse never looks at it.
    raw = dataset_bytes(minimal_dataset())
    at = pixel_data_offset(raw)
    garbage = raw[: at + 12] + b"\xff" * (len(raw) - at - 12)
    assert parse_header(garbage, complete=True) == parse_header(raw, complete=True)
