"""Fixtures shared by every level: the study index on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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


class FilledIndexes:
    """Indexes a module fills once per backend and each test gets a copy of (a PostgreSQL
    ``CREATE DATABASE ... TEMPLATE`` or a copied SQLite file): the same fresh state per
    test without filling it again."""

    def __init__(self, folder: Path, sqlite_templates: Path, pg_dropper: Dropper) -> None:
        self._folder = folder
        self._sqlite_templates = sqlite_templates
        self._dropper = pg_dropper
        self._filled: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def copy(self, backend: str, folder: Path,
                   fill: Callable[[SqlIndex], Awaitable[None]]) -> AsyncIterator[str]:
        """The URL of a new copy of the index ``fill`` filled on ``backend`` (filled on
        first use), in ``folder`` for SQLite; a PostgreSQL copy is dropped on exit."""
        if backend not in self._filled:
            if backend == "sqlite":
                path = self._folder / f"filled-{uuid.uuid4().hex[:12]}.sqlite3"
                await copy_sqlite_template(self._sqlite_templates, path)
                url = f"sqlite:///{path}"
            else:
                url = await create_pg_database()
            idx = await SqlIndex.open(IndexSettings(url=url))
            try:
                await fill(idx)
            finally:
                await idx.close()  # every connection closed: a template must have none
            self._filled[backend] = url
        template = self._filled[backend]
        if backend == "sqlite":
            target = folder / "index.sqlite3"
            shutil.copy2(template.removeprefix("sqlite:///"), target)
            yield f"sqlite:///{target}"
            return
        name = template.rsplit("/", 1)[1]
        try:
            url = await create_database("ig_test", template=name)
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(f"PostgreSQL is required at {PG_ADMIN_DSN}: {exc}")
        try:
            yield url
        finally:
            self._dropper.drop(url)

    def close(self) -> None:
        for backend, url in self._filled.items():
            if backend != "sqlite":
                self._dropper.drop(url)


@pytest.fixture(scope="module")
def filled_indexes(tmp_path_factory: pytest.TempPathFactory, sqlite_templates: Path,
                   pg_dropper: Dropper) -> Iterator[FilledIndexes]:
    """A module's once-filled indexes to copy per test (``FilledIndexes``)."""
    folder = tmp_path_factory.mktemp("filled-indexes")
    filled = FilledIndexes(folder, sqlite_templates, pg_dropper)
    yield filled
    filled.close()
