"""bench/federation.py: federated vs local search, a slow peer, cross-province retrieve, 31 peers.

Prints one JSON line. Three real gateway processes on loopback (Beijing 110000, Shanghai
310000, Guangdong 440000, set up as ``imaging-gateway demo --federation`` does: own
store, index and key each, one shared patient-token key), a consent grant at Beijing for
a patient with studies in another province, then:

- search: ``--rounds`` alternating requests of the same study search by PatientID,
  local (``federated`` absent) and federated (both peers asked); p50/p99 of each and the
  p50 difference (goal: federated p50 <= local p50 + 15 ms);
- slow peer: Beijing restarted with one more peer that answers after 5 s; federated
  search p50/p99 (goal: within the 1.5 s deadline, the peer named in Warning);
- retrieve: the remote study (realistic CT/MR pixel data, ``--instances-per-series``
  instances a series: tens of MB, so that the figure is throughput, not the fixed cost
  of one request) retrieved at its own province directly and through Beijing's proxy,
  alternating, MB/s of body bytes, medians, ratio (goal >= 0.7);
- fan-out: Beijing restarted with 31 peers (real HTTP endpoints on loopback answering an
  empty result), federated search p50/p99.

    .venv/bin/python bench/federation.py               # ~1-2 min
    .venv/bin/python bench/federation.py --rounds 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import GatewayProcess, free_port, summarize_ms
from imaging_gateway.demo_federation import HOME, PEER, PROVINCES, set_up
from imaging_gateway.dicom.synthetic import HOSPITALS
from imaging_gateway.federation.peers import PROVINCE_CODES
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from imaging_gateway.settings import load_settings

FAKE_PEER = """
[[federation.peers]]
province = "{province}"
name = "fake {province}"
base_url = "http://127.0.0.1:{port}/dicomweb"
kind = "dicomweb"
"""


def _token(config: Path, province: str, hospital: str) -> str:
    settings = load_settings(config)
    authority = TokenAuthority(
        load_or_create_signing_key(settings.security.token_key_file),
        province=province, max_ttl_s=settings.security.token_max_ttl_s,
    )
    return authority.issue(subject="bench", role="hospital", hospital=hospital, ttl_s=3600)


async def _fake_peers(ports: list[int], delay_s: float) -> list[web.AppRunner]:
    async def answer(request: web.Request) -> web.Response:
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(text="[]", content_type="application/dicom+json")

    runners = []
    for port in ports:
        app = web.Application()
        app.router.add_get("/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    return runners


async def _timed_search(http: aiohttp.ClientSession, url: str, params: dict[str, str],
                        headers: dict[str, str]) -> tuple[float, str | None]:
    t0 = time.perf_counter()
    async with http.get(url, params=params, headers=headers) as r:
        await r.read()
        assert r.status in (200, 204), r.status
        warning = r.headers.get("Warning")
    return time.perf_counter() - t0, warning


async def _retrieve(http: aiohttp.ClientSession, url: str, headers: dict[str, str]
                    ) -> tuple[int, float]:
    """(body bytes, seconds) of one whole retrieve."""
    t0 = time.perf_counter()
    size = 0
    async with http.get(url, headers=headers) as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_chunked(256 * 1024):
            size += len(chunk)
    return size, time.perf_counter() - t0


def _restart_home(home: GatewayProcess, config: Path, peers: str) -> GatewayProcess:
    home.stop()
    text = config.read_text(encoding="utf-8")
    head = text.split("\n[[federation.peers]]", 1)[0].rstrip() + "\n"
    config.write_text(head + peers, encoding="utf-8")
    gw = GatewayProcess(config, home.port)
    gw.start(timeout=120)
    return gw


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The figures; every file it writes (stores, indexes, keys: ~870 MB) goes with it."""
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        return await _run(args, Path(tmp))


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = min(free_port(), 65000)
    # set_up runs its own event loop (asyncio.run): keep it off this one.
    provinces, inst, other = await asyncio.to_thread(
        set_up, work, patients=args.patients, host="127.0.0.1", port=port,
        instances_per_series=args.instances_per_series,
    )
    gws = {p.province: GatewayProcess(p.config, int(p.base.rsplit(":", 1)[1]))
           for p in provinces}
    runners: list[web.AppRunner] = []
    home_cfg = provinces[0].config
    result: dict[str, Any] = {"bench": "federation", "patients": args.patients,
                              "rounds": args.rounds}
    try:
        for gw in gws.values():
            gw.start(timeout=120)
        me = {"Authorization": "Bearer " + _token(home_cfg, HOME, inst.hospital.code)}
        home = gws[HOME].base
        async with aiohttp.ClientSession() as http:
            until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            async with http.post(f"{home}/consents", headers=me, json={
                    "national_id": inst.national_id, "purpose": "treatment",
                    "evidence": "bench", "valid_until": until}) as r:
                assert r.status == 201, await r.text()
            url = f"{home}/dicomweb/studies"
            local_q = {"PatientID": inst.patient_id, "IssuerOfPatientID": inst.hospital.code}
            fed_q = {**local_q, "federated": "true"}
            for _ in range(5):  # warm-up: connections, statement caches, token tables
                await _timed_search(http, url, local_q, me)
                await _timed_search(http, url, fed_q, me)
            local, fed = [], []
            for _ in range(args.rounds):
                local.append((await _timed_search(http, url, local_q, me))[0])
                t, warning = await _timed_search(http, url, fed_q, me)
                assert warning is None, warning
                fed.append(t)
            ls, fs = summarize_ms(local), summarize_ms(fed)
            result["local_search"] = ls
            result["federated_search"] = fs
            result["federated_minus_local_p50_ms"] = round(fs["p50_ms"] - ls["p50_ms"], 2)

            # Retrieve: the remote study at its province vs through Beijing.
            async with http.get(url, params=fed_q, headers=me) as r:
                studies = await r.json()
            remote = next(s for s in studies
                          if s["00081190"]["Value"][0].split("/federation/")[-1][:6] == other)
            uid = remote["0020000D"]["Value"][0]
            holder_cfg = next(p.config for p in provinces if p.province == other)
            direct_url = f"{gws[other].base}/dicomweb/studies/{uid}"
            there: dict[str, str] = {}
            for code in sorted(h.code for h in HOSPITALS if h.province == other):
                # The producing hospital of the study, as its own PACS would retrieve it.
                there = {"Authorization": "Bearer " + _token(holder_cfg, other, code)}
                async with http.get(f"{direct_url}/metadata", headers=there) as r:
                    if r.status == 200:
                        break
            proxy_url = remote["00081190"]["Value"][0]
            rounds = max(3, args.rounds // 20)
            # Alternating, so that both share the machine's drift.
            rates: dict[str, list[float]] = {"direct": [], "proxied": []}
            for _ in range(rounds):
                for leg, study_url, headers in (("direct", direct_url, there),
                                                ("proxied", proxy_url, me)):
                    size, seconds = await _retrieve(http, study_url, headers)
                    rates[leg].append(size / 1e6 / seconds)
            direct, proxied = (statistics.median(rates[k]) for k in ("direct", "proxied"))
            result["retrieve"] = {"study_MB": round(size / 1e6, 1),
                                  "direct_MBps": round(direct, 1),
                                  "via_home_MBps": round(proxied, 1),
                                  "ratio": round(proxied / direct, 3), "rounds": rounds}

        # A peer answering after 5 s.
        slow_port = free_port()
        runners = await _fake_peers([slow_port], 5.0)
        peers = "".join(PEER.format(province=p, name=n, host="127.0.0.1",
                                    port=gws[p].port) for p, n in PROVINCES.items() if p != HOME)
        gws[HOME] = _restart_home(gws[HOME], home_cfg,
                                  peers + FAKE_PEER.format(province="120000", port=slow_port))
        async with aiohttp.ClientSession() as http:
            slow, named = [], True
            for _ in range(args.slow_rounds):
                t, warning = await _timed_search(http, url, fed_q, me)
                slow.append(t)
                named = named and warning is not None and "120000" in warning
            result["slow_peer"] = {**summarize_ms(slow), "deadline_ms": 1500,
                                   "peer_named_in_warning": named}
        for runner in runners:
            await runner.cleanup()
        runners = []

        # 31 peers, every one a real HTTP endpoint answering an empty result.
        codes = sorted(c for c in PROVINCE_CODES if c != HOME)[:31]
        fake_ports = [free_port() for _ in codes]
        runners = await _fake_peers(fake_ports, 0.0)
        gws[HOME] = _restart_home(gws[HOME], home_cfg, "".join(
            FAKE_PEER.format(province=c, port=p) for c, p in zip(codes, fake_ports, strict=True)))
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                await _timed_search(http, url, fed_q, me)
            wide = []
            for _ in range(args.rounds):
                t, warning = await _timed_search(http, url, fed_q, me)
                assert warning is None, warning
                wide.append(t)
            result["fanout_31_peers"] = summarize_ms(wide)
    finally:
        for runner in runners:
            await runner.cleanup()
        for gw in gws.values():
            gw.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--slow-rounds", type=int, default=8)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--instances-per-series", type=int, default=20,
                        help="studies of realistic size for the retrieve figure (~20-60 MB)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
