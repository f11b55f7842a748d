"""WADO-RS media types and Accept negotiation (PS3.18 8.7): what a retrieve may send a client.

Pure: no I/O. Which transfer syntaxes the server can make is asked of a ``producible``
callable (the transcoder's); without one everything is offered only as stored.

Rules, and where they differ from the letter of PS3.18 8.7.3:

* Media ranges are parsed per RFC 9110 12.5.1: several ranges, ``q`` values, ``*/*`` and
  ``type/*`` wildcards; the most specific range matching a representation gives its
  quality, ``q=0`` refuses it. ``type`` may be quoted or not, and a ``transfer-syntax``
  written inside the quoted ``type`` (``type="application/dicom;transfer-syntax=..."``)
  is understood too. No Accept header at all means the first (default) representation:
  for instances and frames, as stored (RFC 9110: any media type is acceptable).
* A single-part range naming a part's media type (``application/dicom``,
  ``application/octet-stream``, ``image/jpeg``) accepts the multipart response whose parts
  have that type (8.7.3: the response of a multi-instance resource is always multipart).
* Instances (8.7.3.5): ``transfer-syntax=*`` means "as stored"; a range without the
  parameter means Explicit VR Little Endian, the default; a named UID means that syntax.
  Each stored syntax of the request is negotiated on its own: as stored if accepted,
  else the accepted syntax with the highest q the server can produce (ties go to as
  stored, then Explicit VR LE); 406 names, per stored syntax, why nothing fits.
* Frames and pixel data: uncompressed frames are ``application/octet-stream`` in Explicit
  VR Little Endian (the bytes of a frame are the same in every little-endian uncompressed
  syntax). Compressed frames are offered in their image media type (``image/jpeg``,
  ``image/jp2``, ...), whatever ``transfer-syntax`` that range names or omits as long as
  it is not another one, and as ``application/octet-stream`` as stored only when the
  range says ``transfer-syntax=*`` or names the stored syntax: ``application/octet-stream``
  alone means Explicit VR Little Endian (8.7.3), which is met by decoding when the server
  can. ``image/dicom-rle`` and ``image/jp2`` (JPEG 2000 Lossless, that type's default in
  Table 8.7.3-5) are also made from other sources. Video syntaxes have no frames to offer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from imaging_gateway.errors import NotAcceptable

__all__ = [
    "COMPRESSED_FRAME_MEDIA_TYPES",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "NATIVE_LITTLE_ENDIAN",
    "VIDEO_MEDIA_TYPES",
    "InstancesChoice",
    "MediaRange",
    "Producible",
    "Representation",
    "frame_offers",
    "parse_accept",
    "select",
    "select_bulkdata",
    "select_frames",
    "select_instances",
    "select_metadata",
    "select_rendered",
    "select_thumbnail",
]

IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"
NATIVE_LITTLE_ENDIAN: Final = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
)
"""Uncompressed little-endian syntaxes: their pixel data bytes are those of Explicit VR LE."""

_JPEG = ("image/jpeg",)
_JLS = ("image/jls", "image/x-jls")
_JP2 = ("image/jp2",)
_JPX = ("image/jpx",)
_HTJ2K = ("image/jphc",)
_JXL = ("image/jxl",)
COMPRESSED_FRAME_MEDIA_TYPES: Final[Mapping[str, tuple[str, ...]]] = {
    # PS3.18 8.7.4: media types of compressed pixel data; the first is the one sent
    # unless the client asks for another (x- forms are older names).
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": _JLS,
    "1.2.840.10008.1.2.4.81": _JLS,
    "1.2.840.10008.1.2.4.90": _JP2,
    "1.2.840.10008.1.2.4.91": _JP2,
    "1.2.840.10008.1.2.4.92": _JPX,
    "1.2.840.10008.1.2.4.93": _JPX,
    "1.2.840.10008.1.2.4.110": _JXL,
    "1.2.840.10008.1.2.4.111": _JXL,
    "1.2.840.10008.1.2.4.112": _JXL,
    "1.2.840.10008.1.2.4.201": _HTJ2K,
    "1.2.840.10008.1.2.4.202": _HTJ2K,
    "1.2.840.10008.1.2.4.203": _HTJ2K,
    "1.2.840.10008.1.2.5": ("image/dicom-rle", "image/x-dicom-rle"),
}
VIDEO_MEDIA_TYPES: Final[Mapping[str, str]] = {
    "1.2.840.10008.1.2.4.100": "video/mpeg2",
    "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
_OCTET_STREAM = "application/octet-stream"
_DICOM = "application/dicom"
_RLE = "1.2.840.10008.1.2.5"
_J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One media range of an Accept header, lower-cased (the transfer syntax as written)."""

    media_type: str
    """``type/subtype``, possibly ``*/*`` or ``type/*``."""
    part_type: str | None = None
    """The ``type`` parameter of ``multipart/related``; None when absent."""
    transfer_syntax: str | None = None
    """The ``transfer-syntax`` parameter: a UID, ``*``, or None when absent."""
    q: float = 1.0


