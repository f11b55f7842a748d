"""The route walk: every route of the app is classified here, refuses a caller without a
token (counted by the gate's refusal audit) and, where it can return patient data, reveals
nothing to a hospital without a grant and leaves an audit record naming that request."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from imaging_gateway.app import create_app
from imaging_gateway.index.schema import audit_log, refusal_counters
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.settings import load_settings
from tests.conftest import fresh_index_url
from tests.e2e.conftest import PROVINCE_CONFIG, Province, start_province
from tests.support.postgres import Dropper

# Federation on, with one registered peer that is never reached (a federated retrieve of
# a study never found by a federated search is refused before any call), so that the
# federated routes answer as they do in a federating province.
WALK_CONFIG = PROVINCE_CONFIG + """
[federation]
enabled = true
allow_plain_http = true

[[federation.peers]]
province = "120000"
name = "tj"
base_url = "http://127.0.0.1:9/dicomweb"
kind = "dicomweb"
"""
PEER = "120000"

# What each route is, by the test's own judgement (never read from the app): a route
# added to the app without a line here fails test_every_route_is_classified.
PUBLIC = "public"  # no token: liveness and the API description (CORS preflights are a
#                    middleware answering before authentication, not routes)
ADMIN = "admin"  # province staff only; no patient data
SEARCH = "search"  # QIDO-RS: patient data, filtered by the gate
RETRIEVE = "retrieve"  # WADO-RS and its renderings: patient data located by the gate
FEDERATED = "federated-retrieve"  # another province's study through this gateway
STORE = "store"  # STOW-RS: a hospital writes what it produced
CONSENT_WRITE = "consent-write"  # a hospital records a patient's grant to itself
CONSENT_READ = "consent-read"  # consent records (with the raw national identity)
PATIENT_ONLY = "patient-only"  # the patient's own grants and access log

_D = "/dicomweb"
_SE = f"{_D}/studies/{{study}}/series/{{series}}"
_I = f"{_SE}/instances/{{instance}}"
_READ = ("GET", "HEAD")
CLASSIFICATION: dict[tuple[str, str], str] = {
    **{(m, p): PUBLIC for m in _READ for p in ("/healthz", "/openapi.json")},
    ("POST", "/admin/sync-jobs"): ADMIN,
    **{(m, p): ADMIN for m in _READ for p in (
        "/admin/sync-jobs", "/admin/sync-jobs/{job_id}", "/admin/index/stats",
        "/admin/quarantine", "/admin/break-glass")},
    **{(m, p): SEARCH for m in _READ for p in (
        f"{_D}/studies", f"{_D}/series", f"{_D}/instances", f"{_D}/studies/{{study}}/series",
        f"{_D}/studies/{{study}}/instances", f"{_SE}/instances")},
    **{(m, p): RETRIEVE for m in _READ for p in (
        f"{_D}/studies/{{study}}", _SE, _I,
        f"{_D}/studies/{{study}}/metadata", f"{_SE}/metadata", f"{_I}/metadata",
        f"{_I}/frames/{{frames}}", f"{_I}/bulkdata/{{path}}",
        f"{_D}/studies/{{study}}/rendered", f"{_D}/studies/{{study}}/thumbnail",
        f"{_SE}/rendered", f"{_SE}/thumbnail", f"{_I}/rendered", f"{_I}/thumbnail",
        f"{_I}/frames/{{frames}}/rendered", f"{_I}/frames/{{frames}}/thumbnail")},
    **{(m, p): FEDERATED for m in _READ for p in (
        f"{_D}/federation/{{province}}/studies/{{study}}",
        f"{_D}/federation/{{province}}/studies/{{study}}/{{tail}}")},
    ("POST", f"{_D}/studies"): STORE,
    ("POST", f"{_D}/studies/{{study}}"): STORE,
    ("POST", "/consents"): CONSENT_WRITE,
    **{(m, p): CONSENT_READ for m in _READ for p in ("/consents", "/consents/{id}")},
    ("DELETE", "/consents/{id}"): CONSENT_READ,
    **{(m, p): PATIENT_ONLY for m in _READ for p in ("/me/consents", "/me/access-log")},
}
PATIENT_DATA = (SEARCH, RETRIEVE, FEDERATED, CONSENT_READ, PATIENT_ONLY)

def app_routes(province: Province) -> set[tuple[str, str]]:
    """(method, canonical path) of every route the served gateway's app registers."""
    app = create_app(load_settings(province.gw.config))
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None}


