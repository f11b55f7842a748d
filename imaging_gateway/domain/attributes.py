"""The one table of the DICOM attributes the index holds: level, column, VR, matching, returns.

In the spirit of pynetdicom's ``apps/qrscp`` translation table: one entry per keyword,
and everything that depends on which attributes are indexed derives from it:

- ``index.schema``: the attribute columns of ``patients``, ``studies``, ``series``,
  ``instances`` and ``series_requests`` (type from the VR and ``length``), and the blind
  index columns of sealed attributes (the Alembic migrations stay as written; a test
  checks that the migrated schema has every column derived here);
- ``dicom.headers``: which elements a header read keeps and how each is read (by VR);
- ``index.sql``: the upsert rows built from parsed headers, and which columns are sealed
  (PHI encrypted at rest when the index is encrypted);
- ``domain.qido``: the matchable keys, their matching, the default return attributes per
  search level (PS3.18 Tables 10.6.3-3, -4, -5) and the type R/U ones;
- ``index.qido``: the column of each keyword, and the sealed columns' row identities;
- ``dicom.dicomjson`` (and through it ``dicomxml``): each element's tag and VR.

Adding an indexed attribute is one entry here (plus its migration); a test checks
that every entry is read, stored, matched and returned with its VR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from pydicom.datadict import tag_for_keyword

__all__ = [
    "ATTRIBUTES",
    "BY_KEYWORD",
    "ITEM_ATTRIBUTES",
    "LEVEL_TABLES",
    "TABLE",
    "Attribute",
    "EntityLevel",
    "Matching",
    "SearchLevel",
    "Source",
    "by_level",
    "header_attributes",
    "sealed_columns",
    "stored_attributes",
]

EntityLevel = Literal["patient", "study", "series", "instance"]
"""Information-entity level, i.e. which index table holds the attribute."""
SearchLevel = Literal["study", "series", "instance"]
"""QIDO-RS search level (patient attributes are study-level there, PS3.18 10.6.1.2)."""
Matching = Literal["uid", "exact", "range", "wildcard", "list", "fuzzy", "sequence"]
"""How a matchable attribute is matched (PS3.4 C.2.2.2), beyond what its VR allows:

``uid`` single value or UID list; ``exact`` single value (numbers); ``range`` single value
or range (DA, TM, DT); ``wildcard`` single value or ``*``/``?`` wildcards (text VRs; PN
other than PatientName also by component group); ``list`` any of several values
(ModalitiesInStudy, PS3.4 C.6.1.1.3.2); ``fuzzy`` PatientName: through the name search
keys, fuzzy with ``fuzzymatching=true``; ``sequence`` sequence matching through its
items (``RequestAttributesSequence.ScheduledProcedureStepID``)."""
Source = Literal["header", "derived", "computed", "none"]
"""Where the value comes from: ``header`` read from each object's header and upserted;
``derived`` computed from the study's series and instances by
``index.qido.refresh_derived``; ``computed`` made per response, never stored;
``none`` a column the sync does not fill yet (always empty)."""

LEVEL_TABLES: Final[dict[EntityLevel, str]] = {
    "patient": "patients",
    "study": "studies",
    "series": "series",
    "instance": "instances",
}
"""The index table of each level (sequence items: see ``Attribute.table``)."""

_INTEGER_VRS: Final = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})
_ALL: Final[frozenset[SearchLevel]] = frozenset({"study", "series", "instance"})


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute the index holds (or computes) and how every layer treats it."""

    keyword: str
    tag: int
    vr: str
    """The VR the index holds and emits (the unsigned form of an ambiguous one)."""
    level: EntityLevel
    column: str | None
    """Its column in the level's table; None when not stored (computed, or a sequence
    whose items have a table of their own)."""
    source: Source
    length: int | None = None
    """String columns: VARCHAR(length); None: TEXT. Ignored for integer VRs."""
    nullable: bool = True
    unique: bool = False
    """The natural key of its table (the upsert's conflict target)."""
    matching: Matching | None = None
    """None: returned but not matchable (counts, computed values)."""
    returned: frozenset[SearchLevel] = frozenset()
    """The search levels whose results carry it by default (PS3.18 Tables 10.6.3-3..5)."""
    required: bool = False
    """Type R or U in those tables: present (just its VR if empty) whenever returned."""
    sealed: bool = False
    """PHI: encrypted at rest in an encrypted index (``crypto.phi``), bound to its row."""
    blind_index: str | None = None
    """Sealed and matched by equality: the column of its blind index (HMAC)."""
    sequence: str | None = None
    """An item attribute: the keyword of its sequence (stored in that sequence's table)."""
    items: tuple[str, ...] = ()
    """A sequence: the keywords of the item attributes the index holds."""

    @property
    def search_level(self) -> SearchLevel:
        """Its QIDO-RS level: a patient attribute is matched and returned with studies."""
        return "study" if self.level == "patient" else self.level

    @property
    def table(self) -> str:
        """The index table holding its column."""
        if self.sequence is not None:
            return _ITEM_TABLES[self.sequence]
        return LEVEL_TABLES[self.level]

    @property
    def integer(self) -> bool:
        """Whether the index holds it in an integer column."""
        return self.vr in _INTEGER_VRS


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - a typo in the table below; a unit test checks it
        raise KeyError(f"not a DICOM keyword: {keyword}")
    return int(tag)


