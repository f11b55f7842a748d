"""bench/wado.py: WADO-RS whole-study retrieve vs raw object-store GETs, and peak RSS at 2 GB.

Prints one JSON line. On a real SeaweedFS (tests/support/seaweed.py) it uploads two studies
of realistic instances: CT slices (0.5 MiB) and multi-frame objects of 2 to 15 frames
(1 to 7.5 MiB), the frames a synthetic CT's own (phantom plus noise, never compressible),
each object with its own UIDs: a ~400 MB study for throughput (``--throughput-mb``) and
a 2 GB one (``--study-gb``) for memory. It indexes the bucket with ``imaging-gateway
sync`` and serves it with ``imaging-gateway serve`` (the store configured with the token's
hospital), then:

- throughput: ``--rounds`` rounds alternating the store's own limit (every object of the
  study by presigned URL with plain aiohttp, ``--raw-concurrency`` in flight, bodies read
  and dropped) and ``GET /dicomweb/studies/{uid}`` through the gateway (hospital token,
  the multipart body read and dropped); MB/s of object bytes (10^6), medians, ratio;
- hop floor: in the same rounds, the cheapest relay this machine allows: a thread of
  this process, blocking sockets and no framing, splicing each object's presigned GET
  (``--raw-concurrency`` requests in flight ahead) into one client connection. It is what
  any extra hop between the store and the client costs on these cores (the store, the
  relay and the client share them), so the gateway is also read against it;
- memory: a fresh gateway process streams the 2 GB study to a client that reads as fast
  as it can; its VmHWM (from /proc) before and after, and the highest VmRSS sampled
  every 20 ms; then the same study's raw GET rate once more for the record.

    .venv/bin/python bench/wado.py                       # ~1 min (upload of 2.4 GB ~25 s)
    .venv/bin/python bench/wado.py --study-gb 0.5 --rounds 2   # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import fcntl
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    RssSampler,
    cli,
    free_port,
    issue_token,
    proc_status_kib,
    start_gateway,
)
from imaging_gateway.dicom.synthetic import generate_instances
from imaging_gateway.services.retrieve import PREFETCH_INSTANCES
from imaging_gateway.settings import load_settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.storage.s3 import S3Store
from imaging_gateway.storage.zerocopy import PIPE_SIZE
from tests.support.seaweed import SeaweedServer

GOAL = {"throughput_ratio": 0.8, "peak_rss_mib": 200, "study_gb": 2}
HOSPITAL = "H11010800028"
UID_ROOT = "1.2.826.0.1.3680043.8.498.78"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
# (frames, weight): 0.5, 1, 2, 4 and 7.5 MiB objects of 512 x 512 x 16 bit frames.
FRAMES = ((1, 0.40), (2, 0.20), (4, 0.15), (8, 0.15), (15, 0.10))
SERIES_SIZE = 50
READ_CHUNK = 1 << 20
ACCEPT = 'multipart/related; type="application/dicom"'

CONFIG = """
[gateway]
province = "110000"
listen = "127.0.0.1:{port}"
data_dir = "{data}"

[index]
url = "sqlite:///{data}/index.sqlite3"

