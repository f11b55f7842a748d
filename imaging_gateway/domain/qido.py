"""QIDO-RS search requests (PS3.18 10.6, 8.3.4) parsed into a query model; no I/O.

``parse_qido`` turns the target resource and query parameters of a Search Transaction
into a :class:`QidoQuery`: the matching keys with their PS3.4 C.2.2.2 matching kind,
``includefield``, ``fuzzymatching``, ``limit`` and ``offset``, and the warnings the
response must carry (PS3.18 8.3: unsupported parameters are ignored, with a warning).
:class:`QidoPage` is what the index answers with.

Which attributes the index holds, at which level, how each is matched and at which
levels it is returned by default comes from the one attribute table,
``imaging_gateway.domain.attributes``; ``ATTRIBUTES``, ``DEFAULT_RETURN`` (PS3.18 Tables
10.6.3-3, -4, -5) and ``REQUIRED_RETURN`` here are derived from it. The required matching
keys (Table 10.6.1-5) are all in it.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from imaging_gateway.domain.attributes import ATTRIBUTES as TABLE_ATTRIBUTES
from imaging_gateway.domain.attributes import Attribute
from imaging_gateway.errors import InvalidQuery

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_RETURN",
    "REQUIRED_RETURN",
    "AttributeMatch",
    "Level",
    "MatchKind",
    "QidoPage",
    "QidoQuery",
    "QidoResult",
    "is_uid",
    "parse_qido",
    "tag_of",
]

Level = Literal["study", "series", "instance"]
MatchKind = Literal["universal", "single", "wildcard", "list", "range"]

_LEVEL_RANK: Final[dict[str, int]] = {"study": 0, "series": 1, "instance": 2}


# The attributes the index holds (and a few it computes), by keyword: the table's
# top-level entries. The QIDO-RS required matching keys (PS3.18 Table 10.6.1-5) are all
# there.
ATTRIBUTES: Final[dict[str, Attribute]] = TABLE_ATTRIBUTES

SEQUENCE_ITEMS: Final[dict[str, tuple[str, ...]]] = {
    k: a.items for k, a in ATTRIBUTES.items() if a.items
}
"""Sequence attributes the index holds, with the item attributes it holds."""

# The keyword PS3.18 Table 10.6.1-5 prints for (0040,0275); the data dictionary's is
# RequestAttributesSequence.
_ALIASES: Final[dict[str, str]] = {"RequestAttributeSequence": "RequestAttributesSequence"}

# Counts and computed values: returned, never matched.
_NOT_MATCHABLE: Final[frozenset[str]] = frozenset(
    k for k, a in ATTRIBUTES.items() if a.matching is None
)

DEFAULT_RETURN: Final[dict[str, tuple[str, ...]]] = {
    level: tuple(k for k, a in ATTRIBUTES.items() if level in a.returned)
    for level in ("study", "series", "instance")
}
"""PS3.18 Tables 10.6.3-3 (study), 10.6.3-4 (series), 10.6.3-5 (instance), as held here."""

REQUIRED_RETURN: Final[frozenset[str]] = frozenset(
    k for k, a in ATTRIBUTES.items() if a.required
)
"""Type R and U return attributes: present (empty if need be) whenever returned."""

# PS3.18 Table 10.6.1-4: the IE levels whose attributes may be matched, per resource.
_MATCH_LEVELS: Final[dict[str, frozenset[str]]] = {
    "all-studies": frozenset({"study"}),
    "study-series": frozenset({"series"}),
    "study-instances": frozenset({"series", "instance"}),
    "all-series": frozenset({"study", "series"}),
    "study-series-instances": frozenset({"instance"}),
    "all-instances": frozenset({"study", "series", "instance"}),
}
_RESOURCE_NAMES: Final[dict[str, str]] = {
    "all-studies": "/studies",
    "study-series": "/studies/{study}/series",
    "study-instances": "/studies/{study}/instances",
    "all-series": "/series",
    "study-series-instances": "/studies/{study}/series/{series}/instances",
    "all-instances": "/instances",
}
# The unique keys of the levels above the target may always narrow a search.
_ALWAYS_MATCHABLE: Final[frozenset[str]] = frozenset({"StudyInstanceUID", "SeriesInstanceUID"})

_WILDCARD_VRS: Final[frozenset[str]] = frozenset(
    {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
)
_RANGE_VRS: Final[frozenset[str]] = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS: Final[frozenset[str]] = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})
# Attributes matched against any of several values (PS3.4 C.6.1.1.3.2 for
# ModalitiesInStudy); UID list matching (C.2.2.2.2) for every UI attribute.
_LIST_KEYWORDS: Final[frozenset[str]] = frozenset(
    k for k, a in ATTRIBUTES.items() if a.matching == "list"
)
# PN attributes matched literally even with fuzzymatching=true.
_LITERAL_NAMES: Final[tuple[str, ...]] = tuple(
    k for k, a in ATTRIBUTES.items() if a.vr == "PN" and a.matching != "fuzzy"
)

_KEYWORD_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DA_RE = re.compile(r"[0-9]{8}")
_TM_RE = re.compile(r"([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?")
_DT_RE = re.compile(
    r"[0-9]{4}(0[1-9]|1[0-2])?"
    r"([0-9]{2})?([01][0-9]|2[0-3])?([0-5][0-9])?([0-5][0-9])?(\.[0-9]{1,6})?"
    r"([+-][0-9]{4})?"
)
_INT_RE = re.compile(r"[+-]?[0-9]{1,20}")
# PS3.5 Table 6.2-1: the value range of each integer VR. The index holds these values
# in 32-bit integer columns, so UL, UV and SV are narrowed to what a column can hold.
_INT32: Final = (-(2**31), 2**31 - 1)
_NUMERIC_RANGES: Final[dict[str, tuple[int, int]]] = {
    "IS": _INT32,
    "SL": _INT32,
    "SS": (-(2**15), 2**15 - 1),
    "US": (0, 2**16 - 1),
    "UL": (0, _INT32[1]),
    "UV": (0, _INT32[1]),
    "SV": _INT32,
}
_MAX_VALUE = 1024
_PARAMETERS: Final[frozenset[str]] = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
# Added to every result whatever the level (see dicom.dicomjson.to_dicom_json).
_ALWAYS_RETURNED: Final[frozenset[str]] = frozenset({"RetrieveURL", "SpecificCharacterSet"})
# Bounds on what a warning lists, so a long includefield cannot make a huge header.
_MAX_NAMES = 20
_MAX_NAME = 80


@dataclass(frozen=True, slots=True)
class AttributeMatch:
    """One matching key (PS3.4 C.2.2.2) of a search."""

    path: tuple[str, ...]
    """Keywords from the top level down: ``("PatientID",)``; for sequence matching
    ``("RequestAttributesSequence", "ScheduledProcedureStepID")``."""
    vr: str
    """VR of the matched (innermost) attribute."""
    kind: MatchKind
    value: str = ""
    """The value for single value and wildcard matching (wildcards ``*`` ``?`` kept)."""
    values: tuple[str, ...] = ()
    """UID list matching and list-valued keys: match any of these."""
    low: str | None = None
    high: str | None = None
    """Range matching bounds (inclusive; None is an open end), in the stored format."""

    @property
    def keyword(self) -> str:
        """The top-level attribute (the sequence for sequence matching)."""
        return self.path[0]

    @property
    def leaf(self) -> str:
        """The matched attribute (the item attribute for sequence matching)."""
        return self.path[-1]


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """A parsed QIDO-RS Search Transaction, ready to be answered by the index."""

    level: Level
    study_uid: str | None = None
    series_uid: str | None = None
    matches: tuple[AttributeMatch, ...] = ()
    include: tuple[str, ...] = ()
    """Keywords asked for by ``includefield`` that this resource returns."""
    include_all: bool = False
    fuzzymatching: bool = False
    limit: int | None = None
    """The client's ``limit``; None when absent (the server's maximum applies)."""
    offset: int = 0
    warnings: tuple[str, ...] = ()
    """Texts for ``Warning: 299 <service>: ...`` headers (PS3.18 8.3, 8.3.4.2)."""

    @property
    def resource(self) -> str:
        """The target resource: ``all-studies``, ``study-series``, ``all-instances``, ..."""
        return _resource(self.level, self.study_uid, self.series_uid)

    @property
    def requested(self) -> frozenset[str]:
        """Keywords the client asked for by matching or ``includefield``."""
        return frozenset(m.keyword for m in self.matches) | frozenset(self.include)

    @property
    def return_keywords(self) -> tuple[str, ...]:
        """The attributes each result carries (PS3.18 10.6.3.3), in a stable order."""
        levels: list[str] = []
        resource = self.resource
        if resource in ("all-series", "all-instances"):
            levels.append("study")
        if resource in ("study-instances", "all-instances"):
            levels.append("series")
        levels.append(self.level)
        wanted: dict[str, None] = {}
        for level in levels:
            wanted.update(dict.fromkeys(DEFAULT_RETURN[level]))
        if self.level in ("series", "instance"):
            wanted["StudyInstanceUID"] = None
        if self.level == "instance":
            wanted["SeriesInstanceUID"] = None
        wanted.update(dict.fromkeys(m.keyword for m in self.matches))
        wanted.update(dict.fromkeys(self.include))
        if self.include_all:
            rank = _LEVEL_RANK[self.level]
            wanted.update(
                dict.fromkeys(
                    k
                    for k, spec in ATTRIBUTES.items()
                    if spec.source != "computed" and _LEVEL_RANK[spec.search_level] <= rank
                )
            )
        return tuple(wanted)


@dataclass(frozen=True, slots=True)
class QidoResult:
    """One match: its attributes and, for the gate's audit, whose and which study it is."""

    attributes: dict[str, Any]
    """Keyword -> value: str, int, list[str] (multi-valued) or list[dict] (sequences);
    None where the index holds no value."""
    study_instance_uid: str
    national_id: str | None
    """The patient's national identity, if the index holds one (never returned)."""
    patient_key: str
    """The index's key of the patient (never returned)."""


