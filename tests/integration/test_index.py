"""The study index on real SQLite and PostgreSQL: upserts, quarantine, tombstones, conflicts."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from imaging_gateway.domain.records import (
    InstanceRecord,
    ParsedHeader,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)
from imaging_gateway.index.schema import conflicts, instances, patients, studies
from imaging_gateway.index.sql import IndexedObject, QuarantinedObject, SqlIndex

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
