"""bench/qido.py: QIDO-RS study search latency through a real gateway, vs a bare endpoint.

Prints one JSON line. For each size (``--sizes``, instances) it builds a study index on each
backend (``--backends sqlite,postgres``) directly with SQLAlchemy Core bulk inserts into
the migrated schema (no DICOM parsing: realistic rows, ~24 instances per series, ~3 series
per study, eight hospitals of one province, Chinese names written three ways and Latin
names, national identity numbers, study dates over three years, consent grants and
break-glass windows), fills the derived QIDO data with the index's own
``refresh_derived`` (PostgreSQL then gets the ``ANALYZE`` autovacuum would run), then
starts ``imaging-gateway serve`` on it and times study searches over HTTP with a hospital
token, one request in flight, each audited as in production:

- ``patient_id``     PatientID=<exact> (80 % the hospital's own patients)
- ``name_zh``        PatientName=<full Chinese name>&fuzzymatching=true
- ``name_pinyin``    PatientName=<pinyin, e.g. "zhang weiming">&fuzzymatching=true
- ``date_modality``  StudyDate=<7-day range>&ModalitiesInStudy=<CT|MR|DX|US>
- ``accession``      AccessionNumber=<exact> (80 % the hospital's own studies)
- ``page50``         limit=50 (the newest studies the hospital may see)

The limit it is read against is measured in the same run on the same SQLite file and the
same requests: a bare aiohttp app (``--bare-server``, its own process) answering the
hospital's own studies with one hand-written indexed query on stdlib ``sqlite3`` and
building the same DICOM JSON (no token, no consent check, no audit record).
Rounds alternate the targets so that they share the machine's drift; percentiles pool
the rounds (nearest rank).

The concurrent phase (``--clients 1,2,4,8``) then runs, per number of clients, that many
clients at once against each target, each client on its own keep-alive connection sending
``--client-searches`` searches of the same mix one after another, over real HTTP: it prints
searches/s (all searches over the phase's wall time), p50/p99 and the serving process's CPU
time per search per number of clients, and
whether 8 clients get at least the one-client rate with p99 < 25 ms (``concurrent_goal``).
``--baseline-tree DIR`` (a checkout of another commit, e.g. ``git archive main | tar -x -C
DIR``) adds that commit's gateway on the same index and token as ``old_gateway_<backend>``,
so old and new are measured side by side in the same rounds. Before the gateways start,
the audit log gets ``--audit-records`` records (default 20,000) and, on PostgreSQL, its
statistics: as in service, and so that neither gateway gets the plans PostgreSQL caches
for a still tiny table (``seed_audit_log``).

    .venv/bin/python bench/qido.py --sizes 100000 --backends sqlite   # ~1 min
    .venv/bin/python bench/qido.py --sizes 100000 --phases concurrent  # ~2 min
    .venv/bin/python bench/qido.py        # 100k and 1M, both backends: ~3 min (1M builds:
                                          # ~40 s SQLite, ~60 s PostgreSQL)

PostgreSQL at 127.0.0.1:5432 (trust auth; ``IG_TEST_POSTGRES`` names another admin DSN):
each index is a new database ``bench_qido_<pid>_<random>``, dropped at the end.

A 10M index takes ~10-20 min to build per backend; ``--keep DIR`` builds each index once
and reuses it (SQLite files and the corpus in DIR, PostgreSQL databases
``bench_qido_keep_<size>_<seed>``; drop them yourself), ``--rederive`` clears and times
the derived-data fill again on a kept index:

    .venv/bin/python bench/qido.py --sizes 10000000 --backends postgres,sqlite --keep /tmp/qido
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import pickle
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import sqlalchemy as sa
from aiohttp import web
from pypinyin import Style, lazy_pinyin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PG_ADMIN_DSN,
    create_pg_database,
    database_url,
    drop_pg_database,
    free_port,
    issue_token,
    start_gateway,
    summarize_ms,
    wait_healthy,
)
from imaging_gateway.dicom.national_id import resident_id_check_char
from imaging_gateway.index.qido import refresh_derived
from imaging_gateway.index.schema import (
    break_glass,
    consents,
    instances,
    patient_name_keys,
    patients,
    series,
    studies,
)
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import AuditEvent, AuditLog, load_or_create_chain_key
from imaging_gateway.settings import IndexSettings, load_settings

GOAL = {"at_instances": 1_000_000, "p50_ms": 5.0, "p99_ms": 25.0}
CONCURRENT_GOAL = {"clients": 8, "vs_clients": 1, "p99_ms": 25.0}
"""With 8 clients at once: at least the one-client rate, and p99 below 25 ms."""
QUERY_TYPES = ("patient_id", "name_zh", "name_pinyin", "date_modality", "accession", "page50")
PROVINCE = "110000"
END_DATE = date(2026, 6, 30)
NOW = datetime(2026, 7, 1, tzinfo=UTC)
"""Consent validity is set around the real clock; this is only the rows' indexed_at."""
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
BATCH_INSTANCES = 20_000

# (code, name, share of studies). The token's hospital is a mid-sized one: its own
# studies are 15 % of the index, so a page of them is not simply the newest rows.
HOSPITALS = (
    ("H11010200031", "北京大学人民医院", 0.30),
    ("H11010100013", "北京协和医院", 0.20),
    ("H11010800028", "北京大学第三医院", 0.15),
    ("H11010500042", "中日友好医院", 0.12),
    ("H11010200057", "首都医科大学宣武医院", 0.10),
    ("H11010600015", "首都医科大学附属北京天坛医院", 0.07),
    ("H11011400009", "北京市昌平区医院", 0.04),
    ("H11011500023", "北京市大兴区人民医院", 0.02),
)
TOKEN_HOSPITAL = "H11010800028"

