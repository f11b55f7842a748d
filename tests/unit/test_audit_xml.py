"""DICOM PS3.15 A.5 audit messages from access records: structure, codes, escaping."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from imaging_gateway.security.audit import AuditEvent, audit_message, record_hash

AT = datetime(2026, 3, 1, 8, 30, 15, 250000, tzinfo=UTC)
PATIENT = "3f1c9a0e" * 8
STUDY = "1.2.826.0.1.3680043.8.498.1"


def message(**kw: Any) -> ET.Element:
    values: dict[str, Any] = {
        "subject": "pacs-gz-1",
        "role": "hospital",
        "action": "retrieve",
        "outcome": "ok",
        "hospital": "H44010600001",
        "patient_token": PATIENT,
        "StudyInstanceUID": STUDY,
        "purpose": "treatment",
        "source": "10.1.2.3",
    }
    values.update(kw)
    element = audit_message(AuditEvent(**values), AT, source_id="imaging-gateway:440000", site="440000")
    # What export writes is what a consumer parses: go through the serialized form.
    text = ET.tostring(element, encoding="unicode")
    assert "\n" not in text
    return ET.fromstring(text)


def code(element: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    assert element is not None
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, (path, found)
    return found[0]


def objects(root: ET.Element) -> dict[str, ET.Element]:
    """Participant objects by their ID type code."""
    out = {}
    for o in root.findall("ParticipantObjectIdentification"):
        out[code(o.find("ParticipantObjectIDTypeCode"))[0] or ""] = o
    return out


def requestor(root: ET.Element) -> ET.Element:
    return one(root, "ActiveParticipant[@UserIsRequestor='true']")


def gateway(root: ET.Element) -> ET.Element:
    return one(root, "ActiveParticipant[@UserIsRequestor='false']")


def test_retrieve_is_dicom_instances_transferred_with_patient_and_study() -> None:
    root = message()
    assert root.tag == "AuditMessage"
    # A.5.1: the children come in this order.
    tags = [c.tag for c in root]
    assert tags == [
        "EventIdentification",
        "ActiveParticipant",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
        "ParticipantObjectIdentification",
    ]
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert ident.get("EventActionCode") == "R"
    assert ident.get("EventOutcomeIndicator") == "0"
    assert datetime.fromisoformat(ident.get("EventDateTime", "")) == AT
    assert [code(t) for t in ident.findall("EventTypeCode")] == [("retrieve", "99IMGGW", "retrieve")]

    user = requestor(root)
    assert user.get("UserID") == "pacs-gz-1" and user.get("AlternativeUserID") == "H44010600001"
    assert user.get("NetworkAccessPointID") == "10.1.2.3"
    assert user.get("NetworkAccessPointTypeCode") == "2"
    # The requestor receives the instances: Destination; its gateway role travels too.
    assert [code(r) for r in user.findall("RoleIDCode")] == [
        ("110152", "DCM", "Destination Role ID"),
        ("hospital", "99IMGGW", "hospital"),
    ]
    gw = gateway(root)
    assert gw.get("UserID") == "imaging-gateway:440000"
    assert [code(r) for r in gw.findall("RoleIDCode")] == [("110153", "DCM", "Source Role ID")]

    source = one(root, "AuditSourceIdentification")
    assert source.get("AuditSourceID") == "imaging-gateway:440000"
    assert source.get("AuditEnterpriseSiteID") == "440000"
    assert one(source, "AuditSourceTypeCode").get("csd-code") == "4"

    objs = objects(root)
    patient, study = objs["2"], objs["110180"]
    assert patient.get("ParticipantObjectID") == PATIENT
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert study.get("ParticipantObjectID") == STUDY
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert code(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    details = {d.get("type"): base64.b64decode(d.get("value", "")).decode() for d in patient.iter("ParticipantObjectDetail")}
    assert details == {"PurposeOfUse": "treatment"}
    # No names anywhere: the patient is the token.
    assert root.find(".//ParticipantObjectName") is None


def test_search_is_a_query_naming_the_study_root_find_model() -> None:
    root = message(action="search", StudyInstanceUID=None, purpose=None, detail="level=study results=3")
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID")) == ("110112", "DCM", "Query")
    assert ident.get("EventActionCode") == "E"
    assert one(ident, "EventOutcomeDescription").text == "level=study results=3"
    assert code(requestor(root).find("RoleIDCode")) == ("110153", "DCM", "Source Role ID")
    assert code(gateway(root).find("RoleIDCode")) == ("110152", "DCM", "Destination Role ID")
    objs = objects(root)
    assert set(objs) == {"2", "110181"}
    query = objs["110181"]
    assert query.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"
    assert (query.get("ParticipantObjectTypeCode"), query.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    # A search that returned nobody has no patient object.
    assert set(objects(message(action="search", patient_token=None, StudyInstanceUID=None))) == {"110181"}


def test_store_is_transferred_with_the_requestor_as_source() -> None:
    root = message(action="store")
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID"))[0] == "110104" and ident.get("EventActionCode") == "C"
    assert code(requestor(root).find("RoleIDCode"))[0] == "110153"
    assert code(gateway(root).find("RoleIDCode"))[0] == "110152"


def test_other_reads_are_instances_accessed() -> None:
    root = message(action="view")
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID")) == ("110103", "DCM", "DICOM Instances Accessed")
    assert ident.get("EventActionCode") == "R"


def test_break_glass_is_a_security_alert_carrying_the_reason() -> None:
    reason = "患者昏迷, 急诊\n需要既往 CT"
    root = message(break_glass_reason=reason)
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert ident.get("EventActionCode") == "E"
    assert [code(t) for t in ident.findall("EventTypeCode")] == [
        ("110127", "DCM", "Emergency Override Started"),
        ("retrieve", "99IMGGW", "retrieve"),
    ]
    patient = objects(root)["2"]
    details = {d.get("type"): base64.b64decode(d.get("value", "")).decode() for d in patient.iter("ParticipantObjectDetail")}
    assert details == {"PurposeOfUse": "treatment", "BreakGlassReason": reason}
    # Without a patient, the study carries the details.
    study = objects(message(break_glass_reason="x", patient_token=None))["110180"]
    assert {d.get("type") for d in study.iter("ParticipantObjectDetail")} == {"PurposeOfUse", "BreakGlassReason"}


@pytest.mark.parametrize(
    ("outcome", "indicator", "event_id"),
    [("ok", "0", "110104"), ("not-found", "4", "110104"), ("error", "8", "110104"), ("denied", "8", "110113")],
)
def test_outcomes(outcome: str, indicator: str, event_id: str) -> None:
    ident = one(message(outcome=outcome), "EventIdentification")
    assert ident.get("EventOutcomeIndicator") == indicator
    assert code(ident.find("EventID"))[0] == event_id
    if outcome == "denied":
        assert code(ident.find("EventTypeCode")) == ("110144", "DCM", "Authorization Decision")


def test_time_is_utc_whatever_the_zone_given() -> None:
    cst = timezone(timedelta(hours=8))
    element = audit_message(
        AuditEvent("s", "admin", "search", "ok"), AT.astimezone(cst), source_id="gw"
    )
    assert one(element, "EventIdentification").get("EventDateTime") == "2026-03-01T08:30:15.250000Z"
    assert one(element, "AuditSourceIdentification").get("AuditEnterpriseSiteID") is None


def test_host_names_and_hostile_text_stay_well_formed_on_one_line() -> None:
    root = message(
        source="pacs.example.cn",
        subject='a"<b>&c',
        detail="x\x01y\r\nz <!-- -->",  # a tampered row can hold anything
    )
    assert requestor(root).get("NetworkAccessPointTypeCode") == "1"
    assert requestor(root).get("UserID") == 'a"<b>&c'
    assert one(root, "EventIdentification/EventOutcomeDescription").text == "x y  z <!-- -->"


def test_every_coded_value_is_complete() -> None:
    """A.5.1 CodedValueType: csd-code, codeSystemName and originalText on every code."""
    for kw in ({}, {"action": "search"}, {"outcome": "denied"}, {"break_glass_reason": "r"}):
        root = message(**kw)
        for element in root.iter():
            if element.get("csd-code") is not None and element.tag != "AuditSourceTypeCode":
                assert all(code(element)), (kw, element.tag)


def test_export_lines_parse_back() -> None:
    buf = io.StringIO()
    for action in ("search", "retrieve", "store"):
        buf.write(ET.tostring(message(action=action), encoding="unicode") + "\n")
    lines = buf.getvalue().splitlines()
    assert [code(ET.fromstring(x).find("EventIdentification/EventID"))[0] for x in lines] == [
        "110112", "110104", "110104",
    ]


def test_record_hash_covers_every_field_and_tells_null_from_empty() -> None:
    key = b"k" * 32
    values: dict[str, Any] = {f: "v" for f in (
        "subject", "role", "hospital", "patient_token", "StudyInstanceUID", "action",
        "purpose", "break_glass_reason", "outcome", "source", "detail",
    )}
    base = record_hash(key, "0" * 64, 1, AT, values)
    assert base == record_hash(key, "0" * 64, 1, AT, dict(values))
    assert len(base) == 64 and int(base, 16) >= 0
    for f in values:
        assert record_hash(key, "0" * 64, 1, AT, values | {f: "w"}) != base, f
    assert record_hash(key, "0" * 64, 1, AT, values | {"purpose": None}) != record_hash(
        key, "0" * 64, 1, AT, values | {"purpose": ""}
    )
    assert record_hash(key, "0" * 64, 2, AT, values) != base
    assert record_hash(key, "1" * 64, 1, AT, values) != base
    assert record_hash(key, "0" * 64, 1, AT + timedelta(microseconds=1), values) != base
    assert record_hash(b"j" * 32, "0" * 64, 1, AT, values) != base
    # Same instant, another zone: same record.
    assert record_hash(key, "0" * 64, 1, AT.astimezone(timezone(timedelta(hours=8))), values) == base


def test_a_refused_token_is_a_failed_user_authentication() -> None:
    root = message(subject="unauthenticated", role="none", action="authenticate",
                   outcome="denied", hospital=None, patient_token=None, StudyInstanceUID=None,
                   purpose=None, detail="token expired")
    ident = one(root, "EventIdentification")
    assert code(ident.find("EventID")) == ("110114", "DCM", "User Authentication")
    assert code(ident.find("EventTypeCode")) == ("110122", "DCM", "Login")
    assert ident.get("EventOutcomeIndicator") == "8"
    assert requestor(root).get("NetworkAccessPointID") == "10.1.2.3"
