"""Admin use cases (role ``admin``): sync jobs, index statistics, quarantine, liveness.

No patient data: job records, counts and the keys of objects that could not be indexed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imaging_gateway.index.sql import SqlIndex, SyncJob
from imaging_gateway.sync.manager import SyncManager
from imaging_gateway.sync.runner import SyncMode

__all__ = ["AdminService"]


@dataclass(frozen=True, slots=True)
class AdminService:
    """The province's operations for the API (one per app)."""

    index: SqlIndex
    sync: SyncManager

    async def ping(self) -> None:
        """Raises ``IndexUnavailable`` when the index cannot be reached."""
        await self.index.ping()

    def _job_json(self, job: SyncJob) -> dict[str, Any]:
        body: dict[str, Any] = job.as_json()
        live = self.sync.progress(job.id)
        if live is not None and job.status == "running":
            body.update(live.as_json())
        return body

    async def start_sync(self, store: str, *, mode: SyncMode, restart: bool) -> dict[str, Any]:
        """Start (or resume) a sync job of ``store``; its JSON. Raises ``InvalidRequest``
        (unknown store) and ``Conflict`` (one is running)."""
        return self._job_json(await self.sync.start(store, mode=mode, restart=restart))

    async def list_jobs(self, *, store: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest sync jobs (of one store), with live progress where running."""
        return [self._job_json(j) for j in await self.index.list_jobs(store=store, limit=limit)]

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """One sync job; raises ``NotFound``."""
        return self._job_json(await self.index.get_job(job_id))

    async def stats(self) -> dict[str, int]:
        """Row counts of the index."""
        return await self.index.stats()

    async def quarantine(
        self, *, store: str | None, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """A page of quarantined objects (keyset paging on (store, key)) and the (store,
        key) to continue after, None on the last page."""
        entries = await self.index.list_quarantine(store=store, after=after, limit=limit + 1)
        page = entries[:limit]
        more = len(entries) > limit
        return [e.as_json() for e in page], (page[-1].store, page[-1].key) if more else None
