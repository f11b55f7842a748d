"""Test data builders: synthetic instances and small hand-made DICOM datasets."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imaging_gateway.dicom.national_id import resident_id_check_char
from imaging_gateway.dicom.synthetic import SyntheticInstance, generate_instances

PYDICOM_DATA = Path(pydicom.data.__file__).parent
"""pydicom's bundled files (test_files/, charset_files/); never fetched over the network."""

NATIONAL_ID = "11010519491231002X"
"""A GB 11643 number with a valid check character (the standard's worked example)."""

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
SOP_UID = "1.2.826.0.1.3680043.8.498.1003"


def pydicom_file(name: str, folder: Literal["test_files", "charset_files"] = "test_files") -> bytes:
    """The bytes of one file bundled with pydicom."""
    return (PYDICOM_DATA / folder / name).read_bytes()


def make_corpus(
    *,
    seed: int = 1,
    patients: int = 2,
    studies_per_patient: int = 1,
    modalities: Sequence[str] = ("CT", "MR", "DX"),
    charsets: Sequence[str] = ("ISO_IR 192", "GB18030", "ISO 2022 IR 58", "ISO_IR 100"),
    pixel_mode: Literal["realistic", "small"] = "small",
    instances_per_series: int | None = 1,
    series_per_study: int | None = 1,
) -> list[SyntheticInstance]:
    """A small synthetic corpus (defaults: tiny pixels, one series of one instance a study)."""
    return list(
        generate_instances(
            seed=seed,
            patients=patients,
            studies_per_patient=studies_per_patient,
            modalities=modalities,
            charsets=charsets,
            pixel_mode=pixel_mode,
            instances_per_series=instances_per_series,
            series_per_study=series_per_study,
        )
    )


def make_instance(
    *,
    seed: int = 1,
    modality: str = "CT",
    charset: str = "ISO_IR 192",
    pixel_mode: Literal["realistic", "small"] = "small",
) -> SyntheticInstance:
    """The first instance of a one-patient corpus of one modality and character set."""
    return make_corpus(
        seed=seed,
        patients=1,
        modalities=(modality,),
        charsets=(charset,),
        pixel_mode=pixel_mode,
    )[0]


def make_instance_bytes(**kwargs: Any) -> bytes:
    """Part 10 bytes of :func:`make_instance`."""
    return make_instance(**kwargs).data


def valid_resident_id(
    region: str = "440106", birth: str = "19800229", sequence: str = "123"
) -> str:
    """A GB 11643 number with the right check character."""
    first17 = f"{region}{birth}{sequence}"
    return first17 + resident_id_check_char(first17)


def minimal_dataset(**overrides: Any) -> Dataset:
    """A small dataset with everything the index reads: GB18030 text, both sequences.

    ``overrides`` set (or, with value ``None``, delete) top-level keywords.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "GB18030"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyDate = "20250314"
    ds.SeriesDate = "20250314"
    ds.StudyTime = "083015.123"
    ds.AccessionNumber = "A250314001"
    ds.Modality = "CT"
    ds.InstitutionName = "北京协和医院"
    code = Dataset()
    code.CodeValue = "H11010100013"
    code.CodingSchemeDesignator = "99CN-NHSA"
    ds.InstitutionCodeSequence = DicomSequence([code])
    ds.ReferringPhysicianName = "Li^JianHua=李^建华"
    ds.StudyDescription = "胸部CT平扫"
    ds.SeriesDescription = "胸部平扫 5mm"
    ds.PatientName = "Wang^XiaoDong=王^小东"
    ds.PatientID = "0119031140"
    ds.IssuerOfPatientID = "H11010100013"
    ds.PatientBirthDate = "19491231"
    ds.PatientSex = "M"
    other = Dataset()
    other.PatientID = NATIONAL_ID
    other.IssuerOfPatientID = "CN-RESIDENT-ID"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "1001"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 7
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(32))
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def undefined_lengths(ds: Dataset) -> Dataset:
    """Mark every sequence and item of ``ds`` as undefined length (delimiter-terminated)."""
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
                undefined_lengths(item)
    return ds


def dataset_bytes(
    ds: Dataset,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_meta: bool = True,
) -> bytes:
    """``ds`` as bytes: a Part 10 file in ``transfer_syntax``, or a bare dataset without meta."""
    buffer = io.BytesIO()
    if not file_meta:
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        ds.save_as(buffer, implicit_vr=implicit, little_endian=little)
        return buffer.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", SOP_UID)
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
