"""Patient / study / series / instance records as read from one DICOM object's header."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imaging_gateway.domain.attributes import Attribute, EntityLevel

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """The patient module of one object (PS3.3 C.7.1.1)."""

    PatientID: str
    IssuerOfPatientID: str | None = None
    PatientName: str | None = None
    """Unicode, DICOM PN form: ``alphabetic=ideographic=phonetic`` groups, ``^`` components."""
    PatientBirthDate: str | None = None
    PatientSex: str | None = None
    national_id: str | None = None
    """GB 11643 resident identity number, present only when its checksum is valid."""

    @property
    def identified(self) -> bool:
        """Whether PatientID names a patient: present and not empty or blank.

        Without one nothing ties this object to any other object's patient (PS3.3
        C.7.1.1: PatientID is type 2, so it may be empty); the index then gives each
        study a patient of its own.
        """
        return bool(self.PatientID.strip())


@dataclass(frozen=True, slots=True)
class StudyRecord:
    """The general study module (PS3.3 C.7.2.1) plus the producing institution."""

    StudyInstanceUID: str
    StudyDate: str | None = None
    StudyTime: str | None = None
    AccessionNumber: str | None = None
    StudyID: str | None = None
    StudyDescription: str | None = None
    ReferringPhysicianName: str | None = None
    InstitutionName: str | None = None
    institution_code: str | None = None
    """Medical-insurance institution code (e.g. H11010800028) from InstitutionCodeSequence."""


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    """The general series module (PS3.3 C.7.3.1)."""

    SeriesInstanceUID: str
    Modality: str | None = None
    SeriesNumber: int | None = None
    SeriesDescription: str | None = None
    BodyPartExamined: str | None = None
    SeriesDate: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The SOP common and image pixel facts of one instance."""

    SOPInstanceUID: str
    SOPClassUID: str
    InstanceNumber: int | None = None
    TransferSyntaxUID: str | None = None
    Rows: int | None = None
    Columns: int | None = None
    NumberOfFrames: int | None = None


RECORD_TYPES: dict[EntityLevel, type] = {
    "patient": PatientRecord,
    "study": StudyRecord,
    "series": SeriesRecord,
    "instance": InstanceRecord,
}
"""The record of each information-entity level (ParsedHeader's field of that name)."""


@dataclass(frozen=True, slots=True)
class ParsedHeader:
    """Everything the index keeps from one DICOM object's header."""

    patient: PatientRecord
    study: StudyRecord
    series: SeriesRecord
    instance: InstanceRecord
    SpecificCharacterSet: str | None = None
    header_bytes: int = 0
    """How many bytes of the object the header occupies (up to pixel data or end)."""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    """Non-fatal findings, e.g. ``national-id-checksum-invalid``; never patient data."""
    extra: tuple[tuple[str, Any], ...] = ()
    """(keyword, value) of the attribute table's header attributes that have no field in
    the records above: an attribute added to the table alone is read, stored and
    returned without a new field here."""

    def value(self, attribute: Attribute) -> Any:
        """The value of a header attribute of the table: its record's field named as its
        column, else its entry in ``extra`` (None when the header had none)."""
        record: Any = (
            self.patient if attribute.level == "patient"
            else self.study if attribute.level == "study"
            else self.series if attribute.level == "series"
            else self.instance
        )  # fmt: skip
        found = getattr(record, attribute.column or attribute.keyword, _MISSING)
        if found is not _MISSING:
            return found
        return dict(self.extra).get(attribute.keyword)


@dataclass(frozen=True, slots=True)
class InstanceLocation:
    """Where one indexed instance lies and what a retrieve needs to know about it."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str | None
    store: str
    key: str
    etag: str
    size: int
    header_bytes: int
    """Bytes of the object up to its pixel data (a ranged read of these holds the header)."""
    Rows: int | None = None
    Columns: int | None = None
    NumberOfFrames: int | None = None
    InstanceNumber: int | None = None
