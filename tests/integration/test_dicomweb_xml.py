"""DICOMweb XML through the real app (index, fs store, gate): negotiation, parts, authorization."""

from __future__ import annotations

import email
import email.policy
import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.dicom.dicomxml import NATIVE_DICOM_NS
from imaging_gateway.dicom.synthetic import SyntheticInstance
from tests.factories import make_corpus
from tests.support.native_dicom import read_back
from tests.support.synced_app import synced_app

XML = 'multipart/related; type="application/dicom+xml"'
NS = {"n": NATIVE_DICOM_NS}


def parts(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP
    )
    return [(p.get_content_type(), p.get_payload(decode=True))  # type: ignore[misc]
            for p in message.iter_parts()]


@dataclass
class World:
    client: TestClient[Any, Any]
    corpus: list[SyntheticInstance]

    def auth(self, code: str) -> dict[str, str]:
        token = self.client.app[TOKENS].issue(subject="pacs", role="hospital", hospital=code)
        return {"Authorization": f"Bearer {token}"}

    def codes(self) -> list[str]:
        return sorted({i.hospital.code for i in self.corpus})

    def studies(self, code: str) -> set[str]:
        return {i.study_uid for i in self.corpus if i.hospital.code == code}


@pytest.fixture
async def world(tmp_path: Path, index_url: str) -> AsyncIterator[World]:
    corpus = make_corpus(seed=5, patients=3, studies_per_patient=2, series_per_study=1,
                         instances_per_series=2)
    async with synced_app(tmp_path, index_url, corpus) as client:
        yield World(client, corpus)


async def test_search_negotiates_json_by_default_and_xml_on_request(world: World) -> None:
    code = world.codes()[0]
    auth = world.auth(code)
    own = world.studies(code)

    async def get(accept: str | None, path: str = "/dicomweb/studies") -> tuple[int, str, bytes]:
        headers = dict(auth) if accept is None else {**auth, "Accept": accept}
        r = await world.client.get(path, headers=headers)
        return r.status, r.headers.get("Content-Type", ""), await r.read()

    status, ctype, body = await get(None)
    assert status == 200 and ctype.startswith("application/dicom+json")
    as_json = json.loads(body)
    assert {d["0020000D"]["Value"][0] for d in as_json} == own
    for accept in ("*/*", "application/*", f"{XML};q=0.5, application/dicom+json",
                   f"{XML}, application/dicom+json"):
        status, ctype, _ = await get(accept)
        assert (status, ctype.split(";")[0]) == (200, "application/dicom+json"), accept
    for accept in (XML, "application/dicom+xml", f"application/dicom+json;q=0.1, {XML};q=0.8"):
        status, ctype, body = await get(accept)
        assert status == 200 and ctype.startswith(f"{XML}; boundary="), accept
        documents = parts(body, ctype)
        assert [t for t, _ in documents] == ["application/dicom+xml"] * len(own)
        # The same information as the JSON answer, result for result.
        assert [read_back(d) for _, d in documents] == [
            {k: v for k, v in d.items() if v.get("Value") != []} for d in as_json]
    for accept in ("text/html", "application/dicom", "application/dicom+json;q=0, */*;q=0"):
        status, ctype, body = await get(accept)
        assert status == 406 and json.loads(body)["message"], accept
    # Series and instance levels, nested under a study.
    study = sorted(own)[0]
    for path in (f"/dicomweb/studies/{study}/series", f"/dicomweb/studies/{study}/instances",
                 "/dicomweb/series", "/dicomweb/instances"):
        status, ctype, body = await get(XML, path)
        assert status == 200, path
        roots = [ET.fromstring(d) for _, d in parts(body, ctype)]
        assert roots and all(r.find("n:DicomAttribute[@tag='0020000E']", NS) is not None
                             for r in roots), path


async def test_metadata_in_xml_is_one_part_per_instance(world: World) -> None:
    code = world.codes()[0]
    auth = world.auth(code)
    study = sorted(world.studies(code))[0]
    instances = [i for i in world.corpus if i.study_uid == study]
    one = instances[0]
    base = f"/dicomweb/studies/{study}"
    for path, count in ((f"{base}/metadata", len(instances)),
                        (f"{base}/series/{one.series_uid}/metadata",
                         sum(i.series_uid == one.series_uid for i in instances)),
                        (f"{base}/series/{one.series_uid}/instances/{one.sop_uid}/metadata", 1)):
        r = await world.client.get(path, headers=auth)
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/dicom+json")
        as_json = await r.json(content_type=None)
        r = await world.client.get(path, headers={**auth, "Accept": XML})
        assert r.status == 200 and r.headers["Content-Type"].startswith(f"{XML}; boundary=")
        documents = parts(await r.read(), r.headers["Content-Type"])
        assert len(documents) == count == len(as_json), path
        for (media_type, doc), js in zip(documents, as_json, strict=True):
            assert media_type == "application/dicom+xml"
            root = ET.fromstring(doc)
            pixel = root.find("n:DicomAttribute[@tag='7FE00010']/n:BulkData", NS)
            assert pixel is not None and pixel.get("uri") == js["7FE00010"]["BulkDataURI"]
            sop = root.findtext("n:DicomAttribute[@keyword='SOPInstanceUID']/n:Value", namespaces=NS)
            assert sop == js["00080018"]["Value"][0]
            assert root.find(".//n:PersonName/n:Ideographic", NS) is not None
        r = await world.client.get(path, headers={**auth, "Accept": "application/dicom"})
        assert r.status == 406


async def test_a_study_not_visible_answers_the_same_in_xml(world: World) -> None:
    mine, theirs = world.codes()[:2]
    me = world.auth(mine)
    foreign = next(i for i in world.corpus if i.hospital.code == theirs)
    fake = "1.2.3.999.1"
    paths = ("/dicomweb/studies/{s}/metadata", "/dicomweb/studies/{s}/series/{se}/metadata",
             "/dicomweb/studies/{s}/series/{se}/instances/{i}/metadata")
    answers: dict[str, list[tuple[int, bytes]]] = {}
    for accept in ("application/dicom+json", XML):
        for path in paths:
            for study in (foreign.study_uid, fake):
                url = path.format(s=study, se=foreign.series_uid, i=foreign.sop_uid)
                r = await world.client.get(url, headers={**me, "Accept": accept})
                answers.setdefault(path, []).append((r.status, await r.read()))
        for params in ({"StudyInstanceUID": foreign.study_uid},
                       {"PatientID": foreign.patient_id}):
            r = await world.client.get("/dicomweb/studies", params=params,
                                       headers={**me, "Accept": accept})
            assert (r.status, await r.read()) == (204, b""), (accept, params)
        r = await world.client.get(f"/dicomweb/studies/{foreign.study_uid}/series",
                                   headers={**me, "Accept": accept})
        assert r.status == 204
    for path, got in answers.items():
        assert len(set(got)) == 1 and got[0][0] == 404, path  # hidden == absent, JSON == XML
    # With the patient's consent the same XML request answers.
    until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    r = await world.client.post("/consents", headers=me, json={
        "national_id": foreign.national_id, "purpose": "treatment", "evidence": "voucher 1",
        "valid_until": until})
    assert r.status == 201, await r.text()
    r = await world.client.get(f"/dicomweb/studies/{foreign.study_uid}/metadata",
                               headers={**me, "Accept": XML})
    assert r.status == 200
    assert parts(await r.read(), r.headers["Content-Type"])
