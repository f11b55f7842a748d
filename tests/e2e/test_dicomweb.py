"""DICOMweb over a real gateway process: a real client, and every way to reach a study unseen."""

from __future__ import annotations

import asyncio
import email
import email.policy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pydicom
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient

from imaging_gateway.index.schema import audit_log
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import load_settings
from tests.e2e.conftest import Province


def parts(body: bytes, content_type: str) -> list[bytes]:
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP
    )
    return [p.get_payload(decode=True) for p in message.iter_parts()]  # type: ignore[misc]


async def audit_rows(province: Province) -> list[dict]:
    index = await SqlIndex.open(load_settings(province.gw.config).index, migrate=False)
    try:
        async with index.engine.connect() as conn:
            rows = await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))
            return [dict(r) for r in rows.mappings()]
    finally:
        await index.close()


async def test_owner_searches_and_retrieves_with_a_real_client(province: Province) -> None:
    _, home, _ = province.shared_patient()
    headers = province.hospital(home)
    client = DICOMwebClient(url=f"{province.gw.base}/dicomweb", headers=headers)
    own = province.studies(hospital=home)
    found = await asyncio.to_thread(client.search_for_studies)
    assert {s["0020000D"]["Value"][0] for s in found} == own
    study = sorted(own)[0]
    expected = {i.sop_uid: i.data for i in province.corpus if i.study_uid == study}
    datasets = await asyncio.to_thread(client.retrieve_study, study)
    assert {ds.SOPInstanceUID for ds in datasets} == set(expected)
    series = await asyncio.to_thread(client.search_for_series, study)
    assert {s["0020000E"]["Value"][0] for s in series} == {
        i.series_uid for i in province.corpus if i.study_uid == study}
    metadata = await asyncio.to_thread(client.retrieve_study_metadata, study)
    assert {pydicom.Dataset.from_json(m).SOPInstanceUID for m in metadata} == set(expected)
    one = province.corpus[[i.study_uid for i in province.corpus].index(study)]
    instance = await asyncio.to_thread(client.retrieve_instance, study, one.series_uid, one.sop_uid)
    assert instance.SOPInstanceUID == one.sop_uid
    frames = await asyncio.to_thread(
        client.retrieve_instance_frames, study, one.series_uid, one.sop_uid, [1])
    assert len(frames) == 1 and len(frames[0]) == instance.Rows * instance.Columns * 2


async def test_retrieve_is_byte_identical_to_the_stored_objects(province: Province,
                                                                 http: aiohttp.ClientSession,
                                                                 tmp_path: Path) -> None:
    _, home, _ = province.shared_patient()
    study = sorted(province.studies(hospital=home))[0]
    async with http.get(f"{province.gw.base}/dicomweb/studies/{study}",
                        headers=province.hospital(home)) as r:
        assert r.status == 200, await r.text()
        body = await r.read()
        ctype = r.headers["Content-Type"]
    assert ctype.startswith('multipart/related; type="application/dicom"')
    got = sorted(parts(body, ctype))
    assert got == sorted(i.data for i in province.corpus if i.study_uid == study)


