"""QIDO-RS search on the real index, SQLite and PostgreSQL: matching, paging, fuzzy names, visibility."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from multidict import MultiDict
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.dicom.synthetic import generate_instances
from imaging_gateway.domain.qido import Level, QidoPage, parse_qido
from imaging_gateway.errors import InvalidQuery, QueryTooBroad
from imaging_gateway.index.qido import refresh_derived, search
from imaging_gateway.index.schema import patients, series, series_requests, studies
from imaging_gateway.index.sql import IndexedObject, SqlIndex
from imaging_gateway.settings import IndexSettings
from tests.conftest import FilledIndexes

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
# One name per synthetic person (by national ID, in generation order): Chinese with both
# groups, ideographic only, alphabetic only.
NAMES = ["Zhang^San=张^三", "=吕^布", "Wang^XiaoDong=王^小东", "Smith^John"]
ODD_ACCESSION = "AB_1%X"


@functools.cache
def corpus() -> tuple[IndexedObject, ...]:
    """4 people x 2 studies x 2 series x 2 instances, names set, plus one replica object."""
    insts = list(generate_instances(seed=7, patients=4, studies_per_patient=2,
                                    pixel_mode="small", series_per_study=2,
                                    instances_per_series=2))
    people = list(dict.fromkeys(i.national_id for i in insts))
    objs = []
    for inst in insts:
        h = parse_header(inst.data, complete=True)
        name = NAMES[people.index(inst.national_id)]
        h = dataclasses.replace(h, patient=dataclasses.replace(h.patient, PatientName=name))
        if inst.study_uid == insts[0].study_uid:
            h = dataclasses.replace(h, study=dataclasses.replace(
                h.study, AccessionNumber=ODD_ACCESSION))
        digest = hashlib.sha256(inst.data[: h.header_bytes]).hexdigest()
        objs.append(IndexedObject(inst.key, hashlib.md5(inst.data).hexdigest(), len(inst.data),
                                  T0, h, digest))
    # A replica of the first object under another key: one SOPInstanceUID, two objects.
    first = objs[0]
    objs.append(dataclasses.replace(first, key="replica/" + first.key))
    return tuple(objs)


def headers() -> list[Any]:
    return [o.header for o in corpus()[:-1]]


def study_uids(**where: Any) -> set[str]:
    """Ground truth: the StudyInstanceUIDs of the corpus whose header fields match."""
    out = set()
    for h in headers():
        fields = {**dataclasses.asdict(h.patient), **dataclasses.asdict(h.study),
                  **dataclasses.asdict(h.series), **dataclasses.asdict(h.instance)}
        if all(fields[k] == v for k, v in where.items()):
            out.add(h.study.StudyInstanceUID)
    return out


@pytest.fixture(params=["sqlite", "postgres"])
async def index(request: pytest.FixtureRequest, tmp_path: Path,
                filled_indexes: FilledIndexes) -> AsyncIterator[SqlIndex]:
    """A copy of the module's corpus index, on each backend."""
    async with filled_indexes.copy(request.param, tmp_path, _fill) as url:
        idx = await SqlIndex.open(IndexSettings(url=url))
        yield idx
        await idx.close()


async def _fill(idx: SqlIndex) -> None:
    job = await idx.create_job("s1", "full")
    await idx.apply_page(store="s1", province="110000", job_id=job.id, indexed=list(corpus()),
                         quarantined=[], deleted=[], cursor=None, counters={})
    async with idx.engine.begin() as conn:
        ids = [r[0] for r in (await conn.execute(sa.select(studies.c.id))).all()]
        # Until the sync calls it, the test does (idempotent either way).
        await refresh_derived(conn, ids)
        # The header parser does not read these yet: set a few by hand.
        first_series = (await conn.execute(
            sa.select(series.c.id, series.c.SeriesInstanceUID).order_by(series.c.id))).all()
        for sid, _uid in first_series[:2]:
            await conn.execute(series.update().where(series.c.id == sid).values(
                PerformedProcedureStepStartDate="20250301",
                PerformedProcedureStepStartTime="081500"))
        await conn.execute(series_requests.insert(), [
            {"series_id": first_series[0][0], "ScheduledProcedureStepID": "SPS-1",
             "RequestedProcedureID": "RP-1"},
            {"series_id": first_series[0][0], "ScheduledProcedureStepID": "SPS-2",
             "RequestedProcedureID": "RP-1"},
            {"series_id": first_series[2][0], "ScheduledProcedureStepID": "SPS-3",
             "RequestedProcedureID": "RP-9"},
        ])


