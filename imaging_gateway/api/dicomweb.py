"""DICOMweb routes under /dicomweb: QIDO-RS search, WADO-RS retrieve, STOW-RS store (PS3.18), thin.

Every route parses the request, builds the caller's access context and calls one service:
the search service (QIDO-RS, local or federated), the retrieve service (WADO-RS: its
``locate`` asks the gate, which checks ownership, consent or break-glass, writes the
audit record and releases the instances the other calls read; ``api/streaming.py``
writes the parts) or the store service (STOW-RS, which asks the gate about every
instance). A study that may not be seen answers exactly like one that does not exist.
A retrieve that ends short of its body gets a follow-up audit record (the retrieve
service's ``ended``, told by ``api/streaming.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import orjson
from aiohttp import web

from imaging_gateway.api.consent import access_context
from imaging_gateway.api.keys import PEER_GRANT, RETRIEVE, SEARCH, STOW
from imaging_gateway.api.params import (
    parse_frame_list,
    parse_quality,
    parse_viewport,
    parse_window,
    path_uid_problem,
)
from imaging_gateway.api.streaming import OnEnd, send_instances, send_parts
from imaging_gateway.api.urls import public_authority, public_base
from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.dicom.dicomxml import dataset_to_xml, to_dicom_xml
from imaging_gateway.dicom.mediatypes import Representation, select, select_metadata
from imaging_gateway.domain.qido import Level, parse_qido
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import InvalidQuery
from imaging_gateway.security.access import (
    AccessContext,
    parse_break_glass_reason,
    parse_purpose_of_use,
)
from imaging_gateway.services.federation import as_token_patient
from imaging_gateway.services.retrieve import ReleasedInstances
from imaging_gateway.services.search import warning_header
from imaging_gateway.services.stow import StowPart

routes = web.RouteTableDef()
PREFIX = "/dicomweb"
BREAK_GLASS_HEADER = "X-Break-Glass-Reason"

_SEARCH_JSON = Representation("application/dicom+json")
_SEARCH_PLAIN_JSON = Representation("application/json")
_SEARCH_XML = Representation("application/dicom+xml", multipart=True)
_SEARCH_OFFERS = (_SEARCH_JSON, _SEARCH_PLAIN_JSON, _SEARCH_XML)

_S = "{study:[0-9.]+}"
_SE = "{series:[0-9.]+}"
_I = "{instance:[0-9.]+}"


def _ctx(request: web.Request) -> AccessContext:
    return access_context(
        request,
        purpose=parse_purpose_of_use(request.headers.get("X-Purpose-Of-Use")),
        break_glass_reason=parse_break_glass_reason(request.headers.get(BREAK_GLASS_HEADER)),
    )


def _base(request: web.Request) -> str:
    return f"{public_base(request)}{PREFIX}"


# -- QIDO-RS -------------------------------------------------------------------------


def _is_federated(request: web.Request) -> bool:
    value = request.query.get("federated")
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise InvalidQuery("federated: expected true or false")
    return value.lower() == "true"


async def _search(request: web.Request, level: Level) -> web.StreamResponse:
    federated = _is_federated(request)
    pairs = [(k, v) for k, v in request.query.items() if k != "federated"]
    if federated and request.get(PEER_GRANT) is None:
        return await _federated_search(request, level, pairs)
    ctx = _ctx(request)
    representation = select(request.headers.get("Accept"), _SEARCH_OFFERS, what="search results")
    query = parse_qido(
        level,
        pairs,
        study_uid=request.match_info.get("study"),
        series_uid=request.match_info.get("series"),
    )
    page = await request.app[SEARCH].search(ctx, query)
    headers = {"Warning": _warnings(request, page.warnings)} if page.warnings else {}
    if not page.results:
        # PS3.18 8.3.4.4.1 / 10.6.3.2: no match is 204 with no payload.
        return web.Response(status=204, headers=headers)
    include = query.requested
    if representation is _SEARCH_XML:
        parts = to_dicom_xml(level, page.rows, includefield=include, retrieve_base=_base(request))
        xml, content_type = _multipart_related(parts, "application/dicom+xml")
        return web.Response(body=xml, headers={**headers, "Content-Type": content_type})
    datasets = to_dicom_json(level, page.rows, includefield=include, retrieve_base=_base(request))
    grant = request.get(PEER_GRANT)
    if grant is not None:
        # To a peer the patient is the token it asked with; local PatientIDs stay here.
        for d in datasets:
            as_token_patient(d, grant.patient_token)
    return web.Response(
        body=orjson.dumps(datasets),  # UTF-8, as PS3.18 F.2 asks; ~10x the stdlib's speed
        content_type=representation.media_type,
        charset="utf-8",
        headers=headers,
    )


async def _federated_search(
    request: web.Request, level: Level, pairs: list[tuple[str, str]]
) -> web.StreamResponse:
    """The local search plus every peer's answer for the patient named by PatientID."""
    select(request.headers.get("Accept"), (_SEARCH_JSON, _SEARCH_PLAIN_JSON),
           what="federated search results")
    ctx = replace(_ctx(request), correlation_id=str(uuid.uuid4()))
    answer = await request.app[SEARCH].federated_search(
        ctx,
        level,
        pairs,
        study_uid=request.match_info.get("study"),
        series_uid=request.match_info.get("series"),
        retrieve_base=_base(request),
    )
    headers = {
        "X-Federation-Peers": answer.peers_header(),
        "X-Correlation-ID": ctx.correlation_id or "",
    }
    texts = answer.warnings
    if texts:
        headers["Warning"] = warning_header(texts, agent=public_authority(request)) or ""
    if not answer.datasets:
        return web.Response(status=204, headers=headers)
    return web.Response(
        body=orjson.dumps(answer.datasets),
        content_type="application/dicom+json",
        charset="utf-8",
        headers=headers,
    )