async def test_nothing_reaches_a_study_without_a_grant(province: Province,
                                                       http: aiohttp.ClientSession) -> None:
    base = f"{province.gw.base}/dicomweb"
    nid, home, other = province.shared_patient()
    me = province.hospital(other, "dr-zhao")
    own = province.studies(hospital=other)
    foreign = sorted(province.studies(national_id=nid, hospital=home))[0]
    inst = next(i for i in province.corpus if i.study_uid == foreign)
    patient_id = inst.patient_id
    fake = "1.2.3.999.1"

    async def search(path: str, params: dict[str, str] | None = None) -> set[str]:
        async with http.get(f"{base}{path}", params=params, headers=me) as r:
            assert r.status in (200, 204), (path, params, r.status, await r.text())
            if r.status == 204:
                return set()
            return {d["0020000D"]["Value"][0] for d in await r.json()}

    # Searches: filtered, never revealing.
    assert await search("/studies") == own
    assert await search("/studies", {"StudyInstanceUID": foreign}) == set()
    assert await search("/studies", {"StudyInstanceUID": f"{foreign}\\{sorted(own)[0]}"}) == {
        sorted(own)[0]}
    assert await search("/studies", {"PatientID": "*"}) == own
    assert await search("/studies", {"PatientID": patient_id}) == set()
    assert await search("/studies", {"includefield": "all"}) == own
    assert await search("/series", {"SeriesInstanceUID": inst.series_uid}) == set()
    assert await search("/instances", {"SOPInstanceUID": inst.sop_uid}) == set()
    assert await search(f"/studies/{foreign}/series") == set()
    assert await search(f"/studies/{foreign}/instances") == set()
    assert await search("/studies", {"PatientName": "*", "fuzzymatching": "true"}) == own

    # Retrieves: a hidden study answers exactly like one that does not exist.
    paths = [
        "/studies/{s}", "/studies/{s}/metadata", "/studies/{s}/series/{se}",
        "/studies/{s}/series/{se}/metadata", "/studies/{s}/series/{se}/instances/{i}",
        "/studies/{s}/series/{se}/instances/{i}/metadata",
        "/studies/{s}/series/{se}/instances/{i}/frames/1",
        "/studies/{s}/series/{se}/instances/{i}/rendered",
        "/studies/{s}/series/{se}/instances/{i}/thumbnail",
        "/studies/{s}/series/{se}/instances/{i}/bulkdata/7FE00010",
        "/studies/{s}/rendered", "/studies/{s}/thumbnail",
    ]
    before = len(await audit_rows(province))
    for path in paths:
        answers = []
        for study in (foreign, fake):
            url = base + path.format(s=study, se=inst.series_uid, i=inst.sop_uid)
            async with http.get(url, headers=me) as r:
                answers.append((r.status, await r.read()))
        assert answers[0] == answers[1], path
        assert answers[0][0] == 404, path
    rows = (await audit_rows(province))[before:]
    assert [r["outcome"] for r in rows] == ["denied", "not-found"] * len(paths)
    assert all(r["hospital"] == other and r["subject"] == "dr-zhao" for r in rows)

    # A consent opens it; a revocation closes it on the next request.
    until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    async with http.post(f"{province.gw.base}/consents", headers=me, json={
            "national_id": nid, "purpose": "treatment", "evidence": "e-voucher 9",
            "valid_until": until}) as r:
        assert r.status == 201
        consent = await r.json()
    assert foreign in await search("/studies", {"PatientID": patient_id})
    async with http.get(f"{base}/studies/{foreign}/metadata", headers=me) as r:
        assert r.status == 200
    async with http.delete(f"{province.gw.base}/consents/{consent['id']}", headers=me) as r:
        assert r.status == 200
    assert await search("/studies", {"PatientID": patient_id}) == set()
    async with http.get(f"{base}/studies/{foreign}/metadata", headers=me) as r:
        assert r.status == 404

    # Break-glass: stated reason, opens the patient, reported to the province.
    glass = {**me, "X-Break-Glass-Reason": "%E6%8A%A2%E6%95%91 cardiac arrest"}
    async with http.get(f"{base}/studies/{foreign}/metadata", headers=glass) as r:
        assert r.status == 200
    async with http.get(f"{base}/studies/{foreign}/metadata", headers=me) as r:
        assert r.status == 200  # the window stays open for the configured minutes
    async with http.get(f"{province.gw.base}/admin/break-glass",
                        headers=province.bearer("--role", "admin")) as r:
        report = await r.json()
    assert [(b["StudyInstanceUID"], b["reason"]) for b in report] == [
        (foreign, "抢救 cardiac arrest")]
    # From a search, in a hospital that holds none of the patient's studies either.
    third = next(c for c in sorted({i.hospital.code for i in province.corpus})
                 if c not in (home, other) and not province.studies(hospital=c, national_id=nid))
    er = {**province.hospital(third, "dr-er"), "X-Break-Glass-Reason": "stroke"}
    params = {"PatientID": patient_id, "IssuerOfPatientID": home}
    async with http.get(f"{base}/studies", params=params, headers=er) as r:
        assert r.status == 200
        assert {d["0020000D"]["Value"][0] for d in await r.json()} == province.studies(
            national_id=nid, hospital=home)
    async with http.get(f"{base}/studies", params={"PatientID": "*"}, headers=er) as r:
        assert r.status == 400

    # A peer's bearer token (no signed assertion) reads no patient data; an admin's is
    # refused outright (test_admin_is_refused_on_every_dicomweb_route); no token is 401.
    for who in (province.bearer("--role", "peer"),):
        async with http.get(f"{base}/studies", headers=who) as r:
            assert r.status == 204
        async with http.get(f"{base}/studies/{foreign}", headers=who) as r:
            assert r.status == 404
    for path in ("/studies", f"/studies/{foreign}", f"/studies/{foreign}/metadata"):
        async with http.get(base + path) as r:
            assert r.status == 401
    async with http.get(f"{base}/studies", headers={"Authorization": "Bearer forged"}) as r:
        assert r.status == 401
    refused = [(r["action"], r["outcome"], r["source"], r["detail"])
               for r in await audit_rows(province) if r["role"] == "none"]
    # One record per client address and reason a minute, however many requests.
    assert refused == [("authenticate", "denied", "127.0.0.1", "a bearer token is required"),
                       ("authenticate", "denied", "127.0.0.1", "invalid token")]
    logs = province.gw.logs()
    assert patient_id not in logs and nid not in logs and "Traceback" not in logs


