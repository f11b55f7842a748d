"""Encrypted PHI columns: their data keys, blind-index columns, PHI columns wide enough.

Revision ID: 0006

Adds the table of wrapped index data keys and the blind indexes of
imaging_gateway.crypto.phi (patients.PatientID_bidx and
national_id_bidx, studies.AccessionNumber_bidx, consents.national_id_bidx). On PostgreSQL
the PHI columns become TEXT (a sealed cell is longer than the value; SQLite does not
enforce lengths). Nothing is encrypted here: ``imaging-gateway seal-index`` does that,
resumably, with the keyring at hand (a migration has no keys).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BLIND = sa.String(64)
WIDENED = (
    ("patients", "PatientID", sa.String(64)),
    ("patients", "PatientBirthDate", sa.String(8)),
    ("patients", "national_id", sa.String(18)),
    ("studies", "AccessionNumber", sa.String(64)),
    ("consents", "national_id", sa.String(18)),
)


def upgrade() -> None:
    op.create_table(
        "index_keys",
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("key_id", sa.String(255), nullable=False),
        sa.Column("key_version", sa.BigInteger, nullable=False),
        sa.Column("wrapped", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("patients", sa.Column("PatientID_bidx", BLIND))
    op.add_column("patients", sa.Column("national_id_bidx", BLIND))
    op.create_index("ix_patients_patient_id_bidx", "patients", ["PatientID_bidx"])
    op.create_index("ix_patients_national_id_bidx", "patients", ["national_id_bidx"])
    op.add_column("studies", sa.Column("AccessionNumber_bidx", BLIND))
    op.create_index("ix_studies_accession_bidx", "studies", ["AccessionNumber_bidx"])
    op.add_column("consents", sa.Column("national_id_bidx", BLIND))
    op.create_index(
        "ix_consents_grantee_bidx", "consents", ["grantee_hospital", "national_id_bidx"]
    )
    if op.get_bind().dialect.name == "postgresql":
        for table, column, old in WIDENED:
            op.alter_column(table, column, type_=sa.Text(), existing_type=old)
        op.alter_column(
            "federation_patient_tokens",
            "national_id",
            type_=sa.String(64),
            existing_type=sa.String(18),
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "federation_patient_tokens",
            "national_id",
            type_=sa.String(18),
            existing_type=sa.String(64),
        )
        for table, column, old in WIDENED:
            op.alter_column(table, column, type_=old, existing_type=sa.Text())
    op.drop_index("ix_consents_grantee_bidx", "consents")
    op.drop_column("consents", "national_id_bidx")
    op.drop_index("ix_studies_accession_bidx", "studies")
    op.drop_column("studies", "AccessionNumber_bidx")
    op.drop_index("ix_patients_national_id_bidx", "patients")
    op.drop_index("ix_patients_patient_id_bidx", "patients")
    op.drop_column("patients", "national_id_bidx")
    op.drop_column("patients", "PatientID_bidx")
    op.drop_table("index_keys")
