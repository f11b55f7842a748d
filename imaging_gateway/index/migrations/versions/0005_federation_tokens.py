"""Federation: the keyed patient token of each indexed patient (federation_patient_tokens).

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federation_patient_tokens",
        sa.Column("patient_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("patient_key", sa.String(200), nullable=False),
        sa.Column("national_id", sa.String(18)),
        sa.Column("token", sa.String(64), nullable=False),
    )
    op.create_index(
        "ix_federation_patient_tokens_token", "federation_patient_tokens", ["token"]
    )


def downgrade() -> None:
    op.drop_index("ix_federation_patient_tokens_token", "federation_patient_tokens")
    op.drop_table("federation_patient_tokens")
