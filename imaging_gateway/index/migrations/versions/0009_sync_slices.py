"""Sync work claimed in slices: several sync workers (processes, machines) split one job.

Revision ID: 0009

A job's listing is cut into slices, one listing page each, recorded with the objects the
page listed (so a slice's members do not depend on the store's listing order, which is
byte order on AWS and MinIO but path-segment order on SeaweedFS). A worker claims a
slice with a lease (``claimed_by``, ``lease_until``) that it renews while it works; on
PostgreSQL the claim query skips rows other workers hold (``FOR UPDATE SKIP LOCKED``). A
slice lands with its index rows in one transaction (its checkpoint); one whose lease
expired, or whose worker's session is gone, is claimed again by another worker.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

KEY = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sync_slices",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("sync_jobs.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("after_key", KEY),
        sa.Column("last_key", KEY),
        sa.Column("final", sa.Boolean, nullable=False),
        sa.Column("objects", sa.Text),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("counters", sa.Text),
    )
    op.create_index("ix_sync_slices_job_state", "sync_slices", ["job_id", "state", "seq"])


def downgrade() -> None:
    op.drop_index("ix_sync_slices_job_state", table_name="sync_slices")
    op.drop_table("sync_slices")
