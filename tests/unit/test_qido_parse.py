"""QIDO-RS query parsing: matching kinds, levels, includefield, paging, errors, warnings."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from imaging_gateway.domain.qido import (
    DEFAULT_RETURN,
    AttributeMatch,
    QidoQuery,
    parse_qido,
)
from imaging_gateway.errors import InvalidQuery, QueryTooBroad

STUDY = "1.2.840.113619.2.55.3"
SERIES = "1.2.840.113619.2.55.3.1"


def one(q: QidoQuery) -> AttributeMatch:
    assert len(q.matches) == 1, q.matches
    return q.matches[0]


def test_keyword_and_tag_are_the_same_attribute() -> None:
    by_keyword = one(parse_qido("study", {"PatientID": "MRN1"}))
    by_tag = one(parse_qido("study", {"00100020": "MRN1"}))
    assert by_keyword == by_tag
    assert by_keyword.path == ("PatientID",) and by_keyword.kind == "single"
    assert by_keyword.vr == "LO" and by_keyword.value == "MRN1"


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"PatientID": ""}, "universal"),
        ({"PatientName": "*"}, "universal"),
        ({"PatientName": "Wang*"}, "wildcard"),
        ({"AccessionNumber": "A2025?01"}, "wildcard"),
        ({"StudyInstanceUID": STUDY}, "single"),
        ({"StudyInstanceUID": f"{STUDY},{SERIES}"}, "list"),
        ({"StudyInstanceUID": f"{STUDY}\\{SERIES}"}, "list"),
        ({"StudyDate": "20250101"}, "single"),
        ({"StudyDate": "20250101-20251231"}, "range"),
        ({"StudyDate": "20250101-"}, "range"),
        ({"StudyDate": "-20251231"}, "range"),
        ({"StudyTime": "0800-1000"}, "range"),
        ({"ModalitiesInStudy": "CT"}, "single"),
        ({"ModalitiesInStudy": "CT,MR"}, "list"),
        ({"ModalitiesInStudy": "CT\\MR"}, "list"),
    ],
)
def test_matching_kinds(params: dict[str, str], kind: str) -> None:
    assert one(parse_qido("study", params)).kind == kind


def test_range_bounds_and_open_ends() -> None:
    m = one(parse_qido("study", {"StudyDate": "20250101-"}))
    assert (m.low, m.high) == ("20250101", None)
    m = one(parse_qido("study", {"StudyTime": "-1000"}))
    assert (m.low, m.high) == (None, "1000")


def test_uid_list_keeps_order_and_drops_duplicates() -> None:
    m = one(parse_qido("study", {"StudyInstanceUID": f"{SERIES},{STUDY},{SERIES}"}))
    assert m.values == (SERIES, STUDY)


def test_sequence_matching_path() -> None:
    for name in (
        "RequestAttributeSequence.ScheduledProcedureStepID",
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "00400275.00400009",
    ):
        m = one(parse_qido("series", {name: "SPS1"}, study_uid=STUDY))
        assert m.path == ("RequestAttributesSequence", "ScheduledProcedureStepID")
        assert (m.keyword, m.leaf, m.vr, m.value) == (
            "RequestAttributesSequence", "ScheduledProcedureStepID", "SH", "SPS1")


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"PatientNam": "x"}, "PatientNam"),
        ({"00100011": "x"}, "00100011"),
        ({"0010001": "x"}, "0010001"),
        ({"Patient-ID": "x"}, "Patient-ID"),
        ({"StudyDate": "2025-01-01"}, "StudyDate"),
        ({"StudyDate": "20250230"}, "calendar"),
        ({"StudyDate": "2025*"}, "wildcards"),
        ({"StudyDate": "20251231-20250101"}, "after"),
        ({"StudyDate": "-"}, "range"),
        ({"StudyTime": "2500"}, "StudyTime"),
        ({"StudyInstanceUID": "1.2.abc"}, "not a valid UID"),
        ({"StudyInstanceUID": "1.2.*"}, "wildcards"),
        ({"StudyInstanceUID": "1." + "2" * 70}, "at most 64"),
        ({"StudyInstanceUID": "1.02.3"}, "not a valid UID"),
        ({"PatientID": "A\\B"}, "backslash"),
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"offset": "-5"}, "offset"),
        ({"fuzzymatching": "yes"}, "fuzzymatching"),
        ({"includefield": "NotAKeyword"}, "includefield"),
        ({"includefield": "PatientID,,StudyDate"}, "includefield"),
        ({"PatientID.StudyDate": "x"}, "not a sequence"),
        ({"RequestAttributesSequence": "x"}, "through its items"),
        ({"SeriesInstanceUID": SERIES}, "series-level"),
        ({"Modality": "CT"}, "series-level"),
        ({"PatientID": "A\x01"}, "control"),
    ],
)
def test_bad_parameters_name_the_parameter(params: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_qido("study", params)
    assert needle in info.value.message
    assert info.value.status == 400


def test_numeric_values_are_checked() -> None:
    with pytest.raises(InvalidQuery, match="SeriesNumber"):
        parse_qido("series", {"SeriesNumber": "1*"}, study_uid=STUDY)
    with pytest.raises(InvalidQuery, match="InstanceNumber"):
        parse_qido("instance", {"InstanceNumber": "one"})
    assert one(parse_qido("instance", {"InstanceNumber": "007"})).value == "7"


@pytest.mark.parametrize(
    ("level", "params", "needle"),
    [
        ("study", {"offset": "2147483648"}, "offset"),
        ("study", {"limit": "4294967296"}, "limit"),
        ("series", {"SeriesNumber": "4294967296"}, "SeriesNumber"),
        ("instance", {"InstanceNumber": "-2147483649"}, "InstanceNumber"),
        ("instance", {"Rows": "65536"}, "Rows"),
        ("instance", {"Columns": "-1"}, "Columns"),
    ],
)
def test_integers_beyond_their_range_are_refused(level: str, params: dict[str, str],
                                                 needle: str) -> None:
    """PostgreSQL binds them as 32-bit integers: beyond that is a 400, not a 500."""
    with pytest.raises(InvalidQuery) as info:
        parse_qido(level, params)  # type: ignore[arg-type]
    assert info.value.message.startswith(needle + ":")


def test_integers_at_their_range_ends_are_taken() -> None:
    assert parse_qido("study", {"offset": "2147483647"}).offset == 2**31 - 1
    assert one(parse_qido("series", {"SeriesNumber": "2147483647"})).value == "2147483647"
    assert one(parse_qido("instance", {"InstanceNumber": "-2147483648"})).value == "-2147483648"
    assert one(parse_qido("instance", {"Rows": "65535"})).value == "65535"


def test_repeated_attribute_or_paging_parameter_is_refused() -> None:
    with pytest.raises(InvalidQuery, match="only once"):
        parse_qido("study", MultiDict([("PatientID", "a"), ("00100020", "b")]))
    with pytest.raises(InvalidQuery, match="more than once"):
        parse_qido("study", MultiDict([("limit", "1"), ("limit", "2")]))


def test_levels_each_resource_may_match() -> None:
    # PS3.18 Table 10.6.1-4.
    assert parse_qido("series", {"PatientID": "x", "Modality": "CT"}).resource == "all-series"
    with pytest.raises(InvalidQuery, match=r"/studies/\{study\}/series"):
        parse_qido("series", {"PatientID": "x"}, study_uid=STUDY)
    q = parse_qido("instance", {"Modality": "CT", "SOPClassUID": "1.2.3"}, study_uid=STUDY)
    assert q.resource == "study-instances"
    with pytest.raises(InvalidQuery, match="series-level"):
        parse_qido("instance", {"Modality": "CT"}, study_uid=STUDY, series_uid=SERIES)
    q = parse_qido("instance", {"PatientName": "A*", "Modality": "CT", "InstanceNumber": "1"})
    assert q.resource == "all-instances" and len(q.matches) == 3
    with pytest.raises(InvalidQuery, match="instance-level"):
        parse_qido("series", {"SOPInstanceUID": "1.2"})
    # The unique keys of the levels above may always narrow a search.
    q = parse_qido("instance", {"StudyInstanceUID": STUDY}, study_uid=STUDY, series_uid=SERIES)
    assert one(q).keyword == "StudyInstanceUID"


def test_bad_paths() -> None:
    with pytest.raises(InvalidQuery, match="study"):
        parse_qido("series", {}, study_uid="not-a-uid")
    with pytest.raises(InvalidQuery, match="series"):
        parse_qido("series", {}, study_uid=STUDY, series_uid=SERIES)
    with pytest.raises(InvalidQuery):
        parse_qido("study", {}, study_uid=STUDY)
    with pytest.raises(InvalidQuery):
        parse_qido("patient", {})  # type: ignore[arg-type]


def test_unsupported_attributes_are_ignored_with_a_warning() -> None:
    q = parse_qido("study", {"PatientAge": "030Y", "00191010": "x", "PatientID": "1"})
    assert [m.keyword for m in q.matches] == ["PatientID"]
    assert len(q.warnings) == 1
    assert "PatientAge" in q.warnings[0] and "00191010" in q.warnings[0]
    assert "not supported" in q.warnings[0]


def test_includefield_not_returned_is_named_in_a_warning() -> None:
    q = parse_qido("study", MultiDict([
        ("includefield", "Manufacturer,00180050,StudyDescription,BodyPartExamined"),
        ("includefield", "RequestAttributesSequence.ScheduledProcedureStepDescription"),
        ("includefield", "RetrieveURL,SpecificCharacterSet,InstanceAvailability,00091010"),
    ]))
    assert q.include == ("StudyDescription",)
    assert q.warnings == (
        "includefield: not returned, this gateway's index does not hold them: Manufacturer, "
        "SliceThickness, RequestAttributesSequence.ScheduledProcedureStepDescription, 00091010",
        "includefield: not returned, not attributes of a study result: BodyPartExamined, "
        "RequestAttributesSequence",
    )
    # A sequence is returned with the item attributes the index holds; the others are named.
    q = parse_qido("series", {"includefield": "00400275.ScheduledProcedureStepDescription"})
    assert "RequestAttributesSequence" in q.include
    assert q.warnings == ("includefield: not returned, this gateway's index does not hold them: "
                          "RequestAttributesSequence.ScheduledProcedureStepDescription",)
    # Held at the level searched, or returned anyway: no warning.
    q = parse_qido("series", {"includefield": "BodyPartExamined,StudyDescription,RetrieveURL"})
    assert q.warnings == () and "BodyPartExamined" in q.include
    assert parse_qido("study", {"includefield": "all"}).warnings == ()
    # A long list is cut, not echoed whole.
    many = ",".join(f"{0x00091000 + n:08X}" for n in range(50))
    (text,) = parse_qido("study", {"includefield": many}).warnings
    assert text.endswith("00091013 and 30 more") and len(text) < 400


def test_unknown_lowercase_parameters_are_ignored_with_a_warning() -> None:
    q = parse_qido("study", {"federated": "true", "PatientID": "1"})
    assert len(q.matches) == 1
    assert q.warnings == ("The query parameter federated is not supported and was ignored.",)


def test_fuzzy_on_referring_physician_warns() -> None:
    q = parse_qido("study", {"fuzzymatching": "true", "ReferringPhysicianName": "li"})
    assert q.fuzzymatching
    assert any("ReferringPhysicianName" in w for w in q.warnings)
    assert not parse_qido("study", {"fuzzymatching": "false"}).fuzzymatching
    assert not parse_qido("study", {}).fuzzymatching


def test_limit_offset_defaults() -> None:
    q = parse_qido("study", {})
    assert (q.limit, q.offset) == (None, 0)
    q = parse_qido("study", {"limit": "25", "offset": "50"})
    assert (q.limit, q.offset) == (25, 50)


def test_default_return_attributes_per_resource() -> None:
    study = parse_qido("study", {}).return_keywords
    assert set(DEFAULT_RETURN["study"]) <= set(study)
    assert "SeriesInstanceUID" not in study
    series = parse_qido("series", {}, study_uid=STUDY).return_keywords
    assert set(DEFAULT_RETURN["series"]) <= set(series) and "PatientName" not in series
    # All Series also carries the study defaults (PS3.18 10.6.3.3.2).
    all_series = parse_qido("series", {}).return_keywords
    assert set(DEFAULT_RETURN["study"]) | set(DEFAULT_RETURN["series"]) <= set(all_series)
    # Study's Instances: series + instance; All Instances: study + series + instance.
    study_inst = parse_qido("instance", {}, study_uid=STUDY).return_keywords
    assert set(DEFAULT_RETURN["series"]) <= set(study_inst) and "PatientID" not in study_inst
    all_inst = parse_qido("instance", {}).return_keywords
    assert set(DEFAULT_RETURN["study"]) <= set(all_inst)
    one_series = parse_qido("instance", {}, study_uid=STUDY, series_uid=SERIES).return_keywords
    assert "Modality" not in one_series and {"SOPInstanceUID", "Rows"} <= set(one_series)


def test_includefield_lists_repeats_tags_and_levels() -> None:
    params = MultiDict(
        [("includefield", "StudyDescription,00100021"), ("includefield", "00081030"),
         ("includefield", "SeriesDescription"), ("includefield", "PatientAge")]
    )
    q = parse_qido("study", params)
    # Series-level and unheld attributes are not returned by a study search.
    assert q.include == ("StudyDescription", "IssuerOfPatientID")
    assert "StudyDescription" in q.return_keywords
    assert "SeriesDescription" not in q.return_keywords
    q = parse_qido("instance", {"includefield": "StudyDescription,BodyPartExamined"},
                   study_uid=STUDY, series_uid=SERIES)
    assert {"StudyDescription", "BodyPartExamined"} <= set(q.return_keywords)
    assert q.requested == {"StudyDescription", "BodyPartExamined"}


def test_includefield_all() -> None:
    q = parse_qido("study", {"includefield": "all"})
    assert q.include_all
    assert {"StudyDescription", "InstitutionName", "IssuerOfPatientID"} <= set(q.return_keywords)
    assert "Modality" not in q.return_keywords
    q = parse_qido("instance", {"includefield": "all"}, study_uid=STUDY, series_uid=SERIES)
    assert {"AvailableTransferSyntaxUID", "BodyPartExamined", "PatientSex"} <= set(
        q.return_keywords)


def test_matched_attributes_are_returned() -> None:
    q = parse_qido("study", {"StudyDescription": "*CT*"})
    assert "StudyDescription" in q.return_keywords
    assert q.requested == {"StudyDescription"}


def test_query_too_broad_is_413() -> None:
    assert QueryTooBroad("x").status == 413
