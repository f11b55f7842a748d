"""The gate's federation rules on real SQLite and PostgreSQL: peer visibility, the subject."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from imaging_gateway.domain.qido import parse_qido
from imaging_gateway.index.schema import audit_log, patients
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.consent import ConsentStore, parse_consent_request
from imaging_gateway.security.gate import AccessContext, FederationSubject, Gate, PeerGrant
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from tests.factories import make_corpus
from tests.support.indexing import index_instances

NOW = datetime.now(UTC)
PEER = Principal(subject="imaging-gateway:310000", role="peer", province="310000", token_id="j")


@pytest.fixture
async def world(index: SqlIndex, tmp_path: Path) -> AsyncIterator[tuple[Gate, ConsentStore, list]]:
    corpus = make_corpus(seed=7, patients=6, studies_per_patient=3)
    await index_instances(index, corpus)
    gate = Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                break_glass_minutes=30)
    yield gate, ConsentStore(index.engine), corpus


def _peer_ctx(gate: Gate, national_id: str, scope: str | tuple[str, ...] = "all",
              break_glass: str | None = None) -> AccessContext:
    grant = PeerGrant(patient_token=gate.tokens.for_national_id(national_id), scope=scope,
                      hospital="H31010400007", clinician="dr-chen", purpose="treatment",
                      break_glass_reason=break_glass, correlation_id="c0ffee00-0000-4000-8000-000000000001")
    return AccessContext(principal=PEER, peer=grant, correlation_id=grant.correlation_id,
                         purpose="treatment")


async def _found(gate: Gate, ctx: AccessContext) -> set[str]:
    page = await gate.search(ctx, parse_qido("study", []), max_results=1000)
    return {r.study_instance_uid for r in page.results}


async def test_a_peer_sees_the_asserted_patient_only_within_scope(world: tuple) -> None:
    gate, _, corpus = world
    nid = corpus[0].national_id
    theirs = {i.study_uid for i in corpus if i.national_id == nid}
    assert len(theirs) >= 2
    assert await _found(gate, _peer_ctx(gate, nid)) == theirs
    one = sorted(theirs)[0]
    assert await _found(gate, _peer_ctx(gate, nid, scope=(one,))) == {one}
    assert await _found(gate, _peer_ctx(gate, nid, scope=(one,), break_glass="trauma")) == theirs
    # A token of nobody here, and a peer principal without a grant: nothing.
    assert await _found(gate, _peer_ctx(gate, "11010519491231002X")) == set()
    bare = AccessContext(principal=PEER)
    assert await _found(gate, bare) == set()
    # Retrieve follows the same rule; the audit records carry the correlation id.
    other = next(i for i in corpus if i.national_id != nid)
    located = await gate.locate(_peer_ctx(gate, nid), action="retrieve", study_uid=one)
    assert located
    with pytest.raises(Exception, match="no such study"):
        await gate.locate(_peer_ctx(gate, nid), action="retrieve", study_uid=other.study_uid)
    async with gate.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log).order_by(audit_log.c.seq))).mappings().all()
    peer_rows = [r for r in rows if r["role"] == "peer" and r["hospital"] is not None]
    assert peer_rows and all("correlation=c0ffee00" in (r["detail"] or "") for r in peer_rows)
    assert {r["hospital"] for r in peer_rows} == {"H31010400007"}
    assert {r["outcome"] for r in peer_rows} >= {"ok", "denied"}


async def test_a_changed_identity_is_not_matched_by_its_old_token(world: tuple) -> None:
    gate, _, corpus = world
    nid = corpus[0].national_id
    assert await _found(gate, _peer_ctx(gate, nid))
    async with gate.engine.begin() as conn:
        await conn.execute(patients.update().where(patients.c.national_id == nid)
                           .values(national_id="11010519491231002X"))
    # Fail closed: the stale token row no longer describes the patient row.
    assert await _found(gate, _peer_ctx(gate, nid)) == set()


async def test_federation_subject_needs_a_grant_or_break_glass(world: tuple) -> None:
    gate, consents, corpus = world
    inst = corpus[0]
    me = Principal(subject="dr-li", role="hospital", province="110000", token_id="t",
                   hospital="H11099900001")
    query = parse_qido("study", [("PatientID", inst.patient_id),
                                 ("IssuerOfPatientID", inst.hospital.code)])
    ctx = AccessContext(principal=me, correlation_id="c0ffee00-0000-4000-8000-000000000002")
    refused = await gate.federation_subject(ctx, query, consents)
    assert isinstance(refused, str) and "no consent" in refused
    unknown = parse_qido("study", [("PatientID", "no-such-mrn")])
    assert await gate.federation_subject(ctx, unknown, consents) == refused
    assert "PatientID" in str(await gate.federation_subject(ctx, parse_qido("study", []), consents))
    request = parse_consent_request(
        {"national_id": inst.national_id, "purpose": "treatment", "evidence": "e",
         "valid_until": (NOW + timedelta(days=1)).isoformat()}, me, now=NOW, max_days=30)
    async with gate.engine.begin() as conn:
        grant = await consents.create(conn, request, me, NOW)
    subject = await gate.federation_subject(ctx, query, consents)
    assert isinstance(subject, FederationSubject)
    assert subject.patient_token == gate.tokens.for_national_id(inst.national_id)
    assert subject.consent is not None and subject.consent.id == grant.id
    emergency = AccessContext(principal=Principal(subject="dr-er", role="hospital",
                                                  province="110000", token_id="t",
                                                  hospital="H11099900002"),
                              break_glass_reason="trauma", now=datetime.now(UTC))
    bg = await gate.federation_subject(emergency, query, consents)
    assert isinstance(bg, FederationSubject) and bg.consent is None
    assert bg.break_glass_reason == "trauma"
    async with gate.engine.connect() as conn:
        rows = (await conn.execute(sa.select(audit_log.c.action, audit_log.c.outcome,
                                             audit_log.c.detail)
                                   .where(audit_log.c.action == "federated-search")
                                   .order_by(audit_log.c.seq))).all()
    assert [(r[0], r[1]) for r in rows] == [("federated-search", "denied"),
                                            ("federated-search", "ok"),
                                            ("federated-search", "ok")]
    assert "correlation=c0ffee00-0000-4000-8000-000000000002" in rows[0][2]


async def test_patients_indexed_after_a_peer_request_are_found_by_the_next(
        index: SqlIndex) -> None:
    corpus = make_corpus(seed=11, patients=4, studies_per_patient=1)
    people = sorted({i.national_id for i in corpus})
    first = [i for i in corpus if i.national_id != people[-1]]
    later = [i for i in corpus if i.national_id == people[-1]]
    await index_instances(index, first)
    gate = Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                break_glass_minutes=30)
    assert await _found(gate, _peer_ctx(gate, people[0]))
    assert await _found(gate, _peer_ctx(gate, people[-1])) == set()
    assert await gate.refresh_patient_tokens() == 0  # nothing new: no write
    await index_instances(index, later)
    assert await _found(gate, _peer_ctx(gate, people[-1])) == {i.study_uid for i in later}
