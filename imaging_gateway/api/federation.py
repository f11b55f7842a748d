"""Federation routes and peer authentication: the responding and the retrieving side, thin.

Responding (IHE XCA-I responding imaging gateway): a peer calls the same ``/dicomweb``
routes a hospital does, over mTLS, with a signed assertion in ``X-Federation-Assertion``
instead of a bearer token. :func:`authenticate_peer` verifies it (registered issuer key,
audience, window, replay, request binding, client certificate) and makes the caller a
``peer`` principal whose visibility the gate limits to the asserted patient and consent
scope; refusals are 401/403 and audited with the assertion's correlation id.

Retrieving: ``/dicomweb/federation/{province}/studies/{uid}[/...]`` streams a study held
by another province through this gateway, chunk by chunk (memory flat), from the URL the
registry builds; ``Range``, ``If-Range`` and ``If-None-Match`` are passed through, so a
client resumes a broken-off retrieve from the holding province's body (206) or learns
that it has not changed (304).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Final

import aiohttp
import jwt
from aiohttp import web

from imaging_gateway.api.consent import access_context
from imaging_gateway.api.keys import (
    CLIENT_CERTIFICATE,
    CONSENTS,
    FEDERATION,
    GATE,
    PEER_GRANT,
    PRINCIPAL,
    SETTINGS,
)
from imaging_gateway.api.params import path_uid_problem
from imaging_gateway.api.urls import public_base
from imaging_gateway.errors import (
    ClientCertificateRequired,
    Forbidden,
    GatewayError,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    PeerUnavailable,
    Unauthenticated,
)
from imaging_gateway.federation.assertions import verify_assertion
from imaging_gateway.federation.cache import CachedAnswer, Fill, RetrieveCache
from imaging_gateway.federation.client import ASSERTION_HEADER, FederatedCaller, load_peer_json
from imaging_gateway.federation.fanout import PeerAnswerError
from imaging_gateway.security.gate import PeerGrant, parse_purpose_of_use
from imaging_gateway.security.principals import Principal
from imaging_gateway.services.federation import Federation
from imaging_gateway.storage.base import close_stream

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

_CONDITIONS: Final = ("Range", "If-Range", "If-None-Match")
"""A client's own conditions on a retrieve, passed to the peer as they are."""
_PASS_REQUEST: Final = ("Accept", *_CONDITIONS)
_PASS_RESPONSE: Final = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
)
_PASS_STATUS: Final = frozenset({200, 206, 304, 416})
_CHUNK: Final = 64 * 1024


def _unverified(token: str) -> tuple[str, str | None]:
    """(issuer, correlation id) as the token claims them, for the refusal's audit record."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return "unknown", None
    iss = claims.get("iss")
    cid = claims.get("correlation_id")
    issuer = iss if isinstance(iss, str) and iss.isdigit() and len(iss) == 6 else "unknown"
    try:
        correlation = str(uuid.UUID(cid)) if isinstance(cid, str) else None
    except ValueError:
        correlation = None
    return issuer, correlation


async def authenticate_peer(request: web.Request, token: str) -> None:
    """Make the caller a ``peer`` principal from its assertion; refusals audited.

    Raises ``Forbidden`` when federation is off, ``ClientCertificateRequired`` without a
    verified client certificate (except on plain HTTP with ``allow_plain_http``),
    ``Unauthenticated`` for a forged, expired, replayed or misbound assertion or a
    certificate that is not the asserting peer's, ``Forbidden`` for an expired grant.
    """
    app = request.app
    federation = app.get(FEDERATION)
    issuer, correlation = _unverified(token)
    try:
        if federation is None:
            raise Forbidden("federation is not enabled on this gateway")
        cert = request.get(CLIENT_CERTIFICATE)
        if cert is None and (request.secure or not federation.settings.allow_plain_http):
            raise ClientCertificateRequired("a peer must present its client certificate")
        assertion = await verify_assertion(
            token,
            registry=federation.registry,
            expected_audience=app[SETTINGS].gateway.province,
            method=request.method,
            path=request.rel_url.raw_path,
            query=list(request.query.items()),
            replay_cache=federation.replay_cache,
        )
        expected = next(
            (p.certificate_subject for p in federation.settings.peers
             if p.province == assertion.issuer),
            None,
        )
        if expected is not None and (cert is None or cert.subject != expected):
            raise Unauthenticated("the client certificate is not the asserting peer's")
    except (Unauthenticated, Forbidden) as exc:
        await app[GATE].refused_token(
            source=request.remote,
            reason=exc.message,
            role="peer",
            subject=f"imaging-gateway:{issuer}",
            action="federation",
            note=None if correlation is None else f"correlation={correlation}",
        )
        raise
    request[PRINCIPAL] = Principal(
        subject=assertion.subject,
        role="peer",
        province=assertion.issuer,
        token_id=assertion.jti,
    )
    request[PEER_GRANT] = PeerGrant(
        patient_token=assertion.patient_token,
        scope=assertion.consent.scope if assertion.consent is not None else (),
        hospital=assertion.hospital,
        clinician=assertion.clinician,
        break_glass_reason=assertion.break_glass_reason,
        purpose=assertion.purpose,
        correlation_id=assertion.correlation_id,
    )


def peer_assertion(request: web.Request) -> str | None:
    """The assertion header of a peer's request, or None for any other caller."""
    return request.headers.get(ASSERTION_HEADER)