# Surnames with rough frequencies (percent of the population), two-character ones rare.
SURNAMES = (
    ("王", 7.1), ("李", 7.0), ("张", 6.7), ("刘", 5.4), ("陈", 4.5), ("杨", 3.1),
    ("黄", 2.2), ("赵", 2.0), ("吴", 2.0), ("周", 1.9), ("徐", 1.6), ("孙", 1.5),
    ("马", 1.4), ("朱", 1.3), ("胡", 1.3), ("郭", 1.2), ("何", 1.2), ("高", 1.1),
    ("林", 1.1), ("罗", 0.9), ("郑", 0.9), ("梁", 0.9), ("谢", 0.8), ("宋", 0.7),
    ("唐", 0.7), ("许", 0.7), ("韩", 0.6), ("冯", 0.6), ("邓", 0.6), ("曹", 0.6),
    ("彭", 0.6), ("曾", 0.5), ("肖", 0.5), ("田", 0.5), ("董", 0.5), ("袁", 0.5),
    ("潘", 0.4), ("于", 0.4), ("蒋", 0.4), ("蔡", 0.4), ("余", 0.4), ("杜", 0.4),
    ("叶", 0.4), ("程", 0.4), ("苏", 0.3), ("魏", 0.3), ("吕", 0.3), ("丁", 0.3),
    ("任", 0.3), ("沈", 0.3), ("姚", 0.3), ("卢", 0.3), ("姜", 0.3), ("崔", 0.3),
    ("钟", 0.3), ("谭", 0.3), ("陆", 0.3), ("汪", 0.3), ("范", 0.3), ("金", 0.3),
    ("欧阳", 0.05), ("司马", 0.02), ("诸葛", 0.01),
)  # fmt: skip
GIVEN = (
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红建国文辉力鹏飞俊斌宇浩然"
    "凯欣怡婷雪梅琳晨阳子轩涵博思雨嘉佳亮海波志东小立新春晓云燕慧颖成龙峰鑫宁蕾倩瑞琪"
)
LATIN = (
    ("Smith", "John"), ("Müller", "Jürgen"), ("García", "José"), ("Ivanova", "Anna"),
    ("Dubois", "Chloé"), ("Kim", "Minji"), ("Tanaka", "Hiroshi"), ("Brown", "Emily"),
    ("Nguyen", "Linh"), ("Petrov", "Sergei"), ("Rossi", "Marco"), ("Silva", "Ana"),
    ("Johnson", "Michael"), ("Park", "Jiwoo"), ("Sato", "Yuki"), ("Khan", "Ayesha"),
)  # fmt: skip
DOCTORS = ("Li^JianHua=李^建华", "Chen^Jing=陈^静", "Zhang^Wei=张^伟", "Liu^Yang=刘^洋",
           "Wang^Min=王^敏", "Zhao^Lei=赵^磊")  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Modality:
    share: float
    sop_class: str
    rows: int
    columns: int
    size: int
    series: tuple[int, int]
    per_series: tuple[int, int]
    studies: tuple[tuple[str, str, tuple[str, ...]], ...]
    """(body part, study description, series descriptions)."""


MODALITIES = {
    "CT": _Modality(0.45, "1.2.840.10008.5.1.4.1.1.2", 512, 512, 526_000, (2, 4), (20, 45), (
        ("CHEST", "胸部CT平扫", ("胸部平扫 5mm", "肺窗 1.25mm", "纵隔窗 5mm", "冠状位重建")),
        ("HEAD", "头颅CT平扫", ("头颅平扫 5mm", "骨窗 1mm", "矢状位重建", "冠状位重建")),
        ("ABDOMEN", "腹部CT增强", ("平扫", "动脉期 1.25mm", "门脉期 5mm", "延迟期")),
    )),
    "MR": _Modality(0.25, "1.2.840.10008.5.1.4.1.1.4", 256, 256, 133_000, (3, 6), (12, 30), (
        ("HEAD", "头颅MR平扫", ("T1 轴位", "T2 轴位", "FLAIR 轴位", "DWI", "T2 矢状位", "SWI")),
        ("LSPINE", "腰椎MR平扫", ("T1 矢状位", "T2 矢状位", "T2 轴位", "STIR", "T1 轴位",
                                "T2 冠状位")),
        ("KNEE", "膝关节MR平扫", ("PD 冠状位", "T1 矢状位", "T2 矢状位", "PD 轴位", "T1 冠状位",
                              "T2 轴位")),
    )),
    "DX": _Modality(0.20, "1.2.840.10008.5.1.4.1.1.1.1", 2048, 2048, 8_390_000, (1, 2), (1, 1), (
        ("CHEST", "胸部正侧位", ("胸部 后前位", "胸部 侧位")),
    )),
    "US": _Modality(0.10, "1.2.840.10008.5.1.4.1.1.6.1", 600, 800, 1_440_000, (1, 1), (5, 20), (
        ("ABDOMEN", "腹部超声", ("肝胆胰脾",)),
        ("THYROID", "甲状腺超声", ("甲状腺",)),
    )),
}  # fmt: skip


# ---------------------------------------------------------------------- data


@dataclass(slots=True)
class _Person:
    national_id: str | None
    name: str
    zh: str | None
    pinyin: str | None
    sex: str
    birth: str
    home: int
    patient_ids: dict[int, int] = field(default_factory=dict)
    """hospital index -> patients.id of this person's record there."""


@dataclass(slots=True)
class Corpus:
    """What was built, and the values the searches pick from."""

    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    consents: int = 0
    token_studies: int = 0
    own_patient_ids: list[str] = field(default_factory=list)
    other_patient_ids: list[str] = field(default_factory=list)
    own_accessions: list[str] = field(default_factory=list)
    other_accessions: list[str] = field(default_factory=list)
    names_zh: list[str] = field(default_factory=list)
    names_pinyin: list[str] = field(default_factory=list)


def _weighted(rng: random.Random, items: list[Any], weights: list[float]) -> Any:
    return rng.choices(items, weights)[0]


