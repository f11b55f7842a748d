"""STOW-RS against the real index (SQLite and PostgreSQL): the gate's verdicts, indexing, locks."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer
from pydicom.dataset import Dataset

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX, STORES, create_app
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.domain.records import ParsedHeader
from imaging_gateway.index.schema import audit_log, instances, studies
from imaging_gateway.index.sql import IndexedObject, SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.gate import AccessContext, Gate, StoreAttempt
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from imaging_gateway.services.stow import object_key
from imaging_gateway.settings import IndexSettings, load_settings
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.factories import make_corpus
from tests.support.indexing import index_instances
from tests.support.seaweed import SeaweedServer

T1 = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
WRITE = "w"


def ctx(code: str) -> AccessContext:
    return AccessContext(Principal(subject="pacs", role="hospital", province="110000",
                                   token_id="t", hospital=code), source="127.0.0.1")


def rewrite(data: bytes, **changes: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def produced_by(data: bytes, code: str, **changes: object) -> bytes:
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "99CN-NHSA"
    return rewrite(data, InstitutionCodeSequence=[item], IssuerOfPatientID=code, **changes)


def header(data: bytes) -> ParsedHeader:
    return parse_header(data, complete=True)


def item(data: bytes, key: str | None = None) -> IndexedObject:
    h = header(data)
    digest = hashlib.sha256(data[: h.header_bytes]).hexdigest()
    etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return IndexedObject(key or object_key(h), etag, len(data), T1, h, digest)


@dataclass
class World:
    index: SqlIndex
    gate: Gate
    corpus: list[SyntheticInstance]
    new: SyntheticInstance
    """An instance of a study the index does not hold."""

    def of(self, code: str) -> list[SyntheticInstance]:
        return [i for i in self.corpus if i.hospital.code == code]

    def two_hospitals(self) -> tuple[str, str]:
        codes = sorted({i.hospital.code for i in self.corpus})
        return codes[0], codes[1]


@pytest.fixture
async def world(index: SqlIndex) -> AsyncIterator[World]:
    corpus = make_corpus(seed=7, patients=4, studies_per_patient=2, instances_per_series=2)
    await index_instances(index, corpus)
    gate = Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                break_glass_minutes=30, search_engine=index.search_engine)
    new = make_corpus(seed=99, patients=1)[0]
    yield World(index, gate, corpus, new)


async def test_verdicts_before_writing(world: World) -> None:
    mine, theirs = world.two_hospitals()
    own = world.of(mine)[0]
    other = world.of(theirs)[0]
    me = ctx(mine)
    fresh = produced_by(world.new.data, mine)

    async def verdict(data: bytes) -> str:
        return (await world.gate.check_store(me, header(data), store=WRITE)).verdict

    assert await verdict(fresh) == "new"
    assert await verdict(produced_by(world.new.data, mine, StudyInstanceUID=own.study_uid)) == "new"
    # Another hospital's study, series (under a new study), SOP instance, patient record.
    assert await verdict(produced_by(world.new.data, mine,
                                     StudyInstanceUID=other.study_uid)) == "refused"
    assert await verdict(produced_by(world.new.data, mine,
                                     SeriesInstanceUID=other.series_uid)) == "refused"
    assert await verdict(produced_by(world.new.data, mine,
                                     SOPInstanceUID=other.sop_uid)) == "refused"
    assert await verdict(rewrite(fresh, IssuerOfPatientID=theirs,
                                 PatientID=other.patient_id)) == "refused"
    # My own series under another study of mine: inconsistent, not a refusal.
    assert await verdict(produced_by(world.new.data, mine,
                                     SeriesInstanceUID=own.series_uid)) == "inconsistent"
    # A study nobody produced (no hospital) is nobody's to add to.
    async with world.index.engine.begin() as conn:
        await conn.execute(studies.update().where(studies.c.StudyInstanceUID == own.study_uid)
                           .values(hospital=None))
    assert await verdict(produced_by(world.new.data, mine,
                                     StudyInstanceUID=own.study_uid)) == "refused"
    # My own instance sent again: its copies, to compare.
    again = world.of(theirs)[0]
    check = await world.gate.check_store(ctx(theirs), header(again.data), store=WRITE)
    assert check.verdict == "indexed"
    assert [(c.store, c.key, c.size) for c in check.copies] == [
        ("s1", again.key, len(again.data))]
    assert check.copies[0].header_sha256 == item(again.data).header_sha256


async def test_record_store_indexes_and_audits_in_one_transaction(world: World) -> None:
    mine, _ = world.two_hospitals()
    me = ctx(mine)
    data = produced_by(world.new.data, mine)
    obj = item(data)
    verdict = await world.gate.record_store(me, world.index, store=WRITE, province="110000",
                                            item=obj, note="stored")
    assert verdict == "new"
    async with world.index.engine.connect() as conn:
        row = (await conn.execute(
            sa.select(studies.c.hospital, studies.c.NumberOfStudyRelatedInstances)
            .where(studies.c.StudyInstanceUID == world.new.study_uid))).one()
        audit = (await conn.execute(sa.select(audit_log))).mappings().all()
        inst = (await conn.execute(sa.select(instances.c.store, instances.c.key)
                                   .where(instances.c.SOPInstanceUID == world.new.sop_uid))).all()
    assert tuple(row) == (mine, 1)
    assert [tuple(r) for r in inst] == [(WRITE, obj.key)]
    assert [(a["action"], a["outcome"], a["StudyInstanceUID"], a["detail"]) for a in audit] == [
        ("store", "ok", world.new.study_uid, "result=stored")]
    assert audit[0]["patient_token"] == world.gate.tokens.for_national_id(world.new.national_id)

    # The grouped records of what was not indexed.
    await world.gate.audit_store(me, store=WRITE, attempts=[
        StoreAttempt(header(data), "ok", "identical"),
        StoreAttempt(header(data), "ok", "identical"),
        StoreAttempt(header(data), "error", "0111"),
        StoreAttempt(None, "error", "not-part10")])
    async with world.index.engine.connect() as conn:
        details = [(r["outcome"], r["detail"], r["StudyInstanceUID"]) for r in (
            await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings()][1:]
    assert details == [("ok", "identical=2", world.new.study_uid),
                       ("error", "0111=1", world.new.study_uid),
                       ("error", "not-part10=1", None)]


async def test_a_study_taken_meanwhile_is_not_taken_over(world: World) -> None:
    """The check before the write passed; another hospital's study appeared since."""
    mine, theirs = world.two_hospitals()
    data = produced_by(world.new.data, mine)
    assert (await world.gate.check_store(ctx(mine), header(data), store=WRITE)).verdict == "new"
    # Meanwhile the same study UID arrives from the other hospital's store.
    rival = make_corpus(seed=99, patients=1)[0]
    await index_instances(world.index, [rival], store="s2", hospital=theirs)
    before = await world.index.stats()
    verdict = await world.gate.record_store(ctx(mine), world.index, store=WRITE,
                                            province="110000", item=item(data), note="stored")
    assert verdict == "refused"
    assert await world.index.stats() == before
    async with world.index.engine.connect() as conn:
        owner = (await conn.execute(sa.select(studies.c.hospital).where(
            studies.c.StudyInstanceUID == world.new.study_uid))).scalar_one()
        audited = (await conn.execute(sa.select(sa.func.count()).select_from(audit_log))
                   ).scalar_one()
    assert owner == theirs and audited == 0


