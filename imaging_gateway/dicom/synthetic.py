"""Deterministic synthetic DICOM studies (Part 10 bytes) for the demo, tests and benchmarks."""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import random
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from imaging_gateway.dicom.national_id import resident_id_check_char

__all__ = [
    "DEFAULT_END_DATE",
    "HOSPITALS",
    "NATIONAL_ID_ISSUER",
    "SUPPORTED_CHARSETS",
    "Hospital",
    "SyntheticInstance",
    "corrupt_samples",
    "generate_instances",
]


@dataclass(frozen=True, slots=True)
class Hospital:
    """A producing institution: medical-insurance code, Chinese name, GB/T 2260 province."""

    code: str
    """"H" + 11 digits; digits 1-6 are the county-level GB/T 2260 code."""
    name: str
    province: str
    """Six-digit GB/T 2260 province code, e.g. "110000"."""
    name_en: str = ""
    """Used where the character set cannot encode the Chinese name (ISO_IR 100)."""


HOSPITALS: tuple[Hospital, ...] = (
    Hospital("H11010100013", "北京协和医院", "110000", "Peking Union Medical College Hospital"),
    Hospital("H11010800028", "北京大学第三医院", "110000", "Peking University Third Hospital"),
    Hospital(
        "H44010400011",
        "中山大学附属第一医院",
        "440000",
        "First Affiliated Hospital of Sun Yat-sen University",
    ),
    Hospital("H44010600035", "广东省人民医院", "440000", "Guangdong Provincial People's Hospital"),
    Hospital(
        "H31010400007",
        "复旦大学附属中山医院",
        "310000",
        "Zhongshan Hospital Fudan University",
    ),
    Hospital("H31010100019", "上海交通大学医学院附属瑞金医院", "310000", "Ruijin Hospital"),
)

NATIONAL_ID_ISSUER = "CN-RESIDENT-ID"
# PS3.16 8.2: private coding scheme designators begin with "99".
INSTITUTION_CODING_SCHEME = "99CN-NHSA"
DEFAULT_END_DATE = datetime.date(2026, 6, 30)
"""Latest study date unless ``end_date`` is given (fixed, so that output is reproducible)."""

_IMPLEMENTATION_CLASS_UID = f"{PYDICOM_ROOT_UID}7.1"
_IMPLEMENTATION_VERSION = "IMGW_SYNTH_1"
_IR58_ESCAPE = b"\x1b$)A"

# DICOM defined term -> (value of SpecificCharacterSet, Python codec for encodability).
SUPPORTED_CHARSETS: dict[str, tuple[str | list[str], str]] = {
    "ISO_IR 192": ("ISO_IR 192", "utf-8"),
    "GB18030": ("GB18030", "gb18030"),
    "GBK": ("GBK", "gbk"),
    # PS3.5 K.2: value 1 empty (ASCII), GB2312 designated to G1 by escape sequences.
    "ISO 2022 IR 58": (["", "ISO 2022 IR 58"], "gb2312"),
    "ISO_IR 100": ("ISO_IR 100", "latin-1"),
}