def _person(rng: random.Random, hospital_code: str) -> _Person:
    sex = rng.choice("MF")
    age_days = rng.randrange(2 * 365, 90 * 365)
    birth = END_DATE - timedelta(days=age_days)
    national_id: str | None = None
    if rng.random() < 0.95:
        sequence = rng.randrange(1, 500) * 2 - (1 if sex == "M" else 0)
        first17 = f"{hospital_code[1:7]}{birth:%Y%m%d}{sequence:03d}"
        national_id = first17 + resident_id_check_char(first17)
    if rng.random() < 0.8:
        surname = _weighted(rng, [s for s, _ in SURNAMES], [w for _, w in SURNAMES])
        given = "".join(rng.choice(GIVEN) for _ in range(1 if rng.random() < 0.35 else 2))
        family_py = "".join(lazy_pinyin(surname, style=Style.NORMAL))
        given_py = "".join(lazy_pinyin(given, style=Style.NORMAL))
        style = rng.random()
        if style < 0.6:  # alphabetic and ideographic groups
            name = f"{family_py.capitalize()}^{given_py.capitalize()}={surname}^{given}"
        elif style < 0.9:  # Chinese characters only, as many PACS write it
            name = surname + given
        else:  # upper case pinyin, given name syllables spaced
            spaced = " ".join(lazy_pinyin(given, style=Style.NORMAL)).upper()
            name = f"{family_py.upper()}^{spaced}={surname}^{given}"
        return _Person(
            national_id, name, surname + given, f"{family_py} {given_py}", sex, f"{birth:%Y%m%d}", 0
        )
    family, given_latin = rng.choice(LATIN)
    return _Person(national_id, f"{family}^{given_latin}", None, None, sex, f"{birth:%Y%m%d}", 0)


def generate(n_instances: int, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of an index of about ``n_instances`` instances, as (table, row), parents first.

    The last item is ("corpus", {"corpus": Corpus}) with the counts and query values.
    """
    rng = random.Random(seed)
    corpus = Corpus()
    codes = [h[0] for h in HOSPITALS]
    shares = [h[2] for h in HOSPITALS]
    modality_names = list(MODALITIES)
    modality_shares = [m.share for m in MODALITIES.values()]
    token_index = codes.index(TOKEN_HOSPITAL)
    per_hospital_patients = [0] * len(HOSPITALS)
    patient_id_of: dict[int, str] = {}
    people: list[_Person] = []
    study_no = series_no = instance_no = 0
    indexed_at = NOW - timedelta(days=1)
    while corpus.instances < n_instances:
        home = rng.choices(range(len(HOSPITALS)), shares)[0]
        person = _person(rng, codes[home])
        person.home = home
        people.append(person)
        n_studies = 1
        while rng.random() < 0.45 and n_studies < 8:
            n_studies += 1
        for k in range(n_studies):
            h = home if k == 0 or rng.random() < 0.7 else rng.choices(range(len(codes)), shares)[0]
            code = codes[h]
            if h not in person.patient_ids:
                corpus.patients += 1
                pid = corpus.patients
                per_hospital_patients[h] += 1
                local = f"{h + 1:02d}{per_hospital_patients[h] * 7919 % 10**8:08d}"
                person.patient_ids[h] = pid
                patient_id_of[pid] = local
                (corpus.own_patient_ids if h == token_index else corpus.other_patient_ids).append(
                    local
                )
                yield (
                    "patients",
                    {
                        "id": pid,
                        "patient_key": f"{code}|{local}",
                        "PatientID": local,
                        "IssuerOfPatientID": code,
                        "PatientName": person.name,
                        "PatientBirthDate": person.birth,
                        "PatientSex": person.sex,
                        "national_id": person.national_id,
                    },
                )
            modality = rng.choices(modality_names, modality_shares)[0]
            spec = MODALITIES[modality]
            body_part, study_desc, series_descs = rng.choice(spec.studies)
            day = END_DATE - timedelta(days=rng.randrange(3 * 365))
            study_no += 1
            study_uid = f"{UID_ROOT}.1.{seed}.{study_no}"
            accession = f"A{day:%y%m%d}{h}{study_no:07d}"
            (corpus.own_accessions if h == token_index else corpus.other_accessions).append(
                accession
            )
            if h == token_index:
                corpus.token_studies += 1
            yield (
                "studies",
                {
                    "id": study_no,
                    "StudyInstanceUID": study_uid,
                    "patient_id": person.patient_ids[h],
                    "StudyDate": f"{day:%Y%m%d}",
                    "StudyTime": f"{rng.randrange(7, 21):02d}{rng.randrange(60):02d}"
                    f"{rng.randrange(60):02d}",
                    "AccessionNumber": accession,
                    "StudyID": str(1000 + study_no % 9000),
                    "StudyDescription": study_desc,
                    "ReferringPhysicianName": rng.choice(DOCTORS),
                    "InstitutionName": HOSPITALS[h][1],
                    "institution_code": code,
                    "province": PROVINCE,
                    "hospital": code,
                },
            )
            corpus.studies += 1
            for s in range(rng.randint(*spec.series)):
                series_no += 1
                series_uid = f"{UID_ROOT}.2.{seed}.{study_no}.{s + 1}"
                yield (
                    "series",
                    {
                        "id": series_no,
                        "SeriesInstanceUID": series_uid,
                        "study_id": study_no,
                        "Modality": modality,
                        "SeriesNumber": s + 1,
                        "SeriesDescription": series_descs[s % len(series_descs)],
                        "BodyPartExamined": body_part,
                        "SeriesDate": f"{day:%Y%m%d}",
                    },
                )
                corpus.series += 1
                for i in range(rng.randint(*spec.per_series)):
                    instance_no += 1
                    sop = f"{UID_ROOT}.3.{seed}.{study_no}.{s + 1}.{i + 1}"
                    key = f"{code}/{day:%Y/%m/%d}/{study_uid}/{series_uid}/{sop}.dcm"
                    digest = hashlib.sha256(key.encode()).hexdigest()
                    yield (
                        "instances",
                        {
                            "id": instance_no,
                            "SOPInstanceUID": sop,
                            "series_id": series_no,
                            "SOPClassUID": spec.sop_class,
                            "InstanceNumber": i + 1,
                            "TransferSyntaxUID": "1.2.840.10008.1.2.1",
                            "Rows": spec.rows,
                            "Columns": spec.columns,
                            "NumberOfFrames": None,
                            "SpecificCharacterSet": "ISO_IR 192",
                            "store": f"pacs-{h + 1}",
                            "key": key,
                            "etag": digest[:32],
                            "size": spec.size + rng.randrange(4096),
                            "last_modified": indexed_at,
                            "header_sha256": digest,
                            "header_bytes": 1800 + rng.randrange(400),
                            "province": PROVINCE,
                            "indexed_at": indexed_at,
                            "seen_job": None,
                        },
                    )
                    corpus.instances += 1
    # Consent grants: a fifth of the people with a national identity hold one, to some
    # hospital (the token's among them); some scoped to studies, revoked or expired.
    now = datetime.now(UTC)
    for person in people:
        if person.national_id is None or rng.random() >= 0.2:
            continue
        grantee = rng.choices(codes, shares)[0]
        state = rng.random()
        valid_from = now - timedelta(days=rng.randrange(1, 200))
        valid_until = now + timedelta(days=rng.randrange(1, 165))
        revoked_at = None
        if state < 0.1:
            valid_until = now - timedelta(days=rng.randrange(1, 30))
        elif state < 0.2:
            revoked_at = now - timedelta(hours=rng.randrange(1, 500))
        scope = "all"
        if rng.random() < 0.3:
            own = [f"{UID_ROOT}.1.{seed}.{rng.randrange(1, study_no + 1)}" for _ in range(2)]
            scope = json.dumps(own)
        corpus.consents += 1
        yield (
            "consents",
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "national_id": person.national_id,
                "grantee_hospital": grantee,
                "grantee_clinician": None if rng.random() < 0.9 else "dr-wang",
                "purpose": rng.choice(("treatment", "referral", "second-opinion")),
                "scope": scope,
                "valid_from": valid_from,
                "valid_until": valid_until,
                "evidence": f"医保电子凭证授权 {rng.getrandbits(48):012x}",
                "created_by": "pacs",
                "created_at": valid_from,
                "revoked_at": revoked_at,
                "revoked_by": "patient" if revoked_at else None,
            },
        )
    for _ in range(20):
        person = rng.choice(people)
        pid = next(iter(person.patient_ids.values()))
        opened = now - timedelta(minutes=rng.randrange(1, 120))
        yield (
            "break_glass",
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "subject": "dr-li",
                "hospital": TOKEN_HOSPITAL,
                "patient_id": pid,
                "StudyInstanceUID": f"{UID_ROOT}.1.{seed}.1",
                "reason": "急诊抢救",
                "opened_at": opened,
                "expires_at": opened + timedelta(minutes=30),
            },
        )
    corpus.names_zh = [p.zh for p in people if p.zh]
    corpus.names_pinyin = [p.pinyin for p in people if p.pinyin]
    yield "corpus", {"corpus": corpus}


TABLES = {
    "patients": patients,
    "studies": studies,
    "series": series,
    "instances": instances,
    "consents": consents,
    "break_glass": break_glass,
}
FLUSH_ORDER = ("patients", "studies", "series", "instances", "consents", "break_glass")


async def build_index(url: str, n_instances: int, seed: int) -> tuple[Corpus, dict[str, float]]:
    """Migrate a new index at ``url`` and fill it; returns the corpus and phase timings."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = await SqlIndex.open(IndexSettings(url=url))
    corpus: Corpus | None = None
    try:
        engine = index.engine
        buffers: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}

        async def flush() -> None:
            async with engine.begin() as conn:
                for name in FLUSH_ORDER:
                    if buffers[name]:
                        await conn.execute(TABLES[name].insert(), buffers[name])
                        buffers[name].clear()

        for table, row in generate(n_instances, seed):
            if table == "corpus":
                corpus = row["corpus"]
                continue
            buffers[table].append(row)
            if len(buffers["instances"]) >= BATCH_INSTANCES:
                await flush()
        await flush()
        assert corpus is not None
        timings["insert_s"] = time.perf_counter() - t0
        if index.dialect == "postgresql":
            async with engine.begin() as conn:
                for table in ("patients", "studies", "series", "instances"):
                    await conn.execute(
                        sa.text(
                            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"(SELECT max(id) FROM {table}))"
                        )
                    )
    finally:
        await index.close()
    timings.update(await derive(url, corpus.studies))
    timings["total_s"] = time.perf_counter() - t0
    return corpus, {k: round(v, 1) for k, v in timings.items()}


