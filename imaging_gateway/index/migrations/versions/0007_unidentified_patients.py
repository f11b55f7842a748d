"""Studies without a usable PatientID: a patient of their own, per study.

Revision ID: 0007

Until 0007 every study whose objects carry no PatientID (missing, empty or blank) joined
one patient per issuer, institution or store (key ``<scope>|``), whose name, birth date
and national identity were the last writer's: a study showed another person's name and
a consent, break-glass window or federation token for that "patient" reached them all.
The index now keys such a study's patient ``|study:<StudyInstanceUID>``
(imaging_gateway.index.sql.patient_key). Here each plain-index patient with a blank
PatientID is split: a single study keeps the row (re-keyed); several studies each get a
new patient row without name, birth date, sex or national identity (which of them the
merged values belonged to is unknown; ``sync --full`` reads them again), and the merged
row is removed, or where a break-glass record names it, kept without name, birth date,
sex or national identity and without studies. In an
encrypted index PatientID is sealed, so nothing can be found here without the keys: a
full sync moves each study to its own patient there. Downgrade keeps the split.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

UNIDENTIFIED_PREFIX = "|study:"  # as imaging_gateway.index.sql.UNIDENTIFIED_PREFIX

meta = sa.MetaData()
patients = sa.Table(
    "patients",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("patient_key", sa.String(200)),
    sa.Column("PatientID", sa.Text),
    sa.Column("IssuerOfPatientID", sa.String(64)),
    sa.Column("PatientName", sa.Text),
    sa.Column("PatientBirthDate", sa.Text),
    sa.Column("PatientSex", sa.String(16)),
    sa.Column("national_id", sa.Text),
    sa.Column("name_search", sa.Text),
)
studies = sa.Table(
    "studies",
    meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("StudyInstanceUID", sa.String(64)),
    sa.Column("patient_id", sa.Integer),
)
break_glass = sa.Table("break_glass", meta, sa.Column("patient_id", sa.Integer))
tokens = sa.Table(
    "federation_patient_tokens",
    meta,
    sa.Column("patient_id", sa.Integer),
    sa.Column("patient_key", sa.String(200)),
)
name_keys = sa.Table("patient_name_keys", meta, sa.Column("patient_id", sa.Integer))


def upgrade() -> None:
    conn = op.get_bind()
    p = patients.c
    # A sealed PatientID is never blank, so this finds plain rows only.
    merged = conn.execute(
        sa.select(p.id, p.IssuerOfPatientID).where(
            sa.func.trim(p.PatientID) == "", ~p.patient_key.startswith(UNIDENTIFIED_PREFIX)
        )
    ).all()
    for patient_id, issuer in merged:
        uids = conn.execute(
            sa.select(studies.c.id, studies.c.StudyInstanceUID)
            .where(studies.c.patient_id == patient_id)
            .order_by(studies.c.id)
        ).all()
        if len(uids) == 1:
            key = UNIDENTIFIED_PREFIX + uids[0][1]
            conn.execute(patients.update().where(p.id == patient_id).values(patient_key=key))
            conn.execute(
                tokens.update().where(tokens.c.patient_id == patient_id).values(patient_key=key)
            )
            continue
        for study_id, uid in uids:
            row: dict[str, Any] = {
                "patient_key": UNIDENTIFIED_PREFIX + uid,
                "PatientID": "",
                "IssuerOfPatientID": issuer,
            }
            new_id = conn.execute(patients.insert().values(**row).returning(p.id)).scalar_one()
            conn.execute(studies.update().where(studies.c.id == study_id).values(patient_id=new_id))
        conn.execute(tokens.delete().where(tokens.c.patient_id == patient_id))
        conn.execute(name_keys.delete().where(name_keys.c.patient_id == patient_id))
        named = conn.execute(
            sa.select(sa.literal(1)).where(break_glass.c.patient_id == patient_id).limit(1)
        ).first()
        if named is None:
            conn.execute(patients.delete().where(p.id == patient_id))
        else:
            # Kept for the break-glass report; it names nobody and reaches no study.
            conn.execute(patients.update().where(p.id == patient_id).values(**_FORGOTTEN))


_FORGOTTEN: dict[str, Any] = {
    "PatientName": None,
    "PatientBirthDate": None,
    "PatientSex": None,
    "national_id": None,
    "name_search": None,
}


def downgrade() -> None:
    pass
