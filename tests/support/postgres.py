"""Throw-away PostgreSQL databases at 127.0.0.1:5432 (trust auth), for tests and benchmarks.

A test's database is a copy of a template migrated once (``CREATE DATABASE ... TEMPLATE``):
running every migration for each test cost more than the test itself. The template is
named after a digest of the migration scripts, so a session (or another worktree) with
another migration set builds and uses its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import asyncpg

from imaging_gateway.index.sql import MIGRATIONS, SqlIndex
from imaging_gateway.settings import IndexSettings

PG_ADMIN_DSN = os.environ.get("IG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

_templates: dict[str, str] = {}
"""Migration digest -> name of the PostgreSQL template this process made sure of."""


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test server."""
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"


def migrations_digest(folder: Path = MIGRATIONS) -> str:
    """A digest of the migration scripts (names and bytes): what a template is valid for."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".mako"}:
            h.update(path.relative_to(folder).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


async def create_database(prefix: str, *, template: str | None = None) -> str:
    """Create a database named ``<prefix>_<random>``; returns its URL.

    Empty, or a copy of database ``template``. Raises what ``asyncpg.connect`` raises when
    the server cannot be reached.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        from_template = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{from_template}')
    finally:
        await conn.close()
    return database_url(name)


async def migrated_template() -> str:
    """The name of a template database migrated to head, built on first use.

    Sessions in parallel (other worktrees too) build under an advisory lock, one per
    migration set; a template whose build was cut short is not marked ``IS_TEMPLATE``
    and is rebuilt. It takes no connections, so ``CREATE DATABASE ... TEMPLATE`` never
    finds it in use.
    """
    digest = migrations_digest()
    if digest in _templates:
        return _templates[digest]
    name = f"ig_template_{digest}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", name)
        try:
            ready = await conn.fetchval(
                "SELECT datistemplate FROM pg_database WHERE datname = $1", name)
            if not ready:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{name}"')
                index = await SqlIndex.open(IndexSettings(url=database_url(name)))
                await index.close()
                await conn.execute(
                    f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", name)
    finally:
        await conn.close()
    _templates[digest] = name
    return name


async def copy_sqlite_template(folder: Path, target: Path) -> None:
    """Copy a migrated SQLite index (built in ``folder`` on first use) to ``target``."""
    template = folder / f"index-{migrations_digest()}.sqlite3"
    if not template.exists():
        building = folder / f"building-{uuid.uuid4().hex[:12]}.sqlite3"
        index = await SqlIndex.open(IndexSettings(url=f"sqlite:///{building}"))
        await index.close()  # the last connection's close checkpoints the WAL into the file
        building.replace(template)
    shutil.copy2(template, target)


async def drop_database(url: str) -> None:
    """Drop the database of ``url``, closing its connections."""
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class Dropper:
    """Drops test databases on worker threads, so no test waits for it.

    ``DROP DATABASE`` waits for a checkpoint (1.2-1.7 s on the shared test server, more
    than a test's own work); drops in flight together share one. ``close`` waits for all
    of them and raises the first failure.
    """

    def __init__(self, workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="drop-database")
        self._pending: list[Future[None]] = []

    def drop(self, url: str) -> None:
        self._pending.append(self._pool.submit(asyncio.run, drop_database(url)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for done in self._pending:
            done.result()
