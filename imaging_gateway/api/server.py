"""The HTTP server around the app: malformed requests answered in JSON, logged without content.

aiohttp answers what its HTTP parser refuses (a request line or header field over
8,190 bytes, a bad method, a control character in a header) and what fails outside
the middlewares in ``RequestHandler.handle_error``: a ``text/plain`` body quoting the
offending bytes, logged with a traceback that quotes them too (a PatientID in a query
string, a national ID from ``/consents?patient=``, the start of a bearer token). There
is no supported hook for it (aio-libs/aiohttp#3287), so the gateway's runner builds its
connections with :class:`GatewayRequestHandler`, whose ``handle_error`` answers like
the error middleware (``{"error": code, "message": ...}``) and logs only the peer
address, the exception's class and, for a 500, the stack without its message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from imaging_gateway.api.logging import stack_without_message
from imaging_gateway.api.middlewares import problem

log = logging.getLogger("imaging_gateway.http")

# Where the C and the pure-Python parser raise LineTooLong, by the part that is too long.
_URL_FRAMES = frozenset({"cb_on_url"})
_HEADER_FRAMES = frozenset({"cb_on_header_field", "cb_on_header_value", "parse_headers"})


def _innermost_frame(exc: BaseException) -> str:
    """The function the exception was raised in (Cython names it ``module.function``)."""
    tb = exc.__traceback__
    name = ""
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return name.rsplit(".", 1)[-1]


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler; errors outside the app answer JSON, log no content."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The response for a request aiohttp could not hand to the app, or that failed
        outside its middlewares; ``message`` (aiohttp's, quoting the input) is dropped.

        Raises ``ConnectionError`` when part of a response was already sent.
        """
        code, text = self._describe(status, exc)
        if isinstance(exc, HttpProcessingError):
            # Noise from anything that speaks to an HTTP port; never the request's bytes.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
            log.log(level, "refused a malformed request from %s: %s (%s)", request.remote,
                    type(exc).__name__, text)  # fmt: skip
        elif exc is not None:
            log.error("error handling a request from %s (HTTP %d): %s", request.remote,
                      status, stack_without_message(exc))  # fmt: skip
        else:
            log.error("error handling a request from %s (HTTP %d)", request.remote, status)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was partly sent; it cannot become an error")
        resp = problem(status, code, text)
        resp.force_close()
        return resp

    def _describe(self, status: int, exc: BaseException | None) -> tuple[str, str]:
        """(code, message) for the answer; never a byte of the request."""
        if isinstance(exc, LineTooLong):
            frame = _innermost_frame(exc)
            if frame in _URL_FRAMES:
                text = f"the request line (the URL) is longer than {self.max_line_size} bytes"
            elif frame in _HEADER_FRAMES:
                text = f"a request header field is longer than {self.max_field_size} bytes"
            else:
                limit = min(self.max_line_size, self.max_field_size)
                text = f"the request line or a header field is longer than {limit} bytes"
            return "request-too-large", text
        if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
            name = type(exc).__name__ if exc is not None else HTTPStatus(status).phrase
            return "bad-request", f"the request is not valid HTTP/1.1 ({name})"
        if status == 504:
            return "timeout", "the request took too long to handle"
        return "internal-error", "internal error"


class GatewayServer(web.Server):
    """aiohttp's low-level server, with :class:`GatewayRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through :class:`GatewayServer`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # starts the app (on_startup, cleanup_ctx)
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **server._kwargs,
        )


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    access_log_class: type[AbstractAccessLogger] | None = None,
    on_serving: Callable[[], None] = lambda: None,
    handle_signals: bool = True,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (then ``web.GracefulExit`` is raised, as
    ``web.run_app`` does) or until cancelled; the app's cleanup runs on the way out.

    ``handle_signals=False`` for a loop outside the main thread (signals reach only that).
    """
    # keepalive_timeout as web.run_app sets it (the handler's own default is an hour).
    if access_log_class is None:
        runner = GatewayRunner(app, handle_signals=handle_signals, keepalive_timeout=75.0)
    else:
        runner = GatewayRunner(app, handle_signals=handle_signals, keepalive_timeout=75.0,
                               access_log_class=access_log_class)  # fmt: skip
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        on_serving()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
