"""State that authorization decisions depend on, in the index so every gateway process shares it.

Three small tables (migration 0008), each written with one atomic statement per step, on
SQLite (one gateway process) and PostgreSQL (any number of them):

- the peer assertion ids already used: inserting one is the check (a unique key,
  ``INSERT .. ON CONFLICT DO NOTHING``), so a replay sent to another process fails too;
- the remote studies a hospital located by federated search (what its retrieves through
  this gateway may ask for), with an expiry;
- the refused-token flood counters: one audit record per client address and reason per
  window, the refusals in between counted by ``count = count + 1``.

Expired rows are pruned as new ones are written. Raises ``IndexUnavailable`` when the
index cannot be reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imaging_gateway.index.schema import (
    federation_assertion_ids,
    federation_located_studies,
    refusal_counters,
)
from imaging_gateway.index.unreachable import unreachable

__all__ = ["SharedState"]

_KEEP_COUNTERS: Final = timedelta(days=1)
"""A refusal counter whose window ended this long ago is dropped, whatever it counted."""
_SOURCE_LEN: Final = 64
_REASON_LEN: Final = 240

_ids = federation_assertion_ids
_located = federation_located_studies
_refusals = refusal_counters


class SharedState:
    """The shared authorization state of one index (see the module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    # -- assertion ids (replay) ------------------------------------------------------

    async def first_use(self, key: str, *, expires_at: datetime, now: datetime) -> bool:
        """Record an assertion id until ``expires_at``; False when it is recorded already.

        One insert decides, whichever process asks first: the id is the primary key.
        Ids whose ``expires_at`` has passed are pruned first (a replay of an expired
        assertion is refused by its ``exp`` before it gets here).
        """
        stmt = (
            self._insert(_ids)
            .values(key=key, expires_at=expires_at)
            .on_conflict_do_nothing(index_elements=[_ids.c.key])
        )
        with unreachable():
            async with self.engine.begin() as conn:
                await conn.execute(sa.delete(_ids).where(_ids.c.expires_at < now))
                result = await conn.execute(stmt)
        return result.rowcount == 1

    # -- located studies ---------------------------------------------------------------

    async def remember_located(
        self,
        hospital: str,
        province: str,
        study_uids: Sequence[str],
        caller: str,
        *,
        expires_at: datetime,
        now: datetime,
    ) -> None:
        """Remember that ``hospital`` located these studies of ``province`` (``caller``:
        the JSON the retrieve asks as), until ``expires_at``; a newer search replaces it."""
        if not study_uids:
            return
        stmt = self._insert(_located)
        stmt = stmt.on_conflict_do_update(
            index_elements=[_located.c.hospital, _located.c.province,
                            _located.c.StudyInstanceUID],
            set_={"caller": stmt.excluded.caller, "expires_at": stmt.excluded.expires_at},
        )  # fmt: skip
        rows = [
            {"hospital": hospital, "province": province, "StudyInstanceUID": uid,
             "caller": caller, "expires_at": expires_at}
            for uid in dict.fromkeys(study_uids)
        ]  # fmt: skip
        with unreachable():
            async with self.engine.begin() as conn:
                await conn.execute(sa.delete(_located).where(_located.c.expires_at < now))
                await conn.execute(stmt, rows)

    async def located(
        self, hospital: str, province: str, study_uid: str, *, now: datetime
    ) -> str | None:
        """The caller JSON of ``hospital``'s unexpired find of this study, or None."""
        query = sa.select(_located.c.caller).where(
            _located.c.hospital == hospital,
            _located.c.province == province,
            _located.c.StudyInstanceUID == study_uid,
            _located.c.expires_at >= now,
        )
        with unreachable():
            async with self.engine.connect() as conn:
                return (await conn.execute(query)).scalar()

    # -- refused-token counters ----------------------------------------------------------

    async def count_refusal(
        self, source: str | None, reason: str, *, now: datetime, window: timedelta
    ) -> int | None:
        """Count one refusal; None when its window already has a record, else the number
        of refusals counted since the last record (0 for the first).

        Each step is one atomic statement, so two processes counting the same refusal at
        once give one record between them: counted inside an open window; else claim the
        ended window (the claim returns what it counted); else insert the first row (the
        loser of an insert race counts again).
        """
        key = (
            _refusals.c.source == (source or "")[:_SOURCE_LEN],
            _refusals.c.reason == reason[:_REASON_LEN],
        )
        opened = now - window
        with unreachable():
            async with self.engine.begin() as conn:
                for _ in range(3):
                    counted = await conn.execute(
                        sa.update(_refusals)
                        .where(*key, _refusals.c.window_start > opened)
                        .values(count=_refusals.c.count + 1)
                    )
                    if counted.rowcount:
                        return None
                    claimed = (
                        await conn.execute(
                            sa.update(_refusals)
                            .where(*key, _refusals.c.window_start <= opened)
                            .values(window_start=now, count=0, reported=_refusals.c.count)
                            .returning(_refusals.c.reported)
                        )
                    ).scalar()
                    if claimed is not None:
                        return int(claimed)
                    if await self._first_refusal(conn, source, reason, now=now, window=window):
                        return 0
        return None  # pragma: no cover - three lost races in a row: counted by another

    async def _first_refusal(
        self,
        conn: AsyncConnection,
        source: str | None,
        reason: str,
        *,
        now: datetime,
        window: timedelta,
    ) -> bool:
        """Insert a key's first counter; False when another process inserted it first."""
        # Nothing left to report, or reported long ago: bounded by the clients that
        # were refused in the last day, not by every client ever refused.
        await conn.execute(
            sa.delete(_refusals).where(
                sa.or_(
                    sa.and_(_refusals.c.count == 0, _refusals.c.window_start <= now - window),
                    _refusals.c.window_start < now - window - _KEEP_COUNTERS,
                )
            )
        )
        inserted = await conn.execute(
            self._insert(_refusals)
            .values(source=(source or "")[:_SOURCE_LEN], reason=reason[:_REASON_LEN],
                    window_start=now, count=0, reported=0)
            .on_conflict_do_nothing(index_elements=[_refusals.c.source, _refusals.c.reason])
        )  # fmt: skip
        return inserted.rowcount == 1

