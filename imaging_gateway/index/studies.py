"""StudyRepository: the gate's reads of studies, series, instances, patients (locate, store)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from imaging_gateway.index.schema import instances, patients, series, studies


class StudyRepository:
    """Read statements over the study index that the gate runs before it decides.

    The gate passes its visibility condition (an expression over ``studies`` rows, with
    its parameter values) where a read must show only what the caller may see. Every
    method runs on the caller's connection (within its transaction, if any).
    """

    @staticmethod
    async def locations(
        conn: AsyncConnection,
        visible: ColumnElement[bool],
        values: Mapping[str, Any],
        *,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> Sequence[RowMapping]:
        """The visible instances of a study / series / instance in a stable order: every
        ``instances`` column plus SeriesInstanceUID, SeriesNumber, StudyInstanceUID and
        the patient row's ``national_id`` (sealed in an encrypted index), ``patient_key``."""
        q = (
            sa.select(
                instances,
                series.c.SeriesInstanceUID,
                series.c.SeriesNumber,
                studies.c.StudyInstanceUID,
                patients.c.national_id,
                patients.c.patient_key,
            )
            .select_from(
                instances.join(series, series.c.id == instances.c.series_id)
                .join(studies, studies.c.id == series.c.study_id)
                .join(patients, patients.c.id == studies.c.patient_id)
            )
            .where(studies.c.StudyInstanceUID == study_uid, visible)
            .order_by(
                series.c.SeriesNumber,
                series.c.SeriesInstanceUID,
                instances.c.InstanceNumber,
                instances.c.SOPInstanceUID,
                instances.c.id,
            )
        )
        if series_uid is not None:
            q = q.where(series.c.SeriesInstanceUID == series_uid)
        if sop_uid is not None:
            q = q.where(instances.c.SOPInstanceUID == sop_uid)
        return (await conn.execute(q, dict(values))).mappings().all()

    @staticmethod
    async def study_patient(
        conn: AsyncConnection, study_uid: str
    ) -> tuple[int, str | None, str] | None:
        """The patient row of a study, visible or not: (row id, stored national_id,
        patient_key), or None when no such study is indexed."""
        row = (
            await conn.execute(
                sa.select(studies.c.patient_id, patients.c.national_id, patients.c.patient_key)
                .select_from(studies.join(patients, patients.c.id == studies.c.patient_id))
                .where(studies.c.StudyInstanceUID == study_uid)
            )
        ).first()
        return None if row is None else (row[0], row[1], row[2])

    @staticmethod
    async def patients_where(
        conn: AsyncConnection, condition: ColumnElement[bool], *, issuer: str | None = None
    ) -> Sequence[sa.Row[int, str | None, str, str | None]]:
        """Patient rows matching ``condition`` (and IssuerOfPatientID ``issuer`` when
        given): (id, national_id, patient_key, national_id_bidx) each."""
        q = sa.select(
            patients.c.id,
            patients.c.national_id,
            patients.c.patient_key,
            patients.c.national_id_bidx,
        ).where(condition)
        if issuer is not None:
            q = q.where(patients.c.IssuerOfPatientID == issuer)
        return (await conn.execute(q)).all()

    # -- what a store request would touch ----------------------------------------------

    @staticmethod
    async def study_producer(conn: AsyncConnection, study_uid: str) -> tuple[str | None] | None:
        """(hospital,) of the study with this UID, or None when not indexed."""
        row = (
            await conn.execute(
                sa.select(studies.c.hospital).where(studies.c.StudyInstanceUID == study_uid)
            )
        ).first()
        return None if row is None else (row[0],)

    @staticmethod
    async def series_study(
        conn: AsyncConnection, series_uid: str
    ) -> tuple[str, str | None] | None:
        """(StudyInstanceUID, hospital) of the study holding this series, or None."""
        row = (
            await conn.execute(
                sa.select(studies.c.StudyInstanceUID, studies.c.hospital)
                .select_from(series.join(studies, studies.c.id == series.c.study_id))
                .where(series.c.SeriesInstanceUID == series_uid)
            )
        ).first()
        return None if row is None else (row[0], row[1])

    @staticmethod
    async def patient_elsewhere(
        conn: AsyncConnection, stored_patient_key: str, hospital: str | None
    ) -> bool:
        """Whether the patient row of this (stored) key has a study not of ``hospital``."""
        row = (
            await conn.execute(
                sa.select(sa.literal(1))
                .select_from(patients.join(studies, studies.c.patient_id == patients.c.id))
                .where(
                    patients.c.patient_key == stored_patient_key,
                    studies.c.hospital.is_distinct_from(hospital),
                )
                .limit(1)
            )
        ).first()
        return row is not None

    @staticmethod
    async def copies_of(
        conn: AsyncConnection, sop_uid: str
    ) -> Sequence[sa.Row[str, str, str, int, str, str | None]]:
        """Indexed objects holding this SOP Instance, by (store, key): (store, key, etag,
        size, header_sha256, the study's hospital) each."""
        rows = (
            await conn.execute(
                sa.select(
                    instances.c.store,
                    instances.c.key,
                    instances.c.etag,
                    instances.c.size,
                    instances.c.header_sha256,
                    studies.c.hospital,
                )
                .select_from(
                    instances.join(series, series.c.id == instances.c.series_id).join(
                        studies, studies.c.id == series.c.study_id
                    )
                )
                .where(instances.c.SOPInstanceUID == sop_uid)
                .order_by(instances.c.store, instances.c.key)
            )
        ).all()
        return rows
