"""seal-index: encrypt the PHI columns of an existing plain index in place, resumably.

Walks patients, studies, series and consents in primary-key order, a batch per
transaction. Each row's PHI cells are opened (if already sealed: checked against their
row) or taken as they are (plain), and the row is rewritten when anything is not in the
encrypted form under the current index data key: plain cells are sealed (cells of an
older index data key re-sealed), blind indexes filled, the patient key blinded, ``name_search``
cleared and the name keys replaced by their blind indexes, the federation token rows
moved to the blinded key and identity. A batch lands whole or not at all, so a run killed
at any point leaves every row either plain or sealed, and the next run finishes the job;
a run over a sealed index changes nothing (it only checks every cell). A run that
rewrote rows ends by rewriting the database files (SQLite ``VACUUM`` and a WAL
checkpoint, PostgreSQL ``VACUUM FULL`` of the tables it touched), so the plain versions of
the rows are not left in freed pages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from imaging_gateway.crypto.phi import PhiCodec, is_sealed, key_number
from imaging_gateway.index.qido import refresh_patient_names
from imaging_gateway.index.schema import (
    consents,
    federation_patient_tokens,
    patients,
    series,
    studies,
)
from imaging_gateway.index.sql import (
    CONSENT_PHI,
    PATIENT_PHI,
    SERIES_PHI,
    STUDY_PHI,
    SqlIndex,
    consent_cells,
    patient_cells,
    series_cells,
    study_cells,
)

BATCH = 500

Progress = Callable[[str, int], None]
"""Called after each batch with the table and the rows rewritten so far in it."""
CellsOf = Callable[[PhiCodec, str, Mapping[str, str | None]], dict[str, Any]]
"""The stored PHI columns of one row (codec, row identity, plain values)."""


async def seal_index(
    index: SqlIndex, *, batch: int = BATCH, progress: Progress | None = None
) -> dict[str, int]:
    """Bring every PHI cell of ``index`` to the sealed form under its current data key.

    ``index`` is open with its PHI codec (its data keys loaded). Returns the rows
    rewritten per table. Raises ``IntegrityError`` for a sealed cell that does not open
    for its row, and what SQLAlchemy raises.
    """
    phi = index.phi
    if phi is None:
        raise ValueError("seal_index needs an index opened with a PHI codec")
    tables: list[tuple[sa.Table, str, Sequence[str], CellsOf]] = [
        (studies, "StudyInstanceUID", STUDY_PHI, study_cells),
        (series, "SeriesInstanceUID", SERIES_PHI, series_cells),
        (consents, "id", CONSENT_PHI, consent_cells),
    ]
    done = {"patients": await _seal_patients(index, phi, batch, progress)}
    for table, identity, sealed, cells_of in tables:
        done[table.name] = await _seal_rows(
            index, phi, table, identity, sealed, cells_of, batch=batch, progress=progress
        )
    if any(done.values()):
        await _scrub(index)
    return done


async def _scrub(index: SqlIndex) -> None:
    """Rewrite the database files so the rows' old, plain versions are gone from them
    (SQLite keeps freed pages and its WAL; PostgreSQL dead tuples until a VACUUM FULL)."""
    async with index.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if index.dialect == "sqlite":
            await auto.exec_driver_sql("VACUUM")
            await auto.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        for table in ("patients", "patient_name_keys", "studies", "series", "consents",
                      "federation_patient_tokens"):  # fmt: skip
            await auto.exec_driver_sql(f"VACUUM FULL {table}")


def _current(cell: str | None, column: str, current: int | None) -> bool:
    """Whether a cell is null or sealed under the current index data key."""
    return cell is None or (is_sealed(cell) and key_number(cell, column) == current)


def _plain(phi: PhiCodec, cell: str | None, column: str, row: str) -> str | None:
    return phi.open(cell, column=column, row=row) if is_sealed(cell) else cell


async def _seal_patients(
    index: SqlIndex, phi: PhiCodec, batch: int, progress: Progress | None
) -> int:
    cols = [patients.c[c] for c in PATIENT_PHI]
    last, rewritten = 0, 0
    while True:
        current = phi.current
        async with index.engine.begin() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(
                            patients.c.id,
                            patients.c.patient_key,
                            patients.c.PatientID_bidx,
                            patients.c.name_search,
                            *cols,
                        )
                        .where(patients.c.id > last)
                        .order_by(patients.c.id)
                        .limit(batch)
                    )
                )
                .mappings()
                .all()
            )
            if not rows:
                return rewritten
            last = rows[-1]["id"]
            changed: list[int] = []
            for r in rows:
                old_key = r["patient_key"]
                key = phi.patient_key(old_key)
                plain = {c: _plain(phi, r[c], f"patients.{c}", old_key) for c in PATIENT_PHI}
                if (
                    key == old_key
                    and r["PatientID_bidx"] is not None
                    and r["name_search"] is None
                    and all(_current(r[c], f"patients.{c}", current) for c in PATIENT_PHI)
                ):
                    continue
                cells = patient_cells(phi, key, plain)
                await conn.execute(
                    patients.update()
                    .where(patients.c.id == r["id"])
                    .values(patient_key=key, **cells)
                )
                await _move_token_row(conn, r["id"], old_key, plain["national_id"], key, cells)
                changed.append(r["id"])
            if changed:
                await refresh_patient_names(conn, changed, phi=phi)
        rewritten += len(changed)
        if progress is not None:
            progress("patients", rewritten)


async def _move_token_row(
    conn: AsyncConnection,
    patient_id: int,
    old_key: str,
    national_id: str | None,
    key: str,
    cells: Mapping[str, Any],
) -> None:
    """A federation token row that described the plain patient row describes the sealed
    one (blinded key, the identity's blind index); a stale row stays stale."""
    t = federation_patient_tokens
    await conn.execute(
        t.update()
        .where(
            t.c.patient_id == patient_id,
            t.c.patient_key == old_key,
            t.c.national_id == national_id,
        )
        .values(patient_key=key, national_id=cells["national_id_bidx"])
    )


async def _seal_rows(
    index: SqlIndex,
    phi: PhiCodec,
    table: sa.Table,
    identity: str,
    sealed: Sequence[str],
    cells_of: CellsOf,
    *,
    batch: int,
    progress: Progress | None,
) -> int:
    """Seal ``sealed`` columns of ``table``, whose cells are bound to column ``identity``."""
    name = table.name
    blind = [c for c in table.c.keys() if c.endswith("_bidx")]
    pk = table.c.id
    last: Any = None
    rewritten = 0
    while True:
        current = phi.current
        async with index.engine.begin() as conn:
            q = sa.select(pk, table.c[identity], *(table.c[c] for c in [*sealed, *blind]))
            if last is not None:
                q = q.where(pk > last)
            rows = (await conn.execute(q.order_by(pk).limit(batch))).mappings().all()
            if not rows:
                return rewritten
            last = rows[-1]["id"]
            n = 0
            for r in rows:
                row_id = str(r[identity])
                if all(_current(r[c], f"{name}.{c}", current) for c in sealed) and all(
                    r[b] is not None or r[b.removesuffix("_bidx")] is None for b in blind
                ):
                    continue
                plain = {c: _plain(phi, r[c], f"{name}.{c}", row_id) for c in sealed}
                await conn.execute(
                    table.update().where(pk == r["id"]).values(**cells_of(phi, row_id, plain))
                )
                n += 1
        rewritten += n
        if progress is not None:
            progress(name, rewritten)
