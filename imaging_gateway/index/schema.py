"""Tables of the study index, as SQLAlchemy Core metadata (migrations create them)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

UID = String(64)
# Object keys compare in code-point (= UTF-8 byte) order, as S3 lists them; SQLite's
# default BINARY collation already does, PostgreSQL needs "C".
KEY = String(1024).with_variant(String(1024, collation="C"), "postgresql")

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Local PatientIDs are only unique within their issuer (or, lacking one, the hospital).
    Column("patient_key", String(200), nullable=False, unique=True),
    Column("PatientID", String(64), nullable=False),
    Column("IssuerOfPatientID", String(64)),
    Column("PatientName", Text),
    Column("PatientBirthDate", String(8)),
    Column("PatientSex", String(16)),
    Column("national_id", String(18)),
    Index("ix_patients_patient_id", "PatientID"),
    Index("ix_patients_national_id", "national_id"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("StudyInstanceUID", UID, nullable=False, unique=True),
    Column("patient_id", Integer, ForeignKey("patients.id"), nullable=False),
    Column("StudyDate", String(8)),
    Column("StudyTime", String(16)),
    Column("AccessionNumber", String(64)),
    Column("StudyID", String(16)),
    Column("StudyDescription", Text),
    Column("ReferringPhysicianName", Text),
    Column("InstitutionName", Text),
    Column("institution_code", String(32)),
    Column("province", String(6), nullable=False),
    Index("ix_studies_patient", "patient_id"),
    Index("ix_studies_date", "StudyDate"),
    Index("ix_studies_accession", "AccessionNumber"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("SeriesInstanceUID", UID, nullable=False, unique=True),
    Column("study_id", Integer, ForeignKey("studies.id"), nullable=False),
    Column("Modality", String(16)),
    Column("SeriesNumber", Integer),
    Column("SeriesDescription", Text),
    Column("BodyPartExamined", String(16)),
    Column("SeriesDate", String(8)),
    Index("ix_series_study", "study_id"),
    Index("ix_series_modality", "Modality"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Not unique: two objects claiming one SOPInstanceUID are both kept (see conflicts).
    Column("SOPInstanceUID", UID, nullable=False),
    Column("series_id", Integer, ForeignKey("series.id"), nullable=False),
    Column("SOPClassUID", UID, nullable=False),
    Column("InstanceNumber", Integer),
    Column("TransferSyntaxUID", UID),
    Column("Rows", Integer),
    Column("Columns", Integer),
    Column("NumberOfFrames", Integer),
    Column("SpecificCharacterSet", String(128)),
    Column("store", String(64), nullable=False),
    Column("key", KEY, nullable=False),
    Column("etag", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("last_modified", DateTime(timezone=True), nullable=False),
    Column("header_sha256", String(64), nullable=False),
    Column("header_bytes", Integer, nullable=False),
    Column("province", String(6), nullable=False),
    Column("indexed_at", DateTime(timezone=True), nullable=False),
    # The last sync job whose listing saw the object; the job's final sweep turns rows
    # it did not see into tombstones (so any listing order works, as stores differ).
    Column("seen_job", String(36)),
    UniqueConstraint("store", "key", name="uq_instances_store_key"),
    Index("ix_instances_sop", "SOPInstanceUID"),
    Index("ix_instances_series", "series_id"),
    Index("ix_instances_store_seen", "store", "seen_job"),
)

conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("SOPInstanceUID", UID, nullable=False),
    Column("store", String(64), nullable=False),
    Column("key", KEY, nullable=False),
    Column("other_store", String(64), nullable=False),
    Column("other_key", KEY, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("detected_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("store", "key", "other_store", "other_key", name="uq_conflicts_pair"),
    Index("ix_conflicts_sop", "SOPInstanceUID"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("store", String(64), primary_key=True),
    Column("key", KEY, primary_key=True),
    Column("etag", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("reason", String(500), nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("seen_job", String(36)),
)

tombstones = Table(
    "tombstones",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("store", String(64), nullable=False),
    Column("key", KEY, nullable=False),
    Column("etag", String(128), nullable=False),
    Column("SOPInstanceUID", UID),
    Column("job_id", String(36)),
    Column("deleted_at", DateTime(timezone=True), nullable=False),
    Index("ix_tombstones_store_key", "store", "key"),
)

sync_jobs = Table(
    "sync_jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("store", String(64), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    # Checkpoint: every key <= cursor is done, committed with the page that reached it.
    Column("cursor", KEY),
    Column("counters", Text, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_sync_jobs_store_status", "store", "status"),
)
