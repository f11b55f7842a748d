"""The tamper-evident access log: HMAC hash-chained records, verification, DICOM export.

Every access to patient data appends one record per event, inside the access's own
transaction, or (a search, a refusal: nothing else to commit) committed before anything
is returned, in a group commit with the records of concurrent accesses: the access and
its record commit together, and if the record cannot be written the access fails.
Each record carries ``prev_hash`` (the previous record's ``hash``; 64 zeros for the
first) and ``hash`` = HMAC-SHA256(chain key, prev_hash || canonical form of every field
of the record, its ``seq`` and time included). The key lives in a file
(``load_or_create_chain_key``), not in the database, so someone who can write the
database but does not hold the key cannot recompute a valid chain after an edit.

What the chain proves, and what it does not: ``AuditLog.verify`` finds any edited,
deleted, inserted or reordered record *followed by at least one intact record*.
Deleting the newest records (truncating the tail) leaves a shorter chain that is still
valid; only a copy of the head kept outside the database shows it. ``AuditLog.head``
returns ``(seq, hash)`` for an operator (or a cron job) to write elsewhere, e.g. to a
ticket or an append-only store; ``verify(anchor=(seq, hash))`` then fails if that record
is gone or differs. An anchor also bounds what a holder of the key could rewrite: records
up to an anchored head cannot be changed without the anchor failing.

``AuditLog.export`` writes the records as DICOM PS3.15 A.5 audit messages (the
RFC 3881-derived ``AuditMessage`` schema of A.5.1), one XML document per line.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imaging_gateway.crypto.keyfiles import load_or_create_secret, load_secret
from imaging_gateway.errors import IndexUnavailable, InvalidRequest
from imaging_gateway.index.audit_repo import AuditRepository, column_lengths

GENESIS_HASH: Final = "0" * 64
KEY_BYTES: Final = 32
OUTCOMES: Final = ("ok", "denied", "not-found", "error")

HASH_MISMATCH: Final = "hash mismatch"
PREV_MISMATCH: Final = "prev_hash does not match the previous record"
SEQUENCE_GAP: Final = "sequence gap"
ANCHOR_MISSING: Final = "anchored record missing (the newest records were deleted)"
ANCHOR_DIFFERS: Final = "anchored record differs from the anchor"

# The record's fields in their canonical order (the hash covers them all, with seq and at).
FIELDS: Final = (
    "subject",
    "role",
    "hospital",
    "patient_token",
    "StudyInstanceUID",
    "action",
    "purpose",
    "break_glass_reason",
    "outcome",
    "source",
    "detail",
)
_REQUIRED: Final = frozenset({"subject", "role", "action", "outcome"})
# Columns without a length (Text) still get one: records stay small and exportable.
_TEXT_MAX: Final = 2000
# Free text that may span lines; every other field is one line without control characters.
_MULTILINE: Final = frozenset({"break_glass_reason"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Characters XML 1.0 cannot carry, plus line breaks (one message per line on export).
_NOT_XML_ONE_LINE = re.compile("[^\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_CANONICAL_VERSION: Final = "audit-v1"

GROUP_RECORDS: Final = 1000
"""Records per group commit at most (a single caller's events are never split)."""


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One access to be recorded.

    ``outcome`` is one of ``OUTCOMES``. ``source`` is the client's IP address (or host
    name), without a port. ``detail`` is a short single-line note for operators; it must
    never hold patient identifiers or names (the patient is ``patient_token``).
    """

    subject: str
    role: str
    action: str
    outcome: str
    hospital: str | None = None
    patient_token: str | None = None
    StudyInstanceUID: str | None = None
    purpose: str | None = None
    break_glass_reason: str | None = None
    source: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of walking the chain.

    ``checked`` counts the records found intact, in order. When ``ok`` is false, ``seq``
    is the first broken record and ``reason`` says how it is broken; ``last_seq`` and
    ``last_hash`` always name the last intact record (the head when ``ok``; (0, 64
    zeros) when there is none).
    """

    ok: bool
    checked: int
    last_seq: int
    last_hash: str
    seq: int | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "seq": self.seq,
            "reason": self.reason,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
        }


# ---------------------------------------------------------------------------
# The chain