async def run(index: SqlIndex, level: Level, params: Mapping[str, str] | MultiDict[str],
              *, visible: ColumnElement[bool] | None = None, max_results: int = 100,
              **kw: Any) -> QidoPage:
    path = {k: kw.pop(k) for k in ("study_uid", "series_uid") if k in kw}
    q = parse_qido(level, params, **path)
    return await search(index.engine, q, visible=sa.true() if visible is None else visible,
                        max_results=max_results, **kw)


def uids(page: QidoPage, keyword: str = "StudyInstanceUID") -> set[str]:
    return {r[keyword] for r in page.rows}


# ------------------------------------------------------------------ study level


async def test_all_studies_default_attributes_and_counts(index: SqlIndex) -> None:
    page = await run(index, "study", {})
    assert uids(page) == study_uids() and len(page.rows) == 8 and not page.more
    by_uid = {r["StudyInstanceUID"]: r for r in page.rows}
    for h in headers():
        row = by_uid[h.study.StudyInstanceUID]
        assert row["PatientID"] == h.patient.PatientID
        assert row["StudyDate"] == h.study.StudyDate
        assert row["ModalitiesInStudy"] == [h.series.Modality]
        assert row["NumberOfStudyRelatedSeries"] == 2
        # 4 objects, but the replica does not count twice.
        assert row["NumberOfStudyRelatedInstances"] == 4
        assert row["InstanceAvailability"] == "ONLINE"
    assert {"StudyDescription", "SeriesInstanceUID"}.isdisjoint(page.rows[0])
    # Newest study first; the order is the same on every call.
    dates = [r["StudyDate"] for r in page.rows]
    assert dates == sorted(dates, reverse=True)
    assert [r["StudyInstanceUID"] for r in (await run(index, "study", {})).rows] == [
        r["StudyInstanceUID"] for r in page.rows]
    # Audit fields: whose study it is (national id and patient key) and which.
    async with index.engine.connect() as conn:
        owner = {uid: (nid, key) for uid, nid, key in (await conn.execute(
            sa.select(studies.c.StudyInstanceUID, patients.c.national_id,
                      patients.c.patient_key).join(
                          patients, patients.c.id == studies.c.patient_id))).all()}
    assert all(owner[r.study_instance_uid] == (r.national_id, r.patient_key)
               for r in page.results)


async def test_study_required_matching_keys(index: SqlIndex) -> None:
    h = headers()[0].study
    p = headers()[0].patient
    cases: list[tuple[dict[str, str], set[str]]] = [
        ({"StudyInstanceUID": h.StudyInstanceUID}, {h.StudyInstanceUID}),
        ({"StudyDate": h.StudyDate}, study_uids(StudyDate=h.StudyDate)),
        ({"StudyTime": h.StudyTime}, study_uids(StudyTime=h.StudyTime)),
        ({"AccessionNumber": ODD_ACCESSION}, {h.StudyInstanceUID}),
        ({"StudyID": h.StudyID}, study_uids(StudyID=h.StudyID)),
        ({"PatientID": p.PatientID}, study_uids(PatientID=p.PatientID)),
        ({"ReferringPhysicianName": h.ReferringPhysicianName},
         study_uids(ReferringPhysicianName=h.ReferringPhysicianName)),
        ({"PatientName": "Zhang^San=张^三"}, study_uids(PatientName="Zhang^San=张^三")),
        ({"ModalitiesInStudy": "CT"}, study_uids(Modality="CT")),
    ]
    for params, expected in cases:
        page = await run(index, "study", params)
        assert expected and uids(page) == expected, params
        key = next(iter(params))
        assert key in page.rows[0]