async def test_admin_is_refused_on_every_dicomweb_route(province: Province,
                                                         http: aiohttp.ClientSession) -> None:
    """Admins read no patient data: every /dicomweb route kind answers 403, not 204 or 404."""
    base = f"{province.gw.base}/dicomweb"
    admin = province.bearer("--role", "admin")
    inst = province.corpus[0]
    s, se, i = inst.study_uid, inst.series_uid, inst.sop_uid
    gets = [
        "", "/studies", "/series", "/instances", f"/studies/{s}/series",
        f"/studies/{s}/instances", f"/studies/{s}/series/{se}/instances",
        "/studies?PatientID=*&federated=true",
        f"/studies/{s}", f"/studies/{s}/series/{se}", f"/studies/{s}/series/{se}/instances/{i}",
        f"/studies/{s}/metadata", f"/studies/{s}/series/{se}/metadata",
        f"/studies/{s}/series/{se}/instances/{i}/metadata",
        f"/studies/{s}/series/{se}/instances/{i}/frames/1",
        f"/studies/{s}/series/{se}/instances/{i}/bulkdata/7FE00010",
        f"/studies/{s}/rendered", f"/studies/{s}/series/{se}/instances/{i}/thumbnail",
        f"/federation/310000/studies/{s}", f"/federation/310000/studies/{s}/metadata",
    ]
    for path in gets:
        async with http.get(base + path, headers=admin) as r:
            assert r.status == 403, (path, r.status)
            assert (await r.json())["error"] == "forbidden", path
    for path in ("/studies", f"/studies/{s}"):  # STOW-RS
        async with http.post(base + path, data=b"--x--", headers={
                **admin, "Content-Type": 'multipart/related; type="application/dicom"; '
                                         "boundary=x"}) as r:
            assert r.status == 403, (path, r.status)
    # Audited (flood-limited like refused tokens: one record per address and reason a minute).
    refused = [(r["role"], r["action"], r["outcome"]) for r in await audit_rows(province)
               if r["role"] == "admin"]
    assert refused == [("admin", "dicomweb", "denied")]
    # The same routes still serve the hospital that produced the study.
    async with http.get(f"{base}/studies/{s}/metadata",
                        headers=province.hospital(inst.hospital.code)) as r:
        assert r.status == 200
    # The admin's own routes still serve the admin.
    async with http.get(f"{province.gw.base}/admin/index/stats", headers=admin) as r:
        assert r.status == 200


async def test_bad_queries_are_400_and_xml_on_request(province: Province,
                                                       http: aiohttp.ClientSession) -> None:
    _, home, _ = province.shared_patient()
    base = f"{province.gw.base}/dicomweb"
    h = province.hospital(home)
    for params in ({"StudyDate": "2025-01-01"}, {"limit": "0"}, {"NoSuchKeyword": "1"},
                   {"StudyInstanceUID": "1.2.*"}):
        async with http.get(f"{base}/studies", params=params, headers=h) as r:
            assert r.status == 400, params
            assert (await r.json())["message"]
    async with http.get(f"{base}/studies", params={"limit": "1"}, headers=h) as r:
        assert r.status == 200 and len(await r.json()) == 1
        assert r.headers["Warning"].startswith("299 ")
    xml = {**h, "Accept": 'multipart/related; type="application/dicom+xml"'}
    async with http.get(f"{base}/studies", headers=xml) as r:
        assert r.status == 200
        docs = parts(await r.read(), r.headers["Content-Type"])
    assert len(docs) == len(province.studies(hospital=home))
    assert all(b"NativeDicomModel" in d for d in docs)
    async with http.get(f"{base}/studies", headers={**h, "Accept": "image/png"}) as r:
        assert r.status == 406
