"""bench/crypto.py: encryption at rest: retrieve through the gateway, header reads, rewrap, SM4.

Prints one JSON line. On a real SeaweedFS (tests/support/seaweed.py) it uploads one study
of realistic CT instances (``--study-mb``, objects of 0.5 to 7.5 MiB as in bench/wado.py)
three times: plain, encrypted with AES-256-GCM and with SM4-GCM (64 KiB segments, through
``EncryptedStore``), each in its own bucket, indexes each with ``imaging-gateway sync``
and serves each with its own ``imaging-gateway serve`` (the plain one without a keyring,
so with no ``EncryptedStore`` at all). Then, all in the same run:

- retrieve: ``--rounds`` rounds of a whole-study WADO-RS retrieve from each gateway in
  turn (body read and dropped); MB/s of object (plaintext) bytes, medians; the ratio
  encrypted (AES) / plain, goal >= 0.85; and for SM4, whose cipher is the limit on a CPU
  without SM4 instructions, the ratio of its rate to the bare SM4-GCM decrypt rate;
- header read: ``--header-reads`` sequential ``read_range(key, 0, 65536)`` over the
  study's objects (what sync does for each object) through ``EncryptedStore`` on the AES
  bucket and through the bare S3 adapter on the plain bucket, alternating; median ms and
  the ratio, goal <= 1.3;
- rewrap: ``keys rotate`` then ``rewrap_store`` on the AES bucket: objects/s, and the
  bytes it read per object (headers and sidecars only: no body);
- primitives: AES-256-GCM and SM4-GCM seal and open of 64 KiB segments in one thread, MB/s;
- blind_index_lookup (encrypted PHI columns of the index): three SQLite indexes of the
  same ``--phi-patients`` synthetic patients (one study each, one hospital), plain, AES and
  SM4, searched in turn through ``Gate.search`` (the audited path of QIDO-RS, no HTTP):
  a QIDO search by PatientID (one blind-index lookup when encrypted) and a page of 50
  studies with every attribute (50 rows of sealed cells opened); p50 ms of each, and the
  bare cost of opening one page's sealed cells (7 a row).

    .venv/bin/python bench/crypto.py                    # ~1-2 min on 2 cores
    .venv/bin/python bench/crypto.py --study-mb 100 --rounds 2
    .venv/bin/python bench/crypto.py --phi-only         # the index figures alone, ~20 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import cli, free_port, issue_token, start_gateway
from bench.wado import (
    HOSPITAL,
    UID_ROOT,
    Study,
    base_dataset,
    study_objects,
    upload,
    wado_rate,
)
from imaging_gateway.crypto.aead import TAG_SIZE, Aead, Suite
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.dicom.synthetic import generate_instances
from imaging_gateway.domain.qido import parse_qido
from imaging_gateway.index.schema import patients, studies
from imaging_gateway.index.sql import PATIENT_PHI, STUDY_PHI, SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.gate import AccessContext, Gate
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from imaging_gateway.settings import IndexSettings, Settings, load_settings
from imaging_gateway.storage.base import ObjectStore, RangeRead
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.maintenance import rewrap_store
from imaging_gateway.storage.s3 import S3Store
from tests.support.indexing import index_instances
from tests.support.seaweed import SeaweedServer

GOAL = {"retrieve_ratio": 0.85, "header_read_ratio_max": 1.3}
SEGMENT = 64 * 1024

CONFIG = """
[gateway]
province = "110000"
listen = "127.0.0.1:{port}"
data_dir = "{data}"

[index]
url = "sqlite:///{data}/index.sqlite3"

[encryption]
enabled = {enabled}
suite = "{suite}"

[[stores]]
name = "bench"
kind = "s3"
endpoint = "{endpoint}"
bucket = "{bucket}"
access_key_env = "BENCH_AK"
secret_key_env = "BENCH_SK"
hospital = "{hospital}"
max_connections = 64
"""


class CountingReads:
    """Counts the bytes an adapter's reads return (rewrap must not read bodies)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.name = inner.name
        self.bytes_read = 0
        self.streams = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_range(self, key: str, offset: int, length: int) -> RangeRead:
        read = await self.inner.read_range(key, offset, length)
        self.bytes_read += len(read.data)
        return read

    async def read_stream(self, key: str, **kw: Any) -> AsyncIterator[bytes]:
        self.streams += 1
        async for chunk in self.inner.read_stream(key, **kw):
            self.bytes_read += len(chunk)
            yield chunk