async def derive(url: str, n_studies: int, *, reset: bool = False) -> dict[str, float]:
    """Fill the derived QIDO data of every study with the index's own ``refresh_derived``,
    2,000 studies a transaction (as sync pages do), then (PostgreSQL) ``VACUUM ANALYZE``.

    ``reset``: clear the derived data first (to time the refresh again on a kept index).
    """
    timings: dict[str, float] = {}
    index = await SqlIndex.open(IndexSettings(url=url))
    try:
        engine = index.engine
        if reset:
            async with engine.begin() as conn:
                await conn.execute(studies.update().values(
                    ModalitiesInStudy=None, NumberOfStudyRelatedSeries=None,
                    NumberOfStudyRelatedInstances=None))  # fmt: skip
                await conn.execute(series.update().values(NumberOfSeriesRelatedInstances=None))
                await conn.execute(patients.update().values(name_search=None))
                await conn.execute(patient_name_keys.delete())
            if index.dialect == "postgresql":
                await _vacuum_analyze(url)
        t1 = time.perf_counter()
        ids = list(range(1, n_studies + 1))
        for start in range(0, len(ids), 2000):
            async with engine.begin() as conn:
                await refresh_derived(conn, ids[start : start + 2000])
        timings["derive_s"] = time.perf_counter() - t1
        timings["derive_ms_per_study"] = timings["derive_s"] * 1000 / max(1, n_studies)
        if index.dialect == "postgresql":
            t2 = time.perf_counter()
            # What autovacuum does shortly after a bulk load: planner statistics.
            await _vacuum_analyze(url)
            timings["analyze_s"] = time.perf_counter() - t2
    finally:
        await index.close()
    return {k: round(v, 3 if k.endswith("per_study") else 1) for k, v in timings.items()}


async def _vacuum_analyze(url: str) -> None:
    raw = await asyncpg.connect(url)
    try:
        await raw.execute("VACUUM ANALYZE")
    finally:
        await raw.close()


