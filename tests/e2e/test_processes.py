"""Two gateway processes of one province behind a real load balancer, on one PostgreSQL index.

Beijing (110000) runs two ``imaging-gateway serve`` processes (``a`` and ``b``) over one
PostgreSQL index and one store, behind HAProxy (Debian's package). HAProxy routes by a
request header (``X-Gateway-Process: b`` to ``b``, anything else to ``a``), so the test
knows which process answers each request, and checks it in each process's own access
log. Guangdong (440000) is one responding gateway. Federation runs over plain HTTP
(``allow_plain_http``): what is under test here is the state the processes share, not TLS.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.dicom.synthetic import HOSPITALS, SyntheticInstance, generate_instances
from imaging_gateway.federation.assertions import ConsentClaim, issue_assertion
from imaging_gateway.federation.client import ASSERTION_HEADER
from imaging_gateway.federation.fanout import holding_province
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from tests.e2e.test_dicomweb import parts
from tests.support.gateway import ForkedGateway, cli, free_port
from tests.support.postgres import create_database, drop_database

HOME, REMOTE = "110000", "440000"
ROUTE = "X-Gateway-Process"

CONFIG = """
[gateway]
province = "{province}"
listen = "127.0.0.1:{port}"
data_dir = "data"

[index]
url = "{index_url}"

[[stores]]
name = "fs"
kind = "fs"
path = "store"

[federation]
enabled = true
allow_plain_http = true
deadline_ms = 5000

[[federation.peers]]
province = "{peer}"
name = "peer {peer}"
base_url = "http://127.0.0.1:{peer_port}/dicomweb"
kind = "gateway"
public_key_file = "federation/{peer}.pub"
"""

HAPROXY = """
global
    maxconn 256

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend province
    bind 127.0.0.1:{port}
    use_backend process_b if {{ req.hdr({route}) -m str b }}
    default_backend process_a

backend process_a
    http-response set-header {route} %[srv_name]
    server a 127.0.0.1:{a}

backend process_b
    http-response set-header {route} %[srv_name]
    server b 127.0.0.1:{b}
"""


@dataclass
class Province2:
    root: Path
    lb: str
    """The load balancer's base URL."""
    processes: dict[str, ForkedGateway]
    remote: ForkedGateway
    keys: dict[str, Ed25519PrivateKey]
    corpus: dict[str, list[SyntheticInstance]]
    national_id: str
    hospital: str
    patient_id: str
    index_url: str

    def bearer(self, hospital: str, subject: str) -> dict[str, str]:
        key = load_or_create_signing_key(self.root / HOME / "data" / "keys" / "token-signing.pem")
        token = TokenAuthority(key, province=HOME, max_ttl_s=3600).issue(
            subject=subject, role="hospital", hospital=hospital, ttl_s=3600)
        return {"Authorization": f"Bearer {token}"}

    def served(self, process: str, line: str, *, expect: int) -> int:
        """How many access-log lines of ``process`` hold ``line``, once it has ``expect``.

        aiohttp writes the access line after the response has gone, so the line may
        follow the answer by a moment: waited for (up to 30 s), never assumed.
        """
        deadline = time.monotonic() + 30
        while True:
            n = sum(line in x for x in self.processes[process].logs().splitlines())
            if n >= expect or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)
    path.chmod(0o600)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"haproxy exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("haproxy did not come up")


