"""Middlewares: error translation (the one place errors become responses) and authentication."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from imaging_gateway.api.keys import GATE, PRINCIPAL, TOKENS
from imaging_gateway.errors import GatewayError, Unauthenticated

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})


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
    except Exception:
        # Path only: query strings may carry patient identifiers.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "internal-error", "internal error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("a bearer token is required")
        request[PRINCIPAL] = request.app[TOKENS].verify(token.strip())
    except Unauthenticated as exc:
        await request.app[GATE].refused_token(source=request.remote, reason=exc.message)
        raise
    return await handler(request)
