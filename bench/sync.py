"""bench/sync.py: sync rate vs the store's bare ranged-GET rate, on a real SeaweedFS.

Prints one JSON line. Default run: N realistic (~0.5 MB) CT/MR/DX instances; measures in
the same run the bare 64 KiB ranged-GET rate (presigned URLs, plain aiohttp, no SDK) and
the sync rate (header read + parse + index write), alternating the two over several
rounds and reporting medians, then the incremental re-run; then the same full sync by
one and by two `imaging-gateway sync` processes on one PostgreSQL index
(``two_worker_ratio``: the two-worker rate over the one-worker rate; on a machine whose
cores the store, the database and the workers share it need not exceed 1).
``--scale 10000,100000`` instead builds buckets of small objects and reports, per size,
full and incremental sync times and the sync process's peak RSS (each sync runs in its
own process via the CLI).

    .venv/bin/python bench/sync.py                 # ~2 min
    .venv/bin/python bench/sync.py --scale 10000,100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imaging_gateway.cli import tune_gc
from imaging_gateway.dicom.synthetic import generate_instances
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import Settings, load_settings
from imaging_gateway.storage.s3 import S3Store
from imaging_gateway.sync.runner import SyncRunner
from tests.support.seaweed import SeaweedServer

CONCURRENCY = 32


def config_text(
    weed: SeaweedServer,
    bucket: str,
    db: Path,
    concurrency: int,
    index_url: str | None = None,
    page_size: int = 1000,
) -> str:
    return f"""
[gateway]
data_dir = "{db.parent}"
[index]
url = "{index_url or f'sqlite:///{db}'}"
[sync]
concurrency = {concurrency}
page_size = {page_size}
[[stores]]
name = "bench"
kind = "s3"
endpoint = "{weed.endpoint}"
bucket = "{bucket}"
access_key_env = "BENCH_AK"
secret_key_env = "BENCH_SK"
"""


def make_settings(
    weed: SeaweedServer,
    bucket: str,
    work: Path,
    concurrency: int,
    index_url: str | None = None,
    page_size: int = 1000,
) -> tuple[Settings, Path]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "gateway.toml"
    text = config_text(weed, bucket, work / "index.sqlite3", concurrency, index_url, page_size)
    cfg.write_text(text, encoding="utf-8")
    env = {"BENCH_AK": weed.access_key, "BENCH_SK": weed.secret_key}
    return load_settings(cfg, environ=env), cfg


def instances(n: int, pixel_mode: str) -> Iterator[tuple[str, bytes]]:
    made = 0
    seed = 0
    while made < n:
        for inst in generate_instances(seed=seed, patients=50, pixel_mode=pixel_mode):  # type: ignore[arg-type]
            yield inst.key, inst.data
            made += 1
            if made >= n:
                return
        seed += 1


async def upload(
    store: S3Store, items: Iterator[tuple[str, bytes]], concurrency: int = 64
) -> list[str]:
    keys: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str, data: bytes) -> None:
        async def body() -> AsyncIterator[bytes]:
            yield data

        async with sem:
            await store.write_stream(key, body())

    tasks: set[asyncio.Task[None]] = set()
    for key, data in items:
        keys.append(key)
        tasks.add(asyncio.create_task(one(key, data)))
        if len(tasks) >= concurrency * 4:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
    if tasks:
        await asyncio.gather(*tasks)
    return keys


async def bare_rate(store: S3Store, keys: list[str], concurrency: int) -> float:
    """64 KiB ranged GETs on presigned URLs with plain aiohttp: the store's own limit."""
    urls = [store.presign_get(k, 3600) for k in keys]
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:
        sem = asyncio.Semaphore(concurrency)

        async def get(url: str) -> None:
            async with sem, http.get(url, headers={"Range": "bytes=0-65535"}) as r:
                await r.read()
                assert r.status == 206, r.status

        await asyncio.gather(*(get(u) for u in urls[: min(200, len(urls))]))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(get(u) for u in urls))
        return len(urls) / (time.perf_counter() - t0)


