"""CORS for browser viewers (e.g. OHIF on another origin): allowed origins from config only."""

from __future__ import annotations

from aiohttp import web

from imaging_gateway.api.middlewares import Handler

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Accept, Content-Type, X-Break-Glass-Reason, X-Purpose-Of-Use"
EXPOSE_HEADERS = "Warning, Location, Content-Type, Content-Length"


def setup_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    """Answer preflights and label responses for ``origins`` (``"*"``: any origin).

    Only the listed origins get CORS headers; credentials travel in the Authorization
    header (no cookies), so ``Access-Control-Allow-Credentials`` is never sent.
    """
    allowed = frozenset(origins)
    if not allowed:
        return

    def allows(origin: str | None) -> bool:
        return origin is not None and ("*" in allowed or origin in allowed)

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and allows(origin)
        ):
            # Preflights carry no credentials: answered before authentication.
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                },
            )
        return await handler(request)

    async def label(request: web.Request, response: web.StreamResponse) -> None:
        # A signal, not a middleware: streamed WADO-RS responses send their headers
        # before the handler returns.
        origin = request.headers.get("Origin")
        if allows(origin):
            assert origin is not None
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(label)
