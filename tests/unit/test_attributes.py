"""The attribute table: its entries agree with the data dictionary and every layer takes them."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag

from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.domain import records
from imaging_gateway.domain.attributes import (
    ATTRIBUTES,
    ITEM_ATTRIBUTES,
    TABLE,
    Attribute,
    header_attributes,
)
from imaging_gateway.domain.qido import DEFAULT_RETURN, REQUIRED_RETURN, parse_qido

_MATCHABLE = [a for a in ATTRIBUTES.values() if a.matching not in (None, "sequence")]
# A valid single value per VR, to match on.
_VALUES = {
    "UI": "1.2.3", "DA": "20250314", "TM": "0830", "IS": "7", "US": "512", "PN": "Wang^Wei",
}  # fmt: skip


@pytest.mark.parametrize("a", TABLE, ids=lambda a: a.keyword)
def test_entry_agrees_with_the_data_dictionary(a: Attribute) -> None:
    assert keyword_for_tag(a.tag) == a.keyword
    # The index holds the unsigned form of an ambiguous VR ("US or SS").
    assert a.vr == str(dictionary_VR(a.tag)).split(" or ")[0]


def test_keywords_are_unique_and_items_belong_to_their_sequence() -> None:
    assert len({a.keyword for a in TABLE}) == len(TABLE)
    for a in ITEM_ATTRIBUTES.values():
        assert a.sequence is not None and a.keyword in ATTRIBUTES[a.sequence].items


@pytest.mark.parametrize("a", _MATCHABLE, ids=lambda a: a.keyword)
def test_every_matchable_entry_is_a_matching_key_and_returned(a: Attribute) -> None:
    value = _VALUES.get(a.vr, "ABC")
    q = parse_qido(a.search_level, {a.keyword: value})
    assert [m.keyword for m in q.matches] == [a.keyword]
    assert q.warnings == ()
    assert a.keyword in q.return_keywords


@pytest.mark.parametrize("a", [a for a in ATTRIBUTES.values() if a.matching is None],
                         ids=lambda a: a.keyword)  # fmt: skip
def test_an_entry_without_matching_is_not_matched(a: Attribute) -> None:
    q = parse_qido(a.search_level, {a.keyword: "1"})
    assert q.matches == ()
    assert "not supported as matching keys" in q.warnings[-1]


def test_default_and_required_returns_are_the_tables() -> None:
    for level, keywords in DEFAULT_RETURN.items():
        assert set(keywords) == {k for k, a in ATTRIBUTES.items() if level in a.returned}
    # PS3.18 Table 10.6.3-3's study attributes, Table 10.6.3-4's series ones and 10.6.3-5's
    # instance ones, as the index holds them.
    assert DEFAULT_RETURN["study"][:3] == ("StudyDate", "StudyTime", "AccessionNumber")
    assert "RequestAttributesSequence" in DEFAULT_RETURN["series"]
    assert {"SOPClassUID", "SOPInstanceUID", "RetrieveURL"} <= set(DEFAULT_RETURN["instance"])
    assert REQUIRED_RETURN == {k for k, a in ATTRIBUTES.items() if a.required}


@pytest.mark.parametrize("a", [a for a in TABLE if a.vr != "SQ"], ids=lambda a: a.keyword)
def test_every_entry_is_emitted_with_its_tag_and_vr(a: Attribute) -> None:
    value = int(_VALUES["IS"]) if a.integer else _VALUES.get(a.vr, "ABC")
    row = {"StudyInstanceUID": "1.2.3", a.keyword: value}
    emitted = to_dicom_json("study", [row], includefield=(), retrieve_base="http://x")[0]
    element = emitted[f"{a.tag:08X}"]
    assert element["vr"] == a.vr
    if a.keyword not in ("SpecificCharacterSet", "RetrieveURL"):  # set per response
        assert element["Value"] == ([{"Alphabetic": value}] if a.vr == "PN" else [value])


def test_required_entries_are_present_empty() -> None:
    required = [a for a in TABLE if a.required and a.source != "computed"]
    row = {a.keyword: None for a in required if a.vr != "SQ"}
    emitted = to_dicom_json("study", [row], includefield=(), retrieve_base="http://x")[0]
    for a in required:
        if a.vr != "SQ":
            assert emitted[f"{a.tag:08X}"] == {"vr": a.vr}


def test_header_attributes_have_record_fields_or_go_to_extra() -> None:
    """The attributes held today are typed fields of their records (named as their
    columns); ParsedHeader.value reads either, so a table-only entry still works."""
    record_of = {
        "patient": records.PatientRecord,
        "study": records.StudyRecord,
        "series": records.SeriesRecord,
        "instance": records.InstanceRecord,
    }
    for level, record in record_of.items():
        fields = {f.name for f in dataclasses.fields(record)}
        assert {a.column for a in header_attributes(level)} <= fields  # type: ignore[arg-type]
