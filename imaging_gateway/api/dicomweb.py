"""DICOMweb routes under /dicomweb: QIDO-RS search, WADO-RS retrieve, STOW-RS store (PS3.18), thin.

Every route resolves the caller, asks the gate (which checks ownership, consent or
break-glass and writes the audit record), then hands the allowed instances to the
WADO-RS retrieve service (``services/retrieve.py``), whose parts ``api/streaming.py``
writes, or renders the QIDO-RS page. A study that may not be seen answers
exactly like one that does not exist. STOW-RS hands the request to the store service,
which asks the gate about every instance.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace

import orjson
from aiohttp import web

from imaging_gateway.api.consent import access_context
from imaging_gateway.api.keys import (
    CONSENTS,
    FEDERATION,
    GATE,
    INDEX,
    PEER_GRANT,
    SETTINGS,
    STORES,
)
from imaging_gateway.api.params import (
    parse_frame_list,
    parse_quality,
    parse_viewport,
    parse_window,
    path_uid_problem,
)
from imaging_gateway.api.streaming import send_instances, send_parts
from imaging_gateway.api.urls import public_authority, public_base
from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.dicom.dicomxml import dataset_to_xml, to_dicom_xml
from imaging_gateway.dicom.mediatypes import Representation, select, select_metadata
from imaging_gateway.domain.qido import Level, parse_qido
from imaging_gateway.domain.records import InstanceLocation
from imaging_gateway.errors import InvalidQuery
from imaging_gateway.federation.fanout import warning_header
from imaging_gateway.security.gate import (
    AccessContext,
    parse_break_glass_reason,
    parse_purpose_of_use,
)
from imaging_gateway.services import retrieve, stow
from imaging_gateway.services.federation import as_token_patient, federated_search
from imaging_gateway.storage.base import ObjectStore

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
    gate = request.app[GATE]
    page = await gate.search(
        ctx, query, max_results=request.app[SETTINGS].security.search_max_results
    )
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
    app = request.app
    study_uid = request.match_info.get("study")
    series_uid = request.match_info.get("series")
    query = parse_qido(level, pairs, study_uid=study_uid, series_uid=series_uid)
    max_results = app[SETTINGS].security.search_max_results
    limit = min(query.limit or max_results, max_results)
    offset = query.offset
    # Every source is asked for its first offset + limit matches; the merge pages.
    local_pairs = [(k, v) for k, v in pairs if k not in ("limit", "offset")]
    local_pairs.append(("limit", str(min(offset + limit, max_results))))
    local_query = parse_qido(level, local_pairs, study_uid=study_uid, series_uid=series_uid)
    ctx = replace(_ctx(request), correlation_id=str(uuid.uuid4()))
    page = await app[GATE].search(ctx, local_query, max_results=max_results)
    local = to_dicom_json(
        level, page.rows, includefield=query.requested, retrieve_base=_base(request)
    )
    answer = await federated_search(
        federation=app.get(FEDERATION),
        gate=app[GATE],
        consents=app[CONSENTS],
        ctx=ctx,
        level=level,
        query=query,
        pairs=pairs,
        local=local,
        limit=limit,
        offset=offset,
        study_uid=study_uid,
        series_uid=series_uid,
        retrieve_base=_base(request),
    )
    headers = {
        "X-Federation-Peers": answer.peers_header(),
        "X-Correlation-ID": ctx.correlation_id or "",
    }
    texts = (*page.warnings, *answer.warnings)
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


def _transcode_max_bytes(request: web.Request) -> int:
    return request.app[SETTINGS].gateway.transcode_max_bytes


def _inflate_max_bytes(request: web.Request) -> int:
    return request.app[SETTINGS].gateway.inflate_max_bytes


def _stores(request: web.Request) -> dict[str, ObjectStore]:
    stores: dict[str, ObjectStore] = request.app[STORES]
    return stores


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


async def _locate(request: web.Request, action: str) -> list[InstanceLocation]:
    """The instances the path names that the caller may read (``Gate.locate``).

    Raises ``InvalidQuery`` naming a malformed path UID, audited like any other request
    for patient data (without the UID, which no study can have).
    """
    m = request.match_info
    ctx = _ctx(request)
    problem = path_uid_problem(request.match_info)
    if problem is not None:
        await request.app[GATE].refused_input(ctx, action=action, reason=problem)
        raise InvalidQuery(problem)
    return await request.app[GATE].locate(
        ctx,
        action=action,
        study_uid=m["study"],
        series_uid=m.get("series"),
        sop_uid=m.get("instance"),
    )


def _instance_url(request: web.Request) -> Callable[[InstanceLocation], str]:
    base = _base(request)

    def url(i: InstanceLocation) -> str:
        return (
            f"{base}/studies/{i.StudyInstanceUID}/series/{i.SeriesInstanceUID}"
            f"/instances/{i.SOPInstanceUID}"
        )

    return url


async def _retrieve(request: web.Request) -> web.StreamResponse:
    instances = await _locate(request, "retrieve")
    retrieval = retrieve.retrieve_instances(
        instances,
        _stores(request),
        accept=request.headers.get("Accept"),
        transcode_max_bytes=_transcode_max_bytes(request),
        inflate_max_bytes=_inflate_max_bytes(request),
    )
    return await send_instances(request, retrieval)


async def _metadata(request: web.Request) -> web.StreamResponse:
    representation = select_metadata(request.headers.get("Accept"))
    instances = await _locate(request, "metadata")
    body = await retrieve.retrieve_metadata(
        instances,
        _stores(request),
        bulkdata_base=_instance_url(request),
        inflate_max_bytes=_inflate_max_bytes(request),
    )
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
    accept = request.headers.get("Accept")
    # Parameters first: a malformed one is refused before the study is looked up.
    frames = request.match_info.get("frames")
    frame = parse_frame_list(frames)[0] if frames else 1
    viewport = parse_viewport(q["viewport"]) if "viewport" in q else None
    quality = parse_quality(q["quality"]) if "quality" in q else None
    window = parse_window(q["window"]) if "window" in q and not thumbnail else None
    instances = await _locate(request, "thumbnail" if thumbnail else "rendered")
    if thumbnail or len(instances) > 1:
        instance = retrieve.representative_instance(instances)
    else:
        instance = instances[0]
    stores = _stores(request)
    if thumbnail:
        body, media_type = await retrieve.retrieve_thumbnail(
            instance,
            stores,
            accept=accept,
            viewport=viewport,
            quality=quality,
            frame=frame,
            inflate_max_bytes=_inflate_max_bytes(request),
        )
    else:
        body, media_type = await retrieve.retrieve_rendered(
            instance,
            stores,
            accept=accept,
            window=window,
            quality=quality,
            viewport=viewport,
            frame=frame,
            inflate_max_bytes=_inflate_max_bytes(request),
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
    instances = await _locate(request, "frames")
    body = await retrieve.retrieve_frames(
        instances[0],
        _stores(request),
        numbers,
        accept=request.headers.get("Accept"),
        transcode_max_bytes=_transcode_max_bytes(request),
        inflate_max_bytes=_inflate_max_bytes(request),
    )
    return await send_parts(request, body)


@routes.get(f"{PREFIX}/studies/{_S}/series/{_SE}/instances/{_I}/bulkdata/{{path:.+}}")
async def retrieve_bulkdata(request: web.Request) -> web.StreamResponse:
    instances = await _locate(request, "bulkdata")
    body = await retrieve.retrieve_bulkdata(
        instances[0],
        _stores(request),
        request.match_info["path"],
        accept=request.headers.get("Accept"),
        transcode_max_bytes=_transcode_max_bytes(request),
        inflate_max_bytes=_inflate_max_bytes(request),
    )
    return await send_parts(request, body)


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


async def _store(request: web.Request) -> web.StreamResponse:
    app = request.app
    return await stow.store_instances(
        request,
        ctx=_ctx(request),
        gate=app[GATE],
        index=app[INDEX],
        stores=_stores(request),
        settings=app[SETTINGS],
        study_uid=request.match_info.get("study"),
        retrieve_base=_base(request),
    )


@routes.post(f"{PREFIX}/studies")
async def store_instances(request: web.Request) -> web.StreamResponse:
    """Store instances (STOW-RS): multipart/related; type="application/dicom" (hospital)."""
    return await _store(request)


@routes.post(f"{PREFIX}/studies/{_S}")
async def store_study_instances(request: web.Request) -> web.StreamResponse:
    """Store instances of one study (STOW-RS); an instance of another study fails (A901)."""
    return await _store(request)