@dataclass(frozen=True, slots=True)
class Representation:
    """One form a resource can be sent in."""

    media_type: str
    """The body's media type, or for a multipart body the media type of each part."""
    transfer_syntax: str | None = None
    """Transfer syntax of the content (parts' ``transfer-syntax`` parameter); None if none."""
    multipart: bool = False
    """Sent as ``multipart/related; type="<media_type>"``."""
    implied: bool = True
    """Whether a media range with no ``transfer-syntax`` parameter accepts it."""

    @property
    def content_type(self) -> str:
        """The response's Content-Type (for multipart, without the ``boundary`` parameter)."""
        if self.multipart:
            return f'multipart/related; type="{self.media_type}"'
        return self.media_type

    @property
    def part_content_type(self) -> str:
        """The Content-Type of each part (or of the body): media type and transfer syntax."""
        if self.transfer_syntax:
            return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"
        return self.media_type


# ---------------------------------------------------------------------------
# Parsing


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double-quoted strings (RFC 9110 5.6.4 quoted-string)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if char == "\\" and not escaped:
                escaped = True
                continue
            escaped = False
            out.append(char)
        return "".join(out)
    return value


def _parse_range(item: str) -> MediaRange | None:
    pieces = _split(item, ";")
    media_type = pieces[0].strip().lower()
    if media_type == "*":  # some HTTP stacks send a bare "*"
        media_type = "*/*"
    main, slash, sub = media_type.partition("/")
    if not slash or not main or not sub or (main == "*" and sub != "*"):
        return None
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, equals, value = piece.partition("=")
        name = name.strip().lower()
        if not name or not equals:
            continue
        params.setdefault(name, _unquote(value))
    part_type: str | None = None
    if "type" in params:
        # dcm4che and others write the part's parameters inside the quoted type.
        inner = _split(params["type"], ";")
        part_type = inner[0].strip().lower() or None
        for piece in inner[1:]:
            name, _, value = piece.partition("=")
            params.setdefault(name.strip().lower(), _unquote(value))
    q = 1.0
    if "q" in params:
        try:
            q = float(params["q"])
        except ValueError:
            return None
        if not 0.0 <= q <= 1.0:
            return None
    syntax = params.get("transfer-syntax")
    return MediaRange(
        media_type=media_type,
        part_type=part_type,
        transfer_syntax=syntax.strip() if syntax is not None and syntax.strip() else None,
        q=q,
    )


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, in the order written.

    Malformed ranges (no ``type/subtype``, a ``q`` that is not a number in [0, 1]) are
    skipped, as RFC 9110 lets a server do. None or a blank header gives ``[]``. Raises
    nothing.
    """
    if header is None or not header.strip():
        return []
    ranges: list[MediaRange] = []
    for item in _split(header, ","):
        if item.strip():
            parsed = _parse_range(item)
            if parsed is not None:
                ranges.append(parsed)
    return ranges


# ---------------------------------------------------------------------------
# Matching


def _type_score(pattern: str, media_type: str) -> int | None:
    """How specifically ``pattern`` matches ``media_type``: 2 exact, 1 ``type/*``, 0 ``*/*``."""
    if pattern == "*/*":
        return 0
    if pattern == media_type:
        return 2
    main, _, sub = pattern.partition("/")
    if sub == "*" and media_type.partition("/")[0] == main:
        return 1
    return None


def _specificity(media_range: MediaRange, rep: Representation) -> tuple[int, int, int] | None:
    """The specificity of ``media_range`` for ``rep``; None when it does not match.

    Compared as tuples: how the outer type matched, how the part type matched, and
    whether the transfer syntax was named (2), a wildcard (1) or absent (0).
    """
    outer = media_range.media_type
    if rep.multipart:
        if outer == "multipart/related":
            if media_range.part_type is None:
                type_score = (3, 0)
            else:
                part = _type_score(media_range.part_type, rep.media_type)
                if part is None:
                    return None
                type_score = (3, part)
        elif outer in ("multipart/*", "*/*"):
            type_score = (2 if outer == "multipart/*" else 0, 0)
        else:
            # A single-part range naming the parts' media type (PS3.18 8.7.3).
            part = _type_score(outer, rep.media_type)
            if part is None:
                return None
            type_score = (1, part)
    else:
        if media_range.part_type is not None and not outer.startswith("multipart/"):
            return None
        single = _type_score(outer, rep.media_type)
        if single is None:
            return None
        type_score = (single, 0)
    syntax = media_range.transfer_syntax
    if syntax is None:
        if not rep.implied:
            return None
        syntax_score = 0
    elif rep.transfer_syntax is None:
        # Single-part bodies (JSON, rendered images) have no transfer syntax to match; a
        # multipart one of unknown syntax cannot be promised to be the one named.
        if rep.multipart and syntax != "*":
            return None
        syntax_score = 0
    elif syntax == "*":
        syntax_score = 1
    elif syntax == rep.transfer_syntax:
        syntax_score = 2
    else:
        return None
    return (*type_score, syntax_score)


def _quality(ranges: Sequence[MediaRange], rep: Representation) -> float:
    """The quality the client gives ``rep``: the q of the most specific matching range."""
    best: tuple[int, int, int] | None = None
    quality = 0.0
    for media_range in ranges:
        score = _specificity(media_range, rep)
        if score is None:
            continue
        if best is None or score > best:
            best, quality = score, media_range.q
        elif score == best:
            quality = max(quality, media_range.q)
    return quality


def _refuse(what: str, offers: Sequence[Representation], note: str = "") -> NotAcceptable:
    available = ", ".join(
        f"{rep.content_type}"
        + (f"; transfer-syntax={rep.transfer_syntax}" if rep.transfer_syntax else "")
        for rep in offers
    )
    message = f"{what} cannot be sent in any media type the request accepts"
    if available:
        message += f"; available: {available}"
    if note:
        message += f" ({note})"
    return NotAcceptable(message)


def select(
    accept: str | None, offers: Sequence[Representation], *, what: str = "the resource"
) -> Representation:
    """The offer the client prefers: highest quality, then the earliest offer.

    With no Accept header (None or blank) the first offer is chosen. Raises
    ``NotAcceptable`` when no offer has a quality above zero (or there are no offers).
    """
    if not offers:
        raise _refuse(what, offers)
    ranges = parse_accept(accept)
    if not ranges:
        if accept is None or not accept.strip():
            return offers[0]
        raise _refuse(what, offers, "the Accept header holds no valid media range")
    best: Representation | None = None
    best_q = 0.0
    for rep in offers:
        q = _quality(ranges, rep)
        if q > best_q:
            best, best_q = rep, q
    if best is None:
        raise _refuse(what, offers)
    return best


# ---------------------------------------------------------------------------
# Per resource kind


Producible = Callable[[str | None, str], str | None]
"""``(stored syntax, wanted syntax) -> None`` if the server can make it, else the reason."""


@dataclass(frozen=True, slots=True)
class InstancesChoice:
    """What Retrieve Study / Series / Instance sends: the body type and each part's syntax."""

    representation: Representation
    """``multipart/related; type="application/dicom"``; ``transfer_syntax`` set when every
    part is sent in the same one."""
    syntaxes: Mapping[str | None, str | None]
    """Stored transfer syntax (None: unknown) -> the one sent (equal: as stored)."""