def _warnings(request: web.Request, texts: tuple[str, ...]) -> str:
    # One builder for every Warning field: texts can quote the request (parameter names).
    return warning_header(texts, agent=public_authority(request)) or ""


def _multipart_related(parts: list[bytes], media_type: str) -> tuple[bytes, str]:
    """A small multipart/related body (RFC 2387) of ``parts``, each of ``media_type``."""
    boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode())
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="{media_type}"; boundary={boundary}'


@routes.get(f"{PREFIX}/studies")
async def search_for_studies(request: web.Request) -> web.StreamResponse:
    return await _search(request, "study")


@routes.get(f"{PREFIX}/series")
async def search_for_series(request: web.Request) -> web.StreamResponse:
    return await _search(request, "series")


@routes.get(f"{PREFIX}/studies/{_S}/series")
async def search_for_study_series(request: web.Request) -> web.StreamResponse:
    return await _search(request, "series")


@routes.get(f"{PREFIX}/instances")
async def search_for_instances(request: web.Request) -> web.StreamResponse:
    return await _search(request, "instance")


@routes.get(f"{PREFIX}/studies/{_S}/instances")
async def search_for_study_instances(request: web.Request) -> web.StreamResponse:
    return await _search(request, "instance")


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances")
async def search_for_series_instances(request: web.Request) -> web.StreamResponse:
    return await _search(request, "instance")


# -- WADO-RS -------------------------------------------------------------------------


async def _locate(request: web.Request, action: str) -> ReleasedInstances:
    """The instances the path names that the caller may read, released by the gate.

    Raises ``InvalidQuery`` naming a malformed path UID, audited like any other request
    for patient data (without the UID, which no study can have).
    """
    m = request.match_info
    return await request.app[RETRIEVE].locate(
        _ctx(request),
        action=action,
        study_uid=m["study"],
        series_uid=m.get("series"),
        sop_uid=m.get("instance"),
        problem=path_uid_problem(m),
    )


def _instance_url(request: web.Request) -> Callable[[InstanceLocation], str]:
    base = _base(request)

    def url(i: InstanceLocation) -> str:
        return (
            f"{base}/studies/{i.StudyInstanceUID}/series/{i.SeriesInstanceUID}"
            f"/instances/{i.SOPInstanceUID}"
        )

    return url


def _ended(request: web.Request, released: ReleasedInstances) -> OnEnd:
    """How a started body ended, for the retrieve service (a short one is audited)."""
    retrieve = request.app[RETRIEVE]

    async def ended(outcome: str, bytes_sent: int) -> None:
        await retrieve.ended(released, outcome=outcome, bytes_sent=bytes_sent)

    return ended


async def _retrieve(request: web.Request) -> web.StreamResponse:
    released = await _locate(request, "retrieve")
    retrieval = request.app[RETRIEVE].instances(released, accept=request.headers.get("Accept"))
    return await send_instances(request, retrieval, on_end=_ended(request, released))


async def _metadata(request: web.Request) -> web.StreamResponse:
    representation = select_metadata(request.headers.get("Accept"))
    released = await _locate(request, "metadata")
    body = await request.app[RETRIEVE].metadata(released, bulkdata_base=_instance_url(request))
    if representation.multipart:
        # PS3.18 8.7.3.2: XML metadata is one application/dicom+xml part per instance.
        documents = await asyncio.to_thread(lambda: [dataset_to_xml(d) for d in body])
        xml, content_type = _multipart_related(documents, representation.media_type)
        return web.Response(body=xml, headers={"Content-Type": content_type})
    return web.Response(
        body=orjson.dumps(body),  # UTF-8, as PS3.18 F.2 asks; ~10x the stdlib's speed
        content_type=representation.media_type,
        charset="utf-8",
    )