[[stores]]
name = "bench"
kind = "s3"
endpoint = "{endpoint}"
bucket = "{bucket}"
access_key_env = "BENCH_AK"
secret_key_env = "BENCH_SK"
hospital = "{hospital}"
"""


@dataclass(frozen=True, slots=True)
class Study:
    uid: str
    keys: list[str]
    sizes: list[int]

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def base_dataset() -> Dataset:
    """One realistic synthetic CT instance (Chinese name, hospital codes, 512 x 512 pixels)."""
    first = next(
        generate_instances(
            seed=4242,
            patients=1,
            studies_per_patient=1,
            modalities=("CT",),
            charsets=("ISO_IR 192",),
            instances_per_series=1,
            series_per_study=1,
        )
    )
    return dcmread(io.BytesIO(first.data))


def study_objects(
    base: Dataset, study_no: int, target_bytes: int, seed: int
) -> Iterator[tuple[str, bytes]]:
    """(key, Part 10 bytes) of one study of about ``target_bytes``; the frames are reused."""
    rng = random.Random(seed)
    frame = bytes(base.PixelData)
    ds = copy.deepcopy(base)
    study_uid = f"{UID_ROOT}.1.{study_no}"
    ds.StudyInstanceUID = study_uid
    ds.AccessionNumber = f"W{study_no:07d}"
    day = f"{ds.StudyDate[:4]}/{ds.StudyDate[4:6]}/{ds.StudyDate[6:]}"
    made = 0
    n = 0
    frames_choices = [f for f, _ in FRAMES]
    weights = [w for _, w in FRAMES]
    while made < target_bytes:
        frames = rng.choices(frames_choices, weights)[0]
        series_no = n // SERIES_SIZE + 1
        series_uid = f"{UID_ROOT}.2.{study_no}.{series_no}"
        sop = f"{UID_ROOT}.3.{study_no}.{n + 1}"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_no
        ds.InstanceNumber = n % SERIES_SIZE + 1
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        if frames == 1:
            ds.SOPClassUID = base.SOPClassUID
            if "NumberOfFrames" in ds:
                del ds.NumberOfFrames
        else:
            ds.SOPClassUID = ENHANCED_CT
            ds.NumberOfFrames = frames
        ds.file_meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
        ds.PixelData = frame * frames
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        data = out.getvalue()
        made += len(data)
        n += 1
        yield f"{HOSPITAL}/{day}/{study_uid}/{series_uid}/{sop}.dcm", data


async def upload(store: ObjectStore, objects: Iterator[tuple[str, bytes]], uid: str) -> Study:
    keys: list[str] = []
    sizes: list[int] = []
    sem = asyncio.Semaphore(8)

    async def one(key: str, data: bytes) -> None:
        async def body() -> AsyncIterator[bytes]:
            yield data

        try:
            await store.write_stream(key, body())
        finally:
            sem.release()

    tasks = []
    for key, data in objects:
        await sem.acquire()
        keys.append(key)
        sizes.append(len(data))
        tasks.append(asyncio.create_task(one(key, data)))
    await asyncio.gather(*tasks)
    return Study(uid, keys, sizes)


async def raw_rate(store: S3Store, study: Study, concurrency: int) -> float:
    """MB/s of whole-object GETs on presigned URLs with plain aiohttp: the store's limit."""
    urls = [store.presign_get(k, 3600) for k in study.keys]
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:
        sem = asyncio.Semaphore(concurrency)
        got = 0

        async def get(url: str) -> None:
            nonlocal got
            async with sem, http.get(url) as r:
                assert r.status == 200, r.status
                async for chunk in r.content.iter_chunked(READ_CHUNK):
                    got += len(chunk)

        t0 = time.perf_counter()
        await asyncio.gather(*(get(u) for u in urls))
        elapsed = time.perf_counter() - t0
    assert got == study.bytes, (got, study.bytes)
    return study.bytes / elapsed / 1e6


async def wado_rate(base: str, token: str, study: Study) -> tuple[float, int]:
    """MB/s (object bytes) of one whole-study WADO-RS retrieve; and the body's length."""
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        got = 0
        t0 = time.perf_counter()
        async with http.get(f"{base}/dicomweb/studies/{study.uid}", headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"WADO-RS answered {r.status}: {(await r.read())[:300]!r}")
            async for chunk in r.content.iter_chunked(READ_CHUNK):
                got += len(chunk)
        elapsed = time.perf_counter() - t0
    if got < study.bytes:
        raise RuntimeError(f"WADO-RS body cut: {got} bytes < {study.bytes} of objects")
    return study.bytes / elapsed / 1e6, got


