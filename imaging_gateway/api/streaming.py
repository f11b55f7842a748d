"""Writing retrieve bodies to the client: multipart/related responses, byte ranges, the relay.

The retrieve service (``services/retrieve.py``) hands over parts; this module frames
them (``dicom/multipart.py``) and writes them to the aiohttp response, splicing store
bodies (``OpenBody``) straight into the client's socket when it can
(``storage.zerocopy``). A cut body reads as cut: before the response starts an error
propagates (the middleware answers it as JSON); after that the connection is aborted
(no closing boundary, and fewer bytes than the Content-Length or no final chunk) and
the abort is logged without keys, UIDs or patient data. Every streamed response carries
:data:`STREAM_OUTCOME` (for audit).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Final

from aiohttp import web

from imaging_gateway.api.ranges import (
    boundary_of,
    etag_matches,
    representation_etag,
    wanted_range,
)
from imaging_gateway.dicom.multipart import closing, multipart_length, part_head
from imaging_gateway.errors import GatewayError, IntegrityError, NotFound
from imaging_gateway.services.retrieve import InstanceRetrieval, Multipart, Part
from imaging_gateway.storage.zerocopy import (
    OpenBody,
    Relay,
    RelayTargetGone,
    relay_fd,
)

__all__ = [
    "STREAM_BYTES",
    "STREAM_OUTCOME",
    "OnEnd",
    "send_instances",
    "send_multipart",
    "send_parts",
    "send_range",
]

log = logging.getLogger(__name__)

STREAM_OUTCOME: Final = web.ResponseKey("stream_outcome", str)
"""Set on every streamed response: ``complete``, ``aborted`` or ``client-gone`` (for audit)."""
STREAM_BYTES: Final = web.ResponseKey("stream_bytes", int)
"""Set with :data:`STREAM_OUTCOME`: the body bytes handed to the connection (for audit)."""

OnEnd = Callable[[str, int], Awaitable[None]]
"""Told how a started body ended (:data:`STREAM_OUTCOME`, :data:`STREAM_BYTES`): the
follow-up audit of a retrieve. Called also when the server cancels the handler (outcome
``client-gone`` when the connection is closed, else ``cancelled``), before the
cancellation goes on."""


def _cancelled_outcome(request: web.Request) -> str:
    # aiohttp cancels the handler of a connection the client closed when the server runs
    # with handler_cancellation (its test server does): that is the client going away.
    transport = request.transport
    return "client-gone" if transport is None or transport.is_closing() else "cancelled"


class _ClientGone(Exception):
    """Writing to the client failed: it closed the connection."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError as exc:
        raise _ClientGone from exc


