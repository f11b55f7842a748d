"""The CLI's progress bar (rich): listed / indexed / unchanged / quarantined / deleted, bytes, rate, ETA."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from imaging_gateway.sync.runner import Progress as JobProgress


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
    """Redraws a job's progress several times a second while the job runs."""

    def __init__(self, progress: JobProgress, *, enabled: bool) -> None:
        self.job = progress
        self.enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            console=Console(stderr=True),
            transient=False,
        )

    async def __aenter__(self) -> ProgressBar:
        if self.enabled:
            self._bar.start()
            tid = self._bar.add_task(
                f"sync {self.job.store} ({self.job.mode})",
                total=self.job.expected, detail=describe(self.job),
            )
            self._task = asyncio.create_task(self._refresh(tid))
        return self

    async def _refresh(self, tid: object) -> None:
        while True:
            self._update(tid)
            await asyncio.sleep(0.25)

    def _update(self, tid: object) -> None:
        listed = self.job.counters["listed"]
        total = self.job.expected
        if total is not None and listed > total:
            total = None
        self._bar.update(tid, completed=listed, total=total,  # type: ignore[arg-type]
                         detail=describe(self.job))

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._update(self._bar.task_ids[0])
            self._bar.stop()
