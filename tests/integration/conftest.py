"""Integration fixtures: real services started once per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.seaweed import SeaweedServer

# ---------------------------------------------------------------------------
# Object store: SeaweedFS (S3)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedServer]:
    """A running SeaweedFS with S3 on a free loopback port; fails (never skips) without weed."""
    server = SeaweedServer().start()
    try:
        yield server
    finally:
        server.stop()
