"""FederationTokenRepository: the SQL over ``federation_patient_tokens`` (peers' patient tokens)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from imaging_gateway.index.schema import federation_patient_tokens, patients

_NEWEST_PATIENT: Final = sa.select(sa.func.max(patients.c.id))
_NEWEST_TOKENED: Final = sa.select(sa.func.max(federation_patient_tokens.c.patient_id))


class FederationTokenRepository:
    """Statements over the keyed patient tokens peers match on; the gate computes the tokens.

    Every method runs on the caller's connection and never commits.
    """

    @staticmethod
    async def newest_patient(conn: AsyncConnection) -> int:
        """The highest patient row id (0 for an empty index)."""
        return int((await conn.execute(_NEWEST_PATIENT)).scalar() or 0)

    @staticmethod
    async def newest_tokened(conn: AsyncConnection) -> int | None:
        """The highest patient row id that has a token row, or None when none has."""
        newest: int | None = (await conn.execute(_NEWEST_TOKENED)).scalar()
        return newest

    @staticmethod
    async def patients_after(
        conn: AsyncConnection, after: int, *, limit: int
    ) -> Sequence[sa.Row[int, str, str | None, str | None]]:
        """Up to ``limit`` patient rows with id > ``after``, in id order: (id, patient_key,
        national_id, national_id_bidx) each."""
        return (
            await conn.execute(
                sa.select(
                    patients.c.id,
                    patients.c.patient_key,
                    patients.c.national_id,
                    patients.c.national_id_bidx,
                )
                .where(patients.c.id > after)
                .order_by(patients.c.id)
                .limit(limit)
            )
        ).all()

    @staticmethod
    async def insert(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert token rows (patient_id, patient_key, national_id, token); a row already
        there raises ``IntegrityError`` (another gateway process added it first)."""
        await conn.execute(federation_patient_tokens.insert(), rows)
