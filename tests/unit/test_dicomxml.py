"""DICOM JSON -> PS3.19 Native DICOM Model XML: every construct, escaping, and a lossless round trip."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from imaging_gateway.dicom.dicomxml import (
    NATIVE_DICOM_NS,
    dataset_to_xml,
    native_dicom_model,
    xml_text,
)
from tests.factories import pydicom_file
from tests.support.native_dicom import normalised, read_back

NS = {"n": NATIVE_DICOM_NS}
XML_NS = "{http://www.w3.org/XML/1998/namespace}"


def attrs_of(doc: bytes) -> dict[str, ET.Element]:
    return {a.get("tag", ""): a for a in ET.fromstring(doc).findall("n:DicomAttribute", NS)}


def test_chinese_person_name_with_ideographic_and_phonetic_groups() -> None:
    doc = dataset_to_xml({"00100010": {"vr": "PN", "Value": [
        {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东", "Phonetic": "wang^xiao dong"},
        {"Ideographic": "李^^^先生"},
    ]}})
    assert doc.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert "王".encode() in doc  # UTF-8 characters, not character references
    attr = attrs_of(doc)["00100010"]
    assert (attr.get("keyword"), attr.get("vr"), attr.get("privateCreator")) == (
        "PatientName", "PN", None)
    first, second = attr.findall("n:PersonName", NS)
    assert (first.get("number"), second.get("number")) == ("1", "2")
    assert first.findtext("n:Alphabetic/n:FamilyName", namespaces=NS) == "Wang"
    assert first.findtext("n:Ideographic/n:FamilyName", namespaces=NS) == "王"
    assert first.findtext("n:Ideographic/n:GivenName", namespaces=NS) == "小东"
    assert first.findtext("n:Phonetic/n:GivenName", namespaces=NS) == "xiao dong"
    assert [g.tag.split("}")[1] for g in second] == ["Ideographic"]
    # Empty components are left out; the prefix keeps its place by its element name.
    assert [c.tag.split("}")[1] for c in second[0]] == ["FamilyName", "NamePrefix"]
    assert second.findtext("n:Ideographic/n:NamePrefix", namespaces=NS) == "先生"


def test_multi_values_empty_values_and_numbers() -> None:
    doc = dataset_to_xml({
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
        "00200037": {"vr": "DS", "Value": [1, 0, 0.5, -1e-07]},
        "00280010": {"vr": "US", "Value": [512]},
        "00080030": {"vr": "TM"},
        "00100010": {"vr": "PN", "Value": [None]},
        "00181030": {"vr": "LO", "Value": []},
    })
    attrs = attrs_of(doc)
    image_type = [(v.get("number"), v.text) for v in attrs["00080008"]]
    assert image_type == [("1", "ORIGINAL"), ("2", None), ("3", "AXIAL")]  # PS3.19 "MPG\\XR3"
    assert [v.text for v in attrs["00200037"]] == ["1", "0", "0.5", "-1e-07"]
    assert float(attrs["00200037"][3].text or "") == -1e-07
    assert attrs["00280010"][0].text == "512"
    for empty in ("00080030", "00181030"):  # zero length: the attribute, no Value at all
        assert list(attrs[empty]) == [] and attrs[empty].get("vr") in ("TM", "LO")
    assert [(p.get("number"), list(p)) for p in attrs["00100010"]] == [("1", [])]


def test_sequences_nest_items_with_numbers() -> None:
    doc = dataset_to_xml({"00081115": {"vr": "SQ", "Value": [
        {"0020000E": {"vr": "UI", "Value": ["1.2.3"]},
         "00081140": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]}},
                                            {"00081155": {"vr": "UI", "Value": ["1.2.3.5"]}}]}},
        {},
    ]}})
    seq = attrs_of(doc)["00081115"]
    assert seq.get("keyword") == "ReferencedSeriesSequence"
    items = seq.findall("n:Item", NS)
    assert [i.get("number") for i in items] == ["1", "2"] and list(items[1]) == []
    assert seq.findall("n:Value", NS) == []  # Value is not used for SQ (A.1.5)
    inner = items[0].findall("n:DicomAttribute[@tag='00081140']/n:Item", NS)
    assert [i.get("number") for i in inner] == ["1", "2"]
    assert inner[1].findtext("n:DicomAttribute/n:Value", namespaces=NS) == "1.2.3.5"


def test_bulk_data_and_inline_binary() -> None:
    uri = "https://gw/dicomweb/studies/1/series/2/instances/3/bulkdata/7FE00010?a=1&b=2"
    raw = base64.b64encode(b"\x00\x01\xfe\xff").decode()
    doc = dataset_to_xml({"7FE00010": {"vr": "OW", "BulkDataURI": uri},
                          "00282000": {"vr": "OB", "InlineBinary": raw}})
    attrs = attrs_of(doc)
    bulk = attrs["7FE00010"].find("n:BulkData", NS)
    assert bulk is not None and bulk.get("uri") == uri and list(attrs["7FE00010"]) == [bulk]
    assert b"&amp;b=2" in doc
    inline = attrs["00282000"].find("n:InlineBinary", NS)
    assert inline is not None and base64.b64decode(inline.text or "") == b"\x00\x01\xfe\xff"


def test_private_elements_name_their_creator() -> None:
    doc = dataset_to_xml({
        "00090010": {"vr": "LO", "Value": ["GEMS_IDEN_01"]},
        "00090011": {"vr": "LO", "Value": ["ACME & <Co>"]},
        "00091001": {"vr": "LO", "Value": ["a"]},
        "00091101": {"vr": "LO", "Value": ["b"]},
        "00190010": {"vr": "LO", "Value": ["ORPHANED"]},
        "00211002": {"vr": "UN", "InlineBinary": "AAE="},  # no creator for this block
        "00100000": {"vr": "UL", "Value": [8]},  # group length: never sent
    })
    attrs = ET.fromstring(doc).findall("n:DicomAttribute", NS)
    got = [(a.get("tag"), a.get("privateCreator"), a.get("keyword")) for a in attrs]
    assert got == [("00090001", "GEMS_IDEN_01", None), ("00090001", "ACME & <Co>", None),
                   ("00211002", None, None)]


def test_every_text_is_escaped_and_illegal_characters_replaced() -> None:
    nasty = 'a<b>&c"d\'e]]>f'
    doc = dataset_to_xml({
        "00081030": {"vr": "LO", "Value": [nasty]},
        "00104000": {"vr": "LT", "Value": ["line1\nline2\tend\x00\x0c\x1b\ud800\ufffe!"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "O'Brien<x>^&Co\x07"}]},
        "00081190": {"vr": "UR", "Value": ['https://gw/x?a=1&b="2"']},
    })
    attrs = attrs_of(doc)  # parses: the document is well-formed
    assert attrs["00081030"][0].text == nasty
    assert attrs["00104000"][0].text == "line1\nline2\tend\ufffd\ufffd\ufffd\ufffd\ufffd!"
    pn = attrs["00100010"][0]
    assert pn.findtext("n:Alphabetic/n:FamilyName", namespaces=NS) == "O'Brien<x>"
    assert pn.findtext("n:Alphabetic/n:GivenName", namespaces=NS) == "&Co\ufffd"
    assert attrs["00081190"][0].text == 'https://gw/x?a=1&b="2"'
    assert xml_text("\U0001f600\ud7ff\ue000") == "\U0001f600\ud7ff\ue000"


@pytest.mark.parametrize("bad", [
    {"0010001": {"vr": "PN"}},
    {"0010001G": {"vr": "PN"}},
    {"00100010": {"Value": ["x"]}},
    {"00100010": {"vr": "pn"}},
    {"00100010": "x"},
    {"00080060": {"vr": "CS", "Value": "CT"}},
    {"00081115": {"vr": "SQ", "Value": ["not an item"]}},
    {"00100010": {"vr": "PN", "Value": [3]}},
])
def test_what_is_not_dicom_json_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="DICOM JSON"):
        dataset_to_xml(bad)


def test_round_trip_of_a_constructed_dataset() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Wang^XiaoDong=王^小东=wang^xiao dong"
    ds.PatientID = "P<1>&"
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.25]
    ds.Rows = 512
    ds.StudyTime = ""
    ds.RedPaletteColorLookupTableData = b"\x00\x01" * 4
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.PatientName = "李^四"
    ds.ReferencedImageSequence = [item, Dataset()]
    ds.add_new(0x00290010, "LO", "ACME 1")
    ds.add_new(0x00291001, "SH", "private value")
    js = ds.to_json_dict()
    assert read_back(dataset_to_xml(js)) == normalised(js)


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "JPEG2000.dcm"])
def test_round_trip_of_pydicom_test_files(name: str) -> None:
    ds = pydicom.dcmread(io.BytesIO(pydicom_file(name)), stop_before_pixels=True)
    js = json.loads(ds.to_json(bulk_data_threshold=64,
                               bulk_data_element_handler=lambda e: f"bulk/{e.tag:08X}"))
    doc = dataset_to_xml(js)
    assert read_back(doc) == normalised(js)
    assert attrs_of(doc)["00100010"].get("keyword") == "PatientName"


def test_root_is_the_native_dicom_model_with_space_preserved() -> None:
    root = native_dicom_model({})
    assert root.tag == "NativeDicomModel" and root.get("xmlns") == NATIVE_DICOM_NS
    assert root.get(f"{XML_NS}space") == "preserve"
    assert b'xml:space="preserve"' in dataset_to_xml({})
