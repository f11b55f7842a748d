"""Store-wide key maintenance: rewrap every data key to the current version; seal plain objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imaging_gateway.errors import ObjectNotFound
from imaging_gateway.storage.encrypted import EncryptedStore, Fault

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Tally:
    """Counters of one maintenance run, for progress lines and the final summary."""

    action: str
    store: str
    counters: dict[str, int] = field(default_factory=lambda: {"listed": 0})
    started: float = field(default_factory=time.monotonic)

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def rate(self) -> float:
        """Objects listed per second so far."""
        elapsed = time.monotonic() - self.started
        return self.counters.get("listed", 0) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        parts = "  ".join(f"{k} {v:,}" for k, v in self.counters.items())
        return f"{self.action} {self.store!r}: {parts}  {self.rate():,.0f} obj/s"


async def _each(
    store: EncryptedStore,
    work: Callable[[str], Awaitable[str]],
    tally: Tally,
    *,
    concurrency: int,
) -> None:
    """Run ``work`` on every listed key, ``concurrency`` at a time, page by page."""
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        async with sem:
            try:
                outcome = await work(key)
            except ObjectNotFound:
                outcome = "gone"  # deleted between listing and work
        tally.add(outcome)

    after: str | None = None
    while True:
        page = await store.list_page(start_after=after, limit=1000)
        await _all_or_stop([one(o.key) for o in page.objects])
        tally.add("listed", len(page.objects))
        if not page.is_truncated or not page.objects:
            return
        after = page.objects[-1].key


async def _all_or_stop(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run all; on the first failure cancel the rest (a kill stops the run, unlike gather)
    and raise that failure as it is."""
    tasks = [asyncio.create_task(w) for w in work]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def rewrap_store(
    store: EncryptedStore, *, concurrency: int = 16, tally: Tally | None = None
) -> Tally:
    """Give every encrypted object of ``store`` its data key under the current key version.

    Reads headers and envelope sidecars only, never bodies (``EncryptedStore.rewrap_object``).
    Resumable: a re-run skips objects already current or rewrapped (``done``). When the
    whole listing went through, records ``{key_id, version, complete}`` in the store for
    ``keys retire``. Raises ``KeyNotFound`` / ``IntegrityError`` naming the object whose
    data key cannot be recovered (the run stops there; nothing is lost), ``StorageError``,
    ``StoreUnavailable``.
    """
    tally = tally or Tally("rewrap", store.name)
    key_id, version = store.keys.current()
    await _each(store, store.rewrap_object, tally, concurrency=concurrency)
    await store.write_status(
        {
            "key_id": key_id,
            "version": version,
            "complete": True,
            "objects": tally.counters.get("listed", 0),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return tally


async def seal_store(
    store: EncryptedStore,
    *,
    concurrency: int = 4,
    fault: Fault | None = None,
    tally: Tally | None = None,
) -> Tally:
    """Encrypt every plain object of ``store`` in place (``EncryptedStore.seal_object``).

    First finishes what a killed run left (``reconcile_seal``); objects already
    encrypted are skipped, so a re-run resumes. ``fault`` is passed to every seal (tests
    inject a crash with it). Raises ``IntegrityError`` (a read-back did not match: the
    object keeps its plain or verified copy), ``StorageError``, ``StoreUnavailable``,
    ``KeyNotFound``.
    """
    tally = tally or Tally("seal", store.name)
    tally.add("reconciled", await store.reconcile_seal())

    async def seal(key: str) -> str:
        return await store.seal_object(key, fault=fault)

    await _each(store, seal, tally, concurrency=concurrency)
    return tally


@contextlib.asynccontextmanager
async def progress_lines(tally: Tally, *, every_s: float = 5.0) -> AsyncIterator[None]:
    """Log ``tally.line()`` every ``every_s`` seconds while the block runs, and once at the end."""

    async def report() -> None:
        while True:
            await asyncio.sleep(every_s)
            log.info("%s", tally.line())

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("%s", tally.line())
