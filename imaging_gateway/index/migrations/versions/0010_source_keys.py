"""The object a patient, study or series row took its attributes from.

Revision ID: 0010

Where the objects of one patient (study, series) disagree on an attribute (a name written
in one character set and in two, a corrected birth date), the row holds the values of the
object with the greatest key, as one sync job always gave by writing its pages in key
order. Several sync workers land their slices in any order, so the row records that
object's key (``source_key``) and an object with a smaller key no longer overwrites it: the
index two workers build is the one a single worker builds. Rows from before keep a null
``source_key`` (any object may set them, as before).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

KEY = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")
TABLES = ("patients", "studies", "series")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("source_key", KEY))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35 has it): a batch copy would drop tables that
    # others still reference.
    for table in TABLES:
        op.drop_column(table, "source_key")
