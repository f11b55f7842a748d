"""Fixtures shared by every level: the study index on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import IndexSettings

# PostgreSQL at 127.0.0.1:5432 (trust auth). A test that needs it and cannot reach it
# fails; it never skips.
PG_ADMIN_DSN = os.environ.get("IG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def create_pg_database() -> str:
    """Create an empty database for one test; returns its URL."""
    name = f"ig_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_ADMIN_DSN}: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"


async def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty index database URL: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
        return
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


@pytest.fixture
async def index(index_url: str) -> AsyncIterator[SqlIndex]:
    """An open, migrated, empty index on each backend."""
    idx = await SqlIndex.open(IndexSettings(url=index_url))
    yield idx
    await idx.close()