@dataclass(frozen=True, slots=True)
class QidoPage:
    """One page of search results.

    An empty page is answered with 204 No Content (PS3.18 8.3.4.4.1); ``warnings`` go
    into ``Warning: 299 <service>: <text>`` header fields.
    """

    results: list[QidoResult]
    more: bool
    """True when matches beyond this page exist (limit, offset or the server's cap)."""
    remaining: int | None = None
    """How many matches were not returned, when counted (None: not counted, or many)."""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The results' attributes, in order."""
        return [r.attributes for r in self.results]


def tag_of(keyword: str) -> int:
    """The data element tag of a dictionary keyword. Raises ``KeyError`` if unknown."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


def _resource(level: Level, study_uid: str | None, series_uid: str | None) -> str:
    if level == "study":
        return "all-studies"
    if level == "series":
        return "study-series" if study_uid else "all-series"
    if study_uid and series_uid:
        return "study-series-instances"
    return "study-instances" if study_uid else "all-instances"


def _items(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        # A MultiDict's items() yields every (key, value) pair, repeated keys included.
        return [(str(k), str(v)) for k, v in params.items()]
    return [(str(k), str(v)) for k, v in params]


def _attribute_id(name: str, param: str) -> tuple[str | None, int]:
    """(keyword or None for a private tag, tag) of one attribute-id; InvalidQuery if bad."""
    if _TAG_RE.fullmatch(name):
        tag = int(name, 16)
        if (tag >> 16) % 2 == 1:
            return None, tag
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise InvalidQuery(f"{param}: {name} is not a tag of the DICOM data dictionary")
        return _ALIASES.get(keyword, keyword), tag
    if _KEYWORD_RE.fullmatch(name):
        keyword = _ALIASES.get(name, name)
        found = tag_for_keyword(keyword)
        if found is None:
            raise InvalidQuery(f"{param}: {name} is not a DICOM keyword")
        return keyword, int(found)
    raise InvalidQuery(
        f"{param}: {name!r} is neither a DICOM keyword (e.g. PatientID) nor a tag (8 hex digits)"
    )


def _attribute_path(name: str, param: str) -> tuple[tuple[str, ...] | None, str]:
    """Keywords of an attribute (dotted for sequences) and the VR of its last element.

    Returns (None, vr) for private tags. Raises InvalidQuery for bad names and for
    sequence paths whose inner parts are not sequences.
    """
    parts = name.split(".")
    keywords: list[str] = []
    vr = ""
    private = False
    for position, part in enumerate(parts):
        keyword, tag = _attribute_id(part, param)
        last = position == len(parts) - 1
        try:
            vr = str(dictionary_VR(tag)) if keyword else "UN"
        except KeyError:
            vr = "UN"
        if not last and keyword is not None and vr != "SQ":
            raise InvalidQuery(f"{param}: {part} is not a sequence; only sequences may be dotted")
        if last and vr == "SQ" and len(parts) > 1:
            raise InvalidQuery(f"{param}: a sequence path must end with a non-sequence attribute")
        if keyword is None:
            private = True
        else:
            keywords.append(keyword)
    return (None if private else tuple(keywords)), vr


def is_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 9.1 writes it: digits and dots, no leading zeros."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _check_uid(value: str, param: str) -> str:
    if not is_uid(value):
        raise InvalidQuery(f"{param}: {value!r} is not a valid UID (digits and dots, at most 64)")
    return value


def _check_date(value: str, param: str) -> str:
    if not _DA_RE.fullmatch(value):
        raise InvalidQuery(f"{param}: {value!r} is not a date (YYYYMMDD)")
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise InvalidQuery(f"{param}: {value!r} is not a calendar date") from None
    return value


def _check_time(value: str, param: str) -> str:
    if not _TM_RE.fullmatch(value):
        raise InvalidQuery(f"{param}: {value!r} is not a time (HH[MM[SS[.FFFFFF]]])")
    return value


def _check_datetime(value: str, param: str) -> str:
    if not _DT_RE.fullmatch(value) or len(value) < 4:
        raise InvalidQuery(f"{param}: {value!r} is not a datetime (YYYY[MM[DD[HH[MM[SS]]]]])")
    return value


_CHECKS = {"DA": _check_date, "TM": _check_time, "DT": _check_datetime}


def _parse_match(path: tuple[str, ...], vr: str, raw: str, param: str) -> AttributeMatch:
    """One matching key's value -> its PS3.4 C.2.2.2 matching kind. InvalidQuery if bad."""
    if len(raw) > _MAX_VALUE:
        raise InvalidQuery(f"{param}: value longer than {_MAX_VALUE} characters")
    if any(ord(c) < 0x20 for c in raw):
        raise InvalidQuery(f"{param}: control characters are not allowed in values")
    if raw == "" or (raw == "*" and vr not in _RANGE_VRS | {"UI"} | _NUMERIC_VRS):
        return AttributeMatch(path, vr, "universal")
    keyword = path[-1]
    if vr == "UI":
        uids = [u for u in re.split(r"[,\\]", raw)]
        if any(c in raw for c in "*?"):
            raise InvalidQuery(f"{param}: wildcards are not allowed in UIDs (PS3.4 C.2.2.2.4)")
        checked = tuple(dict.fromkeys(_check_uid(u, param) for u in uids))
        if len(checked) == 1:
            return AttributeMatch(path, vr, "single", value=checked[0])
        return AttributeMatch(path, vr, "list", values=checked)
    if vr in _RANGE_VRS:
        if any(c in raw for c in "*?"):
            raise InvalidQuery(f"{param}: wildcards are not allowed for {vr} values")
        check = _CHECKS[vr]
        if "-" in raw and not (vr == "DT" and _DT_RE.fullmatch(raw)):
            low, _, high = raw.partition("-")
            if "-" in high or (not low and not high):
                raise InvalidQuery(f"{param}: a range is <start>-<end>, either end may be omitted")
            lo = check(low, param) if low else None
            hi = check(high, param) if high else None
            if lo is not None and hi is not None and lo > hi:
                raise InvalidQuery(f"{param}: range start {lo} is after its end {hi}")
            return AttributeMatch(path, vr, "range", low=lo, high=hi)
        return AttributeMatch(path, vr, "single", value=check(raw, param))
    if vr in _NUMERIC_VRS:
        if not _INT_RE.fullmatch(raw.strip()):
            raise InvalidQuery(f"{param}: {raw!r} is not an integer ({vr})")
        smallest, largest = _NUMERIC_RANGES[vr]
        if not smallest <= int(raw) <= largest:
            raise InvalidQuery(f"{param}: {vr} values are integers from {smallest} to {largest}")
        return AttributeMatch(path, vr, "single", value=str(int(raw)))
    if keyword in _LIST_KEYWORDS:
        values = tuple(dict.fromkeys(v for v in re.split(r"[,\\]", raw) if v))
        if not values:
            return AttributeMatch(path, vr, "universal")
        if len(values) == 1:
            only = values[0]
            wild = any(c in only for c in "*?")
            return AttributeMatch(path, vr, "wildcard" if wild else "single", value=only)
        if any(c in v for v in values for c in "*?"):
            raise InvalidQuery(f"{param}: wildcards are not allowed in a list of values")
        return AttributeMatch(path, vr, "list", values=values)
    if "\\" in raw:
        raise InvalidQuery(
            f"{param}: several values (backslash) are only accepted for UIDs and ModalitiesInStudy"
        )
    if any(c in raw for c in "*?"):
        if vr not in _WILDCARD_VRS:
            raise InvalidQuery(f"{param}: wildcards are not allowed for {vr} values")
        return AttributeMatch(path, vr, "wildcard", value=raw)
    return AttributeMatch(path, vr, "single", value=raw)