_UID = "{study:[0-9.]+}"


@routes.get(f"/dicomweb/federation/{{province:[0-9]{{6}}}}/studies/{_UID}")
@routes.get(f"/dicomweb/federation/{{province:[0-9]{{6}}}}/studies/{_UID}/{{tail:.+}}")
async def retrieve_federated(request: web.Request) -> web.StreamResponse:
    """WADO-RS of a study another province holds, streamed through this gateway.

    Needs a federated search for the study by the same hospital first (its RetrieveURL
    points here); the consent grant it rested on is checked again now. Raises
    ``NotFound`` (unknown province, never-searched study), ``Forbidden`` (grant revoked
    or expired; audited), ``PeerUnavailable`` when the peer cannot be reached.
    """
    purpose = parse_purpose_of_use(request.headers.get("X-Purpose-Of-Use"))
    ctx = access_context(request, purpose=purpose)
    ctx.principal.require("hospital")
    federation = request.app.get(FEDERATION)
    province = request.match_info["province"]
    study = request.match_info["study"]
    problem = path_uid_problem(request.match_info)
    if problem is not None:
        await request.app[GATE].refused_input(ctx, action="federated-retrieve", reason=problem)
        raise InvalidQuery(problem)
    if federation is None or province not in federation.registry:
        raise NotFound("no such study, series or instance")
    assert ctx.principal.hospital is not None
    found = await federation.located.get(ctx.principal.hospital, province, study, now=ctx.now)
    gate = request.app[GATE]
    correlation = str(uuid.uuid4())
    ctx = access_context(request, purpose=purpose, correlation_id=correlation)
    token = found.patient_token if found is not None else None
    if found is None:
        await gate.audit.record(
            [ctx.event("federated-retrieve", "not-found", StudyInstanceUID=study,
                       detail=f"province={province}")],
            at=ctx.now,
        )
        raise NotFound("no such study, series or instance (search with federated=true first)")
    if found.consent is not None:
        try:
            grant = await request.app[CONSENTS].get(found.consent.id)
        except NotFound:
            grant = None
        if grant is None or not grant.active(ctx.now):
            await gate.audit.record(
                [ctx.event("federated-retrieve", "denied", patient_token=token,
                           StudyInstanceUID=study, detail="consent no longer active")],
                at=ctx.now,
            )
            raise Forbidden("the consent grant for this patient is no longer active")
    await gate.audit.record(
        [ctx.event("federated-retrieve", "ok", patient_token=token, StudyInstanceUID=study,
                   detail=f"province={province}")],
        at=ctx.now,
    )
    tail = request.match_info.get("tail")
    path = f"studies/{study}" + (f"/{tail}" if tail else "")
    peer = federation.registry.get(province)
    caller = FederatedCaller(
        hospital=found.hospital,
        clinician=found.clinician,
        purpose=found.purpose,
        patient_token=found.patient_token,
        correlation_id=correlation,
        consent=found.consent,
        break_glass_reason=found.break_glass_reason,
    )
    headers = {h: request.headers[h] for h in _PASS_REQUEST if h in request.headers}
    query = list(request.query.items())

    def ask(extra: dict[str, str]) -> Any:
        return federation.client.retrieve(
            peer, path, query, caller if peer.kind == "gateway" else None,
            headers={**headers, **extra},
        )  # fmt: skip

    if tail is not None and tail.endswith("metadata"):
        home = f"{public_base(request)}/dicomweb/federation"
        return await _metadata(ask({}), federation, province, home)
    cache = federation.cache
    if cache is None or any(h in request.headers for h in _CONDITIONS):
        return await _stream(request, ask({}))  # a client's own conditions: pass them on
    key = cache.key(province, path, query, request.headers.get("Accept"))
    cached = await cache.lookup(key)
    if cached is not None:
        try:
            # The holding province decides again; 304 only if it would send these bytes.
            return await _stream(request, ask({"If-None-Match": cached.etag}),
                                 cache=(cache, key, cached))  # fmt: skip
        except _CachedCopyUnreadable:
            await cache.drop(key)
    return await _stream(request, ask({}), cache=(cache, key, None))


class _CachedCopyUnreadable(Exception):
    """The peer answered 304 but the cached copy failed before its first byte."""


