"""Federation over real gateway processes: three provinces over HTTPS with mTLS, bad peers.

Beijing (110000) is the home gateway. Shanghai (310000) and Guangdong (440000) are
responding gateways, each with its own index and store, one shared patient-token key.
Jiangsu (320000) is a plain DICOMweb server (a gateway nobody wired for federation,
reached with a bearer credential). 120000 is a closed port, 130000 never answers, 140000
answers garbage, 150000 an oversized array.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import secrets
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.uid import generate_uid

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import FileKeyring
from imaging_gateway.dicom.synthetic import HOSPITALS, SyntheticInstance, generate_instances
from imaging_gateway.federation.assertions import ConsentClaim, issue_assertion
from imaging_gateway.federation.client import ASSERTION_HEADER
from imaging_gateway.federation.fanout import holding_province
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from tests.e2e.test_dicomweb import parts
from tests.support.gateway import ForkedGateway, free_port
from tests.support.pki import issue, make_ca, write_cert, write_issued

PROVINCE_OF = {h.code: h.province for h in HOSPITALS}
GATEWAYS = ("110000", "310000", "440000")
PLAIN = "320000"
PLAIN_HOSPITAL = "H32010200001"
DEAD, SLOW, GARBAGE, OVERSIZED = "120000", "130000", "140000", "150000"
# Long enough that a healthy peer on a loaded 2-core machine answers within it (1,000 ms
# was missed there); the stalled peer never answers, so what is tested does not depend on it.
DEADLINE_MS = 3000

CONFIG = """
[gateway]
province = "{province}"
listen = "127.0.0.1:{port}"
data_dir = "data"

[index]
url = "sqlite:///data/index.sqlite3"

[[stores]]
name = "fs"
kind = "fs"
path = "store"
{store_hospital}
{tables}
[tls]
cert_file = "{pki}/gw-{province}.crt"
key_file = "{pki}/gw-{province}.key"
client_ca_file = "{pki}/ca.crt"
ca_file = "{pki}/ca.crt"

[federation]
enabled = {enabled}
deadline_ms = {deadline}
max_answer_bytes = 262144
breaker_failures = 1000
{cache}
{peers}
"""

# Beijing keeps what it retrieves from other provinces, encrypted (federation/cache.py).
HOME_CACHE_STORE = """
[[stores]]
name = "fed-cache"
kind = "fs"
path = "fed-cache"

[encryption]
enabled = true
"""

# Shanghai answers from an encrypted index (PHI columns sealed with SM4-GCM, looked up by
# blind index): its patient-token rows hold the identity's blind index only.
SM4_INDEX = """
[encryption]
enabled = true
suite = "SM4-GCM"
"""

PEER = """
[[federation.peers]]
province = "{province}"
name = "{name}"
base_url = "https://127.0.0.1:{port}/dicomweb"
kind = "{kind}"
ca_file = "{pki}/ca.crt"
{extra}
"""


@dataclass
class World:
    root: Path
    gws: dict[str, ForkedGateway]
    keys: dict[str, Ed25519PrivateKey]
    corpus: dict[str, list[SyntheticInstance]]
    national_id: str
    hospital: str
    """The Beijing hospital whose PACS asks (it holds one of the patient's studies)."""
    patient_id: str
    other_hospital: str
    """A Beijing hospital without any grant for the patient."""
    plain_study: str
    client_ssl: ssl.SSLContext
    peer_ssl: ssl.SSLContext
    """Presents the Beijing gateway's certificate (mTLS to a responding gateway)."""
    fake_log: Path

    def token(self, province: str, hospital: str | None, subject: str,
              role: str = "hospital") -> dict[str, str]:
        """A bearer token of ``province``'s gateway (its key file, in this process)."""
        key = load_or_create_signing_key(
            self.gws[province].config.parent / "data" / "keys" / "token-signing.pem")
        authority = TokenAuthority(key, province=province, max_ttl_s=3600)
        return {"Authorization": "Bearer " + authority.issue(
            subject=subject, role=role, hospital=hospital, ttl_s=3600)}

    def studies(self, province: str) -> set[str]:
        """The patient's studies a federated search by the home PatientID finds there.

        At home that is the studies under that PatientID (a local search's meaning);
        elsewhere every study of the same person (matched by patient token).
        """
        return {
            i.study_uid for i in self.corpus[province]
            if i.national_id == self.national_id
            and (province != "110000" or i.patient_id == self.patient_id)
        }

    def audit(self, province: str) -> list[dict[str, Any]]:
        db = sqlite3.connect(self.gws[province].config.parent / "data" / "index.sqlite3")
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM audit_log ORDER BY seq")]
        finally:
            db.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)
    path.chmod(0o600)


