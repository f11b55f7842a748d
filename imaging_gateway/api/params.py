"""Request parsing routes share: JSON bodies, integer query parameters, path UIDs, NUL.

Each refuses bad input with ``InvalidRequest`` (400) naming the parameter, so that no
malformed value reaches a database that would fail on it (PostgreSQL stores no NUL in
text and no integer beyond its column's width) or code that would overflow on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, overload

import orjson
from aiohttp import web

from imaging_gateway.domain.qido import is_uid
from imaging_gateway.errors import InvalidRequest

__all__ = ["PATH_UIDS", "check_no_nul", "int_param", "json_body", "path_uid_problem"]

_DIGITS: Final = re.compile(r"[0-9]{1,19}")
"""ASCII digits only: str.isdigit() also takes e.g. superscripts, which int() refuses."""


def check_no_nul(pairs: Iterable[tuple[str, str]], *, where: str) -> None:
    """Raises ``InvalidRequest`` naming the first parameter whose name or value holds NUL.

    ``where`` says which kind of parameter (``query``, ``path``) for the message.
    """
    for name, value in pairs:
        if "\x00" in name or "\x00" in value:
            label = name.replace("\x00", "\\x00")
            raise InvalidRequest(f"{label} ({where} parameter): NUL characters are not allowed")


PATH_UIDS: Final = ("study", "series", "instance")
"""The route parameters that hold UIDs (DICOMweb and federation routes)."""


def path_uid_problem(match_info: Mapping[str, str]) -> str | None:
    """Which UID of a route's path is not a UID as PS3.5 9.1 writes it, or None.

    The routes take digits and dots; a UID is also at most 64 characters with no leading
    zeros in a component (and the index's and the audit log's columns hold no more).
    """
    for name in PATH_UIDS:
        value = match_info.get(name)
        if value is not None and not is_uid(value):
            return f"{name}: not a valid UID (PS3.5 9.1: digits and dots, at most 64 characters)"
    return None


@overload
def int_param(
    query: Mapping[str, str], name: str, *, default: int, minimum: int, maximum: int
) -> int: ...
@overload
def int_param(
    query: Mapping[str, str], name: str, *, default: None, minimum: int, maximum: int
) -> int | None: ...
def int_param(
    query: Mapping[str, str], name: str, *, default: int | None, minimum: int, maximum: int
) -> int | None:
    """The integer query parameter ``name`` (ASCII digits) within ``minimum..maximum``.

    ``default`` when absent. Raises ``InvalidRequest`` naming it otherwise.
    """
    raw = query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        raise InvalidRequest(f"{name}: an integer from {minimum} to {maximum}")
    return int(raw)


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, parsed with orjson; strings hold no NUL.

    orjson refuses invalid UTF-8, lone surrogates, NaN and nesting deeper than 1024
    (where the standard library's parser overflows the stack), each as a
    ``JSONDecodeError``. Raises ``InvalidRequest`` naming ``body`` (or the member whose
    string holds NUL).
    """
    data = await request.read()
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "body: not a JSON document (UTF-8, nested at most 1024 deep)"
        ) from None
    _refuse_nul(value)
    return value


def _refuse_nul(value: Any) -> None:
    """Raises ``InvalidRequest`` naming the member of ``value`` whose string holds NUL.

    Walks without recursion: nesting is bounded by the parser, not by the stack.
    """
    pending: list[tuple[str, Any]] = [("body", value)]
    while pending:
        name, node = pending.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise InvalidRequest(f"{name}: NUL characters are not allowed")
        elif isinstance(node, dict):
            for key, item in node.items():
                if "\x00" in key:
                    raise InvalidRequest(f"{name}: NUL characters are not allowed in names")
                pending.append((key, item))
        elif isinstance(node, list):
            pending.extend((name, item) for item in node)