async def timed_sync(settings: Settings, *, mode: str) -> tuple[float, dict[str, int]]:
    index = await SqlIndex.open(settings.index)
    store = S3Store(settings.store("bench"))
    try:
        runner = SyncRunner(settings, index, store)
        await runner.start(mode=mode)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        job = await runner.run()
        return time.perf_counter() - t0, job.counters
    finally:
        await store.close()
        await index.close()


async def rate_bench(
    weed: SeaweedServer, n: int, work: Path, concurrency: int, rounds: int
) -> dict[str, object]:
    """Alternate bare-rate and full-sync rounds (each sync into a new index); medians.

    The store shares the two cores with the client, so both rates drift with whatever
    else the machine does; interleaving the rounds exposes both to the same drift.
    """
    bucket = weed.make_bucket("bench-rate")
    settings, _ = make_settings(weed, bucket, work / "upload", concurrency)
    store = S3Store(settings.store("bench"))
    bares: list[float] = []
    syncs: list[float] = []
    try:
        t0 = time.perf_counter()
        keys = await upload(store, instances(n, "realistic"))
        upload_s = time.perf_counter() - t0
        for r in range(rounds):
            bares.append(await bare_rate(store, keys, concurrency))
            settings, _ = make_settings(weed, bucket, work / f"round{r}", concurrency)
            full_s, counters = await timed_sync(settings, mode="incremental")
            assert counters["indexed"] == n, counters
            syncs.append(n / full_s)
    finally:
        await store.close()
    incr_s, incr = await timed_sync(settings, mode="incremental")
    assert incr["unchanged"] == n, incr
    bare, sync_rate = statistics.median(bares), statistics.median(syncs)
    workers = await workers_bench(weed, bucket, work, concurrency, n)
    return {
        "instances": n,
        "rounds": rounds,
        "upload_s": round(upload_s, 1),
        "bare_ranged_get_per_s": round(bare, 1),
        "sync_inst_per_s": round(sync_rate, 1),
        "ratio": round(sync_rate / bare, 3),
        "goal_ratio": 0.5,
        "round_ratios": [round(s / b, 3) for b, s in zip(bares, syncs, strict=True)],
        "full_sync_s": round(n / sync_rate, 2),
        "incremental_s": round(incr_s, 2),
        "incremental_fraction": round(incr_s * sync_rate / n, 3),
        **workers,
    }