def primitive_rates(total_mb: int = 64) -> dict[str, dict[str, float]]:
    """MB/s of sealing and opening 64 KiB segments with each suite, one thread."""
    out: dict[str, dict[str, float]] = {}
    segment = os.urandom(SEGMENT)
    n = total_mb * 1024 * 1024 // SEGMENT
    for suite in Suite:
        aead = Aead(suite, secrets.token_bytes(suite.key_size))
        nonce, aad = secrets.token_bytes(12), b"a" * 16
        t0 = time.perf_counter()
        for _ in range(n):
            sealed = aead.seal(nonce, segment, aad)
        seal_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(n):
            aead.open(nonce, sealed, aad)
        open_s = time.perf_counter() - t0
        assert len(sealed) == SEGMENT + TAG_SIZE
        mb = n * SEGMENT / 1e6
        out[suite.value] = {"seal_mb_s": round(mb / seal_s, 1), "open_mb_s": round(mb / open_s, 1)}
    return out


async def phi_index(n_patients: int, searches: int) -> dict[str, Any]:
    """QIDO-RS latency on a plain and two encrypted indexes of the same patients."""
    corpus = list(generate_instances(seed=5, patients=n_patients, studies_per_patient=1,
                                     pixel_mode="small", instances_per_series=1))  # fmt: skip
    principal = Principal(subject="pacs-bench", role="hospital", province="110000",
                          token_id="t", hospital=HOSPITAL)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-phi-") as tmp:
        gates: dict[str, Gate] = {}
        indexes: list[SqlIndex] = []
        try:
            for name, suite in (("plain", None), ("aes", Suite.AES_256_GCM),
                                ("sm4", Suite.SM4_GCM)):  # fmt: skip
                phi = None
                if suite is not None:
                    ring = FileKeyring.create(Path(tmp) / f"{name}.json", setting="bench",
                                              key_id="bench", suite=suite)  # fmt: skip
                    phi = PhiCodec(ring)
                index = await SqlIndex.open(
                    IndexSettings(url=f"sqlite:///{tmp}/{name}.sqlite3"), phi=phi
                )
                indexes.append(index)
                await index_instances(index, corpus, hospital=HOSPITAL)
                gates[name] = Gate(index.engine, AuditLog(index.engine, b"k" * 32),
                                   PatientTokens(b"p" * 32), break_glass_minutes=30,
                                   search_engine=index.search_engine, phi=phi)  # fmt: skip
            by_id = [parse_qido("study", [("PatientID", i.patient_id)]) for i in corpus]
            page = parse_qido("study", [("limit", "50"), ("includefield", "all")])
            lookup: dict[str, list[float]] = {name: [] for name in gates}
            pages: dict[str, list[float]] = {name: [] for name in gates}
            for n in range(searches):
                for name, gate in gates.items():
                    t0 = time.perf_counter()
                    found = await gate.search(AccessContext(principal), by_id[n % len(by_id)],
                                              max_results=50)  # fmt: skip
                    lookup[name].append(time.perf_counter() - t0)
                    assert len(found.results) == 1
                    t0 = time.perf_counter()
                    found = await gate.search(AccessContext(principal), page, max_results=50)
                    pages[name].append(time.perf_counter() - t0)
                    assert len(found.results) == 50
            opens = {name: await _open_page(index) for name, index in
                     zip(gates, indexes, strict=True) if index.phi is not None}  # fmt: skip
        finally:
            for index in indexes:
                await index.close()

    def p50(v: list[float]) -> float:
        return round(statistics.median(v) * 1000, 3)

    return {
        "patients": n_patients,
        "searches": searches,
        "by_patient_id_p50_ms": {name: p50(v) for name, v in lookup.items()},
        "page_of_50_p50_ms": {name: p50(v) for name, v in pages.items()},
        "open_page_of_50_cells_ms": {name: round(v * 1000, 3) for name, v in opens.items()},
    }