async def kept_index(
    backend: str, url: str, keep: Path, n: int, seed: int, *, rederive: bool
) -> tuple[Corpus, dict[str, float], bool]:
    """The index of ``backend`` kept in ``keep`` (``--keep``): built once, then reused.

    A marker file written after a complete build says the index at ``url`` is usable;
    returns (corpus, timings, reused). ``rederive``: time the derived-data fill again.
    """
    marker = keep / f"built-{backend}-{n}-{seed}.pickle"
    if marker.exists():
        fields, timings = pickle.loads(marker.read_bytes())
        corpus = Corpus(**fields) if isinstance(fields, dict) else fields
        if rederive:
            again = await derive(url, corpus.studies, reset=True)
            timings = {**timings, **{f"re_{k}": v for k, v in again.items()}}
        return corpus, timings, True
    if backend == "postgres":
        await drop_pg_database(url)
        name = url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    else:
        await asyncio.to_thread(Path(url.removeprefix("sqlite:///")).unlink, missing_ok=True)
    corpus, timings = await build_index(url, n, seed)
    # The fields, not the class: this script runs as __main__.
    marker.write_bytes(pickle.dumps((dataclasses.asdict(corpus), timings)))
    return corpus, timings, False


async def seed_audit_log(config: Path, url: str, records: int) -> float:
    """Append ``records`` search records to the index's audit log under the chain key of
    the gateway configured in ``config`` (created here, as the gateway would); on
    PostgreSQL then ``VACUUM ANALYZE audit_log``. Returns the seconds it took.

    A gateway in service has a long, analyzed audit log. On an empty one the first
    gateway to search gets PostgreSQL plans for a tiny table cached in its connections
    (a sequential scan to check the chain's head) and keeps them while the log grows: in
    a side-by-side run the gateway warmed up first then lost ~30% of its one-client rate
    to the other, whatever the code (same commit in both slots: 225 vs 304/s).
    """
    t0 = time.perf_counter()
    settings = load_settings(config)
    key = load_or_create_chain_key(settings.security.audit_key_file)
    index = await SqlIndex.open(IndexSettings(url=url), migrate=False)
    rng = random.Random(records)
    try:
        log = AuditLog(index.engine, key)
        for start in range(0, records, 1000):
            await log.record(
                [
                    AuditEvent(
                        subject="pacs-seed",
                        role="hospital",
                        action="search",
                        outcome="ok",
                        hospital=HOSPITALS[i % len(HOSPITALS)][0],
                        patient_token=f"{rng.getrandbits(128):032x}",
                        purpose="treatment",
                        source="10.0.0.1",
                        detail="level=study",
                    )
                    for i in range(start, min(records, start + 1000))
                ]
            )
        if index.dialect == "postgresql":
            raw = await asyncpg.connect(url)
            try:
                await raw.execute("VACUUM ANALYZE audit_log")
            finally:
                await raw.close()
    finally:
        await index.close()
    return round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------- queries


def make_queries(corpus: Corpus, per_type: int, rng: random.Random) -> list[tuple[str, str]]:
    """``per_type`` searches of each type, shuffled: (type, query string)."""
    out: list[tuple[str, str]] = []
    modalities = list(MODALITIES)

    def own_or_other(own: list[str], other: list[str]) -> str:
        pool = own if (rng.random() < 0.8 and own) or not other else other
        return rng.choice(pool)

    for _ in range(per_type):
        out.append(
            (
                "patient_id",
                urlencode(
                    {"PatientID": own_or_other(corpus.own_patient_ids, corpus.other_patient_ids)}
                ),
            )
        )
        out.append(
            (
                "name_zh",
                urlencode({"PatientName": rng.choice(corpus.names_zh), "fuzzymatching": "true"}),
            )
        )
        out.append(
            (
                "name_pinyin",
                urlencode(
                    {"PatientName": rng.choice(corpus.names_pinyin), "fuzzymatching": "true"}
                ),
            )
        )
        start = END_DATE - timedelta(days=rng.randrange(3 * 365))
        out.append(
            (
                "date_modality",
                urlencode(
                    {
                        "StudyDate": f"{start:%Y%m%d}-{start + timedelta(days=6):%Y%m%d}",
                        "ModalitiesInStudy": rng.choice(modalities),
                    }
                ),
            )
        )
        out.append(
            (
                "accession",
                urlencode(
                    {
                        "AccessionNumber": own_or_other(
                            corpus.own_accessions, corpus.other_accessions
                        )
                    }
                ),
            )
        )
        out.append(("page50", "limit=50"))
    rng.shuffle(out)
    return out


@dataclass(slots=True)
class Samples:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in QUERY_TYPES})
    results: dict[str, list[int]] = field(default_factory=lambda: {t: [] for t in QUERY_TYPES})
    statuses: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        pooled = [s for v in self.seconds.values() for s in v]
        by_type = {}
        for t in QUERY_TYPES:
            figures: dict[str, Any] = summarize_ms(self.seconds[t])
            figures["mean_results"] = round(statistics.fmean(self.results[t] or [0]), 1)
            by_type[t] = figures
        return {"overall": summarize_ms(pooled), "by_type": by_type, "statuses": self.statuses}


async def run_queries(
    http: aiohttp.ClientSession,
    base: str,
    headers: dict[str, str],
    queries: list[tuple[str, str]],
    samples: Samples | None,
) -> None:
    """Send ``queries`` one at a time; record latency (send to last body byte) and results."""
    for kind, qs in queries:
        t0 = time.perf_counter()
        async with http.get(f"{base}/studies?{qs}", headers=headers) as r:
            body = await r.read()
        elapsed = time.perf_counter() - t0
        if r.status not in (200, 204):
            raise RuntimeError(f"{base}: {kind} answered {r.status}: {body[:300]!r}")
        if samples is not None:
            samples.seconds[kind].append(elapsed)
            samples.results[kind].append(len(json.loads(body)) if r.status == 200 else 0)
            samples.statuses[str(r.status)] = samples.statuses.get(str(r.status), 0) + 1


