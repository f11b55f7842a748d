"""A real gateway over HTTP (in the test process): authentication, roles, sync jobs, stats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from imaging_gateway.dicom.synthetic import corrupt_samples, generate_instances
from tests.e2e.conftest import PROVINCE_CONFIG
from tests.support.gateway import InProcessGateway, cli, free_port, issue_token


@pytest.fixture
def gateway(tmp_path: Path, index_url: str) -> Iterator[InProcessGateway]:
    store = tmp_path / "store"
    n = 0
    for inst in generate_instances(seed=7, patients=3, studies_per_patient=1,
                                   pixel_mode="small", instances_per_series=2):
        path = store / inst.key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(inst.data)
        n += 1
    for key, data, _reason in corrupt_samples():
        path = store / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(PROVINCE_CONFIG.format(port=port, index_url=index_url), encoding="utf-8")
    gw = InProcessGateway(config, port)
    gw.expected_instances = n  # type: ignore[attr-defined]
    gw.start()
    yield gw
    gw.stop()


def token(gw: InProcessGateway, *args: str) -> str:
    return issue_token(gw.config, *args)


async def test_tokens_roles_and_sync_job(gateway: InProcessGateway, http: aiohttp.ClientSession) -> None:
    base = gateway.base
    admin = {"Authorization": "Bearer " + token(gateway, "--role", "admin")}
    hospital = {"Authorization": "Bearer " + token(
        gateway, "--role", "hospital", "--hospital", "H11010800028")}

    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200 and (await r.json())["province"] == "110000"
    async with http.get(f"{base}/admin/sync-jobs") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"] == "unauthenticated"
    async with http.get(f"{base}/admin/sync-jobs", headers={"Authorization": "Bearer x.y.z"}) as r:
        assert r.status == 401
    async with http.get(f"{base}/admin/sync-jobs", headers=hospital) as r:
        assert r.status == 403, await r.text()
    async with http.post(f"{base}/admin/sync-jobs", headers=admin, data=b"{not json") as r:
        assert r.status == 400
    async with http.post(f"{base}/admin/sync-jobs", headers=admin, json={"store": "nope"}) as r:
        assert r.status == 400 and "bj-fs" in (await r.json())["message"]

    async with http.post(f"{base}/admin/sync-jobs", headers=admin, json={"store": "bj-fs"}) as r:
        assert r.status == 202
        job = await r.json()
        assert r.headers["Location"] == f"{base}/admin/sync-jobs/{job['id']}"
    for _ in range(200):
        async with http.get(f"{base}/admin/sync-jobs/{job['id']}", headers=admin) as r:
            job = await r.json()
        if job["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "succeeded", job
    c = job["counters"]
    n_bad = len(corrupt_samples())
    assert c["indexed"] == gateway.expected_instances  # type: ignore[attr-defined]
    assert c["quarantined"] == n_bad
    assert c["listed"] == c["indexed"] + c["quarantined"]

    async with http.get(f"{base}/admin/index/stats", headers=admin) as r:
        stats = await r.json()
    assert stats["instances"] == gateway.expected_instances  # type: ignore[attr-defined]
    assert stats["quarantined"] == n_bad
    async with http.get(f"{base}/admin/sync-jobs", headers=admin) as r:
        assert [j["id"] for j in await r.json()] == [job["id"]]
    async with http.get(f"{base}/admin/sync-jobs/00000000-0000-0000-0000-000000000000",
                        headers=admin) as r:
        assert r.status == 404
    # The access log never carries a token or a query string.
    async with http.get(f"{base}/admin/sync-jobs?store=PATIENT-SECRET", headers=admin) as r:
        assert r.status == 200
    logs = gateway.logs()
    assert "PATIENT-SECRET" not in logs
    assert admin["Authorization"].split()[1] not in logs
    assert "Traceback" not in logs


async def test_quarantine_listed_with_reasons_paged(
    gateway: InProcessGateway, http: aiohttp.ClientSession
) -> None:
    """The admin sees each quarantined object and why, over HTTP (keyset pages) and the CLI."""
    base = gateway.base
    cli(gateway.config, "sync", "--store", "bj-fs", "--no-progress")
    admin = {"Authorization": "Bearer " + token(gateway, "--role", "admin")}
    expected = {key: reason for key, _data, reason in corrupt_samples()}

    seen: list[dict[str, object]] = []
    cursor: str | None = None
    pages = 0
    while True:
        url = f"{base}/admin/quarantine?limit=2" + (f"&cursor={cursor}" if cursor else "")
        async with http.get(url, headers=admin) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
        assert pages < 10
    assert pages >= 3
    keys = [item["key"] for item in seen]
    assert keys == sorted(expected) and len(set(keys)) == len(keys)
    for item in seen:
        assert item["store"] == "bj-fs"
        assert str(item["reason"]).startswith(expected[str(item["key"])]), item
        assert item["size"] >= 0 and item["first_seen"] and item["last_seen"]
    async with http.get(f"{base}/admin/quarantine?store=nope", headers=admin) as r:
        assert r.status == 200 and (await r.json()) == {"items": [], "next": None}

    hospital = {"Authorization": "Bearer " + token(
        gateway, "--role", "hospital", "--hospital", "H11010800028")}
    async with http.get(f"{base}/admin/quarantine", headers=hospital) as r:
        assert r.status == 403 and (await r.json())["error"] == "forbidden"
    for bad, name in (("limit=0", "limit"), ("limit=x", "limit"), ("cursor=%%%", "cursor"),
                      ("cursor=bm90LWpzb24", "cursor")):
        async with http.get(f"{base}/admin/quarantine?{bad}", headers=admin) as r:
            body = await r.json()
            assert r.status == 400 and name in body["message"], (bad, body)

    rows = json.loads(cli(gateway.config, "index", "quarantine", "--json").stdout)
    assert [(r["key"], r["reason"]) for r in rows] == [(s["key"], s["reason"]) for s in seen]
    assert json.loads(
        cli(gateway.config, "index", "quarantine", "--store", "nope", "--json").stdout) == []
    text = cli(gateway.config, "index", "quarantine").stdout
    assert all(key in text and expected[key] in text for key in expected)
