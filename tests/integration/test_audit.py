"""The audit log on real SQLite and PostgreSQL: chain, tampering found, atomic with the access."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from imaging_gateway.errors import ConfigError, IndexUnavailable
from imaging_gateway.index.schema import audit_log, sync_jobs
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import (
    ANCHOR_MISSING,
    FIELDS,
    HASH_MISMATCH,
    PREV_MISMATCH,
    SEQUENCE_GAP,
    AuditEvent,
    AuditLog,
    load_chain_key,
    load_or_create_chain_key,
    record_hash,
)
from imaging_gateway.settings import IndexSettings
from tests.support.gateway import cli

KEY = bytes(range(32))
T0 = datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC)


def ev(i: int, **kw: Any) -> AuditEvent:
    """A fully populated event (every field set, so an edit of any field changes a value)."""
    values: dict[str, Any] = {
        "subject": f"pacs-{i}",
        "role": "hospital",
        "action": "retrieve",
        "outcome": "ok",
        "hospital": "H44010600001",
        "patient_token": f"tok-{i % 3}",
        "StudyInstanceUID": f"1.2.826.0.1.{i}",
        "purpose": "treatment",
        "break_glass_reason": f"reason {i}",
        "source": f"10.0.0.{i % 250}",
        "detail": f"instances={i}",
    }
    values.update(kw)
    return AuditEvent(**values)


@pytest.fixture
async def audit(index: SqlIndex) -> AuditLog:
    return AuditLog(index.engine, KEY)


async def fill(audit: AuditLog, n: int) -> None:
    for i in range(1, n + 1):
        await audit.record([ev(i)], at=T0 + timedelta(minutes=i))


async def execute(index: SqlIndex, stmt: Any) -> None:
    async with index.engine.begin() as conn:
        await conn.execute(stmt)


async def row(index: SqlIndex, seq: int) -> dict[str, Any]:
    async with index.engine.connect() as conn:
        r = (await conn.execute(sa.select(audit_log).where(audit_log.c.seq == seq))).one()
    return dict(r._mapping)


def where(seq: int) -> Any:
    return audit_log.update().where(audit_log.c.seq == seq)


# ---------------------------------------------------------------------------
# Appending and verifying


async def test_appended_records_chain_and_verify(index: SqlIndex, audit: AuditLog) -> None:
    assert (await audit.verify()).ok and await audit.head() == (0, "0" * 64)
    await fill(audit, 4)
    await audit.record([ev(5), ev(6, outcome="denied", hospital=None, purpose=None)])
    report = await audit.verify()
    assert report.ok and report.checked == 6 and report.seq is None
    assert await audit.head() == (report.last_seq, report.last_hash) and report.last_seq == 6
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).all()
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert rows[5].hospital is None and rows[5].outcome == "denied"
    at = rows[1].at  # SQLite hands back naive UTC
    assert (at if at.tzinfo else at.replace(tzinfo=UTC)) == T0 + timedelta(minutes=2)


async def test_editing_any_field_of_a_middle_record_is_found_at_that_record(
    index: SqlIndex, audit: AuditLog
) -> None:
    await fill(audit, 9)
    original = await row(index, 5)
    changed: dict[str, Any] = {f: original[f] + "x" for f in FIELDS}
    changed["at"] = original["at"] + timedelta(microseconds=1)
    changed["hospital_null"] = None
    for column, value in changed.items():
        name = "hospital" if column == "hospital_null" else column
        await execute(index, where(5).values({name: value}))
        # batch=4: the record sits in the second batch, after a batch boundary
        report = await audit.verify(batch=4)
        assert (report.ok, report.seq, report.reason) == (False, 5, HASH_MISMATCH), column
        assert (report.checked, report.last_seq) == (4, 4)
        await execute(index, where(5).values({name: original[name]}))
        assert (await audit.verify(batch=4)).ok, column


async def test_recomputing_a_hash_without_the_key_is_found(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 5)
    forger = AuditLog(index.engine, b"not the key, but 32 bytes long!!")
    # A forger edits record 3 and rewrites its hash and the next prev_hash consistently,
    # but with their own key.
    r3 = await row(index, 3)
    values = {f: r3[f] for f in FIELDS} | {"subject": "someone-else"}
    forged = record_hash(b"not the key, but 32 bytes long!!", r3["prev_hash"], 3, T0 + timedelta(minutes=3), values)
    await execute(index, where(3).values(subject="someone-else", hash=forged))
    await execute(index, where(4).values(prev_hash=forged))
    report = await audit.verify()
    assert (report.ok, report.seq, report.reason) == (False, 3, HASH_MISMATCH)
    assert not (await forger.verify()).ok  # and the forger's own key fails at record 1


async def test_a_chain_written_with_another_key_fails(index: SqlIndex) -> None:
    await fill(AuditLog(index.engine, b"\x01" * 32), 3)
    report = await AuditLog(index.engine, KEY).verify()
    assert (report.ok, report.seq, report.reason, report.checked) == (False, 1, HASH_MISMATCH, 0)


async def test_deleting_a_middle_record_is_found_where_it_was(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 8)
    await execute(index, audit_log.delete().where(audit_log.c.seq == 4))
    report = await audit.verify(batch=3)
    assert (report.ok, report.seq, report.reason, report.last_seq) == (False, 5, SEQUENCE_GAP, 3)


async def test_deleting_and_renumbering_is_found(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 6)
    await execute(index, audit_log.delete().where(audit_log.c.seq == 3))
    for seq in (4, 5, 6):  # close the gap, in order so the primary key never collides
        await execute(index, where(seq).values(seq=seq - 1))
    report = await audit.verify()
    assert (report.ok, report.seq, report.reason) == (False, 3, PREV_MISMATCH)


async def test_deleting_the_first_record_is_found(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 3)
    await execute(index, audit_log.delete().where(audit_log.c.seq == 1))
    report = await audit.verify()
    assert (report.ok, report.seq, report.reason, report.checked) == (False, 2, SEQUENCE_GAP, 0)


async def test_swapping_two_records_is_found(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 6)
    r3, r4 = await row(index, 3), await row(index, 4)
    content = [c for c in r3 if c != "seq"]
    # Whole records swapped (hashes travel with them): the links break.
    await execute(index, where(3).values({c: r4[c] for c in content}))
    await execute(index, where(4).values({c: r3[c] for c in content}))
    report = await audit.verify()
    assert (report.ok, report.seq, report.reason) == (False, 3, PREV_MISMATCH)
    # Only the fields swapped (hash columns left in place): the hashes no longer match.
    fields = [*FIELDS, "at"]
    await execute(index, where(3).values({c: r4[c] for c in fields} | {"prev_hash": r3["prev_hash"], "hash": r3["hash"]}))
    await execute(index, where(4).values({c: r3[c] for c in fields} | {"prev_hash": r4["prev_hash"], "hash": r4["hash"]}))
    report = await audit.verify()
    assert (report.ok, report.seq, report.reason) == (False, 3, HASH_MISMATCH)


async def test_truncated_tail_needs_an_anchor(index: SqlIndex, audit: AuditLog) -> None:
    await fill(audit, 5)
    anchor = await audit.head()
    assert (await audit.verify(anchor=anchor)).ok
    await fill(audit, 2)  # the log grows past the anchor: still fine
    assert (await audit.verify(anchor=anchor)).ok
    await execute(index, audit_log.delete().where(audit_log.c.seq >= 4))
    # The documented limit: a truncated chain is still a valid chain...
    truncated = await audit.verify()
    assert truncated.ok and truncated.last_seq == 3
    # ...which the anchor kept outside the database exposes.
    report = await audit.verify(anchor=anchor)
    assert (report.ok, report.seq, report.reason) == (False, 5, ANCHOR_MISSING)


async def test_concurrent_appends_never_fork_the_chain(index: SqlIndex, audit: AuditLog) -> None:
    await asyncio.gather(*(audit.record([ev(i), ev(i + 1000)]) for i in range(50)))
    report = await audit.verify()
    assert report.ok and report.checked == 100 and report.last_seq == 100


async def test_two_writers_and_a_rollback_keep_one_chain(index: SqlIndex) -> None:
    """Two processes' logs on one database (each with its own idea of the newest record),
    an append rolled back after it was written: the chain stays whole."""
    first, second = AuditLog(index.engine, KEY), AuditLog(index.engine, KEY)
    for i in range(6):
        writer = first if i % 3 else second
        await writer.record([ev(i)] if i % 2 else [ev(i), ev(i + 100), ev(i + 200)])
    with pytest.raises(RuntimeError):
        async with index.engine.begin() as conn:
            await first.append(conn, [ev(50)])
            raise RuntimeError("the access failed after its record was appended")
    await first.record([ev(51)])
    await second.record([ev(52), ev(53)])
    report = await first.verify()
    assert report.ok and report.checked == 3 * 3 + 3 + 1 + 2 == report.last_seq


async def test_an_append_after_a_known_head_is_one_statement(index: SqlIndex) -> None:
    audit = AuditLog(index.engine, KEY)
    await audit.record([ev(1)])  # learns the head
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split()[0].upper())

    sa.event.listen(index.engine.sync_engine, "before_cursor_execute", note)
    try:
        await audit.record([ev(2)])
    finally:
        sa.event.remove(index.engine.sync_engine, "before_cursor_execute", note)
    expected = ["INSERT"] if index.engine.dialect.name == "sqlite" else ["SELECT", "SELECT", "INSERT"]
    assert statements == expected
    assert (await audit.verify()).ok


async def _autocommit_append(audit: AuditLog, index: SqlIndex, events: list[AuditEvent]) -> None:
    async with index.search_engine.connect() as conn:
        await audit.append_and_commit(conn, events)


async def test_autocommit_appends_of_two_writers_never_fork(index: SqlIndex) -> None:
    """The search path's appends (one statement on PostgreSQL when the head is known):
    two processes' logs racing on one database, each often holding a stale head, with
    multi-record appends; every record lands once and the chain is whole."""
    first, second = AuditLog(index.engine, KEY), AuditLog(index.engine, KEY)
    await asyncio.gather(*(
        _autocommit_append(first if i % 2 else second, index,
                           [ev(i)] if i % 3 else [ev(i), ev(i + 1000), ev(i + 2000)])
        for i in range(60)
    ))
    # Deterministically stale: the second writer appended after the first's last record.
    await _autocommit_append(first, index, [ev(5000)])
    await _autocommit_append(second, index, [ev(5001)])
    await _autocommit_append(first, index, [ev(5002), ev(5003)])
    report = await first.verify()
    assert report.ok and report.checked == 40 + 20 * 3 + 4 == report.last_seq
    async with index.engine.connect() as conn:
        details = [r[0] for r in await conn.execute(sa.select(audit_log.c.detail))]
    assert len(details) == len(set(details))


async def test_an_autocommit_append_after_a_known_head_is_one_statement(index: SqlIndex) -> None:
    audit = AuditLog(index.engine, KEY)
    await audit.record([ev(1)])  # learns the head
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split()[0].upper())

    engines = {index.engine.sync_engine, index.search_engine.sync_engine}
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", note)
    try:
        await _autocommit_append(audit, index, [ev(2), ev(3)])
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", note)
    # SQLite has no autocommit search engine: the append is its usual one INSERT per batch.
    expected = ["INSERT"] if index.engine.dialect.name == "postgresql" else ["INSERT", "INSERT"]
    assert statements == expected
    assert (await audit.verify()).ok


# ---------------------------------------------------------------------------
# Group commit: concurrent ``record`` calls share the writer's transactions


def _group_log(index: SqlIndex) -> AuditLog:
    """A log as the gateway builds it (PostgreSQL: group commits on the autocommit pool)."""
    return AuditLog(index.engine, KEY, autocommit_engine=index.autocommit_engine)


def _insert_counter(index: SqlIndex) -> tuple[list[str], Any]:
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.split()[0].upper() == "INSERT":
            statements.append(statement)

    engines = {index.engine.sync_engine, index.search_engine.sync_engine}
    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", note)

    def remove() -> None:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", note)

    return statements, remove


async def test_concurrent_records_are_written_together_each_once(index: SqlIndex) -> None:
    """200 tasks recording at once: one group (one INSERT on PostgreSQL, the conditional
    first row and the rest on SQLite), every record exactly once, the chain whole."""
    audit = _group_log(index)
    await audit.record([ev(0)])  # learns the head
    inserts, remove = _insert_counter(index)
    try:
        await asyncio.gather(*(
            audit.record([ev(i)] if i % 4 else [ev(i), ev(i + 10_000)]) for i in range(1, 201)
        ))
    finally:
        remove()
    assert len(inserts) == (1 if index.engine.dialect.name == "postgresql" else 2)
    report = await audit.verify()
    assert report.ok and report.checked == 1 + 200 + 50 == report.last_seq
    async with index.engine.connect() as conn:
        details = [r[0] for r in await conn.execute(sa.select(audit_log.c.detail))]
    assert sorted(details) == sorted(
        [f"instances={i}" for i in range(201)] + [f"instances={i + 10_000}" for i in range(4, 201, 4)]
    )


async def test_group_commits_of_two_processes_keep_one_chain(index_url: str) -> None:
    """Two gateway processes' logs (each its own engines and idea of the head) recording
    concurrently on one database: every record lands once and the chain is whole."""
    first_index = await SqlIndex.open(IndexSettings(url=index_url))
    second_index = await SqlIndex.open(IndexSettings(url=index_url), migrate=False)
    try:
        first, second = _group_log(first_index), _group_log(second_index)

        async def burst(round_: int) -> None:
            await asyncio.gather(*(
                (first if i % 2 else second).record(
                    [ev(round_ * 1000 + i)] if i % 3 else
                    [ev(round_ * 1000 + i), ev(round_ * 1000 + i + 500)])
                for i in range(30)
            ))

        for round_ in range(4):
            await burst(round_)
        report = await first.verify()
        assert report.ok and report.checked == 4 * (20 + 10 * 2) == report.last_seq
        async with first_index.engine.connect() as conn:
            details = [r[0] for r in await conn.execute(sa.select(audit_log.c.detail))]
        assert len(details) == len(set(details)) == report.checked
    finally:
        await second_index.close()
        await first_index.close()


async def test_a_failed_group_fails_every_caller_in_it_and_the_next_group_writes(
    index: SqlIndex,
) -> None:
    audit = _group_log(index)
    await audit.record([ev(0)])
    await execute(index, sa.text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    try:
        outcomes = await asyncio.gather(
            *(audit.record([ev(i)]) for i in range(1, 11)), return_exceptions=True
        )
    finally:
        await execute(index, sa.text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    assert all(isinstance(o, IndexUnavailable) for o in outcomes), outcomes
    assert (await audit.head())[0] == 1
    await asyncio.gather(*(audit.record([ev(i)]) for i in range(11, 21)))
    report = await audit.verify()
    assert report.ok and report.checked == 11


async def test_a_caller_cancelled_while_waiting_leaves_the_others_written(
    index: SqlIndex,
) -> None:
    audit = _group_log(index)
    waiting = [asyncio.create_task(audit.record([ev(i)])) for i in range(1, 9)]
    await asyncio.sleep(0)  # every task has queued its records
    waiting[3].cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert waiting[3].cancelled() and all(t.exception() is None for t in waiting if t is not waiting[3])
    # The cancelled caller's records were already taken by the writer: written too.
    report = await audit.verify()
    assert report.ok and report.checked == 8


@pytest.mark.parametrize("index_url", ["postgres"], indirect=True)
async def test_a_group_commit_on_a_connection_the_server_closed_is_written_once(
    index: SqlIndex,
) -> None:
    """The autocommit pool is not pinged: a group whose statement's connection died is
    written on a new one; a group that did land before the connection died (its last
    record found at its seq with its hash) is not written twice."""
    audit = _group_log(index)
    await audit.record([ev(1)])  # leaves a connection in the pool, learns the head
    async with index.search_engine.connect() as conn:
        pids = {r[0] for r in await conn.execute(sa.text("SELECT pg_backend_pid()"))}
    async with index.engine.connect() as conn:
        for pid in pids:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    await audit.record([ev(2), ev(3)])
    report = await audit.verify()
    assert report.ok and report.checked == 3
    # The outcome-unknown retry of a group that landed: nothing written again.
    items = [(ev(4), T0)]
    head = await audit.head()
    landed = audit._chain(*head, items)
    await audit._transaction(items)
    await audit._transaction(items, written_as=(landed[-1]["seq"], landed[-1]["hash"]))
    report = await audit.verify()
    assert report.ok and report.checked == 4


def test_an_event_that_is_not_valid_text_is_refused_before_it_waits() -> None:
    from imaging_gateway.security.audit import check_event

    with pytest.raises(ValueError, match="not valid text"):
        check_event(ev(1, purpose="treat\ud800ment"))


# ---------------------------------------------------------------------------
# Atomic with the access


async def _job_rows(index: SqlIndex) -> int:
    async with index.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(sync_jobs))).scalar_one())


def _job_insert(job_id: str) -> Any:
    now = datetime.now(UTC)
    return sync_jobs.insert().values(
        id=job_id, store="s", mode="full", status="running", counters="{}",
        created_at=now, updated_at=now,
    )


async def test_the_access_and_its_record_commit_together(index: SqlIndex, audit: AuditLog) -> None:
    async with index.engine.begin() as conn:
        await conn.execute(_job_insert("a"))
        await audit.append(conn, [ev(1)])
    assert await _job_rows(index) == 1 and (await audit.head())[0] == 1
    with pytest.raises(RuntimeError):
        async with index.engine.begin() as conn:
            await audit.append(conn, [ev(2)])
            raise RuntimeError("the access failed after its record was appended")
    assert (await audit.head())[0] == 1 and (await audit.verify()).ok


async def test_unwritable_audit_log_fails_the_access(index: SqlIndex, audit: AuditLog) -> None:
    await audit.record([ev(1)])
    await execute(index, sa.text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    try:
        with pytest.raises(IndexUnavailable, match="audit record could not be written"):
            async with index.engine.begin() as conn:
                await conn.execute(_job_insert("b"))
                await audit.append(conn, [ev(2)])
    finally:
        await execute(index, sa.text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    assert await _job_rows(index) == 0  # the access's own write went with it
    await audit.record([ev(3)])
    report = await audit.verify()
    assert report.ok and report.checked == 2


async def test_an_unrecordable_event_fails_the_access(index: SqlIndex, audit: AuditLog) -> None:
    bad_cases: list[dict[str, Any]] = [
        {"subject": ""},
        {"subject": None},
        {"outcome": "maybe"},
        {"role": "x" * 17},
        {"detail": "two\nlines"},
    ]
    for bad in bad_cases:
        with pytest.raises(ValueError, match="audit event"):
            async with index.engine.begin() as conn:
                await conn.execute(_job_insert("c"))
                await audit.append(conn, [ev(1), ev(2, **bad)])
        assert await _job_rows(index) == 0 and await audit.head() == (0, "0" * 64), bad
    with pytest.raises(ValueError, match="timezone"):
        await audit.record([ev(1)], at=datetime(2026, 1, 1))


# ---------------------------------------------------------------------------
# Reading


async def test_for_patient_returns_that_patients_records_newest_first(audit: AuditLog) -> None:
    await fill(audit, 9)  # patient tokens tok-1, tok-2, tok-0, tok-1, ...
    entries = await audit.for_patient("tok-1")
    assert [e["seq"] for e in entries] == [7, 4, 1]
    first = entries[0]
    assert first["subject"] == "pacs-7" and first["hospital"] == "H44010600001"
    assert first["purpose"] == "treatment" and first["outcome"] == "ok"
    assert first["at"] == (T0 + timedelta(minutes=7)).isoformat()
    assert "source" not in first and "detail" not in first
    page = await audit.for_patient("tok-1", limit=1, before_seq=7)
    assert [e["seq"] for e in page] == [4]
    assert await audit.for_patient("tok-unknown") == []


async def test_export_writes_one_message_per_record_in_the_window(audit: AuditLog, tmp_path: Path) -> None:
    await fill(audit, 6)
    out = tmp_path / "audit.xml"
    with out.open("w", encoding="utf-8") as fh:
        n = await audit.export(
            fh, since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=5), site="440000"
        )
    lines = out.read_text(encoding="utf-8").splitlines()
    assert n == 3 and len(lines) == 3
    messages = [ET.fromstring(line) for line in lines]
    assert [m.find("EventIdentification").get("EventDateTime") for m in messages] == [  # type: ignore[union-attr]
        (T0 + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for i in (2, 3, 4)
    ]
    assert {m.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") for m in messages} == {"440000"}  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# The key file (no database)


def test_chain_key_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "audit-chain.key"
    key = load_or_create_chain_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_chain_key(path) == key == load_chain_key(path)
    assert [p.name for p in path.parent.iterdir()] == ["audit-chain.key"]  # no temp left


def test_chain_key_refuses_loose_permissions_wrong_size_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "audit-chain.key"
    with pytest.raises(ConfigError, match="missing"):
        load_chain_key(path)
    load_or_create_chain_key(path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="owner only"):
        load_or_create_chain_key(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="exactly 32 bytes") as err:
        load_or_create_chain_key(path)
    assert "security.audit_key_file" in str(err.value)


# ---------------------------------------------------------------------------
# The CLI


@pytest.fixture
async def cli_log(index_url: str, tmp_path: Path) -> AsyncIterator[tuple[Path, SqlIndex]]:
    cfg = tmp_path / "g.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "data"\n[index]\nurl = "{index_url}"\n', encoding="utf-8")
    index = await SqlIndex.open(IndexSettings(url=index_url))
    key = load_or_create_chain_key(tmp_path / "data" / "keys" / "audit-chain.key")
    await fill(AuditLog(index.engine, key), 5)
    yield cfg, index
    await index.close()


async def test_cli_audit_verify_exit_codes_and_export(
    cli_log: tuple[Path, SqlIndex], tmp_path: Path
) -> None:
    cfg, index = cli_log
    ok = await asyncio.to_thread(cli, cfg, "audit", "verify", "--json")
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["checked"] == 5
    anchor = f"{report['last_seq']}:{report['last_hash']}"

    out = tmp_path / "export.xml"
    since = (T0 + timedelta(minutes=2)).replace(tzinfo=None).isoformat()  # no offset: UTC
    await asyncio.to_thread(cli, cfg, "audit", "export", "--out", str(out), "--since", since)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and all(ET.fromstring(line).tag == "AuditMessage" for line in lines)

    await execute(index, where(3).values(purpose="research"))
    broken = await asyncio.to_thread(cli, cfg, "audit", "verify", check=False)
    assert broken.returncode == 1
    assert "seq 3" in broken.stdout and HASH_MISMATCH in broken.stdout
    assert "Traceback" not in broken.stderr

    await execute(index, where(3).values(purpose="treatment"))
    await execute(index, audit_log.delete().where(audit_log.c.seq == 5))
    anchored = await asyncio.to_thread(
        cli, cfg, "audit", "verify", "--json", "--anchor", anchor, check=False
    )
    assert anchored.returncode == 1 and json.loads(anchored.stdout)["reason"] == ANCHOR_MISSING