def _a(
    keyword: str,
    vr: str,
    level: EntityLevel,
    source: Source = "header",
    *,
    column: str | None = "",
    returned: frozenset[SearchLevel] | SearchLevel | None = None,
    **kw: object,
) -> Attribute:
    """An entry; ``column`` defaults to the keyword (``None``: not stored)."""
    levels: frozenset[SearchLevel] = (
        frozenset() if returned is None
        else frozenset({returned}) if isinstance(returned, str)
        else returned
    )  # fmt: skip
    col = keyword if column == "" else column
    return Attribute(keyword, _tag(keyword), vr, level, col, source, returned=levels, **kw)  # type: ignore[arg-type]


_ITEM_TABLES: Final[dict[str, str]] = {"RequestAttributesSequence": "series_requests"}

# Ordered as PS3.18 Tables 10.6.3-3 (study), -4 (series), -5 (instance) list the default
# return attributes, then the others of each level: the default return attributes and
# the columns a search selects come out in this order.
TABLE: Final[tuple[Attribute, ...]] = (
    # ---- study level (Table 10.6.3-3), patients and studies
    _a("StudyDate", "DA", "study", length=8, matching="range", returned="study", required=True),
    _a("StudyTime", "TM", "study", length=16, matching="range", returned="study", required=True),
    _a("AccessionNumber", "SH", "study", matching="wildcard", returned="study", required=True,
       sealed=True, blind_index="AccessionNumber_bidx"),
    _a("InstanceAvailability", "CS", "instance", "computed", column=None,
       returned=frozenset({"study", "instance"})),
    _a("ModalitiesInStudy", "CS", "study", "derived", length=200, matching="list",
       returned="study", required=True),
    _a("ReferringPhysicianName", "PN", "study", matching="wildcard", returned="study",
       required=True, sealed=True),
    _a("RetrieveURL", "UR", "instance", "computed", column=None, returned=_ALL, required=True),
    _a("PatientName", "PN", "patient", matching="fuzzy", returned="study", required=True,
       sealed=True),
    _a("PatientID", "LO", "patient", nullable=False, matching="wildcard", returned="study",
       required=True, sealed=True, blind_index="PatientID_bidx"),
    _a("PatientBirthDate", "DA", "patient", matching="range", returned="study", required=True,
       sealed=True),
    _a("PatientSex", "CS", "patient", length=16, matching="wildcard", returned="study",
       required=True),
    _a("StudyInstanceUID", "UI", "study", length=64, nullable=False, unique=True,
       matching="uid", returned="study", required=True),
    _a("StudyID", "SH", "study", length=16, matching="wildcard", returned="study",
       required=True),
    _a("NumberOfStudyRelatedSeries", "IS", "study", "derived", returned="study", required=True),
    _a("NumberOfStudyRelatedInstances", "IS", "study", "derived", returned="study",
       required=True),
    _a("StudyDescription", "LO", "study", matching="wildcard", sealed=True),
    # Held per study in this index (the producing institution), so matched and returned
    # at study level.
    _a("InstitutionName", "LO", "study", matching="wildcard"),
    _a("IssuerOfPatientID", "LO", "patient", length=64, matching="wildcard"),
    # ---- series level (Table 10.6.3-4)
    _a("Modality", "CS", "series", length=16, matching="wildcard", returned="series",
       required=True),
    _a("SeriesDescription", "LO", "series", matching="wildcard", returned="series",
       sealed=True),
    _a("SeriesInstanceUID", "UI", "series", length=64, nullable=False, unique=True,
       matching="uid", returned="series", required=True),
    _a("SeriesNumber", "IS", "series", matching="exact", returned="series", required=True),
    _a("NumberOfSeriesRelatedInstances", "IS", "series", "derived", returned="series",
       required=True),
    _a("PerformedProcedureStepStartDate", "DA", "series", "none", length=8, matching="range",
       returned="series"),
    _a("PerformedProcedureStepStartTime", "TM", "series", "none", length=16, matching="range",
       returned="series"),
    _a("RequestAttributesSequence", "SQ", "series", "none", column=None, matching="sequence",
       returned="series", items=("ScheduledProcedureStepID", "RequestedProcedureID")),
    _a("BodyPartExamined", "CS", "series", length=16, matching="wildcard"),
    _a("SeriesDate", "DA", "series", length=8, matching="range"),
    # ---- instance level (Table 10.6.3-5; BitsAllocated "if known": not held)
    _a("SOPClassUID", "UI", "instance", length=64, nullable=False, matching="uid",
       returned="instance", required=True),
    _a("SOPInstanceUID", "UI", "instance", length=64, nullable=False, matching="uid",
       returned="instance", required=True),
    _a("InstanceNumber", "IS", "instance", matching="exact", returned="instance",
       required=True),
    _a("Rows", "US", "instance", matching="exact", returned="instance"),
    _a("Columns", "US", "instance", matching="exact", returned="instance"),
    _a("NumberOfFrames", "IS", "instance", matching="exact", returned="instance"),
    _a("AvailableTransferSyntaxUID", "UI", "instance", column="TransferSyntaxUID", length=64,
       matching="uid"),
    # Every response is UTF-8 (PS3.18 F.2): computed, not the stored object's own
    # (instances.SpecificCharacterSet, which only the header reader uses).
    _a("SpecificCharacterSet", "CS", "instance", "computed", column=None),
    # ---- sequence items (RequestAttributesSequence, table series_requests)
    _a("ScheduledProcedureStepID", "SH", "series", "none", length=64, matching="wildcard",
       required=True, sequence="RequestAttributesSequence"),
    _a("RequestedProcedureID", "SH", "series", "none", length=64, matching="wildcard",
       required=True, sequence="RequestAttributesSequence"),
)
"""Every attribute the index holds or computes, top-level ones and sequence items."""

