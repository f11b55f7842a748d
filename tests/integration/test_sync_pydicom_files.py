"""pydicom's real files through a real SeaweedFS sync, on SQLite and PostgreSQL: studies
without a usable PatientID stay apart (search, consent, break-glass, federation tokens,
STOW-RS), and ACR-NEMA dates and times are indexed, matched and returned normalized."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa

from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.domain.qido import parse_qido
from imaging_gateway.index.schema import patients, studies
from imaging_gateway.index.sql import IndexedObject, SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.consent import ConsentStore, parse_consent_request
from imaging_gateway.security.gate import AccessContext, Gate, PeerGrant, visibility
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from imaging_gateway.services.retrieve import retrieve_metadata
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.factories import NATIONAL_ID, PYDICOM_DATA, dataset_bytes, minimal_dataset
from tests.integration.test_sync_s3 import put, real_world_objects, settings_for
from tests.support.seaweed import SeaweedServer

NOW = datetime.now(UTC)
OWNER = "H11010800028"
"""The hospital whose store is synced (ownership = "store")."""
OTHER = "H11010100002"
"""A hospital that produced none of the synced studies."""
ANONYMOUS_WITH_NATIONAL_ID = "zz/anonymous-with-national-id.dcm"
"""Sorts last: the last writer of its sync page."""
ANONYMOUS_STUDY = "1.2.826.0.1.3680043.8.498.2001"


def hospital(code: str, subject: str = "pacs") -> Principal:
    return Principal(subject=subject, role="hospital", province="110000", token_id="t",
                     hospital=code)


def blank(value: Any) -> bool:
    return value is None or not str(value).strip()


def studies_in_files(objs: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """StudyInstanceUID -> what pydicom itself reads from the files (PatientID, name)."""
    out: dict[str, dict[str, Any]] = {}
    for data in objs.values():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            uid = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:
            continue
        if not uid:
            continue
        out.setdefault(uid, {"PatientID": set(), "PatientName": set()})
        out[uid]["PatientID"].add(str(ds.get("PatientID", "") or "").strip())
        name = str(ds.get("PatientName", "") or "").strip()
        out[uid]["PatientName"].add(name or None)
    return out


@dataclass
class Synced:
    index: SqlIndex
    store: ObjectStore
    gate: Gate
    consents: ConsentStore
    files: dict[str, dict[str, Any]]
    """Ground truth by pydicom, for the studies the sync indexed."""

    async def search(self, params: dict[str, str], who: str = OWNER) -> list[Any]:
        page = await self.gate.search(AccessContext(hospital(who), now=NOW),
                                      parse_qido("study", params), max_results=1000)
        return page.results

    async def visible(self, principal: Principal, *, peer: PeerGrant | None = None) -> set[str]:
        rule, values = visibility(principal, NOW, peer=peer)
        async with self.index.engine.connect() as conn:
            return {r[0] for r in await conn.execute(
                sa.select(studies.c.StudyInstanceUID).where(rule), values)}

    def anonymous(self) -> set[str]:
        """Studies whose files carry no usable PatientID."""
        return {uid for uid, f in self.files.items() if all(not p for p in f["PatientID"])}


def anonymous_with_national_id() -> bytes:
    """A study without PatientID (nor issuer or institution code: the store is its scope,
    as for pydicom's files) that names its patient's national identity."""
    ds = minimal_dataset(PatientID="", IssuerOfPatientID=None, InstitutionCodeSequence=None,
                         PatientName="Zhao^Yun", StudyInstanceUID=ANONYMOUS_STUDY,
                         SeriesInstanceUID=ANONYMOUS_STUDY + ".1",
                         SOPInstanceUID=ANONYMOUS_STUDY + ".1.1")
    return dataset_bytes(ds)


async def sync(settings: Settings, index: SqlIndex, store: ObjectStore) -> None:
    runner = SyncRunner(settings, index, store)
    await runner.start()
    job = await runner.run()
    assert job.status == "succeeded"


@pytest.fixture
async def synced(seaweedfs: SeaweedServer, tmp_path: Path, index_url: str
                 ) -> AsyncIterator[Synced]:
    bucket = seaweedfs.make_bucket(f"real-{uuid.uuid4().hex[:12]}")
    settings = settings_for(tmp_path, seaweedfs, bucket, "s3", index_url=index_url,
                            store_extra=f'ownership = "store"\nhospital = "{OWNER}"\n')
    objs = real_world_objects()
    objs[ANONYMOUS_WITH_NATIONAL_ID] = anonymous_with_national_id()
    store = open_store(settings.store("s3"))
    index = await SqlIndex.open(settings.index)
    try:
        for key, data in objs.items():
            await put(store, key, data)
        await sync(settings, index, store)
        async with index.engine.connect() as conn:
            indexed = {r[0] for r in await conn.execute(sa.select(studies.c.StudyInstanceUID))}
        files = {uid: f for uid, f in studies_in_files(objs).items() if uid in indexed}
        gate = Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                    break_glass_minutes=30, search_engine=index.search_engine)
        yield Synced(index, store, gate, ConsentStore(index.engine), files)
    finally:
        await store.close()
        await index.close()


# --- 1. a study without a usable PatientID has a patient of its own -----------------------


@pytest.mark.seaweedfs
async def test_studies_without_patient_id_are_not_merged(synced: Synced) -> None:
    anonymous = synced.anonymous()
    # pydicom's files hold studies of several people without PatientID (empty or absent).
    assert len(anonymous) >= 5
    async with synced.index.engine.connect() as conn:
        rows = (await conn.execute(
            sa.select(studies.c.StudyInstanceUID, studies.c.patient_id, patients.c.PatientID)
            .join(patients, patients.c.id == studies.c.patient_id))).all()
    patient_of = {r[0]: r[1] for r in rows}
    studies_of_patient: dict[int, set[str]] = {}
    for uid, pid in patient_of.items():
        studies_of_patient.setdefault(pid, set()).add(uid)
    for uid in anonymous:
        assert studies_of_patient[patient_of[uid]] == {uid}
    assert all(r[2] == "" for r in rows if r[0] in anonymous)

    # Every study shows its own patient's name, and a name finds only that person's study.
    results = {r.study_instance_uid: r for r in await synced.search({})}
    for uid in anonymous:
        shown = results[uid].attributes.get("PatientName")
        assert {shown or None} == synced.files[uid]["PatientName"]
    found = await synced.search({"PatientName": "Test^S R"})
    assert {r.study_instance_uid for r in found} == {
        uid for uid, f in synced.files.items() if f["PatientName"] == {"Test^S R"}}
    assert len(found) == 1
    # Each is a patient of its own for the federation's tokens and the audit too.
    tokens = {synced.gate.tokens.for_patient(results[u].national_id, results[u].patient_key)
              for u in anonymous}
    assert len(tokens) == len(anonymous)


@pytest.mark.seaweedfs
async def test_consent_break_glass_and_tokens_stay_within_one_study(synced: Synced) -> None:
    anonymous = synced.anonymous()
    assert ANONYMOUS_STUDY in anonymous
    assert await synced.visible(hospital(OTHER)) == set()

    # A consent for the one person whose anonymous study names a national identity opens
    # that study and no other study without PatientID.
    by = hospital(OTHER)
    consent = parse_consent_request(
        {"national_id": NATIONAL_ID, "purpose": "treatment", "evidence": "scan #1",
         "valid_until": (NOW + timedelta(days=7)).isoformat()}, by, now=NOW, max_days=365)
    async with synced.index.engine.begin() as conn:
        await synced.consents.create(conn, consent, by, NOW)
    assert await synced.visible(hospital(OTHER)) == {ANONYMOUS_STUDY}

    # The federation: the person's token reaches that study only.
    await synced.gate.refresh_patient_tokens()
    peer = Principal(subject="peer", role="peer", province="440000", token_id="t")
    grant = PeerGrant(patient_token=synced.gate.tokens.for_national_id(NATIONAL_ID),
                      scope="all", hospital="H44010600001", break_glass_reason="er")
    assert await synced.visible(peer, peer=grant) == {ANONYMOUS_STUDY}

    # Break-glass on another anonymous study opens that study, nobody else's.
    target = sorted(anonymous - {ANONYMOUS_STUDY})[0]
    er = AccessContext(hospital("H11010100003", "dr-er"), break_glass_reason="unconscious",
                       now=NOW)
    located = await synced.gate.locate(er, action="retrieve", study_uid=target)
    assert {loc.StudyInstanceUID for loc in located} == {target}
    assert await synced.visible(hospital("H11010100003")) == {target}


@pytest.mark.seaweedfs
async def test_stow_of_an_instance_without_patient_id(synced: Synced) -> None:
    """A hospital stores a study without PatientID into the synced store: it is neither
    refused as another hospital's patient nor joined to anyone's patient record."""
    ds = minimal_dataset(PatientID="   ", IssuerOfPatientID=None, InstitutionCodeSequence=None,
                         PatientName="Ma^Chao", StudyInstanceUID="1.2.826.0.1.3680043.8.498.3001",
                         SeriesInstanceUID="1.2.826.0.1.3680043.8.498.3001.1",
                         SOPInstanceUID="1.2.826.0.1.3680043.8.498.3001.1.1",
                         OtherPatientIDsSequence=None)
    data = dataset_bytes(ds)
    h = parse_header(data, complete=True)
    digest = hashlib.sha256(data[: h.header_bytes]).hexdigest()
    item = IndexedObject("stow/3001.dcm", hashlib.md5(data, usedforsecurity=False).hexdigest(),
                         len(data), NOW, h, digest)
    me = AccessContext(hospital(OTHER), now=NOW)
    assert (await synced.gate.check_store(me, h, store="s3")).verdict == "new"
    verdict = await synced.gate.record_store(me, synced.index, store="s3", province="110000",
                                             item=item, note="stored")
    assert verdict == "new"
    assert await synced.visible(hospital(OTHER)) == {"1.2.826.0.1.3680043.8.498.3001"}
    found = await synced.search({"PatientName": "Ma^Chao"}, who=OTHER)
    assert [r.study_instance_uid for r in found] == ["1.2.826.0.1.3680043.8.498.3001"]
    async with synced.index.engine.connect() as conn:
        n = (await conn.execute(
            sa.select(sa.func.count()).select_from(studies).where(
                studies.c.patient_id == sa.select(studies.c.patient_id).where(
                    studies.c.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.3001"
                ).scalar_subquery()))).scalar_one()
    assert n == 1


# --- 4. ACR-NEMA dates and times: indexed, matched and returned in the DICOM form ----------


@pytest.mark.seaweedfs
async def test_acr_nema_dates_and_times_are_matched_and_returned_normalized(
    synced: Synced,
) -> None:
    legacy = pydicom.dcmread(PYDICOM_DATA / "test_files" / "ExplVR_BigEnd.dcm",
                             stop_before_pixels=True)
    assert (legacy.StudyDate, legacy.StudyTime) == ("1997.04.24", "14:04:38")
    uid = str(legacy.StudyInstanceUID)

    async def found(params: dict[str, str]) -> dict[str, Any]:
        return {r.study_instance_uid: r.attributes for r in await synced.search(params)}

    for params in ({"StudyDate": "19970424"}, {"StudyDate": "19970101-19971231"},
                   {"StudyDate": "-19970424"}, {"StudyDate": "19970424-"},
                   {"StudyTime": "1404"}, {"StudyTime": "1400-1405"},
                   {"StudyDate": "19970424", "StudyTime": "140438"}):
        results = await found(params)
        assert uid in results, params
        assert (results[uid]["StudyDate"], results[uid]["StudyTime"]) == ("19970424", "140438")
    for params in ({"StudyDate": "19970425-"}, {"StudyDate": "-19970423"},
                   {"StudyTime": "1405-"}):
        assert uid not in await found(params), params

    # WADO-RS metadata gives the values in the same form.
    located = await synced.gate.locate(AccessContext(hospital(OWNER), now=NOW),
                                       action="metadata", study_uid=uid)
    documents = await retrieve_metadata(located, {"s3": synced.store},
                                        bulkdata_base=lambda _: "http://gateway/bulk")
    assert documents
    for document in documents:
        assert document["00080020"] == {"vr": "DA", "Value": ["19970424"]}
        assert document["00080030"] == {"vr": "TM", "Value": ["140438"]}
