"""QIDO-RS results rendered as DICOM JSON (PS3.18 F.2); ``dicomxml`` turns them into XML.

Results come as dicts of keyword -> Python value (see ``imaging_gateway.domain.qido``):
str, int, a list for multi-valued attributes, a list of such dicts for sequences, None
where the index holds no value. VRs come from pydicom's data dictionary. Each result
also gets SpecificCharacterSet ``ISO_IR 192`` (the payload is UTF-8, PS3.18 F.2) and its
RetrieveURL (PS3.18 Tables 10.6.3-3..5).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword

__all__ = ["PN_GROUPS", "Level", "retrieve_url", "to_dicom_json"]

PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# PS3.18 F.2.3: these VRs are JSON numbers.
_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
# Type R and U attributes of PS3.18 Tables 10.6.3-3..5 (and sequence items' R keys):
# present, empty if need be, whenever a result carries them.
_REQUIRED = frozenset(
    (
        "StudyDate StudyTime AccessionNumber ModalitiesInStudy ReferringPhysicianName "
        "PatientName PatientID PatientBirthDate PatientSex StudyInstanceUID StudyID "
        "NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances Modality "
        "SeriesInstanceUID SeriesNumber NumberOfSeriesRelatedInstances SOPClassUID "
        "SOPInstanceUID InstanceNumber ScheduledProcedureStepID RequestedProcedureID"
    ).split()
)

Level = Literal["study", "series", "instance"]


@functools.cache
def _tag(keyword: str) -> int:
    # Cached: every element of every result looks its keyword up (the keywords are the
    # few the index returns; an unknown one raises and is not cached).
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return int(tag)


@functools.cache
def _vr(tag: int) -> str:
    vr = str(dictionary_VR(tag))
    # Ambiguous dictionary VRs ("US or SS"): the unsigned form is what the index holds.
    return vr.split(" or ")[0]


def retrieve_url(level: Level, row: Mapping[str, Any], retrieve_base: str) -> str | None:
    """The WADO-RS URL of a result's study, series or instance; None without its UIDs."""
    base = retrieve_base.rstrip("/")
    study = row.get("StudyInstanceUID")
    if not study:
        return None
    url = f"{base}/studies/{study}"
    if level == "study":
        return url
    series = row.get("SeriesInstanceUID")
    if not series:
        return None
    url += f"/series/{series}"
    if level == "series":
        return url
    sop = row.get("SOPInstanceUID")
    return f"{url}/instances/{sop}" if sop else None


def _person_name(value: str) -> dict[str, str]:
    return {
        name: group for name, group in zip(PN_GROUPS, value.split("=")[:3], strict=False) if group
    }


def _number(vr: str, value: Any) -> int | float:
    if vr in _INT_VRS:
        return int(value)
    number = float(value)
    return int(number) if vr == "DS" and number.is_integer() else number


def _element(keyword: str, value: Any, *, keep_empty: bool) -> dict[str, Any] | None:
    vr = _vr(_tag(keyword))
    values: list[Any]
    if isinstance(value, list):
        values = [v for v in value if v is not None and v != ""]
    else:
        values = [] if value is None or value == "" else [value]
    if not values:
        return {"vr": vr} if keep_empty else None
    if vr == "SQ":
        items = [_dataset(item, keep_empty=_REQUIRED) for item in values]
        return {"vr": vr, "Value": items}
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(str(v)) for v in values]}
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        return {"vr": vr, "Value": [_number(vr, v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


def _dataset(row: Mapping[str, Any], *, keep_empty: Collection[str]) -> dict[str, Any]:
    elements: dict[int, dict[str, Any]] = {}
    for keyword, value in row.items():
        element = _element(keyword, value, keep_empty=keyword in keep_empty)
        if element is not None:
            elements[_tag(keyword)] = element
    return {_tag_hex(tag): elements[tag] for tag in sorted(elements)}


@functools.cache
def _tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def to_dicom_json(
    level: Level,
    rows: Iterable[Mapping[str, Any]],
    *,
    includefield: Collection[str],
    retrieve_base: str,
) -> list[dict[str, Any]]:
    """Search results as the ``application/dicom+json`` payload (PS3.18 F.2).

    ``rows`` hold exactly the attributes to return; ``includefield`` names the ones the
    client asked for (by matching or ``includefield``): those, and the standard's type R
    and U return attributes, are present with just their ``vr`` when the index has no
    value; other empty attributes are left out ("shall be present if known").
    RetrieveURL is ``{retrieve_base}/studies/{uid}[/series/{uid}[/instances/{uid}]]``.
    Raises ``KeyError`` for a keyword that is not in the DICOM data dictionary.
    """
    keep = frozenset(includefield) | _REQUIRED
    out = []
    for row in rows:
        full = dict(row)
        full["SpecificCharacterSet"] = "ISO_IR 192"
        url = retrieve_url(level, row, retrieve_base)
        if url is not None:
            full["RetrieveURL"] = url
        out.append(_dataset(full, keep_empty=keep))
    return out
