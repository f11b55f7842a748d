"""The gate on real SQLite and PostgreSQL: ownership, consent, break-glass, patients, audit."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from imaging_gateway.domain.qido import parse_qido
from imaging_gateway.errors import (
    Forbidden,
    IndexUnavailable,
    InvalidQuery,
    InvalidRequest,
    NotFound,
)
from imaging_gateway.index.audit_repo import CHAIN_LOCK
from imaging_gateway.index.schema import audit_log, studies
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.consent import ConsentStore, parse_consent_request
from imaging_gateway.security.gate import (
    AccessContext,
    Gate,
    parse_break_glass_reason,
    visibility,
)
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from tests.factories import make_corpus
from tests.support.indexing import index_instances

NOW = datetime.now(UTC)


def hospital(code: str, subject: str = "pacs") -> Principal:
    return Principal(subject=subject, role="hospital", province="110000", token_id="t",
                     hospital=code)


@pytest.fixture
async def world(index: SqlIndex, tmp_path: Path) -> AsyncIterator[tuple[Gate, ConsentStore, list]]:
    # Patients are seen first at a home hospital, later ones elsewhere, same national id.
    corpus = make_corpus(seed=7, patients=6, studies_per_patient=3)
    await index_instances(index, corpus)
    gate = Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                break_glass_minutes=30, search_engine=index.search_engine)
    yield gate, ConsentStore(index.engine), corpus


async def visible_studies(gate: Gate, principal: Principal, now: datetime = NOW) -> set[str]:
    """The studies ``principal`` may see; the rule with bound values (``Gate.visible``) and
    the shared rule with the values at execution (``visibility``) must agree."""
    rule, values = visibility(principal, now)
    async with gate.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(studies.c.StudyInstanceUID).where(gate.visible(principal, now))
        )
        bound = {r[0] for r in rows}
        shared = {r[0] for r in await conn.execute(
            sa.select(studies.c.StudyInstanceUID).where(rule), values)}
    assert shared == bound
    return bound


def studies_of(corpus: list, *, hospital: str | None = None, national_id: str | None = None
               ) -> set[str]:
    return {
        i.study_uid
        for i in corpus
        if (hospital is None or i.hospital.code == hospital)
        and (national_id is None or i.national_id == national_id)
    }


async def grant(gate: Gate, consents: ConsentStore, by: Principal, body: dict) -> str:
    request = parse_consent_request(body, by, now=NOW, max_days=365)
    async with gate.engine.begin() as conn:
        return (await consents.create(conn, request, by, NOW)).id


def _a_patient_seen_in_two_hospitals(corpus: list) -> tuple[str, str, str]:
    """(national id, home hospital, another hospital where the patient has no study)."""
    codes = sorted({i.hospital.code for i in corpus})
    for nid in sorted({i.national_id for i in corpus if i.national_id}):
        own = {i.hospital.code for i in corpus if i.national_id == nid}
        others = [c for c in codes if c not in own]
        if others:
            return nid, sorted(own)[0], others[0]
    raise AssertionError("corpus has no patient to share")


async def test_a_hospital_sees_exactly_what_it_produced(world) -> None:
    gate, _, corpus = world
    for code in sorted({i.hospital.code for i in corpus}):
        assert await visible_studies(gate, hospital(code)) == studies_of(corpus, hospital=code)


async def test_admin_and_peer_see_no_patient_data(world) -> None:
    gate, _, _ = world
    for role in ("admin", "peer"):
        p = Principal(subject=role, role=role, province="110000", token_id="t")  # type: ignore[arg-type]
        assert await visible_studies(gate, p) == set()


async def test_consent_opens_the_patients_studies_until_revoked_or_expired(world) -> None:
    gate, consents, corpus = world
    nid, _, other = _a_patient_seen_in_two_hospitals(corpus)
    grantee = hospital(other)
    before = await visible_studies(gate, grantee)
    assert not (studies_of(corpus, national_id=nid) & before)
    cid = await grant(gate, consents, grantee, {
        "national_id": nid, "purpose": "treatment", "evidence": "insurance code scan #1",
        "valid_until": (NOW + timedelta(days=7)).isoformat()})
    after = await visible_studies(gate, grantee)
    assert after == before | studies_of(corpus, national_id=nid)
    # Other hospitals gain nothing from it.
    third = sorted({i.hospital.code for i in corpus} - {other})[0]
    assert await visible_studies(gate, hospital(third)) == studies_of(corpus, hospital=third)
    # Expired: invisible again.
    assert await visible_studies(gate, grantee, NOW + timedelta(days=8)) == before
    # Not yet valid: invisible.
    assert await visible_studies(gate, grantee, NOW - timedelta(minutes=5)) == before
    # Revoked: invisible on the very next check.
    consent = await consents.get(cid)
    async with gate.engine.begin() as conn:
        await consents.revoke(conn, consent, grantee, NOW)
    assert await visible_studies(gate, grantee) == before


async def test_consent_scope_list_and_named_clinician(world) -> None:
    gate, consents, corpus = world
    nid, _, other = _a_patient_seen_in_two_hospitals(corpus)
    chosen = sorted(studies_of(corpus, national_id=nid))[0]
    await grant(gate, consents, hospital(other), {
        "national_id": nid, "purpose": "referral", "evidence": "signed form 42",
        "scope": [chosen], "grantee_clinician": "dr-li",
        "valid_until": (NOW + timedelta(days=1)).isoformat()})
    own = studies_of(corpus, hospital=other)
    assert await visible_studies(gate, hospital(other, "dr-li")) == own | {chosen}
    assert await visible_studies(gate, hospital(other, "dr-wang")) == own


async def test_patient_sees_own_studies_only(world) -> None:
    gate, _, corpus = world
    nid = sorted({i.national_id for i in corpus if i.national_id})[0]
    me = Principal(subject="app", role="patient", province="110000", token_id="t",
                   national_id=nid)
    assert await visible_studies(gate, me) == studies_of(corpus, national_id=nid)


async def test_locate_refuses_unseen_and_unknown_alike_and_audits(world) -> None:
    gate, _, corpus = world
    nid, home, other = _a_patient_seen_in_two_hospitals(corpus)
    study = sorted(studies_of(corpus, national_id=nid, hospital=home))[0]
    ctx = AccessContext(hospital(other), source="10.0.0.9")
    with pytest.raises(NotFound) as hidden:
        await gate.locate(ctx, action="retrieve", study_uid=study)
    with pytest.raises(NotFound) as missing:
        await gate.locate(ctx, action="retrieve", study_uid="1.2.3.4.5.6.7")
    assert (hidden.value.status, hidden.value.message) == (missing.value.status,
                                                           missing.value.message)
    # The owner gets every instance, in a stable order.
    located = await gate.locate(AccessContext(hospital(home)), action="retrieve", study_uid=study)
    assert {loc.SOPInstanceUID for loc in located} == {
        i.sop_uid for i in corpus if i.study_uid == study}
    async with gate.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings().all()
    assert [(r["outcome"], r["StudyInstanceUID"]) for r in rows] == [
        ("denied", study), ("not-found", "1.2.3.4.5.6.7"), ("ok", study)]
    assert rows[0]["source"] == "10.0.0.9" and rows[0]["hospital"] == other
    assert rows[0]["patient_token"] == gate.tokens.for_national_id(nid)
    assert rows[1]["patient_token"] is None
    assert (await gate.audit.verify()).ok


async def test_break_glass_opens_one_patient_for_a_window(world) -> None:
    gate, _, corpus = world
    nid, home, other = _a_patient_seen_in_two_hospitals(corpus)
    study = sorted(studies_of(corpus, national_id=nid, hospital=home))[0]
    reason = parse_break_glass_reason("%E6%80%A5%E8%AF%8A%20unconscious")  # 急诊 unconscious
    ctx = AccessContext(hospital(other, "dr-er"), break_glass_reason=reason, now=NOW)
    located = await gate.locate(ctx, action="retrieve", study_uid=study)
    assert located and {loc.StudyInstanceUID for loc in located} == {study}
    # The window covers all of that person's studies, and nobody else's.
    opened = await visible_studies(gate, hospital(other))
    assert opened == studies_of(corpus, hospital=other) | studies_of(corpus, national_id=nid)
    later = NOW + timedelta(minutes=31)
    assert await visible_studies(gate, hospital(other), later) == studies_of(corpus,
                                                                             hospital=other)
    report = await gate.break_glass_report(since=NOW - timedelta(days=1))
    assert [(r["hospital"], r["StudyInstanceUID"], r["reason"]) for r in report] == [
        (other, study, "急诊 unconscious")]
    async with gate.engine.connect() as conn:
        actions = [r[0] for r in await conn.execute(
            sa.select(audit_log.c.action).order_by(audit_log.c.seq))]
    assert actions == ["break-glass", "retrieve"]


async def test_break_glass_needs_a_hospital_and_a_reason(world) -> None:
    gate, _, corpus = world
    with pytest.raises(InvalidRequest):
        parse_break_glass_reason("   ")
    with pytest.raises(InvalidRequest):
        parse_break_glass_reason("x" * 501)
    study = corpus[0].study_uid
    me = Principal(subject="app", role="patient", province="110000", token_id="t",
                   national_id="110101199003070000")
    with pytest.raises(Forbidden):
        await gate.locate(AccessContext(me, break_glass_reason="help"), action="retrieve",
                          study_uid=study)


async def test_consent_request_validation(world) -> None:
    nid = sorted({i.national_id for i in world[2] if i.national_id})[0]
    h = hospital("H11010800028")
    good = {"national_id": nid, "purpose": "treatment", "evidence": "scan",
            "valid_until": (NOW + timedelta(days=1)).isoformat()}
    assert parse_consent_request(good, h, now=NOW, max_days=365).grantee_hospital == h.hospital
    bad_cases = [
        ({**good, "national_id": nid[:-1] + ("0" if nid[-1] != "0" else "1")}, "national_id"),
        ({**good, "purpose": "curiosity"}, "purpose"),
        ({**good, "evidence": ""}, "evidence"),
        ({**good, "valid_until": "2026-13-01"}, "valid_until"),
        ({**good, "valid_until": (NOW + timedelta(days=1)).replace(tzinfo=None).isoformat()},
         "time zone"),
        ({**good, "valid_until": (NOW + timedelta(days=400)).isoformat()}, "365 days"),
        ({**good, "scope": ["not-a-uid"]}, "scope"),
        ({**good, "surprise": 1}, "unknown field"),
    ]
    for body, needle in bad_cases:
        with pytest.raises(InvalidRequest) as err:
            parse_consent_request(body, h, now=NOW, max_days=365)
        assert needle in err.value.message, (needle, err.value.message)
    with pytest.raises(Forbidden):
        parse_consent_request({**good, "grantee_hospital": "H44010400011"}, h, now=NOW,
                              max_days=365)
    patient = Principal(subject="app", role="patient", province="110000", token_id="t",
                        national_id=nid)
    with pytest.raises(Forbidden):
        parse_consent_request(good, patient, now=NOW, max_days=365)


async def test_a_search_is_answered_only_once_its_audit_record_is_committed(world) -> None:
    """A lone search reads on a connection of the search engine and commits its records
    on that same connection; if they cannot be written the search answers nothing."""
    gate, _, corpus = world
    code = sorted({i.hospital.code for i in corpus})[0]
    checkouts: list[int] = []

    def checkout(*_: object) -> None:
        checkouts.append(1)

    event.listen(gate.search_engine.sync_engine.pool, "checkout", checkout)
    try:
        page = await gate.search(AccessContext(hospital(code)), parse_qido("study", {}),
                                 max_results=100)
    finally:
        event.remove(gate.search_engine.sync_engine.pool, "checkout", checkout)
    assert {r.study_instance_uid for r in page.results} == studies_of(corpus, hospital=code)
    assert checkouts == [1]
    async with gate.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log))).mappings().all()
    assert {r["action"] for r in rows} == {"search"}
    assert len(rows) == len({gate.tokens.for_patient(r.national_id, r.patient_key)
                             for r in page.results})

    # A record the database refuses to write: the search answers nothing.
    async with gate.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    try:
        with pytest.raises(IndexUnavailable, match="audit record could not be written"):
            await gate.search(AccessContext(hospital(code)), parse_qido("study", {}),
                              max_results=100)
    finally:
        async with gate.engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    report = await gate.audit.verify()
    assert report.ok and report.checked == len(rows)


async def test_concurrent_searches_are_each_audited_once(index: SqlIndex) -> None:
    """Searches running at once, as the gateway builds its gate (PostgreSQL: group commits
    on the autocommit pool): each search's records (one per patient it returned) land
    exactly once, and the chain is whole."""
    corpus = make_corpus(seed=7, patients=6, studies_per_patient=3)
    await index_instances(index, corpus)
    gate = Gate(index.engine,
                AuditLog(index.engine, b"k" * 32, autocommit_engine=index.autocommit_engine),
                PatientTokens(b"p" * 32), break_glass_minutes=30,
                search_engine=index.search_engine)
    codes = sorted({i.hospital.code for i in corpus})

    async def search(n: int) -> tuple[str, int]:
        subject = f"pacs-{n}"
        page = await gate.search(AccessContext(hospital(codes[n % len(codes)], subject)),
                                 parse_qido("study", {}), max_results=100)
        assert {r.study_instance_uid for r in page.results} == studies_of(
            corpus, hospital=codes[n % len(codes)])
        patients_seen = {gate.tokens.for_patient(r.national_id, r.patient_key)
                         for r in page.results}
        return subject, len(patients_seen) or 1

    for round_ in (1, 2):  # the second time the head is known: the one-statement path
        expected = dict(await asyncio.gather(*(search(n) for n in range(40))))
        async with gate.engine.connect() as conn:
            rows = (await conn.execute(sa.select(audit_log.c.subject, audit_log.c.action)
                                       )).all()
        assert {a for _, a in rows} == {"search"}
        assert Counter(s for s, _ in rows) == Counter(
            {s: k * round_ for s, k in expected.items()})
    report = await gate.audit.verify()
    assert report.ok and report.checked == 2 * sum(expected.values())


async def test_concurrent_searches_answer_only_once_their_records_are_durable(
    index: SqlIndex,
) -> None:
    """The audit chain's lock held elsewhere (another process appending: PostgreSQL's
    advisory lock, SQLite's write lock): searches running at once read their studies, then
    wait, the first on its own connection, the others for the group commit; none answers
    while its records cannot be committed. Once the lock is free every one answers, each
    record is there once and the chain is whole."""
    corpus = make_corpus(seed=7, patients=6, studies_per_patient=3)
    await index_instances(index, corpus)
    audit = AuditLog(index.engine, b"k" * 32, autocommit_engine=index.autocommit_engine)
    gate = Gate(index.engine, audit, PatientTokens(b"p" * 32), break_glass_minutes=30,
                search_engine=index.search_engine)
    code = sorted({i.hospital.code for i in corpus})[0]
    await gate.search(AccessContext(hospital(code, "pacs-0")), parse_qido("study", {}),
                      max_results=100)  # the head is known: the one-statement path
    before = (await audit.head())[0]
    n = 8
    holder = await index.engine.connect()
    try:
        tx = await holder.begin()
        if index.dialect == "postgresql":
            await holder.execute(sa.select(sa.func.pg_advisory_xact_lock(CHAIN_LOCK)))
        else:
            await holder.execute(sa.text("UPDATE audit_log SET seq = seq WHERE 0"))
        searches = [
            asyncio.create_task(gate.search(AccessContext(hospital(code, f"pacs-{k}")),
                                            parse_qido("study", {}), max_results=100))
            for k in range(1, n + 1)
        ]
        # Every search has read its studies and waits for its records: one writing them
        # on its own connection, the others queued for the group commit.
        for _ in range(400):
            if audit._writing and len(audit._waiting) == n - 1:
                break
            await asyncio.sleep(0.005)
        assert audit._writing and len(audit._waiting) == n - 1
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in searches)
        assert (await audit.head())[0] == before
        await tx.rollback()
    finally:
        await holder.close()
    pages = await asyncio.gather(*searches)
    assert all({r.study_instance_uid for r in p.results} == studies_of(corpus, hospital=code)
               for p in pages)
    per_search = len({gate.tokens.for_patient(r.national_id, r.patient_key)
                      for r in pages[0].results})
    async with index.engine.connect() as conn:
        subjects = Counter(r[0] for r in await conn.execute(
            sa.select(audit_log.c.subject).where(audit_log.c.seq > before)))
    assert subjects == {f"pacs-{k}": per_search for k in range(1, n + 1)}
    report = await audit.verify()
    assert report.ok and report.checked == before + n * per_search


async def test_refused_tokens_are_audited_without_flooding_the_log(index: SqlIndex) -> None:
    from imaging_gateway.security import gate as gate_module

    audit = AuditLog(index.engine, b"k" * 32)
    gate = Gate(index.engine, audit, PatientTokens(b"p" * 32), break_glass_minutes=30,
                search_engine=index.search_engine)
    clock = [NOW]
    for _ in range(5):
        await gate.refused_token(source="10.1.2.3", reason="token expired", now=clock[0])
    await gate.refused_token(source="10.1.2.3", reason="invalid token", now=clock[0])
    await gate.refused_token(source="10.9.9.9", reason="token expired", now=clock[0])
    clock[0] += timedelta(seconds=gate_module.REFUSAL_WINDOW_S)
    await gate.refused_token(source="10.1.2.3", reason="token expired", now=clock[0])
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings().all()
    assert [(r["source"], r["detail"]) for r in rows] == [
        ("10.1.2.3", "token expired"),
        ("10.1.2.3", "invalid token"),
        ("10.9.9.9", "token expired"),
        ("10.1.2.3", "token expired (and 4 more in the last minute)"),
    ]
    assert {(r["subject"], r["role"], r["action"], r["outcome"]) for r in rows} == {
        ("unauthenticated", "none", "authenticate", "denied")}
    assert (await audit.verify()).ok


async def test_refusal_counters_are_shared_by_the_gateway_processes(index: SqlIndex) -> None:
    """Two gates on one index (two gateway processes): one record per window between
    them, and the next window's record counts the refusals both of them saw."""
    from imaging_gateway.security import gate as gate_module

    gates = [Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                  break_glass_minutes=30, search_engine=index.search_engine)
             for _ in range(2)]  # fmt: skip
    window = timedelta(seconds=gate_module.REFUSAL_WINDOW_S)
    for n in range(6):
        await gates[n % 2].refused_token(source="10.1.2.3", reason="token expired",
                                         now=NOW + timedelta(seconds=n))  # fmt: skip
    # Counted at once by both: still one record for the window.
    import asyncio

    await asyncio.gather(*(g.refused_token(source="10.7.7.7", reason="invalid token", now=NOW)
                           for g in gates * 4))  # fmt: skip
    await gates[1].refused_token(source="10.1.2.3", reason="token expired", now=NOW + window)
    async with index.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings().all()
    assert sorted((r["source"], r["detail"]) for r in rows) == [
        ("10.1.2.3", "token expired"),
        ("10.1.2.3", "token expired (and 5 more in the last minute)"),
        ("10.7.7.7", "invalid token"),
    ]


