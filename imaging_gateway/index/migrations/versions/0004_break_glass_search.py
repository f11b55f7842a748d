"""Break-glass opened from a search: break_glass.StudyInstanceUID may be empty.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("break_glass") as batch:
        batch.alter_column("StudyInstanceUID", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    # A window opened from a search has no study; it is closed (deleted) on the way down.
    op.execute(sa.text('DELETE FROM break_glass WHERE "StudyInstanceUID" IS NULL'))
    with op.batch_alter_table("break_glass") as batch:
        batch.alter_column("StudyInstanceUID", existing_type=sa.String(64), nullable=False)
