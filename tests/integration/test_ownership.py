"""Ownership by key prefix through the real app: sync, visibility, consent, STOW, no match."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX, STORES, create_app
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.index.schema import quarantine, studies
from imaging_gateway.settings import Settings, load_settings
from imaging_gateway.sync.runner import SyncRunner
from tests.factories import make_corpus
from tests.support.seaweed import SeaweedServer

EAST, WEST, NOBODY = "H31010100002", "H31010100003", "H11010800028"
CONFIG = """
[gateway]
data_dir = "data"
write_store = "sh"
[index]
url = "{index_url}"
[[stores]]
name = "sh"
{store}
ownership = "prefix"
[stores.hospitals]
"east/" = "{east}"
"west/" = "{west}"
"""


@dataclass
class World:
    client: TestClient[Any, Any]
    settings: Settings
    placed: dict[str, str]
    """StudyInstanceUID -> the key prefix its objects were written under."""
    corpus: list[SyntheticInstance]

    def auth(self, code: str) -> dict[str, str]:
        token = self.client.app[TOKENS].issue(subject="pacs", role="hospital", hospital=code)
        return {"Authorization": f"Bearer {token}"}

    def under(self, prefix: str) -> set[str]:
        return {s for s, p in self.placed.items() if p == prefix}

    async def sync(self, *, full: bool = False) -> dict[str, int]:
        runner = SyncRunner(self.settings, self.client.app[INDEX], self.client.app[STORES]["sh"])
        await runner.start(mode="full") if full else await runner.start()
        job = await runner.run()
        assert job.status == "succeeded"
        return job.counters

    async def visible(self, code: str, **params: str) -> set[str]:
        r = await self.client.get("/dicomweb/studies", params=params, headers=self.auth(code))
        assert r.status in (200, 204), await r.text()
        return set() if r.status == 204 else {d["0020000D"]["Value"][0] for d in await r.json()}


def place(corpus: list[SyntheticInstance]) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """Each patient's first study under east/, second under west/; the last patient's
    second study under a prefix nobody claims. Institution codes say other hospitals."""
    placed: dict[str, str] = {}
    by_patient: dict[str, list[str]] = {}
    for inst in corpus:
        studies_of = by_patient.setdefault(inst.national_id or inst.patient_id, [])
        if inst.study_uid not in studies_of:
            studies_of.append(inst.study_uid)
    patients = list(by_patient.values())
    for n, uids in enumerate(patients):
        for m, uid in enumerate(uids):
            placed[uid] = "unclaimed/" if (n, m) == (len(patients) - 1, 1) else (
                "east/" if m == 0 else "west/")
    objects = [(placed[i.study_uid] + i.key, i.data) for i in corpus]
    return placed, objects


async def open_world(config: str, objects: list[tuple[str, bytes]], placed: dict[str, str],
                     corpus: list[SyntheticInstance], tmp_path: Path,
                     environ: dict[str, str]) -> AsyncIterator[World]:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(config, encoding="utf-8")
    settings = load_settings(cfg, environ=environ)
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        store = app[STORES]["sh"]
        for key, data in objects:
            await store.write_stream(key, _chunks(data))
        world = World(client, settings, placed, corpus)
        await world.sync()
        yield world


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
async def world(tmp_path: Path, index_url: str) -> AsyncIterator[World]:
    corpus = make_corpus(seed=21, patients=3, studies_per_patient=2, series_per_study=1,
                         instances_per_series=2)
    placed, objects = place(corpus)
    config = CONFIG.format(index_url=index_url, east=EAST, west=WEST,
                           store='kind = "fs"\npath = "store"')
    async for w in open_world(config, objects, placed, corpus, tmp_path, {}):
        yield w


async def test_each_hospital_sees_its_prefix_and_the_rest_only_with_consent(world: World) -> None:
    east, west = world.under("east/"), world.under("west/")
    unclaimed = world.under("unclaimed/")
    assert east and west and len(unclaimed) == 1
    assert await world.visible(EAST) == east
    assert await world.visible(WEST) == west
    assert await world.visible(NOBODY) == set()
    # The institution codes in the headers are ignored under prefix ownership.
    assert not {i.hospital.code for i in world.corpus} & {EAST, WEST}
    # A study under no prefix is indexed, not quarantined, and has no producer.
    async with world.client.app[INDEX].engine.connect() as conn:
        rows = dict((await conn.execute(
            sa.select(studies.c.StudyInstanceUID, studies.c.hospital))).all())
        assert (await conn.execute(sa.select(sa.func.count()).select_from(quarantine))
                ).scalar_one() == 0
    assert rows == {uid: {"east/": EAST, "west/": WEST}.get(p) for uid, p in world.placed.items()}
    # A hidden study of the other hospital answers like an absent one.
    other = sorted(west)[0]
    r = await world.client.get(f"/dicomweb/studies/{other}/metadata", headers=world.auth(EAST))
    assert r.status == 404
    # The patient's consent opens the patient's other studies, the unclaimed one included.
    (lost,) = unclaimed
    patient = next(i for i in world.corpus if i.study_uid == lost)
    theirs = {i.study_uid for i in world.corpus if i.national_id == patient.national_id}
    until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    r = await world.client.post("/consents", headers=world.auth(EAST), json={
        "national_id": patient.national_id, "purpose": "treatment", "evidence": "voucher 3",
        "valid_until": until})
    assert r.status == 201, await r.text()
    assert await world.visible(EAST) == east | theirs
    assert lost in theirs and theirs - east
    assert await world.visible(WEST) == west  # the grant is the east hospital's only
    r = await world.client.get(f"/dicomweb/studies/{lost}/metadata", headers=world.auth(EAST))
    assert r.status == 200


async def test_stow_writes_under_the_callers_prefix(world: World, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    new = make_corpus(seed=99, patients=1, studies_per_patient=1, series_per_study=1,
                      instances_per_series=1)[0]
    # Without its InstitutionCodeSequence: naming its synthetic hospital (neither east nor
    # west) it would be refused to both (0124); here the key's prefix decides alone.
    ds = pydicom.dcmread(io.BytesIO(new.data))
    del ds.InstitutionCodeSequence
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    boundary = "owner-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'

    async def stow(code: str, study: str | None = None) -> tuple[int, Any]:
        path = "/dicomweb/studies" + (f"/{study}" if study else "")
        r = await world.client.post(path, data=body, headers={
            **world.auth(code), "Content-Type": ctype})
        return r.status, json.loads(await r.read() or b"null")

    # A hospital without a prefix in the write store may not store at all.
    status, _ = await stow(NOBODY)
    assert status == 403
    status, answer = await stow(WEST)
    assert status == 200, answer
    key = f"west/stow/{new.study_uid}/{new.series_uid}/{new.sop_uid}.dcm"
    assert (tmp_path / "store" / key).read_bytes() == data
    assert not (tmp_path / "store" / "stow").exists()
    assert new.study_uid in await world.visible(WEST)
    assert new.study_uid not in await world.visible(EAST)
    # The east hospital cannot add the same instance to the west hospital's study.
    status, answer = await stow(EAST)
    assert status == 409, answer
    assert not (tmp_path / "store" / "east" / "stow").exists()
    # A full re-sync derives the same producer from the key.
    with caplog.at_level("WARNING", logger="imaging_gateway.sync.runner"):
        counters = await world.sync(full=True)
    assert counters["quarantined"] == 0
    unclaimed = [i for i in world.corpus if i.study_uid in world.under("unclaimed/")]
    assert f"{len(unclaimed)} object(s) under no prefix" in caplog.text
    assert not any(i.study_uid in caplog.text or i.patient_id in caplog.text for i in unclaimed)
    assert new.study_uid in await world.visible(WEST)
    assert new.study_uid not in await world.visible(EAST)


@pytest.mark.seaweedfs
async def test_prefix_ownership_on_a_real_s3_store(seaweedfs: SeaweedServer, tmp_path: Path
                                                   ) -> None:
    corpus = make_corpus(seed=23, patients=2, studies_per_patient=2, series_per_study=1,
                         instances_per_series=1)
    placed, objects = place(corpus)
    bucket = seaweedfs.make_bucket("owner-prefix")
    store = (f'kind = "s3"\nendpoint = "{seaweedfs.endpoint}"\nbucket = "{bucket}"\n'
             'prefix = "province/"\naccess_key_env = "AK"\nsecret_key_env = "SK"')
    config = CONFIG.format(index_url=f"sqlite:///{tmp_path / 'index.sqlite3'}", east=EAST,
                           west=WEST, store=store)
    env = {"AK": seaweedfs.access_key, "SK": seaweedfs.secret_key}
    async for world in open_world(config, objects, placed, corpus, tmp_path, env):
        assert await world.visible(EAST) == world.under("east/")
        assert await world.visible(WEST) == world.under("west/")
        assert await world.visible(NOBODY) == set()