async def test_break_glass_from_a_search_by_patient_id(world) -> None:
    """A search with the emergency header and one patient's PatientID opens that person
    (every PatientID of the same national identity) for the window, and nobody else."""
    gate, _, corpus = world
    nid, home, other = _a_patient_seen_in_two_hospitals(corpus)
    local = next(i for i in corpus if i.national_id == nid and i.hospital.code == home)
    er = AccessContext(hospital(other, "dr-er"), break_glass_reason="unconscious", now=NOW)

    def by_pid(pid: str, issuer: str | None = None) -> Any:
        params = {"PatientID": pid, **({"IssuerOfPatientID": issuer} if issuer else {})}
        return parse_qido("study", params)

    assert not (await gate.search(AccessContext(hospital(other)), by_pid(local.patient_id),
                                  max_results=100)).results
    page = await gate.search(er, by_pid(local.patient_id, home), max_results=100)
    assert {r.study_instance_uid for r in page.results} == studies_of(
        corpus, national_id=nid, hospital=home)
    opened = await visible_studies(gate, hospital(other))
    assert opened == studies_of(corpus, hospital=other) | studies_of(corpus, national_id=nid)
    assert await visible_studies(gate, hospital(other), NOW + timedelta(minutes=31)) == \
        studies_of(corpus, hospital=other)
    report = await gate.break_glass_report(since=NOW - timedelta(days=1))
    assert [(r["StudyInstanceUID"], r["reason"]) for r in report] == [(None, "unconscious")]

    # Not one patient: refused and audited; an unknown PatientID opens nothing.
    for query in (parse_qido("study", {"PatientID": "*"}), parse_qido("study", {})):
        with pytest.raises(InvalidQuery):
            await gate.search(er, query, max_results=100)
    assert not (await gate.search(er, by_pid("NO-SUCH-ID"), max_results=100)).results
    patient = Principal(subject="app", role="patient", province="110000", token_id="t",
                        national_id=nid)
    with pytest.raises(Forbidden):
        await gate.search(AccessContext(patient, break_glass_reason="x"), by_pid(
            local.patient_id), max_results=100)
    async with gate.engine.connect() as conn:
        glass = [(r.outcome, r.detail) for r in await conn.execute(
            sa.select(audit_log).where(audit_log.c.action == "break-glass")
            .order_by(audit_log.c.seq))]
    assert glass == [("ok", "window=1800s from=search"),
                     ("denied", "search must name one patient"),
                     ("denied", "search must name one patient"),
                     ("denied", "not a hospital clinician")]
    assert (await gate.audit.verify()).ok


@pytest.mark.parametrize("index_url", ["postgres"], indirect=True)  # a server to close them
async def test_a_search_survives_pooled_connections_the_server_closed(world) -> None:
    """PostgreSQL's search connections are not pinged before use: when the server has
    closed them (a restart, an idle timeout), the search runs once more on a new one."""
    gate, _, corpus = world
    code = sorted({i.hospital.code for i in corpus})[0]
    expected = studies_of(corpus, hospital=code)

    async def search() -> set[str]:
        page = await gate.search(AccessContext(hospital(code)), parse_qido("study", {}),
                                 max_results=100)
        return {r.study_instance_uid for r in page.results}

    assert await search() == expected  # leaves a connection in the pool
    async with gate.search_engine.connect() as conn:
        pids = {r[0] for r in await conn.execute(sa.text("SELECT pg_backend_pid()"))}
    async with gate.engine.connect() as conn:
        for pid in pids:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    async with gate.engine.connect() as conn:
        before = (await conn.execute(sa.select(sa.func.count()).select_from(audit_log))).scalar()
    assert await search() == expected
    async with gate.engine.connect() as conn:
        after = (await conn.execute(sa.select(sa.func.count()).select_from(audit_log))).scalar()
    assert after > before
