"""Patient / study / series / instance records as read from one DICOM object's header."""

from __future__ import annotations

from dataclasses import dataclass, field


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
