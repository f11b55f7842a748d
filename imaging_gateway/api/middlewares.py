"""Middlewares: error translation (the one place errors become responses), mTLS, authentication."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from imaging_gateway.api.federation import authenticate_peer, peer_assertion
from imaging_gateway.api.keys import ACCESS, CLIENT_CERTIFICATE, PRINCIPAL, SETTINGS, TOKENS
from imaging_gateway.api.logging import route_of, stack_without_message
from imaging_gateway.api.params import check_no_nul
from imaging_gateway.crypto.tls import client_certificate, route_needing_certificate
from imaging_gateway.errors import (
    ClientCertificateRequired,
    Forbidden,
    GatewayError,
    Unauthenticated,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
PATIENT_DATA_PREFIX = "/dicomweb"
"""Every route under it reads or writes patient data: never an admin's."""


def problem(status: int, code: str, message: str) -> web.Response:
    """A JSON error body; never a traceback."""
    resp = web.json_response({"error": code, "message": message}, status=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="imaging-gateway"'
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return problem(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return problem(exc.status, "http-error", exc.reason)
        raise
    except Exception as exc:
        # The route, not the path or query, and no message: all can carry identifiers.
        log.error("unhandled error on %s %s: %s", request.method, route_of(request),
                  stack_without_message(exc))  # fmt: skip
        return problem(500, "internal-error", "internal error")


@web.middleware
async def client_certificate_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Expose a verified client certificate; refuse ``tls.client_cert_routes`` without one.

    Raises ``ClientCertificateRequired`` (403). Runs before bearer authentication: on
    these routes the certificate is needed in addition to the token.
    """
    transport = request.transport
    cert = None if transport is None else client_certificate(transport.get_extra_info("peercert"))
    if cert is not None:
        request[CLIENT_CERTIFICATE] = cert
    prefix = route_needing_certificate(request.path, request.app[SETTINGS].tls.client_cert_routes)
    if prefix is not None and cert is None:
        # The configured prefix, not the path: paths can carry study UIDs.
        log.info("refused: no verified client certificate for %s routes", prefix)
        raise ClientCertificateRequired(
            "this route requires a client certificate from a trusted CA"
        )
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer tokens; a peer gateway's signed assertion on ``GET /dicomweb/...`` instead.

    Raises ``Unauthenticated`` (audited, flood-limited) and ``Forbidden`` for an
    assertion sent to anything but a DICOMweb read and for an admin token on any
    ``/dicomweb`` route (admins read no patient data: a refusal by role, 403, rather than
    the empty answer the gate's filter would give).
    """
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    assertion = peer_assertion(request)
    if assertion is not None:
        if request.method not in ("GET", "HEAD") or not request.path.startswith("/dicomweb/"):
            raise Forbidden("a federation peer may only read DICOMweb resources")
        await authenticate_peer(request, assertion)
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("a bearer token is required")
        principal = request.app[TOKENS].verify(token.strip())
    except Unauthenticated as exc:
        await request.app[ACCESS].refused_token(source=request.remote, reason=exc.message)
        raise
    request[PRINCIPAL] = principal
    if principal.role == "admin" and (
        request.path == PATIENT_DATA_PREFIX or request.path.startswith(PATIENT_DATA_PREFIX + "/")
    ):
        reason = "admins read no patient data: /dicomweb needs a hospital or patient token"
        await request.app[ACCESS].refused_token(
            source=request.remote, reason=reason, role="admin", subject=principal.subject,
            action="dicomweb",
        )
        raise Forbidden(reason)
    return await handler(request)


@web.middleware
async def input_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse NUL in any path or query parameter, for every route, before its handler.

    PostgreSQL cannot hold NUL in text (SQLite can): refused here, at the one point every
    request passes, the answer is the same 400 naming the parameter on both backends.
    """
    check_no_nul(request.match_info.items(), where="path")
    check_no_nul(request.query.items(), where="query")
    return await handler(request)
