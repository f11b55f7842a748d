"""Encrypted PHI columns of the index, on real SQLite and PostgreSQL, with both suites.

No patient identifier in the database file (SQLite) or a ``pg_dump`` (PostgreSQL) after a
sync and a STOW with encryption on; QIDO-RS by PatientID, AccessionNumber and PatientName
(literal, fuzzy, pinyin) finds what a plain index finds; consent, patient, break-glass
and federation rules work on blind indexes; a cell moved between rows is refused; a plain
index is sealed in place, resumably, and re-sealed after a key rotation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from imaging_gateway.api.keys import TOKENS
from imaging_gateway.app import INDEX, create_app
from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.dicom.headers import parse_header
from imaging_gateway.dicom.synthetic import SyntheticInstance
from imaging_gateway.domain.names import name_search_keys, split_keys
from imaging_gateway.domain.qido import QidoPage, parse_qido
from imaging_gateway.errors import ConfigError, IntegrityError, InvalidQuery, KeyNotFound
from imaging_gateway.index.schema import (
    federation_patient_tokens,
    metadata,
    patient_name_keys,
    patients,
    studies,
)
from imaging_gateway.index.seal import seal_index
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import AuditLog
from imaging_gateway.security.consent import ConsentStore, parse_consent_request
from imaging_gateway.security.gate import AccessContext, Gate, PeerGrant
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal
from imaging_gateway.settings import IndexSettings, load_settings
from imaging_gateway.storage.encrypted import EncryptedStore
from imaging_gateway.storage.factory import open_store
from imaging_gateway.sync.runner import SyncRunner
from tests.factories import make_corpus
from tests.support.indexing import index_instances
from tests.support.seaweed import SeaweedServer

NOW = datetime.now(UTC)
UNTIL = (NOW + timedelta(days=10)).isoformat()
KEYRING = "encryption.keyring_file"
H1, H2, H3 = "H11000000001", "H11000000002", "H31000000003"


def make_ring(path: Path, suite: Suite, key_id: str = "gateway-110000") -> FileKeyring:
    return FileKeyring.create(path, setting=KEYRING, key_id=key_id, suite=suite)


@pytest.fixture(params=[Suite.AES_256_GCM, Suite.SM4_GCM], ids=["aes", "sm4"])
def ring(request: pytest.FixtureRequest, tmp_path: Path) -> FileKeyring:
    return make_ring(tmp_path / "keys" / "keyring.json", request.param)


@pytest.fixture
async def sealed(index_url: str, ring: FileKeyring) -> AsyncIterator[SqlIndex]:
    idx = await SqlIndex.open(IndexSettings(url=index_url), phi=PhiCodec(ring))
    yield idx
    await idx.close()


def hospital(code: str, subject: str = "pacs") -> Principal:
    return Principal(subject=subject, role="hospital", province="110000", token_id="t",
                     hospital=code)


def make_gate(index: SqlIndex) -> Gate:
    return Gate(index.engine, AuditLog(index.engine, b"k" * 32), PatientTokens(b"p" * 32),
                break_glass_minutes=30, search_engine=index.search_engine, phi=index.phi)


def phi_strings(corpus: list[SyntheticInstance]) -> set[str]:
    """Every identifying string of the corpus' patients and studies, as the index would
    hold them in the clear (values, PN groups, and the name search keys)."""
    out: set[str] = set()
    for inst in corpus:
        h = parse_header(inst.data, complete=True)
        p, s = h.patient, h.study
        out |= {p.PatientID, p.national_id or "", p.PatientBirthDate or "", s.AccessionNumber or ""}
        for name in (p.PatientName, s.ReferringPhysicianName):
            out |= set((name or "").split("="))
        # The name's own search keys: group keys and run-together forms (long enough not
        # to turn up by chance).
        out |= {k for k in split_keys(name_search_keys(p.PatientName)) if len(k.encode()) >= 6}
    return {s for s in out if len(s.encode()) >= 6}


async def database_bytes(index: SqlIndex, url: str) -> bytes:
    """What a stolen database shows: the SQLite file with its WAL, or a ``pg_dump``."""
    if index.dialect == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    proc = await asyncio.create_subprocess_exec(
        "pg_dump", "--no-owner", url.replace("postgresql+asyncpg", "postgresql"),
        stdout=asyncio.subprocess.PIPE)
    dump, _ = await proc.communicate()
    assert proc.returncode == 0 and b"CREATE TABLE public.patients" in dump
    return dump


async def all_text(index: SqlIndex) -> str:
    """Every value of every column of every table, as text."""
    parts: list[str] = []
    async with index.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in await conn.execute(sa.select(table)):
                parts.extend(str(v) for v in row)
    return "\n".join(parts)


def leaked(strings: set[str], blob: bytes) -> list[str]:
    return sorted(s for s in strings if s.encode() in blob)


# ---------------------------------------------------------------------------
# Through the app: sync a SeaweedFS bucket, STOW, search


@pytest.mark.seaweedfs
async def test_no_plaintext_phi_after_sync_and_stow(
    seaweedfs: SeaweedServer, tmp_path: Path, index_url: str
) -> None:
    suite = Suite.AES_256_GCM if index_url.startswith("sqlite") else Suite.SM4_GCM
    ring = make_ring(tmp_path / "data" / "keys" / "keyring.json", suite)
    bucket = seaweedfs.make_bucket(f"phi-{suite.name.lower().replace('_', '-')}")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
data_dir = "data"
write_store = "w"
[index]
url = "{index_url}"
[[stores]]
name = "bj"
kind = "s3"
endpoint = "{seaweedfs.endpoint}"
bucket = "{bucket}"
access_key_env = "AK"
secret_key_env = "SK"
[[stores]]
name = "w"
kind = "fs"
path = "{tmp_path / "w"}"
[encryption]
enabled = true
suite = "{suite.value}"
""", encoding="utf-8")
    settings = load_settings(cfg, environ={"AK": seaweedfs.access_key,
                                           "SK": seaweedfs.secret_key})
    synced = make_corpus(seed=31, patients=3, studies_per_patient=2)
    stowed = make_corpus(seed=32, patients=1)
    bj = EncryptedStore(open_store(settings.store("bj")), ring, encrypt_writes=True, suite=suite)
    try:
        for inst in synced:
            await bj.write_stream(inst.key, _one(inst.data))
    finally:
        await bj.close()

    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        index = app[INDEX]
        assert index.phi is not None
        runner = SyncRunner(settings, index, open_store(settings.store("bj")))
        await runner.start()
        assert (await runner.run()).status == "succeeded"
        await runner.store.close()

        code = stowed[0].hospital.code
        auth = {"Authorization": "Bearer " + app[TOKENS].issue(
            subject="pacs", role="hospital", hospital=code)}
        boundary = "phi-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + stowed[0].data + f"\r\n--{boundary}--\r\n".encode())
        r = await client.post("/dicomweb/studies", data=body, headers={
            **auth, "Content-Type": f'multipart/related; type="application/dicom"; '
                                    f"boundary={boundary}"})
        assert r.status == 200, await r.text()

        # QIDO-RS finds the stored study by each exact key and by name, decrypted.
        h = parse_header(stowed[0].data, complete=True)
        alphabetic = h.patient.PatientName.split("=")[0]
        for params in ({"PatientID": h.patient.PatientID},
                       {"AccessionNumber": h.study.AccessionNumber},
                       {"PatientName": alphabetic},
                       {"PatientName": alphabetic.split("^")[0].lower(), "fuzzymatching": "true"},
                       {"PatientName": alphabetic[:3].upper() + "*"}):
            got = await client.get("/dicomweb/studies", params={**params, "includefield": "all"},
                                   headers=auth)
            assert got.status == 200, (params, await got.text())
            (study,) = await got.json(content_type=None)
            assert study["0020000D"]["Value"] == [stowed[0].study_uid]
            assert study["00100020"]["Value"] == [h.patient.PatientID]
            assert study["00100010"]["Value"][0]["Alphabetic"] == alphabetic
        got = await client.get("/dicomweb/studies", params={"PatientName": "*an"}, headers=auth)
        assert got.status == 400 and "encrypted" in await got.text()
        # Retrieve (the gate's locate, its audit token from the opened identity).
        got = await client.get(f"/dicomweb/studies/{stowed[0].study_uid}/metadata", headers=auth)
        assert got.status == 200
        (meta,) = await got.json(content_type=None)
        assert meta["00100020"]["Value"] == [h.patient.PatientID]

        strings = phi_strings(synced + stowed)
        # The control: the objects themselves carry them.
        assert len(leaked(strings, b"".join(i.data for i in synced + stowed))) > 10
        assert leaked(strings, (await all_text(index)).encode()) == []
        assert leaked(strings, await database_bytes(index, index_url)) == []

    # The buckets: the synced objects were encrypted by the writer, the stored one by STOW.
    raw = open_store(settings.store("bj"))
    try:
        page = await raw.list_page()
        blob = b"".join([b"".join([c async for c in raw.read_stream(o.key)])
                         for o in page.objects])
    finally:
        await raw.close()
    blob += b"".join(p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file())
    assert leaked(strings, blob) == []


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