async def _rendered(request: web.Request, *, thumbnail: bool) -> web.StreamResponse:
    q = request.query
    # Parameters first: a malformed one is refused before the study is looked up.
    frames = request.match_info.get("frames")
    frame = parse_frame_list(frames)[0] if frames else 1
    viewport = parse_viewport(q["viewport"]) if "viewport" in q else None
    quality = parse_quality(q["quality"]) if "quality" in q else None
    window = parse_window(q["window"]) if "window" in q and not thumbnail else None
    released = await _locate(request, "thumbnail" if thumbnail else "rendered")
    body, media_type = await request.app[RETRIEVE].rendered(
        released,
        thumbnail=thumbnail,
        accept=request.headers.get("Accept"),
        window=window,
        quality=quality,
        viewport=viewport,
        frame=frame,
    )
    return web.Response(body=body, content_type=media_type)


@routes.get(f"{PREFIX}/studies/{_S}")
async def retrieve_study(request: web.Request) -> web.StreamResponse:
    return await _retrieve(request)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}")
async def retrieve_series(request: web.Request) -> web.StreamResponse:
    return await _retrieve(request)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}")
async def retrieve_instance(request: web.Request) -> web.StreamResponse:
    return await _retrieve(request)


@routes.get(f"{PREFIX}/studies/{_S}/metadata")
async def retrieve_study_metadata(request: web.Request) -> web.StreamResponse:
    return await _metadata(request)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/metadata")
async def retrieve_series_metadata(request: web.Request) -> web.StreamResponse:
    return await _metadata(request)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}/metadata")
async def retrieve_instance_metadata(request: web.Request) -> web.StreamResponse:
    return await _metadata(request)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}/frames/{{frames}}")
async def retrieve_frames(request: web.Request) -> web.StreamResponse:
    numbers = parse_frame_list(request.match_info["frames"])
    released = await _locate(request, "frames")
    retrieve = request.app[RETRIEVE]
    body = await retrieve.frames(released, numbers, accept=request.headers.get("Accept"))
    return await send_parts(request, body, on_end=_ended(request, released))


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}/bulkdata/{{path:.+}}")
async def retrieve_bulkdata(request: web.Request) -> web.StreamResponse:
    released = await _locate(request, "bulkdata")
    body = await request.app[RETRIEVE].bulkdata(
        released, request.match_info["path"], accept=request.headers.get("Accept")
    )
    return await send_parts(request, body, on_end=_ended(request, released))


for _path in (
    f"{PREFIX}/studies/{_S}",
    f"{PREFIX}/studies/{_S}/series/{_SE}",
    f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}",
    f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}/frames/{{frames}}",
):

    async def _rendered_route(request: web.Request) -> web.StreamResponse:
        return await _rendered(request, thumbnail=False)

    async def _thumbnail_route(request: web.Request) -> web.StreamResponse:
        return await _rendered(request, thumbnail=True)

    routes.get(f"{_path}/rendered")(_rendered_route)
    routes.get(f"{_path}/thumbnail")(_thumbnail_route)


# -- STOW-RS -------------------------------------------------------------------------


class _Part:
    """A body part of aiohttp's multipart reader, as the store service reads one."""

    __slots__ = ("_part",)

    def __init__(self, part: aiohttp.BodyPartReader | None) -> None:
        self._part = part

    @property
    def content_type(self) -> str | None:
        return None if self._part is None else self._part.headers.get("Content-Type")

    @property
    def nested(self) -> bool:
        return self._part is None

    async def read_chunk(self, size: int) -> bytes:
        assert self._part is not None  # a nested part is never read
        return await self._part.read_chunk(size)


async def _parts(request: web.Request) -> AsyncIterator[StowPart]:
    """The request body's parts, read as the store service asks for them.

    The reader is built on the first ask, after the service has checked the request's
    Content-Type. A nested multipart is released unread and handed over as such.
    """
    reader = aiohttp.MultipartReader(request.headers, request.content)
    while (part := await reader.next()) is not None:
        if isinstance(part, aiohttp.BodyPartReader):
            yield _Part(part)
        else:
            with contextlib.suppress(Exception):
                await part.release()
            yield _Part(None)


async def _store(request: web.Request) -> web.StreamResponse:
    answer = await request.app[STOW].store(
        _ctx(request),
        _parts(request),
        content_type=request.headers.get("Content-Type"),
        accept=request.headers.get("Accept"),
        study_uid=request.match_info.get("study"),
        retrieve_base=_base(request),
    )
    return web.Response(
        status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type}
    )


@routes.post(f"{PREFIX}/studies")
async def store_instances(request: web.Request) -> web.StreamResponse:
    """Store instances (STOW-RS): multipart/related; type="application/dicom" (hospital)."""
    return await _store(request)


@routes.post(f"{PREFIX}/studies/{_S}")
async def store_study_instances(request: web.Request) -> web.StreamResponse:
    """Store instances of one study (STOW-RS); an instance of another study fails (A901)."""
    return await _store(request)
