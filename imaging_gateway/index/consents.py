"""ConsentRepository: the SQL over the ``consents`` table (the gate decides who may use it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from imaging_gateway.index.schema import consents


class ConsentRepository:
    """Statements over stored grants; rows as stored (sealed cells still sealed).

    Every method runs on the caller's connection and never commits: a grant and its audit
    record are written in one transaction the caller owns.
    """

    async def insert(self, conn: AsyncConnection, row: Mapping[str, Any]) -> None:
        """Store one grant row (already sealed when the index is encrypted)."""
        await conn.execute(consents.insert().values(**row))

    async def by_id(self, conn: AsyncConnection, consent_id: str) -> RowMapping | None:
        """The stored row of one grant, or None."""
        result = await conn.execute(sa.select(consents).where(consents.c.id == consent_id))
        return result.mappings().first()

    async def newest(
        self,
        conn: AsyncConnection,
        *,
        patient_column: Literal["national_id", "national_id_bidx"] | None = None,
        patient: str | None = None,
        grantee_hospital: str | None = None,
        limit: int = 200,
    ) -> Sequence[RowMapping]:
        """Stored grants, newest first; of one patient when ``patient_column`` is given
        (the plain identity, or its blind index on an encrypted index), to one grantee."""
        q = sa.select(consents).order_by(consents.c.created_at.desc()).limit(limit)
        if patient_column is not None:
            q = q.where(consents.c[patient_column] == patient)
        if grantee_hospital is not None:
            q = q.where(consents.c.grantee_hospital == grantee_hospital)
        return (await conn.execute(q)).mappings().all()

    async def revoke(
        self, conn: AsyncConnection, consent_id: str, *, by: str, now: datetime
    ) -> None:
        """Mark a grant revoked unless it already is (the first revocation stands)."""
        await conn.execute(
            consents.update()
            .where(consents.c.id == consent_id, consents.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=by)
        )
