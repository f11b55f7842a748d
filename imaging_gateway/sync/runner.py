"""SyncRunner: one sync job of one store, resumable from its last committed page."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imaging_gateway.errors import (
    Conflict,
    GatewayError,
    InvalidRequest,
    ObjectNotFound,
    StorageError,
)
from imaging_gateway.index.sql import (
    IndexedObject,
    KnownObject,
    QuarantinedObject,
    SqlIndex,
    SyncJob,
)
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ListPage, ObjectInfo, ObjectStore
from imaging_gateway.storage.encrypted import is_reserved
from imaging_gateway.sync.headers import read_header

log = logging.getLogger(__name__)

SyncMode = Literal["incremental", "full"]
COUNTERS = ("listed", "indexed", "unchanged", "quarantined", "deleted", "conflicts", "bytes_read")


@dataclass(slots=True)
class Progress:
    """Live progress of a running job, for the CLI bar and the admin API."""

    job_id: str
    store: str
    mode: str
    counters: dict[str, int]
    expected: int | None
    """Objects the store held at the last sync (an estimate of the listing's length)."""
    started: float = field(default_factory=time.monotonic)
    start_listed: int = 0

    def rate(self) -> float:
        """Objects listed per second in this run."""
        elapsed = time.monotonic() - self.started
        n = self.counters.get("listed", 0) - self.start_listed
        return n / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        if self.expected is None or rate <= 0:
            return None
        return max(0.0, (self.expected - self.counters.get("listed", 0)) / rate)

    def as_json(self) -> dict[str, object]:
        eta = self.eta_s()
        return {
            "counters": dict(self.counters),
            "expected": self.expected,
            "rate_per_s": round(self.rate(), 1),
            "eta_s": None if eta is None else round(eta, 1),
        }


class StoreLock:
    """An exclusive per-store lock file; the OS releases it if the process dies."""

    def __init__(self, data_dir: Path, store: str) -> None:
        self.path = data_dir / "locks" / f"sync-{store}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises ``Conflict`` when another process or task holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict("a sync job for this store is already running") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class SyncRunner:
    """Runs sync jobs for one store against one index."""

    def __init__(self, settings: Settings, index: SqlIndex, store: ObjectStore) -> None:
        self.settings = settings
        self.index = index
        self.store = store
        self.progress: Progress | None = None
        self._lock: StoreLock | None = None
        self._job: SyncJob | None = None

    async def start(self, *, mode: SyncMode = "incremental", restart: bool = False) -> SyncJob:
        """Claim the store and create (or pick up) the job to run; does not run it yet.

        An unfinished job of the store (killed, interrupted or failed) is resumed from its
        checkpoint unless ``restart``, which abandons it. Raises ``Conflict`` when a
        job of this store is running now, ``InvalidRequest`` for the federation cache
        store (it holds copies of other provinces' answers, not this province's studies).
        """
        if self.store.name == self.settings.federation.cache_store:
            raise InvalidRequest(
                f"store {self.store.name!r} is the federation cache (federation.cache_store), "
                "not a source of studies to index"
            )
        lock = StoreLock(self.settings.gateway.data_dir, self.store.name)
        lock.acquire()
        self._lock = lock
        try:
            job = await self.index.open_job(self.store.name)
            if job is not None and restart:
                await self.index.set_job_status(job.id, "abandoned", finished=True)
                job = None
            if job is None:
                job = await self.index.create_job(self.store.name, mode)
            else:
                await self.index.set_job_status(job.id, "running")
            expected = await self.index.count_objects(self.store.name)
        except BaseException:
            lock.release()
            raise
        counters = {k: job.counters.get(k, 0) for k in COUNTERS}
        self.progress = Progress(
            job.id,
            self.store.name,
            job.mode,
            counters,
            expected or None,
            start_listed=counters["listed"],
        )
        self._job = job
        return job

    async def run(self) -> SyncJob:
        """Run the started job to the end of the listing.

        Raises ``StoreUnavailable`` (job marked failed, index as of the last checkpoint)
        and propagates cancellation (job marked interrupted).
        """
        job, lock = self._job, self._lock
        if job is None or lock is None or self.progress is None:
            raise RuntimeError("SyncRunner.run() before start()")
        try:
            await self._run(job, self.progress)
            # Marked finished while the store lock is still held: no other job can pick
            # this one up as unfinished in between.
            await self.index.set_job_status(
                job.id, "succeeded", counters=self.progress.counters, finished=True
            )
        except asyncio.CancelledError:
            await asyncio.shield(
                self.index.set_job_status(job.id, "interrupted", error="interrupted")
            )
            raise
        except GatewayError as exc:
            await self.index.set_job_status(job.id, "failed", error=exc.message)
            raise
        except Exception as exc:
            await self.index.set_job_status(
                job.id, "failed", error=f"internal error: {exc.__class__.__name__}"
            )
            raise
        finally:
            lock.release()
        return await self.index.get_job(job.id)

    async def _run(self, job: SyncJob, progress: Progress) -> None:
        """List, read and write page by page; pages overlap so the store never waits.

        While page N's headers are read, page N+1 is listed, looked up in the index and
        its reads queued behind N's (the semaphore is first come, first served), and page
        N-1 is being written. Pages land strictly in order, each with the counters as of
        its own end, so a resumed job's counters are exact.
        """
        cfg = self.settings.sync
        live = progress.counters
        committed = dict(live)  # the counters as of the last page handed to the index
        full = job.mode == "full"
        sem = asyncio.Semaphore(cfg.concurrency)
        issuers = self.settings.gateway.national_id_issuers
        store_settings = self.settings.store(self.store.name)

        async def read_one(
            info: ObjectInfo, delta: dict[str, int]
        ) -> IndexedObject | QuarantinedObject | None:
            async with sem:
                try:
                    outcome, n = await read_header(
                        self.store,
                        info,
                        first_read=cfg.header_read_bytes,
                        max_header=cfg.max_header_bytes,
                        national_id_issuers=issuers,
                    )
                except ObjectNotFound:
                    return None  # deleted between listing and read
            kind = "quarantined" if isinstance(outcome, QuarantinedObject) else "indexed"
            for counters in (delta, live):
                counters["bytes_read"] += n
                counters[kind] += 1
            return outcome

        async def plan(page: ListPage, last: str | None) -> _Page:
            # The gateway's own keys (envelope sidecars, seal staging) are never indexed,
            # so never tombstoned either; an EncryptedStore hides them already.
            page = ListPage([o for o in page.objects if not is_reserved(o.key)], page.is_truncated)
            known = await self.index.known_objects(self.store.name, [o.key for o in page.objects])
            planned = _Page(last=last, known=known, delta=dict.fromkeys(COUNTERS, 0))
            for info in page.objects:
                k = known.get(info.key)
                # ETags only: the index holds plaintext sizes (from the header read), a
                # listing the stored size, which differs for encrypted objects; the ETag
                # changes whenever the stored bytes do.
                if not full and k is not None and k.etag == info.etag:
                    planned.unchanged.append(info.key)
                else:
                    planned.to_read.append(info)
            for counters in (planned.delta, live):
                counters["listed"] += len(page.objects)
                counters["unchanged"] += len(planned.unchanged)
            planned.reads = [
                asyncio.create_task(read_one(info, planned.delta)) for info in planned.to_read
            ]
            return planned

        async def land(done: _Page, pending_write: asyncio.Task[int] | None) -> asyncio.Task[int]:
            outcomes = await asyncio.gather(*done.reads)
            vanished = [i.key for i, o in zip(done.to_read, outcomes, strict=True) if o is None]
            deleted = sorted(k for k in vanished if k in done.known)
            for counters in (done.delta, live):
                counters["deleted"] += len(deleted)
            if pending_write is not None:
                await self._count_conflicts(pending_write, live, committed)
            for name, value in done.delta.items():
                committed[name] += value
            # The page lands with its checkpoint in one transaction; the next pages' reads
            # overlap with this write.
            indexed = [o for o in outcomes if isinstance(o, IndexedObject)]
            # Each object's producer, by the store's ownership rule.
            producers = {
                o.key: store_settings.producer(o.key, o.header.study.institution_code)
                for o in indexed
            }
            unclaimed = sum(1 for code in producers.values() if code is None)
            if unclaimed and store_settings.ownership == "prefix":
                # The count only: keys can carry patient identifiers.
                log.warning(
                    "sync %s: %d object(s) under no prefix of [stores.hospitals] indexed "
                    "with no producing hospital",
                    self.store.name,
                    unclaimed,
                )
            return asyncio.create_task(
                self.index.apply_page(
                    store=self.store.name,
                    province=self.settings.gateway.province,
                    producers=producers,
                    job_id=job.id,
                    indexed=indexed,
                    quarantined=[o for o in outcomes if isinstance(o, QuarantinedObject)],
                    deleted=deleted,
                    unchanged=done.unchanged,
                    cursor=done.last,
                    counters=dict(committed),
                )
            )

        cursor = job.cursor
        listing: asyncio.Task[ListPage] | None = asyncio.create_task(
            self.store.list_page(start_after=cursor, limit=cfg.page_size)
        )
        current: _Page | None = None
        upcoming: _Page | None = None
        pending_write: asyncio.Task[int] | None = None
        try:
            while listing is not None or current is not None:
                upcoming = None
                if listing is not None:
                    page = await listing
                    if page.is_truncated and not page.objects:
                        # Continuing would end the listing early and sweep the rest as deleted.
                        raise StorageError(
                            f"store {self.store.name!r}: listing returned an empty page "
                            "that claims more follow"
                        )
                    cursor = page.objects[-1].key if page.objects else cursor
                    listing = (
                        asyncio.create_task(
                            self.store.list_page(start_after=cursor, limit=cfg.page_size)
                        )
                        if page.is_truncated
                        else None
                    )
                    upcoming = await plan(page, cursor)
                if current is not None:
                    pending_write = await land(current, pending_write)
                current = upcoming
            if pending_write is not None:
                await self._count_conflicts(pending_write, live, committed)
                pending_write = None
            # The listing is complete: whatever it did not show is gone from the store.
            swept = await self.index.sweep_unseen(store=self.store.name, job_id=job.id)
            live["deleted"] += len(swept)
        finally:
            # Stop what is still in flight and collect it, so no failure goes unretrieved.
            leftovers = [t for t in (listing, *_reads(current), *_reads(upcoming)) if t]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            if pending_write is not None and not pending_write.done():
                # Let a page transaction in flight end (commit or roll back) rather than
                # cancel it mid-way, which can leave its connection holding the lock.
                with contextlib.suppress(BaseException):
                    await asyncio.wait({pending_write})

    @staticmethod
    async def _count_conflicts(
        write: asyncio.Task[int], live: dict[str, int], committed: dict[str, int]
    ) -> None:
        conflicts = await write
        live["conflicts"] += conflicts
        committed["conflicts"] += conflicts


@dataclass(slots=True)
class _Page:
    """One listing page on its way through the pipeline."""

    last: str | None
    """The page's last key: the job's checkpoint once the page lands."""
    known: dict[str, KnownObject]
    delta: dict[str, int]
    """What this page adds to the job's counters."""
    unchanged: list[str] = field(default_factory=list)
    to_read: list[ObjectInfo] = field(default_factory=list)
    reads: list[asyncio.Task[IndexedObject | QuarantinedObject | None]] = field(
        default_factory=list
    )


def _reads(page: _Page | None) -> list[asyncio.Task[IndexedObject | QuarantinedObject | None]]:
    return page.reads if page is not None else []
