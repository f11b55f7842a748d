"""Tables of the study index, as SQLAlchemy Core metadata (migrations create them).

The DICOM attribute columns of patients, studies, series, instances and series_requests
(and the blind index columns of sealed attributes) derive from the attribute table,
``imaging_gateway.domain.attributes``; the other columns and every index are written
here. A test checks that the migrated schema holds what this derives.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
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

from imaging_gateway.domain.attributes import stored_attributes

metadata = MetaData()

UID = String(64)


def attribute_columns(table: str) -> list[Column[Any]]:
    """The columns of the attribute table's entries stored in ``table``, in its order:
    INTEGER for integer VRs, else VARCHAR(length) or TEXT; then the blind index
    columns (VARCHAR(64)) of its sealed attributes matched by equality."""
    out: list[Column[Any]] = []
    for a in stored_attributes(table):
        if a.column is None:  # pragma: no cover - stored_attributes holds stored ones only
            continue
        kind: Any = Integer if a.integer else String(a.length) if a.length else Text
        out.append(Column(a.column, kind, nullable=a.nullable, unique=a.unique or None))
    out += [Column(a.blind_index, String(64)) for a in stored_attributes(table) if a.blind_index]
    return out


# Object keys compare in code-point (= UTF-8 byte) order, as S3 lists them; SQLite's
# default BINARY collation already does, PostgreSQL needs "C".
KEY = String(1024).with_variant(String(1024, collation="C"), "postgresql")

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Local PatientIDs are only unique within their issuer (or, lacking one, the hospital).
    # A study without a usable PatientID has a patient of its own (0007, sql.patient_key).
    Column("patient_key", String(200), nullable=False, unique=True),
    # PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex (sealed
    # ones TEXT since 0006), PatientID_bidx.
    *attribute_columns("patients"),
    # The key of the object the attributes came from: the greatest key wins (0010).
    Column("source_key", KEY),
    Column("national_id", Text),
    # Search keys for PatientName fuzzy matching (characters, pinyin, initials); see
    # imaging_gateway.domain.names. Added in 0002.
    Column("name_search", Text),
    Index("ix_patients_patient_id", "PatientID"),
    Index("ix_patients_national_id", "national_id"),
    # With [encryption] enabled (0006, imaging_gateway.crypto.phi): PatientID,
    # PatientName, PatientBirthDate and national_id hold sealed cells, patient_key is
    # blinded, name_search is null, and exact lookups use these blind indexes.
    Column("national_id_bidx", String(64)),
    Index("ix_patients_patient_id_bidx", "PatientID_bidx"),
    Index("ix_patients_national_id_bidx", "national_id_bidx"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", Integer, ForeignKey("patients.id"), nullable=False),
    # StudyInstanceUID, StudyDate, ..., the derived QIDO-RS return attributes
    # ModalitiesInStudy (distinct values, sorted, backslash-separated) and the related
    # series/instance counts (PS3.4 C.3.4; added in 0003, kept up to date by
    # imaging_gateway.index.qido.refresh_derived), AccessionNumber_bidx (0006).
    *attribute_columns("studies"),
    # The key of the object the attributes came from: the greatest key wins (0010).
    Column("source_key", KEY),
    Column("institution_code", String(32)),
    Column("province", String(6), nullable=False),
    # The hospital (medical-insurance institution code) that produced the study: from the
    # store's configured hospital, else the DICOM institution code. Added in 0002.
    Column("hospital", String(32)),
    Index("ix_studies_patient", "patient_id"),
    Index("ix_studies_hospital", "hospital"),
    Index("ix_studies_date", "StudyDate"),
    Index("ix_studies_accession", "AccessionNumber"),
    # Encrypted index (0006): AccessionNumber, StudyDescription and ReferringPhysicianName
    # hold sealed cells; AccessionNumber lookups use its blind index.
    Index("ix_studies_accession_bidx", "AccessionNumber_bidx"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", Integer, ForeignKey("studies.id"), nullable=False),
    # SeriesInstanceUID, Modality, ...; added in 0003 (QIDO-RS): a derived count (see
    # studies above) and the series-level required matching keys of PS3.18 Table 10.6.1-5.
    *attribute_columns("series"),
    # The key of the object the attributes came from: the greatest key wins (0010).
    Column("source_key", KEY),
    Index("ix_series_study", "study_id"),
    Index("ix_series_modality", "Modality"),
    # ModalitiesInStudy matching: studies.id IN (series.study_id of a modality).
    Index("ix_series_modality_study", "Modality", "study_id"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # SOPInstanceUID (not unique: two objects claiming one are both kept, see conflicts),
    # SOPClassUID, InstanceNumber, Rows, Columns, NumberOfFrames, TransferSyntaxUID.
    *attribute_columns("instances"),
    Column("series_id", Integer, ForeignKey("series.id"), nullable=False),
    # The object's own character set (the header reader's), not a returned attribute.
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
    # Checkpoint: every key listed up to cursor is done, committed with the page that
    # reached it (since 0009: the last key of the slices landed without a gap).
    Column("cursor", KEY),
    Column("counters", Text, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_sync_jobs_store_status", "store", "status"),
)

# A sync job's listing, cut into slices of one page each (0009): the objects the page
# listed (JSON, dropped once the slice lands), and the claim of the worker on it: a
# lease it renews while it works. A slice whose lease expired (or, on PostgreSQL, whose
# worker's session is gone) is claimed again by another worker. ``final``: the
# listing's last page. See imaging_gateway.sync.runner.
sync_slices = Table(
    "sync_slices",
    metadata,
    Column("job_id", String(36), ForeignKey("sync_jobs.id"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("after_key", KEY),
    Column("last_key", KEY),
    Column("final", Boolean, nullable=False),
    Column("objects", Text),
    Column("state", String(16), nullable=False),
    Column("claimed_by", String(128)),
    Column("lease_until", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False),
    Column("counters", Text),
    Index("ix_sync_slices_job_state", "job_id", "state", "seq"),
)

consents = Table(
    "consents",
    metadata,
    Column("id", String(36), primary_key=True),
    # The patient, by GB 11643 national identity (the patient token of federation is
    # derived from it).
    Column("national_id", Text, nullable=False),
    Column("grantee_hospital", String(32), nullable=False),
    Column("grantee_clinician", String(128)),
    Column("purpose", String(64), nullable=False),
    # "all", or a JSON list of StudyInstanceUIDs.
    Column("scope", Text, nullable=False),
    Column("valid_from", DateTime(timezone=True), nullable=False),
    Column("valid_until", DateTime(timezone=True), nullable=False),
    # How the patient authorized (e.g. a scanned medical-insurance code reference).
    Column("evidence", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("revoked_by", String(128)),
    Index("ix_consents_patient", "national_id"),
    Index("ix_consents_grantee", "grantee_hospital", "national_id"),
    # Encrypted index (0006): national_id and evidence hold sealed cells.
    Column("national_id_bidx", String(64)),
    Index("ix_consents_grantee_bidx", "grantee_hospital", "national_id_bidx"),
)

# StudyInstanceUID: the study whose request opened the window; None when opened from a
# search (0004).
break_glass = Table(
    "break_glass",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("subject", String(128), nullable=False),
    Column("hospital", String(32), nullable=False),
    Column("patient_id", Integer, ForeignKey("patients.id"), nullable=False),
    Column("StudyInstanceUID", UID),
    Column("reason", Text, nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_break_glass_hospital", "hospital", "expires_at"),
)

# The federation's keyed patient token of each indexed patient (0005), kept by the gate
# (security.gate.Gate.refresh_patient_tokens) so a peer's request, which names a patient
# by token only, finds the local patient rows. A row counts only while patient_key and
# national_id still equal the patient row's (a reused id or a changed identity never
# matches: fail closed until the next refresh). In an encrypted index national_id holds
# the patient's national_id_bidx instead (0006 widens it on PostgreSQL).
federation_patient_tokens = Table(
    "federation_patient_tokens",
    metadata,
    Column("patient_id", Integer, primary_key=True, autoincrement=False),
    Column("patient_key", String(200), nullable=False),
    Column("national_id", String(64)),
    Column("token", String(64), nullable=False),
    Index("ix_federation_patient_tokens_token", "token"),
)

# State that authorization depends on, shared by every gateway process (0008; SQL in
# imaging_gateway.index.shared_state). ``federation_assertion_ids``: each peer
# assertion's "province:jti", kept until its expiry plus clock skew; inserting one that
# is there fails (replay). ``federation_located_studies``: the remote studies a hospital
# found by federated search, with the caller the retrieve asks as (JSON), until
# ``expires_at``. ``refusal_counters``: refused tokens per client address and reason,
# one audit record per window (``reported``: the count the window that just ended held).
federation_assertion_ids = Table(
    "federation_assertion_ids",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_federation_assertion_ids_expires", "expires_at"),
)

federation_located_studies = Table(
    "federation_located_studies",
    metadata,
    Column("hospital", String(32), primary_key=True),
    Column("province", String(6), primary_key=True),
    Column("StudyInstanceUID", UID, primary_key=True),
    Column("caller", Text, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_federation_located_studies_expires", "expires_at"),
)

refusal_counters = Table(
    "refusal_counters",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("reason", String(240), primary_key=True),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("count", Integer, nullable=False),
    Column("reported", Integer, nullable=False),
    Index("ix_refusal_counters_window", "window_start"),
)

# The data keys of the encrypted PHI columns (imaging_gateway.crypto.phi), each only
# wrapped by the keyring's key-encryption key (key id and version), as an object's data key
# is. A sealed cell names its key by ``number``. Added in 0006.
index_keys = Table(
    "index_keys",
    metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("key_id", String(255), nullable=False),
    Column("key_version", BigInteger, nullable=False),
    # base64 of the keyring's wrapped-key layout (crypto.keyring.Keyring.wrap)
    Column("wrapped", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Append-only, hash-chained access log (imaging_gateway.security.audit).
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("hospital", String(32)),
    Column("patient_token", String(64)),
    Column("StudyInstanceUID", UID),
    Column("action", String(32), nullable=False),
    Column("purpose", String(64)),
    Column("break_glass_reason", Text),
    Column("outcome", String(16), nullable=False),
    Column("source", String(64)),
    Column("detail", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_patient", "patient_token", "seq"),
)

# PatientName search keys, one row each (QIDO-RS literal and fuzzy PN matching; see
# imaging_gateway.domain.names): equality and prefix ranges on ``key`` use its index.
# "C" collation on PostgreSQL so that ranges compare code points. Added in 0003;
# maintained by imaging_gateway.index.qido.refresh_derived.
patient_name_keys = Table(
    "patient_name_keys",
    metadata,
    Column(
        "key", String(128).with_variant(String(128, collation="C"), "postgresql"), primary_key=True
    ),
    Column("patient_id", Integer, ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_patient_name_keys_patient", "patient_id"),
)

# Request Attributes Sequence (0040,0275) items of a series: the sequence-matching keys
# of PS3.18 Table 10.6.1-5. Added in 0003.
series_requests = Table(
    "series_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    *attribute_columns("series_requests"),
    Index("ix_series_requests_series", "series_id"),
)

# Also created by 0003, on PostgreSQL only (LIKE 'prefix%' uses a btree index there only
# with pattern operators; SQLite's GLOB uses the plain indexes above):
# ix_patients_patient_id_pattern (PatientID varchar_pattern_ops) and
# ix_studies_accession_pattern (AccessionNumber varchar_pattern_ops).
