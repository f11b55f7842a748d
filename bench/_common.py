"""Helpers shared by the benchmark scripts: databases, gateway processes, percentiles, RSS."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gateway import GatewayProcess, free_port
from tests.support.gateway import cli_process as cli
from tests.support.postgres import PG_ADMIN_DSN, create_database, database_url
from tests.support.postgres import drop_database as drop_pg_database

__all__ = [
    "PG_ADMIN_DSN",
    "GatewayProcess",
    "RssSampler",
    "cli",
    "create_pg_database",
    "database_url",
    "drop_pg_database",
    "free_port",
    "issue_token",
    "percentile",
    "proc_status_kib",
    "start_gateway",
    "summarize_ms",
    "wait_healthy",
]

async def create_pg_database(prefix: str) -> str:
    """Create an empty PostgreSQL database named ``<prefix>_<random>``; returns its URL."""
    return await create_database(f"{prefix}_{os.getpid()}")


def start_gateway(config: Path, port: int, env: dict[str, str] | None = None) -> GatewayProcess:
    """``imaging-gateway serve --config CONFIG`` on ``port``, up and answering /healthz."""
    gw = GatewayProcess(config, port, env)
    gw.start(timeout=120.0)
    return gw


def issue_token(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """A bearer token from ``imaging-gateway tokens issue ARGS``."""
    return cli(config, "tokens", "issue", *args, env=env).stdout.strip()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by the nearest-rank method."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p90, p99 and max of latencies given in seconds, as milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else math.nan,
    }


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.max_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status_kib(self.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.max_kib = max(self.max_kib, rss)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def wait_healthy(base: str, within_s: float = 30.0) -> None:
    """Poll ``base``/healthz until it answers 200."""
    import aiohttp

    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base} did not answer /healthz")
            await asyncio.sleep(0.1)