async def _open_page(index: SqlIndex, rows: int = 50, rounds: int = 50) -> float:
    """Median seconds to open the sealed cells of ``rows`` studies and their patients."""
    phi = index.phi
    assert phi is not None
    async with index.engine.connect() as conn:
        q = (
            sa.select(studies.c.StudyInstanceUID, patients.c.patient_key,
                      *(studies.c[c] for c in STUDY_PHI), *(patients.c[c] for c in PATIENT_PHI))
            .select_from(studies.join(patients, patients.c.id == studies.c.patient_id))
            .limit(rows)
        )  # fmt: skip
        got = (await conn.execute(q)).mappings().all()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for r in got:
            for c in STUDY_PHI:
                phi.open(r[c], column=f"studies.{c}", row=r["StudyInstanceUID"])
            for c in PATIENT_PHI:
                phi.open(r[c], column=f"patients.{c}", row=r["patient_key"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def header_reads(plain: ObjectStore, enc: ObjectStore, keys: list[str], n: int
                       ) -> tuple[list[float], list[float]]:
    times_plain: list[float] = []
    times_enc: list[float] = []
    for i in range(n):
        key = keys[i % len(keys)]
        for store, into in ((plain, times_plain), (enc, times_enc)):
            t0 = time.perf_counter()
            read = await store.read_range(key, 0, 65536)
            into.append(time.perf_counter() - t0)
            assert len(read.data) == 65536
    return times_plain, times_enc


async def run(args: argparse.Namespace) -> dict[str, Any]:
    weed = SeaweedServer().start()
    gateways = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-crypto-") as tmp:
            work = Path(tmp)
            env = {"BENCH_AK": weed.access_key, "BENCH_SK": weed.secret_key}
            setups: dict[str, tuple[Path, Settings, FileKeyring | None]] = {}
            for name, suite in (("plain", None), ("aes", Suite.AES_256_GCM),
                                ("sm4", Suite.SM4_GCM)):
                data = work / name
                data.mkdir()
                cfg = data / "gateway.toml"
                cfg.write_text(CONFIG.format(
                    port=free_port(), data=data / "data", endpoint=weed.endpoint,
                    bucket=weed.make_bucket(f"bench-crypto-{name}"), hospital=HOSPITAL,
                    enabled="true" if suite else "false",
                    suite=(suite or Suite.AES_256_GCM).value,
                ), encoding="utf-8")  # fmt: skip
                settings = load_settings(cfg, environ=env)
                ring = None
                if suite is not None:
                    cli(cfg, "keys", "init", env=env)
                    ring = FileKeyring(settings.encryption.keyring_file, setting="bench")
                setups[name] = (cfg, settings, ring)

            def store_of(name: str) -> ObjectStore:
                _, settings, ring = setups[name]
                inner = S3Store(settings.store("bench"))
                if ring is None:
                    return inner
                return EncryptedStore(inner, ring, encrypt_writes=True, suite=ring.suite,
                                      segment_size=SEGMENT)

            uid = f"{UID_ROOT}.1.1"
            studies: dict[str, Study] = {}
            t0 = time.perf_counter()
            for name in setups:
                store = store_of(name)
                try:
                    objects = study_objects(base_dataset(), 1, int(args.study_mb * 1e6), seed=1)
                    studies[name] = await upload(store, objects, uid)
                finally:
                    await store.close()
            upload_s = time.perf_counter() - t0
            for name, (cfg, _, _) in setups.items():
                out = cli(cfg, "sync", "--store", "bench", "--json", "--no-progress", env=env)
                summary = json.loads(out.stdout.strip().splitlines()[-1])
                assert summary["indexed"] == len(studies[name].keys), summary

            # Retrieve through three gateways, alternating.
            bases: dict[str, str] = {}
            tokens: dict[str, str] = {}
            for name, (cfg, settings, _) in setups.items():
                gw = start_gateway(cfg, settings.gateway.listen_port, env)
                gateways.append(gw)
                bases[name] = gw.base
                tokens[name] = issue_token(cfg, "--role", "hospital", "--hospital", HOSPITAL,
                                           "--subject", "pacs-bench", env=env)  # fmt: skip
            for name in setups:
                await wado_rate(bases[name], tokens[name], studies[name])  # warm-up
            rates: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name in setups:
                    rates[name].append((await wado_rate(bases[name], tokens[name],
                                                        studies[name]))[0])
            for gw in gateways:
                gw.stop()
            gateways.clear()

            # Header reads, as sync does them.
            plain, enc = store_of("plain"), store_of("aes")
            try:
                tp, te = await header_reads(plain, enc, studies["aes"].keys, args.header_reads)
            finally:
                await plain.close()
                await enc.close()

            # Rewrap after a rotation: headers only.
            _, _, ring = setups["aes"]
            assert ring is not None
            ring.rotate()
            counting = CountingReads(S3Store(setups["aes"][1].store("bench")))
            rewrapper = EncryptedStore(counting, ring, encrypt_writes=True)
            try:
                t0 = time.perf_counter()
                tally = await rewrap_store(rewrapper, concurrency=16)
                rewrap_s = time.perf_counter() - t0
            finally:
                await rewrapper.close()
            objects = tally.counters.get("rewrapped", 0)
            assert objects == len(studies["aes"].keys) and counting.streams == 0, tally.counters

            prims = primitive_rates()
            med = {name: statistics.median(v) for name, v in rates.items()}
            hp, he = statistics.median(tp), statistics.median(te)
            sm4_open = prims["SM4-GCM"]["open_mb_s"]
            return {
                "bench": "crypto",
                "cpus": os.cpu_count(),
                "segment_size": SEGMENT,
                "upload_s": round(upload_s, 1),
                "retrieve": {
                    "study_mb": round(studies["plain"].bytes / 1e6, 1),
                    "instances": len(studies["plain"].keys),
                    "rounds": args.rounds,
                    "plain_mb_s": round(med["plain"], 1),
                    "aes_mb_s": round(med["aes"], 1),
                    "sm4_mb_s": round(med["sm4"], 1),
                    "aes_ratio": round(med["aes"] / med["plain"], 3),
                    "sm4_ratio_to_plain": round(med["sm4"] / med["plain"], 3),
                    "sm4_ratio_to_bare_sm4_open": round(med["sm4"] / sm4_open, 3),
                    "rounds_mb_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                    "aes_round_ratios": [
                        round(a / p, 3) for p, a in zip(rates["plain"], rates["aes"], strict=True)
                    ],
                },
                "header_read_64k": {
                    "reads": args.header_reads,
                    "plain_p50_ms": round(hp * 1000, 2),
                    "aes_p50_ms": round(he * 1000, 2),
                    "ratio": round(he / hp, 3),
                },
                "rewrap": {
                    "objects": objects,
                    "seconds": round(rewrap_s, 2),
                    "objects_per_s": round(objects / rewrap_s, 1),
                    "bytes_read_per_object": round(counting.bytes_read / max(objects, 1)),
                    "bodies_streamed": counting.streams,
                },
                "primitives_mb_s": prims,
                "blind_index_lookup": await phi_index(args.phi_patients, args.phi_searches),
                "goal": GOAL,
                "goal_met": {
                    "retrieve_ratio": med["aes"] / med["plain"] >= GOAL["retrieve_ratio"],
                    "header_read_ratio": he / hp <= GOAL["header_read_ratio_max"],
                },
            }
    finally:
        for gw in gateways:
            gw.stop()
        weed.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--study-mb", type=float, default=200, help="size of the study")
    ap.add_argument("--rounds", type=int, default=7, help="retrieve rounds (medians)")
    ap.add_argument("--header-reads", type=int, default=200, help="64 KiB reads per store")
    ap.add_argument("--phi-patients", type=int, default=2000, help="patients of the PHI indexes")
    ap.add_argument("--phi-searches", type=int, default=200, help="searches per PHI index")
    ap.add_argument("--phi-only", action="store_true", help="only the PHI index figures")
    args = ap.parse_args()
    if args.phi_only:
        figures = {"bench": "crypto", "cpus": os.cpu_count(),
                   "blind_index_lookup": asyncio.run(phi_index(args.phi_patients,
                                                               args.phi_searches))}  # fmt: skip
        print(json.dumps(figures))
        return
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
