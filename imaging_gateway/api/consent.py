"""Consent routes (hospital, admin, patient), the patient's own views, the break-glass report."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from imaging_gateway.api.keys import CONSENTS, GATE, PEER_GRANT, PRINCIPAL, SETTINGS
from imaging_gateway.api.params import int_param, json_body
from imaging_gateway.api.urls import public_base
from imaging_gateway.errors import InvalidRequest, NotFound
from imaging_gateway.security.consent import may_manage, parse_consent_request
from imaging_gateway.security.gate import AccessContext
from imaging_gateway.security.principals import Principal

routes = web.RouteTableDef()


def access_context(request: web.Request, **kw: Any) -> AccessContext:
    """The caller and circumstances of ``request`` for the gate and the audit log.

    For a peer (a verified federation assertion) purpose, break-glass reason and
    correlation id are the assertion's, whatever the request's headers say.
    """
    principal: Principal = request[PRINCIPAL]
    grant = request.get(PEER_GRANT)
    if grant is not None:
        kw.update(
            peer=grant,
            purpose=grant.purpose,
            break_glass_reason=None,
            correlation_id=grant.correlation_id,
        )
    return AccessContext(principal=principal, source=request.remote, **kw)


@routes.post("/consents")
async def create_consent(request: web.Request) -> web.Response:
    """Record a patient's grant (hospital: to itself; admin: to any hospital)."""
    ctx = access_context(request)
    base = public_base(request)  # a bad Host is refused before anything is recorded
    settings = request.app[SETTINGS].security
    consent_request = parse_consent_request(
        await json_body(request),
        ctx.principal,
        now=ctx.now,
        max_days=settings.consent_max_days,
    )
    gate = request.app[GATE]
    async with gate.engine.begin() as conn:
        consent = await request.app[CONSENTS].create(conn, consent_request, ctx.principal, ctx.now)
        await gate.audit.append(
            conn,
            [
                ctx.event(
                    "consent-create",
                    "ok",
                    patient_token=gate.tokens.for_national_id(consent.national_id),
                    detail=f"consent={consent.id} grantee={consent.grantee_hospital}",
                )
            ],
            at=ctx.now,
        )
    return web.json_response(
        consent.as_json(ctx.now), status=201, headers={"Location": f"{base}/consents/{consent.id}"}
    )


@routes.get("/consents")
async def list_consents(request: web.Request) -> web.Response:
    """Grants a hospital holds (optionally for one ``patient``), or any patient's for an admin."""
    principal: Principal = request[PRINCIPAL]
    principal.require("hospital", "admin")
    patient = request.query.get("patient")
    if patient is not None:
        patient = patient.strip().upper()
    if principal.role == "admin" and not patient:
        raise InvalidRequest("give ?patient=<national identity>")
    found = await request.app[CONSENTS].list(
        national_id=patient,
        grantee_hospital=principal.hospital if principal.role == "hospital" else None,
    )
    now = datetime.now(UTC)
    return web.json_response([c.as_json(now) for c in found])


@routes.get("/consents/{id}")
async def get_consent(request: web.Request) -> web.Response:
    principal: Principal = request[PRINCIPAL]
    consent = await request.app[CONSENTS].get(request.match_info["id"])
    if not may_manage(consent, principal):
        raise NotFound("no such consent")
    return web.json_response(consent.as_json(datetime.now(UTC)))


@routes.delete("/consents/{id}")
async def revoke_consent(request: web.Request) -> web.Response:
    """Revoke a grant (its patient, its grantee hospital or an admin); effective at once."""
    ctx = access_context(request)
    consents = request.app[CONSENTS]
    consent = await consents.get(request.match_info["id"])
    if not may_manage(consent, ctx.principal):
        raise NotFound("no such consent")
    gate = request.app[GATE]
    async with gate.engine.begin() as conn:
        revoked = await consents.revoke(conn, consent, ctx.principal, ctx.now)
        await gate.audit.append(
            conn,
            [
                ctx.event(
                    "consent-revoke",
                    "ok",
                    patient_token=gate.tokens.for_national_id(consent.national_id),
                    detail=f"consent={consent.id}",
                )
            ],
            at=ctx.now,
        )
    return web.json_response(revoked.as_json(ctx.now))


@routes.get("/me/consents")
async def my_consents(request: web.Request) -> web.Response:
    """A patient's own grants, active and past."""
    principal: Principal = request[PRINCIPAL]
    principal.require("patient")
    found = await request.app[CONSENTS].list(national_id=principal.national_id)
    now = datetime.now(UTC)
    return web.json_response([c.as_json(now) for c in found])


@routes.get("/me/access-log")
async def my_access_log(request: web.Request) -> web.Response:
    """Who opened the patient's images, when, why and with what outcome (newest first)."""
    principal: Principal = request[PRINCIPAL]
    principal.require("patient")
    assert principal.national_id is not None  # validate_claims guarantees it
    gate = request.app[GATE]
    # A record number: the audit log's seq is a signed 64-bit integer.
    before = int_param(request.query, "before", default=None, minimum=1, maximum=2**63 - 1)
    records = await gate.audit.for_patient(
        gate.tokens.for_national_id(principal.national_id),
        limit=200,
        before_seq=before,
    )
    return web.json_response(records, dumps=_dumps)


@routes.get("/admin/break-glass")
async def break_glass_report(request: web.Request) -> web.Response:
    """Emergency accesses of the last ``days`` (default 30), for the province's review."""
    principal: Principal = request[PRINCIPAL]
    principal.require("admin")
    days = int_param(request.query, "days", default=30, minimum=1, maximum=3650)
    since = datetime.now(UTC) - timedelta(days=days)
    return web.json_response(await request.app[GATE].break_glass_report(since=since))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_default)


def _default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)
