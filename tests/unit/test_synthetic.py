"""The synthetic study generator: deterministic, realistic, readable by parse_header."""

from __future__ import annotations

import collections
import datetime
import io
import re

import numpy as np
import pydicom
import pytest

from imaging_gateway.dicom.headers import NotParseable, parse_header
from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.dicom.synthetic import (
    DEFAULT_END_DATE,
    HOSPITALS,
    SUPPORTED_CHARSETS,
    corrupt_samples,
    generate_instances,
)
from tests.factories import make_corpus

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
KEY_RE = re.compile(
    r"(?P<hospital>H[0-9]{11})/(?P<y>[0-9]{4})/(?P<m>[0-9]{2})/(?P<d>[0-9]{2})/"
    r"(?P<study>[0-9.]+)/(?P<series>[0-9.]+)/(?P<sop>[0-9.]+)\.dcm"
)


def test_same_seed_same_bytes() -> None:
    first = make_corpus(seed=42, patients=3, studies_per_patient=2)
    second = make_corpus(seed=42, patients=3, studies_per_patient=2)
    assert [(i.key, i.data) for i in first] == [(i.key, i.data) for i in second]
    other = make_corpus(seed=43, patients=3, studies_per_patient=2)
    assert {i.sop_uid for i in first}.isdisjoint(i.sop_uid for i in other)


def test_bytes_are_what_pydicom_writes() -> None:
    # Instances are spliced from a per-series template; pydicom must write the same bytes.
    corpus = make_corpus(seed=12, patients=3, instances_per_series=3, series_per_study=2)
    for instance in corpus:
        ds = pydicom.dcmread(io.BytesIO(instance.data))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert buffer.getvalue() == instance.data


def test_realistic_pixels_are_deterministic_too() -> None:
    def one() -> bytes:
        return make_corpus(seed=9, patients=1, modalities=("MR",), pixel_mode="realistic")[0].data

    assert one() == one()


def test_every_instance_parses_to_what_was_generated() -> None:
    corpus = make_corpus(seed=3, patients=6, studies_per_patient=2, instances_per_series=2)
    for instance in corpus:
        header = parse_header(instance.data, complete=True)
        assert parse_header(instance.data[:65536], complete=False) == header
        assert header.study.StudyInstanceUID == instance.study_uid
        assert header.series.SeriesInstanceUID == instance.series_uid
        assert header.instance.SOPInstanceUID == instance.sop_uid
        assert header.patient.PatientID == instance.patient_id
        assert header.patient.IssuerOfPatientID == instance.hospital.code
        assert header.patient.PatientName == instance.patient_name
        assert header.patient.national_id == instance.national_id
        assert header.series.Modality == instance.modality
        assert header.study.institution_code == instance.hospital.code
        assert header.study.StudyDate == instance.study_date
        assert header.instance.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert header.warnings == ()


@pytest.mark.parametrize("charset", sorted(SUPPORTED_CHARSETS))
def test_names_round_trip_in_every_character_set(charset: str) -> None:
    corpus = make_corpus(seed=11, patients=12, charsets=(charset,))
    chinese = [i for i in corpus if "=" in i.patient_name]
    for instance in corpus:
        header = parse_header(instance.data, complete=True)
        assert header.patient.PatientName == instance.patient_name
        assert header.SpecificCharacterSet == "\\".join(
            [SUPPORTED_CHARSETS[charset][0]]
            if isinstance(SUPPORTED_CHARSETS[charset][0], str)
            else SUPPORTED_CHARSETS[charset][0]
        )
        if charset == "ISO_IR 100":
            assert header.study.InstitutionName == instance.hospital.name_en
        else:
            assert header.study.InstitutionName == instance.hospital.name
            assert header.study.StudyDescription and not header.study.StudyDescription.isascii()
    if charset == "ISO_IR 100":
        assert not chinese  # Latin-1 has no ideographic group: pinyin only
    else:
        assert chinese, "expected some Chinese names"
        for instance in chinese:
            alphabetic, ideographic = instance.patient_name.split("=")
            assert alphabetic.isascii() and not ideographic.isascii()


