"""SqlIndex: the study index on SQLite (aiosqlite) or PostgreSQL (asyncpg) through SQLAlchemy Core.

One code path serves both databases; the only dialect-specific piece is the
``INSERT .. ON CONFLICT`` construct, which both dialects spell the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import operator
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.domain.attributes import (
    LEVEL_TABLES,
    Attribute,
    EntityLevel,
    header_attributes,
    sealed_columns,
    stored_attributes,
)
from imaging_gateway.domain.records import RECORD_TYPES, ParsedHeader
from imaging_gateway.errors import (
    ConfigError,
    Conflict,
    GatewayError,
    IndexUnavailable,
    NotFound,
    SliceLost,
)
from imaging_gateway.index.qido import (
    install_time_budget,
    mark_session_time_budget,
    refresh_derived,
    session_time_budget,
)
from imaging_gateway.index.schema import (
    conflicts,
    index_keys,
    instances,
    patients,
    quarantine,
    series,
    studies,
    sync_jobs,
    sync_slices,
    tombstones,
)
from imaging_gateway.settings import IndexSettings

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True, slots=True)
class KnownObject:
    """What the index holds for one (store, key): an instance or a quarantine entry."""

    etag: str
    size: int
    quarantined: bool


@dataclass(frozen=True, slots=True)
class IndexedObject:
    """One object whose header was read and parsed, ready to upsert."""

    key: str
    etag: str
    size: int
    last_modified: datetime
    header: ParsedHeader
    header_sha256: str


@dataclass(frozen=True, slots=True)
class QuarantinedObject:
    """One object that could not be indexed, with the reason (no patient data in it)."""

    key: str
    etag: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class SyncJob:
    """A sync job row: its checkpoint (``cursor``) and counters."""

    id: str
    store: str
    mode: str
    status: str
    cursor: str | None
    counters: dict[str, int]
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "store": self.store,
            "mode": self.mode,
            "status": self.status,
            "cursor": self.cursor,
            "counters": self.counters,
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


JOB_OPEN_STATES = ("running", "interrupted", "failed")


@dataclass(frozen=True, slots=True)
class ListedObject:
    """One object as a listing page showed it (a slice member)."""

    key: str
    etag: str
    size: int
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class SliceClaim:
    """A worker's claim on one slice of a job: what ``apply_page`` checks and lands."""

    job_id: str
    seq: int
    worker: str


@dataclass(frozen=True, slots=True)
class SyncSlice:
    """One claimed slice: the listing page it stands for and the claim on it."""

    claim: SliceClaim
    objects: list[ListedObject]
    last_key: str | None
    final: bool
    attempts: int


def _objects_json(objects: Sequence[ListedObject]) -> str:
    return json.dumps(
        [[o.key, o.etag, o.size, o.last_modified.isoformat()] for o in objects],
        ensure_ascii=False,
    )


def _objects_from_json(text: str | None) -> list[ListedObject]:
    rows = json.loads(text or "[]")
    return [ListedObject(k, e, int(n), datetime.fromisoformat(t)) for k, e, n, t in rows]


