"""Initial schema: patients, studies, series, instances, conflicts, quarantine, tombstones, jobs.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UID = sa.String(64)
# Object keys compare in code-point (= UTF-8 byte) order, as S3 lists them.
KEY = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("patient_key", sa.String(200), nullable=False, unique=True),
        sa.Column("PatientID", sa.String(64), nullable=False),
        sa.Column("IssuerOfPatientID", sa.String(64)),
        sa.Column("PatientName", sa.Text),
        sa.Column("PatientBirthDate", sa.String(8)),
        sa.Column("PatientSex", sa.String(16)),
        sa.Column("national_id", sa.String(18)),
    )
    op.create_index("ix_patients_patient_id", "patients", ["PatientID"])
    op.create_index("ix_patients_national_id", "patients", ["national_id"])

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("StudyInstanceUID", UID, nullable=False, unique=True),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("StudyDate", sa.String(8)),
        sa.Column("StudyTime", sa.String(16)),
        sa.Column("AccessionNumber", sa.String(64)),
        sa.Column("StudyID", sa.String(16)),
        sa.Column("StudyDescription", sa.Text),
        sa.Column("ReferringPhysicianName", sa.Text),
        sa.Column("InstitutionName", sa.Text),
        sa.Column("institution_code", sa.String(32)),
        sa.Column("province", sa.String(6), nullable=False),
    )
    op.create_index("ix_studies_patient", "studies", ["patient_id"])
    op.create_index("ix_studies_date", "studies", ["StudyDate"])
    op.create_index("ix_studies_accession", "studies", ["AccessionNumber"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("SeriesInstanceUID", UID, nullable=False, unique=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("Modality", sa.String(16)),
        sa.Column("SeriesNumber", sa.Integer),
        sa.Column("SeriesDescription", sa.Text),
        sa.Column("BodyPartExamined", sa.String(16)),
        sa.Column("SeriesDate", sa.String(8)),
    )
    op.create_index("ix_series_study", "series", ["study_id"])
    op.create_index("ix_series_modality", "series", ["Modality"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("SOPInstanceUID", UID, nullable=False),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("SOPClassUID", UID, nullable=False),
        sa.Column("InstanceNumber", sa.Integer),
        sa.Column("TransferSyntaxUID", UID),
        sa.Column("Rows", sa.Integer),
        sa.Column("Columns", sa.Integer),
        sa.Column("NumberOfFrames", sa.Integer),
        sa.Column("SpecificCharacterSet", sa.String(128)),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.Column("etag", sa.String(128), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("last_modified", TS, nullable=False),
        sa.Column("header_sha256", sa.String(64), nullable=False),
        sa.Column("header_bytes", sa.Integer, nullable=False),
        sa.Column("province", sa.String(6), nullable=False),
        sa.Column("indexed_at", TS, nullable=False),
        # The last sync job whose listing saw the object; the job's final sweep turns
        # rows it did not see into tombstones (listing order is the store's own).
        sa.Column("seen_job", sa.String(36)),
        sa.UniqueConstraint("store", "key", name="uq_instances_store_key"),
    )
    op.create_index("ix_instances_sop", "instances", ["SOPInstanceUID"])
    op.create_index("ix_instances_series", "instances", ["series_id"])
    op.create_index("ix_instances_store_seen", "instances", ["store", "seen_job"])

    op.create_table(
        "conflicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("SOPInstanceUID", UID, nullable=False),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.Column("other_store", sa.String(64), nullable=False),
        sa.Column("other_key", KEY, nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("detected_at", TS, nullable=False),
        sa.UniqueConstraint("store", "key", "other_store", "other_key", name="uq_conflicts_pair"),
    )
    op.create_index("ix_conflicts_sop", "conflicts", ["SOPInstanceUID"])

    op.create_table(
        "quarantine",
        sa.Column("store", sa.String(64), primary_key=True),
        sa.Column("key", KEY, primary_key=True),
        sa.Column("etag", sa.String(128), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.Column("seen_job", sa.String(36)),
    )

    op.create_table(
        "tombstones",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.Column("etag", sa.String(128), nullable=False),
        sa.Column("SOPInstanceUID", UID),
        sa.Column("job_id", sa.String(36)),
        sa.Column("deleted_at", TS, nullable=False),
    )
    op.create_index("ix_tombstones_store_key", "tombstones", ["store", "key"])

    op.create_table(
        "sync_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("store", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cursor", KEY),
        sa.Column("counters", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_index("ix_sync_jobs_store_status", "sync_jobs", ["store", "status"])