_FAMILY = (
    ("王", "Wang"), ("李", "Li"), ("张", "Zhang"), ("刘", "Liu"), ("陈", "Chen"),
    ("杨", "Yang"), ("黄", "Huang"), ("赵", "Zhao"), ("吴", "Wu"), ("周", "Zhou"),
    ("徐", "Xu"), ("孙", "Sun"), ("马", "Ma"), ("朱", "Zhu"), ("胡", "Hu"),
    ("郭", "Guo"), ("何", "He"), ("林", "Lin"), ("罗", "Luo"), ("高", "Gao"),
    ("欧阳", "OuYang"), ("司马", "SiMa"),
)  # fmt: skip
_GIVEN_M = (
    ("伟", "Wei"), ("强", "Qiang"), ("磊", "Lei"), ("军", "Jun"), ("勇", "Yong"),
    ("杰", "Jie"), ("涛", "Tao"), ("明", "Ming"), ("超", "Chao"), ("小东", "XiaoDong"),
    ("建国", "JianGuo"), ("浩然", "HaoRan"), ("志强", "ZhiQiang"), ("国华", "GuoHua"),
)  # fmt: skip
_GIVEN_F = (
    ("芳", "Fang"), ("娜", "Na"), ("秀英", "XiuYing"), ("敏", "Min"), ("静", "Jing"),
    ("丽", "Li"), ("艳", "Yan"), ("娟", "Juan"), ("霞", "Xia"), ("秀兰", "XiuLan"),
    ("婷", "Ting"), ("桂英", "GuiYing"), ("玉梅", "YuMei"), ("雪", "Xue"),
)  # fmt: skip
_LATIN = (
    ("Smith", "John", "M"), ("Müller", "Jürgen", "M"), ("García", "José", "M"),
    ("Ivanova", "Anna", "F"), ("Dubois", "Chloé", "F"), ("Kim", "Minji", "F"),
    ("Tanaka", "Hiroshi", "M"), ("Brown", "Emily", "F"),
)  # fmt: skip
_DOCTORS = (("李", "Li", "建华", "JianHua"), ("陈", "Chen", "静", "Jing"),
            ("张", "Zhang", "伟", "Wei"), ("刘", "Liu", "洋", "Yang"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Protocol:
    """One body part's study of one modality: descriptions (zh, en) and window."""

    body_part: str
    study_zh: str
    study_en: str
    series: tuple[tuple[str, str], ...]
    window: tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Modality:
    sop_class: str
    rows: int
    columns: int
    bits_stored: int
    instances: int
    manufacturers: tuple[tuple[str, str], ...]
    protocols: tuple[_Protocol, ...]


_MODALITIES: dict[str, _Modality] = {
    "CT": _Modality(
        CTImageStorage, 512, 512, 12, 8,
        (("GE MEDICAL SYSTEMS", "Revolution CT"), ("SIEMENS", "SOMATOM Force"),
         ("UIH", "uCT 760")),
        (
            _Protocol("CHEST", "胸部CT平扫", "CT CHEST W/O CONTRAST",
                      (("胸部平扫 5mm", "Chest 5mm"), ("肺窗 1.25mm", "Lung 1.25mm")), (40, 400)),
            _Protocol("HEAD", "头颅CT平扫", "CT HEAD W/O CONTRAST",
                      (("头颅平扫 5mm", "Head 5mm"), ("骨窗 1mm", "Bone 1mm")), (40, 80)),
            _Protocol("ABDOMEN", "腹部CT增强", "CT ABDOMEN WITH CONTRAST",
                      (("动脉期 1.25mm", "Arterial 1.25mm"), ("门脉期 5mm", "Portal 5mm")),
                      (50, 350)),
        ),
    ),
    "MR": _Modality(
        MRImageStorage, 256, 256, 12, 6,
        (("SIEMENS", "MAGNETOM Skyra"), ("GE MEDICAL SYSTEMS", "SIGNA Architect"),
         ("UIH", "uMR 780")),
        (
            _Protocol("HEAD", "头颅MR平扫", "MR BRAIN W/O CONTRAST",
                      (("T1 轴位", "T1 AX"), ("T2 轴位", "T2 AX"), ("FLAIR 轴位", "FLAIR AX")),
                      (600, 1200)),
            _Protocol("LSPINE", "腰椎MR平扫", "MR LUMBAR SPINE",
                      (("T1 矢状位", "T1 SAG"), ("T2 矢状位", "T2 SAG"), ("T2 轴位", "T2 AX")),
                      (700, 1400)),
            _Protocol("KNEE", "膝关节MR平扫", "MR KNEE",
                      (("PD 冠状位", "PD COR"), ("T1 矢状位", "T1 SAG"), ("T2 矢状位", "T2 SAG")),
                      (800, 1600)),
        ),
    ),
    "DX": _Modality(
        DigitalXRayImageStorageForPresentation, 1024, 1024, 14, 1,
        (("Carestream Health", "DRX-Evolution"), ("Philips", "DigitalDiagnost")),
        (
            _Protocol("CHEST", "胸部正侧位", "XR CHEST PA AND LATERAL",
                      (("胸部 后前位", "Chest PA"), ("胸部 侧位", "Chest LAT")), (8192, 16384)),
        ),
    ),
}  # fmt: skip

_SMALL = 16


@dataclass(frozen=True, slots=True)
class SyntheticInstance:
    """One generated object: its bucket key, Part 10 bytes and the identifiers in it."""

    key: str
    data: bytes
    hospital: Hospital
    study_uid: str
    series_uid: str
    sop_uid: str
    patient_id: str
    modality: str
    patient_name: str = ""
    """PatientName as parse_header returns it (PN form, trailing empty groups dropped)."""
    national_id: str = ""
    specific_character_set: str = ""
    """The defined term the study was written in, as passed in ``charsets``."""
    study_date: str = ""


@dataclass(frozen=True, slots=True)
class _Patient:
    index: int
    family: tuple[str, str]
    """(ideographic, alphabetic); ideographic empty for a Latin name."""
    given: tuple[str, str]
    sex: str
    birth: datetime.date
    national_id: str
    home: int


def generate_instances(
    *,
    seed: int,
    patients: int,
    studies_per_patient: int = 2,
    modalities: Sequence[str] = ("CT", "MR", "DX"),
    pixel_mode: Literal["realistic", "small"] = "realistic",
    hospitals: Sequence[Hospital] = HOSPITALS,
    charsets: Sequence[str] = ("ISO_IR 192", "GB18030", "ISO 2022 IR 58", "ISO_IR 100"),
    instances_per_series: int | None = None,
    series_per_study: int | None = None,
    end_date: datetime.date = DEFAULT_END_DATE,
) -> Iterator[SyntheticInstance]:
    """Yield the instances of a synthetic corpus; the same arguments give the same bytes.

    Each patient has ``studies_per_patient`` studies within the three years up to
    ``end_date``; the first at their home hospital, later ones sometimes at another
    hospital (with a different local PatientID and the same national ID). Modalities and
    character sets rotate through ``modalities`` and ``charsets`` study by study, so small
    corpora cover all of them. ``instances_per_series`` / ``series_per_study`` default to
    the modality's usual counts (CT 8 x 2, MR 6 x 3, DX 1 x 2).

    Raises ``ValueError`` for an unknown modality or character set, or empty choices.
    """
    unknown = [m for m in modalities if m not in _MODALITIES]
    unknown += [c for c in charsets if c not in SUPPORTED_CHARSETS]
    if unknown:
        raise ValueError(f"unsupported modality or character set: {unknown}")
    if not modalities or not charsets or not hospitals:
        raise ValueError("modalities, charsets and hospitals must not be empty")
    if patients < 0 or studies_per_patient < 0:
        raise ValueError("patients and studies_per_patient must not be negative")
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not a secret
    people = _make_patients(rng, seed, patients, hospitals, end_date)
    study_counter = 0
    for person in people:
        for study_index in range(studies_per_patient):
            hospital_index = person.home
            if study_index > 0 and len(hospitals) > 1 and rng.random() < 0.4:
                hospital_index = rng.choice([i for i in range(len(hospitals)) if i != person.home])
            modality = modalities[study_counter % len(modalities)]
            charset = charsets[study_counter % len(charsets)]
            yield from _study(
                rng,
                seed=seed,
                study_number=study_counter,
                person=person,
                hospital=hospitals[hospital_index],
                modality=modality,
                charset=charset,
                pixel_mode=pixel_mode,
                instances_per_series=instances_per_series,
                series_per_study=series_per_study,
                end_date=end_date,
            )
            study_counter += 1


def _make_patients(
    rng: random.Random,
    seed: int,
    count: int,
    hospitals: Sequence[Hospital],
    end_date: datetime.date,
) -> list[_Patient]:
    people: list[_Patient] = []
    used_ids: set[str] = set()
    for index in range(count):
        home = rng.randrange(len(hospitals))
        if rng.random() < 0.75:
            family = rng.choice(_FAMILY)
            sex = rng.choice("MF")
            given = rng.choice(_GIVEN_M if sex == "M" else _GIVEN_F)
        else:
            latin_family, latin_given, sex = rng.choice(_LATIN)
            family, given = ("", latin_family), ("", latin_given)
        birth = end_date - datetime.timedelta(days=rng.randrange(5 * 365, 85 * 365))
        region = hospitals[home].code[1:7]
        while True:
            sequence = rng.randrange(1, 500) * 2 - (1 if sex == "M" else 0)
            first17 = f"{region}{birth:%Y%m%d}{sequence:03d}"
            national_id = first17 + resident_id_check_char(first17)
            if national_id not in used_ids:
                used_ids.add(national_id)
                break
        people.append(_Patient(index, family, given, sex, birth, national_id, home))
    return people


def _local_patient_id(seed: int, hospital: Hospital, patient_index: int) -> str:
    """A per-hospital MRN: an injective function of the patient within one hospital."""
    digest = hashlib.sha256(f"{seed}/{hospital.code}".encode()).digest()
    offset = int.from_bytes(digest[:8], "big") % 10**8
    # 7919 is coprime with 10**8, so distinct patients get distinct numbers.
    return f"{hospital.code[3:5]}{(patient_index * 7919 + offset) % 10**8:08d}"


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(PYDICOM_ROOT_UID, [str(seed), *map(str, parts)]))


def _can_encode(text: str, charset: str) -> bool:
    try:
        text.encode(SUPPORTED_CHARSETS[charset][1])
    except UnicodeEncodeError:
        return False
    return True


def _person_name(family: tuple[str, str], given: tuple[str, str], charset: str) -> str:
    """PN text: alphabetic group, plus the ideographic group when the charset has it."""
    alphabetic = f"{family[1]}^{given[1]}"
    if family[0] and _can_encode(family[0] + given[0], charset):
        return f"{alphabetic}={family[0]}^{given[0]}"
    if not _can_encode(alphabetic, charset):
        return _ascii_fold(alphabetic)
    return alphabetic


def _ascii_fold(text: str) -> str:
    table = str.maketrans("áàäâéèëêíïîóöôúüûçñ", "aaaaeeeeiiiooouuucn")
    return text.translate(table).encode("ascii", "replace").decode("ascii")


def _encode_ir58(text: str, *, person_name: bool) -> bytes:
    """ISO 2022 IR 58 text: GB2312 (GR) after ESC $ ) A, re-designated after each delimiter.

    pydicom 3.0 writes GB2312 bytes without the escape sequence, which conformant readers
    (PS3.5 6.1.2.5.3, Annex K.2) do not decode; so these values are encoded here.
    """

    def part(value: str) -> bytes:
        return value.encode("ascii") if value.isascii() else _IR58_ESCAPE + value.encode("gb2312")

    if not person_name:
        return part(text)
    return b"=".join(
        b"^".join(part(component) for component in group.split("^")) for group in text.split("=")
    )


def _set_text(ds: Dataset, keyword: str, vr: str, text: str, charset: str) -> None:
    if charset == "ISO 2022 IR 58" and not text.isascii():
        ds.add_new(keyword, vr, _encode_ir58(text, person_name=vr == "PN"))
    else:
        setattr(ds, keyword, text)


def _text_for(charset: str, zh: str, en: str) -> str:
    return zh if _can_encode(zh, charset) else en


def _study(
    rng: random.Random,
    *,
    seed: int,
    study_number: int,
    person: _Patient,
    hospital: Hospital,
    modality: str,
    charset: str,
    pixel_mode: Literal["realistic", "small"],
    instances_per_series: int | None,
    series_per_study: int | None,
    end_date: datetime.date,
) -> Iterator[SyntheticInstance]:
    spec = _MODALITIES[modality]
    protocol = rng.choice(spec.protocols)
    manufacturer, model = rng.choice(spec.manufacturers)
    study_date = end_date - datetime.timedelta(days=rng.randrange(3 * 365))
    study_date = max(study_date, person.birth + datetime.timedelta(days=1))
    study_time = f"{rng.randrange(7, 21):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
    study_uid = _uid(seed, "study", study_number)
    frame_uid = _uid(seed, "frame", study_number)
    patient_id = _local_patient_id(seed, hospital, person.index)
    patient_name = _person_name(person.family, person.given, charset)
    doctor = rng.choice(_DOCTORS)
    doctor_name = _person_name((doctor[0], doctor[1]), (doctor[2], doctor[3]), charset)
    age_years = (study_date - person.birth).days // 365
    rows, columns = (_SMALL, _SMALL) if pixel_mode == "small" else (spec.rows, spec.columns)
    n_series = series_per_study if series_per_study is not None else len(protocol.series)
    n_instances = instances_per_series if instances_per_series is not None else spec.instances
    field_strength = rng.choice(("1.5", "3.0"))

    ds = Dataset()
    ds.SpecificCharacterSet = SUPPORTED_CHARSETS[charset][0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    ds.SOPClassUID = spec.sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"{study_date:%Y%m%d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"A{study_date:%y%m%d}{study_number % 100000:05d}"
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    _set_text(ds, "InstitutionName", "LO", _text_for(charset, hospital.name, hospital.name_en),
              charset)  # fmt: skip
    code_item = Dataset()
    code_item.CodeValue = hospital.code
    code_item.CodingSchemeDesignator = INSTITUTION_CODING_SCHEME
    _set_text(code_item, "CodeMeaning", "LO",
              _text_for(charset, hospital.name, hospital.name_en), charset)  # fmt: skip
    ds.InstitutionCodeSequence = [code_item]
    _set_text(ds, "ReferringPhysicianName", "PN", doctor_name, charset)
    ds.StationName = f"{modality}{rng.randrange(1, 6):02d}"
    _set_text(ds, "StudyDescription", "LO",
              _text_for(charset, protocol.study_zh, protocol.study_en), charset)  # fmt: skip
    ds.ManufacturerModelName = model
    _set_text(ds, "PatientName", "PN", patient_name, charset)
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = hospital.code
    ds.PatientBirthDate = f"{person.birth:%Y%m%d}"
    ds.PatientSex = person.sex
    other_id = Dataset()
    other_id.PatientID = person.national_id
    other_id.IssuerOfPatientID = NATIONAL_ID_ISSUER
    other_id.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other_id]
    ds.PatientAge = f"{min(age_years, 999):03d}Y"
    ds.BodyPartExamined = protocol.body_part
    ds.StudyInstanceUID = study_uid
    ds.StudyID = str(1000 + study_number % 9000)
    ds.PatientOrientation = ["P", "F"] if modality == "DX" else ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = protocol.window
    _modality_attributes(ds, modality, rng, field_strength)
    if modality in ("CT", "MR"):
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PatientPosition = "HFS"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(spec.sop_class)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds.file_meta = meta

    day = f"{study_date:%Y/%m/%d}"
    for series_index in range(n_series):
        series_uid = _uid(seed, "series", study_number, series_index)
        zh, en = protocol.series[series_index % len(protocol.series)]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_index + 1
        _set_text(ds, "SeriesDescription", "LO", _text_for(charset, zh, en), charset)
        thickness = 5.0 if "5mm" in en else 1.25
        if modality == "CT":
            ds.SliceThickness = thickness
        if modality == "DX":
            ds.ViewPosition = "LL" if "LAT" in en else "PA"
        template: _SeriesTemplate | None = None
        for instance_index in range(n_instances):
            sop_uid = _uid(seed, "instance", study_number, series_index, instance_index)
            values = {0x00080018: sop_uid, 0x00200013: str(instance_index + 1)}
            if modality in ("CT", "MR"):
                z = round(-instance_index * thickness, 2)
                values[0x00200032] = f"{-250.0}\\{-250.0}\\{float(z)}"
                values[0x00201041] = str(float(z))
            pixels = _pixels(
                modality,
                rows,
                columns,
                spec.bits_stored,
                (seed, study_number, series_index, instance_index),
                realistic=pixel_mode == "realistic",
            )
            if template is None:
                template = _SeriesTemplate(ds, values, len(pixels))
            yield SyntheticInstance(
                key=f"{hospital.code}/{day}/{study_uid}/{series_uid}/{sop_uid}.dcm",
                data=template.render(values, pixels),
                hospital=hospital,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=sop_uid,
                patient_id=patient_id,
                modality=modality,
                patient_name=patient_name,
                national_id=person.national_id,
                specific_character_set=charset,
                study_date=f"{study_date:%Y%m%d}",
            )


class _SeriesTemplate:
    """One series' Part 10 bytes as written by pydicom, with the per-instance elements cut out.

    Writing every instance with pydicom costs milliseconds; the instances of a series differ
    only in a few short ASCII elements (explicit VR little endian, 2-byte length) and the
    pixel data, so those are spliced into the series' bytes. The output is byte-for-byte
    what pydicom writes for the instance.
    """

    _MEDIA_SOP_INSTANCE = 0x00020003
    _SOP_INSTANCE = 0x00080018
    _VRS: ClassVar[dict[int, bytes]] = {
        0x00080018: b"UI",  # SOPInstanceUID
        0x00200013: b"IS",  # InstanceNumber
        0x00200032: b"DS",  # ImagePositionPatient
        0x00201041: b"DS",  # SliceLocation
    }

    def __init__(self, ds: Dataset, values: dict[int, str], pixel_length: int) -> None:
        ds.file_meta.MediaStorageSOPInstanceUID = UID(values[self._SOP_INSTANCE])
        ds.SOPInstanceUID = values[self._SOP_INSTANCE]
        if 0x00200013 in values:
            ds.InstanceNumber = values[0x00200013]
        if 0x00200032 in values:
            ds.ImagePositionPatient = values[0x00200032].split("\\")
            ds.SliceLocation = values[0x00201041]
        ds.PixelData = bytes(pixel_length)
        ds["PixelData"].VR = "OW"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        raw = buffer.getvalue()
        # The pixel data element is last; its header (tag, VR, reserved, length) stays.
        header_end = len(raw) - pixel_length
        if raw[header_end - 12 : header_end - 8] != b"\xe0\x7f\x10\x00":
            raise AssertionError("pixel data is not the last element")  # pragma: no cover
        self._segments: list[bytes] = []
        self._tags: list[int] = []
        tags = [self._MEDIA_SOP_INSTANCE, *sorted(values)]
        position = 0
        for tag in tags:
            vr = b"UI" if tag == self._MEDIA_SOP_INSTANCE else self._VRS[tag]
            start = raw.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr, position)
            if start < 0:
                raise AssertionError(f"element {tag:08X} not found")  # pragma: no cover
            length = struct.unpack_from("<H", raw, start + 6)[0]
            self._segments.append(raw[position:start])
            self._tags.append(tag)
            position = start + 8 + length
        self._segments.append(raw[position:header_end])
        # (0002,0000) File Meta Information Group Length: 12 bytes after the preamble.
        self._group_length = struct.unpack_from("<L", raw, 132 + 8)[0]
        self._media_uid_length = len(self._element(self._MEDIA_SOP_INSTANCE, values))

    def _element(self, tag: int, values: dict[int, str]) -> bytes:
        if tag == self._MEDIA_SOP_INSTANCE:
            vr, value = b"UI", values[self._SOP_INSTANCE].encode("ascii")
        else:
            vr, value = self._VRS[tag], values[tag].encode("ascii")
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    def render(self, values: dict[int, str], pixels: bytes) -> bytes:
        elements = [self._element(tag, values) for tag in self._tags]
        group_length = self._group_length - self._media_uid_length + len(elements[0])
        first = bytearray(self._segments[0])
        struct.pack_into("<L", first, 132 + 8, group_length)
        parts: list[bytes] = [bytes(first)]
        for element, segment in zip(elements, self._segments[1:], strict=True):
            parts.append(element)
            parts.append(segment)
        parts.append(pixels)
        return b"".join(parts)