@dataclass(frozen=True)
class Target:
    """Another hospital's data: what the path parameters are filled with."""

    national_id: str
    home: str
    other: str
    values: dict[str, str]


def target(province: Province) -> Target:
    nid, home, other = province.shared_patient()
    study = sorted(province.studies(national_id=nid, hospital=home))[0]
    inst = next(i for i in province.corpus if i.study_uid == study)
    return Target(nid, home, other, {
        "study": study, "series": inst.series_uid, "instance": inst.sop_uid,
        "frames": "1", "path": "7FE00010", "province": PEER,
        "tail": f"series/{inst.series_uid}/instances/{inst.sop_uid}/metadata",
    })


def url_of(canonical: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], canonical)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def walk_province(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory, sqlite_templates: Path,
                        pg_dropper: Dropper) -> AsyncIterator[Province]:
    """One federating province gateway per backend for the module (the walk only reads,
    and tells its own requests apart by token subject or by counting)."""
    tmp = tmp_path_factory.mktemp(f"walk-{request.param}")
    async with fresh_index_url(request.param, tmp, sqlite_templates, pg_dropper) as url:
        started = start_province(tmp, url, WALK_CONFIG)
        try:
            yield started
        finally:
            started.gw.stop()


@contextlib.asynccontextmanager
async def _opened(province: Province) -> AsyncIterator[SqlIndex]:
    """The gateway's own index, opened by the test to read what the gateway wrote."""
    index = await SqlIndex.open(load_settings(province.gw.config).index, migrate=False)
    try:
        yield index
    finally:
        await index.close()


async def _select(index: SqlIndex, query: Any) -> list[dict[str, Any]]:
    async with index.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def _rows(province: Province, query: Any) -> list[dict[str, Any]]:
    async with _opened(province) as index:
        return await _select(index, query)


async def _refusals(index: SqlIndex) -> tuple[list[dict[str, Any]], int]:
    """The refusal counters of unauthenticated requests, and how many refused-token
    records the audit log holds."""
    counters = await _select(index, sa.select(refusal_counters).where(
        refusal_counters.c.reason == "a bearer token is required"))
    records = await _select(index, sa.select(sa.func.count().label("n")).select_from(
        audit_log).where(audit_log.c.action == "authenticate", audit_log.c.outcome == "denied",
                         audit_log.c.subject == "unauthenticated"))
    return counters, int(records[0]["n"])


def test_every_route_is_classified(walk_province: Province) -> None:
    routes = app_routes(walk_province)
    assert sorted(routes - CLASSIFICATION.keys()) == [], "classify these routes in the walk"
    assert sorted(CLASSIFICATION.keys() - routes) == [], "routes the app no longer has"


async def test_every_route_refuses_a_request_without_a_token_and_counts_it(
        walk_province: Province, http: aiohttp.ClientSession) -> None:
    values = {**target(walk_province).values, "id": await _home_consent(walk_province, http),
              "job_id": await _sync_job(walk_province, http)}
    async with _opened(walk_province) as index:
        for (method, canonical), kind in sorted(CLASSIFICATION.items()):
            await _refused_without_a_token(walk_province, http, index, method,
                                           url_of(canonical, values), kind)


async def _refused_without_a_token(province: Province, http: aiohttp.ClientSession,
                                   index: SqlIndex, method: str, path: str, kind: str) -> None:
    """One request without Authorization: refused (401, JSON error) and counted by the
    gate's refusal audit; a public route answers and counts nothing."""
    before = await _refusals(index)
    async with http.request(method, province.gw.base + path) as r:
        status, body = r.status, await r.read()
        challenge = r.headers.get("WWW-Authenticate", "")
        ctype = r.headers.get("Content-Type", "")
    after = await _refusals(index)
    where = (method, path)
    if kind == PUBLIC:
        assert status == 200, where
        assert after == before, where
        return
    assert status == 401, (where, status, body[:200])
    assert challenge.startswith("Bearer"), where
    if method != "HEAD":
        assert ctype.startswith("application/json"), where
        assert body.startswith(b'{"error": "unauthenticated"'), (where, body[:200])
    # Counted: one more in the open window, or a new record opening the next one.
    (counted,), records = after
    was = {c["window_start"]: c["count"] for c in before[0]}
    opened = records == before[1] + 1
    assert opened or (counted["count"] == was.get(counted["window_start"], -1) + 1
                      and records == before[1]), (where, before, after)