async def test_study_date_and_time_ranges(index: SqlIndex) -> None:
    dates = sorted({h.study.StudyDate for h in headers()})
    low, high = dates[1], dates[-2]
    expected = {h.study.StudyInstanceUID for h in headers() if low <= h.study.StudyDate <= high}
    assert uids(await run(index, "study", {"StudyDate": f"{low}-{high}"})) == expected
    expected = {h.study.StudyInstanceUID for h in headers() if h.study.StudyDate >= low}
    assert uids(await run(index, "study", {"StudyDate": f"{low}-"})) == expected
    expected = {h.study.StudyInstanceUID for h in headers() if h.study.StudyDate <= high}
    assert uids(await run(index, "study", {"StudyDate": f"-{high}"})) == expected
    # TM: a partial upper bound includes everything it prefixes.
    times = sorted({h.study.StudyTime for h in headers()})
    t = times[len(times) // 2]
    expected = {h.study.StudyInstanceUID for h in headers() if h.study.StudyTime[:4] <= t[:4]}
    assert uids(await run(index, "study", {"StudyTime": f"-{t[:4]}"})) == expected
    expected = {h.study.StudyInstanceUID for h in headers() if h.study.StudyTime >= t}
    assert uids(await run(index, "study", {"StudyTime": f"{t}-"})) == expected


async def test_uid_lists(index: SqlIndex) -> None:
    all_uids = sorted(study_uids())
    page = await run(index, "study", {"StudyInstanceUID": ",".join(all_uids[:3])})
    assert uids(page) == set(all_uids[:3])
    page = await run(index, "study", {"StudyInstanceUID": "\\".join([all_uids[0], "1.2.3.4"])})
    assert uids(page) == {all_uids[0]}


async def test_wildcards_are_case_sensitive_and_escape_like_characters(index: SqlIndex) -> None:
    odd = headers()[0].study.StudyInstanceUID
    assert uids(await run(index, "study", {"AccessionNumber": "AB_1%*"})) == {odd}
    assert uids(await run(index, "study", {"AccessionNumber": "AB?1?X"})) == {odd}
    assert uids(await run(index, "study", {"AccessionNumber": "*%X"})) == {odd}
    # "_" and "%" are literal: no other accession has them.
    assert uids(await run(index, "study", {"AccessionNumber": "A__*"})) == set()
    assert uids(await run(index, "study", {"AccessionNumber": "ab_1*"})) == set()
    assert uids(await run(index, "study", {"AccessionNumber": "A*"})) == study_uids()
    desc = headers()[1].study.StudyDescription
    assert uids(await run(index, "study", {"StudyDescription": f"*{desc[1:]}"})) == study_uids(
        StudyDescription=desc)


async def test_modalities_in_study_list_and_wildcard(index: SqlIndex) -> None:
    mods = {h.series.Modality for h in headers()}
    assert mods == {"CT", "MR", "DX"}
    assert uids(await run(index, "study", {"ModalitiesInStudy": "CT,MR"})) == (
        study_uids(Modality="CT") | study_uids(Modality="MR"))
    assert uids(await run(index, "study", {"ModalitiesInStudy": "?R"})) == study_uids(Modality="MR")
    assert uids(await run(index, "study", {"ModalitiesInStudy": "C"})) == set()


async def test_patient_name_literal_matching(index: SqlIndex) -> None:
    zhang = study_uids(PatientName="Zhang^San=张^三")
    wang = study_uids(PatientName="Wang^XiaoDong=王^小东")
    lu = study_uids(PatientName="=吕^布")
    for value, expected in [
        ("Zhang^San", zhang), ("zhang^san", zhang), ("张^三", zhang), ("=张^三", zhang),
        ("Zhang^San=张^三", zhang), ("Zhang*", zhang), ("*San", zhang), ("王*", wang),
        ("吕^布", lu), ("Wang^XiaoDong^^", wang), ("*", study_uids()),
        ("Zhang", set()), ("zhang san", set()), ("Zhang^San=王^小东", set()),
    ]:
        assert uids(await run(index, "study", {"PatientName": value})) == expected, value


@pytest.mark.parametrize(
    ("value", "who"),
    [("张三", 0), ("张", 0), ("三", 0), ("zhang san", 0), ("zhangsan", 0), ("zhāng sān", 0),
     ("zhang1 san1", 0), ("zs", 0), ("Zhang^San", 0), ("ZHANG", 0),
     ("吕布", 1), ("lu bu", 1), ("lv", 1), ("lǚ bù", 1), ("lb", 1),
     ("wang xiaodong", 2), ("xiao", 2), ("wxd", 2), ("王小东", 2), ("东", 2),
     ("smith", 3), ("john smith", 3), ("sj", 3)],
)
async def test_fuzzy_chinese_names(index: SqlIndex, value: str, who: int) -> None:
    page = await run(index, "study", {"PatientName": value, "fuzzymatching": "true"})
    assert uids(page) == study_uids(PatientName=NAMES[who])
    assert all(r["PatientName"] == NAMES[who] for r in page.rows)


async def test_fuzzy_needs_every_term_and_is_off_by_default(index: SqlIndex) -> None:
    assert uids(await run(index, "study", {"PatientName": "zhang xiao",
                                           "fuzzymatching": "true"})) == set()
    assert uids(await run(index, "study", {"PatientName": "zhang"})) == set()
    both = await run(index, "study", {"PatientName": "zhang", "fuzzymatching": "true",
                                      "PatientID": headers()[0].patient.PatientID})
    assert uids(both) == study_uids(PatientID=headers()[0].patient.PatientID)


# ------------------------------------------------------------------ series level


async def test_series_of_a_study_and_all_series(index: SqlIndex) -> None:
    h = headers()[0]
    study = h.study.StudyInstanceUID
    page = await run(index, "series", {}, study_uid=study)
    expected = {x.series.SeriesInstanceUID for x in headers()
                if x.study.StudyInstanceUID == study}
    assert uids(page, "SeriesInstanceUID") == expected and len(page.rows) == 2
    assert [r["SeriesNumber"] for r in page.rows] == [1, 2]
    row = page.rows[0]
    assert row["NumberOfSeriesRelatedInstances"] == 2
    assert row["StudyInstanceUID"] == study and "PatientName" not in row
    for keyword, value, key in [("Modality", "MR", "Modality"),
                                ("SeriesNumber", "2", "SeriesNumber"),
                                ("SeriesInstanceUID", h.series.SeriesInstanceUID, None)]:
        page = await run(index, "series", {keyword: value})
        expected = {x.series.SeriesInstanceUID for x in headers()
                    if str(dataclasses.asdict(x.series)[key or keyword]) == value}
        assert expected and uids(page, "SeriesInstanceUID") == expected, keyword
        assert "PatientName" in page.rows[0]  # All Series carries the study attributes
    # Study-level keys narrow All Series.
    page = await run(index, "series", {"PatientID": h.patient.PatientID, "Modality": "*"})
    assert {r["StudyInstanceUID"] for r in page.rows} == study_uids(PatientID=h.patient.PatientID)


async def test_series_performed_procedure_step_and_request_attributes(index: SqlIndex) -> None:
    async with index.engine.connect() as conn:
        ordered = [r[0] for r in (await conn.execute(
            sa.select(series.c.SeriesInstanceUID).order_by(series.c.id))).all()]
    page = await run(index, "series", {"PerformedProcedureStepStartDate": "20250101-20251231"})
    assert uids(page, "SeriesInstanceUID") == set(ordered[:2])
    assert page.rows[0]["PerformedProcedureStepStartTime"] == "081500"
    page = await run(index, "series", {"PerformedProcedureStepStartTime": "0800-0830"})
    assert uids(page, "SeriesInstanceUID") == set(ordered[:2])
    page = await run(index, "series",
                     {"RequestAttributeSequence.ScheduledProcedureStepID": "SPS-2"})
    assert uids(page, "SeriesInstanceUID") == {ordered[0]}
    assert page.rows[0]["RequestAttributesSequence"] == [
        {"ScheduledProcedureStepID": "SPS-1", "RequestedProcedureID": "RP-1"},
        {"ScheduledProcedureStepID": "SPS-2", "RequestedProcedureID": "RP-1"}]
    page = await run(index, "series", {"00400275.00401001": "RP-*"})
    assert uids(page, "SeriesInstanceUID") == {ordered[0], ordered[2]}
    page = await run(index, "series", {"RequestAttributesSequence.RequestedProcedureID": "RP-9"})
    assert [r["RequestAttributesSequence"] for r in page.rows] == [
        [{"ScheduledProcedureStepID": "SPS-3", "RequestedProcedureID": "RP-9"}]]


# ------------------------------------------------------------------ instance level


async def test_instance_resources_and_keys(index: SqlIndex) -> None:
    h = headers()[0]
    study, ser = h.study.StudyInstanceUID, h.series.SeriesInstanceUID
    page = await run(index, "instance", {}, study_uid=study, series_uid=ser)
    # Two instances, though the first one has two objects (a replica).
    assert uids(page, "SOPInstanceUID") == {x.instance.SOPInstanceUID for x in headers()
                                            if x.series.SeriesInstanceUID == ser}
    assert len(page.rows) == 2
    assert [r["InstanceNumber"] for r in page.rows] == [1, 2]
    row = page.rows[0]
    assert (row["Rows"], row["Columns"], row["InstanceAvailability"]) == (16, 16, "ONLINE")
    assert "Modality" not in row and "PatientName" not in row
    page = await run(index, "instance", {"Modality": h.series.Modality}, study_uid=study)
    assert len(page.rows) == 4 and page.rows[0]["Modality"] == h.series.Modality
    assert "PatientName" not in page.rows[0]
    page = await run(index, "instance", {})
    assert len(page.rows) == 32 and len(uids(page, "SOPInstanceUID")) == 32
    assert "PatientName" in page.rows[0] and "Modality" in page.rows[0]
    sops = sorted(uids(page, "SOPInstanceUID"))
    for params, expected in [
        ({"SOPInstanceUID": ",".join(sops[:2])}, set(sops[:2])),
        ({"SOPInstanceUID": h.instance.SOPInstanceUID}, {h.instance.SOPInstanceUID}),
        ({"SOPClassUID": h.instance.SOPClassUID},
         {x.instance.SOPInstanceUID for x in headers()
          if x.instance.SOPClassUID == h.instance.SOPClassUID}),
        ({"InstanceNumber": "2"},
         {x.instance.SOPInstanceUID for x in headers() if x.instance.InstanceNumber == 2}),
        ({"PatientName": "smith", "fuzzymatching": "true"},
         {x.instance.SOPInstanceUID for x in headers() if x.patient.PatientName == NAMES[3]}),
    ]:
        got = await run(index, "instance", params)
        assert expected and uids(got, "SOPInstanceUID") == expected, params


# ------------------------------------------------------------------ includefield, paging


async def test_includefield_and_all(index: SqlIndex) -> None:
    params = MultiDict([("includefield", "StudyDescription"), ("includefield", "00080080")])
    page = await run(index, "study", params)
    row = page.rows[0]
    assert row["StudyDescription"] and row["InstitutionName"]
    page = await run(index, "study", {"includefield": "all"})
    assert {"StudyDescription", "IssuerOfPatientID", "InstitutionName"} <= set(page.rows[0])
    assert "Modality" not in page.rows[0]
    h = headers()[0]
    page = await run(index, "instance", {"includefield": "all"},
                     study_uid=h.study.StudyInstanceUID, series_uid=h.series.SeriesInstanceUID)
    assert page.rows[0]["AvailableTransferSyntaxUID"] == h.instance.TransferSyntaxUID
    assert page.rows[0]["BodyPartExamined"] == h.series.BodyPartExamined
    out = to_dicom_json("instance", page.rows, includefield=set(), retrieve_base="https://gw")
    assert out[0]["00081190"]["Value"][0].startswith(
        f"https://gw/studies/{h.study.StudyInstanceUID}/series/")


async def test_limit_offset_and_the_cut_warning(index: SqlIndex) -> None:
    whole = [r["StudyInstanceUID"] for r in (await run(index, "study", {})).rows]
    pages = []
    for offset in range(0, 8, 3):
        page = await run(index, "study", {"limit": "3", "offset": str(offset)})
        pages.extend(r["StudyInstanceUID"] for r in page.rows)
        assert page.more == (offset + 3 < 8)
        assert any("additional results" in w for w in page.warnings) == page.more
    assert pages == whole
    page = await run(index, "study", {"limit": "3", "offset": "2"}, count_cap=100)
    assert page.remaining == 3
    assert "There are 3 additional results that can be requested" in page.warnings
    page = await run(index, "study", {"limit": "3"}, count_cap=2)
    assert page.more and page.remaining is None
    assert "There are additional results that can be requested" in page.warnings
    assert (await run(index, "study", {"offset": "8"})).rows == []
    # The server's maximum caps the client's limit, with a warning.
    page = await run(index, "study", {"limit": "50"}, max_results=5)
    assert len(page.rows) == 5 and page.more
    assert any("exceeds the maximum of 5" in w for w in page.warnings)
    page = await run(index, "study", {}, max_results=5)
    assert len(page.rows) == 5 and page.more
    assert not any("exceeds" in w for w in page.warnings)


async def test_unsupported_keys_are_ignored_with_their_warning(index: SqlIndex) -> None:
    page = await run(index, "study", {"PatientAge": "030Y"})
    assert uids(page) == study_uids()
    assert any("PatientAge" in w for w in page.warnings)


# ------------------------------------------------------------------ visibility


def hospital_of(i: int) -> str:
    code = headers()[i].study.institution_code
    assert code
    return str(code)


async def test_visible_filters_every_level(index: SqlIndex) -> None:
    mine = hospital_of(0)
    visible = studies.c.institution_code == mine
    shown = study_uids(institution_code=mine)
    hidden = study_uids() - shown
    assert shown and hidden
    assert uids(await run(index, "study", {}, visible=visible)) == shown
    # Naming hidden studies, by UID list or wildcard, finds nothing more.
    page = await run(index, "study", {"StudyInstanceUID": ",".join(sorted(study_uids()))},
                     visible=visible)
    assert uids(page) == shown
    assert uids(await run(index, "study", {"PatientName": "*"}, visible=visible)) == shown
    assert uids(await run(index, "study", {"AccessionNumber": "*"}, visible=visible)) == shown
    page = await run(index, "study", {"PatientName": "z", "fuzzymatching": "true"},
                     visible=visible)
    assert uids(page) <= shown
    # Series and instances, through every resource.
    page = await run(index, "series", {}, visible=visible)
    assert {r["StudyInstanceUID"] for r in page.rows} == shown
    page = await run(index, "instance", {}, visible=visible)
    assert {r["StudyInstanceUID"] for r in page.rows} == shown
    for study in hidden:
        assert (await run(index, "series", {}, study_uid=study, visible=visible)).rows == []
        assert (await run(index, "instance", {}, study_uid=study, visible=visible)).rows == []
        ser = next(h.series.SeriesInstanceUID for h in headers()
                   if h.study.StudyInstanceUID == study)
        page = await run(index, "instance", {}, study_uid=study, series_uid=ser, visible=visible)
        assert page.rows == []
        page = await run(index, "instance", {"StudyInstanceUID": study}, visible=visible)
        assert page.rows == []
    # Counts are of the visible study's own series and instances.
    page = await run(index, "study", {}, visible=visible)
    assert all(r["NumberOfStudyRelatedInstances"] == 4 for r in page.rows)
    assert all(r.study_instance_uid in shown for r in page.results)


async def test_visible_with_a_correlated_patient_condition(index: SqlIndex) -> None:
    women = sa.exists(sa.select(sa.literal(1)).where(patients.c.id == studies.c.patient_id,
                                                     patients.c.PatientSex == "F"))
    expected = study_uids(PatientSex="F")
    assert uids(await run(index, "study", {}, visible=women)) == expected
    page = await run(index, "instance", {"InstanceNumber": "1"}, visible=women)
    assert {r["StudyInstanceUID"] for r in page.rows} == expected
    assert (await run(index, "study", {}, visible=sa.false())).rows == []


# ------------------------------------------------------------------ limits and errors


# A visible condition that costs seconds whatever the data: counting to ten million.
SLOW = sa.literal_column(
    "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) "
    "SELECT count(*) FROM c)"
) > 0
# Far beyond the 2 s default budget on any machine (SLOW can finish in ~2 s on a fast one).
SLOWER = sa.literal_column(
    "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500000000) "
    "SELECT count(*) FROM c)"
) > 0


async def test_too_broad_is_refused_and_the_connection_recovers(index: SqlIndex) -> None:
    with pytest.raises(QueryTooBroad) as info:
        await run(index, "study", {}, visible=SLOW, time_budget=0.2)
    assert info.value.status == 413
    # The pooled connections carry no leftover deadline.
    for _ in range(4):
        assert len((await run(index, "study", {})).rows) == 8


async def test_time_budget_without_the_connect_listener(index: SqlIndex) -> None:
    """An engine made without ``install_time_budget`` still gets the budget (per search)."""
    engine = create_async_engine(index.engine.url)
    try:
        with pytest.raises(QueryTooBroad):
            q = parse_qido("study", {})
            await search(engine, q, visible=SLOW, max_results=100, time_budget=0.2)
        assert len((await search(engine, parse_qido("study", {}), visible=sa.true(),
                                 max_results=100)).rows) == 8
    finally:
        await engine.dispose()


async def test_the_search_engine_enforces_the_default_budget_in_its_sessions(
    index: SqlIndex,
) -> None:
    """Searches on ``search_engine`` (the gate's) get the default budget with no statement
    of their own for it: on PostgreSQL the session's statement_timeout does it."""
    statements: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split()[0].upper())

    sa.event.listen(index.search_engine.sync_engine, "before_cursor_execute", note)
    try:
        with pytest.raises(QueryTooBroad):
            await search(index.search_engine, parse_qido("study", {}), visible=SLOWER,
                         max_results=100)
    finally:
        sa.event.remove(index.search_engine.sync_engine, "before_cursor_execute", note)
    assert statements == ["SELECT"]
    assert len((await search(index.search_engine, parse_qido("study", {}), visible=sa.true(),
                             max_results=100)).rows) == 8