def worker_lock_key(worker: str) -> int:
    """The PostgreSQL advisory lock a live sync worker holds for its session (its pulse)."""
    digest = hashlib.blake2b(f"sync-worker\x00{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """An object a sync job could not index, and why (``reason``: code and detail)."""

    store: str
    key: str
    etag: str
    size: int
    reason: str
    first_seen: datetime
    last_seen: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "key": self.key,
            "etag": self.etag,
            "size": self.size,
            "reason": self.reason,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
        }


# Rows per IN (...) list: well under SQLite's and asyncpg's bound-parameter limits.
IN_CHUNK = 900


def _chunks(values: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), IN_CHUNK):
        yield list(values[start : start + IN_CHUNK])


def _now() -> datetime:
    return datetime.now(UTC)


def patient_key(header: ParsedHeader, store: str) -> str:
    """The index's key of the patient of ``header`` read from ``store``.

    A local PatientID is unique only within its issuer, else within the producing
    institution, else (lacking both) within the store. A study without a usable PatientID
    (missing, empty or blank) gets a patient of its own, ``|study:<StudyInstanceUID>``:
    nothing says two such studies are one person's, and merging them would show one
    person's name on another's study and let a consent or break-glass for one open all.
    That key never equals an identified one: their scope is never empty, so one that
    starts with ``|`` has a second ``|`` before its PatientID, where a UID has none.
    """
    p = header.patient
    if not p.identified:
        return f"{UNIDENTIFIED_PREFIX}{header.study.StudyInstanceUID}"
    scope = p.IssuerOfPatientID or header.study.institution_code or f"store:{store}"
    return f"{scope}|{p.PatientID}"


UNIDENTIFIED_PREFIX = "|study:"
"""Start of the plain patient_key of a study's own patient (no usable PatientID)."""


def stored_patient_key(header: ParsedHeader, store: str, phi: PhiCodec | None) -> str:
    """``patient_key`` as the index stores it: blinded when the index is encrypted."""
    key = patient_key(header, store)
    return key if phi is None else phi.patient_key(key)


def _sealed_cells(
    phi: PhiCodec, table: str, row: str, values: Mapping[str, str | None]
) -> dict[str, Any]:
    """The sealed columns of the attribute table's entries in ``table`` (cells bound to
    row identity ``row``), with their blind indexes."""
    out: dict[str, Any] = {
        c: phi.seal(values[c], column=f"{table}.{c}", row=row) for c in _SEALED_OF[table]
    }
    for a in _BLINDED[table]:
        out[a.blind_index or ""] = phi.blind(values[a.column or ""], column=f"{table}.{a.column}")
    return out


def patient_cells(phi: PhiCodec, key: str, values: Mapping[str, str | None]) -> dict[str, Any]:
    """The stored patients columns of one patient (stored key ``key``): its PHI sealed,
    with the blind indexes. ``values`` holds the sealed attributes (PatientID,
    PatientName, PatientBirthDate) and national_id in the clear."""
    out = _sealed_cells(phi, "patients", key, values)
    out["national_id"] = phi.seal(values["national_id"], column="patients.national_id", row=key)
    out["national_id_bidx"] = phi.national_id_index(values["national_id"])
    out["name_search"] = None
    return out


def study_cells(phi: PhiCodec, uid: str, values: Mapping[str, str | None]) -> dict[str, Any]:
    """The stored PHI columns of one study: sealed, with the AccessionNumber blind index."""
    return _sealed_cells(phi, "studies", uid, values)


def series_cells(phi: PhiCodec, uid: str, values: Mapping[str, str | None]) -> dict[str, Any]:
    """The stored PHI columns of one series: sealed."""
    return _sealed_cells(phi, "series", uid, values)


def consent_cells(phi: PhiCodec, consent_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The stored PHI columns of one consent grant: sealed, with the identity's blind index."""
    out: dict[str, Any] = {
        c: phi.seal(values[c], column=f"consents.{c}", row=consent_id) for c in CONSENT_PHI
    }
    out["national_id_bidx"] = phi.national_id_index(values["national_id"])
    return out


# From the attribute table: its sealed entries per table (national_id, not a DICOM
# attribute, is the patients table's own).
PATIENT_PHI = (*sealed_columns("patients"), "national_id")
"""Sealed columns of patients (row identity: the stored patient_key)."""
STUDY_PHI = sealed_columns("studies")
"""Sealed columns of studies (row identity: StudyInstanceUID)."""
SERIES_PHI = sealed_columns("series")
"""Sealed columns of series (row identity: SeriesInstanceUID)."""
_SEALED_OF: dict[str, tuple[str, ...]] = {
    t: sealed_columns(t) for t in ("patients", "studies", "series")
}
_BLINDED: dict[str, tuple[Attribute, ...]] = {
    t: tuple(a for a in stored_attributes(t) if a.sealed and a.blind_index)
    for t in ("patients", "studies", "series")
}
CONSENT_PHI = ("national_id", "evidence")
"""Sealed columns of consents (row identity: the grant's id)."""

_RowPlan = tuple[EntityLevel, tuple[str, ...], Any, tuple[Attribute, ...]]


def _row_plan(level: EntityLevel) -> _RowPlan:
    """How an upsert row takes the header attributes of ``level`` from a ParsedHeader:
    (level, the columns its record has fields for, one getter of them all, the
    attributes it has no field for, read from ``ParsedHeader.extra``)."""
    fields = {f.name for f in dataclasses.fields(RECORD_TYPES[level])}
    attrs = header_attributes(level)
    columns = tuple(a.column for a in attrs if a.column in fields and a.column is not None)
    getter = operator.attrgetter(*columns) if len(columns) > 1 else (
        lambda record: tuple(getattr(record, c) for c in columns)
    )
    return level, columns, getter, tuple(a for a in attrs if a.column not in fields)


# The attributes each upsert row takes from the parsed header, per table: worked out once,
# one getter call per record (the sync writes every object's rows).
_UPSERTED = {
    LEVEL_TABLES[level]: _row_plan(level) for level in ("patient", "study", "series", "instance")
}


def _attribute_row(header: ParsedHeader, table: str) -> dict[str, Any]:
    """Column -> value of the header attributes ``table`` stores."""
    level, columns, getter, extra = _UPSERTED[table]
    row = dict(zip(columns, getter(getattr(header, level)), strict=True))
    for a in extra:
        row[a.column or ""] = header.value(a)
    return row


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def async_url(url: str, password: str | None) -> URL:
    """Map the configured URL to the async driver's URL."""
    u = make_url(url)
    if u.drivername == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in {"postgresql", "postgres"}:
        u = u.set(drivername="postgresql+asyncpg")
    if password is not None:
        u = u.set(password=password)
    return u


def _sqlite_folder(folder: Path, *, create: bool) -> None:
    """Make sure the SQLite file's folder exists; create it only when the gateway owns it.

    Raises ``ConfigError`` naming ``index.url`` when the folder is missing (and not
    ours to create) or cannot be created: a mistyped path must not become a new, empty
    index in a folder nobody asked for.
    """
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "index.url", f"cannot create the folder {folder}: {exc.strerror or exc}"
            ) from None
    elif not folder.is_dir():
        raise ConfigError(
            "index.url", f"the folder {folder} does not exist (create it, or correct the path)"
        )


# SQLSTATE classes 28 (invalid authorization) and 3D000 (no such database): the server
# answered and refused, which a retry or a network fix will not cure.
_REFUSALS = {
    "28000": "authentication refused: the role does not exist or may not log in",
    "28P01": "authentication refused: wrong password (index.password_env)",
    "3D000": "the database does not exist",
}


def _refusal(exc: BaseException) -> str | None:
    """What a PostgreSQL server's refusal to let us in says, or None if it is not one."""
    seen: BaseException | None = exc
    while seen is not None:
        state = getattr(seen, "sqlstate", None) or getattr(getattr(seen, "orig", None),
                                                           "sqlstate", None)
        if isinstance(state, str) and state in _REFUSALS:
            return _REFUSALS[state]
        seen = seen.__cause__
    return None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
    install_time_budget(dbapi_conn, _record)


_PG_SESSION = {"jit": "off", "random_page_cost": "1.1"}
"""Session settings of every PostgreSQL connection of the index.

No JIT: the server compiles a plan whose estimated cost passes ``jit_above_cost``
(100,000), which index statements on tens of millions of rows reach (a derived-data
recount at 10M instances was estimated at 4.7M), and compiling took 50-150 ms, more than
the statements themselves ever run; short indexed statements never gain from it.

``random_page_cost`` 1.1 (the default 4 models spinning disks): the searched tables are
meant to be in memory (see the README's "Toward 3 billion instances"), and at 4 a
fuzzy name search at 10M instances hash-joined all 95k patients (4,000 pages) instead
of looking up the few hundred whose keys matched (9,415 -> 7,166 pages for "zhang xin";
28% fewer pages over the bench's fuzzy name searches; its date-range searches read
4% more, the exact ones the same)."""


def _with_session(connect_args: dict[str, Any]) -> dict[str, Any]:
    settings = {**_PG_SESSION, **connect_args.get("server_settings", {})}
    return {**connect_args, "server_settings": settings}


class SqlIndex:
    """The study index. Open with ``await SqlIndex.open(settings)``; close with ``close()``."""

    def __init__(
        self,
        engine: AsyncEngine,
        search_engine: AsyncEngine | None = None,
        *,
        phi: PhiCodec | None = None,
    ) -> None:
        self.engine = engine
        self.phi = phi
        """Set when the index's PHI columns are encrypted (``[encryption] enabled``)."""
        self.search_engine = search_engine or engine
        """Engine of QIDO-RS searches: on PostgreSQL its own small pool of autocommit
        connections whose sessions enforce the search time budget (``session_time_budget``),
        so a search and its audit record take one round trip each; on an SQLite file a
        pool of its own, apart from the writers' (in WAL mode a reader never waits for the
        writer, nor here for a connection a writer holds); else ``engine``."""
        self.dialect = engine.dialect.name
        self.autocommit_engine = (
            self.search_engine
            if self.dialect == "postgresql" and self.search_engine is not engine
            else None
        )
        """PostgreSQL: ``search_engine``, whose connections are in autocommit mode (the
        audit log's group commits use it); None on SQLite."""
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._key_locks: dict[str, _KeyLock] = {}

    @classmethod
    async def open(
        cls,
        settings: IndexSettings,
        *,
        migrate: bool = True,
        phi: PhiCodec | None = None,
        check_phi: bool = True,
    ) -> SqlIndex:
        """Connect and bring the schema to the newest migration.

        With ``phi`` the index's PHI columns are sealed and looked up by blind index (its
        data keys loaded, ``load_phi_keys``). ``check_phi`` makes sure the database is in
        that state (``check_phi_state``). Raises ``IndexUnavailable`` when the database
        cannot be reached, ``ConfigError``, ``KeyNotFound`` and ``IntegrityError`` as
        ``load_phi_keys`` and ``check_phi_state`` do.
        """
        url = async_url(settings.url, settings.password)
        kwargs: dict[str, Any] = {"echo": settings.echo}
        if url.drivername.startswith("sqlite"):
            if url.database and url.database != ":memory:":
                _sqlite_folder(Path(url.database).parent, create=settings.create_folder)
            # SQLite has one writer; a few connections (each with its page cache and
            # thread) are all a sync job can use, and they bound memory.
            kwargs.update(pool_size=3, max_overflow=2)
        else:
            kwargs.update(
                pool_size=10,
                max_overflow=10,
                pool_pre_ping=True,
                connect_args={"server_settings": dict(_PG_SESSION)},
            )
        engine = create_async_engine(url, **kwargs)
        search_engine = None
        if url.drivername.startswith("sqlite"):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            if url.database and url.database != ":memory:":
                # Concurrent searches read on as many connections (each its own thread,
                # sqlite3 releasing the GIL while a statement runs). Kept open: a
                # connection beyond ``pool_size`` is closed when given back, and its
                # successor starts with a cold page cache.
                search_engine = create_async_engine(
                    url, echo=settings.echo, pool_size=10, max_overflow=6, pool_use_lifo=True
                )
                event.listen(search_engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            search_engine = create_async_engine(
                url,
                echo=settings.echo,
                # As an execution option (not the dialect's), so connections say so.
                execution_options={"isolation_level": "AUTOCOMMIT"},
                connect_args=_with_session(session_time_budget()),
                # Eight searches at once and the audit group commit's writer all keep
                # their connections: one beyond ``pool_size`` is closed when given back,
                # and a new one costs a backend start and re-preparing every statement
                # (with 5 connections, 8 clients opened one for 15% of their searches).
                pool_size=10,
                max_overflow=10,
                # No pre-ping: Gate.search retries a search whose pooled connection died.
            )
            event.listen(search_engine.sync_engine, "connect", mark_session_time_budget())
        index = cls(engine, search_engine, phi=phi)
        try:
            if migrate:
                await index.migrate()
            else:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            if phi is not None:
                await index.load_phi_keys()
            if check_phi:
                await index.check_phi_state()
        except GatewayError:  # a wrong PHI state or key: no engine left open
            await index.close()
            raise
        except (OperationalError, DBAPIError, OSError) as exc:
            await index.close()
            where = url.render_as_string(hide_password=True)
            refused = _refusal(exc)
            if refused is not None:
                raise ConfigError("index.url", f"{where}: {refused}") from exc
            raise IndexUnavailable(
                f"index database {where} unreachable: {exc.__class__.__name__}"
            ) from exc
        return index

    async def migrate(self) -> None:
        """Run Alembic migrations up to head on one connection.

        On PostgreSQL under a transaction-level advisory lock: processes started together
        on a new database (several sync workers, gateways) migrate one after the other,
        the later ones finding the schema at head.
        """

        def run(sync_conn: Connection) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, "head")

        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            await conn.run_sync(run)

    async def load_phi_keys(self) -> None:
        """Unwrap the index's PHI data keys into the codec (made on first use).

        A key wrapped under another key version than the keyring's current one is
        re-wrapped under it, one row each: after ``keys rotate`` the next open moves the
        index off the old version, and no cell is re-encrypted. Raises ``KeyNotFound``
        naming the key id and version a wrapped key needs, ``IntegrityError`` if it does
        not authenticate (another keyring under the same id).
        """
        phi = self.phi
        assert phi is not None
        t = index_keys
        async with self.engine.begin() as conn:
            rows = (await conn.execute(sa.select(t).order_by(t.c.number))).all()
            if not rows:
                key = secrets.token_bytes(phi.keyring.suite.key_size)
                key_id, version, wrapped = phi.wrap_key(1, key)
                # Two processes opening a new index together: one row wins, both use it.
                await conn.execute(
                    self._insert(t).on_conflict_do_nothing(),
                    {
                        "number": 1,
                        "key_id": key_id,
                        "key_version": version,
                        "wrapped": base64.b64encode(wrapped).decode("ascii"),
                        "created_at": _now(),
                    },
                )
                rows = (await conn.execute(sa.select(t).order_by(t.c.number))).all()
            current = phi.keyring.current()
            for r in rows:
                key = phi.install(r.number, r.key_id, r.key_version, base64.b64decode(r.wrapped))
                if (r.key_id, r.key_version) != current:
                    key_id, version, wrapped = phi.wrap_key(r.number, key)
                    await conn.execute(
                        t.update()
                        .where(t.c.number == r.number)
                        .values(
                            key_id=key_id,
                            key_version=version,
                            wrapped=base64.b64encode(wrapped).decode("ascii"),
                        )
                    )

    async def phi_key_versions(self) -> set[tuple[str, int]]:
        """The (key id, version) pairs the index's PHI data keys are wrapped under."""
        async with self.engine.connect() as conn:
            q = sa.select(index_keys.c.key_id, index_keys.c.key_version)
            return {(r[0], int(r[1])) for r in await conn.execute(q)}

    async def check_phi_state(self) -> None:
        """Refuse an index whose PHI columns are not in the state the settings say.

        Encrypted settings and patient rows not yet sealed, or plain settings and sealed
        rows: ``ConfigError`` saying what to do. With encryption, one sealed cell is opened
        (``IntegrityError`` at start-up rather than mid-request if it does not).
        """
        column = patients.c.PatientID_bidx
        async with self.engine.connect() as conn:
            if self.phi is None:
                sealed = (
                    await conn.execute(sa.select(patients.c.id).where(column.is_not(None)).limit(1))
                ).first()
                if sealed is not None:
                    raise ConfigError(
                        "encryption.enabled",
                        "the index's PHI columns are encrypted; set [encryption] enabled = true "
                        "with the keyring that sealed them",
                    )
                return
            plain = (
                await conn.execute(sa.select(patients.c.id).where(column.is_(None)).limit(1))
            ).first()
            if plain is not None:
                raise ConfigError(
                    "encryption.enabled",
                    "the index holds patient rows whose PHI columns are not encrypted yet; "
                    "run `imaging-gateway seal-index` (resumable) before serving",
                )
            sample = (
                await conn.execute(sa.select(patients.c.patient_key, patients.c.PatientID).limit(1))
            ).first()
        if sample is not None:
            self.phi.open(sample[1], column="patients.PatientID", row=sample[0])

    async def close(self) -> None:
        await self.engine.dispose()
        if self.search_engine is not self.engine:
            await self.search_engine.dispose()

    async def ping(self) -> None:
        """Raises ``IndexUnavailable`` when the database does not answer."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (OperationalError, DBAPIError, OSError) as exc:
            raise IndexUnavailable(f"index database unreachable: {exc.__class__.__name__}") from exc

    # ------------------------------------------------------------------ sync support

    async def known_objects(self, store: str, keys: Sequence[str]) -> dict[str, KnownObject]:
        """What the index holds for these keys of ``store``: instances and quarantine entries."""
        out: dict[str, KnownObject] = {}
        async with self.engine.connect() as conn:
            for chunk in _chunks(keys):
                for table, quarantined in ((instances, False), (quarantine, True)):
                    q = sa.select(table.c.key, table.c.etag, table.c.size).where(
                        table.c.store == store, table.c.key.in_(chunk)
                    )
                    for key, etag, size in (await conn.execute(q)).all():
                        out[key] = KnownObject(etag=etag, size=size, quarantined=quarantined)
        return out

    async def count_objects(self, store: str) -> int:
        """Instances plus quarantined objects of one store (the size of its last listing)."""
        async with self.engine.connect() as conn:
            n = 0
            for table in (instances, quarantine):
                q = sa.select(sa.func.count()).select_from(table).where(table.c.store == store)
                n += int((await conn.execute(q)).scalar_one())
            return n

    async def apply_page(
        self,
        *,
        store: str,
        province: str,
        job_id: str,
        indexed: Sequence[IndexedObject],
        quarantined: Sequence[QuarantinedObject],
        deleted: Sequence[str],
        unchanged: Sequence[str] = (),
        cursor: str | None,
        counters: dict[str, int],
        hospital: str | None = None,
        producers: Mapping[str, str | None] | None = None,
        claim: SliceClaim | None = None,
    ) -> int:
        """Apply one listing page and move the job's checkpoint, in one transaction.

        Either everything of the page lands, with the cursor, or nothing does: a job
        killed at any point resumes from the last page that landed. Every listed key
        (indexed, quarantined or ``unchanged``) is marked as seen by ``job_id``.
        ``hospital`` is the store's configured hospital: the producer of its studies
        (else each study's DICOM institution code is). ``producers``, when given, maps
        each indexed key to its study's producer (None: no producer) instead.
        Returns the number of SOPInstanceUID conflicts newly recorded.

        With ``claim`` the page is that slice of the job (``claim_slice``): the claim is
        checked first (``SliceLost`` when another worker holds the slice now), the slice
        is marked done with ``counters`` as its share (plus the conflicts), which is added
        to the job's counters, and ``cursor`` is ignored: the job's checkpoint becomes the
        last key of its slices done without a gap. ``Conflict`` when the job was
        abandoned or finished meanwhile.
        """
        now = _now()
        async with self.engine.begin() as conn:
            if claim is not None:
                await self._check_claim(conn, claim)
            touched_series: set[int] = set()
            await self._mark_seen(conn, store, job_id, unchanged)
            gone = [*deleted, *(q.key for q in quarantined)]
            if gone:
                touched_series |= await self._remove_instances(
                    conn, store, gone, tombstone_keys=set(deleted), job_id=job_id, now=now
                )
            if quarantined:
                await self._quarantine(conn, store, quarantined, job_id, now)
            if deleted:
                await conn.execute(
                    quarantine.delete().where(
                        quarantine.c.store == store, quarantine.c.key.in_(list(deleted))
                    )
                )
            new_conflicts = 0
            touched_studies: set[int] = set()
            if indexed:
                gone_series, touched_studies = await self._upsert(
                    conn,
                    store,
                    province,
                    job_id,
                    indexed,
                    now,
                    hospital=hospital,
                    producers=producers,
                )
                touched_series |= gone_series
                new_conflicts = await self._record_conflicts(conn, store, indexed, now)
            touched_studies |= await self._drop_orphans(conn, touched_series)
            # Counts, ModalitiesInStudy and name search keys that QIDO-RS matches on.
            await refresh_derived(conn, touched_studies, phi=self.phi)
            if claim is not None:
                await self._land_slice(conn, claim, counters, new_conflicts, now)
                return new_conflicts
            await conn.execute(
                sync_jobs.update()
                .where(sync_jobs.c.id == job_id)
                .values(cursor=cursor, counters=json.dumps(counters), updated_at=now)
            )
        return new_conflicts

    async def _check_claim(self, conn: AsyncConnection, claim: SliceClaim) -> None:
        t = sync_slices.c
        row = (
            await conn.execute(
                sa.select(t.state, t.claimed_by)
                .where(t.job_id == claim.job_id, t.seq == claim.seq)
                .with_for_update()
            )
        ).first()
        if row is None or row.state != "claimed" or row.claimed_by != claim.worker:
            raise SliceLost(f"sync slice {claim.seq} of job {claim.job_id} is no longer ours")

    async def _lock_job(
        self, conn: AsyncConnection, job_id: str, *, succeeded_ok: bool = False
    ) -> dict[str, int] | None:
        """Lock the job row for this transaction; its counters. ``Conflict`` unless open
        (None for a job another worker finished, with ``succeeded_ok``)."""
        row = (
            await conn.execute(
                sa.select(sync_jobs.c.status, sync_jobs.c.counters)
                .where(sync_jobs.c.id == job_id)
                .with_for_update()
            )
        ).first()
        if succeeded_ok and row is not None and row.status == "succeeded":
            return None
        if row is None or row.status not in JOB_OPEN_STATES:
            status = "missing" if row is None else row.status
            raise Conflict(f"sync job {job_id} is {status}: its workers stop")
        return {k: int(v) for k, v in json.loads(row.counters or "{}").items()}

    async def _land_slice(
        self,
        conn: AsyncConnection,
        claim: SliceClaim,
        share: Mapping[str, int],
        new_conflicts: int,
        now: datetime,
    ) -> None:
        t = sync_slices.c
        share = {**share, "conflicts": share.get("conflicts", 0) + new_conflicts}
        await conn.execute(
            sync_slices.update()
            .where(t.job_id == claim.job_id, t.seq == claim.seq)
            .values(state="done", objects=None, lease_until=None, counters=json.dumps(share))
        )
        totals = await self._lock_job(conn, claim.job_id)
        assert totals is not None
        for name, value in share.items():
            totals[name] = totals.get(name, 0) + value
        # The checkpoint: the last key of the slices done without a gap before them.
        gap = (
            sa.select(sa.func.min(t.seq))
            .where(t.job_id == claim.job_id, t.state != "done")
            .scalar_subquery()
        )
        q = (
            sa.select(t.last_key)
            .where(
                t.job_id == claim.job_id,
                t.state == "done",
                sa.or_(gap.is_(None), t.seq < gap),
            )
            .order_by(t.seq.desc())
            .limit(1)
        )
        cursor = (await conn.execute(q)).scalar_one_or_none()
        await conn.execute(
            sync_jobs.update()
            .where(sync_jobs.c.id == claim.job_id)
            .values(cursor=cursor, counters=json.dumps(totals), updated_at=now)
        )

    async def _mark_seen(
        self, conn: AsyncConnection, store: str, job_id: str, keys: Sequence[str]
    ) -> None:
        for chunk in _chunks(keys):
            for table in (instances, quarantine):
                await conn.execute(
                    table.update()
                    .where(table.c.store == store, table.c.key.in_(chunk))
                    .values(seen_job=job_id)
                )

    async def sweep_unseen(
        self, *, store: str, job_id: str, batch: int = 500, tally: bool = False
    ) -> list[str]:
        """After a complete listing: objects of ``store`` the job did not see are deleted.

        Instances become tombstones; quarantine entries are dropped. Runs in batches,
        each its own transaction; idempotent, so a job killed mid-sweep sweeps again.
        With ``tally`` each batch holds the job's row lock (workers of one job sweeping
        together take turns, so nothing is tombstoned twice) and adds what it deleted to
        the job's ``deleted`` counter; ``Conflict`` if the job is no longer open.
        Returns the deleted keys.
        """
        gone: list[str] = []
        while True:
            async with self.engine.begin() as conn:
                totals: dict[str, int] | None = {}
                if tally:
                    totals = await self._lock_job(conn, job_id, succeeded_ok=True)
                    if totals is None:  # another worker of the job swept and finished it
                        return sorted(gone)
                keys = [
                    r[0]
                    for r in (
                        await conn.execute(
                            sa.select(instances.c.key)
                            .where(
                                instances.c.store == store,
                                sa.or_(
                                    instances.c.seen_job.is_(None), instances.c.seen_job != job_id
                                ),
                            )
                            .limit(batch)
                        )
                    ).all()
                ]
                if keys:
                    series_ids = await self._remove_instances(
                        conn, store, keys, tombstone_keys=set(keys), job_id=job_id, now=_now()
                    )
                    await refresh_derived(
                        conn, await self._drop_orphans(conn, series_ids), phi=self.phi
                    )
                    if totals is not None and tally:
                        await self._add_deleted(conn, job_id, totals, len(keys))
                else:
                    result = await conn.execute(
                        quarantine.delete()
                        .where(
                            quarantine.c.store == store,
                            sa.or_(
                                quarantine.c.seen_job.is_(None), quarantine.c.seen_job != job_id
                            ),
                        )
                        .returning(quarantine.c.key)
                    )
                    dropped = [r[0] for r in result.all()]
                    if totals is not None and tally and dropped:
                        await self._add_deleted(conn, job_id, totals, len(dropped))
                    gone.extend(dropped)
                    return sorted(gone)
            gone.extend(keys)

    @staticmethod
    async def _add_deleted(
        conn: AsyncConnection, job_id: str, totals: dict[str, int], n: int
    ) -> None:
        totals["deleted"] = totals.get("deleted", 0) + n
        await conn.execute(
            sync_jobs.update()
            .where(sync_jobs.c.id == job_id)
            .values(counters=json.dumps(totals), updated_at=_now())
        )

    async def _remove_instances(
        self,
        conn: AsyncConnection,
        store: str,
        keys: list[str],
        *,
        tombstone_keys: set[str],
        job_id: str,
        now: datetime,
    ) -> set[int]:
        rows = (
            await conn.execute(
                sa.select(
                    instances.c.key,
                    instances.c.etag,
                    instances.c.SOPInstanceUID,
                    instances.c.series_id,
                ).where(instances.c.store == store, instances.c.key.in_(keys))
            )
        ).all()
        if not rows:
            return set()
        stones = [
            {
                "store": store,
                "key": k,
                "etag": e,
                "SOPInstanceUID": sop,
                "job_id": job_id,
                "deleted_at": now,
            }
            for k, e, sop, _ in rows
            if k in tombstone_keys
        ]
        if stones:
            await conn.execute(tombstones.insert(), stones)
        found = [r[0] for r in rows]
        await conn.execute(
            instances.delete().where(instances.c.store == store, instances.c.key.in_(found))
        )
        await self._forget_conflicts(conn, store, found)
        return {r[3] for r in rows}

    async def _forget_conflicts(self, conn: AsyncConnection, store: str, keys: list[str]) -> None:
        await conn.execute(
            conflicts.delete().where(
                sa.or_(
                    sa.and_(conflicts.c.store == store, conflicts.c.key.in_(keys)),
                    sa.and_(conflicts.c.other_store == store, conflicts.c.other_key.in_(keys)),
                )
            )
        )

    async def _quarantine(
        self,
        conn: AsyncConnection,
        store: str,
        items: Sequence[QuarantinedObject],
        job_id: str,
        now: datetime,
    ) -> None:
        stmt = self._insert(quarantine)
        stmt = stmt.on_conflict_do_update(
            index_elements=[quarantine.c.store, quarantine.c.key],
            set_={
                "etag": stmt.excluded.etag,
                "size": stmt.excluded.size,
                "reason": stmt.excluded.reason,
                "last_seen": stmt.excluded.last_seen,
                "seen_job": stmt.excluded.seen_job,
            },
        )
        await conn.execute(
            stmt,
            [
                {
                    "store": store,
                    "key": q.key,
                    "etag": q.etag,
                    "size": q.size,
                    "reason": q.reason,
                    "first_seen": now,
                    "last_seen": now,
                    "seen_job": job_id,
                }
                for q in items
            ],
        )

    async def _upsert_rows(
        self,
        conn: AsyncConnection,
        table: sa.Table,
        natural_key: str,
        rows: dict[str, dict[str, Any]],
        *,
        keep: Iterable[str] = (),
        existing_wins: Iterable[str] = (),
    ) -> dict[str, int]:
        """Upsert rows by their natural key. Returns key -> id.

        Non-null values of the row with the greater ``source_key`` (the object key it was
        built from) win, whichever lands first: several sync workers end with the index one
        builds in key order. Without a ``source_key`` the newer non-null values win. Columns
        in ``keep`` always take the new value (even null); columns in ``existing_wins``
        keep a non-null stored value.
        """
        if not rows:
            return {}
        stmt = self._insert(table)
        cols = [c for c in next(iter(rows.values())) if c != natural_key]
        newer: sa.ColumnElement[bool] = sa.true()
        if "source_key" in cols:
            newer = stmt.excluded.source_key >= sa.func.coalesce(table.c.source_key, "")

        def merged(c: str) -> sa.ColumnElement[Any]:
            new, old = stmt.excluded[c], table.c[c]
            if c in keep:
                return new
            if c in existing_wins:
                return sa.func.coalesce(old, new)
            if c == "source_key":
                return sa.case((newer, new), else_=old)
            return sa.case((newer, sa.func.coalesce(new, old)), else_=sa.func.coalesce(old, new))

        set_ = {c: merged(c) for c in cols}
        stmt = stmt.on_conflict_do_update(index_elements=[table.c[natural_key]], set_=set_)
        keys = sorted(rows)
        await conn.execute(stmt, [rows[k] for k in keys])
        ids: dict[str, int] = {}
        for chunk in _chunks(keys):
            q = sa.select(table.c[natural_key], table.c.id).where(table.c[natural_key].in_(chunk))
            ids.update({k: i for k, i in (await conn.execute(q)).all()})
        return ids

    async def _upsert(
        self,
        conn: AsyncConnection,
        store: str,
        province: str,
        job_id: str | None,
        items: Sequence[IndexedObject],
        now: datetime,
        *,
        hospital: str | None,
        owner_wins: bool = False,
        producers: Mapping[str, str | None] | None = None,
    ) -> tuple[set[int], set[int]]:
        """Upsert the page's records; returns (series that may be orphaned, studies touched).

        ``owner_wins`` (STOW-RS) keeps an existing study's producing hospital and an
        existing series' study, where a sync lets the newest object decide.
        """
        keys = [o.key for o in items]
        old_series = {
            r[0]
            for r in (
                await conn.execute(
                    sa.select(instances.c.series_id).where(
                        instances.c.store == store, instances.c.key.in_(keys)
                    )
                )
            ).all()
        }
        await conn.execute(
            quarantine.delete().where(quarantine.c.store == store, quarantine.c.key.in_(keys))
        )
        # Later objects (in key order) win for attributes that differ: deterministic
        # whatever the order the header reads completed in, and on resume.
        in_key_order = sorted(items, key=lambda o: o.key)
        pat_rows: dict[str, dict[str, Any]] = {}
        study_rows: dict[str, dict[str, Any]] = {}
        series_rows: dict[str, dict[str, Any]] = {}
        pkey_of: dict[str, str] = {}
        phi = self.phi
        # A study an object names an identified patient for stays that patient's: an object
        # of it without a usable PatientID (a report, a secondary capture) does not take it
        # to a patient of its own (patient_key), whether the study's identified object is
        # in this page (the last one in key order) or already indexed.
        named: dict[str, str] = {}
        for o in in_key_order:
            pkey_of[o.key] = stored_patient_key(o.header, store, phi)
            if o.header.patient.identified:
                named[o.header.study.StudyInstanceUID] = pkey_of[o.key]
        anonymous = {
            o.header.study.StudyInstanceUID for o in in_key_order if not o.header.patient.identified
        }
        held = await self._identified_patients(conn, sorted(anonymous - set(named)))
        for o in in_key_order:
            p = o.header.patient
            uid = o.header.study.StudyInstanceUID
            if not p.identified and (uid in named or uid in held):
                continue
            pkey = pkey_of[o.key]
            row: dict[str, Any] = {
                "patient_key": pkey,
                **_attribute_row(o.header, "patients"),
                "national_id": p.national_id,
                "source_key": o.key,
            }
            if phi is not None:
                row.update(patient_cells(phi, pkey, row))
            pat_rows[pkey] = row
        patient_ids = await self._upsert_rows(conn, patients, "patient_key", pat_rows)
        for o in in_key_order:
            s = o.header.study
            if o.header.patient.identified:
                patient_id = patient_ids[pkey_of[o.key]]
            elif s.StudyInstanceUID in named:
                patient_id = patient_ids[named[s.StudyInstanceUID]]
            elif s.StudyInstanceUID in held:
                patient_id = held[s.StudyInstanceUID]
            else:
                patient_id = patient_ids[pkey_of[o.key]]
            study_rows[s.StudyInstanceUID] = {
                **_attribute_row(o.header, "studies"),
                "source_key": o.key,
                "patient_id": patient_id,
                "institution_code": s.institution_code,
                "province": province,
                "hospital": (
                    producers[o.key] if producers is not None else hospital or s.institution_code
                ),
            }
            if phi is not None:
                study_rows[s.StudyInstanceUID].update(
                    study_cells(phi, s.StudyInstanceUID, study_rows[s.StudyInstanceUID])
                )
        study_ids = await self._upsert_rows(
            conn,
            studies,
            "StudyInstanceUID",
            study_rows,
            keep=("patient_id", "province"),
            existing_wins=("hospital",) if owner_wins else (),
        )
        for o in in_key_order:
            se = o.header.series
            series_rows[se.SeriesInstanceUID] = {
                **_attribute_row(o.header, "series"),
                "source_key": o.key,
                "study_id": study_ids[o.header.study.StudyInstanceUID],
            }
            if phi is not None:
                row = series_rows[se.SeriesInstanceUID]
                row.update(series_cells(phi, se.SeriesInstanceUID, row))
        series_ids = await self._upsert_rows(
            conn,
            series,
            "SeriesInstanceUID",
            series_rows,
            keep=() if owner_wins else ("study_id",),
            existing_wins=("study_id",) if owner_wins else (),
        )
        stmt = self._insert(instances)
        inst_rows = []
        for o in in_key_order:
            inst_rows.append(
                {
                    **_attribute_row(o.header, "instances"),
                    "series_id": series_ids[o.header.series.SeriesInstanceUID],
                    "SpecificCharacterSet": o.header.SpecificCharacterSet,
                    "store": store,
                    "key": o.key,
                    "etag": o.etag,
                    "size": o.size,
                    "last_modified": o.last_modified,
                    "header_sha256": o.header_sha256,
                    "header_bytes": o.header.header_bytes,
                    "province": province,
                    "indexed_at": now,
                    "seen_job": job_id,
                }
            )
        update_cols = [c for c in inst_rows[0] if c not in {"store", "key"}]
        set_: dict[str, Any] = {c: stmt.excluded[c] for c in update_cols}
        if owner_wins:
            # A sync job that indexed this key meanwhile keeps its mark (see index_stored).
            set_["seen_job"] = sa.func.coalesce(stmt.excluded.seen_job, instances.c.seen_job)
        stmt = stmt.on_conflict_do_update(
            index_elements=[instances.c.store, instances.c.key], set_=set_
        )
        await conn.execute(stmt, inst_rows)
        return old_series - set(series_ids.values()), set(study_ids.values())

    async def _identified_patients(
        self, conn: AsyncConnection, study_uids: Sequence[str]
    ) -> dict[str, int]:
        """StudyInstanceUID -> patient row id, of those studies indexed under a patient with
        a usable PatientID (a sealed one compared by its blind index)."""
        if not study_uids:
            return {}
        if self.phi is None:
            usable = sa.func.trim(patients.c.PatientID) != ""
        else:
            blank = self.phi.blind("", column="patients.PatientID")
            usable = patients.c.PatientID_bidx != blank
        out: dict[str, int] = {}
        for chunk in _chunks(study_uids):
            q = (
                sa.select(studies.c.StudyInstanceUID, studies.c.patient_id)
                .join(patients, patients.c.id == studies.c.patient_id)
                .where(studies.c.StudyInstanceUID.in_(chunk), usable)
            )
            out.update({uid: pid for uid, pid in (await conn.execute(q)).all()})
        return out

    async def _record_conflicts(
        self, conn: AsyncConnection, store: str, items: Sequence[IndexedObject], now: datetime
    ) -> int:
        """Record pairs of objects that claim one SOPInstanceUID with different content.

        Same content means the same ETag, or the same size and the same header digest
        (a replica under another key or in another store); anything else is a conflict.
        Both objects stay indexed; nothing is overwritten.
        """
        keys = [o.key for o in items]
        await self._forget_conflicts(conn, store, keys)
        sops = sorted({o.header.instance.SOPInstanceUID for o in items})
        rows: list[Any] = []
        for chunk in _chunks(sops):
            q = sa.select(
                instances.c.SOPInstanceUID,
                instances.c.store,
                instances.c.key,
                instances.c.etag,
                instances.c.size,
                instances.c.header_sha256,
            ).where(instances.c.SOPInstanceUID.in_(chunk))
            rows.extend((await conn.execute(q)).all())
        by_sop: dict[str, list[Any]] = {}
        for r in rows:
            by_sop.setdefault(r[0], []).append(r)
        new: list[dict[str, Any]] = []
        mine = set(keys)
        for sop, group in by_sop.items():
            if len(group) < 2:
                continue
            group.sort(key=lambda r: (r[1], r[2]))
            for a_i, a in enumerate(group):
                for b in group[a_i + 1 :]:
                    if not ((a[1] == store and a[2] in mine) or (b[1] == store and b[2] in mine)):
                        continue
                    if a[3] == b[3] or (a[4] == b[4] and a[5] == b[5]):
                        continue
                    reason = "different-size" if a[4] != b[4] else "different-content"
                    new.append(
                        {
                            "SOPInstanceUID": sop,
                            "store": a[1],
                            "key": a[2],
                            "other_store": b[1],
                            "other_key": b[2],
                            "reason": reason,
                            "detected_at": now,
                        }
                    )
        if new:
            stmt = self._insert(conflicts).on_conflict_do_nothing()
            await conn.execute(stmt, new)
        return len(new)

    async def _drop_orphans(self, conn: AsyncConnection, series_ids: set[int]) -> set[int]:
        """Remove series, then studies, then patients left without children.

        Returns the ids of the studies those series belonged to (some may be gone now).
        """
        if not series_ids:
            return set()
        ids = sorted(series_ids)
        study_ids = {
            r[0]
            for r in (
                await conn.execute(sa.select(series.c.study_id).where(series.c.id.in_(ids)))
            ).all()
        }
        has_inst = sa.select(instances.c.id).where(instances.c.series_id == series.c.id).exists()
        await conn.execute(series.delete().where(series.c.id.in_(ids), ~has_inst))
        if not study_ids:
            return study_ids
        patient_ids = {
            r[0]
            for r in (
                await conn.execute(
                    sa.select(studies.c.patient_id).where(studies.c.id.in_(sorted(study_ids)))
                )
            ).all()
        }
        has_series = sa.select(series.c.id).where(series.c.study_id == studies.c.id).exists()
        await conn.execute(studies.delete().where(studies.c.id.in_(sorted(study_ids)), ~has_series))
        has_study = sa.select(studies.c.id).where(studies.c.patient_id == patients.c.id).exists()
        await conn.execute(
            patients.delete().where(patients.c.id.in_(sorted(patient_ids)), ~has_study)
        )
        return study_ids

    # ------------------------------------------------------------------ jobs

    async def create_job(self, store: str, mode: str) -> SyncJob:
        now = _now()
        job_id = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            await conn.execute(
                sync_jobs.insert().values(
                    id=job_id,
                    store=store,
                    mode=mode,
                    status="running",
                    cursor=None,
                    counters="{}",
                    error=None,
                    created_at=now,
                    updated_at=now,
                    finished_at=None,
                )
            )
        return await self.get_job(job_id)

    async def get_job(self, job_id: str) -> SyncJob:
        """Raises ``NotFound`` for an unknown id."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(sync_jobs).where(sync_jobs.c.id == job_id))).first()
        if row is None:
            raise NotFound("no sync job with this id")
        return self._job(row)

    async def list_jobs(self, *, store: str | None = None, limit: int = 50) -> list[SyncJob]:
        q = sa.select(sync_jobs).order_by(sync_jobs.c.created_at.desc()).limit(limit)
        if store is not None:
            q = q.where(sync_jobs.c.store == store)
        async with self.engine.connect() as conn:
            return [self._job(r) for r in (await conn.execute(q)).all()]

    async def list_quarantine(
        self, *, store: str | None = None, after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantined objects in (store, key) order, the first ``limit`` after ``after``.

        Keyset paging on the primary key: pass the (store, key) of a page's last entry
        to get the next page; entries added or removed meanwhile shift nothing. Raises
        ``IndexUnavailable`` as every query does.
        """
        q = sa.select(quarantine).order_by(quarantine.c.store, quarantine.c.key).limit(limit)
        if store is not None:
            q = q.where(quarantine.c.store == store)
        if after is not None:
            after_store, after_key = after
            q = q.where(
                sa.or_(
                    quarantine.c.store > after_store,
                    sa.and_(quarantine.c.store == after_store, quarantine.c.key > after_key),
                )
            )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        out: list[QuarantineEntry] = []
        for row in rows:
            m = row._mapping
            first, last = _aware(m["first_seen"]), _aware(m["last_seen"])
            assert first is not None and last is not None  # NOT NULL columns
            out.append(
                QuarantineEntry(
                    store=m["store"], key=m["key"], etag=m["etag"], size=int(m["size"]),
                    reason=m["reason"], first_seen=first, last_seen=last,
                )
            )
        return out

    async def open_job(self, store: str) -> SyncJob | None:
        """The newest unfinished job of ``store`` (running when killed, interrupted or failed)."""
        q = (
            sa.select(sync_jobs)
            .where(sync_jobs.c.store == store, sync_jobs.c.status.in_(JOB_OPEN_STATES))
            .order_by(sync_jobs.c.created_at.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else self._job(row)

    async def create_or_join_job(self, store: str, mode: str) -> tuple[SyncJob, bool]:
        """The store's unfinished job, else a new one; True when it was created here.

        On PostgreSQL a transaction-level advisory lock per store makes workers starting
        together agree on one job (SQLite serves one process, held by the store lock).
        """
        now = _now()
        job_id = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_job_lock_key(store))))
            found = (
                await conn.execute(
                    sa.select(sync_jobs.c.id)
                    .where(sync_jobs.c.store == store, sync_jobs.c.status.in_(JOB_OPEN_STATES))
                    .order_by(sync_jobs.c.created_at.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            if found is None:
                await conn.execute(
                    sync_jobs.insert().values(
                        id=job_id, store=store, mode=mode, status="running", cursor=None,
                        counters="{}", error=None, created_at=now, updated_at=now,
                        finished_at=None,
                    )
                )
        return await self.get_job(found or job_id), found is None

    async def next_listing(self, job_id: str) -> tuple[int, str | None] | None:
        """Where the job's listing goes on: (next slice number, key to list after), or
        None once its last page is a slice."""
        t = sync_slices.c
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(t.seq, t.last_key, t.final)
                    .where(t.job_id == job_id)
                    .order_by(t.seq.desc())
                    .limit(1)
                )
            ).first()
        if row is None:
            job = await self.get_job(job_id)
            # A job checkpointed before 0009 lists on from its cursor.
            return 0, job.cursor
        if row.final:
            return None
        return row.seq + 1, row.last_key

    async def add_slice(
        self,
        job_id: str,
        seq: int,
        *,
        after_key: str | None,
        objects: Sequence[ListedObject],
        final: bool,
    ) -> bool:
        """Record a listing page as slice ``seq`` of the job, unclaimed.

        False when another worker recorded that slice first (its page is the one kept).
        """
        values = {
            "job_id": job_id,
            "seq": seq,
            "after_key": after_key,
            "last_key": objects[-1].key if objects else after_key,
            "final": final,
            "objects": _objects_json(objects),
            "state": "pending",
            "claimed_by": None,
            "lease_until": None,
            "attempts": 0,
            "counters": None,
        }
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._insert(sync_slices).values(**values).on_conflict_do_nothing()
            )
        return bool(result.rowcount)

    @contextlib.asynccontextmanager
    async def sync_worker(self, worker: str) -> AsyncIterator[None]:
        """Be a live sync worker while the block runs.

        On PostgreSQL: a session advisory lock named after ``worker`` on a connection of
        its own. Its session ending (the process killed, the machine gone) releases it,
        which tells the other workers that ``worker``'s claims are void at once, without
        waiting for its leases to expire. On SQLite nothing (one process, store lock).
        """
        if self.dialect != "postgresql":
            yield
            return
        async with self.engine.connect() as conn:
            await conn.execute(sa.select(sa.func.pg_advisory_lock(worker_lock_key(worker))))
            await conn.commit()
            try:
                yield
            finally:
                with contextlib.suppress(OperationalError, DBAPIError, OSError):
                    await conn.execute(
                        sa.select(sa.func.pg_advisory_unlock(worker_lock_key(worker)))
                    )
                    await conn.commit()

    async def claim_slice(
        self, job_id: str, worker: str, *, now: datetime, lease_s: float, exclusive: bool
    ) -> SyncSlice | None:
        """Claim the first slice of the job nobody works on, for ``lease_s`` from ``now``.

        Claimable: unclaimed, or claimed with a lease that ended before ``now``, or (on
        PostgreSQL) claimed by a worker whose session is gone (``sync_worker``), or, with
        ``exclusive`` (the caller holds the store alone: SQLite), claimed by anyone else.
        Rows other workers are claiming are skipped (``FOR UPDATE SKIP LOCKED``). None
        when nothing is claimable now, or the job succeeded (another worker finished
        it). ``Conflict`` when the job was abandoned.
        """
        t = sync_slices.c
        async with self.engine.begin() as conn:
            status = (
                await conn.execute(sa.select(sync_jobs.c.status).where(sync_jobs.c.id == job_id))
            ).scalar_one_or_none()
            if status == "succeeded":
                return None  # another worker landed the last slice and finished the job
            if status not in JOB_OPEN_STATES:
                raise Conflict(f"sync job {job_id} is {status or 'missing'}: its workers stop")
            taken = sa.and_(t.state == "claimed", t.claimed_by != worker)
            if exclusive:
                stale = taken
            else:
                dead = await self._dead_workers(conn, job_id, worker, now)
                gone = t.claimed_by.in_(dead) if dead else sa.false()
                stale = sa.and_(taken, sa.or_(t.lease_until < now, gone))
            q = (
                sa.select(t.seq, t.objects, t.last_key, t.final, t.attempts)
                .where(t.job_id == job_id, sa.or_(t.state == "pending", stale))
                .order_by(t.seq)
                .limit(1)
            )
            if self.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            row = (await conn.execute(q)).first()
            if row is None:
                return None
            await conn.execute(
                sync_slices.update()
                .where(t.job_id == job_id, t.seq == row.seq)
                .values(
                    state="claimed",
                    claimed_by=worker,
                    lease_until=now + timedelta(seconds=lease_s),
                    attempts=row.attempts + 1,
                )
            )
        return SyncSlice(
            claim=SliceClaim(job_id, row.seq, worker),
            objects=_objects_from_json(row.objects),
            last_key=row.last_key,
            final=bool(row.final),
            attempts=row.attempts + 1,
        )

    async def _dead_workers(
        self, conn: AsyncConnection, job_id: str, worker: str, now: datetime
    ) -> list[str]:
        """Other workers holding live leases on the job whose session is gone."""
        if self.dialect != "postgresql":
            return []
        t = sync_slices.c
        holders = (
            await conn.execute(
                sa.select(t.claimed_by)
                .distinct()
                .where(
                    t.job_id == job_id,
                    t.state == "claimed",
                    t.claimed_by != worker,
                    t.lease_until >= now,
                )
            )
        ).scalars().all()
        dead: list[str] = []
        for holder in holders:
            # Granted only when no session holds the worker's lock; released at commit.
            probe = sa.select(sa.func.pg_try_advisory_xact_lock(worker_lock_key(holder)))
            if (await conn.execute(probe)).scalar_one():
                dead.append(holder)
        return dead

    async def renew_claims(self, job_id: str, worker: str, *, until: datetime) -> int:
        """Extend the leases of the slices ``worker`` holds; how many it holds."""
        t = sync_slices.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sync_slices.update()
                .where(t.job_id == job_id, t.state == "claimed", t.claimed_by == worker)
                .values(lease_until=until)
            )
        return int(result.rowcount)

    async def slices_left(self, job_id: str) -> int:
        """Slices of the job not landed yet (unclaimed or being worked on)."""
        t = sync_slices.c
        async with self.engine.connect() as conn:
            q = sa.select(sa.func.count()).where(t.job_id == job_id, t.state != "done")
            return int((await conn.execute(q)).scalar_one())

    async def finish_job(self, job_id: str) -> bool:
        """Mark the job succeeded if it is open and every slice landed; True if it was."""
        t = sync_slices.c
        left = sa.select(t.seq).where(t.job_id == job_id, t.state != "done").exists()
        now = _now()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sync_jobs.update()
                .where(
                    sync_jobs.c.id == job_id,
                    sync_jobs.c.status.in_(JOB_OPEN_STATES),
                    ~left,
                )
                .values(status="succeeded", error=None, updated_at=now, finished_at=now)
            )
        return bool(result.rowcount)

    async def set_job_status(
        self,
        job_id: str,
        status: str,
        *,
        counters: dict[str, int] | None = None,
        error: str | None = None,
        finished: bool = False,
        if_open: bool = False,
    ) -> None:
        """Set a job's status; with ``if_open`` only while it is open (a worker's failure
        never overwrites the success another worker of the job recorded)."""
        now = _now()
        values: dict[str, Any] = {"status": status, "updated_at": now, "error": error}
        if counters is not None:
            values["counters"] = json.dumps(counters)
        if finished:
            values["finished_at"] = now
        q = sync_jobs.update().where(sync_jobs.c.id == job_id)
        if if_open:
            q = q.where(sync_jobs.c.status.in_(JOB_OPEN_STATES))
        async with self.engine.begin() as conn:
            await conn.execute(q.values(**values))

    @staticmethod
    def _job(row: Any) -> SyncJob:
        m = row._mapping
        created = _aware(m["created_at"])
        updated = _aware(m["updated_at"])
        assert created is not None and updated is not None
        return SyncJob(
            id=m["id"],
            store=m["store"],
            mode=m["mode"],
            status=m["status"],
            cursor=m["cursor"],
            counters={k: int(v) for k, v in json.loads(m["counters"] or "{}").items()},
            error=m["error"],
            created_at=created,
            updated_at=updated,
            finished_at=_aware(m["finished_at"]),
        )

    # ------------------------------------------------------------------ stats

    async def stats(self) -> dict[str, int]:
        """Counts of patients, studies, series, instances, quarantined, tombstones, conflicts."""
        tables = {
            "patients": patients,
            "studies": studies,
            "series": series,
            "instances": instances,
            "quarantined": quarantine,
            "tombstones": tombstones,
            "conflicts": conflicts,
        }
        out: dict[str, int] = {}
        async with self.engine.connect() as conn:
            for name, table in tables.items():
                out[name] = int(
                    (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()
                )
        return out

    # ------------------------------------------------------------------ STOW-RS

    async def index_stored(
        self,
        conn: AsyncConnection,
        *,
        store: str,
        province: str,
        hospital: str | None,
        items: Sequence[IndexedObject],
    ) -> int:
        """Upsert objects a STOW-RS request put into ``store``, in ``conn``'s transaction.

        Like a sync page (same records, conflicts and derived QIDO-RS data) but without
        a checkpoint, and with ``hospital`` as the producer of new studies while an
        existing study keeps its producer and an existing series its study (the caller
        checks ownership after this, in the same transaction).

        ``seen_job`` is set to the store's unfinished sync job, if one exists: that job
        may already have listed past these keys, and its final sweep turns every object
        it did not see into a tombstone; marked as seen by it, they survive it. Without
        an unfinished job it stays null, which is safe: the object was written before
        this upsert, so any job created later lists it and marks it seen (a resumed job
        is an unfinished one, above); and a job that listed and indexed the key before
        this commit keeps its mark (a null never replaces it). Returns the number of
        conflicts newly recorded.
        Raises what SQLAlchemy raises.
        """
        if not items:
            return 0
        now = _now()
        job = (
            await conn.execute(
                sa.select(sync_jobs.c.id)
                .where(sync_jobs.c.store == store, sync_jobs.c.status.in_(JOB_OPEN_STATES))
                .order_by(sync_jobs.c.created_at.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        gone_series, touched = await self._upsert(
            conn, store, province, job, items, now, hospital=hospital, owner_wins=True
        )
        new_conflicts = await self._record_conflicts(conn, store, items, now)
        touched |= await self._drop_orphans(conn, gone_series)
        await refresh_derived(conn, touched, phi=self.phi)
        return new_conflicts

    @contextlib.asynccontextmanager
    async def object_lock(self, store: str, key: str) -> AsyncIterator[None]:
        """Hold the writers' lock of one object key of ``store`` (STOW-RS check-then-write).

        In this process always; across gateway processes too on PostgreSQL, by a
        transaction-level advisory lock on a connection of its own (released when the
        block ends, or when the connection dies). SQLite deployments are one process.
        Raises ``IndexUnavailable`` when the database cannot be reached.
        """
        name = f"{store}\x00{key}"
        entry = self._key_locks.get(name)
        if entry is None:
            entry = self._key_locks[name] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                if self.dialect != "postgresql":
                    yield
                    return
                digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
                lock_id = int.from_bytes(digest, "big", signed=True)
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        conn = await stack.enter_async_context(self.engine.begin())
                        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))
                    except (OperationalError, DBAPIError, OSError) as exc:
                        raise IndexUnavailable(
                            f"index database unreachable: {exc.__class__.__name__}"
                        ) from exc
                    yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._key_locks[name]


_MIGRATION_LOCK = int.from_bytes(
    hashlib.blake2b(b"imaging-gateway-migrate", digest_size=8).digest(), "big", signed=True
)


def _job_lock_key(store: str) -> int:
    digest = hashlib.blake2b(f"sync-job\x00{store}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _KeyLock:
    """An in-process lock of one object key and how many tasks hold or await it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