def _utc(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value.astimezone(UTC)


def _stored_time(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were stored as UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@functools.lru_cache(maxsize=64)
def _iso(at: datetime) -> str:
    # Cached: the records of one append share their time.
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# json.dumps(..., ensure_ascii=True, separators=(",", ":")) without building an encoder
# per record.
_CANONICAL_JSON: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """HMAC-SHA256 with ``key`` and nothing hashed yet, to be copied per record."""
    return hmac.new(key, digestmod=hashlib.sha256)


def record_hash(key: bytes, prev_hash: str, seq: int, at: datetime, values: dict[str, Any]) -> str:
    """HMAC-SHA256 (hex) of one record: ``prev_hash`` then the canonical record.

    The canonical record is the compact JSON array [version, seq, time as UTC ISO 8601
    with microseconds, *FIELDS]; JSON keeps None apart from "" and needs no separator
    escaping of its own.
    """
    canonical = _CANONICAL_JSON([_CANONICAL_VERSION, seq, _iso(at), *(values[f] for f in FIELDS)])
    mac = _keyed(key).copy()
    mac.update(prev_hash.encode("utf-8"))
    mac.update(canonical.encode("ascii"))
    return mac.hexdigest()


def _limits() -> dict[str, int]:
    return {f: n if n is not None else _TEXT_MAX for f, n in column_lengths(FIELDS).items()}


_LIMITS: Final = _limits()


def check_event(event: AuditEvent) -> None:
    """Raises ``ValueError`` if ``event`` cannot be recorded as it is.

    Required fields must be non-empty; every value must be a string within its column's
    length and free of control characters (line breaks are allowed in the break-glass
    reason only); ``outcome`` must be one of ``OUTCOMES``.
    """
    for f in FIELDS:
        value = getattr(event, f)
        if value is None:
            if f in _REQUIRED:
                raise ValueError(f"audit event: {f} is required")
            continue
        if not isinstance(value, str):
            raise ValueError(f"audit event: {f} must be a string")
        if f in _REQUIRED and not value:
            raise ValueError(f"audit event: {f} must not be empty")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no database could store it
                raise ValueError(f"audit event: {f} is not valid text") from None
        if len(value) > _LIMITS[f]:
            raise ValueError(f"audit event: {f} is longer than {_LIMITS[f]} characters")
        pattern = _CONTROL_BUT_LINES if f in _MULTILINE else _CONTROL
        if pattern.search(value):
            raise ValueError(f"audit event: {f} contains control characters")
    if event.outcome not in OUTCOMES:
        raise ValueError(f"audit event: outcome must be one of {', '.join(OUTCOMES)}")


_Item = tuple[AuditEvent, datetime]
"""One event to write and its time."""


def _items(events: Sequence[AuditEvent], at: datetime | None) -> list[_Item]:
    """``events`` checked (``check_event``), each with ``at`` (default now); raises
    ``ValueError`` for an event that cannot be recorded or a naive ``at``."""
    for event in events:
        check_event(event)
    when = _utc(at, "at") if at is not None else datetime.now(UTC)
    return [(event, when) for event in events]


@dataclass(slots=True)
class _Waiting:
    """One ``record`` call's events, waiting for the writer task, and its outcome."""

    items: list[_Item]
    done: asyncio.Future[None]


def _retrieve(done: asyncio.Future[None]) -> None:
    # The caller was cancelled: nobody else reads the outcome, so asyncio would log an
    # unretrieved exception.
    if not done.cancelled():
        done.exception()


def _event(m: Any) -> AuditEvent:
    return AuditEvent(**{f: m[f] for f in FIELDS})


class AuditLog:
    """The hash-chained ``audit_log`` table of the index database.

    Appends are serialized so the chain never forks: on PostgreSQL by a transaction-level
    advisory lock taken before the head is read, on SQLite by taking the database's
    single write lock (a no-op write) before the head is read. Either lock is held until
    the caller's transaction ends, so append as the last step before commit. Should a
    caller's transaction read a stale head anyway (a REPEATABLE READ snapshot taken
    before the lock), the primary key on ``seq`` refuses the second record with that seq
    and the access fails; a fork cannot be written.

    Records that need no transaction of the caller's (``record``: a search's, a refusal's)
    are group-committed: the events of every task of this process that records meanwhile
    are written by one writer task in one transaction (on PostgreSQL with an
    ``autocommit_engine``, one statement), and each caller returns once its batch is
    committed. Concurrent accesses then do not queue one by one for the database's write
    lock (SQLite) or the chain's advisory lock (PostgreSQL), and no access is answered
    before its record is written.
    """

    def __init__(
        self, engine: AsyncEngine, key: bytes, *, autocommit_engine: AsyncEngine | None = None
    ) -> None:
        """Raises ``ValueError`` for a key shorter than 32 bytes.

        ``autocommit_engine``: PostgreSQL connections in autocommit mode (the index's
        ``search_engine``), on which a group commit is one statement when this process
        knows the head; without it a group commit is a transaction on ``engine``.
        """
        if len(key) < KEY_BYTES:
            raise ValueError(f"the audit chain key must be at least {KEY_BYTES} bytes")
        self.engine = engine
        self._key = key
        self._postgres = engine.dialect.name == "postgresql"
        self._repo = AuditRepository(postgres=self._postgres)
        self._autocommit = autocommit_engine if self._postgres else None
        self._known_head: tuple[int, str] | None = None
        """(seq, hash) of the newest record this process wrote or read; a hint only."""
        self._waiting: deque[_Waiting] = deque()
        self._writer: asyncio.Task[None] | None = None
        """The task writing the waiting records; set while there are any."""
        self._writing = False
        """A ``record_if_idle`` caller is writing its own records (the writer waits)."""

    def __repr__(self) -> str:
        return f"AuditLog({self.engine.url.render_as_string(hide_password=True)!r})"

    async def append(
        self, conn: AsyncConnection, events: Sequence[AuditEvent], *, at: datetime | None = None
    ) -> None:
        """Append ``events`` (in order, all at time ``at``, default now) in ``conn``'s transaction.

        Nothing is committed here: the records land when the caller's transaction
        commits, and vanish with it. Raises ``ValueError`` for an event that cannot be
        recorded (see ``check_event``) or a naive ``at``, before anything is written;
        ``IndexUnavailable`` when the database refuses the write. Either way the
        caller's transaction must not commit (leaving its ``begin()`` block with the
        exception rolls it back).
        """
        items = _items(events, at)
        if items:
            await self._append_items(conn, items)

    async def _append_items(
        self,
        conn: AsyncConnection,
        items: Sequence[_Item],
        *,
        written_as: tuple[int, str] | None = None,
    ) -> None:
        """Append checked ``items`` in ``conn``'s transaction (see ``append``).

        ``written_as``: the (seq, hash) the last of these records has if an earlier
        attempt whose outcome is unknown (its connection was lost) did write them; if
        that record is there, nothing is written again.
        """
        try:
            rows = None
            if not self._postgres and self._known_head is not None and written_as is None:
                # Fast path: one statement instead of lock, head read and insert.
                rows = self._chain(*self._known_head, items)
                head_seq = self._known_head[0]
                if await self._repo.insert_first_on_head(conn, rows[0], head_seq):
                    if len(rows) > 1:
                        await self._repo.insert(conn, rows[1:])
                else:
                    rows = None  # another writer appended, or our last record rolled back
            if rows is None:
                await self._lock(conn)
                if written_as is not None and await self._holds(conn, *written_as):
                    self._known_head = written_as
                    return
                rows = self._chain(*await self._head(conn), items)
                await self._repo.insert(conn, rows)
            # Set before commit: should the caller roll back, the next fast path finds
            # the head moved and takes the slow path.
            self._known_head = (rows[-1]["seq"], rows[-1]["hash"])
        except (SQLAlchemyError, OSError) as exc:
            raise IndexUnavailable(
                f"audit record could not be written: {exc.__class__.__name__}"
            ) from exc

    async def append_and_commit(
        self, conn: AsyncConnection, events: Sequence[AuditEvent], *, at: datetime | None = None
    ) -> None:
        """Append ``events`` from ``conn`` and commit them before returning.

        On a PostgreSQL connection in autocommit mode (see ``SqlIndex.search_engine``) in
        one statement when this process knows the head, else in a transaction of their
        own on ``engine``; on any other connection in its transaction, which is then
        committed. Raises as ``append`` does; then nothing was written.
        """
        autocommit = conn.engine.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        if not (self._postgres and autocommit):
            await self.append(conn, events, at=at)
            await conn.commit()
            return
        items = _items(events, at)
        if items:
            await self._commit_on(conn, items)

    async def _commit_on(self, conn: AsyncConnection, items: Sequence[_Item]) -> None:
        """Write checked ``items`` from a PostgreSQL autocommit connection, committed."""
        written_as: tuple[int, str] | None = None
        if self._known_head is not None:
            head_seq, head_hash = self._known_head
            rows = self._chain(head_seq, head_hash, items)
            written: int | None
            try:
                written = await self._repo.insert_all_on_head(conn, rows, head_seq, head_hash)
            except IntegrityError:
                written = None  # another writer took the seq: its record is the head now
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise IndexUnavailable(
                        f"audit record could not be written: {exc.__class__.__name__}"
                    ) from exc
                # The connection died (a server restart, an idle timeout) with the
                # statement's outcome unknown: write on a new one unless it did land.
                written = None
                written_as = (rows[-1]["seq"], rows[-1]["hash"])
            except (SQLAlchemyError, OSError) as exc:
                raise IndexUnavailable(
                    f"audit record could not be written: {exc.__class__.__name__}"
                ) from exc
            if written == len(rows):
                self._known_head = (rows[-1]["seq"], rows[-1]["hash"])
                return
        await self._transaction(items, written_as=written_as)

    async def _transaction(
        self, items: Sequence[_Item], *, written_as: tuple[int, str] | None = None
    ) -> None:
        """Write checked ``items`` in a transaction of their own on ``engine``."""
        try:
            async with self.engine.begin() as conn:
                await self._append_items(conn, items, written_as=written_as)
        except (SQLAlchemyError, OSError) as exc:  # begin or commit failed
            raise IndexUnavailable(
                f"audit record could not be written: {exc.__class__.__name__}"
            ) from exc

    async def record_if_idle(
        self, conn: AsyncConnection, events: Sequence[AuditEvent], *, at: datetime | None = None
    ) -> bool:
        """Write and commit ``events`` on ``conn`` (``append_and_commit``) when no other
        record of this process is being written, and return True; else write nothing and
        return False: the caller then releases ``conn`` and calls ``record`` (whose
        writer may need a connection of the same pool).

        For a caller that has just read on ``conn`` (a search) and holds no transaction
        on it: a lone request keeps one connection and no hand-off. Raises as ``append``
        does.
        """
        if self._writing or self._waiting or self._writer is not None:
            _items(events, at)  # the same refusals as when idle
            return False
        self._writing = True
        try:
            await self.append_and_commit(conn, events, at=at)
        finally:
            self._writing = False
            if self._waiting and self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._write_waiting())
        return True

    async def record(self, events: Sequence[AuditEvent], *, at: datetime | None = None) -> None:
        """Append ``events`` (all at time ``at``, default now) and return once committed.

        Group commit: the events wait, with those of the other tasks of this process
        recording meanwhile, for the one writer task, which writes each group in one
        transaction (on PostgreSQL with an ``autocommit_engine``: one statement when
        this process knows the head) in the order the tasks called. Raises as ``append``
        does, before anything waits; ``IndexUnavailable`` when the group's write fails
        (then none of its records was written). A caller cancelled while it waits may
        still have its records written.
        """
        items = _items(events, at)
        if not items:
            return
        loop = asyncio.get_running_loop()
        waiting = _Waiting(items, loop.create_future())
        self._waiting.append(waiting)
        if self._writer is None and not self._writing:
            self._writer = loop.create_task(self._write_waiting())
        try:
            await asyncio.shield(waiting.done)
        except asyncio.CancelledError:
            waiting.done.add_done_callback(_retrieve)
            raise

    async def _write_waiting(self) -> None:
        """The writer task: group after group until nobody waits."""
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch = [self._waiting.popleft()]
                size = len(batch[0].items)
                while self._waiting and size + len(self._waiting[0].items) <= GROUP_RECORDS:
                    size += len(self._waiting[0].items)
                    batch.append(self._waiting.popleft())
                items = [item for w in batch for item in w.items]
                try:
                    if self._autocommit is not None:
                        try:
                            async with self._autocommit.connect() as conn:
                                await self._commit_on(conn, items)
                        except (SQLAlchemyError, OSError) as exc:  # no connection
                            raise IndexUnavailable(
                                f"audit record could not be written: {exc.__class__.__name__}"
                            ) from exc
                    else:
                        await self._transaction(items)
                except Exception as exc:
                    for w in batch:
                        if not w.done.done():
                            w.done.set_exception(exc)
                else:
                    for w in batch:
                        if not w.done.done():
                            w.done.set_result(None)
                batch = []
        finally:
            self._writer = None
            # Only when cancelled (the loop is closing): nobody is left waiting forever.
            for w in (*batch, *self._waiting):
                if not w.done.done():
                    w.done.set_exception(IndexUnavailable("audit record could not be written"))
            self._waiting.clear()

    def _chain(self, seq: int, prev: str, items: Sequence[_Item]) -> list[dict[str, Any]]:
        """The rows of ``items`` chained after the record ``(seq, prev)``."""
        rows: list[dict[str, Any]] = []
        for event, when in items:
            seq += 1
            values = {f: getattr(event, f) for f in FIELDS}
            digest = record_hash(self._key, prev, seq, when, values)
            rows.append({"seq": seq, "at": when, **values, "prev_hash": prev, "hash": digest})
            prev = digest
        return rows

    @staticmethod
    async def _holds(conn: AsyncConnection, seq: int, digest: str) -> bool:
        """Whether the record ``seq`` exists and has hash ``digest``."""
        stored = await AuditRepository.hash_at(conn, seq)
        return stored is not None and stored == digest

    async def _lock(self, conn: AsyncConnection) -> None:
        await self._repo.lock_chain(conn)

    @staticmethod
    async def _head(conn: AsyncConnection) -> tuple[int, str]:
        head = await AuditRepository.chain_head(conn)
        return (0, GENESIS_HASH) if head is None else head

    async def head(self) -> tuple[int, str]:
        """The newest record's ``(seq, hash)``; ``(0, 64 zeros)`` for an empty log.

        Write it somewhere the database's writers cannot reach, and pass it to
        ``verify(anchor=...)`` later: that is what detects a truncated tail. Raises
        ``IndexUnavailable`` if the database fails.
        """
        try:
            async with self.engine.connect() as conn:
                return await self._head(conn)
        except (SQLAlchemyError, OSError) as exc:
            raise IndexUnavailable(
                f"audit log could not be read: {exc.__class__.__name__}"
            ) from exc

    async def verify(
        self, *, batch: int = 5000, anchor: tuple[int, str] | None = None
    ) -> VerifyReport:
        """Walk the whole chain in ``seq`` order, ``batch`` records per query; memory stays flat.

        Reports the first broken record: ``SEQUENCE_GAP`` when seq does not follow the
        previous record's (records deleted), ``PREV_MISMATCH`` when its ``prev_hash``
        is not the previous record's hash (records reordered, or deleted and
        renumbered), ``HASH_MISMATCH`` when its fields do not hash to ``hash`` (edited,
        or written with another key). With ``anchor`` (a ``head()`` taken earlier) it
        also fails if that record is gone or differs. Deleting the newest records is
        invisible without an anchor. Raises ``IndexUnavailable`` if the database fails.
        """
        if batch < 1:
            raise InvalidRequest("batch must be at least 1")
        prev_seq, prev_hash, checked = 0, GENESIS_HASH, 0

        def broken(seq: int, reason: str) -> VerifyReport:
            return VerifyReport(
                ok=False,
                checked=checked,
                last_seq=prev_seq,
                last_hash=prev_hash,
                seq=seq,
                reason=reason,
            )

        async for rows in self._batches(batch=batch):
            for row in rows:
                m = row._mapping
                seq = int(m["seq"])
                if seq != prev_seq + 1:
                    return broken(seq, SEQUENCE_GAP)
                if m["prev_hash"] != prev_hash:
                    return broken(seq, PREV_MISMATCH)
                values = {f: m[f] for f in FIELDS}
                expected = record_hash(self._key, prev_hash, seq, _stored_time(m["at"]), values)
                if not hmac.compare_digest(expected.encode(), str(m["hash"]).encode()):
                    return broken(seq, HASH_MISMATCH)
                if anchor is not None and seq == anchor[0] and m["hash"] != anchor[1]:
                    return broken(seq, ANCHOR_DIFFERS)
                prev_seq, prev_hash, checked = seq, str(m["hash"]), checked + 1
        if anchor is not None and prev_seq < anchor[0]:
            return broken(anchor[0], ANCHOR_MISSING)
        return VerifyReport(ok=True, checked=checked, last_seq=prev_seq, last_hash=prev_hash)

    async def export(
        self,
        out: TextIO,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        source_id: str = "imaging-gateway",
        site: str | None = None,
        batch: int = 1000,
    ) -> int:
        """Write records with ``since <= at < until`` to ``out`` as DICOM audit messages.

        One ``AuditMessage`` XML document per line, in ``seq`` order, without an XML
        declaration (UTF-8), as syslog-based audit transports carry them; see
        ``audit_message`` for the mapping. ``source_id`` and ``site`` fill
        AuditSourceIdentification. Returns the number of messages written. Does not
        verify the chain (run ``verify`` for that). Raises ``ValueError`` for a naive
        ``since``/``until`` and ``IndexUnavailable`` if the database fails.
        """
        since = _utc(since, "since") if since is not None else None
        until = _utc(until, "until") if until is not None else None
        written = 0
        async for rows in self._batches(batch=batch, since=since, until=until):
            for row in rows:
                m = row._mapping
                message = audit_message(
                    _event(m), _stored_time(m["at"]), source_id=source_id, site=site
                )
                out.write(ET.tostring(message, encoding="unicode"))
                out.write("\n")
                written += 1
        return written

    async def _batches(
        self, *, batch: int, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[Sequence[Row[Any]]]:
        """The records with ``since <= at < until`` in ``seq`` order, ``batch`` rows at a time.

        Each batch is its own short read, so memory stays flat for any log size. Raises
        ``IndexUnavailable`` if the database fails.
        """
        after = 0
        while True:
            try:
                async with self.engine.connect() as conn:
                    rows = await AuditRepository.records_after(
                        conn, after, limit=batch, since=since, until=until
                    )
            except (SQLAlchemyError, OSError) as exc:
                raise IndexUnavailable(
                    f"audit log could not be read: {exc.__class__.__name__}"
                ) from exc
            if rows:
                yield rows
                after = int(rows[-1]._mapping["seq"])
            if len(rows) < batch:
                return

    async def for_patient(
        self, patient_token: str, *, limit: int = 100, before_seq: int | None = None
    ) -> list[dict[str, Any]]:
        """A patient's own access log, newest first: who, when, what, why, outcome.

        Each entry has seq, at (UTC ISO 8601), subject, role, hospital, action,
        StudyInstanceUID, purpose, break_glass_reason, outcome; not the client address
        or operator notes. Page with ``before_seq`` = the last entry's seq. Raises
        ``InvalidRequest`` for a limit outside 1..1000, ``IndexUnavailable`` if the
        database fails.
        """
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000")
        try:
            async with self.engine.connect() as conn:
                rows = await AuditRepository.for_patient(
                    conn, patient_token, limit=limit, before_seq=before_seq
                )
        except (SQLAlchemyError, OSError) as exc:
            raise IndexUnavailable(
                f"audit log could not be read: {exc.__class__.__name__}"
            ) from exc
        out: list[dict[str, Any]] = []
        for row in rows:
            entry = dict(row._mapping)
            entry["at"] = _stored_time(entry["at"]).isoformat()
            out.append(entry)
        return out


# ---------------------------------------------------------------------------
# DICOM PS3.15 A.5 audit messages

DCM: Final = "DCM"
RFC_3881: Final = "RFC-3881"
# This gateway's private coding scheme (PS3.16 8.2: private designators begin with "99"):
# its access actions and principal roles.
LOCAL_SCHEME: Final = "99IMGGW"

Code = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)

EV_INSTANCES_ACCESSED: Final[Code] = ("110103", DCM, "DICOM Instances Accessed")
EV_INSTANCES_TRANSFERRED: Final[Code] = ("110104", DCM, "DICOM Instances Transferred")
EV_QUERY: Final[Code] = ("110112", DCM, "Query")
EV_SECURITY_ALERT: Final[Code] = ("110113", DCM, "Security Alert")
EV_USER_AUTHENTICATION: Final[Code] = ("110114", DCM, "User Authentication")
# CID 403 Security Alert Type Code.
ET_EMERGENCY_OVERRIDE: Final[Code] = ("110127", DCM, "Emergency Override Started")
ET_AUTHORIZATION_DECISION: Final[Code] = ("110144", DCM, "Authorization Decision")
ET_LOGIN: Final[Code] = ("110122", DCM, "Login")
# CID 402 Audit Active Participant Role ID Code.
ROLE_DESTINATION: Final[Code] = ("110152", DCM, "Destination Role ID")
ROLE_SOURCE: Final[Code] = ("110153", DCM, "Source Role ID")
# CID 404 Audit Participant Object ID Type Code, and RFC 3881's own.
ID_STUDY_INSTANCE_UID: Final[Code] = ("110180", DCM, "Study Instance UID")
ID_SOP_CLASS_UID: Final[Code] = ("110181", DCM, "SOP Class UID")
ID_PATIENT_NUMBER: Final[Code] = ("2", RFC_3881, "Patient Number")
# What a QIDO-RS study search queries: Study Root Query/Retrieve Information Model - FIND.
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"

# 0 success, 4 minor failure, 8 serious failure (A.5.1 EventOutcomeIndicator). A search
# or retrieve that found nothing completed; a refusal or an error ended the action.
OUTCOME_INDICATOR: Final = {"ok": "0", "not-found": "4", "denied": "8", "error": "8"}


@dataclass(frozen=True, slots=True)
class _Kind:
    event_id: Code
    action_code: str
    type_code: Code | None = None
    requestor_role: Code | None = None
    gateway_role: Code | None = None


def _kind(event: AuditEvent) -> _Kind:
    """Which A.5.3 message an access becomes.

    A refused access, and any access under an emergency override, is a Security Alert
    (A.5.3.11), so that review tools that watch for alerts see it. Otherwise: search*
    is a Query (A.5.3.12), retrieve* and store* are DICOM Instances Transferred
    (A.5.3.7; the gateway is the source of a retrieve and the destination of a store),
    anything else (metadata, rendering, viewer links) is DICOM Instances Accessed
    (A.5.3.5). A refused bearer token is a User Authentication message (Login, failed).
    """
    action = event.action
    if action == "authenticate":  # a refused bearer token
        return _Kind(EV_USER_AUTHENTICATION, "E", type_code=ET_LOGIN)
    if event.outcome == "denied":
        return _Kind(EV_SECURITY_ALERT, "E", type_code=ET_AUTHORIZATION_DECISION)
    if event.break_glass_reason is not None:
        return _Kind(EV_SECURITY_ALERT, "E", type_code=ET_EMERGENCY_OVERRIDE)
    if action.startswith("search") or action == "query":
        return _Kind(EV_QUERY, "E", requestor_role=ROLE_SOURCE, gateway_role=ROLE_DESTINATION)
    if action.startswith("retrieve"):
        return _Kind(
            EV_INSTANCES_TRANSFERRED,
            "R",
            requestor_role=ROLE_DESTINATION,
            gateway_role=ROLE_SOURCE,
        )
    if action.startswith("store"):
        return _Kind(
            EV_INSTANCES_TRANSFERRED,
            "C",
            requestor_role=ROLE_SOURCE,
            gateway_role=ROLE_DESTINATION,
        )
    return _Kind(EV_INSTANCES_ACCESSED, "R")


def _xml_text(value: str) -> str:
    # Keep every message well-formed and on one line whatever the (possibly tampered)
    # database holds; ElementTree escapes markup but passes control characters through.
    return _NOT_XML_ONE_LINE.sub(" ", value)


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    value, scheme, meaning = code
    return ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _xml_text(value),
            "codeSystemName": scheme,
            "originalText": _xml_text(meaning),
        },
    )