async def _metadata(
    pending: Any, federation: Federation, province: str, home: str
) -> web.Response:
    """A peer's metadata answer with its BulkDataURIs pointed at this gateway's proxy.

    Read whole (bounded by ``federation.max_answer_bytes``): the URIs must be rewritten.
    A URI outside the peer's registered base is dropped, never followed. Raises
    ``NotFound`` / ``PeerUnavailable`` as a retrieve does.
    """
    limit = federation.settings.max_answer_bytes
    try:
        async with pending as upstream:
            if upstream.status == 404:
                raise NotFound("no such study, series or instance")
            if upstream.status != 200:
                raise PeerUnavailable(f"the holding province answered HTTP {upstream.status}")
            body = bytearray()
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise PeerUnavailable("the holding province's metadata is over the cap")
            content_type = upstream.content_type
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PeerUnavailable(
            f"the holding province cannot be reached ({type(exc).__name__})"
        ) from None
    try:
        # Bounded nesting: what is parsed is walked below and encoded again.
        data = load_peer_json(bytes(body))
    except PeerAnswerError as exc:
        reason = exc.message.removeprefix("answer is ")
        raise PeerUnavailable(f"the holding province answered metadata that is {reason}") from None
    registry = federation.registry
    pending = [data]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            uri = node.get("BulkDataURI")
            if isinstance(uri, str):
                mapped = registry.map_retrieve_url(province, uri)
                if mapped is None:
                    del node["BulkDataURI"]
                else:
                    node["BulkDataURI"] = f"{home}/{mapped[0]}/{mapped[1]}"
            pending.extend(node.values())
    return web.Response(
        text=json.dumps(data, ensure_ascii=False), content_type=content_type, charset="utf-8"
    )


async def _stream(
    request: web.Request,
    pending: Any,
    *,
    cache: tuple[RetrieveCache, str, CachedAnswer | None] | None = None,
) -> web.StreamResponse:
    """Copy the peer's answer to the client chunk by chunk; raises ``PeerUnavailable``.

    With ``cache`` (the cache, the entry's key, the entry asked about with
    If-None-Match): a 304 serves the entry, and a whole 200 with an ETag and a length is
    kept as the new entry while it is copied.
    """
    out: web.StreamResponse | None = None
    fill: Fill | None = None
    try:
        async with pending as upstream:
            if upstream.status == 304 and cache is not None and cache[2] is not None:
                return await _from_cache(request, cache[0], cache[2])
            if upstream.status not in _PASS_STATUS:
                if upstream.status == 404:
                    raise NotFound("no such study, series or instance")
                if upstream.status == 406:
                    raise NotAcceptable("the holding province cannot send that representation")
                raise PeerUnavailable(f"the holding province answered HTTP {upstream.status}")
            out = web.StreamResponse(
                status=upstream.status,
                headers={h: upstream.headers[h] for h in _PASS_RESPONSE if h in upstream.headers},
            )
            etag, length = upstream.headers.get("ETag"), upstream.content_length
            if cache is not None and upstream.status == 200 and etag and length is not None:
                fill = cache[0].fill(cache[1], etag=etag, length=length,
                                     content_type=upstream.headers.get("Content-Type", ""))
            await out.prepare(request)
            # Whatever has arrived, as it arrives (bounded by the socket reader's buffer):
            # fewer, larger writes than fixed-size chunks, memory still flat.
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
                if fill is not None:
                    await fill.put(chunk)
            await out.write_eof()
            if fill is not None:
                await fill.finish()
                fill = None
            return out
    except (aiohttp.ClientError, TimeoutError) as exc:
        if out is not None:
            # Headers are gone: the client sees a truncated body (Content-Length tells).
            log.warning("federated retrieve broke off: %s", type(exc).__name__)
            return out
        raise PeerUnavailable(
            f"the holding province cannot be reached ({type(exc).__name__})"
        ) from None
    finally:
        if fill is not None:  # the copy broke off: no entry
            await fill.abort()


async def _from_cache(
    request: web.Request, cache: RetrieveCache, cached: CachedAnswer
) -> web.StreamResponse:
    """Serve a cached answer the holding province has just confirmed (304).

    Raises ``_CachedCopyUnreadable`` when the entry fails before its first byte (then
    the caller asks the peer for the answer itself); a failure later cuts the
    connection, as any broken stream does.
    """
    body = cache.body(cached)
    try:
        try:
            first = await anext(body, b"")
        except GatewayError as exc:
            log.warning("federation cache: entry unreadable: %s", type(exc).__name__)
            raise _CachedCopyUnreadable from None
        out = web.StreamResponse(headers={"Content-Type": cached.content_type,
                                          "ETag": cached.etag})  # fmt: skip
        out.content_length = cached.length
        await out.prepare(request)
        try:
            await out.write(first)
            async for chunk in body:
                await out.write(chunk)
            await out.write_eof()
        except ConnectionError:
            pass  # the client went away
        except GatewayError as exc:
            log.warning("federation cache: entry broke off: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
        return out
    finally:
        await close_stream(body)