BY_KEYWORD: Final[dict[str, Attribute]] = {a.keyword: a for a in TABLE}
"""Keyword -> entry, sequence items included."""
ATTRIBUTES: Final[dict[str, Attribute]] = {a.keyword: a for a in TABLE if a.sequence is None}
"""Keyword -> entry of the top-level attributes (what a search matches and returns)."""
ITEM_ATTRIBUTES: Final[dict[str, Attribute]] = {
    a.keyword: a for a in TABLE if a.sequence is not None
}
"""Keyword -> entry of the sequence item attributes."""


def by_level(level: EntityLevel) -> tuple[Attribute, ...]:
    """The top-level entries of one information-entity level, in table order."""
    return tuple(a for a in ATTRIBUTES.values() if a.level == level)


def stored_attributes(table: str) -> tuple[Attribute, ...]:
    """The entries with a column in index table ``table``, in table order."""
    return tuple(a for a in TABLE if a.column is not None and a.table == table)


def header_attributes(level: EntityLevel) -> tuple[Attribute, ...]:
    """The stored entries of a level read from each object's header, in table order."""
    return tuple(a for a in by_level(level) if a.source == "header" and a.column is not None)


def sealed_columns(table: str) -> tuple[str, ...]:
    """The columns of index table ``table`` that hold sealed cells of table attributes."""
    return tuple(a.column for a in stored_attributes(table) if a.sealed and a.column)