# ---------------------------------------------------------------------------
# The gate on an encrypted index


def queries_for(corpus: list[SyntheticInstance]) -> list[list[tuple[str, str]]]:
    """Searches an encrypted index answers, over the corpus' own values."""
    out: list[list[tuple[str, str]]] = [[]]
    for inst in corpus[:: max(1, len(corpus) // 4)]:
        h = parse_header(inst.data, complete=True)
        name = h.patient.PatientName or ""
        groups = [g for g in name.split("=") if g]
        out += [
            [("PatientID", h.patient.PatientID)],
            [("PatientID", h.patient.PatientID), ("IssuerOfPatientID", inst.hospital.code)],
            [("AccessionNumber", h.study.AccessionNumber or "")],
            [("AccessionNumber", "no-such-accession")],
            *([("PatientName", g)] for g in groups),
            [("PatientName", groups[0].upper())],
            [("PatientName", groups[0].replace("^", " ")), ("fuzzymatching", "true")],
            [("PatientName", "*")],
            [("PatientName", groups[0][:2] + "*")],
            [("PatientName", groups[0].split("^")[0].upper() + "^*")],
            [("PatientName", groups[0] + "*")],
        ]
        initials = "".join(re.findall(r"[A-ZÀ-Þ]", groups[0]))  # Zhao^XiaoDong: ZXD
        out.append([("PatientName", initials), ("fuzzymatching", "true")])
        if len(groups) > 1:
            ideographic = groups[1].replace("^", "")
            out += [[("PatientName", ideographic), ("fuzzymatching", "true")],
                    [("PatientName", ideographic[:1]), ("fuzzymatching", "true")],
                    [("PatientName", ideographic[:1] + "*")],
                    [("PatientName", f"{groups[0][:1]}*={ideographic[:1]}*")]]
    return out


async def search(gate: Gate, principal: Principal, params: list[tuple[str, str]],
                 level: str = "study") -> QidoPage:
    query = parse_qido(level, [*params, ("includefield", "all")])  # type: ignore[arg-type]
    return await gate.search(AccessContext(principal), query, max_results=1000)


def rows(page: QidoPage) -> list[tuple[str, Any]]:
    return sorted((r.study_instance_uid, sorted(r.attributes.items(), key=str))
                  for r in page.results)


async def test_encrypted_search_finds_what_the_plain_index_finds(
    sealed: SqlIndex, index_url: str, tmp_path: Path
) -> None:
    corpus = make_corpus(seed=7, patients=5, studies_per_patient=2)
    plain = await SqlIndex.open(IndexSettings(url=f"sqlite:///{tmp_path / 'plain.sqlite3'}"))
    try:
        await index_instances(plain, corpus, hospital=H1)
        await index_instances(sealed, corpus, hospital=H1)
        plain_gate, gate = make_gate(plain), make_gate(sealed)
        me = hospital(H1)
        for params in queries_for(corpus):
            want = await search(plain_gate, me, params)
            got = await search(gate, me, params)
            assert rows(got) == rows(want), params
            # Every PatientID, and every prefix of a latin (alphabetic) name, finds a study.
            value = params[0][1] if params else ""
            must = params and (params[0][0] == "PatientID" or (
                value.endswith("*") and value[:1].isascii() and value[:1].isalpha()
                and "=" not in value))
            assert want.results or not must, params
            assert [r.national_id for r in got.results] == [r.national_id for r in want.results]
        for level in ("series", "instance"):
            params = [("PatientID", corpus[0].patient_id)]
            want = await search(plain_gate, me, params, level)
            got = await search(gate, me, params, level)
            assert [sorted(r.attributes.items(), key=str) for r in got.results] == [
                sorted(r.attributes.items(), key=str) for r in want.results]
    finally:
        await plain.close()
    # Refused with a clear 400, not answered wrongly.
    for params in ([("PatientName", "*an")], [("PatientName", "Zh?ng*")],
                   [("PatientName", "Zh*ng")], [("PatientID", "01*")],
                   [("PatientBirthDate", "19600101-19991231")],
                   [("StudyDescription", "CT")], [("AccessionNumber", "A2*")]):
        with pytest.raises(InvalidQuery, match="encrypted"):
            await search(gate, me, params)
    # The name keys are blinded; name_search holds nothing.
    async with sealed.engine.connect() as conn:
        keys = {r[0] for r in await conn.execute(sa.select(patient_name_keys.c.key))}
        assert keys and all(len(k) == 64 for k in keys)
        assert {r[0] for r in await conn.execute(sa.select(patients.c.name_search))} == {None}


async def test_a_cell_moved_to_another_row_is_refused(sealed: SqlIndex) -> None:
    corpus = make_corpus(seed=8, patients=2)
    await index_instances(sealed, corpus, hospital=H1)
    gate = make_gate(sealed)
    async with sealed.engine.begin() as conn:
        a, b = (await conn.execute(sa.select(patients.c.id, patients.c.PatientName)
                                   .order_by(patients.c.id))).all()
        await conn.execute(patients.update().where(patients.c.id == a[0])
                           .values(PatientName=b[1]))
    with pytest.raises(IntegrityError, match=r"patients\.PatientName.*moved from another row"):
        await search(gate, hospital(H1), [])
    async with sealed.engine.begin() as conn:
        await conn.execute(patients.update().where(patients.c.id == a[0])
                           .values(PatientName="Wang^Wu"))
    with pytest.raises(IntegrityError, match="plain value"):
        await search(gate, hospital(H1), [])
    async with sealed.engine.begin() as conn:
        await conn.execute(patients.update().where(patients.c.id == a[0])
                           .values(PatientName=a[1]))
        x, y = (await conn.execute(sa.select(studies.c.id, studies.c.AccessionNumber)
                                   .order_by(studies.c.id))).all()
        await conn.execute(studies.update().where(studies.c.id == x[0])
                           .values(AccessionNumber=y[1]))
    with pytest.raises(IntegrityError, match=r"studies\.AccessionNumber"):
        await search(gate, hospital(H1), [])


async def test_consent_patient_break_glass_and_federation_on_blind_indexes(
    sealed: SqlIndex,
) -> None:
    # Each patient seen at two hospitals under the same national identity.
    corpus = make_corpus(seed=7, patients=4, studies_per_patient=3)
    await index_instances(sealed, corpus)
    gate, consents = make_gate(sealed), ConsentStore(sealed.engine, phi=sealed.phi)
    target = next(i for i in corpus if any(
        j.national_id == i.national_id and j.hospital.code != i.hospital.code for j in corpus))
    theirs = {i.study_uid for i in corpus if i.national_id == target.national_id}
    other = next(
        j.hospital.code for j in corpus
        if j.national_id == target.national_id and j.hospital.code != target.hospital.code)

    async def seen(principal: Principal, params: list[tuple[str, str]] | None = None,
                   **ctx: Any) -> set[str]:
        query = parse_qido("study", params or [])
        page = await gate.search(AccessContext(principal, **ctx), query, max_results=1000)
        return {r.study_instance_uid for r in page.results}

    before = await seen(hospital(other))
    assert not theirs <= before
    request = parse_consent_request(
        {"national_id": target.national_id, "purpose": "treatment", "evidence": "scan-ref-1",
         "valid_until": UNTIL}, hospital(other), now=NOW, max_days=30)
    async with sealed.engine.begin() as conn:
        grant = await consents.create(conn, request, hospital(other), NOW)
    assert theirs <= await seen(hospital(other))
    (listed,) = await consents.list(national_id=target.national_id)
    assert (listed.id, listed.national_id, listed.evidence) == (
        grant.id, target.national_id, "scan-ref-1")
    assert (await consents.get(grant.id)).national_id == target.national_id

    patient = Principal(subject="p", role="patient", province="110000", token_id="t",
                        national_id=target.national_id)
    assert await seen(patient) == theirs

    # Break-glass from a search by PatientID opens every record of the person.
    stranger = next(i for i in corpus if i.national_id != target.national_id)
    third = "H99999999999"
    assert await seen(hospital(third)) == set()
    got = await seen(hospital(third), [("PatientID", target.patient_id),
                                       ("IssuerOfPatientID", target.hospital.code)],
                     break_glass_reason="trauma")
    assert got == {i.study_uid for i in corpus if i.patient_id == target.patient_id}
    assert theirs <= await seen(hospital(third))
    assert stranger.study_uid not in await seen(hospital(third))

    # Federation: the token rows hold the identity's blind index, and a peer finds the
    # patient by token.
    await gate.refresh_patient_tokens()
    async with sealed.engine.connect() as conn:
        stored = {r[0] for r in await conn.execute(
            sa.select(federation_patient_tokens.c.national_id))}
    assert target.national_id not in stored and all(len(v) == 64 for v in stored if v)
    peer = Principal(subject="imaging-gateway:310000", role="peer", province="310000",
                     token_id="j")
    grant_ = PeerGrant(patient_token=gate.tokens.for_national_id(target.national_id),
                       scope="all", hospital="H31010400007")
    assert await seen(peer, peer=grant_) == theirs
    subject = await gate.federation_subject(
        AccessContext(hospital(other)),
        parse_qido("study", [("PatientID", target.patient_id),
                             ("IssuerOfPatientID", target.hospital.code)]), consents)
    assert not isinstance(subject, str)
    assert subject.patient_token == grant_.patient_token and subject.consent is not None


# ---------------------------------------------------------------------------
# seal-index, rotation, wrong keys


async def test_seal_index_in_place_resumable_and_after_rotation(
    index_url: str, ring: FileKeyring, tmp_path: Path
) -> None:
    corpus = make_corpus(seed=9, patients=4, studies_per_patient=2)
    settings = IndexSettings(url=index_url)
    phi = PhiCodec(ring)
    plain = await SqlIndex.open(settings)
    try:
        await index_instances(plain, corpus, hospital=H1)
        request = parse_consent_request(
            {"national_id": corpus[0].national_id, "purpose": "treatment", "evidence": "e-1",
             "valid_until": UNTIL}, hospital(H2), now=NOW, max_days=30)
        async with plain.engine.begin() as conn:
            await ConsentStore(plain.engine).create(conn, request, hospital(H2), NOW)
        await make_gate(plain).refresh_patient_tokens()
        me = hospital(H1)
        want = {tuple(p): rows(await search(make_gate(plain), me, p))
                for p in queries_for(corpus)}
        counts = await plain.stats()
        assert len(leaked(phi_strings(corpus), (await all_text(plain)).encode())) > 10
    finally:
        await plain.close()

    with pytest.raises(ConfigError, match="seal-index"):
        await SqlIndex.open(settings, phi=phi)
    index = await SqlIndex.open(settings, phi=phi, check_phi=False)
    try:
        # A run killed after its first batch: the next one finishes the job.
        class Killed(Exception):
            pass

        def kill(table: str, n: int) -> None:
            raise Killed

        with pytest.raises(Killed):
            await seal_index(index, batch=2, progress=kill)
        rest = await seal_index(index, batch=3)
        assert rest == {"patients": counts["patients"] - 2, "studies": counts["studies"],
                        "series": counts["series"], "consents": 1}
        assert await seal_index(index) == {"patients": 0, "studies": 0, "series": 0,
                                           "consents": 0}
        assert leaked(phi_strings(corpus), (await all_text(index)).encode()) == []
        # Not in freed pages or the WAL either.
        assert leaked(phi_strings(corpus), await database_bytes(index, index_url)) == []
    finally:
        await index.close()
    with pytest.raises(ConfigError, match="encrypted"):
        await SqlIndex.open(settings)

    index = await SqlIndex.open(settings, phi=phi)
    try:
        gate = make_gate(index)
        for params, expected in want.items():
            assert rows(await search(gate, me, list(params))) == expected, params
        consents = ConsentStore(index.engine, phi=phi)
        (c,) = await consents.list(national_id=corpus[0].national_id)
        assert c.evidence == "e-1"
        assert corpus[0].study_uid in {  # the consent rule joins on the blind indexes
            r.study_instance_uid for r in (await search(gate, hospital(H2), [])).results}
        peer = Principal(subject="imaging-gateway:310000", role="peer", province="310000",
                         token_id="j")
        grant = PeerGrant(patient_token=gate.tokens.for_national_id(corpus[0].national_id),
                          scope="all", hospital=H3)
        page = await gate.search(AccessContext(peer, peer=grant), parse_qido("study", []),
                                 max_results=100)
        assert {r.study_instance_uid for r in page.results} == {
            i.study_uid for i in corpus if i.national_id == corpus[0].national_id}

    finally:
        await index.close()

    # Rotation re-wraps the index's data key at the next open; no cell is re-encrypted,
    # and the old version can go.
    old = ring.current_version
    ring.rotate()
    index = await SqlIndex.open(settings, phi=PhiCodec(ring))
    try:
        assert await index.phi_key_versions() == {(ring.key_id, ring.current_version)}
        assert await seal_index(index) == {"patients": 0, "studies": 0, "series": 0,
                                           "consents": 0}
    finally:
        await index.close()
    ring.retire(old)
    index = await SqlIndex.open(settings, phi=PhiCodec(ring))
    try:
        for params, expected in list(want.items())[:8]:
            assert rows(await search(make_gate(index), me, list(params))) == expected, params
    finally:
        await index.close()

    # Another keyring: the error names the key id the index needs.
    stranger = make_ring(tmp_path / "other" / "keyring.json", ring.suite, key_id="other-key")
    with pytest.raises(KeyNotFound, match="gateway-110000"):
        await SqlIndex.open(settings, phi=PhiCodec(stranger))