def _named_syntaxes(ranges: Sequence[MediaRange]) -> list[str]:
    named: list[str] = []
    for media_range in ranges:
        syntax = media_range.transfer_syntax
        if syntax and syntax != "*" and media_range.q > 0 and syntax not in named:
            named.append(syntax)
    return named


def _instance_offers(
    stored: str | None, candidates: Sequence[str], producible: Producible | None
) -> tuple[list[Representation], list[str]]:
    """Offers for one stored syntax, as stored first; and why the others cannot be made."""
    if stored is None:
        # Unknown stored syntax: only "as stored", and only when nothing else is named.
        return [Representation(_DICOM, None, multipart=True, implied=True)], []
    offers = [
        Representation(
            _DICOM, stored, multipart=True, implied=stored == EXPLICIT_VR_LITTLE_ENDIAN
        )
    ]
    reasons: list[str] = []
    for target in candidates:
        if target == stored:
            continue
        reason = "nothing is transcoded" if producible is None else producible(stored, target)
        if reason is None:
            offers.append(
                Representation(
                    _DICOM, target, multipart=True, implied=target == EXPLICIT_VR_LITTLE_ENDIAN
                )
            )
        else:
            reasons.append(f"{stored} to {target}: {reason}")
    return offers, reasons


def select_instances(
    accept: str | None,
    transfer_syntaxes: Iterable[str | None],
    *,
    producible: Producible | None = None,
) -> InstancesChoice:
    """Negotiate Retrieve Study / Series / Instance (PS3.18 10.4.1.1.1, 8.7.3.5).

    Each stored transfer syntax is negotiated on its own: sent as stored when the client
    accepts that (``transfer-syntax=*``, the stored UID, no Accept header at all, or no
    parameter and the stored syntax is Explicit VR Little Endian, the default of 8.7.3),
    else in the accepted syntax with the highest q that ``producible`` says the server
    can make (as stored wins ties). Without ``producible`` nothing is transcoded.

    Raises ``NotAcceptable`` when some stored syntax can be sent in no accepted one; the
    message names what could be sent and why the accepted syntaxes could not be made.
    """
    stored = sorted({ts or "" for ts in transfer_syntaxes})
    ranges = parse_accept(accept)
    if not ranges and accept is not None and accept.strip():
        offers = [Representation(_DICOM, ts or None, multipart=True) for ts in stored]
        raise _refuse("the instances", offers, "the Accept header holds no valid media range")
    candidates = [EXPLICIT_VR_LITTLE_ENDIAN, *_named_syntaxes(ranges)]
    chosen: dict[str | None, str | None] = {}
    refusals: list[str] = []
    for ts in stored:
        offers, reasons = _instance_offers(ts or None, candidates, producible)
        try:
            chosen[ts or None] = select(accept, offers, what="the instances").transfer_syntax
        except NotAcceptable:
            available = ", ".join(rep.part_content_type for rep in offers)
            why = f"; {'; '.join(reasons)}" if reasons else ""
            refusals.append(f"stored in {ts or 'an unknown syntax'}: available {available}{why}")
    if refusals:
        raise NotAcceptable(
            "the instances cannot be sent in any media type the request accepts ("
            + "), (".join(refusals)
            + ")"
        )
    sent = set(chosen.values())
    only = sent.pop() if len(sent) == 1 else None
    return InstancesChoice(Representation(_DICOM, only, multipart=True), chosen)