async def workers_bench(
    weed: SeaweedServer, bucket: str, work: Path, concurrency: int, n: int
) -> dict[str, object]:
    """Full sync of the bucket by one, then by two CLI processes on a new PostgreSQL
    index each (so both pay the same process start-up); wall time to the last exit.

    Slices are listing pages: pages of n/20 objects give two workers 20 slices to split
    (a 1,000-object bucket at the default page size would be one slice, one worker)."""
    from tests.support.postgres import create_database, drop_database

    env = {**os.environ, "BENCH_AK": weed.access_key, "BENCH_SK": weed.secret_key}
    page_size = max(10, min(1000, n // 20))
    out: dict[str, object] = {"workers_page_size": page_size}
    for workers in (1, 2):
        url = await create_database("bench_sync")
        try:
            settings, cfg = make_settings(
                weed, bucket, work / f"workers{workers}", concurrency, url, page_size
            )
            # Migrated before the clock starts, as a production index is.
            await (await SqlIndex.open(settings.index)).close()
            args = ["-m", "imaging_gateway", "sync", "--config", str(cfg), "--store", "bench",
                    "--json", "--no-progress"]
            t0 = time.perf_counter()
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, *args, env=env, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                for _ in range(workers)
            ]
            results = [await p.communicate() for p in procs]
            elapsed = time.perf_counter() - t0
            for p, (stdout, stderr) in zip(procs, results, strict=True):
                if p.returncode != 0:
                    raise RuntimeError(stderr.decode()[-3000:])
                summary = json.loads(stdout.decode().strip().splitlines()[-1])
                assert summary["indexed"] == n, summary
            out[f"pg_{workers}_worker_inst_per_s"] = round(n / elapsed, 1)
            # The job's own span (created by the first worker to finished), without the
            # processes' start-up and exit.
            index = await SqlIndex.open(settings.index, migrate=False)
            try:
                job = await index.get_job(summary["job"])
            finally:
                await index.close()
            assert job.finished_at is not None
            span = (job.finished_at - job.created_at).total_seconds()
            out[f"pg_{workers}_worker_job_inst_per_s"] = round(n / span, 1)
        finally:
            await drop_database(url)
    one, two = out["pg_1_worker_inst_per_s"], out["pg_2_worker_inst_per_s"]
    assert isinstance(one, float) and isinstance(two, float)
    out["two_worker_ratio"] = round(two / one, 3)
    job_one, job_two = out["pg_1_worker_job_inst_per_s"], out["pg_2_worker_job_inst_per_s"]
    assert isinstance(job_one, float) and isinstance(job_two, float)
    out["two_worker_job_ratio"] = round(job_two / job_one, 3)
    return out


def cli_sync(cfg: Path, env: dict[str, str], *extra: str) -> tuple[float, int, dict[str, object]]:
    """Run the CLI sync in its own process; returns seconds, peak RSS (KiB), summary."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child's
    # figure would start from this (parent) process's size, which grows with the corpus.
    code = (
        "import sys\n"
        "from imaging_gateway.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('MAXRSS', hwm.split()[1], file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "sync",
            "--config",
            str(cfg),
            "--store",
            "bench",
            "--json",
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rss = int(
        next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS"))
    )
    return elapsed, rss, json.loads(proc.stdout.strip().splitlines()[-1])


async def scale_bench(
    weed: SeaweedServer, sizes: list[int], work: Path, concurrency: int
) -> dict[str, object]:
    out: dict[str, object] = {}
    env = {"BENCH_AK": weed.access_key, "BENCH_SK": weed.secret_key}
    for n in sizes:
        bucket = weed.make_bucket(f"bench-scale-{n}")
        settings, cfg = make_settings(weed, bucket, work / f"scale-{n}", concurrency)
        store = S3Store(settings.store("bench"))
        try:
            t0 = time.perf_counter()
            await upload(store, instances(n, "small"))
            upload_s = time.perf_counter() - t0
        finally:
            await store.close()
        full_s, full_rss, full = await asyncio.to_thread(cli_sync, cfg, env)
        incr_s, incr_rss, incr = await asyncio.to_thread(cli_sync, cfg, env)
        assert full["indexed"] == n and incr["unchanged"] == n, (full, incr)
        out[str(n)] = {
            "upload_s": round(upload_s, 1),
            "full_sync_s": round(full_s, 1),
            "full_inst_per_s": round(n / full_s, 1),
            "full_peak_rss_mib": round(full_rss / 1024, 1),
            "incremental_s": round(incr_s, 1),
            "incremental_fraction": round(incr_s / full_s, 3),
            "incremental_peak_rss_mib": round(incr_rss / 1024, 1),
        }
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--scale", default="", help="comma-separated bucket sizes of small objects")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    ap.add_argument("--rounds", type=int, default=3, help="bare/sync rounds (medians)")
    args = ap.parse_args()
    tune_gc()  # as the CLI does; the rate rounds sync in this process
    weed = SeaweedServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
            work = Path(tmp)
            result: dict[str, object] = {
                "bench": "sync",
                "cpus": os.cpu_count(),
                "concurrency": args.concurrency,
            }
            if args.scale:
                sizes = [int(s) for s in args.scale.split(",")]
                result["scale"] = await scale_bench(weed, sizes, work, args.concurrency)
                result["goal_incremental_fraction"] = 0.15
            else:
                result.update(
                    await rate_bench(weed, args.instances, work, args.concurrency, args.rounds)
                )
            print(json.dumps(result))
    finally:
        weed.stop()


if __name__ == "__main__":
    asyncio.run(main())