def _modality_attributes(ds: Dataset, modality: str, rng: random.Random, field: str) -> None:
    if modality == "CT":
        ds.KVP = rng.choice((100, 120, 140))
        ds.DataCollectionDiameter = 500.0
        ds.ReconstructionDiameter = 500.0
        ds.XRayTubeCurrent = rng.randrange(150, 400)
        ds.ExposureTime = 1000
        ds.ConvolutionKernel = "STANDARD"
        ds.PixelSpacing = [0.976562, 0.976562]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = 5.0
        ds.RepetitionTime = rng.choice((500.0, 2500.0, 4000.0))
        ds.EchoTime = rng.choice((10.0, 90.0, 120.0))
        ds.MagneticFieldStrength = field
        ds.ImagingFrequency = 63.87 if field == "1.5" else 123.25
        ds.FlipAngle = 90
        ds.PixelSpacing = [0.9375, 0.9375]
    elif modality == "DX":
        ds.KVP = 125
        ds.ExposureTime = 8
        ds.XRayTubeCurrent = 320
        ds.DistanceSourceToDetector = 1800.0
        ds.ImagerPixelSpacing = [0.148, 0.148]
        ds.PixelSpacing = [0.148, 0.148]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"


def _pixels(
    modality: str,
    rows: int,
    columns: int,
    bits_stored: int,
    entropy: tuple[int, ...],
    *,
    realistic: bool,
) -> bytes:
    """A phantom plus seeded noise (realistic), or seeded noise only (small); little endian."""
    rng = np.random.default_rng(list(entropy))
    if not realistic:
        return rng.integers(0, 1 << bits_stored, size=(rows, columns), dtype="<u2").tobytes()
    noise = rng.integers(-16, 17, size=(rows, columns), dtype=np.int32)
    image: npt.NDArray[np.int32] = np.clip(
        _phantom(modality, rows, columns, bits_stored) + noise, 0, (1 << bits_stored) - 1
    )
    return image.astype("<u2").tobytes()


