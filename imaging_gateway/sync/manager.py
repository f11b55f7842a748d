"""SyncManager: runs sync jobs as background tasks of the server and reports their progress."""

from __future__ import annotations

import asyncio
import logging

from imaging_gateway.errors import Conflict, GatewayError, InvalidRequest
from imaging_gateway.index.sql import SqlIndex, SyncJob
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.sync.runner import Progress, SyncMode, SyncRunner

log = logging.getLogger(__name__)


class SyncManager:
    """Starts jobs in the background: one worker per store in this process.

    Other processes may work on the same job (PostgreSQL): each is one worker of it.
    """

    def __init__(self, settings: Settings, index: SqlIndex, stores: dict[str, ObjectStore]) -> None:
        self.settings = settings
        self.index = index
        self.stores = stores
        self._running: dict[str, tuple[SyncRunner, asyncio.Task[SyncJob | None]]] = {}

    async def start(self, store_name: str, *, mode: SyncMode, restart: bool) -> SyncJob:
        """Start (or resume) a job of ``store_name``.

        Raises ``InvalidRequest`` for an unknown store and ``Conflict`` when one is running.
        """
        if store_name not in self.stores:
            known = ", ".join(sorted(self.stores)) or "none configured"
            raise InvalidRequest(f"no store named {store_name!r} (known: {known})")
        if any(r.store.name == store_name for r, _ in self._running.values()):
            raise Conflict("a sync job for this store is already running in this gateway")
        runner = SyncRunner(self.settings, self.index, self.stores[store_name])
        job = await runner.start(mode=mode, restart=restart)
        task = asyncio.create_task(self._run(runner, job.id), name=f"sync-{job.id}")
        self._running[job.id] = (runner, task)
        return job

    async def _run(self, runner: SyncRunner, job_id: str) -> SyncJob | None:
        """Run a job; its outcome is in the index (status, error), so nothing is raised."""
        try:
            return await runner.run()
        except GatewayError as exc:
            log.warning("sync job %s failed: %s", job_id, exc.message)
        except Exception:
            log.exception("sync job %s failed", job_id)
        finally:
            self._running.pop(job_id, None)
        return None

    def progress(self, job_id: str) -> Progress | None:
        """Live progress of a job running in this process, if it is."""
        entry = self._running.get(job_id)
        return entry[0].progress if entry else None

    async def close(self) -> None:
        """Interrupt running jobs; each resumes from its checkpoint next time."""
        tasks = [t for _, t in self._running.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