async def test_stored_objects_survive_a_running_sync_of_the_write_store(world: World) -> None:
    mine, _ = world.two_hospitals()
    # A sync job of the write store is under way (its listing may be past these keys).
    job = await world.index.create_job(WRITE, "full")
    obj = item(produced_by(world.new.data, mine))
    assert await world.gate.record_store(ctx(mine), world.index, store=WRITE,
                                         province="110000", item=obj, note="stored") == "new"
    async with world.index.engine.connect() as conn:
        seen = (await conn.execute(sa.select(instances.c.seen_job)
                                   .where(instances.c.key == obj.key))).scalar_one()
    assert seen == job.id
    assert await world.index.sweep_unseen(store=WRITE, job_id=job.id) == []
    assert (await world.index.stats())["tombstones"] == 0
    # With no job open, nothing claims to have seen it; the next job's listing will.
    await world.index.set_job_status(job.id, "succeeded", finished=True)
    second = item(produced_by(make_corpus(seed=98, patients=1)[0].data, mine))
    assert await world.gate.record_store(ctx(mine), world.index, store=WRITE,
                                         province="110000", item=second, note="stored") == "new"
    async with world.index.engine.connect() as conn:
        seen = (await conn.execute(sa.select(instances.c.seen_job)
                                   .where(instances.c.key == second.key))).scalar_one()
    assert seen is None
    # A job that listed and indexed the key before this upsert committed keeps its mark.
    async with world.index.engine.begin() as conn:
        await conn.execute(instances.update().where(instances.c.key == second.key)
                           .values(seen_job=job.id))
        await world.index.index_stored(conn, store=WRITE, province="110000", hospital=mine,
                                       items=[second])
        seen = (await conn.execute(sa.select(instances.c.seen_job)
                                   .where(instances.c.key == second.key))).scalar_one()
    assert seen == job.id


