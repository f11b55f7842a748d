"""DICOM JSON (PS3.18 F.2) and Native DICOM Model XML (PS3.19) of QIDO-RS results."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from pydicom.dataset import Dataset

from imaging_gateway.dicom.dicomjson import retrieve_url, to_dicom_json
from imaging_gateway.dicom.dicomxml import NATIVE_DICOM_NS, to_dicom_xml

STUDY_ROW = {
    "StudyInstanceUID": "1.2.3",
    "StudyDate": "20250314",
    "StudyTime": None,
    "AccessionNumber": None,
    "InstanceAvailability": "ONLINE",
    "ModalitiesInStudy": ["CT", "MR"],
    "ReferringPhysicianName": None,
    "PatientName": "Wang^XiaoDong=王^小东",
    "PatientID": "0119031140",
    "PatientBirthDate": "19491231",
    "PatientSex": None,
    "StudyID": "1001",
    "NumberOfStudyRelatedSeries": 2,
    "NumberOfStudyRelatedInstances": 16,
    "StudyDescription": None,
}
NS = {"n": NATIVE_DICOM_NS}


def test_study_result_tags_vrs_values() -> None:
    (ds,) = to_dicom_json("study", [STUDY_ROW], includefield=[], retrieve_base="https://gw/dicomweb/")
    assert list(ds) == sorted(ds)  # ordered by tag
    assert ds["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert ds["0020000D"] == {"vr": "UI", "Value": ["1.2.3"]}
    assert ds["00080020"] == {"vr": "DA", "Value": ["20250314"]}
    assert ds["00080061"] == {"vr": "CS", "Value": ["CT", "MR"]}
    assert ds["00201206"] == {"vr": "IS", "Value": [2]}  # IS is a JSON number (F.2.3)
    assert ds["00201208"] == {"vr": "IS", "Value": [16]}
    assert ds["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    assert ds["00081190"] == {"vr": "UR", "Value": ["https://gw/dicomweb/studies/1.2.3"]}
    assert ds["00100010"] == {
        "vr": "PN", "Value": [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东"}]}


def test_empty_required_attributes_have_only_vr_optional_ones_are_left_out() -> None:
    (ds,) = to_dicom_json("study", [STUDY_ROW], includefield=[], retrieve_base="b")
    # Type R: present with just the VR.
    for tag, vr in (("00080030", "TM"), ("00080050", "SH"), ("00080090", "PN"),
                    ("00100040", "CS")):
        assert ds[tag] == {"vr": vr}
    # Not required and not asked for: left out.
    assert "00081030" not in ds
    (ds,) = to_dicom_json("study", [STUDY_ROW], includefield=["StudyDescription"],
                          retrieve_base="b")
    assert ds["00081030"] == {"vr": "LO"}


def test_pn_groups() -> None:
    rows = [{"StudyInstanceUID": "1", "PatientName": "=王^小东"},
            {"StudyInstanceUID": "2", "PatientName": "Smith^John"},
            {"StudyInstanceUID": "3", "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"}]
    out = to_dicom_json("study", rows, includefield=[], retrieve_base="b")
    assert out[0]["00100010"]["Value"] == [{"Ideographic": "王^小东"}]
    assert out[1]["00100010"]["Value"] == [{"Alphabetic": "Smith^John"}]
    assert out[2]["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]


def test_retrieve_urls_per_level() -> None:
    row = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4"}
    assert retrieve_url("study", row, "https://h/p") == "https://h/p/studies/1.2"
    assert retrieve_url("series", row, "https://h/p/") == "https://h/p/studies/1.2/series/1.2.3"
    assert retrieve_url("instance", row, "x") == "x/studies/1.2/series/1.2.3/instances/1.2.3.4"
    assert retrieve_url("instance", {"StudyInstanceUID": "1"}, "x") is None
    (ds,) = to_dicom_json("instance", [row], includefield=[], retrieve_base="x")
    assert ds["00081190"]["Value"] == ["x/studies/1.2/series/1.2.3/instances/1.2.3.4"]


def test_sequences_and_instance_numbers() -> None:
    row = {
        "StudyInstanceUID": "1", "SeriesInstanceUID": "2",
        "RequestAttributesSequence": [
            {"ScheduledProcedureStepID": "SPS1", "RequestedProcedureID": None}],
        "Rows": 512, "Columns": 512, "NumberOfFrames": None, "InstanceNumber": 7,
        "SOPInstanceUID": "3", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    }
    (ds,) = to_dicom_json("instance", [row], includefield=[], retrieve_base="x")
    assert ds["00400275"] == {"vr": "SQ", "Value": [
        {"00400009": {"vr": "SH", "Value": ["SPS1"]}, "00401001": {"vr": "SH"}}]}
    assert ds["00280010"] == {"vr": "US", "Value": [512]}
    assert ds["00200013"] == {"vr": "IS", "Value": [7]}
    assert "00280008" not in ds  # NumberOfFrames: "if known"


def test_json_is_read_back_by_pydicom() -> None:
    (ds,) = to_dicom_json("study", [STUDY_ROW], includefield=[], retrieve_base="https://gw")
    parsed = Dataset.from_json(json.dumps(ds, ensure_ascii=False))
    assert parsed.PatientName.ideographic == "王^小东"
    assert list(parsed.ModalitiesInStudy) == ["CT", "MR"]
    assert parsed.NumberOfStudyRelatedInstances == 16
    assert parsed.StudyTime == ""


def test_unknown_keyword_raises() -> None:
    with pytest.raises(KeyError):
        to_dicom_json("study", [{"NoSuchKeyword": "x"}], includefield=[], retrieve_base="b")


def test_native_dicom_model_xml() -> None:
    (doc,) = to_dicom_xml("study", [STUDY_ROW], includefield=[], retrieve_base="https://gw")
    assert doc.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(doc)
    assert root.tag == f"{{{NATIVE_DICOM_NS}}}NativeDicomModel"
    attrs = {a.get("tag"): a for a in root.findall("n:DicomAttribute", NS)}
    name = attrs["00100010"]
    assert name.get("vr") == "PN" and name.get("keyword") == "PatientName"
    pn = name.find("n:PersonName", NS)
    assert pn is not None and pn.get("number") == "1"
    assert pn.findtext("n:Alphabetic/n:FamilyName", namespaces=NS) == "Wang"
    assert pn.findtext("n:Ideographic/n:GivenName", namespaces=NS) == "小东"
    mods = [(v.get("number"), v.text) for v in attrs["00080061"].findall("n:Value", NS)]
    assert mods == [("1", "CT"), ("2", "MR")]
    assert attrs["00080030"].findall("*") == []  # empty, required: present without a value
    assert attrs["00081190"].findtext("n:Value", namespaces=NS) == "https://gw/studies/1.2.3"


def test_xml_sequence_items() -> None:
    row = {"StudyInstanceUID": "1", "SeriesInstanceUID": "2",
           "RequestAttributesSequence": [{"ScheduledProcedureStepID": "S1",
                                          "RequestedProcedureID": "R1"}]}
    (doc,) = to_dicom_xml("series", [row], includefield=[], retrieve_base="x")
    root = ET.fromstring(doc)
    item = root.find("n:DicomAttribute[@tag='00400275']/n:Item", NS)
    assert item is not None and item.get("number") == "1"
    assert item.findtext("n:DicomAttribute[@tag='00401001']/n:Value", namespaces=NS) == "R1"
