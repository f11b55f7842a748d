"""``imaging-gateway`` in a process whose store stalls for good after a number of header reads.

``python -m tests.support.stalled_sync N ARGS...`` runs the real CLI (``imaging_gateway.cli.main``)
with ``ARGS``, its gateway stores wrapped so that the ``N+1``-th ``read_range`` (and every
later one) never returns. A test that must kill a sync mid-job starts it this way, waits
for a checkpoint in the index, and kills it: the job cannot finish first, however fast or
loaded the machine (a test about time uses a stalled store, never a wall-clock race).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from imaging_gateway import cli
from imaging_gateway.storage import factory
from imaging_gateway.storage.base import ObjectStore, RangeRead


class StallingStore:
    """A real store whose reads after the first ``reads`` ones wait forever."""

    def __init__(self, inner: ObjectStore, reads: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.left = reads

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        if self.left <= 0:
            await asyncio.Event().wait()  # stalled: only a signal ends the process
        self.left -= 1
        return await self.inner.read_range(key, offset, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main(argv: list[str]) -> int:
    reads = int(argv[0])
    real = factory.open_gateway_store

    def stalling(*args: Any, **kwargs: Any) -> Any:
        return StallingStore(real(*args, **kwargs), reads)

    factory.open_gateway_store = stalling  # type: ignore[assignment]
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