def _abort(request: web.Request) -> None:
    """Cut the connection: the body ends short of its Content-Length or its last chunk."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _multipart_response(
    content_type: str,
    boundary: str,
    layout: Sequence[tuple[str, int]] | None,
    headers: Mapping[str, str] | None,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={**(headers or {}), "Content-Type": f"{content_type}; boundary={boundary}"}
    )
    if layout is not None:
        # Known length: aiohttp writes the chunks as they are, where its chunked
        # writer joins each one with its size line (a copy of every byte).
        response.content_length = multipart_length(boundary, layout)
    else:
        response.enable_chunked_encoding()
    return response


async def send_multipart(
    request: web.Request,
    content_type: str,
    parts: AsyncGenerator[Part, None],
    *,
    layout: Sequence[tuple[str, int]] | None = None,
    boundary: str | None = None,
    headers: Mapping[str, str] | None = None,
    on_end: OnEnd | None = None,
) -> web.StreamResponse:
    """Stream ``parts`` as one ``multipart/related`` response.

    With ``layout`` (each part's content type and length, known in advance) the body is
    sent with its ``Content-Length``; otherwise chunked. ``boundary`` defaults to a
    random one; ``headers`` are added to the response's. Either way a cut body reads as
    cut: fewer bytes than Content-Length, or no last chunk. The first part's first
    chunk is read before anything is sent, so an error there propagates (the
    middleware answers it). After that, an error aborts the connection; a client that
    goes away ends the stream quietly. Either way the response is returned with
    :data:`STREAM_OUTCOME` set, and ``on_end`` is told once the body has started.
    """
    boundary = boundary or secrets.token_hex(16)
    if request.method == "HEAD" and layout is not None:
        # The index gives every header: nothing of the study is opened or read.
        await parts.aclose()
        response = _multipart_response(content_type, boundary, layout, headers)
        await response.prepare(request)
        await response.write_eof()
        response[STREAM_OUTCOME] = "complete"
        response[STREAM_BYTES] = 0
        return response
    try:
        part = await anext(parts, None)
        if part is None:
            raise NotFound("nothing to retrieve")
        pending: bytes | OpenBody | None = await anext(part.body, None)
        response = _multipart_response(content_type, boundary, layout, headers)
        response[STREAM_OUTCOME] = "aborted"
        response[STREAM_BYTES] = 0
        await response.prepare(request)
        if request.method == "HEAD":  # transcoded: the first part was needed for the headers
            await response.write_eof()
            response[STREAM_OUTCOME] = "complete"
            return response
        index = 0
        total = 0
        written = 0
        relay: Relay | None = None
        cancelled: asyncio.CancelledError | None = None

        async def emit(item: bytes | OpenBody) -> int:
            nonlocal relay
            if not isinstance(item, OpenBody):
                await _write(response, item)
                return len(item)
            if relay is None:
                fd = relay_fd(request.transport)
                if fd is None or request.transport is None:
                    raise _ClientGone
                relay = Relay(request.transport, fd)
            try:
                return await relay.relay(item)
            except RelayTargetGone as exc:
                raise _ClientGone from exc

        try:
            while part is not None:
                try:
                    head = part_head(boundary, part.content_type, part.length, first=index == 0)
                    written = 0
                    await _write(response, head)
                    total += len(head)
                    if pending is not None:
                        written += await emit(pending)
                    async for chunk in part.body:
                        written += await emit(chunk)
                finally:
                    await part.body.aclose()
                if part.length is not None and written != part.length:
                    raise IntegrityError(f"part {index + 1} is not the length it announced")
                total += written
                written = 0
                index += 1
                part = await anext(parts, None)
                pending = None
            end = closing(boundary)
            if response.content_length not in (None, total + len(end)):
                raise IntegrityError("the body is not the length it announced")
            await _write(response, end)
            total += len(end)
            try:
                await response.write_eof()
            except ConnectionError as exc:
                raise _ClientGone from exc
        except _ClientGone:
            response[STREAM_OUTCOME] = "client-gone"
            log.info("wado: client closed the connection during part %d", index + 1)
        except asyncio.CancelledError as exc:
            response[STREAM_OUTCOME] = _cancelled_outcome(request)
            cancelled = exc
        except Exception as exc:
            detail = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            log.warning("wado: response aborted during part %d: %s", index + 1, detail)
            # Release the reads first: nothing may suspend between the abort and the
            # return, or a server that cancels handlers on disconnect cancels this one.
            await parts.aclose()
            _abort(request)
        else:
            response[STREAM_OUTCOME] = "complete"
        finally:
            response[STREAM_BYTES] = total + written
            if relay is not None:
                relay.close()
        if on_end is not None:
            await on_end(response[STREAM_OUTCOME], response[STREAM_BYTES])
        if cancelled is not None:
            raise cancelled
        return response
    finally:
        await parts.aclose()


async def send_parts(
    request: web.Request, body: Multipart, *, on_end: OnEnd | None = None
) -> web.StreamResponse:
    """Stream a service's :class:`Multipart` (frames, bulk data) as one chunked response."""
    return await send_multipart(request, body.content_type, body.parts, on_end=on_end)


async def send_instances(
    request: web.Request, retrieval: InstanceRetrieval, *, on_end: OnEnd | None = None
) -> web.StreamResponse:
    """Send a Retrieve Study / Series / Instance: whole, 304, 206 or 416.

    An as-stored body (``retrieval.layout`` known) has its ``Content-Length``, a strong
    ``ETag`` and ``Accept-Ranges: bytes``: ``If-None-Match`` naming it gets 304, one
    ``bytes`` range (``If-Range`` naming it, when given) gets 206 with only the objects
    the range covers read, a range past the end 416. Its parts are relayed
    (``storage.zerocopy``) when the client's connection can splice. A transcoded body is
    sent whole, chunked. The response has :data:`STREAM_OUTCOME` set; ``on_end`` is told
    how a body that started ended.
    """
    content_type = retrieval.content_type
    layout = retrieval.layout
    if layout is None:  # transcoded: part lengths are known only once each is transcoded
        return await send_multipart(
            request, content_type, retrieval.parts(relay=False), on_end=on_end
        )
    relay = relay_fd(request.transport) is not None
    etag = representation_etag(content_type, retrieval.instances)
    boundary = boundary_of(etag)
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    total = multipart_length(boundary, layout)
    if etag_matches(request.headers.get("If-None-Match"), etag):
        return _sent_whole(web.Response(status=304, headers=headers))
    wanted = wanted_range(request, etag, total)
    if wanted is None:
        return await send_multipart(
            request, content_type, retrieval.parts(relay=relay),
            layout=layout, boundary=boundary, headers=headers, on_end=on_end,
        )  # fmt: skip
    if wanted == "unsatisfiable":
        return _sent_whole(
            web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{total}"})
        )
    start, stop = wanted
    return await send_range(
        request, f"{content_type}; boundary={boundary}",
        retrieval.byte_range(boundary, start, stop), start, stop, total, headers,
        on_end=on_end,
    )  # fmt: skip


def _sent_whole(response: web.Response) -> web.Response:
    response[STREAM_OUTCOME] = "complete"  # nothing more to send than its headers
    response[STREAM_BYTES] = 0
    return response


async def send_range(
    request: web.Request,
    content_type: str,
    chunks: AsyncGenerator[bytes, None],
    start: int,
    stop: int,
    total: int,
    headers: Mapping[str, str],
    *,
    on_end: OnEnd | None = None,
) -> web.StreamResponse:
    """206 with ``chunks``, the bytes ``[start, stop)`` of a body of ``total`` bytes.

    Errors before the first byte propagate; later ones abort the connection, as for a
    whole body (:data:`STREAM_OUTCOME` tells which).
    """
    try:
        first = await anext(chunks, b"")
        response = web.StreamResponse(status=206, headers={
            **headers, "Content-Type": content_type,
            "Content-Range": f"bytes {start}-{stop - 1}/{total}",
        })  # fmt: skip
        response.content_length = stop - start
        response[STREAM_OUTCOME] = "aborted"
        sent = 0
        cancelled: asyncio.CancelledError | None = None
        await response.prepare(request)
        try:
            await _write(response, first)
            sent += len(first)
            async for chunk in chunks:
                await _write(response, chunk)
                sent += len(chunk)
            await response.write_eof()
        except (_ClientGone, ConnectionError):
            response[STREAM_OUTCOME] = "client-gone"
        except asyncio.CancelledError as exc:
            response[STREAM_OUTCOME] = _cancelled_outcome(request)
            cancelled = exc
        except Exception as exc:
            detail = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            log.warning("wado: ranged response aborted: %s", detail)
            await chunks.aclose()
            _abort(request)
        else:
            response[STREAM_OUTCOME] = "complete"
        response[STREAM_BYTES] = sent
        if on_end is not None:
            await on_end(response[STREAM_OUTCOME], sent)
        if cancelled is not None:
            raise cancelled
        return response
    finally:
        await chunks.aclose()
