"""Federation routes and peer authentication: the responding and the retrieving side, thin.

Responding (IHE XCA-I responding imaging gateway): a peer calls the same ``/dicomweb``
routes a hospital does, over mTLS, with a signed assertion in ``X-Federation-Assertion``
instead of a bearer token. :func:`authenticate_peer` hands it to the federation service,
which verifies it (registered issuer key, audience, window, replay, request binding,
client certificate) and makes the caller a ``peer`` principal whose visibility the gate
limits to the asserted patient and consent scope; refusals are 401/403 and audited with
the assertion's correlation id.

Retrieving: ``/dicomweb/federation/{province}/studies/{uid}[/...]`` streams a study held
by another province through this gateway, chunk by chunk (memory flat): the federation
service asks the gate to release it (a federated search by the same hospital first, its
grant checked again) and relays the holding province's answer (or the retrieve cache's);
``Range``, ``If-Range`` and ``If-None-Match`` are passed through, so a client resumes a
broken-off retrieve from the holding province's body (206) or learns that it has not
changed (304).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from imaging_gateway.api.consent import access_context
from imaging_gateway.api.keys import (
    CLIENT_CERTIFICATE,
    FEDERATION,
    PEER_GRANT,
    PRINCIPAL,
)
from imaging_gateway.api.params import path_uid_problem
from imaging_gateway.api.urls import public_base
from imaging_gateway.errors import GatewayError
from imaging_gateway.security.access import parse_purpose_of_use
from imaging_gateway.services.federation import ASSERTION_HEADER, PASS_REQUEST, RelayBroken

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


async def authenticate_peer(request: web.Request, token: str) -> None:
    """Make the caller a ``peer`` principal from its assertion; refusals audited.

    Raises what ``FederationService.authenticate_peer`` raises (``Forbidden``,
    ``ClientCertificateRequired``, ``Unauthenticated``).
    """
    cert = request.get(CLIENT_CERTIFICATE)
    principal, grant = await request.app[FEDERATION].authenticate_peer(
        token,
        method=request.method,
        path=request.rel_url.raw_path,
        query=list(request.query.items()),
        certificate_subject=None if cert is None else cert.subject,
        has_certificate=cert is not None,
        secure=request.secure,
        source=request.remote,
    )
    request[PRINCIPAL] = principal
    request[PEER_GRANT] = grant


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
    federation = request.app[FEDERATION]
    released = await federation.release(
        access_context(request, purpose=purpose),
        province=request.match_info["province"],
        study_uid=request.match_info["study"],
        problem=path_uid_problem(request.match_info),
    )
    tail = request.match_info.get("tail")
    headers = {h: request.headers[h] for h in PASS_REQUEST if h in request.headers}
    query = list(request.query.items())
    if tail is not None and tail.endswith("metadata"):
        text, content_type = await federation.metadata(
            released, tail=tail, query=query, headers=headers,
            home=f"{public_base(request)}/dicomweb/federation",
        )  # fmt: skip
        return web.Response(text=text, content_type=content_type, charset="utf-8")
    async with federation.relay(released, tail=tail, query=query, headers=headers) as answer:
        out = web.StreamResponse(status=answer.status, headers=answer.headers)
        if answer.content_length is not None:
            out.content_length = answer.content_length
        await out.prepare(request)
        outcome, sent = "aborted", 0
        try:
            async for chunk in answer.chunks:
                await out.write(chunk)
                sent += len(chunk)
            await out.write_eof()
            outcome = "complete"
        except RelayBroken as exc:
            # Headers are gone: the client sees a truncated body (Content-Length tells).
            log.warning("federated retrieve broke off: %s", exc)
        except (ConnectionError, asyncio.CancelledError) as exc:
            # The client went away (a server with handler_cancellation cancels instead).
            outcome = "client-gone"
            if isinstance(exc, asyncio.CancelledError):
                await federation.ended(released, outcome=outcome, bytes_sent=sent)
                raise
        except GatewayError as exc:
            log.warning("federation cache: entry broke off: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
        await federation.ended(released, outcome=outcome, bytes_sent=sent)
        return out