def frame_offers(
    transfer_syntax: str | None, *, producible: Producible | None = None
) -> list[Representation]:
    """How the frames (or pixel data) of an instance stored in ``transfer_syntax`` can be sent.

    As stored first; with ``producible`` (stored frame syntax, wanted syntax -> reason or
    None) also decoded to ``application/octet-stream`` Explicit VR Little Endian and
    encoded as ``image/dicom-rle`` (RLE Lossless) or ``image/jp2`` (JPEG 2000 Lossless,
    the default syntax of that media type in PS3.18 Table 8.7.3-5). Empty for video
    syntaxes, whose frames cannot be cut out of the stream. Raises nothing.
    """
    ts = transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN
    if ts in NATIVE_LITTLE_ENDIAN:
        ts = EXPLICIT_VR_LITTLE_ENDIAN
        offers = [Representation(_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, multipart=True)]
    elif ts in VIDEO_MEDIA_TYPES:
        return []
    else:
        image_types = COMPRESSED_FRAME_MEDIA_TYPES.get(ts, ())
        offers = [Representation(media_type, ts, multipart=True) for media_type in image_types]
        # Octet-stream without a transfer-syntax parameter means Explicit VR LE (8.7.3).
        offers.append(Representation(_OCTET_STREAM, ts, multipart=True, implied=False))
    if producible is not None:
        for media_type, target in (
            (_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN),
            ("image/dicom-rle", _RLE),
            ("image/jp2", _J2K_LOSSLESS),
        ):
            if target != ts and producible(ts, target) is None:
                offers.append(Representation(media_type, target, multipart=True))
    return offers


