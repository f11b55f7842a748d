"""QIDO-RS: derived study/series attributes, PatientName search keys, request attributes.

Revision ID: 0003
"""

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from imaging_gateway.domain.names import name_search_keys, split_keys

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME_KEY = sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql")
BATCH = 500


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("ModalitiesInStudy", sa.String(200)))
        batch.add_column(sa.Column("NumberOfStudyRelatedSeries", sa.Integer))
        batch.add_column(sa.Column("NumberOfStudyRelatedInstances", sa.Integer))
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("NumberOfSeriesRelatedInstances", sa.Integer))
        batch.add_column(sa.Column("PerformedProcedureStepStartDate", sa.String(8)))
        batch.add_column(sa.Column("PerformedProcedureStepStartTime", sa.String(16)))
    op.create_index("ix_series_modality_study", "series", ["Modality", "study_id"])

    op.create_table(
        "patient_name_keys",
        sa.Column("key", NAME_KEY, primary_key=True),
        sa.Column(
            "patient_id",
            sa.Integer,
            sa.ForeignKey("patients.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_patient_name_keys_patient", "patient_name_keys", ["patient_id"])

    op.create_table(
        "series_requests",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "series_id",
            sa.Integer,
            sa.ForeignKey("series.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("ScheduledProcedureStepID", sa.String(64)),
        sa.Column("RequestedProcedureID", sa.String(64)),
    )
    op.create_index("ix_series_requests_series", "series_requests", ["series_id"])

    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.create_index(
            "ix_patients_patient_id_pattern",
            "patients",
            ["PatientID"],
            postgresql_ops={"PatientID": "varchar_pattern_ops"},
        )
        op.create_index(
            "ix_studies_accession_pattern",
            "studies",
            ["AccessionNumber"],
            postgresql_ops={"AccessionNumber": "varchar_pattern_ops"},
        )
    _backfill(bind)


def _backfill(bind: sa.engine.Connection) -> None:
    """Fill the derived data for what 0001/0002 indexed (same rules as refresh_derived)."""
    bind.execute(
        sa.text(
            'UPDATE series SET "NumberOfSeriesRelatedInstances" = '
            '(SELECT count(DISTINCT i."SOPInstanceUID") FROM instances i '
            "WHERE i.series_id = series.id)"
        )
    )
    bind.execute(
        sa.text(
            'UPDATE studies SET "NumberOfStudyRelatedSeries" = '
            "(SELECT count(*) FROM series s WHERE s.study_id = studies.id), "
            '"NumberOfStudyRelatedInstances" = (SELECT coalesce(sum('
            's."NumberOfSeriesRelatedInstances"), 0) FROM series s WHERE s.study_id = studies.id)'
        )
    )
    modalities: dict[int, set[str]] = defaultdict(set)
    for study_id, modality in bind.execute(
        sa.text('SELECT DISTINCT study_id, "Modality" FROM series WHERE "Modality" IS NOT NULL')
    ):
        modalities[study_id].add(modality)
    rows = [{"i": k, "m": "\\".join(sorted(v))[:200]} for k, v in modalities.items()]
    for start in range(0, len(rows), BATCH):
        bind.execute(
            sa.text('UPDATE studies SET "ModalitiesInStudy" = :m WHERE id = :i'),
            rows[start : start + BATCH],
        )
    names = bind.execute(sa.text('SELECT id, "PatientName" FROM patients')).all()
    updates: list[dict[str, object]] = []
    keys: list[dict[str, object]] = []
    for patient_id, name in names:
        value = name_search_keys(name)
        updates.append({"i": patient_id, "v": value})
        keys.extend({"k": k, "p": patient_id} for k in split_keys(value))
    for start in range(0, len(updates), BATCH):
        bind.execute(
            sa.text("UPDATE patients SET name_search = :v WHERE id = :i"),
            updates[start : start + BATCH],
        )
    for start in range(0, len(keys), BATCH):
        bind.execute(
            sa.text("INSERT INTO patient_name_keys (key, patient_id) VALUES (:k, :p)"),
            keys[start : start + BATCH],
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.drop_index("ix_studies_accession_pattern", table_name="studies")
        op.drop_index("ix_patients_patient_id_pattern", table_name="patients")
    op.drop_table("series_requests")
    op.drop_table("patient_name_keys")
    op.drop_index("ix_series_modality_study", table_name="series")
    # Plain DROP COLUMN (SQLite >= 3.35 has it): a batch copy of series or studies would
    # drop tables that instances and series still reference.
    for column in (
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepStartDate",
        "NumberOfSeriesRelatedInstances",
    ):
        op.drop_column("series", column)
    for column in (
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
    ):
        op.drop_column("studies", column)