def _plain_copy(inst: SyntheticInstance, patient_id: str, issuer: str) -> bytes:
    """The instance as a regional archive sharing Beijing's PatientID domain holds it."""
    ds = pydicom.dcmread(io.BytesIO(inst.data))
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = _plain_copy_uid(inst)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[inst.series_uid, PLAIN])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[inst.sop_uid, PLAIN])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("federation")
    pki = root / "pki"
    pki.mkdir()
    ca = make_ca("federation test CA")
    write_cert(pki / "ca.crt", ca[1])
    for p in (*GATEWAYS, PLAIN, "fake"):
        write_issued(pki, f"gw-{p}", issue(ca, f"gateway {p}", dns=("localhost",),
                                           ips=("127.0.0.1",), server=True, client=True))
    corpus = list(generate_instances(seed=1, patients=6, studies_per_patient=4,
                                     instances_per_series=1, series_per_study=1,
                                     pixel_mode="small"))
    by_province: dict[str, list[SyntheticInstance]] = {p: [] for p in GATEWAYS}
    for inst in corpus:
        by_province[PROVINCE_OF[inst.hospital.code]].append(inst)
    nid = next(n for n in sorted({i.national_id for i in corpus})
               if all(any(i.national_id == n for i in by_province[p]) for p in GATEWAYS))
    home_inst = next(i for i in by_province["110000"] if i.national_id == nid)
    hospital, patient_id = home_inst.hospital.code, home_inst.patient_id
    other = next(h.code for h in HOSPITALS if h.province == "110000" and h.code != hospital)
    remote_inst = next(i for i in by_province["440000"] if i.national_id == nid)
    plain_bytes = _plain_copy(remote_inst, patient_id, hospital)

    ports = {p: free_port() for p in (*GATEWAYS, PLAIN, SLOW, GARBAGE, OVERSIZED)}
    ports[DEAD] = _closed_port()
    keys = {p: Ed25519PrivateKey.generate() for p in GATEWAYS}
    token_key = secrets.token_bytes(32)
    plain_credential = "PLAIN_PEER_TOKEN"
    gws: dict[str, ForkedGateway] = {}
    client_ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    for p in (*GATEWAYS, PLAIN):
        d = root / p
        (d / "federation").mkdir(parents=True)
        _write_private(d / "data" / "keys" / "patient-token.key", token_key)
        if p in keys:
            _write_private(d / "data" / "keys" / "federation-signing.pem", keys[p].private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        for q, key in keys.items():
            (d / "federation" / f"{q}.pub").write_bytes(key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        store = d / "store"
        instances = by_province.get(p, [])
        for inst in instances:
            (store / inst.key).parent.mkdir(parents=True, exist_ok=True)
            (store / inst.key).write_bytes(inst.data)
        if p == PLAIN:
            (store / "plain" / "copy.dcm").parent.mkdir(parents=True, exist_ok=True)
            (store / "plain" / "copy.dcm").write_bytes(plain_bytes)

        def peer(q: str, kind: str = "gateway", extra: str = "") -> str:
            if kind == "gateway" and not extra:
                extra = f'public_key_file = "federation/{q}.pub"'
            return PEER.format(province=q, name=f"peer {q}", port=ports[q], kind=kind,
                               pki=pki, extra=extra)

        if p == "110000":
            peers = "".join([
                peer("310000"), peer("440000"),
                peer(PLAIN, "dicomweb", f'credential_env = "{plain_credential}"'),
                *(peer(q, "dicomweb") for q in (DEAD, SLOW, GARBAGE, OVERSIZED)),
            ])
        elif p == PLAIN:
            peers = ""
        else:
            peers = peer("110000", extra=('public_key_file = "federation/110000.pub"\n'
                                          'certificate_subject = "gateway 110000"'))
        config = d / "gateway.toml"
        config.write_text(CONFIG.format(
            province=p, port=ports[p], pki=pki, peers=peers, deadline=DEADLINE_MS,
            enabled="false" if p == PLAIN else "true",
            store_hospital=f'hospital = "{PLAIN_HOSPITAL}"' if p == PLAIN else "",
            tables={"110000": HOME_CACHE_STORE, "310000": SM4_INDEX}.get(p, ""),
            cache='cache_store = "fed-cache"' if p == "110000" else "",
        ), encoding="utf-8")
        if p == "110000":
            (d / "fed-cache").mkdir()
            FileKeyring.create(d / "data" / "keys" / "keyring.json",
                               setting="encryption.keyring_file", key_id="bj")
        if p == "310000":
            FileKeyring.create(d / "data" / "keys" / "keyring.json",
                               setting="encryption.keyring_file", key_id="sh",
                               suite=Suite.SM4_GCM)
        gws[p] = ForkedGateway(config, ports[p], ssl_context=client_ssl)

    # The plain peer's credential: a bearer token it issued, in an environment variable.
    plain = TokenAuthority(load_or_create_signing_key(
        root / PLAIN / "data" / "keys" / "token-signing.pem"), province=PLAIN, max_ttl_s=86400)
    gws["110000"] = ForkedGateway(gws["110000"].config, ports["110000"], ssl_context=client_ssl,
                                   env={plain_credential: plain.issue(
                                       subject="federation", role="hospital",
                                       hospital=PLAIN_HOSPITAL)})

    def up(p: str) -> None:
        gws[p].start(timeout=60)
        _sync(gws[p], p, client_ssl)

    fake_log = root / "fake-peer.jsonl"
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_peer", "--cert", str(pki / "gw-fake.crt"),
         "--key", str(pki / "gw-fake.key"), "--log", str(fake_log),
         f"slow={ports[SLOW]}", f"garbage={ports[GARBAGE]}", f"oversized={ports[OVERSIZED]}"],
        stdout=subprocess.PIPE, text=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(up, gws))
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        peer_ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        peer_ssl.load_cert_chain(pki / "gw-110000.crt", pki / "gw-110000.key")
        yield World(root, gws, keys, by_province, nid, hospital, patient_id, other,
                    _plain_copy_uid(remote_inst), client_ssl, peer_ssl, fake_log)
    finally:
        for gw in gws.values():
            gw.stop()
        fake.terminate()
        fake.wait(10)


