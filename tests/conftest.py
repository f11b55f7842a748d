"""Fixtures shared by every level: the study index on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import IndexSettings
from tests.support.postgres import (
    PG_ADMIN_DSN,
    Dropper,
    copy_sqlite_template,
    create_database,
    migrated_template,
)


# PostgreSQL at 127.0.0.1:5432 (trust auth). A test that needs it and cannot reach it
# fails; it never skips.
async def create_pg_database(*, migrated: bool = True) -> str:
    """Create a database for one test; returns its URL.

    Migrated to head (a copy of the session's template database), or empty.
    """
    try:
        template = await migrated_template() if migrated else None
        return await create_database("ig_test", template=template)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN_DSN}: {exc}")


@pytest.fixture(scope="session")
def pg_dropper() -> Iterator[Dropper]:
    """Drops the session's test databases in the background; waits for them at its end."""
    dropper = Dropper()
    yield dropper
    dropper.close()


@pytest.fixture(scope="session")
def sqlite_templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this session keeps its migrated SQLite index to copy."""
    return tmp_path_factory.mktemp("index-templates")


@contextlib.asynccontextmanager
async def fresh_index_url(backend: str, folder: Path, sqlite_templates: Path,
                          pg_dropper: Dropper) -> AsyncIterator[str]:
    """A fresh index database URL, migrated and empty: ``folder/index.sqlite3``, or a new
    PostgreSQL database (copies of a template migrated once per session)."""
    if backend == "sqlite":
        await copy_sqlite_template(sqlite_templates, folder / "index.sqlite3")
        yield f"sqlite:///{folder / 'index.sqlite3'}"
        return
    url = await create_pg_database()
    try:
        yield url
    finally:
        pg_dropper.drop(url)


@pytest.fixture(params=["sqlite", "postgres"])
async def index_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_templates: Path,
                    pg_dropper: Dropper) -> AsyncIterator[str]:
    """A fresh index database URL for one test, on each backend (``fresh_index_url``)."""
    async with fresh_index_url(request.param, tmp_path, sqlite_templates, pg_dropper) as url:
        yield url


@pytest.fixture
async def index(index_url: str) -> AsyncIterator[SqlIndex]:
    """An open, migrated, empty index on each backend."""
    idx = await SqlIndex.open(IndexSettings(url=index_url))
    yield idx
    await idx.close()
