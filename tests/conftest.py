"""Fixtures shared by every level: the study index on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import IndexSettings
from tests.support.postgres import PG_ADMIN_DSN, create_database, drop_database


# PostgreSQL at 127.0.0.1:5432 (trust auth). A test that needs it and cannot reach it
# fails; it never skips.
async def create_pg_database() -> str:
    """Create an empty database for one test; returns its URL."""
    try:
        return await create_database("ig_test")
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN_DSN}: {exc}")


@pytest.fixture(params=["sqlite", "postgres"])
async def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty index database URL: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
        return
    url = await create_pg_database()
    yield url
    await drop_database(url)


@pytest.fixture
async def index(index_url: str) -> AsyncIterator[SqlIndex]:
    """An open, migrated, empty index on each backend."""
    idx = await SqlIndex.open(IndexSettings(url=index_url))
    yield idx
    await idx.close()
