"""The attribute table drives the index: migrated schema, header reads, upserts, QIDO, DICOM JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.domain.attributes import TABLE, header_attributes
from imaging_gateway.domain.qido import parse_qido
from imaging_gateway.index import schema
from imaging_gateway.index.qido import search
from imaging_gateway.index.sql import IndexedObject, SqlIndex
from tests.factories import dataset_bytes, minimal_dataset

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_ATTRIBUTE_TABLES = ("patients", "studies", "series", "instances", "series_requests")
_HEADER_ATTRIBUTES = [
    a for level in ("patient", "study", "series", "instance") for a in header_attributes(level)
]


def _kind(column_type: Any, dialect: str) -> tuple[str, int | None]:
    """A column type as the database holds it: integer, VARCHAR(n) or TEXT. SQLite does
    not enforce lengths (every string has TEXT affinity), so 0006 widened the sealed
    columns to TEXT on PostgreSQL only: there a string is just text."""
    if isinstance(column_type, sa.Integer):
        return ("int", None)
    if isinstance(column_type, sa.String) and column_type.length and dialect != "sqlite":
        return ("varchar", column_type.length)
    if isinstance(column_type, sa.String):
        return ("text", None)
    return (type(column_type).__name__.lower(), None)


async def test_migrated_schema_has_exactly_the_columns_the_table_derives(index: SqlIndex) -> None:
    """The Alembic migrations (written by hand) and the attribute table agree, column by
    column: every derived attribute column exists with its type, nullability and
    uniqueness, and the tables hold no column the metadata does not (so no attribute
    column is missing from the table either)."""

    dialect = index.engine.dialect.name

    def reflect(sync_conn: sa.Connection) -> dict[str, Any]:
        inspector = sa.inspect(sync_conn)
        out: dict[str, Any] = {}
        for name in _ATTRIBUTE_TABLES:
            uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)}
            uniques |= {
                tuple(i["column_names"]) for i in inspector.get_indexes(name) if i["unique"]
            }
            out[name] = (
                {c["name"]: (_kind(c["type"], dialect), c["nullable"]) for c in inspector.get_columns(name)},
                uniques,
            )
        return out

    async with index.engine.connect() as conn:
        migrated = await conn.run_sync(reflect)
    derived_somewhere = set()
    for name in _ATTRIBUTE_TABLES:
        columns, uniques = migrated[name]
        table = schema.metadata.tables[name]
        assert set(columns) == {c.name for c in table.c}, name
        for column in schema.attribute_columns(name):
            derived_somewhere.add((name, column.name))
            assert columns[column.name] == (_kind(column.type, dialect), column.nullable), (
                name,
                column.name,
            )
            assert ((column.name,) in uniques) == bool(column.unique), (name, column.name)
    stored = {(a.table, a.column) for a in TABLE if a.column is not None}
    blind = {(a.table, a.blind_index) for a in TABLE if a.blind_index is not None}
    assert derived_somewhere == stored | blind


async def test_every_header_attribute_is_read_stored_matched_and_returned(
    index: SqlIndex,
) -> None:
    """For each header attribute of the table: one object that has it is parsed, indexed,
    found by matching on it alone (at its level, by single value) and returned with it,
    emitted in DICOM JSON under its tag with the table's VR. Nothing here names an
    attribute: a new table entry is covered as soon as the test dataset carries it."""
    ds = minimal_dataset(NumberOfFrames=1)
    data = dataset_bytes(ds)
    header = parse_header(data, complete=True)
    assert header.warnings == ()
    job = await index.create_job("s1", "full")
    await index.apply_page(
        store="s1", province="110000", job_id=job.id, cursor=None, counters={},
        indexed=[IndexedObject("a/1.dcm", "e1", len(data), T0, header, "d" * 64)],
        quarantined=[], deleted=[],
    )  # fmt: skip
    for a in _HEADER_ATTRIBUTES:
        value = header.value(a)
        assert value not in (None, ""), f"the test dataset has no {a.keyword}"
        if a.matching is None:
            continue
        # The stored value as a single-value matching key (PS3.4 C.2.2.2.1).
        query = parse_qido(a.search_level, {a.keyword: str(value)})
        assert query.matches and query.matches[0].kind == "single", a.keyword
        page = await search(index.engine, query, visible=sa.true(), max_results=10)
        assert len(page.rows) == 1, a.keyword
        assert page.rows[0][a.keyword] == value, a.keyword
        emitted = to_dicom_json(
            a.search_level, page.rows, includefield=query.requested, retrieve_base="http://x"
        )[0]
        element = emitted[f"{a.tag:08X}"]
        assert element["vr"] == a.vr, a.keyword
        assert element["Value"], a.keyword


# Run in a fresh interpreter: the table is extended before any module derives from it.
_ADDED_ALONE = textwrap.dedent(
    """
    import asyncio, json, sys
    from datetime import UTC, datetime

    import imaging_gateway.domain.attributes as attributes

    # A series attribute the index does not hold: one entry, nothing else.
    added = attributes._a("StationName", "SH", "series", length=16, matching="wildcard",
                          returned="series")
    attributes.TABLE = (*attributes.TABLE, added)
    attributes.BY_KEYWORD = {a.keyword: a for a in attributes.TABLE}
    attributes.ATTRIBUTES = {a.keyword: a for a in attributes.TABLE if a.sequence is None}

    import sqlalchemy as sa
    from imaging_gateway.dicom.dicomjson import to_dicom_json
    from imaging_gateway.dicom.headers import parse_header
    from imaging_gateway.domain.qido import DEFAULT_RETURN, parse_qido
    from imaging_gateway.index.qido import search
    from imaging_gateway.index.sql import IndexedObject, SqlIndex
    from imaging_gateway.settings import IndexSettings
    from tests.factories import dataset_bytes, minimal_dataset

    async def main(path: str) -> dict:
        index = await SqlIndex.open(IndexSettings(url=f"sqlite:///{path}"))
        try:
            async with index.engine.begin() as conn:
                # What the new attribute's migration would do.
                await conn.execute(sa.text('ALTER TABLE series ADD COLUMN "StationName" VARCHAR(16)'))
            data = dataset_bytes(minimal_dataset(StationName="CT07"))
            header = parse_header(data, complete=True)
            job = await index.create_job("s1", "full")
            await index.apply_page(
                store="s1", province="110000", job_id=job.id, cursor=None, counters={},
                indexed=[IndexedObject("a/1.dcm", "e1", len(data),
                                       datetime(2026, 1, 2, tzinfo=UTC), header, "d" * 64)],
                quarantined=[], deleted=[])
            found = await search(index.engine, parse_qido("series", {"StationName": "CT0*"}),
                                 visible=sa.true(), max_results=10)
            missed = await search(index.engine, parse_qido("series", {"StationName": "MR*"}),
                                  visible=sa.true(), max_results=10)
            default = await search(index.engine, parse_qido("series", {}),
                                   visible=sa.true(), max_results=10)
            emitted = to_dicom_json("series", default.rows, includefield=(),
                                    retrieve_base="http://x")
            return {
                "extra": [list(e) for e in header.extra],
                "found": [r.get("StationName") for r in found.rows],
                "missed": len(missed.rows),
                "default_return": "StationName" in DEFAULT_RETURN["series"],
                "json": emitted[0].get("00081010"),
            }
        finally:
            await index.close()

    print(json.dumps(asyncio.run(main(sys.argv[1]))))
    """
)


def test_an_attribute_added_to_the_table_alone_is_read_stored_matched_and_returned(
    tmp_path: Path,
) -> None:
    """The point of the table: one new entry (here StationName, series level, wildcard
    matching, returned by default) and its column are all it takes. No record field, no
    upsert, QIDO or DICOM JSON code names it, and still the header read keeps it, the
    sync stores it, a search matches it by wildcard and returns it by default, under its
    tag with its VR."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _ADDED_ALONE, str(tmp_path / "index.sqlite3")],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "extra": [["StationName", "CT07"]],
        "found": ["CT07"],
        "missed": 0,
        "default_return": True,
        "json": {"vr": "SH", "Value": ["CT07"]},
    }
