"""Bad input over a served gateway on both index backends: a 4xx JSON error naming the
parameter, never a traceback, and an audit record where patient data was asked for."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import create_pg_database
from tests.e2e.conftest import PROVINCE_CONFIG, Province, start_province
from tests.e2e.test_dicomweb import audit_rows
from tests.support.postgres import drop_database

# The e2e province, with a write store so that STOW-RS gets as far as its body.
CONFIG = PROVINCE_CONFIG.replace(
    'data_dir = "data"', 'data_dir = "data"\nwrite_store = "bj-stow"') + """
[[stores]]
name = "bj-stow"
kind = "fs"
path = "stow-store"
"""
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 5  # 76 characters: over 64


@dataclass
class Served:
    province: Province
    headers: dict[str, dict[str, str]]
    """Authorization headers by caller: hospital (owns ``study``), admin, patient."""
    national_id: str
    study: str
    series: str


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
async def served(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """One gateway per index backend for the whole module (each case is one request)."""
    tmp: Path = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite3'}"
    else:
        url = await create_pg_database()
    (tmp / "stow-store").mkdir()
    province = start_province(tmp, url, CONFIG)
    try:
        nid, home, _ = province.shared_patient()
        study = sorted(province.studies(hospital=home))[0]
        series = next(i.series_uid for i in province.corpus if i.study_uid == study)
        headers = {
            "hospital": province.hospital(home),
            "admin": province.bearer("--role", "admin"),
            "patient": province.bearer("--role", "patient", "--national-id", nid),
        }
        yield Served(province, headers, nid, study, series)
    finally:
        province.gw.stop()
        if request.param == "postgres":
            await drop_database(url)


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    """``{study}`` and ``{series}`` are the hospital's own study and one of its series."""
    names: str
    """What the error message must name (the parameter)."""
    caller: str = "hospital"
    params: dict[str, str] = field(default_factory=dict)
    consent: dict[str, Any] | None = None
    """Fields that replace those of a valid ``POST /consents`` body."""
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    audited: str | None = None
    """The audit action expected for a request that asked for patient data."""
    outcome: str = "denied"
    """... and its outcome."""