_SUBJECTS = itertools.count(1)


def _walk_cases() -> list[Any]:
    cases = []
    for (method, canonical), kind in sorted(CLASSIFICATION.items()):
        if kind not in PATIENT_DATA:
            continue
        cases.append(pytest.param(method, canonical, kind, id=f"{method} {canonical}"))
    return cases


@pytest.mark.parametrize(("method", "canonical", "kind"), _walk_cases())
async def test_a_hospital_without_a_grant_gets_nothing(
        walk_province: Province, http: aiohttp.ClientSession, method: str, canonical: str,
        kind: str) -> None:
    """The answer to a hospital that holds no grant for the target patient reveals
    nothing of that patient's data."""
    answer, _ = await _ask_without_grant(walk_province, http, method, canonical, kind)
    status, body = answer
    t = target(walk_province)
    if kind == SEARCH:
        assert status in (200, 204), (status, body[:200])
        for uid in (t.values["study"], t.values["series"], t.values["instance"]):
            assert uid.encode() not in body
    elif kind == PATIENT_ONLY:
        assert status == 403, (status, body[:200])
    elif kind == CONSENT_READ and canonical == "/consents":
        assert status == 200 and body in (b"[]", b""), body[:200]
    else:
        assert status == 404, (status, body[:200])
    assert t.national_id.encode() not in body
    if kind == CONSENT_READ:
        # Still the home hospital's and active: a refused revoke changed nothing.
        consent = await _home_consent(walk_province, http)
        async with http.get(f"{walk_province.gw.base}/consents/{consent}",
                            headers=walk_province.hospital(t.home)) as r:
            assert r.status == 200 and (await r.json())["active"] is True


@pytest.mark.parametrize(("method", "canonical", "kind"), _walk_cases())
async def test_a_hospital_without_a_grant_is_audited(
        walk_province: Province, http: aiohttp.ClientSession, method: str, canonical: str,
        kind: str) -> None:
    """Every such request leaves an audit record naming it (its caller's own subject)
    with the route's refusal outcome."""
    _, subject = await _ask_without_grant(walk_province, http, method, canonical, kind)
    t = target(walk_province)
    rows = await _rows(walk_province, sa.select(audit_log).where(audit_log.c.subject == subject))
    assert len(rows) >= 1, f"no audit record of {method} {canonical}"
    assert all(r["hospital"] == t.other and r["role"] == "hospital" for r in rows)
    if kind == SEARCH:
        # A search is filtered, not refused: its record says it returned nothing.
        assert [(r["action"], r["outcome"], r["patient_token"]) for r in rows] == [
            ("search", "ok", None)]
        assert rows[0]["detail"].endswith("results=0"), rows[0]["detail"]
    elif kind == FEDERATED:
        assert [(r["action"], r["outcome"], r["StudyInstanceUID"]) for r in rows] == [
            ("federated-retrieve", "not-found", t.values["study"])]
    else:
        assert [r["outcome"] for r in rows] == ["denied"], rows
        if kind == RETRIEVE:
            assert rows[0]["StudyInstanceUID"] == t.values["study"]


async def _ask_without_grant(province: Province, http: aiohttp.ClientSession, method: str,
                             canonical: str, kind: str) -> tuple[tuple[int, bytes], str]:
    """Send the route's request as the hospital holding no grant for the target patient,
    with a token subject of its own; returns ((status, body), subject)."""
    t = target(province)
    values = dict(t.values)
    if "{id}" in canonical:
        values["id"] = await _home_consent(province, http)
    query = _query_for(canonical, t) if method in ("GET", "HEAD") else {}
    subject = f"walk-{next(_SUBJECTS)}"
    url = province.gw.base + url_of(canonical, values)
    async with http.request(method, url, params=query,
                            headers=province.hospital(t.other, subject)) as r:
        return (r.status, await r.read()), subject


