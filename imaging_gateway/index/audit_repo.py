"""AuditRepository: the SQL over the hash-chained ``audit_log`` table (audit.py chains it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from imaging_gateway.index.schema import audit_log

# Key of the PostgreSQL transaction-level advisory lock that serializes appends (any
# constant works; it only has to be the same in every gateway process on the database).
CHAIN_LOCK: Final = 0x6175_6469_745F_6C67  # b"audit_lg"

ROW_COLUMNS: Final = tuple(c.name for c in audit_log.c)
"""A record row's columns (seq, at, the fields, prev_hash, hash), as the inserts take them."""

# Built once (SQLAlchemy then reuses their compiled form without rebuilding cache keys).
_INSERT: Final = audit_log.insert()
_HEAD: Final = (
    sa.select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
)
_HASH_AT: Final = sa.select(audit_log.c.hash).where(audit_log.c.seq == sa.bindparam("seq"))
_SQLITE_WRITE_LOCK: Final = audit_log.update().where(sa.false()).values(seq=audit_log.c.seq)
_PG_LOCK: Final = sa.select(sa.func.pg_advisory_xact_lock(CHAIN_LOCK))
# SQLite: the first record of an append in one statement, written only if the newest
# record is still (seq - 1, prev_hash) as this process last saw it. The insert takes the
# database's write lock before its condition is read, so the check cannot go stale.
_INSERT_ON_HEAD: Final = audit_log.insert().from_select(
    list(ROW_COLUMNS),
    sa.select(*(sa.bindparam(c, type_=audit_log.c[c].type) for c in ROW_COLUMNS)).where(
        sa.select(sa.func.max(audit_log.c.seq)).scalar_subquery()
        == sa.bindparam("head_seq", type_=audit_log.c.seq.type),
        sa.select(audit_log.c.hash)
        .where(audit_log.c.seq == sa.bindparam("head_seq"))
        .scalar_subquery()
        == sa.bindparam("prev_hash"),
    ),
)

# PostgreSQL, on a connection in autocommit mode: all records of an append in one
# statement (so one implicit transaction, atomic), written only if the newest record is
# still (head_seq, prev_hash) as this process last saw it. The advisory lock is taken
# while the statement runs, after its snapshot: if another writer appended meanwhile,
# the snapshot still shows the old head and the insert collides with that writer's
# record on the primary key, which aborts the whole statement; either way nothing is
# written and the caller takes the slow path. A fork cannot be written.
_PG_ROWS: Final = (
    sa.func.unnest(
        *(
            # Text, not VARCHAR(n): a cast to VARCHAR(n) would truncate silently, the
            # insert into the column refuses what is too long.
            sa.cast(sa.bindparam(c), postgresql.ARRAY(
                audit_log.c[c].type if c in ("seq", "at") else sa.Text()))
            for c in ROW_COLUMNS
        )
    )
    .table_valued(*ROW_COLUMNS)
    .render_derived(name="r")
)
_PG_INSERT_ON_HEAD: Final = audit_log.insert().from_select(
    list(ROW_COLUMNS),
    sa.select(*(_PG_ROWS.c[c] for c in ROW_COLUMNS))
    .select_from(
        sa.select(sa.func.pg_advisory_xact_lock(sa.bindparam("lock")))
        .subquery("l")
        .join(_PG_ROWS, sa.true())
    )
    .where(
        sa.select(sa.func.max(audit_log.c.seq)).scalar_subquery()
        == sa.bindparam("head_seq", type_=audit_log.c.seq.type),
        sa.select(audit_log.c.hash)
        .where(audit_log.c.seq == sa.bindparam("head_seq"))
        .scalar_subquery()
        == sa.bindparam("head_hash"),
    ),
)
_PATIENT_COLUMNS: Final = (
    audit_log.c.seq,
    audit_log.c.at,
    audit_log.c.subject,
    audit_log.c.role,
    audit_log.c.hospital,
    audit_log.c.action,
    audit_log.c.StudyInstanceUID,
    audit_log.c.purpose,
    audit_log.c.break_glass_reason,
    audit_log.c.outcome,
)