@pytest.fixture(scope="module")
def province2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Province2]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("HAProxy is required (Debian: apt-get install haproxy; .ci/setup does it)")
    root = tmp_path_factory.mktemp("processes")
    index_url = asyncio.run(create_database("ig_e2e_lb"))
    hospitals = [h for h in HOSPITALS if h.province in (HOME, REMOTE)]
    corpus = list(generate_instances(seed=3, patients=6, studies_per_patient=4,
                                     instances_per_series=1, series_per_study=1,
                                     pixel_mode="small", hospitals=hospitals))
    by_province: dict[str, list[SyntheticInstance]] = {HOME: [], REMOTE: []}
    for inst in corpus:
        by_province[inst.hospital.province].append(inst)
    nid = next(n for n in sorted({i.national_id for i in corpus if i.national_id})
               if all(any(i.national_id == n for i in by_province[p]) for p in by_province))
    home_inst = next(i for i in by_province[HOME] if i.national_id == nid)
    keys = {p: Ed25519PrivateKey.generate() for p in (HOME, REMOTE)}
    token_key = secrets.token_bytes(32)
    ports = {"lb": free_port(), "a": free_port(), "b": free_port(), REMOTE: free_port()}
    configs: dict[str, Path] = {}
    for p, peer in ((HOME, REMOTE), (REMOTE, HOME)):
        d = root / p
        _write_private(d / "data" / "keys" / "patient-token.key", token_key)
        _write_private(d / "data" / "keys" / "federation-signing.pem", keys[p].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / "federation").mkdir()
        (d / "federation" / f"{peer}.pub").write_bytes(keys[peer].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        for inst in by_province[p]:
            (d / "store" / inst.key).parent.mkdir(parents=True, exist_ok=True)
            (d / "store" / inst.key).write_bytes(inst.data)
        configs[p] = d / "gateway.toml"
        configs[p].write_text(CONFIG.format(
            province=p, peer=peer,
            port=ports["a"] if p == HOME else ports[REMOTE],
            peer_port=ports[REMOTE] if p == HOME else ports["lb"],
            index_url=index_url if p == HOME else "sqlite:///data/index.sqlite3",
        ), encoding="utf-8")
        cli(configs[p], "sync", "--store", "fs", "--no-progress")
    # One config for both Beijing processes; only the listening address differs.
    processes = {
        name: ForkedGateway(configs[HOME], ports[name],
                             env={"IMAGING_GATEWAY_GATEWAY__LISTEN": f"127.0.0.1:{ports[name]}"})
        for name in ("a", "b")
    }
    remote = ForkedGateway(configs[REMOTE], ports[REMOTE])
    lb_config = root / "haproxy.cfg"
    lb_config.write_text(HAPROXY.format(port=ports["lb"], a=ports["a"], b=ports["b"],
                                        route=ROUTE), encoding="utf-8")
    lb_log = (root / "haproxy.log").open("wb")
    lb: subprocess.Popen[bytes] | None = None
    try:
        for gw in (*processes.values(), remote):
            gw.start(timeout=60)
        lb = subprocess.Popen([haproxy, "-db", "-f", str(lb_config)], stdout=lb_log,
                              stderr=subprocess.STDOUT)
        _wait_listening(ports["lb"], lb)
        yield Province2(root, f"http://127.0.0.1:{ports['lb']}", processes, remote, keys,
                        by_province, nid, home_inst.hospital.code, home_inst.patient_id,
                        index_url)
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        lb_log.close()
        for gw in (*processes.values(), remote):
            gw.stop()
        asyncio.run(drop_database(index_url))


async def _get(http: aiohttp.ClientSession, w: Province2, process: str, path: str,
               headers: dict[str, str], **params: str) -> tuple[int, bytes, str]:
    """GET through the load balancer, routed to ``process``; checks who answered."""
    async with http.get(f"{w.lb}{path}", params=params,
                        headers={**headers, ROUTE: process}) as r:
        body = await r.read()
        assert r.headers.get(ROUTE) == process, "HAProxy routed to the other process"
        return r.status, body, r.headers.get("Content-Type", "")


def _signed(w: Province2, path: str) -> str:
    """An assertion as Guangdong's gateway signs it for a search at Beijing."""
    tokens = PatientTokens((w.root / HOME / "data/keys/patient-token.key").read_bytes())
    return issue_assertion(
        w.keys[REMOTE], issuer=REMOTE, audience=HOME, subject=f"imaging-gateway:{REMOTE}",
        hospital="H44010600035", purpose="treatment",
        patient_token=tokens.for_national_id(w.national_id), correlation_id=str(uuid.uuid4()),
        method="GET", path=path, query=[],
        consent=ConsentClaim(id="c-1", scope="all",
                             valid_until=datetime.now(UTC) + timedelta(hours=1)))


async def test_search_on_one_process_and_retrieve_on_the_other(province2: Province2) -> None:
    """A federated search answered by ``a``, the retrieve by ``b``; the consent revoked
    through ``a`` is denied by ``b`` at the next request."""
    w = province2
    me = w.bearer(w.hospital, "dr-li")
    remote_studies = {i.study_uid for i in w.corpus[REMOTE] if i.national_id == w.national_id}
    async with aiohttp.ClientSession() as http:
        until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        async with http.post(f"{w.lb}/consents", json={
                "national_id": w.national_id, "purpose": "treatment",
                "evidence": "e-voucher 77", "valid_until": until},
                headers={**me, ROUTE: "a"}) as r:
            assert r.status == 201, await r.text()
            assert r.headers[ROUTE] == "a"
            grant: dict[str, Any] = await r.json()
        status, body, _ = await _get(http, w, "a", "/dicomweb/studies", me,
                                     PatientID=w.patient_id, IssuerOfPatientID=w.hospital,
                                     federated="true")
        assert status == 200, body
        found = {d["0020000D"]["Value"][0]: d for d in json.loads(body)
                 if holding_province(d) == REMOTE}
        assert set(found) == remote_studies
        study = sorted(found)[0]
        url = found[study]["00081190"]["Value"][0]
        assert url == f"{w.lb}/dicomweb/federation/{REMOTE}/studies/{study}"
        path = url.removeprefix(w.lb)
        status, body, content_type = await _get(http, w, "b", path, me)
        assert status == 200, body
        assert sorted(parts(body, content_type)) == sorted(
            i.data for i in w.corpus[REMOTE] if i.study_uid == study)
        # Revoked through a: b refuses the next retrieve.
        async with http.delete(f"{w.lb}/consents/{grant['id']}",
                               headers={**me, ROUTE: "a"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers[ROUTE] == "a"
        status, body, _ = await _get(http, w, "b", path, me)
        assert status == 403 and b"no longer active" in body
    # Each process's own log: the search and the revocation on a, the retrieves on b.
    search = '"GET /dicomweb/studies" 200'
    retrieve = f'"GET /dicomweb/federation/{REMOTE}/studies/{study}"'
    revoke = '"DELETE /consents/{id}" 200'
    assert w.served("a", search, expect=1) == 1
    assert w.served("a", revoke, expect=1) == 1
    assert w.served("b", f"{retrieve} 200", expect=1) == 1
    assert w.served("b", f"{retrieve} 403", expect=1) == 1
    assert w.served("b", search, expect=0) == 0 and w.served("b", revoke, expect=0) == 0
    assert w.served("a", retrieve, expect=0) == 0


async def test_an_assertion_replayed_to_the_other_process_is_refused(
        province2: Province2) -> None:
    w = province2
    token = _signed(w, "/dicomweb/series")
    async with aiohttp.ClientSession() as http:
        status, body, _ = await _get(http, w, "a", "/dicomweb/series",
                                     {ASSERTION_HEADER: token})
        assert status == 200, body
        assert {d["0020000E"]["Value"][0] for d in json.loads(body)} == {
            i.series_uid for i in w.corpus[HOME] if i.national_id == w.national_id}
        status, body, _ = await _get(http, w, "b", "/dicomweb/series",
                                     {ASSERTION_HEADER: token})
        assert status == 401 and b"replayed" in body
    # Both in the one audit log: the answer, then the refusal, under the assertion's id.
    claims = jwt.decode(token, options={"verify_signature": False})
    db = await asyncpg.connect(w.index_url)
    try:
        rows = await db.fetch("SELECT action, outcome, role, detail FROM audit_log "
                              "WHERE detail LIKE $1 ORDER BY seq",
                              f"%correlation={claims['correlation_id']}%")
    finally:
        await db.close()
    assert [(r["action"], r["outcome"], r["role"]) for r in rows] == [
        ("search", "ok", "peer"), ("federation", "denied", "peer")]
    assert "replayed" in rows[-1]["detail"]
    line = '"GET /dicomweb/series"'
    assert w.served("a", f"{line} 200", expect=1) == 1
    assert w.served("b", f"{line} 401", expect=1) == 1
    assert w.served("a", f"{line} 401", expect=0) == 0
    assert w.served("b", f"{line} 200", expect=0) == 0
