"""Throw-away PostgreSQL databases at 127.0.0.1:5432 (trust auth), for tests and benchmarks."""

from __future__ import annotations

import os
import uuid

import asyncpg

PG_ADMIN_DSN = os.environ.get("IG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def create_database(prefix: str) -> str:
    """Create an empty database named ``<prefix>_<random>``; returns its URL.

    Raises what ``asyncpg.connect`` raises when the server cannot be reached.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"


async def drop_database(url: str) -> None:
    """Drop the database of ``url``, closing its connections."""
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
