"""Absolute URLs the gateway writes, as real clients meet them (SQLite and PostgreSQL):
dicomweb-client sends ``Host: 127.0.0.1`` without the port; a configured public base URL
wins over any header; X-Forwarded-* counts only from a configured proxy."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.e2e.conftest import PROVINCE_CONFIG, Province, start_province

RETRIEVE_URL = "00081190"
PIXEL_DATA = "7FE00010"
FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.cn",
             "X-Forwarded-Prefix": "/imaging/"}


def _with_gateway_keys(extra: str) -> str:
    return PROVINCE_CONFIG.replace('data_dir = "data"\n', f'data_dir = "data"\n{extra}\n')


@pytest.fixture
def public(tmp_path: Path, index_url: str) -> Iterator[Province]:
    """A gateway whose public base URL names it by another host than clients send."""
    text = _with_gateway_keys('public_base_url = "http://localhost:{port}/"')
    started = start_province(tmp_path, index_url, text)
    yield started
    started.gw.stop()


@pytest.fixture
def proxied(tmp_path: Path, index_url: str) -> Iterator[Province]:
    """A gateway behind a reverse proxy on 127.0.0.1 (configured as trusted)."""
    text = _with_gateway_keys('trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]')
    started = start_province(tmp_path, index_url, text)
    yield started
    started.gw.stop()


def _pixel_bulkdata(client: DICOMwebClient, study: str) -> tuple[str, bytes]:
    metadata = client.retrieve_study_metadata(study)
    uri = metadata[0][PIXEL_DATA]["BulkDataURI"]
    return uri, client.retrieve_bulkdata(uri)[0]


def _expected_pixels(province: Province, uri: str) -> bytes:
    sop = uri.split("/instances/")[1].split("/")[0]
    data = next(i.data for i in province.corpus if i.sop_uid == sop)
    return bytes(pydicom.dcmread(io.BytesIO(data)).PixelData)


async def test_dicomweb_client_bulkdata_without_a_configured_base(province: Province) -> None:
    """dicomweb-client's Host header has no port: the URLs still name the port it used."""
    _, home, _ = province.shared_patient()
    client = DICOMwebClient(url=f"{province.gw.base}/dicomweb", headers=province.hospital(home))
    study = sorted(province.studies(hospital=home))[0]
    found = await asyncio.to_thread(client.search_for_studies)
    retrieve_urls = {s[RETRIEVE_URL]["Value"][0] for s in found}
    assert f"{province.gw.base}/dicomweb/studies/{study}" in retrieve_urls
    uri, pixels = await asyncio.to_thread(_pixel_bulkdata, client, study)
    assert uri.startswith(f"{province.gw.base}/dicomweb/studies/{study}/series/")
    assert pixels == _expected_pixels(province, uri)


async def test_the_configured_public_base_url_is_in_every_url(
    public: Province, http: aiohttp.ClientSession
) -> None:
    port = public.gw.port
    base = f"http://localhost:{port}"
    _, home, _ = public.shared_patient()
    auth = public.hospital(home)
    client = DICOMwebClient(url=f"{public.gw.base}/dicomweb", headers=auth)
    study = sorted(public.studies(hospital=home))[0]
    found = await asyncio.to_thread(client.search_for_studies)
    assert {s[RETRIEVE_URL]["Value"][0] for s in found} == {
        f"{base}/dicomweb/studies/{u}" for u in public.studies(hospital=home)}
    uri, pixels = await asyncio.to_thread(_pixel_bulkdata, client, study)
    assert uri.startswith(f"{base}/dicomweb/studies/{study}/series/")
    assert pixels == _expected_pixels(public, uri)
    # Headers of a proxy the gateway does not trust change nothing; nor does the Host.
    async with http.get(f"{public.gw.base}/dicomweb/studies?limit=1&foo=1",
                        headers={**auth, **FORWARDED, "Host": "evil.example"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())[0][RETRIEVE_URL]["Value"][0].startswith(f"{base}/dicomweb/")
        assert r.headers["Warning"].startswith(f"299 localhost:{port} ")
    # Location headers too.
    nid, _owner, other = public.shared_patient()
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    body = {"national_id": nid, "purpose": "treatment", "valid_until": until,
            "evidence": "medical-insurance e-voucher 3301-77"}
    async with http.post(f"{public.gw.base}/consents", headers=public.hospital(other),
                         json=body) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Location"] == f"{base}/consents/{(await r.json())['id']}"


async def test_forwarded_headers_count_only_from_a_trusted_proxy(
    province: Province, proxied: Province, http: aiohttp.ClientSession
) -> None:
    for gw, trusted in ((province, False), (proxied, True)):
        _, home, _ = gw.shared_patient()
        auth = gw.hospital(home)
        async with http.get(f"{gw.gw.base}/dicomweb/studies?limit=1",
                            headers={**auth, **FORWARDED}) as r:
            assert r.status == 200, await r.text()
            url = (await r.json())[0][RETRIEVE_URL]["Value"][0]
        if trusted:
            assert url.startswith("https://pacs.example.cn/imaging/dicomweb/studies/"), url
        else:
            assert url.startswith(f"{gw.gw.base}/dicomweb/studies/"), url
    # A forwarded value that is not a host is refused, naming the header, not copied.
    async with http.get(f"{proxied.gw.base}/dicomweb/studies?limit=1",
                        headers={**proxied.hospital(proxied.shared_patient()[1]),
                                 "X-Forwarded-Host": "evil.example/x?y=1"}) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "invalid-request" and "X-Forwarded-Host" in body["message"]
        assert "evil" not in body["message"]