@functools.lru_cache(maxsize=8)
def _phantom(modality: str, rows: int, columns: int, bits_stored: int) -> npt.NDArray[np.int32]:
    """An ellipse of soft tissue in air (CT, MR) or a gradient (DX); cached, never modified."""
    y, x = np.ogrid[-1.0 : 1.0 : complex(0, rows), -1.0 : 1.0 : complex(0, columns)]
    if modality == "DX":
        base = (0.3 + 0.5 * (1.0 - np.abs(x)) * np.ones_like(y)) * ((1 << bits_stored) - 1)
        return base.astype(np.int32)
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1.0
    level, background = (1064, 24) if modality == "CT" else (900, 0)  # CT: 40 HU in -1000 HU
    return np.where(body, level, background).astype(np.int32)


def corrupt_samples() -> list[tuple[str, bytes, str]]:
    """Objects a sync job must quarantine: (key, bytes, expected reason prefix).

    Covers a zero-byte object, a PNG, a text file, a DICOM file cut inside its header,
    one without StudyInstanceUID and one with a malformed SOPInstanceUID. Reasons are the
    codes of :class:`imaging_gateway.dicom.headers.NotParseable` with ``complete=True``.
    """
    base = next(
        generate_instances(
            seed=20240229,
            patients=1,
            studies_per_patient=1,
            modalities=("CT",),
            pixel_mode="small",
            charsets=("ISO_IR 192",),
            instances_per_series=1,
            series_per_study=1,
        )
    )
    prefix = f"{base.hospital.code}/2025/01/02/quarantine"
    pixel_offset = base.data.rfind(b"\xe0\x7f\x10\x00")
    missing_study = _without(base.data, "StudyInstanceUID")
    # The dataset's SOPInstanceUID (the file meta's copy comes first) with letters in it.
    bad_uid = _with_value(base.data, base.sop_uid, base.sop_uid[:-3] + "abc")
    return [
        (f"{prefix}/empty.dcm", b"", "empty"),
        (f"{prefix}/scan.png", _tiny_png(), "not-dicom"),
        (f"{prefix}/readme.dcm", "这不是DICOM文件 / not a DICOM file\n".encode(), "not-dicom"),
        (f"{prefix}/truncated.dcm", base.data[: pixel_offset // 2 + 1], "truncated"),
        (f"{prefix}/no-study-uid.dcm", missing_study, "missing-uid"),
        (f"{prefix}/bad-sop-uid.dcm", bad_uid, "invalid-uid"),
    ]


def _rewrite(data: bytes, change: Any) -> bytes:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _without(data: bytes, keyword: str) -> bytes:
    return _rewrite(data, lambda ds: delattr(ds, keyword))


def _with_value(data: bytes, old: str, new: str) -> bytes:
    """Replace the last occurrence of a value by one of the same length, byte for byte."""
    if len(old) != len(new):  # pragma: no cover - programming error
        raise ValueError("replacement must keep the value length")
    at = data.rfind(old.encode("ascii"))
    return data[:at] + new.encode("ascii") + data[at + len(old) :]


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )
