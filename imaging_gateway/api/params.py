"""Request parsing routes share: JSON bodies, integer query parameters, path UIDs, NUL,
and the WADO-RS frame lists and rendering parameters (PS3.18 8.3.3.1, 8.3.5.1).

Each refuses bad input with ``InvalidRequest`` (400) naming the parameter, so that no
malformed value reaches a database that would fail on it (PostgreSQL stores no NUL in
text and no integer beyond its column's width) or code that would overflow on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, overload

import orjson
from aiohttp import web

from imaging_gateway.dicom.rendering import MAX_VIEWPORT
from imaging_gateway.domain.qido import is_uid
from imaging_gateway.errors import InvalidRequest

__all__ = [
    "MAX_FRAME_LIST",
    "PATH_UIDS",
    "check_no_nul",
    "int_param",
    "json_body",
    "parse_frame_list",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "path_uid_problem",
]

_DIGITS: Final = re.compile(r"[0-9]{1,19}")
"""ASCII digits only: str.isdigit() also takes e.g. superscripts, which int() refuses."""
_ASCII_DIGITS: Final = re.compile(r"[0-9]+")
MAX_FRAME_LIST: Final = 1024
"""Most frames one Retrieve Frames request may list (the instance's NumberOfFrames too)."""


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


# ---------------------------------------------------------------------------
# WADO-RS request parameters (PS3.18 8.3.3.1 frame lists, 8.3.5.1 rendering parameters)


def parse_frame_list(text: str) -> list[int]:
    """``"1,3,5"`` -> [1, 3, 5] (order kept).

    Raises ``InvalidRequest`` (naming ``frames``) when malformed, when a frame is listed
    twice (each repeat would be read and sent again: PS3.18 8.3.3.1 lists frames, it
    does not ask for copies) or when more than :data:`MAX_FRAME_LIST` frames are listed.
    The instance's own bound (its NumberOfFrames) is checked once its header is read.
    """
    pieces = text.split(",")
    if len(pieces) > MAX_FRAME_LIST:
        raise InvalidRequest(
            f"frames: at most {MAX_FRAME_LIST} frames a request ({len(pieces)} listed); "
            "retrieve the pixel data's bulk data URI for all frames"
        )
    numbers: list[int] = []
    seen: set[int] = set()
    for piece in pieces:
        piece = piece.strip()
        if not _ASCII_DIGITS.fullmatch(piece) or len(piece) > 9:
            raise InvalidRequest("frames: a frame list is comma-separated frame numbers from 1")
        number = int(piece)
        if number < 1:
            raise InvalidRequest("frames: frame numbers start at 1")
        if number in seen:
            raise InvalidRequest(f"frames: frame {number} is listed twice")
        seen.add(number)
        numbers.append(number)
    return numbers


def parse_window(text: str) -> tuple[float, float]:
    """``"center,width[,linear]"`` -> (center, width). ``InvalidRequest`` if malformed.

    Only the ``linear`` VOI LUT function is supported (``linear-exact`` and ``sigmoid``
    are refused).
    """
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) not in (2, 3) or (len(pieces) == 3 and pieces[2].lower() != "linear"):
        raise InvalidRequest("window is center,width[,linear]")
    try:
        center, width = float(pieces[0]), float(pieces[1])
    except ValueError:
        raise InvalidRequest("window center and width are numbers") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InvalidRequest("the window width must be greater than 0")
    return center, width


def parse_viewport(text: str) -> tuple[int, int]:
    """``"vw,vh"`` -> (vw, vh), each 1 to :data:`MAX_VIEWPORT`.

    Source regions (sx,sy,sw,sh) and impossible sizes are refused: ``InvalidRequest``.
    """
    pieces = [p.strip() for p in text.split(",")]
    if len(pieces) != 2 or not all(_ASCII_DIGITS.fullmatch(p) and len(p) <= 9 for p in pieces):
        raise InvalidRequest("viewport is width,height in pixels")
    width, height = int(pieces[0]), int(pieces[1])
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise InvalidRequest(f"viewport: width and height are 1 to {MAX_VIEWPORT} pixels")
    return width, height


def parse_quality(text: str) -> int:
    """``"75"`` -> 75 (1-100). ``InvalidRequest`` otherwise."""
    text = text.strip()
    if not _ASCII_DIGITS.fullmatch(text) or not 1 <= int(text) <= 100:
        raise InvalidRequest("quality is 1 to 100")
    return int(text)
