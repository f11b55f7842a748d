"""State that authorization depends on, shared by every gateway process of a province.

Federated retrieves' located studies, the assertion ids already used (replay), and the
refused-token flood counters, which each process used to hold in its own memory: with
two processes behind a load balancer a retrieve 404'd at random and a replayed
assertion passed on the other process (issue 16).

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federation_assertion_ids",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_federation_assertion_ids_expires", "federation_assertion_ids", ["expires_at"]
    )
    op.create_table(
        "federation_located_studies",
        sa.Column("hospital", sa.String(32), primary_key=True),
        sa.Column("province", sa.String(6), primary_key=True),
        sa.Column("StudyInstanceUID", sa.String(64), primary_key=True),
        sa.Column("caller", sa.Text, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_federation_located_studies_expires", "federation_located_studies", ["expires_at"]
    )
    op.create_table(
        "refusal_counters",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("reason", sa.String(240), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("reported", sa.Integer, nullable=False),
    )
    op.create_index("ix_refusal_counters_window", "refusal_counters", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_refusal_counters_window", "refusal_counters")
    op.drop_table("refusal_counters")
    op.drop_index("ix_federation_located_studies_expires", "federation_located_studies")
    op.drop_table("federation_located_studies")
    op.drop_index("ix_federation_assertion_ids_expires", "federation_assertion_ids")
    op.drop_table("federation_assertion_ids")