class HopFloor:
    """A minimal relay on a loopback port: each GET gets the study's objects, spliced.

    One connection at a time, in a thread: ``concurrency`` kept-alive connections to the
    store each hold one presigned GET in flight ahead; each response head is read and
    dropped (the body bytes that came with it written on), the rest of its body spliced
    socket -> pipe -> client with blocking calls. The body is
    the objects' bytes alone (no multipart framing: ~100 bytes a part, nothing here).
    """

    def __init__(self, store: S3Store, study: Study, concurrency: int) -> None:
        self._store = store
        self._study = study
        self._concurrency = concurrency
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with client:
                client.recv(1 << 16)  # the request: one GET, read and not looked at
                self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        study, n = self._study, self._concurrency
        targets = [urlsplit(self._store.presign_get(k, 3600)) for k in study.keys]
        where = (targets[0].hostname or "127.0.0.1", targets[0].port or 80)
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % study.bytes)
        upstream = [socket.create_connection(where) for _ in range(n)]
        pipe_r, pipe_w = os.pipe()
        fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # as the gateway's relay
        try:

            def ask(i: int) -> None:
                t = targets[i]
                upstream[i % n].sendall(
                    f"GET {t.path}?{t.query} HTTP/1.1\r\nHost: {t.netloc}\r\n\r\n".encode()
                )

            for i in range(min(n, len(targets))):
                ask(i)
            for i, size in enumerate(study.sizes):
                sock = upstream[i % n]
                head = b""
                while b"\r\n\r\n" not in head:
                    more = sock.recv(1 << 16)
                    if not more:
                        raise EOFError("store closed a connection before a response")
                    head += more
                start = head[head.index(b"\r\n\r\n") + 4 :]  # body bytes read with the head
                client.sendall(start)
                left = size - len(start)
                while left:
                    got = os.splice(sock.fileno(), pipe_w, min(left, PIPE_SIZE))
                    if not got:
                        raise EOFError("store closed a response early")
                    left -= got
                    while got:
                        got -= os.splice(pipe_r, client.fileno(), got)
                if i + n < len(targets):
                    ask(i + n)
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
            for sock in upstream:
                sock.close()