def _query_for(canonical: str, t: Target) -> dict[str, str]:
    """Search keys naming the target's data on the searches that have no path UIDs."""
    return {
        f"{_D}/studies": {"StudyInstanceUID": t.values["study"]},
        f"{_D}/series": {"SeriesInstanceUID": t.values["series"]},
        f"{_D}/instances": {"SOPInstanceUID": t.values["instance"]},
        "/consents": {"patient": t.national_id},
    }.get(canonical, {})


async def _sync_job(province: Province, http: aiohttp.ClientSession) -> str:
    """The id of the sync job that indexed the province's store."""
    return str((await _sync_jobs(province, http))[0])


_CONSENTS: dict[str, str] = {}


async def _home_consent(province: Province, http: aiohttp.ClientSession) -> str:
    """The id of a grant the target patient gave the home hospital (one per gateway)."""
    base = province.gw.base
    if base not in _CONSENTS:
        t = target(province)
        until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        async with http.post(f"{base}/consents", headers=province.hospital(t.home), json={
                "national_id": t.national_id, "purpose": "treatment",
                "evidence": "e-voucher walk", "valid_until": until}) as r:
            assert r.status == 201, await r.text()
            _CONSENTS[base] = str((await r.json())["id"])
    return _CONSENTS[base]


async def test_admin_routes_refuse_a_hospital_and_a_patient(
        walk_province: Province, http: aiohttp.ClientSession) -> None:
    """What the table calls admin-only is: other roles are refused (403) and nothing runs."""
    t = target(walk_province)
    values = {"job_id": await _sync_job(walk_province, http)}
    callers = [walk_province.hospital(t.other),
               walk_province.bearer("--role", "patient", "--national-id", t.national_id)]
    jobs_before = await _sync_jobs(walk_province, http)
    for (method, canonical), kind in sorted(CLASSIFICATION.items()):
        if kind != ADMIN:
            continue
        for headers in callers:
            async with http.request(method, walk_province.gw.base + url_of(canonical, values),
                                    json={"store": "bj-fs"} if method == "POST" else None,
                                    headers=headers) as r:
                assert r.status == 403, (method, canonical, r.status)
                if method != "HEAD":
                    assert (await r.json())["error"] == "forbidden"
    assert await _sync_jobs(walk_province, http) == jobs_before


async def _sync_jobs(province: Province, http: aiohttp.ClientSession) -> list[Any]:
    async with http.get(f"{province.gw.base}/admin/sync-jobs",
                        headers=province.bearer("--role", "admin")) as r:
        assert r.status == 200, await r.text()
        return [j["id"] for j in await r.json()]


async def test_every_route_refuses_a_forged_peer_assertion(
        walk_province: Province, http: aiohttp.ClientSession) -> None:
    """No route is peer-only: a peer may only read DICOMweb resources (401 for an assertion
    that does not verify, audited), and is refused (403) anywhere else."""
    values = {**target(walk_province).values, "id": await _home_consent(walk_province, http),
              "job_id": await _sync_job(walk_province, http)}
    forged = {"X-Federation-Assertion": "eyJhbGciOiJFZERTQSJ9.eyJpc3MiOiIxMjAwMDAifQ.c2ln"}
    for (method, canonical), kind in sorted(CLASSIFICATION.items()):
        if kind == PUBLIC:
            continue
        url = walk_province.gw.base + url_of(canonical, values)
        async with http.request(method, url, headers=forged) as r:
            status, body = r.status, await r.read()
        peer_read = method in _READ and canonical.startswith(f"{_D}/")
        assert status == (401 if peer_read else 403), (method, canonical, status)
        if method != "HEAD":
            assert body.startswith(b'{"error": '), (method, canonical, body[:200])
    records = await _rows(walk_province, sa.select(audit_log).where(
        audit_log.c.role == "peer", audit_log.c.action == "federation",
        audit_log.c.subject == "imaging-gateway:120000"))
    assert records and {r["outcome"] for r in records} == {"denied"}
