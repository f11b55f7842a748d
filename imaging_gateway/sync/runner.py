"""SyncRunner: one worker of a store's sync job, claiming the job's slices in the index."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from imaging_gateway.errors import (
    Conflict,
    GatewayError,
    InvalidRequest,
    ObjectNotFound,
    SliceLost,
    StorageError,
)
from imaging_gateway.index.sql import (
    IndexedObject,
    KnownObject,
    ListedObject,
    QuarantinedObject,
    SliceClaim,
    SqlIndex,
    SyncJob,
    SyncSlice,
)
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectInfo, ObjectStore
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
    """One sync worker of one store against one index.

    A job's listing is cut into slices, one listing page each, recorded in the index
    with the objects the page listed; workers claim slices with a lease they renew while
    they work, and each slice lands with its index rows in one transaction (its
    checkpoint). Several workers (processes or machines on one PostgreSQL index) thus
    split one job; a worker killed mid-slice leaves the slice to the others (at once on
    PostgreSQL, whose session lock tells them; after its lease otherwise). Deletions are
    decided once, after every slice landed: whatever no slice listed is swept. On
    SQLite one process syncs a store (a lock file refuses a second one).
    """

    def __init__(
        self,
        settings: Settings,
        index: SqlIndex,
        store: ObjectStore,
        *,
        worker: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.store = store
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This worker's name in the claims (host, pid and a random part; no patient data)."""
        self.clock = clock or (lambda: datetime.now(UTC))
        """The time leases are claimed and renewed by (injected in tests)."""
        self.progress: Progress | None = None
        self._lock: StoreLock | None = None
        self._job: SyncJob | None = None
        self._exclusive = index.dialect != "postgresql"

    async def start(self, *, mode: SyncMode = "incremental", restart: bool = False) -> SyncJob:
        """Create (or join) the store's job; does not run it yet.

        An unfinished job of the store (killed, interrupted, failed, or running in other
        workers) is joined, in its own mode, unless ``restart``, which abandons it (its
        other workers stop at their next slice). Raises ``Conflict`` on SQLite when a
        job of this store runs in another process, ``InvalidRequest`` for the federation
        cache store (it holds copies of other provinces' answers, not this province's
        studies).
        """
        if self.store.name == self.settings.federation.cache_store:
            raise InvalidRequest(
                f"store {self.store.name!r} is the federation cache (federation.cache_store), "
                "not a source of studies to index"
            )
        lock: StoreLock | None = None
        if self._exclusive:
            lock = StoreLock(self.settings.gateway.data_dir, self.store.name)
            lock.acquire()
        self._lock = lock
        try:
            job = await self.index.open_job(self.store.name)
            if job is not None and restart:
                await self.index.set_job_status(job.id, "abandoned", finished=True)
            job, created = await self.index.create_or_join_job(self.store.name, mode)
            if not created:
                await self.index.set_job_status(job.id, "running", if_open=True)
            expected = await self.index.count_objects(self.store.name)
        except BaseException:
            if lock is not None:
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
        """Work on the started job's slices until every slice of it landed, then sweep.

        Returns the job as the index holds it (its counters are every worker's). Raises
        ``StoreUnavailable`` (job marked failed unless another worker finished it; the
        index as of the last slice landed) and ``Conflict`` when the job was abandoned;
        propagates cancellation (job marked interrupted).
        """
        job, progress = self._job, self.progress
        if job is None or progress is None:
            raise RuntimeError("SyncRunner.run() before start()")
        lease_s = self.settings.sync.lease_s
        try:
            async with self.index.sync_worker(self.worker):
                renewer = asyncio.create_task(self._renew(job.id, lease_s))
                try:
                    await self._work(job, progress, lease_s)
                finally:
                    renewer.cancel()
                    await asyncio.gather(renewer, return_exceptions=True)
        except asyncio.CancelledError:
            await asyncio.shield(
                self.index.set_job_status(job.id, "interrupted", error="interrupted", if_open=True)
            )
            raise
        except GatewayError as exc:
            await self.index.set_job_status(job.id, "failed", error=exc.message, if_open=True)
            raise
        except Exception as exc:
            await self.index.set_job_status(
                job.id, "failed", error=f"internal error: {exc.__class__.__name__}", if_open=True
            )
            raise
        finally:
            if self._lock is not None:
                self._lock.release()
        return await self.index.get_job(job.id)

    async def _work(self, job: SyncJob, progress: Progress, lease_s: float) -> None:
        # Poll for slices other workers hold (they may die, or land them): two small
        # queries, a few times a second, only while this worker has nothing to do.
        poll_s = min(0.25, lease_s / 10)
        while True:
            await self._run(job, progress, lease_s)
            if await self.index.slices_left(job.id) == 0:
                break
            await asyncio.sleep(poll_s)
        # Every slice landed: the listing is complete, whatever no slice showed is gone.
        swept = await self.index.sweep_unseen(store=self.store.name, job_id=job.id, tally=True)
        progress.counters["deleted"] += len(swept)
        await self.index.finish_job(job.id)

    async def _renew(self, job_id: str, lease_s: float) -> None:
        """Renew this worker's leases every third of a lease while it works."""
        while True:
            await asyncio.sleep(lease_s / 3)
            until = self.clock() + timedelta(seconds=lease_s)
            try:
                await self.index.renew_claims(job_id, self.worker, until=until)
            except GatewayError as exc:  # the next landing tells whether the claims held
                log.warning("sync %s: lease renewal failed: %s", self.store.name, exc.message)

    async def _next_slice(self, job: SyncJob, lease_s: float) -> SyncSlice | None:
        """Claim a slice; when none is free, list the job's next page as a new slice.

        None when nothing is left to claim now: the listing is complete and every slice
        landed or is held by a live worker.
        """
        cfg = self.settings.sync
        while True:
            got = await self.index.claim_slice(
                job.id, self.worker, now=self.clock(), lease_s=lease_s, exclusive=self._exclusive
            )
            if got is not None:
                return got
            nxt = await self.index.next_listing(job.id)
            if nxt is None:
                return None
            seq, after = nxt
            page = await self.store.list_page(start_after=after, limit=cfg.page_size)
            if page.is_truncated and not page.objects:
                # Continuing would end the listing early and sweep the rest as deleted.
                raise StorageError(
                    f"store {self.store.name!r}: listing returned an empty page "
                    "that claims more follow"
                )
            # Another worker may record this slice first; then its page is the one kept.
            await self.index.add_slice(
                job.id,
                seq,
                after_key=after,
                objects=[
                    ListedObject(o.key, o.etag, o.size, o.last_modified) for o in page.objects
                ],
                final=not page.is_truncated,
            )

    async def _run(self, job: SyncJob, progress: Progress, lease_s: float) -> None:
        """Claim, read and write slice by slice; slices overlap so the store never waits.

        While slice N's headers are read, slice N+1 is claimed (listed first if need be),
        looked up in the index and its reads queued behind N's (the semaphore is first
        come, first served), and slice N-1 is being written. Each slice lands with its
        own share of the counters, added to the job's in the same transaction, so the
        job's counters are exact whichever workers landed which slices.
        """
        cfg = self.settings.sync
        live = progress.counters
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

        async def plan(piece: SyncSlice) -> _Page:
            # The gateway's own keys (envelope sidecars, seal staging) are never indexed,
            # so never tombstoned either; an EncryptedStore hides them already.
            objects = [
                ObjectInfo(o.key, o.size, o.etag, o.last_modified)
                for o in piece.objects
                if not is_reserved(o.key)
            ]
            known = await self.index.known_objects(self.store.name, [o.key for o in objects])
            planned = _Page(
                claim=piece.claim, known=known, delta=dict.fromkeys(COUNTERS, 0)
            )
            for info in objects:
                k = known.get(info.key)
                # ETags only: the index holds plaintext sizes (from the header read), a
                # listing the stored size, which differs for encrypted objects; the ETag
                # changes whenever the stored bytes do.
                if not full and k is not None and k.etag == info.etag:
                    planned.unchanged.append(info.key)
                else:
                    planned.to_read.append(info)
            for counters in (planned.delta, live):
                counters["listed"] += len(objects)
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
                await self._count_conflicts(pending_write, live)
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
            # The slice lands with its share of the counters in one transaction; the next
            # slices' reads overlap with this write.
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
                    cursor=None,
                    counters=dict(done.delta),
                    claim=done.claim,
                )
            )

        claiming: asyncio.Task[SyncSlice | None] | None = asyncio.create_task(
            self._next_slice(job, lease_s)
        )
        current: _Page | None = None
        upcoming: _Page | None = None
        pending_write: asyncio.Task[int] | None = None
        try:
            while claiming is not None or current is not None:
                upcoming = None
                if claiming is not None:
                    piece = await claiming
                    claiming = (
                        asyncio.create_task(self._next_slice(job, lease_s))
                        if piece is not None
                        else None
                    )
                    if piece is not None:
                        upcoming = await plan(piece)
                if current is not None:
                    pending_write = await land(current, pending_write)
                current = upcoming
            if pending_write is not None:
                await self._count_conflicts(pending_write, live)
                pending_write = None
        finally:
            # Stop what is still in flight and collect it, so no failure goes unretrieved.
            leftovers = [t for t in (claiming, *_reads(current), *_reads(upcoming)) if t]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            if pending_write is not None and not pending_write.done():
                # Let a slice transaction in flight end (commit or roll back) rather than
                # cancel it mid-way, which can leave its connection holding the lock.
                with contextlib.suppress(BaseException):
                    await asyncio.wait({pending_write})

    async def _count_conflicts(self, write: asyncio.Task[int], live: dict[str, int]) -> None:
        try:
            live["conflicts"] += await write
        except SliceLost as exc:
            # This worker was too slow (its lease ran out) and another took the slice
            # over: nothing of it landed here; the other worker lands it.
            log.warning("sync %s: %s", self.store.name, exc.message)


@dataclass(slots=True)
class _Page:
    """One listing page on its way through the pipeline."""

    claim: SliceClaim
    """The slice this page is: landing it checks and ends the claim."""
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