async def test_object_lock_serializes_writers_of_one_key(index: SqlIndex, index_url: str
                                                         ) -> None:
    # A second SqlIndex stands for another gateway process on the same database (on
    # SQLite, one process: the lock is in-process and per SqlIndex).
    other = await SqlIndex.open(IndexSettings(url=index_url)) if index.dialect == "postgresql" \
        else index
    order: list[str] = []
    try:
        async with index.object_lock(WRITE, "stow/1/2/3.dcm"):
            waiting = asyncio.create_task(_locked(other, "stow/1/2/3.dcm", order, "second"))
            free = asyncio.create_task(_locked(other, "stow/1/2/4.dcm", order, "other-key"))
            await asyncio.wait_for(free, 10)
            await asyncio.sleep(0.3)
            assert not waiting.done()
            order.append("first")
        await asyncio.wait_for(waiting, 10)
        assert order == ["other-key", "first", "second"]
        assert not index._key_locks
    finally:
        if other is not index:
            await other.close()


async def _locked(index: SqlIndex, key: str, order: list[str], name: str) -> None:
    async with index.object_lock(WRITE, key):
        order.append(name)


def big_instance(code: str) -> bytes:
    """A 2048 x 2400 16-bit CT image (~9.4 MiB): over the S3 adapter's 8 MiB part size."""
    base = make_corpus(seed=97, patients=1)[0]
    ds = pydicom.dcmread(io.BytesIO(produced_by(base.data, code)))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2048, 2400, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (2048 * 2400 * 2 // 256)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.seaweedfs
@pytest.mark.parametrize(("kind", "encryption"), [("s3", False), ("minio", False), ("s3", True)])
async def test_stow_into_a_real_s3_write_store(seaweedfs: SeaweedServer, tmp_path: Path,
                                               kind: str, encryption: bool) -> None:
    """Through the app: stream into SeaweedFS (one PUT and a multipart upload), retrieve
    the same bytes, and an incremental sync of the write store finds every object unchanged.
    With encryption on, the bucket holds no identifying string of the study."""
    bucket = seaweedfs.make_bucket(f"stow-{kind}{'-enc' if encryption else ''}")
    if encryption:
        FileKeyring.create(tmp_path / "data" / "keys" / "keyring.json",
                           setting="encryption.keyring_file", key_id="gateway-110000")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
data_dir = "data"
write_store = "w"
[index]
url = "sqlite:///{tmp_path / "index.sqlite3"}"
[[stores]]
name = "w"
kind = "{kind}"
endpoint = "{seaweedfs.endpoint}"
bucket = "{bucket}"
access_key_env = "AK"
secret_key_env = "SK"
[encryption]
enabled = {"true" if encryption else "false"}
""", encoding="utf-8")
    settings = load_settings(cfg, environ={"AK": seaweedfs.access_key,
                                           "SK": seaweedfs.secret_key})
    study = make_corpus(seed=96, patients=1, modalities=("CT",), instances_per_series=3,
                        pixel_mode="realistic")
    code = study[0].hospital.code
    payloads = [i.data for i in study] + [big_instance(code)]
    boundary = "s3-stow-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + d
                    + b"\r\n" for d in payloads) + f"--{boundary}--\r\n".encode()
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        token = app[TOKENS].issue(subject="pacs", role="hospital", hospital=code)
        auth = {"Authorization": f"Bearer {token}"}
        r = await client.post("/dicomweb/studies", data=body, headers={
            **auth, "Content-Type": f'multipart/related; type="application/dicom"; '
                                    f"boundary={boundary}"})
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "application/dicom+json"
        ds = Dataset.from_json(await r.json(content_type=None))
        assert len(ds.ReferencedSOPSequence) == len(payloads)
        for item_ds, data in zip(ds.ReferencedSOPSequence, payloads, strict=True):
            path = item_ds.RetrieveURL.split("/dicomweb", 1)[1]
            got = await client.get(f"/dicomweb{path}", headers=auth)
            assert got.status == 200
            (part,) = _parts(await got.read(), got.headers["Content-Type"])
            assert part == data
        index = app[INDEX]
        runner = SyncRunner(settings, index, app[STORES]["w"])
        await runner.start()
        job = await runner.run()
    assert job.status == "succeeded"
    assert (job.counters["listed"], job.counters["unchanged"], job.counters["deleted"]) == (
        len(payloads), len(payloads), 0)
    raw = open_store(settings.store("w"))
    try:
        page = await raw.list_page()
        assert len(page.objects) == len(payloads)
        blob = b"".join([b"".join([c async for c in raw.read_stream(o.key)])
                         for o in page.objects])
    finally:
        await raw.close()
    identifying = {study[0].national_id.encode(), study[0].patient_id.encode(),
                   study[0].patient_name.split("=")[0].encode()}
    if encryption:
        assert not [s for s in identifying if s in blob], "PHI in the encrypted bucket"
        assert payloads[0][:132] not in blob
    else:
        assert study[0].national_id.encode() in blob


def _parts(body: bytes, content_type: str) -> list[bytes]:
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body, policy=email.policy.HTTP)
    return [p.get_payload(decode=True) for p in message.iter_parts()]  # type: ignore[misc]
