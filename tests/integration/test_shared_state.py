"""Authorization state in the index, shared by every gateway process (0008), on both backends.

Two repositories over one index stand for two gateway processes of a province: what one
records, the other sees. Times are injected, never read from the clock.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX, create_app
from imaging_gateway.federation.assertions import (
    ConsentClaim,
    IndexReplayCache,
)
from imaging_gateway.federation.client import FederatedCaller
from imaging_gateway.federation.fanout import holding_province
from imaging_gateway.index.schema import federation_assertion_ids, federation_located_studies
from imaging_gateway.index.shared_state import SharedState
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.services.federation import LocatedStudies
from imaging_gateway.settings import load_settings
from tests.factories import make_corpus
from tests.support.indexing import index_instances

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
T0 = NOW.timestamp()


async def _rows(index: SqlIndex, table: sa.Table) -> int:
    async with index.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_an_assertion_id_is_used_once_whichever_process_sees_it(index: SqlIndex) -> None:
    one, other = (IndexReplayCache(SharedState(index.engine), leeway_s=10) for _ in range(2))
    assert await one.first_use("110000:a", expires_at=T0 + 50, now=T0)
    assert not await other.first_use("110000:a", expires_at=T0 + 50, now=T0 + 1)
    assert not await one.first_use("110000:a", expires_at=T0 + 50, now=T0 + 2)
    # Ids are per issuing province.
    assert await other.first_use("440000:a", expires_at=T0 + 50, now=T0 + 2)
    # Kept until its expiry plus leeway, then pruned by the next write.
    assert not await other.first_use("110000:a", expires_at=T0 + 50, now=T0 + 59)
    assert await one.first_use("110000:b", expires_at=T0 + 200, now=T0 + 61)
    assert await _rows(index, federation_assertion_ids) == 1
    assert await other.first_use("110000:a", expires_at=T0 + 300, now=T0 + 61)


async def test_an_assertion_sent_at_once_to_every_process_passes_once(index: SqlIndex) -> None:
    caches = [IndexReplayCache(SharedState(index.engine)) for _ in range(8)]
    firsts = await asyncio.gather(
        *(c.first_use("110000:same", expires_at=T0 + 60, now=T0) for c in caches))
    assert sorted(firsts) == [False] * 7 + [True]


def _caller(**kw: object) -> FederatedCaller:
    base: dict[str, object] = {
        "hospital": "H11010100013", "clinician": "dr", "purpose": "treatment",
        "patient_token": "ab" * 32, "correlation_id": ""}
    return FederatedCaller(**{**base, **kw})  # type: ignore[arg-type]


async def test_located_studies_are_per_hospital_and_shared(index: SqlIndex) -> None:
    search, retrieve = (LocatedStudies(SharedState(index.engine), ttl_s=3600) for _ in range(2))
    consented = _caller(consent=ConsentClaim(id="c-1", scope=("1.2.1", "1.2.9"),
                                             valid_until=NOW + timedelta(days=1)))
    await search.remember("H11010100013", "310000", ["1.2.1", "1.2.2", "1.2.1"], consented,
                          now=NOW)
    assert await retrieve.get("H11010100013", "310000", "1.2.1", now=NOW) == consented
    assert await retrieve.get("H11010100013", "310000", "1.2.2", now=NOW) == consented
    assert await retrieve.get("H11010800028", "310000", "1.2.1", now=NOW) is None
    assert await retrieve.get("H11010100013", "440000", "1.2.1", now=NOW) is None
    assert await retrieve.get("H11010100013", "310000", "1.2.3", now=NOW) is None
    # A newer search replaces the find (here: under break-glass, every study).
    urgent = _caller(purpose="emergency", break_glass_reason="trauma bay 2",
                     consent=ConsentClaim(id="c-2", scope="all", valid_until=NOW))
    await retrieve.remember("H11010100013", "310000", ["1.2.1"], urgent,
                            now=NOW + timedelta(minutes=5))
    assert await search.get("H11010100013", "310000", "1.2.1", now=NOW) == urgent
    # Expired: gone for both, and pruned by the next write.
    later = NOW + timedelta(seconds=3600 + 1)
    assert await search.get("H11010100013", "310000", "1.2.2", now=later) is None
    assert await retrieve.get("H11010100013", "310000", "1.2.1", now=later) is not None
    await search.remember("H11010100013", "310000", ["1.2.7"], consented,
                          now=later + timedelta(minutes=5))
    assert await _rows(index, federation_located_studies) == 1


PEER_CONFIG = """
[gateway]
province = "110000"
data_dir = "data"
[index]
url = "{index_url}"
[[stores]]
name = "fs"
kind = "fs"
path = "store"
[federation]
enabled = true
allow_plain_http = true
[[federation.peers]]
province = "440000"
name = "peer 440000"
base_url = "http://127.0.0.1:{port}/dicomweb"
kind = "dicomweb"
"""


async def test_a_peer_study_that_is_no_uid_is_not_located(index_url: str, tmp_path: Path) -> None:
    """A peer answering a StudyInstanceUID longer than a UID may be: the search answers
    (the study left out) and only real UIDs are remembered for retrieves."""
    good, bad = "1.2.840.99.1", "1." + "2" * 70

    async def studies(request: web.Request) -> web.Response:
        body = [{"0020000D": {"vr": "UI", "Value": [uid]}} for uid in (good, bad)]
        return web.json_response(body, content_type="application/dicom+json")

    peer = web.Application()
    peer.router.add_get("/dicomweb/studies", studies)
    inst = next(i for i in make_corpus(seed=11, patients=2) if i.national_id)
    async with TestServer(peer) as peer_server:
        (tmp_path / "store").mkdir()
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(PEER_CONFIG.format(index_url=index_url, port=peer_server.port),
                       encoding="utf-8")
        app = create_app(load_settings(cfg, environ={}))
        async with TestClient(TestServer(app)) as client:
            await index_instances(app[INDEX], [inst])
            token = app[TOKENS].issue(subject="dr-er", role="hospital",
                                      hospital=inst.hospital.code)
            r = await client.get("/dicomweb/studies", params={
                "PatientID": inst.patient_id, "federated": "true"}, headers={
                "Authorization": f"Bearer {token}", "X-Break-Glass-Reason": "trauma bay 2"})
            assert r.status == 200, await r.text()
            assert {holding_province(d) for d in await r.json()} == {"110000", "440000"}
            async with app[INDEX].engine.connect() as conn:
                rows = (await conn.execute(sa.select(
                    federation_located_studies.c.StudyInstanceUID))).scalars().all()
    assert rows == [good]
