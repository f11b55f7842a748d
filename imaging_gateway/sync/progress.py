"""The CLI progress bar (rich): listed, indexed, unchanged, quarantined, deleted, rate, ETA."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from imaging_gateway.sync.runner import Progress as JobProgress

log = logging.getLogger(__name__)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def describe(p: JobProgress) -> str:
    c = p.counters
    eta = p.eta_s()
    eta_s = "--:--" if eta is None else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
    return (
        f"listed {c['listed']:,}  indexed {c['indexed']:,}  unchanged {c['unchanged']:,}  "
        f"quarantined {c['quarantined']:,}  deleted {c['deleted']:,}  "
        f"read {_bytes(c['bytes_read'])}  {p.rate():,.0f} obj/s  ETA {eta_s}"
    )


class ProgressBar:
    """Shows a job's progress while it runs: a live bar on a terminal, else a log line
    every ``log_every_s`` seconds (``mode="log"``), or nothing (``mode="off"``)."""

    def __init__(
        self,
        progress: JobProgress,
        *,
        mode: Literal["bar", "log", "off"],
        log_every_s: float = 10.0,
    ) -> None:
        self.job = progress
        self.mode = mode
        self.log_every_s = log_every_s
        self._task: asyncio.Task[None] | None = None
        self._tid: TaskID | None = None
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(stderr=True),
            transient=False,
        )

    async def __aenter__(self) -> ProgressBar:
        if self.mode == "bar":
            self._bar.start()
            self._tid = self._bar.add_task(
                f"sync {self.job.store} ({self.job.mode})",
                total=self.job.expected,
                detail=describe(self.job),
            )
        if self.mode != "off":
            self._task = asyncio.create_task(self._refresh())
        return self

    async def _refresh(self) -> None:
        while True:
            if self.mode == "bar":
                self._update()
                await asyncio.sleep(0.25)
            else:
                await asyncio.sleep(self.log_every_s)
                log.info("sync %s: %s", self.job.store, describe(self.job))

    def _update(self) -> None:
        assert self._tid is not None
        listed = self.job.counters["listed"]
        total = self.job.expected
        if total is not None and listed > total:
            total = None
        self._bar.update(self._tid, completed=listed, total=total, detail=describe(self.job))

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.mode == "bar":
            self._update()
            self._bar.stop()