async def test_bad_parameters(index: SqlIndex) -> None:
    with pytest.raises(InvalidQuery, match="StudyDate"):
        await run(index, "study", {"StudyDate": "2025-13-01"})
    with pytest.raises(InvalidQuery, match="limit"):
        await run(index, "study", {"limit": "0"})


async def test_refresh_follows_deletions(index: SqlIndex) -> None:
    """Derived counts and name keys follow the index when objects go away."""
    objs = corpus()
    study = objs[0].header.study.StudyInstanceUID
    gone = [o.key for o in objs if o.header.study.StudyInstanceUID == study
            and o.header.series.SeriesInstanceUID == objs[0].header.series.SeriesInstanceUID]
    async with index.engine.connect() as conn:
        study_id = (await conn.execute(sa.select(studies.c.id).where(
            studies.c.StudyInstanceUID == study))).scalar_one()
    job = await index.create_job("s1", "incremental")
    await index.apply_page(store="s1", province="110000", job_id=job.id, indexed=[],
                           quarantined=[], deleted=gone, cursor=None, counters={})
    async with index.engine.begin() as conn:
        await refresh_derived(conn, [study_id])
    (row,) = (await run(index, "study", {"StudyInstanceUID": study})).rows
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 2)


async def test_refresh_writes_only_what_changed(index: SqlIndex) -> None:
    """A refresh of up-to-date studies writes nothing (on PostgreSQL an update of an
    unchanged row still writes a new row version and, in a full page, index entries),
    also after a series went away (the page that removed it refreshed its study), and
    the counts follow."""
    async with index.engine.connect() as conn:
        ids = list((await conn.execute(sa.select(studies.c.id))).scalars())
    writes: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.split()[0].upper() in ("UPDATE", "INSERT", "DELETE"):
            writes.append(statement)

    sa.event.listen(index.engine.sync_engine, "before_cursor_execute", note)
    try:
        async with index.engine.begin() as conn:
            await refresh_derived(conn, ids)
        assert writes == []
        objs = corpus()
        first = objs[0].header
        gone = [o.key for o in objs
                if o.header.series.SeriesInstanceUID == first.series.SeriesInstanceUID]
        job = await index.create_job("s1", "incremental")
        await index.apply_page(store="s1", province="110000", job_id=job.id, indexed=[],
                               quarantined=[], deleted=gone, cursor=None, counters={})
        writes.clear()
        async with index.engine.begin() as conn:
            await refresh_derived(conn, ids)
        assert writes == []  # apply_page refreshed its study already
    finally:
        sa.event.remove(index.engine.sync_engine, "before_cursor_execute", note)
    (row,) = (await run(index, "study", {"StudyInstanceUID": first.study.StudyInstanceUID})).rows
    assert (row["NumberOfStudyRelatedSeries"], row["NumberOfStudyRelatedInstances"]) == (1, 2)