def test_iso_2022_ir_58_is_written_with_escape_sequences() -> None:
    corpus = make_corpus(seed=11, patients=12, charsets=("ISO 2022 IR 58",))
    instance = next(i for i in corpus if "=" in i.patient_name)
    alphabetic, ideographic = instance.patient_name.split("=")
    family, given = ideographic.split("^")
    escape = b"\x1b$)A"
    expected = (
        alphabetic.encode()
        + b"="
        + escape
        + family.encode("gb2312")
        + b"^"
        + escape
        + given.encode("gb2312")
    )
    assert expected in instance.data  # PS3.5 Annex K.2 form
    ds = pydicom.dcmread(io.BytesIO(instance.data))
    assert ds.SpecificCharacterSet == ["", "ISO 2022 IR 58"]


def test_national_ids_are_valid_and_follow_the_patient_across_hospitals() -> None:
    corpus = make_corpus(seed=5, patients=10, studies_per_patient=3)
    by_person: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    for instance in corpus:
        assert is_valid_resident_id(instance.national_id)
        by_person[instance.national_id].add((instance.hospital.code, instance.patient_id))
    assert len(by_person) == 10
    travelled = [ids for ids in by_person.values() if len({h for h, _ in ids}) > 1]
    assert travelled, "some patient should have studies at two hospitals"
    for ids in by_person.values():
        hospitals = [hospital for hospital, _ in ids]
        assert len(hospitals) == len(set(hospitals)), "one PatientID per patient per hospital"
        assert len({pid for _, pid in ids}) == len(ids), "local IDs differ between hospitals"
    all_ids = [pair for ids in by_person.values() for pair in ids]
    assert len(set(all_ids)) == len(all_ids)


def test_national_id_matches_birth_date_and_sex() -> None:
    for instance in make_corpus(seed=8, patients=15):
        ds = pydicom.dcmread(io.BytesIO(instance.data))
        assert instance.national_id[6:14] == ds.PatientBirthDate
        assert int(instance.national_id[16]) % 2 == (1 if ds.PatientSex == "M" else 0)
        assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "CN-RESIDENT-ID"


def test_keys_uids_and_dates() -> None:
    corpus = make_corpus(seed=21, patients=8, studies_per_patient=2, instances_per_series=2)
    sop_uids = [i.sop_uid for i in corpus]
    assert len(set(sop_uids)) == len(sop_uids)
    earliest = DEFAULT_END_DATE - datetime.timedelta(days=3 * 366)
    for instance in corpus:
        match = KEY_RE.fullmatch(instance.key)
        assert match, instance.key
        assert match["hospital"] == instance.hospital.code
        assert match["y"] + match["m"] + match["d"] == instance.study_date
        assert (match["study"], match["series"], match["sop"]) == (
            instance.study_uid,
            instance.series_uid,
            instance.sop_uid,
        )
        for uid in (instance.study_uid, instance.series_uid, instance.sop_uid):
            assert UID_RE.fullmatch(uid) and len(uid) <= 64
        study_date = datetime.datetime.strptime(instance.study_date, "%Y%m%d").date()
        assert earliest <= study_date <= DEFAULT_END_DATE


def test_end_date_moves_the_studies() -> None:
    end = datetime.date(2030, 1, 31)
    corpus = list(
        generate_instances(
            seed=1, patients=3, pixel_mode="small", instances_per_series=1, end_date=end
        )
    )
    assert all(i.study_date <= "20300131" and i.study_date >= "2027" for i in corpus)