LONG_STUDY_ROUTES = [
    ("retrieve", "retrieve", ""), ("metadata", "metadata", "/metadata"),
    ("rendered", "rendered", "/rendered"), ("thumbnail", "thumbnail", "/thumbnail"),
]
CASES = [
    *(Case(f"wado-long-study-{n}", "GET", f"/dicomweb/studies/{LONG_UID}{tail}", "study",
           audited=action) for n, action, tail in LONG_STUDY_ROUTES),
    Case("wado-long-series", "GET", f"/dicomweb/studies/{{study}}/series/{LONG_UID}", "series",
         audited="retrieve"),
    Case("wado-long-instance-frames", "GET",
         f"/dicomweb/studies/{{study}}/series/{{series}}/instances/{LONG_UID}/frames/1",
         "instance", audited="frames"),
    Case("wado-leading-zero-uid", "GET", "/dicomweb/studies/1.02.3/metadata", "study",
         audited="metadata"),
    Case("federated-retrieve-long-study", "GET",
         f"/dicomweb/federation/440000/studies/{LONG_UID}", "study",
         audited="federated-retrieve"),
    Case("qido-long-study-path", "GET", f"/dicomweb/studies/{LONG_UID}/series", "study"),
    Case("qido-offset-beyond-32-bits", "GET", "/dicomweb/studies", "offset",
         params={"offset": "2147483648"}),
    Case("qido-limit-beyond-32-bits", "GET", "/dicomweb/studies", "limit",
         params={"limit": "4294967296"}),
    Case("qido-series-number-beyond-32-bits", "GET", "/dicomweb/series", "SeriesNumber",
         params={"SeriesNumber": "4294967296"}),
    Case("qido-instance-number-beyond-32-bits", "GET", "/dicomweb/instances", "InstanceNumber",
         params={"InstanceNumber": "-2147483649"}),
    Case("qido-rows-beyond-us", "GET", "/dicomweb/instances", "Rows",
         params={"Rows": "65536"}),
    Case("consent-id-nul", "GET", "/consents/%00", "id"),
    Case("consent-patient-nul", "GET", "/consents", "patient", params={"patient": "\x00"}),
    Case("sync-jobs-store-nul", "GET", "/admin/sync-jobs", "store", caller="admin",
         params={"store": "\x00"}),
    Case("consent-evidence-nul", "POST", "/consents", "evidence",
         consent={"evidence": "e-voucher\x003301"}),
    Case("consent-valid-from-overflow", "POST", "/consents", "valid_from",
         consent={"valid_from": "0001-01-01T00:00:00+14:00"}),
    Case("consent-valid-until-overflow", "POST", "/consents", "valid_until",
         consent={"valid_until": "9999-12-31T23:59:59-14:00"}),
    Case("consent-json-5000-deep", "POST", "/consents", "body",
         body=b"[" * 5000 + b"]" * 5000),
    Case("sync-job-json-5000-deep", "POST", "/admin/sync-jobs", "body", caller="admin",
         body=b'{"store":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    Case("access-log-before-beyond-64-bits", "GET", "/me/access-log", "before",
         caller="patient", params={"before": "9223372036854775808"}),
    Case("break-glass-report-days-superscript", "GET", "/admin/break-glass", "days",
         caller="admin", params={"days": "\u00b2"}),
    Case("rendered-quality-superscript", "GET", "/dicomweb/studies/{study}/rendered", "quality",
         params={"quality": "\u00b2"}),
    Case("purpose-of-use-too-long", "GET", "/dicomweb/studies/{study}/metadata",
         "X-Purpose-Of-Use", headers={"X-Purpose-Of-Use": "treatment " * 10}),
    Case("break-glass-reason-nul", "GET", "/dicomweb/studies/{study}/metadata",
         "X-Break-Glass-Reason", headers={"X-Break-Glass-Reason": "stroke%00code"}),
    Case("stow-long-study", "POST", f"/dicomweb/studies/{LONG_UID}", "study",
         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
         body=b"--b--\r\n", audited="store", outcome="error"),
    Case("stow-long-study-not-a-hospital", "POST", f"/dicomweb/studies/{LONG_UID}", "hospital",
         caller="patient",
         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
         body=b"--b--\r\n"),
    Case("stow-boundary-over-70", "POST", "/dicomweb/studies", "boundary",
         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary='
                  + "b" * 71},
         body=b"--" + b"b" * 71 + b"--\r\n"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_is_a_4xx_naming_the_parameter(served: Served, case: Case,
                                                       http: aiohttp.ClientSession) -> None:
    p = served.province
    path = case.path.replace("{study}", served.study).replace("{series}", served.series)
    headers = {**served.headers[case.caller], **case.headers}
    body: Any = case.body
    if case.consent is not None:
        until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
        body = {"national_id": served.national_id, "purpose": "treatment",
                "valid_until": until, "evidence": "e-voucher 3301-77", **case.consent}
    before_log = len(p.gw.logs())
    before_audit = len(await audit_rows(p)) if case.audited else 0
    url = URL(p.gw.base + path, encoded=True)  # %00 in a path stays as written
    async with http.request(case.method, url, params=case.params or None, headers=headers,
                            json=body if isinstance(body, dict) else None,
                            data=body if isinstance(body, bytes) else None) as r:
        status = r.status
        text = await r.text()
        content_type = r.content_type
    assert 400 <= status < 500, (status, text)
    assert content_type == "application/json", text
    answer = json.loads(text)
    assert answer["error"] and re.search(rf"\b{re.escape(case.names)}\b", answer["message"]), (
        answer)
    assert "Traceback" not in p.gw.logs()[before_log:]
    if case.audited:
        rows = (await audit_rows(p))[before_audit:]
        assert [(r["action"], r["outcome"], r["hospital"]) for r in rows] == [
            (case.audited, case.outcome, _hospital(served))], rows


def _hospital(served: Served) -> str:
    return next(i.hospital.code for i in served.province.corpus if i.study_uid == served.study)
