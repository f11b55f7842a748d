"""bench/s3_adapters.py: 64 KiB ranged-GET rate of each S3 client path, on a real SeaweedFS.

Starts SeaweedFS, writes N objects of 0.5 MB, then with the same concurrency fetches
the first 64 KiB of every object through:

  bare      presigned URLs fetched with plain aiohttp (no signing per request: the limit)
  s3store   S3Store (botocore SigV4 signer over one aiohttp session)
  boto3     one boto3 client shared by a thread pool
  minio     MinioStore (minio SDK on its own thread pool)

Each path runs ``--rounds`` times, interleaved, after a warm-up; the best round counts.
Prints one JSON line: requests per second for each path and its ratio to the bare rate.

    .venv/bin/python bench/s3_adapters.py                  # ~1 min
    .venv/bin/python bench/s3_adapters.py --objects 500 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imaging_gateway.settings import StoreSettings
from imaging_gateway.storage.minio_store import MinioStore
from imaging_gateway.storage.s3 import S3Store
from tests.support.seaweed import SeaweedServer

OBJECT_BYTES = 512 * 1024

Fetch = Callable[[str], Awaitable[int]]


async def drive(keys: list[str], fetch: Fetch, concurrency: int, range_bytes: int) -> float:
    """Fetch every key once with ``concurrency`` workers; returns requests per second."""
    queue = iter(keys)

    async def worker() -> None:
        for key in queue:
            got = await fetch(key)
            if got != range_bytes:
                raise RuntimeError(f"short read: {got} bytes")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(keys) / (time.perf_counter() - started)


def store_settings(weed: SeaweedServer, kind: str, bucket: str, concurrency: int) -> StoreSettings:
    return StoreSettings(
        name=f"bench-{kind}",
        kind=kind,
        bucket=bucket,
        endpoint=weed.endpoint,  # type: ignore[arg-type]
        access_key=weed.access_key,
        secret_key=weed.secret_key,
        max_connections=concurrency,
        retries=3,
        timeout_s=30.0,
    )


async def upload(store: S3Store, n: int, concurrency: int) -> list[str]:
    body = os.urandom(OBJECT_BYTES)
    keys = [f"1.2.826.0.1.3680043.2/{i // 100:04d}/{i:06d}.dcm" for i in range(n)]
    pending = iter(keys)

    async def the_body() -> AsyncIterator[bytes]:
        yield body

    async def one() -> None:
        for key in pending:
            await store.write_stream(key, the_body())

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return keys


async def run(args: argparse.Namespace) -> dict[str, object]:
    conc, rb = args.concurrency, args.range_bytes
    with SeaweedServer() as weed:
        bucket = weed.make_bucket("bench-adapters")
        s3store = S3Store(store_settings(weed, "s3", bucket, conc))
        minio = MinioStore(store_settings(weed, "minio", bucket, conc))
        t0 = time.perf_counter()
        keys = await upload(s3store, args.objects, conc)
        upload_s = time.perf_counter() - t0

        # (a) bare: URLs presigned up front, so each request costs no signing at all.
        urls = {k: s3store.presign_get(k, 3600) for k in keys}
        bare_http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=conc), auto_decompress=False
        )
        range_header = {"Range": f"bytes=0-{rb - 1}"}

        async def bare(key: str) -> int:
            async with bare_http.get(urls[key], headers=range_header) as resp:
                if resp.status != 206:
                    raise RuntimeError(f"bare GET: HTTP {resp.status}")
                return len(await resp.read())

        # (b) S3Store
        async def via_s3store(key: str) -> int:
            return len((await s3store.read_range(key, 0, rb)).data)

        # (c) boto3 in threads
        client = boto3.client(
            "s3",
            endpoint_url=weed.endpoint,
            aws_access_key_id=weed.access_key,
            aws_secret_access_key=weed.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=conc,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )
        pool = ThreadPoolExecutor(max_workers=conc)
        loop = asyncio.get_running_loop()

        def boto3_get(key: str) -> int:
            resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{rb - 1}")
            return len(resp["Body"].read())

        async def via_boto3(key: str) -> int:
            return await loop.run_in_executor(pool, boto3_get, key)

        # (d) MinioStore
        async def via_minio(key: str) -> int:
            return len((await minio.read_range(key, 0, rb)).data)

        paths: dict[str, Fetch] = {
            "bare_presigned_aiohttp": bare,
            "s3store_sigv4_aiohttp": via_s3store,
            "boto3_threads": via_boto3,
            "minio_store": via_minio,
        }
        warm = keys[: min(len(keys), 4 * conc)]
        for fetch in paths.values():
            await drive(warm, fetch, conc, rb)
        best: dict[str, float] = dict.fromkeys(paths, 0.0)
        rng = random.Random(7)
        for _ in range(args.rounds):
            for name, fetch in paths.items():
                order = keys[:]
                rng.shuffle(order)
                best[name] = max(best[name], await drive(order, fetch, conc, rb))

        await bare_http.close()
        await s3store.close()
        await minio.close()
        pool.shutdown()

    bare_rate = best["bare_presigned_aiohttp"]
    return {
        "bench": "s3_adapters",
        "objects": args.objects,
        "object_bytes": OBJECT_BYTES,
        "range_bytes": rb,
        "concurrency": conc,
        "rounds": args.rounds,
        "requests_per_round": len(keys),
        "upload_s": round(upload_s, 2),
        "req_per_s": {k: round(v, 1) for k, v in best.items()},
        "ratio_to_bare": {k: round(v / bare_rate, 3) for k, v in best.items()},
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "server": "seaweedfs (weed server, same host)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--range-bytes", type=int, default=64 * 1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), ensure_ascii=False))


if __name__ == "__main__":
    main()
