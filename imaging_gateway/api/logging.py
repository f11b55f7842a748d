"""An access logger that never writes query strings, credentials or paths as sent (they
can carry PHI)."""

from __future__ import annotations

import logging
import re
import traceback

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, StreamResponse

from imaging_gateway.domain.qido import is_uid

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Filled in: UIDs of two components or more (a national ID or PatientID is one run of
# digits) and province codes. Anything else stays a placeholder.
_UID_PARTS = frozenset({"study", "series", "instance"})
_PROVINCE = re.compile(r"[0-9]{6}")


def route_of(request: BaseRequest) -> str:
    """The path by the route that matched, with only its UIDs (two components or more)
    and province code filled in: ``/dicomweb/studies/1.2.3/.../bulkdata/{path}``; ``-``
    when no route matched.

    Never the path as sent: a path can carry anything, an identifier behind an encoded
    ``?`` (``/dicomweb/studies%3FPatientID%3D...``) or in a free-form tail (bulkdata).
    """
    if not isinstance(request, Request):
        return "-"
    try:
        match_info = request.match_info
    except AssertionError:  # a request aiohttp refused before routing
        return "-"
    resource = match_info.route.resource
    if resource is None:
        return "-"

    def part(m: re.Match[str]) -> str:
        name, value = m.group(1), match_info.get(m.group(1))
        if value is None:
            return m.group(0)
        if name in _UID_PARTS and "." in value and is_uid(value):
            return value
        if name == "province" and _PROVINCE.fullmatch(value):
            return value
        return m.group(0)

    return _PLACEHOLDER.sub(part, resource.canonical)


def stack_without_message(exc: BaseException) -> str:
    """The exception's class and stack, not its message (messages can quote input)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n{frames}"


class SafeAccessLogger(AbstractAccessLogger):
    """One line per request: remote, method, route (:func:`route_of`; no query), status,
    size, time."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            '%s "%s %s" %d %d %.1fms',
            request.remote,
            request.method,
            route_of(request),
            response.status,
            response.body_length,
            time * 1000,
        )
