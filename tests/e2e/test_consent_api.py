"""Consents, the patient's own views and the break-glass report over a real gateway process."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp

from tests.e2e.conftest import Province
from tests.support.gateway import cli


async def test_consent_lifecycle_over_http(province: Province,
                                           http: aiohttp.ClientSession) -> None:
    base = province.gw.base
    nid, _home, other = province.shared_patient()
    grantee = province.hospital(other)
    third = sorted({i.hospital.code for i in province.corpus} - {other})[0]
    stranger = province.hospital(third)
    patient = province.bearer("--role", "patient", "--national-id", nid)
    admin = province.bearer("--role", "admin")
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    body = {"national_id": nid, "purpose": "treatment", "valid_until": until,
            "evidence": "medical-insurance e-voucher 3301-77"}

    async with http.post(f"{base}/consents", json=body) as r:
        assert r.status == 401
    async with http.post(f"{base}/consents", json=body, headers=patient) as r:
        assert r.status == 403
    async with http.post(f"{base}/consents", json={**body, "purpose": "x"}, headers=grantee) as r:
        assert r.status == 400 and "purpose" in (await r.json())["message"]
    async with http.post(f"{base}/consents", data=b"{", headers=grantee) as r:
        assert r.status == 400
    async with http.post(f"{base}/consents", json=body, headers=grantee) as r:
        assert r.status == 201, await r.text()
        consent = await r.json()
    assert consent["grantee_hospital"] == other and consent["active"] is True
    assert r.headers["Location"] == f"{base}/consents/{consent['id']}"

    async with http.get(f"{base}/consents", params={"patient": nid}, headers=grantee) as r:
        assert [c["id"] for c in await r.json()] == [consent["id"]]
    async with http.get(f"{base}/consents", params={"patient": nid}, headers=stranger) as r:
        assert await r.json() == []
    async with http.get(f"{base}/consents/{consent['id']}", headers=stranger) as r:
        assert r.status == 404
    async with http.delete(f"{base}/consents/{consent['id']}", headers=stranger) as r:
        assert r.status == 404
    async with http.get(f"{base}/consents", headers=admin) as r:
        assert r.status == 400
    async with http.get(f"{base}/me/consents", headers=patient) as r:
        assert [c["id"] for c in await r.json()] == [consent["id"]]
    async with http.get(f"{base}/me/consents", headers=grantee) as r:
        assert r.status == 403

    # The patient revokes; it is revoked for everyone at once.
    async with http.delete(f"{base}/consents/{consent['id']}", headers=patient) as r:
        assert r.status == 200
        revoked = await r.json()
    assert revoked["active"] is False and revoked["revoked_at"]
    async with http.get(f"{base}/consents/{consent['id']}", headers=grantee) as r:
        assert (await r.json())["active"] is False

    async with http.get(f"{base}/me/access-log", headers=patient) as r:
        log = await r.json()
    # Consent records name the patient: every read of them is in the patient's log too,
    # the stranger's refused ones included (the admin's 400 and the grantee's 403 on
    # /me/consents named no patient; the patient reading their own leaves no record).
    assert [(e["action"], e["outcome"]) for e in log][:7] == [
        ("consent-read", "ok"), ("consent-revoke", "ok"), ("consent-revoke", "denied"),
        ("consent-read", "denied"), ("consent-list", "denied"), ("consent-list", "ok"),
        ("consent-create", "ok")]
    assert [e["hospital"] for e in log[:2]] == [other, None]

    async with http.get(f"{base}/admin/break-glass", headers=admin) as r:
        assert r.status == 200 and await r.json() == []
    async with http.get(f"{base}/admin/break-glass", headers=grantee) as r:
        assert r.status == 403

    verify = cli(province.gw.config, "audit", "verify", "--json", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    logs = province.gw.logs()
    assert nid not in logs and "Traceback" not in logs


async def test_text_shown_to_the_patient_refuses_control_and_bidi_characters(
        province: Province, http: aiohttp.ClientSession) -> None:
    """Evidence, clinician and break-glass reason reach the patient's screen: a NUL, a C1
    control or a bidi override (U+202E) in them is a 400 naming the field, nothing stored."""
    base = province.gw.base
    nid, home, other = province.shared_patient()
    grantee = province.hospital(other)
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    body = {"national_id": nid, "purpose": "treatment", "valid_until": until,
            "evidence": "医保电子凭证 3301-77"}
    bad = {
        "evidence": ["voucher\x003301", "voucher 3301\u202e77-1033", "voucher\x85",
                     "\u2066voucher\u2069", "voucher\u200f", "line\nbreak"],
        "grantee_clinician": ["dr\u202ewang", "dr\x00wang"],
    }
    for name, values in bad.items():
        for value in values:
            async with http.post(f"{base}/consents", json={**body, name: value},
                                 headers=grantee) as r:
                assert r.status == 400, (name, value, await r.text())
                answer = await r.json()
            assert answer["error"] == "invalid-request"
            assert answer["message"].startswith(f"{name}: "), answer
    async with http.get(f"{base}/consents", params={"patient": nid}, headers=grantee) as r:
        assert await r.json() == []
    async with http.post(f"{base}/consents", json=body, headers=grantee) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["evidence"] == "医保电子凭证 3301-77"

    # The break-glass reason (percent-encoded UTF-8) is shown in the patient's access log.
    study = sorted(province.studies(hospital=home))[0]
    for reason in ("stroke%E2%80%AEcode", "stroke%00code"):
        async with http.get(f"{base}/dicomweb/studies/{study}/metadata", headers={
                **province.hospital(other), "X-Break-Glass-Reason": reason}) as r:
            assert r.status == 400, await r.text()
            assert "X-Break-Glass-Reason" in (await r.json())["message"]
    async with http.get(f"{base}/dicomweb/studies/{study}/metadata", headers={
            **province.hospital(other), "X-Break-Glass-Reason": "stroke%0Acode red"}) as r:
        assert r.status == 200, await r.text()
    assert "Traceback" not in province.gw.logs()
