"""decode_text_values: a stored header's text as the UTF-8 that DICOM JSON and XML carry."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from imaging_gateway.dicom.headers import decode_text_values
from tests.factories import dataset_bytes, minimal_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# PS3.5 Annex K.2, example 2: "Zhang^XiaoDong=张^小东=" in \ISO 2022 IR 58.
ANNEX_K_IR58 = bytes.fromhex("5A68616E675E5869616F446F6E673D1B242941D5C55E1B242941D0A1B6AB3D20")


def read(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(dataset_bytes(ds)), stop_before_pixels=True, force=True)


def test_iso_2022_ir_58_top_level_and_in_items() -> None:
    ds = minimal_dataset(SpecificCharacterSet=["", "ISO 2022 IR 58"])
    ds.add(DataElement(0x00100010, "PN", ANNEX_K_IR58))
    ds.add(DataElement(0x00081030, "LO", b"\x1b$)A" + "胸部CT平扫".encode("gb2312")))
    ds.add(DataElement(0x0008103E, "LO", "平扫".encode("gb2312")))  # vendor form: no ESC
    item = Dataset()
    item.add(DataElement(0x00080104, "LO", b"\x1b$)A" + "胸部".encode("gb2312")))
    ds.ProcedureCodeSequence = DicomSequence([item])
    read_back = read(ds)
    assert "\x1b" in str(read_back.StudyDescription)  # what pydicom 3.0 leaves
    decode_text_values(read_back)
    assert read_back.PatientName.components == ("Zhang^XiaoDong", "张^小东")
    assert read_back.StudyDescription == "胸部CT平扫"
    assert read_back.SeriesDescription == "平扫"
    assert read_back.ProcedureCodeSequence[0].CodeMeaning == "胸部"
    assert read_back.SpecificCharacterSet == "ISO_IR 192"
    json = read_back.to_json_dict()
    assert json["00100010"]["Value"] == [{"Alphabetic": "Zhang^XiaoDong", "Ideographic": "张^小东"}]


def test_items_with_their_own_character_set_and_unknown_escapes() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.add(DataElement(0x00081030, "LO", b"ABC\x1b$)Zxyz"))  # a designation nobody knows
    item = Dataset()
    item.SpecificCharacterSet = "GB18030"
    item.CodeMeaning = "胸部"
    ds.ProcedureCodeSequence = DicomSequence([item])
    ds.add(DataElement(0x00100010, "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"))
    read_back = pydicom.dcmread(io.BytesIO(dataset_bytes(ds, file_meta=False)), force=True)
    decode_text_values(read_back)
    assert read_back.StudyDescription == "ABCxyz"
    assert str(read_back.PatientName) == "Yamada^Tarou=山田^太郎"
    assert read_back.ProcedureCodeSequence[0].CodeMeaning == "胸部"
    assert read_back.SpecificCharacterSet == "ISO_IR 192"
    assert read_back.ProcedureCodeSequence[0].SpecificCharacterSet == "ISO_IR 192"


def test_a_dataset_without_character_set_is_marked_utf8() -> None:
    ds = Dataset()
    ds.StudyDescription = "CHEST"
    read_back = pydicom.dcmread(io.BytesIO(dataset_bytes(ds, file_meta=False)), force=True)
    decode_text_values(read_back)
    assert read_back.StudyDescription == "CHEST"
    assert read_back.SpecificCharacterSet == "ISO_IR 192"