@dataclass(slots=True)
class Concurrent:
    """One target's concurrent-phase figures for one number of clients, pooled over rounds."""

    seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    round_rates: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "searches_per_s": round(len(self.seconds) / self.wall_s, 1) if self.wall_s else 0.0,
            "round_rates": [round(r, 1) for r in self.round_rates],
            # The serving process's CPU per search: steadier than rates on a shared
            # machine (it does not count waiting for a core, nor the database's time).
            "cpu_ms_per_search": round(1000 * self.cpu_s / len(self.seconds), 2)
            if self.seconds
            else 0.0,
        }
        figures.update(summarize_ms(self.seconds))
        return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_clients(
    target: Target, per_client: list[list[tuple[str, str]]], out: Concurrent
) -> None:
    """``len(per_client)`` clients at once, each on its own keep-alive connection sending
    its searches one after another; adds latencies, the phase's wall time and the target
    process's CPU time to ``out``."""
    base, headers = target.base, target.headers
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in per_client]
    try:
        # One untimed search each: the connections are open before the clock starts.
        pairs = list(zip(sessions, per_client, strict=True))
        await asyncio.gather(*(run_queries(s, base, headers, q[:1], None) for s, q in pairs))
        latencies: list[float] = []

        async def client(http: aiohttp.ClientSession, queries: list[tuple[str, str]]) -> None:
            for kind, qs in queries:
                t0 = time.perf_counter()
                async with http.get(f"{base}/studies?{qs}", headers=headers) as r:
                    body = await r.read()
                latencies.append(time.perf_counter() - t0)
                if r.status not in (200, 204):
                    raise RuntimeError(f"{base}: {kind} answered {r.status}: {body[:300]!r}")

        t0, cpu0 = time.perf_counter(), cpu_seconds(target.pid)
        await asyncio.gather(*(client(s, q) for s, q in pairs))
        wall = time.perf_counter() - t0
        out.cpu_s += cpu_seconds(target.pid) - cpu0
    finally:
        for s in sessions:
            await s.close()
    out.seconds += latencies
    out.wall_s += wall
    out.round_rates.append(len(latencies) / wall)


# ---------------------------------------------------------------------- bare endpoint

_STUDY_TAGS = (
    ("00080005", "CS", "SpecificCharacterSet"),
    ("00080020", "DA", "StudyDate"),
    ("00080030", "TM", "StudyTime"),
    ("00080050", "SH", "AccessionNumber"),
    ("00080056", "CS", "InstanceAvailability"),
    ("00080061", "CS", "ModalitiesInStudy"),
    ("00080090", "PN", "ReferringPhysicianName"),
    ("00081190", "UR", "RetrieveURL"),
    ("00100010", "PN", "PatientName"),
    ("00100020", "LO", "PatientID"),
    ("00100030", "DA", "PatientBirthDate"),
    ("00100040", "CS", "PatientSex"),
    ("0020000D", "UI", "StudyInstanceUID"),
    ("00200010", "SH", "StudyID"),
    ("00201206", "IS", "NumberOfStudyRelatedSeries"),
    ("00201208", "IS", "NumberOfStudyRelatedInstances"),
)
_BARE_SQL = (
    'SELECT s."StudyInstanceUID", s."StudyDate", s."StudyTime", s."AccessionNumber", '
    's."StudyID", s."ReferringPhysicianName", s."ModalitiesInStudy", '
    's."NumberOfStudyRelatedSeries", s."NumberOfStudyRelatedInstances", p."PatientName", '
    'p."PatientID", p."PatientBirthDate", p."PatientSex" '
    # "+": SQLite then does not drive the search by ix_studies_hospital (without ANALYZE
    # statistics it would, scanning all of the hospital's studies for one PatientID).
    "FROM studies s JOIN patients p ON p.id = s.patient_id WHERE +s.hospital = ?"
)


def _pn(value: str) -> dict[str, str]:
    groups = value.split("=")
    names = ("Alphabetic", "Ideographic", "Phonetic")
    return {k: g for k, g in zip(names, groups, strict=False) if g}


def bare_app(db: Path, hospital: str) -> web.Application:
    """The limit: aiohttp + stdlib sqlite3, one indexed query, DICOM JSON; nothing else."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)

    async def search(request: web.Request) -> web.Response:
        q = request.query
        sql = [_BARE_SQL]
        args: list[Any] = [hospital]
        if "PatientID" in q:
            sql.append('AND p."PatientID" = ?')
            args.append(q["PatientID"])
        if "AccessionNumber" in q:
            sql.append('AND s."AccessionNumber" = ?')
            args.append(q["AccessionNumber"])
        if "StudyDate" in q:
            low, _, high = q["StudyDate"].partition("-")
            sql.append('AND s."StudyDate" BETWEEN ? AND ?')
            args += [low, high]
        if "ModalitiesInStudy" in q:
            sql.append("AND instr('\\' || s.\"ModalitiesInStudy\" || '\\', ?) > 0")
            args.append("\\" + q["ModalitiesInStudy"] + "\\")
        if "PatientName" in q:
            for term in q["PatientName"].lower().split():
                sql.append(
                    "AND s.patient_id IN (SELECT patient_id FROM patient_name_keys "
                    "WHERE key >= ? AND key < ?)"
                )
                args += [term, term[:-1] + chr(ord(term[-1]) + 1)]
        sql.append('ORDER BY s."StudyDate" DESC, s.id DESC LIMIT ?')
        args.append(int(q.get("limit", 1000)))
        rows = conn.execute(" ".join(sql), args).fetchall()
        if not rows:
            return web.Response(status=204)
        base = f"{request.scheme}://{request.host}/dicomweb/studies/"
        out = []
        for r in rows:
            values = {
                "SpecificCharacterSet": "ISO_IR 192",
                "StudyInstanceUID": r[0], "StudyDate": r[1], "StudyTime": r[2],
                "AccessionNumber": r[3], "StudyID": r[4], "ReferringPhysicianName": r[5],
                "ModalitiesInStudy": r[6].split("\\") if r[6] else None,
                "NumberOfStudyRelatedSeries": r[7], "NumberOfStudyRelatedInstances": r[8],
                "PatientName": r[9], "PatientID": r[10], "PatientBirthDate": r[11],
                "PatientSex": r[12], "InstanceAvailability": "ONLINE",
                "RetrieveURL": base + r[0],
            }  # fmt: skip
            dataset: dict[str, Any] = {}
            for tag, vr, keyword in _STUDY_TAGS:
                v = values[keyword]
                if v is None:
                    dataset[tag] = {"vr": vr}
                elif vr == "PN":
                    dataset[tag] = {"vr": vr, "Value": [_pn(v)]}
                else:
                    dataset[tag] = {"vr": vr, "Value": v if isinstance(v, list) else [v]}
            out.append(dataset)
        return web.Response(
            text=json.dumps(out, ensure_ascii=False),
            content_type="application/dicom+json",
            charset="utf-8",
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/studies", search)
    app.router.add_get("/healthz", healthz)
    return app


# ---------------------------------------------------------------------- run

GATEWAY_CONFIG = """
[gateway]
province = "{province}"
listen = "127.0.0.1:{port}"
data_dir = "{data}"

