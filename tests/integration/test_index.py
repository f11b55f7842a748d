"""The study index on real SQLite and PostgreSQL: upserts, quarantine, tombstones, conflicts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.domain.records import (
    InstanceRecord,
    ParsedHeader,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from imaging_gateway.index.schema import conflicts, instances, patients, studies
from imaging_gateway.index.sql import IndexedObject, QuarantinedObject, SqlIndex
from imaging_gateway.settings import IndexSettings

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def obj(
    key: str,
    *,
    study: str = "1.2.3",
    series: str = "1.2.3.1",
    sop: str | None = None,
    etag: str = "e1",
    size: int = 1000,
    digest: str = "d" * 64,
    patient: str = "MRN1",
    name: str | None = "Wang^Wei=王^伟",
) -> IndexedObject:
    header = ParsedHeader(
        patient=PatientRecord(PatientID=patient, PatientName=name, PatientBirthDate="19800101"),
        study=StudyRecord(StudyInstanceUID=study, StudyDate="20250301", institution_code="H11010800028"),
        series=SeriesRecord(SeriesInstanceUID=series, Modality="CT"),
        instance=InstanceRecord(SOPInstanceUID=sop or f"{series}.{abs(hash(key)) % 10**6}",
                                SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
        header_bytes=600,
    )
    return IndexedObject(key, etag, size, T0, header, digest)


async def apply(index: SqlIndex, job: str, **kw: object) -> int:
    args: dict[str, object] = {"indexed": [], "quarantined": [], "deleted": [], "cursor": None,
                               "counters": {}}
    args.update(kw)
    return await index.apply_page(store="s1", province="110000", job_id=job, **args)  # type: ignore[arg-type]


async def test_upsert_builds_hierarchy_and_is_idempotent(index: SqlIndex) -> None:
    job = await index.create_job("s1", "full")
    page = [obj("a/1.dcm"), obj("a/2.dcm"), obj("b/1.dcm", study="1.2.4", series="1.2.4.1")]
    await apply(index, job.id, indexed=page, cursor="b/1.dcm")
    await apply(index, job.id, indexed=page, cursor="b/1.dcm")
    assert await index.stats() == {
        "patients": 1, "studies": 2, "series": 2, "instances": 3,
        "quarantined": 0, "tombstones": 0, "conflicts": 0,
    }
    async with index.engine.connect() as conn:
        name = (await conn.execute(sa.select(patients.c.PatientName))).scalar_one()
        province = (await conn.execute(sa.select(sa.func.min(studies.c.province)))).scalar_one()
    assert name == "Wang^Wei=王^伟"
    assert province == "110000"
    assert (await index.get_job(job.id)).cursor == "b/1.dcm"


async def test_the_object_with_the_greatest_key_wins_whatever_order_pages_land_in(
        index: SqlIndex) -> None:
    """Objects of one patient that disagree (a name in one character set and in two): the
    row holds the greatest key's values whether its page lands first or last (several
    sync workers land slices in any order); a null never erases a value."""
    job = await index.create_job("s1", "full")
    pages = [[obj("a/1.dcm", name="He^Ting")], [obj("b/1.dcm", study="1.2.4", series="1.2.4.1",
                                                   name="He^Ting=何^婷")],
             [obj("c/1.dcm", study="1.2.5", series="1.2.5.1", name=None)]]
    names = []
    for order in (pages, pages[::-1], [pages[1], pages[0], pages[2]]):
        for page in order:
            await apply(index, job.id, indexed=page)
        async with index.engine.connect() as conn:
            names.append((await conn.execute(sa.select(patients.c.PatientName))).scalar_one())
        async with index.engine.begin() as conn:  # as if never indexed: the next order
            await conn.execute(patients.update().values(source_key=None, PatientName=None))
    assert names == ["He^Ting=何^婷"] * 3


async def test_known_objects_by_key_with_unicode(index: SqlIndex) -> None:
    job = await index.create_job("s1", "full")
    keys = ["A.dcm", "a.dcm", "é.dcm", "医院/1.dcm", "医院 2/1.dcm"]
    await apply(index, job.id, indexed=[obj(k) for k in keys])
    await apply(index, job.id, quarantined=[QuarantinedObject("zz", "q", 0, "empty: zero-byte object")])
    got = await index.known_objects("s1", [*keys, "zz", "missing.dcm"])
    assert sorted(got) == sorted([*keys, "zz"])
    assert got["zz"].quarantined and not got["医院/1.dcm"].quarantined
    assert got["a.dcm"].etag == "e1" and got["a.dcm"].size == 1000
    assert await index.known_objects("other-store", keys) == {}


async def test_sweep_turns_unseen_objects_into_tombstones(index: SqlIndex) -> None:
    first = await index.create_job("s1", "full")
    await apply(index, first.id, indexed=[obj("a.dcm"), obj("b.dcm", study="1.2.5", series="1.2.5.1")],
                quarantined=[QuarantinedObject("bad", "q", 0, "empty: zero-byte object")])
    assert await index.sweep_unseen(store="s1", job_id=first.id) == []
    second = await index.create_job("s1", "incremental")
    # The second listing shows a.dcm (unchanged) only.
    await apply(index, second.id, unchanged=["a.dcm"])
    assert await index.sweep_unseen(store="s1", job_id=second.id) == ["b.dcm", "bad"]
    s = await index.stats()
    assert (s["instances"], s["studies"], s["quarantined"], s["tombstones"]) == (1, 1, 0, 1)
    assert await index.sweep_unseen(store="s1", job_id=second.id) == []


async def test_quarantine_then_repaired_then_deleted(index: SqlIndex) -> None:
    job = await index.create_job("s1", "incremental")
    await apply(index, job.id, quarantined=[QuarantinedObject("x.dcm", "q1", 10, "not-dicom: x")])
    assert (await index.stats())["quarantined"] == 1
    await apply(index, job.id, indexed=[obj("x.dcm", etag="e2")])
    s = await index.stats()
    assert (s["quarantined"], s["instances"]) == (0, 1)
    await apply(index, job.id, deleted=["x.dcm"])
    s = await index.stats()
    # The deletion is recorded; the now-empty series, study and patient are gone.
    assert s == {"patients": 0, "studies": 0, "series": 0, "instances": 0,
                 "quarantined": 0, "tombstones": 1, "conflicts": 0}


async def test_object_turning_unreadable_leaves_index(index: SqlIndex) -> None:
    job = await index.create_job("s1", "incremental")
    await apply(index, job.id, indexed=[obj("x.dcm")])
    await apply(index, job.id, quarantined=[QuarantinedObject("x.dcm", "e9", 5, "truncated: ...")])
    s = await index.stats()
    assert (s["instances"], s["quarantined"], s["studies"], s["tombstones"]) == (0, 1, 0, 0)


async def test_same_sop_different_content_both_kept_and_recorded(index: SqlIndex) -> None:
    job = await index.create_job("s1", "full")
    a = obj("a.dcm", sop="1.9.9", etag="ea", size=100, digest="a" * 64)
    replica = obj("copy/a.dcm", sop="1.9.9", etag="eb", size=100, digest="a" * 64)
    other = obj("b.dcm", sop="1.9.9", etag="ec", size=120, digest="c" * 64)
    assert await apply(index, job.id, indexed=[a, replica]) == 0
    assert await apply(index, job.id, indexed=[other]) == 2
    s = await index.stats()
    assert (s["instances"], s["conflicts"]) == (3, 2)
    async with index.engine.connect() as conn:
        pairs = sorted((await conn.execute(sa.select(conflicts.c.key, conflicts.c.other_key))).all())
        n_sop = (await conn.execute(
            sa.select(sa.func.count()).where(instances.c.SOPInstanceUID == "1.9.9"))).scalar_one()
    assert pairs == [("a.dcm", "b.dcm"), ("b.dcm", "copy/a.dcm")]
    assert n_sop == 3
    # Re-applying does not duplicate; deleting one side clears its conflicts.
    await apply(index, job.id, indexed=[other])
    assert (await index.stats())["conflicts"] == 2
    await apply(index, job.id, deleted=["b.dcm"])
    assert (await index.stats())["conflicts"] == 0


async def test_jobs_lifecycle(index: SqlIndex) -> None:
    job = await index.create_job("s1", "full")
    assert (await index.open_job("s1")).id == job.id  # type: ignore[union-attr]
    await index.set_job_status(job.id, "succeeded", counters={"listed": 5}, finished=True)
    assert await index.open_job("s1") is None
    done = await index.get_job(job.id)
    assert done.counters == {"listed": 5} and done.finished_at is not None
    assert [j.id for j in await index.list_jobs(store="s1")] == [job.id]


async def test_migration_0007_splits_patients_merged_for_lack_of_a_patient_id(
    index: SqlIndex,
) -> None:
    """An index that merged the studies without PatientID into one patient (as before
    0007) gets a patient per study; the merged name and identity go, nobody else moves."""
    from alembic import command
    from alembic.config import Config

    from imaging_gateway.index.schema import break_glass, patient_name_keys
    from imaging_gateway.index.sql import MIGRATIONS

    job = await index.create_job("s1", "full")
    page = [obj("a/1.dcm", study="1.2.5", series="1.2.5.1", patient="", name="Li^Na"),
            obj("a/2.dcm", study="1.2.6", series="1.2.6.1", patient=" ", name="Zhou^Yu"),
            obj("a/3.dcm", study="1.2.7", series="1.2.7.1", patient="", name="Sun^Li"),
            obj("b/1.dcm", study="1.2.8", series="1.2.8.1", patient="", name="Qian^Ke"),
            obj("c/1.dcm", study="1.2.9", series="1.2.9.1")]
    await apply(index, job.id, indexed=page, cursor="c/1.dcm")

    # The state an index reached before 0007: one patient "H11010800028|" for 1.2.5-1.2.7
    # (the last writer's name and a national identity), one for 1.2.8 alone under a
    # blank PatientID in another issuer's scope, with a break-glass window naming the first.
    async with index.engine.begin() as conn:
        ids = dict((await conn.execute(sa.select(studies.c.StudyInstanceUID,
                                                 studies.c.patient_id))).all())
        merged, alone = ids["1.2.5"], ids["1.2.8"]
        await conn.execute(studies.update().where(studies.c.StudyInstanceUID.in_(
            ["1.2.6", "1.2.7"])).values(patient_id=merged))
        await conn.execute(patients.delete().where(patients.c.id.in_(
            [ids["1.2.6"], ids["1.2.7"]])))
        await conn.execute(patients.update().where(patients.c.id == merged).values(
            patient_key="H11010800028|", national_id="11010519491231002X"))
        await conn.execute(patients.update().where(patients.c.id == alone).values(
            patient_key="X|", PatientID="  "))
        await conn.execute(patient_name_keys.insert().values(key="merged", patient_id=merged))
        await conn.execute(break_glass.insert().values(
            id="bg1", subject="dr", hospital="H11010100002", patient_id=merged,
            reason="er", opened_at=T0, expires_at=T0))

    def migrate(revision: str) -> object:
        def step(sync_conn: object) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = sync_conn
            if revision == "head":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
        return step

    async with index.engine.begin() as conn:
        await conn.run_sync(migrate("0006"))  # type: ignore[arg-type]
    async with index.engine.begin() as conn:
        await conn.run_sync(migrate("head"))  # type: ignore[arg-type]

    async with index.engine.connect() as conn:
        rows = (await conn.execute(
            sa.select(studies.c.StudyInstanceUID, patients.c.id, patients.c.patient_key,
                      patients.c.PatientName, patients.c.national_id)
            .join(patients, patients.c.id == studies.c.patient_id)
            .order_by(studies.c.StudyInstanceUID))).all()
        kept = (await conn.execute(sa.select(patients.c.PatientName, patients.c.national_id)
                                   .where(patients.c.id == merged))).one()
        keys = (await conn.execute(sa.select(patient_name_keys.c.patient_id).where(
            patient_name_keys.c.patient_id == merged))).all()
    by_study = {r[0]: r for r in rows}
    assert [by_study[u][2] for u in ("1.2.5", "1.2.6", "1.2.7", "1.2.8")] == [
        "|study:1.2.5", "|study:1.2.6", "|study:1.2.7", "|study:1.2.8"]
    assert len({by_study[u][1] for u in ("1.2.5", "1.2.6", "1.2.7", "1.2.8")}) == 4
    # Which of the merged studies the name and identity were of is unknown: none keeps them.
    assert all(by_study[u][3:] == (None, None) for u in ("1.2.5", "1.2.6", "1.2.7"))
    assert by_study["1.2.8"][1] == alone and by_study["1.2.8"][3] == "Qian^Ke"
    assert by_study["1.2.9"][2:4] == ("H11010800028|MRN1", "Wang^Wei=王^伟")
    # The merged row stays for its break-glass record, naming nobody, reaching nothing.
    assert merged not in {r[1] for r in rows} and tuple(kept) == (None, None) and not keys
    # A later sync of those objects lands on the split patients, not new ones.
    job = await index.create_job("s1", "full")
    await apply(index, job.id, indexed=page, cursor="c/1.dcm")
    async with index.engine.connect() as conn:
        again = dict((await conn.execute(
            sa.select(studies.c.StudyInstanceUID, patients.c.PatientName)
            .join(patients, patients.c.id == studies.c.patient_id))).all())
    assert again == {"1.2.5": "Li^Na", "1.2.6": "Zhou^Yu", "1.2.7": "Sun^Li",
                     "1.2.8": "Qian^Ke", "1.2.9": "Wang^Wei=王^伟"}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_an_object_without_patient_id_leaves_its_study_with_its_patient(
    index_url: str, tmp_path: Path, encrypted: bool
) -> None:
    """A report or secondary capture without PatientID in a study of an identified patient
    keeps the study that patient's, whether they arrive in one page or in two, in either
    order; a study with no identified object at all has a patient of its own."""
    phi = None
    if encrypted:
        ring = FileKeyring.create(tmp_path / "keyring.json", setting="encryption.keyring_file",
                                  key_id="gateway-110000", suite=Suite.AES_256_GCM)
        phi = PhiCodec(ring)
    index = await SqlIndex.open(IndexSettings(url=index_url), phi=phi)
    try:
        job = await index.create_job("s1", "full")
        # 1.2.3: identified, then a report without PatientID in a later page.
        await apply(index, job.id, indexed=[obj("a/1.dcm")], cursor="a/1.dcm")
        await apply(index, job.id, indexed=[
            obj("a/2.dcm", series="1.2.3.9", patient="", name="Report^Only"),
            # 1.2.4: the object without PatientID first in key order, in one page.
            obj("b/1.dcm", study="1.2.4", series="1.2.4.9", patient="", name=None),
            obj("b/2.dcm", study="1.2.4", series="1.2.4.1", patient="MRN2", name="Li^Lei"),
            # 1.2.5: identified object last... and 1.2.6 has no identified object at all.
            obj("c/1.dcm", study="1.2.5", series="1.2.5.1", patient="MRN2", name="Li^Lei"),
            obj("c/2.dcm", study="1.2.5", series="1.2.5.9", patient=" ", name=None),
            obj("d/1.dcm", study="1.2.6", series="1.2.6.1", patient="", name="Zhou^Yu"),
        ], cursor="d/1.dcm")
        async with index.engine.connect() as conn:
            owner = dict((await conn.execute(
                sa.select(studies.c.StudyInstanceUID, patients.c.patient_key)
                .join(patients, patients.c.id == studies.c.patient_id))).all())
        key = (lambda k: k) if phi is None else phi.patient_key
        assert owner == {
            "1.2.3": key("H11010800028|MRN1"),
            "1.2.4": key("H11010800028|MRN2"),
            "1.2.5": key("H11010800028|MRN2"),
            "1.2.6": key("|study:1.2.6"),
        }
    finally:
        await index.close()


async def test_a_full_sync_splits_an_encrypted_index_merged_before_0007(
    index_url: str, tmp_path: Path
) -> None:
    """Migration 0007 cannot see a sealed blank PatientID; the next full sync moves each
    study without PatientID from the merged patient to a patient of its own."""
    from imaging_gateway.index.sql import patient_cells

    ring = FileKeyring.create(tmp_path / "keyring.json", setting="encryption.keyring_file",
                              key_id="gateway-110000", suite=Suite.AES_256_GCM)
    phi = PhiCodec(ring)
    index = await SqlIndex.open(IndexSettings(url=index_url), phi=phi)
    try:
        page = [obj("a/1.dcm", study="1.2.5", series="1.2.5.1", patient="", name="Li^Na"),
                obj("a/2.dcm", study="1.2.6", series="1.2.6.1", patient="", name="Zhou^Yu")]
        job = await index.create_job("s1", "full")
        await apply(index, job.id, indexed=page, cursor="a/2.dcm")
        # As an index before 0007 held them: one patient "H11010800028|" for both.
        merged_key = phi.patient_key("H11010800028|")
        async with index.engine.begin() as conn:
            ids = dict((await conn.execute(sa.select(studies.c.StudyInstanceUID,
                                                     studies.c.patient_id))).all())
            cells = patient_cells(phi, merged_key, {
                "PatientID": "", "PatientName": "Zhou^Yu", "PatientBirthDate": "19800101",
                "national_id": None})
            await conn.execute(patients.update().where(patients.c.id == ids["1.2.5"])
                               .values(patient_key=merged_key, **cells))
            await conn.execute(studies.update().where(studies.c.StudyInstanceUID == "1.2.6")
                               .values(patient_id=ids["1.2.5"]))
            await conn.execute(patients.delete().where(patients.c.id == ids["1.2.6"]))
        job = await index.create_job("s1", "full")
        await apply(index, job.id, indexed=page, cursor="a/2.dcm")
        async with index.engine.connect() as conn:
            owner = dict((await conn.execute(
                sa.select(studies.c.StudyInstanceUID, patients.c.patient_key)
                .join(patients, patients.c.id == studies.c.patient_id))).all())
        assert owner == {"1.2.5": phi.patient_key("|study:1.2.5"),
                         "1.2.6": phi.patient_key("|study:1.2.6")}
    finally:
        await index.close()


async def test_quarantine_listing_pages_by_store_and_key(index: SqlIndex) -> None:
    """Keyset pages over (store, key) in byte order, across stores, filtered by store."""
    keys = {"s1": ["a/1.dcm", "a/2.dcm", "b/é.dcm", "B/z.dcm"], "s2": ["a/1.dcm", "c.dcm"]}
    for store, names in keys.items():
        job = await index.create_job(store, "full")
        await index.apply_page(
            store=store, province="110000", job_id=job.id, indexed=[], deleted=[], cursor=None,
            counters={}, quarantined=[QuarantinedObject(k, "q", n, f"not-dicom: {k}")
                                      for n, k in enumerate(names)],
        )
    expected = [(s, k) for s in sorted(keys) for k in sorted(keys[s], key=str.encode)]
    seen: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    while page := await index.list_quarantine(after=after, limit=2):
        assert len(page) <= 2
        seen += [(e.store, e.key) for e in page]
        after = (page[-1].store, page[-1].key)
    assert seen == expected
    only = await index.list_quarantine(store="s1", after=("s1", "a/1.dcm"), limit=10)
    assert [(e.key, e.reason, e.size) for e in only] == [
        ("a/2.dcm", "not-dicom: a/2.dcm", 1), ("b/é.dcm", "not-dicom: b/é.dcm", 2)]
    assert only[0].first_seen.tzinfo is not None