def column_lengths(fields: Iterable[str]) -> dict[str, int | None]:
    """The declared length of each of ``fields``' columns (None for unbounded text)."""
    out: dict[str, int | None] = {}
    for f in fields:
        length = getattr(audit_log.c[f].type, "length", None)
        out[f] = length if isinstance(length, int) else None
    return out


class AuditRepository:
    """Statements over ``audit_log``; the chain (hashes, order, locking policy) is the caller's.

    Every method runs on the caller's connection and never commits; the ``*_on_head``
    inserts write only if the newest record is still the one the caller names.
    """

    def __init__(self, *, postgres: bool) -> None:
        self._postgres = postgres

    async def insert(self, conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert chained record rows (``ROW_COLUMNS``) as they are."""
        await conn.execute(_INSERT, rows)

    async def insert_first_on_head(
        self, conn: AsyncConnection, row: Mapping[str, Any], head_seq: int
    ) -> bool:
        """SQLite: insert ``row`` only if the newest record is ``(head_seq, row's prev_hash)``;
        whether it was written."""
        written = await conn.execute(_INSERT_ON_HEAD, {**row, "head_seq": head_seq})
        return written.rowcount == 1

    async def insert_all_on_head(
        self,
        conn: AsyncConnection,
        rows: Sequence[Mapping[str, Any]],
        head_seq: int,
        head_hash: str,
    ) -> int:
        """PostgreSQL, autocommit connection: insert all ``rows`` in one statement, under the
        chain's advisory lock, only if the newest record is ``(head_seq, head_hash)``.

        Returns how many rows were written (all or none). Raises the driver's errors as
        they come (``IntegrityError`` when another writer took the seq).
        """
        columns: dict[str, Any] = {c: [r[c] for r in rows] for c in ROW_COLUMNS}
        written = await conn.execute(
            _PG_INSERT_ON_HEAD,
            {**columns, "lock": CHAIN_LOCK, "head_seq": head_seq, "head_hash": head_hash},
        )
        return written.rowcount

    async def lock_chain(self, conn: AsyncConnection) -> None:
        """Take the lock that serializes appends until ``conn``'s transaction ends."""
        # On SQLite a write that matches nothing still takes the write lock (the driver
        # opens the transaction before it), so the head read next cannot go stale.
        await conn.execute(_PG_LOCK if self._postgres else _SQLITE_WRITE_LOCK)

    @staticmethod
    async def hash_at(conn: AsyncConnection, seq: int) -> str | None:
        """The hash of record ``seq``, or None when there is none."""
        row = (await conn.execute(_HASH_AT, {"seq": seq})).first()
        return None if row is None else row[0]

    @staticmethod
    async def chain_head(conn: AsyncConnection) -> tuple[int, str] | None:
        """The newest record's ``(seq, hash)``, or None for an empty log."""
        row = (await conn.execute(_HEAD)).first()
        return None if row is None else (int(row[0]), str(row[1]))

    @staticmethod
    async def records_after(
        conn: AsyncConnection,
        seq: int,
        *,
        limit: int,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Sequence[sa.Row[Any]]:
        """Up to ``limit`` whole records after ``seq`` in ``seq`` order, with
        ``since <= at < until`` when given."""
        conditions: list[sa.ColumnElement[bool]] = []
        if since is not None:
            conditions.append(audit_log.c.at >= since)
        if until is not None:
            conditions.append(audit_log.c.at < until)
        q = (
            sa.select(audit_log)
            .where(audit_log.c.seq > seq, *conditions)
            .order_by(audit_log.c.seq)
            .limit(limit)
        )
        return (await conn.execute(q)).all()

    @staticmethod
    async def for_patient(
        conn: AsyncConnection, patient_token: str, *, limit: int, before_seq: int | None
    ) -> Sequence[sa.Row[Any]]:
        """A patient's records, newest first: the columns shown to the patient only."""
        q = (
            sa.select(*_PATIENT_COLUMNS)
            .where(audit_log.c.patient_token == patient_token)
            .order_by(audit_log.c.seq.desc())
            .limit(limit)
        )
        if before_seq is not None:
            q = q.where(audit_log.c.seq < before_seq)
        return cast("Sequence[sa.Row[Any]]", (await conn.execute(q)).all())
