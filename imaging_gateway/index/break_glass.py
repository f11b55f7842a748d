"""BreakGlassRepository: the SQL over the ``break_glass`` table (emergency access windows)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from imaging_gateway.index.schema import break_glass, patients


class BreakGlassRepository:
    """Statements over emergency windows; the gate decides who may open one and for whom.

    Every method runs on the caller's connection and never commits: a window and its
    audit record are written in one transaction the caller owns.
    """

    @staticmethod
    async def open_window(
        conn: AsyncConnection,
        *,
        window_id: str,
        subject: str,
        hospital: str | None,
        patient_id: int,
        study_uid: str | None,
        reason: str | None,
        opened_at: datetime,
        expires_at: datetime,
    ) -> None:
        """Record a window for one patient row (``study_uid`` None when opened by a search)."""
        await conn.execute(
            break_glass.insert().values(
                id=window_id,
                subject=subject,
                hospital=hospital,
                patient_id=patient_id,
                StudyInstanceUID=study_uid,
                reason=reason,
                opened_at=opened_at,
                expires_at=expires_at,
            )
        )

    @staticmethod
    async def opened_since(
        conn: AsyncConnection, since: datetime, *, limit: int
    ) -> Sequence[RowMapping]:
        """Windows opened since ``since``, newest first, with their patient row's
        ``national_id`` (sealed in an encrypted index) and ``patient_key``."""
        q = (
            sa.select(
                break_glass.c.id,
                break_glass.c.subject,
                break_glass.c.hospital,
                break_glass.c.StudyInstanceUID,
                break_glass.c.reason,
                break_glass.c.opened_at,
                break_glass.c.expires_at,
                patients.c.national_id,
                patients.c.patient_key,
            )
            .select_from(break_glass.join(patients, patients.c.id == break_glass.c.patient_id))
            .where(break_glass.c.opened_at >= since)
            .order_by(break_glass.c.opened_at.desc())
            .limit(limit)
        )
        return (await conn.execute(q)).mappings().all()
