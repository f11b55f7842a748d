"""Access control and audit: study ownership, name search keys, consents, break-glass, audit log.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UID = sa.String(64)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("name_search", sa.Text))
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("hospital", sa.String(32)))
    op.create_index("ix_studies_hospital", "studies", ["hospital"])

    op.create_table(
        "consents",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("national_id", sa.String(18), nullable=False),
        sa.Column("grantee_hospital", sa.String(32), nullable=False),
        sa.Column("grantee_clinician", sa.String(128)),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("valid_from", TS, nullable=False),
        sa.Column("valid_until", TS, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS),
        sa.Column("revoked_by", sa.String(128)),
    )
    op.create_index("ix_consents_patient", "consents", ["national_id"])
    op.create_index("ix_consents_grantee", "consents", ["grantee_hospital", "national_id"])

    op.create_table(
        "break_glass",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("hospital", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("StudyInstanceUID", UID, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("opened_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_break_glass_hospital", "break_glass", ["hospital", "expires_at"])

    op.create_table(
        "audit_log",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("hospital", sa.String(32)),
        sa.Column("patient_token", sa.String(64)),
        sa.Column("StudyInstanceUID", UID),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("purpose", sa.String(64)),
        sa.Column("break_glass_reason", sa.Text),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64)),
        sa.Column("detail", sa.Text),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_patient", "audit_log", ["patient_token", "seq"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("break_glass")
    op.drop_table("consents")
    op.drop_index("ix_studies_hospital", table_name="studies")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("hospital")
    with op.batch_alter_table("patients") as batch:
        batch.drop_column("name_search")