def _access_point_type(source: str) -> str:
    try:
        ipaddress.ip_address(source)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _detail(parent: ET.Element, kind: str, value: str) -> None:
    # A.5.1 ValuePair: the value is base64 whatever it holds (it may be free text).
    encoded = base64.b64encode(value.encode("utf-8", "replace")).decode("ascii")
    ET.SubElement(parent, "ParticipantObjectDetail", {"type": kind, "value": encoded})


def audit_message(
    event: AuditEvent, at: datetime, *, source_id: str, site: str | None = None
) -> ET.Element:
    """One access as a DICOM PS3.15 A.5 ``AuditMessage`` element (A.5.1 schema order).

    - EventIdentification: EventID and EventActionCode per ``_kind``; EventTypeCode
      110127 Emergency Override Started (break-glass) or 110144 Authorization Decision
      (denied) for a Security Alert, then the gateway's action name in scheme
      ``99IMGGW``; EventDateTime in UTC; EventOutcomeIndicator from
      ``OUTCOME_INDICATOR``; ``detail`` as EventOutcomeDescription.
    - ActiveParticipant, the requestor: UserID = subject, AlternativeUserID = hospital
      code (its identity in the medical-insurance domain), UserIsRequestor true,
      RoleIDCode 110153 Source / 110152 Destination where A.5.3 asks for one, plus the
      principal's role in scheme ``99IMGGW``; NetworkAccessPointID = client address.
    - ActiveParticipant, this gateway (``source_id``), UserIsRequestor false.
    - AuditSourceIdentification: ``source_id``, ``site``, type 4 (application server).
    - ParticipantObjectIdentification: for a Query, the Study Root FIND SOP Class
      (type 2, role 3, 110181; the query keys themselves are not kept, as they can hold
      names); the patient (patient token, type 1 Person, role 1 Patient, RFC 3881
      "Patient Number"); the study (StudyInstanceUID, type 2 System Object, role 3
      Report, 110180). Purpose of use and break-glass reason ride as
      ParticipantObjectDetail (``PurposeOfUse``, ``BreakGlassReason``) of the patient
      object, else the study, else the query object.

    No names or other identifiers of the patient appear; the token stands for them.
    """
    kind = _kind(event)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action_code,
            "EventDateTime": _iso(at),
            "EventOutcomeIndicator": OUTCOME_INDICATOR.get(event.outcome, "8"),
        },
    )
    _code(ident, "EventID", kind.event_id)
    if kind.type_code is not None:
        _code(ident, "EventTypeCode", kind.type_code)
    _code(ident, "EventTypeCode", (event.action, LOCAL_SCHEME, event.action))
    if event.detail:
        ET.SubElement(ident, "EventOutcomeDescription").text = _xml_text(event.detail)

    requestor: dict[str, str] = {"UserID": _xml_text(event.subject), "UserIsRequestor": "true"}
    if event.hospital:
        requestor["AlternativeUserID"] = _xml_text(event.hospital)
    if event.source:
        requestor["NetworkAccessPointID"] = _xml_text(event.source)
        requestor["NetworkAccessPointTypeCode"] = _access_point_type(event.source)
    participant = ET.SubElement(root, "ActiveParticipant", requestor)
    if kind.requestor_role is not None:
        _code(participant, "RoleIDCode", kind.requestor_role)
    _code(participant, "RoleIDCode", (event.role, LOCAL_SCHEME, event.role))
    gateway = ET.SubElement(
        root, "ActiveParticipant", {"UserID": _xml_text(source_id), "UserIsRequestor": "false"}
    )
    if kind.gateway_role is not None:
        _code(gateway, "RoleIDCode", kind.gateway_role)

    audit_source = {"AuditSourceID": _xml_text(source_id)}
    if site:
        audit_source["AuditEnterpriseSiteID"] = _xml_text(site)
    source = ET.SubElement(root, "AuditSourceIdentification", audit_source)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})

    objects: list[ET.Element] = []
    if kind.event_id == EV_QUERY:
        query = ET.Element(
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": STUDY_ROOT_FIND,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(query, "ParticipantObjectIDTypeCode", ID_SOP_CLASS_UID)
        objects.append(query)
    if event.patient_token:
        patient = ET.Element(
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _xml_text(event.patient_token),
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _code(patient, "ParticipantObjectIDTypeCode", ID_PATIENT_NUMBER)
        objects.insert(0, patient)
    if event.StudyInstanceUID:
        study = ET.Element(
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": _xml_text(event.StudyInstanceUID),
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(study, "ParticipantObjectIDTypeCode", ID_STUDY_INSTANCE_UID)
        objects.insert(1 if event.patient_token else 0, study)
    if objects:
        if event.purpose:
            _detail(objects[0], "PurposeOfUse", event.purpose)
        if event.break_glass_reason:
            _detail(objects[0], "BreakGlassReason", event.break_glass_reason)
    root.extend(objects)
    return root


# ---------------------------------------------------------------------------
# The chain key


SETTING: Final = "security.audit_key_file"


def load_chain_key(path: Path, *, setting: str = SETTING) -> bytes:
    """Read the chain key file; raises ``ConfigError`` (see ``keyfiles.load_secret``)."""
    return load_secret(path, setting=setting, size=KEY_BYTES)


def load_or_create_chain_key(path: Path, *, setting: str = SETTING) -> bytes:
    """Load the chain key, creating it on first use (see ``keyfiles.load_or_create_secret``)."""
    return load_or_create_secret(path, setting=setting, size=KEY_BYTES)