async def floor_rate(floor: HopFloor, study: Study) -> float:
    """MB/s of one study through ``floor``, read as ``wado_rate`` reads the gateway's."""
    async with aiohttp.ClientSession() as http:
        got = 0
        t0 = time.perf_counter()
        async with http.get(floor.url) as r:
            async for chunk in r.content.iter_chunked(READ_CHUNK):
                got += len(chunk)
        elapsed = time.perf_counter() - t0
    assert got == study.bytes, (got, study.bytes)
    return study.bytes / elapsed / 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    weed = SeaweedServer().start()
    gw = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wado-") as tmp:
            work = Path(tmp)
            bucket = weed.make_bucket("bench-wado")
            env = {"BENCH_AK": weed.access_key, "BENCH_SK": weed.secret_key}
            port = free_port()
            cfg = work / "gateway.toml"
            cfg.write_text(
                CONFIG.format(port=port, data=work / "data", endpoint=weed.endpoint,
                              bucket=bucket, hospital=HOSPITAL),
                encoding="utf-8",
            )  # fmt: skip
            store = S3Store(load_settings(cfg, environ=env).store("bench"))
            base = base_dataset()
            try:
                t0 = time.perf_counter()
                small = await upload(
                    store,
                    study_objects(base, 1, int(args.throughput_mb * 1e6), seed=1),
                    f"{UID_ROOT}.1.1",
                )
                big = await upload(
                    store,
                    study_objects(base, 2, int(args.study_gb * 1e9), seed=2),
                    f"{UID_ROOT}.1.2",
                )
                upload_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                summary = json.loads(
                    cli(cfg, "sync", "--store", "bench", "--json", "--no-progress", env=env)
                    .stdout.strip().splitlines()[-1]
                )  # fmt: skip
                sync_s = time.perf_counter() - t0
                assert summary["indexed"] == len(small.keys) + len(big.keys), summary
                token = issue_token(cfg, "--role", "hospital", "--hospital", HOSPITAL,
                                    "--subject", "pacs-bench", env=env)  # fmt: skip

                # Throughput: alternate raw and gateway rounds (medians).
                gw = start_gateway(cfg, port, env)
                await wado_rate(gw.base, token, small)  # warm-up (connections, caches)
                floor = HopFloor(store, small, args.raw_concurrency)
                await floor_rate(floor, small)
                raws: list[float] = []
                wados: list[float] = []
                floors: list[float] = []
                for _ in range(args.rounds):
                    raws.append(await raw_rate(store, small, args.raw_concurrency))
                    wados.append((await wado_rate(gw.base, token, small))[0])
                    floors.append(await floor_rate(floor, small))
                floor.close()
                gw.stop()

                # Memory: a fresh process streams the 2 GB study.
                gw = start_gateway(cfg, port, env)
                assert gw.proc is not None
                pid = gw.proc.pid
                startup_hwm = proc_status_kib(pid, "VmHWM")
                with RssSampler(pid) as sampler:
                    big_rate, body = await wado_rate(gw.base, token, big)
                hwm = proc_status_kib(pid, "VmHWM")
                rss_after = proc_status_kib(pid, "VmRSS")
                gw.stop()
                gw = None
                big_raw = await raw_rate(store, big, args.raw_concurrency)
            finally:
                await store.close()
            raw, wado = statistics.median(raws), statistics.median(wados)
            hop = statistics.median(floors)
            return {
                "bench": "wado",
                "cpus": os.cpu_count(),
                "upload_s": round(upload_s, 1),
                "sync_s": round(sync_s, 1),
                "raw_concurrency": args.raw_concurrency,
                "gateway_prefetch_instances": PREFETCH_INSTANCES,
                "throughput": {
                    "study_mb": round(small.bytes / 1e6, 1),
                    "instances": len(small.keys),
                    "rounds": args.rounds,
                    "raw_get_mb_s": round(raw, 1),
                    "wado_mb_s": round(wado, 1),
                    "ratio": round(wado / raw, 3),
                    "round_ratios": [round(w / r, 3) for r, w in zip(raws, wados, strict=True)],
                    "hop_floor_mb_s": round(hop, 1),
                    "hop_floor_ratio": round(hop / raw, 3),
                    "wado_vs_hop_floor": round(wado / hop, 3),
                },
                "memory": {
                    "study_mb": round(big.bytes / 1e6, 1),
                    "instances": len(big.keys),
                    "body_bytes": body,
                    "wado_mb_s": round(big_rate, 1),
                    "raw_get_mb_s": round(big_raw, 1),
                    "ratio": round(big_rate / big_raw, 3),
                    "startup_vmhwm_mib": round(startup_hwm / 1024, 1),
                    "peak_rss_mib": round(hwm / 1024, 1),
                    "sampled_max_rss_mib": round(sampler.max_kib / 1024, 1),
                    "rss_after_mib": round(rss_after / 1024, 1),
                },
                "goal": GOAL,
                "goal_met": {
                    "throughput_ratio": wado / raw >= GOAL["throughput_ratio"],
                    "peak_rss": hwm / 1024 < GOAL["peak_rss_mib"],
                },
            }
    finally:
        if gw is not None:
            gw.stop()
        weed.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throughput-mb", type=float, default=400, help="throughput study size")
    ap.add_argument("--study-gb", type=float, default=2.0, help="memory study size")
    ap.add_argument("--rounds", type=int, default=7, help="raw/gateway rounds (medians)")
    ap.add_argument(
        "--raw-concurrency",
        type=int,
        default=PREFETCH_INSTANCES,
        help="GETs in flight for the raw rate (default: the gateway's read-ahead window)",
    )
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
