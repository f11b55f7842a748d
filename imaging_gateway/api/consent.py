"""Consent routes (hospital, admin, patient), the patient's own views, the break-glass report."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web

from imaging_gateway.api.keys import CONSENT, PEER_GRANT, PRINCIPAL
from imaging_gateway.api.params import int_param, json_body
from imaging_gateway.api.urls import public_base
from imaging_gateway.security.access import AccessContext
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
    consent = await request.app[CONSENT].record(ctx, await json_body(request))
    return web.json_response(
        consent.as_json(ctx.now), status=201, headers={"Location": f"{base}/consents/{consent.id}"}
    )


@routes.get("/consents")
async def list_consents(request: web.Request) -> web.Response:
    """Grants a hospital holds (optionally for one ``patient``), or any patient's for an admin."""
    ctx = access_context(request)
    found = await request.app[CONSENT].list(ctx, patient=request.query.get("patient"))
    return web.json_response([c.as_json(ctx.now) for c in found])


@routes.get("/consents/{id}")
async def get_consent(request: web.Request) -> web.Response:
    ctx = access_context(request)
    consent = await request.app[CONSENT].get(ctx, request.match_info["id"])
    return web.json_response(consent.as_json(ctx.now))


@routes.delete("/consents/{id}")
async def revoke_consent(request: web.Request) -> web.Response:
    """Revoke a grant (its patient, its grantee hospital or an admin); effective at once."""
    ctx = access_context(request)
    revoked = await request.app[CONSENT].revoke(ctx, request.match_info["id"])
    return web.json_response(revoked.as_json(ctx.now))


@routes.get("/me/consents")
async def my_consents(request: web.Request) -> web.Response:
    """A patient's own grants, active and past."""
    ctx = access_context(request)
    found = await request.app[CONSENT].mine(ctx)
    return web.json_response([c.as_json(ctx.now) for c in found])


@routes.get("/me/access-log")
async def my_access_log(request: web.Request) -> web.Response:
    """Who opened the patient's images, when, why and with what outcome (newest first)."""
    ctx = access_context(request)
    # A record number: the audit log's seq is a signed 64-bit integer.
    before = int_param(request.query, "before", default=None, minimum=1, maximum=2**63 - 1)
    records = await request.app[CONSENT].access_log(ctx, before_seq=before)
    return web.json_response(records, dumps=_dumps)


@routes.get("/admin/break-glass")
async def break_glass_report(request: web.Request) -> web.Response:
    """Emergency accesses of the last ``days`` (default 30), for the province's review."""
    ctx = access_context(request)
    ctx.principal.require("admin")
    days = int_param(request.query, "days", default=30, minimum=1, maximum=3650)
    return web.json_response(await request.app[CONSENT].break_glass_report(ctx, days=days))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_default)


def _default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)
