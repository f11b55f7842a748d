"""A comparable snapshot of an index: every row by natural keys, without ids or timestamps."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from imaging_gateway.index.schema import (
    conflicts,
    instances,
    patients,
    quarantine,
    series,
    studies,
    tombstones,
)
from imaging_gateway.index.sql import SqlIndex


async def dump_index(index: SqlIndex) -> dict[str, list[tuple[Any, ...]]]:
    async with index.engine.connect() as conn:
        async def rows(q: sa.Select[Any]) -> list[tuple[Any, ...]]:
            return sorted(tuple(r) for r in (await conn.execute(q)).all())

        p = patients.c
        st = studies.c
        se = series.c
        i = instances.c
        return {
            "patients": await rows(sa.select(p.patient_key, p.PatientID, p.PatientName,
                                             p.PatientBirthDate, p.PatientSex, p.national_id)),
            "studies": await rows(
                sa.select(st.StudyInstanceUID, p.patient_key, st.StudyDate, st.AccessionNumber,
                          st.StudyDescription, st.institution_code, st.province)
                .join(patients, patients.c.id == st.patient_id)),
            "series": await rows(
                sa.select(se.SeriesInstanceUID, st.StudyInstanceUID, se.Modality, se.SeriesNumber)
                .join(studies, studies.c.id == se.study_id)),
            "instances": await rows(
                sa.select(i.store, i.key, i.etag, i.size, i.SOPInstanceUID, se.SeriesInstanceUID,
                          i.header_sha256, i.TransferSyntaxUID)
                .join(series, series.c.id == i.series_id)),
            "quarantine": await rows(sa.select(quarantine.c.store, quarantine.c.key,
                                               quarantine.c.etag, quarantine.c.reason)),
            "tombstones": await rows(sa.select(tombstones.c.store, tombstones.c.key,
                                               tombstones.c.etag)),
            "conflicts": await rows(sa.select(conflicts.c.SOPInstanceUID, conflicts.c.key,
                                              conflicts.c.other_key, conflicts.c.reason)),
        }