def _attribute_name(path: tuple[str, ...] | None, name: str) -> str:
    """How a warning names an attribute: its keywords, or for a private tag the tag as
    given; only keyword and tag characters, whatever the input held (a control
    character in a header field would make the response unsendable)."""
    if path is not None:
        return ".".join(path)
    return re.sub(r"[^A-Za-z0-9.]", "", name)[:_MAX_NAME] or "?"


def _name_list(names: Iterable[str]) -> str:
    """``a, b, c``, at most :data:`_MAX_NAMES` of them, then how many more."""
    listed = list(names)
    text = ", ".join(listed[:_MAX_NAMES])
    if len(listed) > _MAX_NAMES:
        text += f" and {len(listed) - _MAX_NAMES} more"
    return text


_MAX_PAGING: Final = 2**31 - 1
"""limit and offset: what a 32-bit SQL parameter holds (PostgreSQL binds them so)."""


def _parse_int(value: str, param: str, *, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", value):
        raise InvalidQuery(f"{param}: {value!r} is not a non-negative integer")
    number = int(value)
    if number < minimum:
        raise InvalidQuery(f"{param}: must be at least {minimum}")
    if number > _MAX_PAGING:
        raise InvalidQuery(f"{param}: must be at most {_MAX_PAGING}")
    return number


def parse_qido(
    level: Level,
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoQuery:
    """Parse a QIDO-RS Search Transaction (PS3.18 10.6.1) into a :class:`QidoQuery`.

    ``level`` is what is searched for; ``study_uid`` / ``series_uid`` come from the path
    (``/studies/{study}/series``, ``/studies/{study}/series/{series}/instances``, ...).
    ``params`` may repeat keys (``includefield`` twice). Attributes are named by keyword
    or by tag, dotted for sequence matching. Attributes the index does not hold, private
    tags and unknown lower-case parameters are ignored, each with a warning text.

    Raises ``InvalidQuery`` (400) naming the parameter and the problem for: an unknown
    keyword or tag, a malformed value (date, time, datetime, UID, integer, range), a
    wildcard where the VR does not allow it, an attribute repeated, an attribute of a
    level this resource cannot match (PS3.18 Table 10.6.1-4), a bad ``limit``,
    ``offset``, ``fuzzymatching`` or ``includefield``, and bad path UIDs.
    """
    if level not in _LEVEL_RANK:
        raise InvalidQuery(f"unknown search level {level!r}")
    if study_uid is not None:
        _check_uid(study_uid, "study")
    if series_uid is not None:
        _check_uid(series_uid, "series")
        if study_uid is None or level != "instance":
            raise InvalidQuery("series: a series path needs its study and an instance search")
    if study_uid is not None and level == "study":
        raise InvalidQuery("study: a study search has no study in its path")
    resource = _resource(level, study_uid, series_uid)
    match_levels = _MATCH_LEVELS[resource]
    rank = _LEVEL_RANK[level]

    matches: list[AttributeMatch] = []
    seen: set[str] = set()
    include: dict[str, None] = {}
    include_all = False
    fuzzy: bool | None = None
    limit: int | None = None
    offset: int | None = None
    warnings: list[str] = []
    ignored: list[str] = []
    # includefield attributes that are not returned (PS3.18 8.3.4: never silently).
    not_held: dict[str, None] = {}
    other_level: dict[str, None] = {}

    for name, raw in _items(params):
        if name in _PARAMETERS:
            if name == "includefield":
                for item in (v.strip() for v in raw.split(",")):
                    if item == "all":
                        include_all = True
                        continue
                    if not item:
                        raise InvalidQuery("includefield: empty attribute in the list")
                    path, _vr = _attribute_path(item, "includefield")
                    spec = None if path is None else ATTRIBUTES.get(path[0])
                    if path is None or spec is None:
                        not_held[_attribute_name(path, item)] = None
                        continue
                    if len(path) > 1 and path[-1] not in SEQUENCE_ITEMS.get(path[0], ()):
                        # The sequence is returned with the item attributes it holds.
                        not_held[_attribute_name(path, item)] = None
                    if _LEVEL_RANK[spec.search_level] <= rank:
                        include[path[0]] = None
                    elif path[0] not in DEFAULT_RETURN[level] and path[0] not in _ALWAYS_RETURNED:
                        other_level[path[0]] = None
                continue
            if name in seen:
                raise InvalidQuery(f"{name}: given more than once")
            seen.add(name)
            if name == "limit":
                limit = _parse_int(raw, "limit", minimum=1)
            elif name == "offset":
                offset = _parse_int(raw, "offset", minimum=0)
            else:
                if raw not in ("true", "false"):
                    raise InvalidQuery(f"fuzzymatching: {raw!r} is neither true nor false")
                fuzzy = raw == "true"
            continue
        if name[:1].islower() or name[:1] == "_":
            # PS3.18 8.3: unsupported query parameters are ignored.
            warnings.append(f"The query parameter {name} is not supported and was ignored.")
            continue
        path, vr = _attribute_path(name, name)
        key = name if path is None else ".".join(path)
        if key in seen:
            raise InvalidQuery(f"{name}: an attribute may be matched only once")
        seen.add(key)
        if path is None:
            ignored.append(name)
            continue
        spec = ATTRIBUTES.get(path[0])
        if spec is None or (len(path) > 1 and path[-1] not in SEQUENCE_ITEMS.get(path[0], ())):
            ignored.append(name)
            continue
        if len(path) == 1 and path[0] in SEQUENCE_ITEMS:
            if raw:
                raise InvalidQuery(
                    f"{name}: match a sequence through its items, e.g. {name}."
                    f"{SEQUENCE_ITEMS[path[0]][0]}"
                )
            include[path[0]] = None
            continue
        if path[0] in _NOT_MATCHABLE or spec.source == "computed":
            if raw:
                ignored.append(name)
            else:
                include[path[0]] = None
            continue
        if spec.search_level not in match_levels and path[0] not in _ALWAYS_MATCHABLE:
            raise InvalidQuery(
                f"{name}: a {spec.search_level}-level attribute cannot be matched by "
                f"{_RESOURCE_NAMES[resource]}"
            )
        if _LEVEL_RANK[spec.search_level] > rank:
            raise InvalidQuery(
                f"{name}: a {spec.search_level}-level attribute in a {level} search"
            )
        matches.append(_parse_match(path, vr, raw, name))

    if ignored:
        warnings.append(
            "The following attributes are not supported as matching keys and were ignored: "
            + ", ".join(ignored)
        )
    if not_held:
        warnings.append(
            "includefield: not returned, this gateway's index does not hold them: "
            + _name_list(not_held)
        )
    if other_level:
        warnings.append(
            f"includefield: not returned, not attributes of a {level} result: "
            + _name_list(other_level)
        )
    for literal in _LITERAL_NAMES:
        if fuzzy and any(m.keyword == literal for m in matches):
            warnings.append(
                f"Fuzzy matching applies to PatientName only; {literal} was matched literally."
            )
    return QidoQuery(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        matches=tuple(matches),
        include=tuple(include),
        include_all=include_all,
        fuzzymatching=bool(fuzzy),
        limit=limit,
        offset=offset or 0,
        warnings=tuple(warnings),
    )