@pytest.mark.parametrize("index", ["postgres"], indirect=True)
async def test_postgres_sessions_plan_for_an_index_in_memory(index: SqlIndex) -> None:
    """Both engines' sessions run without JIT (compiling a costly-looking plan took longer
    than the statements) and with random_page_cost 1.1 (index lookups over scans)."""
    for engine in (index.engine, index.search_engine):
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SHOW jit"))).scalar_one() == "off"
            assert (await conn.execute(sa.text("SHOW random_page_cost"))).scalar_one() == "1.1"
    async with index.search_engine.connect() as conn:
        # The search time budget is still the session's.
        assert (await conn.execute(sa.text("SHOW statement_timeout"))).scalar_one() == "2s"


async def test_migration_0003_backfills_and_downgrades(index: SqlIndex) -> None:
    """Down to 0002 and up again: the derived data of already indexed studies comes back."""
    from alembic import command
    from alembic.config import Config

    from imaging_gateway.index.schema import patient_name_keys
    from imaging_gateway.index.sql import MIGRATIONS

    async def keys_and_counts() -> tuple[int, list[Any]]:
        async with index.engine.connect() as conn:
            n = (await conn.execute(
                sa.select(sa.func.count()).select_from(patient_name_keys))).scalar_one()
            rows = (await conn.execute(sa.select(
                studies.c.StudyInstanceUID, studies.c.ModalitiesInStudy,
                studies.c.NumberOfStudyRelatedSeries, studies.c.NumberOfStudyRelatedInstances,
            ).order_by(studies.c.StudyInstanceUID))).all()
        return int(n), [tuple(r) for r in rows]

    before = await keys_and_counts()
    assert before[0] > 0

    def to(revision: str) -> Any:
        def step(sync_conn: Any) -> None:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = sync_conn
            if revision == "head":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
        return step

    async with index.engine.begin() as conn:
        await conn.run_sync(to("0002"))
        cols = await conn.run_sync(
            lambda c: {col["name"] for col in sa.inspect(c).get_columns("studies")})
        assert "ModalitiesInStudy" not in cols
    async with index.engine.begin() as conn:
        await conn.run_sync(to("head"))
    assert await keys_and_counts() == before
    page = await run(index, "study", {"PatientName": "zs", "fuzzymatching": "true"})
    assert uids(page) == study_uids(PatientName=NAMES[0])


async def test_one_statement_per_shape_whatever_the_values(index: SqlIndex) -> None:
    """Searches of one shape reuse one statement and still answer each its own values;
    another visibility condition never reuses a statement built with the first."""
    from imaging_gateway.index import qido

    people = list(dict.fromkeys(h.patient.PatientID for h in headers()))
    statements = set()
    for pid in people:
        page = await run(index, "study", {"PatientID": pid})
        assert uids(page) == study_uids(PatientID=pid)
        statements.add(id(qido._STATEMENTS[next(reversed(qido._STATEMENTS))][1]))
    assert len(statements) == 1
    first_study = sorted(study_uids())[0]
    only_first = studies.c.StudyInstanceUID == first_study
    owner = next(h.patient.PatientID for h in headers()
                 if h.study.StudyInstanceUID == first_study)
    for pid in people:
        page = await run(index, "study", {"PatientID": pid}, visible=only_first)
        assert uids(page) == ({first_study} if pid == owner else set())