def _sync(gw: ForkedGateway, province: str, ctx: ssl.SSLContext) -> None:
    """Index the gateway's store through its admin API (no extra process)."""
    import urllib.request

    key = load_or_create_signing_key(gw.config.parent / "data" / "keys" / "token-signing.pem")
    admin = TokenAuthority(key, province=province, max_ttl_s=3600).issue(
        subject="admin", role="admin", ttl_s=600)
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"{gw.base}/admin/sync-jobs", data=b'{"store": "fs"}',
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, context=ctx) as r:
        job = json.loads(r.read())
    for _ in range(600):
        req = urllib.request.Request(f"{gw.base}/admin/sync-jobs/{job['id']}", headers=headers)
        with urllib.request.urlopen(req, context=ctx) as r:
            job = json.loads(r.read())
        if job["status"] != "running":
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded", job


def _plain_copy_uid(inst: SyntheticInstance) -> str:
    return str(generate_uid(entropy_srcs=[inst.study_uid, PLAIN]))


@pytest.fixture(scope="module")
def consent(world: World) -> dict[str, Any]:
    """The patient's grant, recorded at home, to the asking hospital."""
    import urllib.request

    until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    body = json.dumps({"national_id": world.national_id, "purpose": "treatment",
                       "evidence": "e-voucher 77", "valid_until": until}).encode()
    req = urllib.request.Request(
        f"{world.gws['110000'].base}/consents", data=body, method="POST",
        headers={**world.token("110000", world.hospital, "dr-li"),
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=world.client_ssl) as r:
        assert r.status == 201
        grant: dict[str, Any] = json.loads(r.read())
        return grant


async def _federated(world: World, headers: dict[str, str], **extra: str
                     ) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
    params = {"PatientID": world.patient_id, "IssuerOfPatientID": world.hospital,
              "federated": "true", **extra}
    async with aiohttp.ClientSession() as http, http.get(
            f"{world.gws['110000'].base}/dicomweb/studies", params=params, headers=headers,
            ssl=world.client_ssl) as r:
        body = await r.read()
        return r.status, dict(r.headers), json.loads(body) if body else []


def _uids(datasets: list[dict[str, Any]]) -> dict[str, str | None]:
    return {d["0020000D"]["Value"][0]: holding_province(d) for d in datasets}


def _correlation(row: dict[str, Any]) -> str | None:
    detail = row.get("detail") or ""
    for word in detail.split():
        if word.startswith("correlation="):
            return word.split("=", 1)[1]
    return None


async def test_without_consent_no_peer_is_asked(world: World) -> None:
    status, headers, datasets = await _federated(
        world, world.token("110000", world.other_hospital, "dr-wu"))
    assert status in (200, 204)
    assert "no consent grant" in headers["Warning"]
    assert json.loads(headers["X-Federation-Peers"]) == []
    remote = world.studies("310000") | world.studies("440000")
    assert not remote & set(_uids(datasets))
    row = [r for r in world.audit("110000") if r["action"] == "federated-search"][-1]
    assert row["outcome"] == "denied" and row["hospital"] == world.other_hospital
    assert _correlation(row) == headers["X-Correlation-ID"]


async def test_with_consent_finds_every_province_and_names_failed_peers(
        world: World, consent: dict[str, Any]) -> None:
    # 130000 never answers: that an answer comes at all is the deadline's doing.
    status, headers, datasets = await _federated(
        world, world.token("110000", world.hospital, "dr-li"))
    assert status == 200
    found = _uids(datasets)
    for p in GATEWAYS:
        assert world.studies(p) <= set(found), p
        assert all(found[u] == p for u in world.studies(p))
    assert found[world.plain_study] == PLAIN
    warning = headers["Warning"]
    assert f"peer {SLOW} timed out" in warning
    assert f"peer {DEAD} failed" in warning
    assert f"peer {GARBAGE} failed: answer is not JSON" in warning
    assert f"peer {OVERSIZED} failed: answer larger than" in warning
    outcomes = {o["province"]: o["status"] for o in json.loads(headers["X-Federation-Peers"])}
    assert outcomes == {"310000": "ok", "440000": "ok", PLAIN: "ok", DEAD: "error",
                        SLOW: "timeout", GARBAGE: "error", OVERSIZED: "error"}
    for d in datasets:
        uid = d["0020000D"]["Value"][0]
        if found[uid] != "110000":
            url = d["00081190"]["Value"][0]
            assert url == (f"{world.gws['110000'].base}/dicomweb/federation/"
                           f"{found[uid]}/studies/{uid}")
            # Shown under the PatientID the PACS asked with.
            assert d["00100020"]["Value"] == [world.patient_id]
    # Both sides audit the access under one correlation id.
    cid = headers["X-Correlation-ID"]
    home = [r for r in world.audit("110000") if _correlation(r) == cid]
    assert {(r["action"], r["outcome"]) for r in home} >= {("federated-search", "ok"),
                                                          ("search", "ok")}
    token = PatientTokens(
        (world.gws["310000"].config.parent / "data/keys/patient-token.key").read_bytes()
    ).for_national_id(world.national_id)
    for p in ("310000", "440000"):
        remote = [r for r in world.audit(p) if _correlation(r) == cid]
        assert remote and all(r["role"] == "peer" and r["hospital"] == world.hospital
                              for r in remote), p
        assert {r["patient_token"] for r in remote} == {token}


def test_the_encrypted_peer_index_holds_no_identity(world: World) -> None:
    """Shanghai answered the federated searches above from sealed cells and blind indexes."""
    def index_bytes(province: str) -> bytes:
        data = world.gws[province].config.parent / "data"
        return b"".join(p.read_bytes() for p in data.glob("index.sqlite3*"))

    assert world.national_id.encode() in index_bytes("440000")  # the plain one
    assert world.national_id.encode() not in index_bytes("310000")
    assert world.national_id.encode() not in index_bytes("110000")


async def test_nothing_identifying_is_sent_to_peers(world: World, consent: dict[str, Any]
                                                    ) -> None:
    await _federated(world, world.token("110000", world.hospital, "dr-li"))
    sent = world.fake_log.read_text(encoding="utf-8")
    assert sent
    # dicomweb peers get the caller's PatientID by design (documented); gateway peers
    # get no patient attribute at all, only the token inside the assertion.
    assert world.national_id not in sent
    # A gateway peer's answer: the token as PatientID, none of its local IDs.
    answer = await _signed(world, "310000", "/dicomweb/studies", [])
    text = answer[2].decode()
    assert world.national_id not in text
    remote_ids = {i.patient_id for i in world.corpus["310000"] if i.national_id == world.national_id}
    assert not any(pid in text for pid in remote_ids)
    assert "IMAGING-GATEWAY-PATIENT-TOKEN" in text


async def _signed(world: World, province: str, path: str, query: list[tuple[str, str]], *,
                  key: Ed25519PrivateKey | None = None, token: str | None = None,
                  cert: bool = True) -> tuple[int, str, bytes, str]:
    """A request as the Beijing gateway sends it to ``province``: (status, type, body, jwt)."""
    nid = world.national_id
    tokens = PatientTokens(
        (world.gws["310000"].config.parent / "data/keys/patient-token.key").read_bytes())
    if token is None:
        token = issue_assertion(
            key or world.keys["110000"], issuer="110000", audience=province,
            subject="imaging-gateway:110000", hospital=world.hospital, purpose="treatment",
            patient_token=tokens.for_national_id(nid), correlation_id=str(uuid.uuid4()),
            method="GET", path=path, query=query,
            consent=ConsentClaim(id="c-1", scope="all",
                                 valid_until=datetime.now(UTC) + timedelta(hours=1)))
    ctx = world.peer_ssl if cert else world.client_ssl
    url = f"{world.gws[province].base}{path}"
    async with aiohttp.ClientSession() as http, http.get(
            url, params=query, headers={ASSERTION_HEADER: token}, ssl=ctx) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read(), token


async def test_forged_assertion_is_refused_and_audited(world: World) -> None:
    rogue = Ed25519PrivateKey.generate()
    status, _, body, token = await _signed(world, "310000", "/dicomweb/studies", [], key=rogue)
    assert status == 401 and b"bad signature" in body
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    row = world.audit("310000")[-1]
    assert (row["action"], row["outcome"], row["role"]) == ("federation", "denied", "peer")
    assert _correlation(row) == claims["correlation_id"]


async def test_replayed_assertion_is_refused(world: World) -> None:
    status, _, _, token = await _signed(world, "440000", "/dicomweb/studies", [])
    assert status == 200
    again = await _signed(world, "440000", "/dicomweb/studies", [], token=token)
    assert again[0] == 401 and b"replayed" in again[2]
    # Bound to its request: a fresh assertion for one path is refused on another.
    fresh = await _signed(world, "440000", "/dicomweb/studies", [], token=None)
    assert fresh[0] == 200
    moved = await _signed(world, "440000", "/dicomweb/studies", [("StudyDate", "2020-")],
                          token=(await _signed(world, "440000", "/dicomweb/series", []))[3])
    assert moved[0] == 401 and b"binding mismatch" in moved[2]


async def test_peer_without_client_certificate_is_refused(world: World) -> None:
    status, _, body, _ = await _signed(world, "310000", "/dicomweb/studies", [], cert=False)
    assert status == 403 and b"client certificate" in body


async def test_break_glass_across_provinces(world: World) -> None:
    headers = {**world.token("110000", world.other_hospital, "dr-er"),
               "X-Break-Glass-Reason": "unconscious patient, trauma bay 2"}
    status, answer, datasets = await _federated(world, headers)
    assert status == 200
    assert world.studies("310000") <= set(_uids(datasets))
    cid = answer["X-Correlation-ID"]
    home = [r for r in world.audit("110000") if _correlation(r) == cid]
    assert any(r["action"] == "federated-search" and r["detail"].startswith("break-glass")
               for r in home)
    remote = [r for r in world.audit("310000") if _correlation(r) == cid]
    assert remote and all(r["break_glass_reason"] == "unconscious patient, trauma bay 2"
                          and r["purpose"] == "emergency" for r in remote)


async def test_retrieve_through_home_streams_identical_bytes(world: World,
                                                             consent: dict[str, Any]) -> None:
    me = world.token("110000", world.hospital, "dr-li")
    await _federated(world, me)
    base = world.gws["110000"].base
    async with aiohttp.ClientSession() as http:
        for p in ("310000", PLAIN):
            study = (sorted(world.studies(p)) or [world.plain_study])[0] if p != PLAIN \
                else world.plain_study
            async with http.get(f"{base}/dicomweb/federation/{p}/studies/{study}", headers=me,
                                ssl=world.client_ssl) as r:
                assert r.status == 200, await r.text()
                whole, etag = await r.read(), r.headers.get("ETag")
                got = parts(whole, r.headers["Content-Type"])
            if p != PLAIN:
                assert sorted(got) == sorted(i.data for i in world.corpus[p]
                                             if i.study_uid == study)
                # Broken off half-way: the rest from where it stopped, the same version.
                assert etag is not None
                half = len(whole) // 2
                async with http.get(f"{base}/dicomweb/federation/{p}/studies/{study}",
                                    headers={**me, "Range": f"bytes={half}-", "If-Range": etag},
                                    ssl=world.client_ssl) as r:
                    assert r.status == 206, await r.text()
                    assert r.headers["Content-Range"] == \
                        f"bytes {half}-{len(whole) - 1}/{len(whole)}"
                    assert whole[:half] + await r.read() == whole
                async with http.get(f"{base}/dicomweb/federation/{p}/studies/{study}",
                                    headers={**me, "If-None-Match": etag},
                                    ssl=world.client_ssl) as r:
                    assert r.status == 304
            else:
                assert len(got) == 1 and pydicom.dcmread(io.BytesIO(got[0])).PatientID \
                    == world.patient_id
        # A study nobody searched for, or another hospital's find: nothing.
        study = sorted(world.studies("440000"))[0]
        other = world.token("110000", "H11099900001", "dr-wu")
        async with http.get(f"{base}/dicomweb/federation/440000/studies/{study}",
                            headers=other, ssl=world.client_ssl) as r:
            assert r.status == 404
        async with http.get(f"{base}/dicomweb/federation/440000/studies/{study}/metadata",
                            headers=me, ssl=world.client_ssl) as r:
            assert r.status == 200
            metadata = await r.json()
        assert metadata[0]["0020000D"]["Value"] == [study]
        pixel = metadata[0]["7FE00010"]["BulkDataURI"]
        assert pixel.startswith(f"{base}/dicomweb/federation/440000/studies/{study}/series/")
        async with http.get(pixel, headers=me, ssl=world.client_ssl) as r:
            assert r.status == 200, await r.text()


async def test_a_cached_study_is_served_only_after_the_holder_agrees(
        world: World, consent: dict[str, Any]) -> None:
    """Beijing's second retrieve of a Shanghai study asks Shanghai again (If-None-Match):
    Shanghai checks the assertion and consent and answers 304; Beijing then sends its
    encrypted copy, the same bytes, and nothing of the study is readable at rest."""
    me = world.token("110000", world.hospital, "dr-li")
    await _federated(world, me)
    study = sorted(world.studies("310000"))[-1]
    url = f"{world.gws['110000'].base}/dicomweb/federation/310000/studies/{study}"
    holder = world.gws["310000"]
    answers: list[bytes] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(url, headers=me, ssl=world.client_ssl) as r:
                assert r.status == 200, await r.text()
                answers.append(await r.read())
    assert answers[0] == answers[1]
    assert sorted(parts(answers[1], r.headers["Content-Type"])) == sorted(
        i.data for i in world.corpus["310000"] if i.study_uid == study)
    path = f'"GET /dicomweb/studies/{study}"'
    statuses = [line.split(path)[1].split()[0] for line in holder.logs().splitlines()
                if path in line]
    # The first answer was copied into the cache (here or by an earlier test), the
    # second came from it once Shanghai had agreed.
    assert "200" in statuses and statuses[-1] == "304", statuses
    cached = [p for p in (world.root / "110000" / "fed-cache").rglob("*") if p.is_file()]
    assert cached
    patient_id = next(i.patient_id for i in world.corpus["310000"] if i.study_uid == study)
    for p in cached:
        raw = p.read_bytes()
        assert b"DICM" not in raw and patient_id.encode() not in raw
    # Not a source of studies: a sync of it is refused.
    home = world.gws["110000"]
    key = load_or_create_signing_key(home.config.parent / "data" / "keys" / "token-signing.pem")
    admin = TokenAuthority(key, province="110000", max_ttl_s=3600).issue(
        subject="admin", role="admin", ttl_s=600)
    async with aiohttp.ClientSession() as http, http.post(
            f"{home.base}/admin/sync-jobs", json={"store": "fed-cache"},
            headers={"Authorization": f"Bearer {admin}"}, ssl=world.client_ssl) as r:
        assert r.status == 400
        assert "federation cache" in (await r.json())["message"]


async def test_series_search_and_retrieve_audit_share_correlation(
        world: World, consent: dict[str, Any]) -> None:
    me = world.token("110000", world.hospital, "dr-li")
    params = {"PatientID": world.patient_id, "IssuerOfPatientID": world.hospital,
              "federated": "true"}
    base = world.gws["110000"].base
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/dicomweb/series", params=params, headers=me,
                            ssl=world.client_ssl) as r:
            assert r.status == 200
            series = await r.json()
        remote = [s for s in series if holding_province(s) == "310000"]
        want = {i.series_uid for i in world.corpus["310000"] if i.national_id == world.national_id}
        assert {s["0020000E"]["Value"][0] for s in remote} == want
        url = remote[0]["00081190"]["Value"][0]
        assert url.startswith(f"{base}/dicomweb/federation/310000/studies/")
        assert "/series/" in url
        async with http.get(url, headers=me, ssl=world.client_ssl) as r:
            assert r.status == 200
            await r.read()
    home = [r for r in world.audit("110000") if r["action"] == "federated-retrieve"][-1]
    assert home["outcome"] == "ok"
    cid = _correlation(home)
    there = [r for r in world.audit("310000") if _correlation(r) == cid]
    assert [(r["action"], r["outcome"], r["role"]) for r in there] == [("retrieve", "ok", "peer")]
