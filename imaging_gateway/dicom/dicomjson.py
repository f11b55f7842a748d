"""QIDO-RS results rendered as DICOM JSON (PS3.18 F.2); ``dicomxml`` turns them into XML.

Results come as dicts of keyword -> Python value (see ``imaging_gateway.domain.qido``):
str, int, a list for multi-valued attributes, a list of such dicts for sequences, None
where the index holds no value. Tags and VRs come from the attribute table
(``imaging_gateway.domain.attributes``), for other keywords from pydicom's data
dictionary; which attributes are type R/U from the table too. Each result
also gets SpecificCharacterSet ``ISO_IR 192`` (the payload is UTF-8, PS3.18 F.2) and its
RetrieveURL (PS3.18 Tables 10.6.3-3..5).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword

from imaging_gateway.domain.attributes import BY_KEYWORD

__all__ = ["PN_GROUPS", "Level", "retrieve_url", "to_dicom_json"]

PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# PS3.18 F.2.3: these VRs are JSON numbers.
_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
# Type R and U attributes of PS3.18 Tables 10.6.3-3..5 (and sequence items' R keys):
# present, empty if need be, whenever a result carries them. RetrieveURL is R too, but
# added only when a result has one.
_REQUIRED = frozenset(
    k for k, a in BY_KEYWORD.items() if a.required and a.source != "computed"
)

Level = Literal["study", "series", "instance"]


@functools.cache
def _element(keyword: str) -> tuple[int, str]:
    """(tag, VR) of a keyword: the attribute table's, else pydicom's data dictionary
    (metadata of other attributes). Cached: every element of every result looks its
    keyword up (the keywords are the few the index returns; an unknown one raises and
    is not cached)."""
    attribute = BY_KEYWORD.get(keyword)
    if attribute is not None:
        return attribute.tag, attribute.vr
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"not a DICOM keyword: {keyword}")
    # Ambiguous dictionary VRs ("US or SS"): the unsigned form is what the index holds.
    return int(tag), str(dictionary_VR(tag)).split(" or ")[0]


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


_Spec = tuple[str, str, str, str]
"""(keyword, tag as 8 upper-case hex digits, VR, kind of value: SQ, PN, int, float, str)."""


@functools.lru_cache(maxsize=512)
def _layout(keywords: tuple[str, ...]) -> tuple[_Spec, ...]:
    # Results of one search share their keywords: tags, VRs and the tag order are
    # worked out once per set of keywords, not per element.
    specs = []
    for keyword in keywords:
        tag, vr = _element(keyword)
        kind = (
            vr if vr in ("SQ", "PN")
            else "int" if vr in _INT_VRS
            else "float" if vr in _FLOAT_VRS
            else "str"
        )
        specs.append((keyword, _tag_hex(tag), vr, kind))
    return tuple(sorted(specs, key=lambda spec: spec[1]))


def _values(spec: _Spec, values: list[Any]) -> list[Any]:
    kind = spec[3]
    if kind == "str":
        return [str(v) for v in values]
    if kind == "PN":
        return [_person_name(str(v)) for v in values]
    if kind == "SQ":
        return [_dataset(item, keep_empty=_REQUIRED) for item in values]
    return [_number(spec[2], v) for v in values]


def _dataset(row: Mapping[str, Any], *, keep_empty: Collection[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in _layout(tuple(row)):
        keyword = spec[0]
        value = row[keyword]
        if isinstance(value, list):
            values = [v for v in value if v is not None and v != ""]
        elif value is None or value == "":
            values = []
        else:
            values = [value]
        if values:
            out[spec[1]] = {"vr": spec[2], "Value": _values(spec, values)}
        elif keyword in keep_empty:
            out[spec[1]] = {"vr": spec[2]}
    return out


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