[index]
url = "{url}"
"""


# Imported at start-up of the baseline gateway (its PYTHONPATH): imaging_gateway comes
# from the baseline tree, ahead of this venv's editable install and of the working
# directory ``python -m`` puts first on sys.path.
BASELINE_SHIM = """
import importlib.machinery
import sys


class _Baseline:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "imaging_gateway":
            return importlib.machinery.PathFinder.find_spec(name, [{tree!r}])
        return None


sys.meta_path.insert(0, _Baseline)
"""


@dataclass(slots=True)
class Target:
    name: str
    base: str
    headers: dict[str, str]
    pid: int
    """The serving process (its CPU time per search is reported)."""
    samples: Samples = field(default_factory=Samples)


async def bench_size(
    n: int,
    backends: list[str],
    work: Path,
    *,
    per_type: int,
    rounds: int,
    warmup: int,
    seed: int,
    cleanup: list[Any],
    phases: set[str],
    clients: list[int],
    client_searches: int,
    baseline_tree: Path | None,
    audit_records: int,
    keep: Path | None = None,
    rederive: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    urls: dict[str, str] = {}
    sqlite_file = work / f"index-{n}.sqlite3"
    urls["sqlite"] = f"sqlite:///{sqlite_file}"
    out_build: dict[str, Any] = {}
    if keep is not None:
        # Kept between runs: built once, reused (see --keep).
        sqlite_file = keep / f"index-{n}-{seed}.sqlite3"
        urls["sqlite"] = f"sqlite:///{sqlite_file}"
        corpus, out_build["sqlite"], _ = await kept_index(
            "sqlite", urls["sqlite"], keep, n, seed, rederive=rederive and "sqlite" in backends
        )
        if "postgres" in backends:
            urls["postgres"] = database_url(f"bench_qido_keep_{n}_{seed}")
            _, out_build["postgres"], _ = await kept_index(
                "postgres", urls["postgres"], keep, n, seed, rederive=rederive
            )
    else:
        # The SQLite index is always built: the bare endpoint reads it.
        corpus, out_build["sqlite"] = await build_index(urls["sqlite"], n, seed)
        if "postgres" in backends:
            urls["postgres"] = await create_pg_database("bench_qido")
            cleanup.append(("pg", urls["postgres"]))
            _, out_build["postgres"] = await build_index(urls["postgres"], n, seed)
    out.update(
        patients=corpus.patients, studies=corpus.studies, series=corpus.series,
        instances=corpus.instances, consents=corpus.consents,
        token_hospital_study_share=round(corpus.token_studies / corpus.studies, 3),
        sqlite_file_mib=round(sqlite_file.stat().st_size / 2**20, 1),
        build_s=out_build, audit_records_before=audit_records,
    )  # fmt: skip

    targets: list[Target] = []
    for backend in backends:
        data = work / f"gw-{backend}-{n}"
        data.mkdir()
        port = free_port()
        cfg = data / "gateway.toml"
        cfg.write_text(
            GATEWAY_CONFIG.format(province=PROVINCE, port=port, data=data, url=urls[backend]),
            encoding="utf-8",
        )
        token = issue_token(cfg, "--role", "hospital", "--hospital", TOKEN_HOSPITAL,
                            "--subject", "pacs-bench", "--ttl", "1d")  # fmt: skip
        if audit_records:
            out_build[backend]["audit_seed_s"] = await seed_audit_log(
                cfg, urls[backend], audit_records
            )
        gw = start_gateway(cfg, port)
        cleanup.append(("gw", gw))
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
        targets.append(Target(f"gateway_{backend}", f"{gw.base}/dicomweb", headers, gw.proc.pid))
        if baseline_tree is not None:
            # The other commit's gateway on the same index, keys and token: its own config
            # file only for its port. It runs while the other targets wait, never with them.
            old_port = free_port()
            old_cfg = data / "gateway-old.toml"
            old_cfg.write_text(
                GATEWAY_CONFIG.format(province=PROVINCE, port=old_port, data=data,
                                      url=urls[backend]),
                encoding="utf-8",
            )  # fmt: skip
            shim = data / "baseline-shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(
                BASELINE_SHIM.format(tree=str(baseline_tree)), encoding="utf-8"
            )
            old = start_gateway(old_cfg, old_port, env={"PYTHONPATH": str(shim)})
            cleanup.append(("gw", old))
            targets.append(
                Target(f"old_gateway_{backend}", f"{old.base}/dicomweb", headers, old.proc.pid)
            )
    port = free_port()
    bare = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--bare-server", str(sqlite_file), "--port", str(port),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    cleanup.append(("proc", bare))
    await wait_healthy(f"http://127.0.0.1:{port}")
    targets.append(Target("bare_aiohttp_sqlite", f"http://127.0.0.1:{port}", {}, bare.pid))

    rng = random.Random(seed + n)
    async with aiohttp.ClientSession() as http:
        for t in targets:
            await run_queries(http, t.base, t.headers, make_queries(corpus, warmup, rng), None)
        for r in range(rounds if "latency" in phases else 0):
            queries = make_queries(corpus, per_type, rng)
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                await run_queries(http, t.base, t.headers, queries, t.samples)
    if "latency" in phases:
        bare_summary = targets[-1].samples.summary()
        for t in targets:
            out[t.name] = t.samples.summary()
            if t is not targets[-1]:
                out[t.name]["p50_vs_bare"] = round(
                    out[t.name]["overall"]["p50_ms"] / bare_summary["overall"]["p50_ms"], 2
                )
    if "concurrent" in phases:
        out["concurrent"] = await concurrent_phase(
            corpus, targets, clients=clients, searches=client_searches, rounds=rounds, rng=rng
        )
    return out


async def concurrent_phase(
    corpus: Corpus,
    targets: list[Target],
    *,
    clients: list[int],
    searches: int,
    rounds: int,
    rng: random.Random,
) -> dict[str, Any]:
    """Per number of clients, per round, each target in turn (rotated per round) under that
    many clients at once sending the same searches; figures pooled over the rounds."""
    figures = {t.name: {c: Concurrent() for c in clients} for t in targets}
    per_type = -(-searches // len(QUERY_TYPES))
    for c in clients:
        for r in range(rounds):
            per_client = [make_queries(corpus, per_type, rng)[:searches] for _ in range(c)]
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                await run_clients(t, per_client, figures[t.name][c])
    out: dict[str, Any] = {
        "clients": clients,
        "searches_per_client_per_round": searches,
        "rounds": rounds,
    }
    goal_c, vs_c = CONCURRENT_GOAL["clients"], CONCURRENT_GOAL["vs_clients"]
    for t in targets:
        by_c = {str(c): figures[t.name][c].summary() for c in clients}
        entry: dict[str, Any] = {"by_clients": by_c}
        if str(goal_c) in by_c and str(vs_c) in by_c:
            many, one = by_c[str(goal_c)], by_c[str(vs_c)]
            entry["rate_ratio"] = round(many["searches_per_s"] / one["searches_per_s"], 2)
            entry["goal_met"] = (
                many["searches_per_s"] >= one["searches_per_s"]
                and many["p99_ms"] < CONCURRENT_GOAL["p99_ms"]
            )
        out[t.name] = entry
    return out


async def cleanup_all(cleanup: list[Any]) -> None:
    for kind, thing in reversed(cleanup):
        try:
            if kind == "gw":
                thing.stop()
            elif kind == "proc":
                if thing.returncode is None:
                    thing.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(thing.wait(), 10)
            elif kind == "pg":
                await drop_pg_database(thing)
        except Exception as exc:  # keep cleaning up
            print(f"cleanup {kind}: {exc!r}", file=sys.stderr)
    cleanup.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="instances per index")
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--per-type", type=int, default=100, help="searches per type per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20, help="untimed searches per type")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--phases",
        default="latency,concurrent",
        help="latency (one search in flight), concurrent (several clients)",
    )
    ap.add_argument("--clients", default="1,2,4,8", help="clients at once, concurrent phase")
    ap.add_argument(
        "--client-searches",
        type=int,
        default=150,
        help="searches per client per round, concurrent phase",
    )
    ap.add_argument(
        "--audit-records",
        type=int,
        default=20_000,
        help="records in the audit log before the gateways start (as in service)",
    )
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        metavar="DIR",
        help="source tree of another commit: its gateway measured side by side",
    )
    ap.add_argument(
        "--keep", type=Path, metavar="DIR",
        help="keep the indexes (SQLite files and the corpus in DIR, PostgreSQL databases "
        "bench_qido_keep_<size>_<seed>) and reuse them on the next run; drop them yourself",
    )  # fmt: skip
    ap.add_argument(
        "--rederive", action="store_true",
        help="with --keep, on a reused index: clear and time the derived-data fill again",
    )
    ap.add_argument("--bare-server", metavar="SQLITE_FILE", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        web.run_app(bare_app(Path(args.bare_server), TOKEN_HOSPITAL), host="127.0.0.1",
                    port=args.port, print=None, access_log=None)  # fmt: skip
        return
    backends = [b.strip() for b in args.backends.split(",")]
    unknown = set(backends) - {"sqlite", "postgres"}
    if unknown:
        ap.error(f"unknown backend(s): {sorted(unknown)}")
    phases = {p.strip() for p in args.phases.split(",")}
    if not phases or phases - {"latency", "concurrent"}:
        ap.error(f"unknown phase(s): {sorted(phases - {'latency', 'concurrent'})}")
    if args.baseline_tree is not None and not (args.baseline_tree / "imaging_gateway").is_dir():
        ap.error(f"--baseline-tree {args.baseline_tree}: no imaging_gateway package in it")
    asyncio.run(run(args, [int(s) for s in args.sizes.split(",")], backends))


async def run(args: argparse.Namespace, sizes: list[int], backends: list[str]) -> None:
    result: dict[str, Any] = {
        "bench": "qido",
        "cpus": os.cpu_count(),
        "searches_per_type": args.per_type * args.rounds,
        "rounds": args.rounds,
        "query_types": list(QUERY_TYPES),
        "token_hospital": TOKEN_HOSPITAL,
        "goal": GOAL,
        "sizes": {},
    }
    cleanup: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bench-qido-") as tmp:
        try:
            for n in sizes:
                result["sizes"][str(n)] = await bench_size(
                    n, backends, Path(tmp), per_type=args.per_type, rounds=args.rounds,
                    warmup=args.warmup, seed=args.seed, cleanup=cleanup,
                    phases={p.strip() for p in args.phases.split(",")},
                    clients=[int(c) for c in args.clients.split(",")],
                    client_searches=args.client_searches,
                    baseline_tree=args.baseline_tree.resolve() if args.baseline_tree else None,
                    audit_records=args.audit_records,
                    keep=args.keep, rederive=args.rederive,
                )  # fmt: skip
                await cleanup_all(cleanup)
        finally:
            await cleanup_all(cleanup)
    if "concurrent" in args.phases:
        result["concurrent_goal"] = CONCURRENT_GOAL
    goal_n = max((n for n in sizes if n >= GOAL["at_instances"]), default=None)
    if goal_n is not None and "latency" in args.phases:
        at = result["sizes"][str(goal_n)]
        result["goal_met"] = {
            b: at[f"gateway_{b}"]["overall"]["p50_ms"] < GOAL["p50_ms"]
            and at[f"gateway_{b}"]["overall"]["p99_ms"] < GOAL["p99_ms"]
            for b in backends
        }
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
