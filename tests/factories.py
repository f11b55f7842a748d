"""Test data builders: synthetic instances and small hand-made DICOM datasets."""

from __future__ import annotations

import io
import zlib
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


def deflated_bomb(
    data: bytes, *, inflated: int = 1 << 30, where: Literal["header", "trailer"]
) -> bytes:
    """The Part 10 object ``data`` re-written Deflated Explicit VR Little Endian (PS3.5 A.5)
    with ``inflated`` bytes of zeros added: a private OB element before the pixel data
    (``header``) or Data Set Trailing Padding (FFFC,FFFC) after it (``trailer``).

    About 1 MB per GiB of zeros. The zeros are never held: one MiB of them is deflated once
    and its block repeated (after a full flush a deflate block depends on nothing before it).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(data))

    def encode(part: Dataset) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, part)
        return buffer.getvalue()

    def element(group: int, number: int, vr: bytes, value: bytes, length: int) -> bytes:
        if vr in (b"OB", b"UN"):
            return (group.to_bytes(2, "little") + number.to_bytes(2, "little") + vr
                    + b"\x00\x00" + length.to_bytes(4, "little") + value)
        return (group.to_bytes(2, "little") + number.to_bytes(2, "little") + vr
                + length.to_bytes(2, "little") + value)

    if where == "header":
        before = Dataset()
        for elem in ds:
            if elem.tag.group < 0x0009:
                before.add(elem)
        whole, cut = encode(ds), len(encode(before))  # elements are written in tag order
        head = (whole[:cut] + element(0x0009, 0x0010, b"LO", b"IG BOMB ", 8)
                + element(0x0009, 0x1000, b"OB", b"", inflated))
        tail = whole[cut:]
    else:
        head = encode(ds) + element(0xFFFC, 0xFFFC, b"OB", b"", inflated)
        tail = b""
    assert inflated % (1 << 20) == 0
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)]
    block = deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)
    stream.append(block * (inflated >> 20))
    stream.append(deflater.compress(tail) + deflater.flush())
    meta = DicomBytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(stream)