def select_frames(
    accept: str | None, transfer_syntax: str | None, *, producible: Producible | None = None
) -> Representation:
    """Negotiate Retrieve Frames or pixel data (PS3.18 10.4.1.1.6).

    ``producible`` as for :func:`frame_offers`; without it frames go only as stored.
    Raises ``NotAcceptable`` when the frames cannot be sent in an accepted type (e.g.
    compressed frames with no decoder to a client that accepts only uncompressed
    octet-stream, video).
    """
    offers = frame_offers(transfer_syntax, producible=producible)
    note = (
        "frames are sent in their stored transfer syntax; nothing is decompressed"
        if producible is None
        else "no decoder or encoder on this gateway makes an accepted form"
    )
    if not offers:
        note = "video has no separately retrievable frames; retrieve the instance"
    try:
        return select(accept, offers, what="the frames")
    except NotAcceptable as exc:
        raise _refuse("the frames", offers, note) from exc


def select_bulkdata(accept: str | None) -> Representation:
    """Negotiate Retrieve Bulkdata of an element that is not pixel data (PS3.18 10.4.1.1.5).

    Raises ``NotAcceptable`` unless ``application/octet-stream`` parts are accepted.
    """
    offer = Representation(_OCTET_STREAM, EXPLICIT_VR_LITTLE_ENDIAN, multipart=True)
    return select(accept, [offer], what="the bulkdata")


_METADATA_OFFERS = (
    Representation("application/dicom+json"),
    Representation("application/json"),
    Representation("application/dicom+xml", multipart=True),
)
_IMAGE_OFFERS = (Representation("image/jpeg"), Representation("image/png"))


def select_metadata(accept: str | None) -> Representation:
    """Negotiate Retrieve Metadata (PS3.18 10.4.1.1.2, Table 8.7.3-2).

    DICOM JSON is the default (no Accept, ``*/*``, ties); ``multipart/related;
    type="application/dicom+xml"`` (one Native DICOM Model part per instance, PS3.19)
    when the client prefers it, also when asked as plain ``application/dicom+xml``.
    Raises ``NotAcceptable`` when none of these is accepted.
    """
    return select(accept, _METADATA_OFFERS, what="the metadata")


def select_rendered(accept: str | None) -> Representation:
    """Negotiate a rendered resource (PS3.18 10.4.1.1.3): ``image/jpeg`` (default) or PNG.

    Raises ``NotAcceptable`` when neither is accepted.
    """
    return select(accept, _IMAGE_OFFERS, what="the rendered image")


def select_thumbnail(accept: str | None) -> Representation:
    """Negotiate a thumbnail (PS3.18 10.4.1.1.4): ``image/jpeg`` (default) or PNG.

    Raises ``NotAcceptable`` when neither is accepted.
    """
    return select(accept, _IMAGE_OFFERS, what="the thumbnail")