def test_default_series_and_instance_counts() -> None:
    corpus = list(generate_instances(seed=2, patients=1, studies_per_patient=3, pixel_mode="small"))
    counts = collections.Counter(i.modality for i in corpus)
    series = collections.defaultdict(set)
    for instance in corpus:
        series[instance.modality].add(instance.series_uid)
    assert counts == {"CT": 16, "MR": 18, "DX": 2}
    assert {m: len(s) for m, s in series.items()} == {"CT": 2, "MR": 3, "DX": 2}


@pytest.mark.parametrize(
    ("modality", "shape", "sop_class"),
    [
        ("CT", (512, 512), pydicom.uid.CTImageStorage),
        ("MR", (256, 256), pydicom.uid.MRImageStorage),
        ("DX", (1024, 1024), pydicom.uid.DigitalXRayImageStorageForPresentation),
    ],
)
def test_realistic_modalities(modality: str, shape: tuple[int, int], sop_class: str) -> None:
    instance = make_corpus(seed=4, patients=1, modalities=(modality,), pixel_mode="realistic")[0]
    pixel_bytes = shape[0] * shape[1] * 2
    assert pixel_bytes < len(instance.data) < pixel_bytes + 8192
    ds = pydicom.dcmread(io.BytesIO(instance.data))
    assert ds.SOPClassUID == sop_class
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (*shape, 16)
    pixels = ds.pixel_array
    assert pixels.shape == shape and pixels.dtype == np.uint16
    assert pixels.max() < 1 << ds.BitsStored and pixels.std() > 0
    assert ds.BodyPartExamined
    if modality == "CT":
        assert ds.KVP and ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
        assert ds.SliceThickness and len(ds.ImagePositionPatient) == 3
        assert ds.BodyPartExamined in {"CHEST", "HEAD", "ABDOMEN"}
    if modality == "MR":
        assert ds.MagneticFieldStrength in (1.5, 3.0)
        assert ds.EchoTime and ds.RepetitionTime
    if modality == "DX":
        assert ds.ViewPosition in {"PA", "LL"}
    assert ds.WindowCenter and ds.WindowWidth


def test_small_pixels() -> None:
    instance = make_corpus(seed=4, patients=1, modalities=("CT",))[0]
    assert len(instance.data) < 4096
    ds = pydicom.dcmread(io.BytesIO(instance.data))
    assert ds.pixel_array.shape == (16, 16)


def test_slices_move_along_the_series() -> None:
    corpus = list(
        generate_instances(
            seed=6, patients=1, studies_per_patient=1, modalities=("CT",), pixel_mode="small"
        )
    )
    first_series = [i for i in corpus if i.series_uid == corpus[0].series_uid]
    positions = [pydicom.dcmread(io.BytesIO(i.data)).ImagePositionPatient[2] for i in first_series]
    assert len(set(positions)) == len(positions) == 8


def test_hospitals() -> None:
    assert len(HOSPITALS) == 6
    assert {h.province for h in HOSPITALS} == {"110000", "440000", "310000"}
    assert len({h.code for h in HOSPITALS}) == len(HOSPITALS)
    for hospital in HOSPITALS:
        assert re.fullmatch(r"H[0-9]{11}", hospital.code)
        assert hospital.code[1:3] == hospital.province[:2]
        assert not hospital.name.isascii() and hospital.name_en.isascii()


def test_corrupt_samples_are_refused_with_the_expected_reason() -> None:
    samples = corrupt_samples()
    assert {prefix for _, _, prefix in samples} >= {
        "empty",
        "not-dicom",
        "truncated",
        "missing-uid",
    }
    assert len({key for key, _, _ in samples}) == len(samples)
    for key, data, prefix in samples:
        with pytest.raises(NotParseable) as info:
            parse_header(data, complete=True)
        assert info.value.reason.startswith(prefix), (key, info.value.reason)


def test_unknown_choices_are_refused() -> None:
    with pytest.raises(ValueError):
        next(generate_instances(seed=1, patients=1, modalities=("PET",)))
    with pytest.raises(ValueError):
        next(generate_instances(seed=1, patients=1, charsets=("EBCDIC",)))
