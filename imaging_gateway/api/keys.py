"""Typed application keys: the services the handlers call, and request-scoped values.

The handlers reach the gate, the index, the stores and the peers only through these
services (``handlers-call-services`` in pyproject.toml); ``app.py`` builds them.
"""

from __future__ import annotations

from aiohttp import web

from imaging_gateway.crypto.tls import ClientCertificate
from imaging_gateway.security.access import PeerGrant
from imaging_gateway.security.principals import Principal
from imaging_gateway.security.tokens import TokenAuthority
from imaging_gateway.services.access import AccessService
from imaging_gateway.services.admin import AdminService
from imaging_gateway.services.consent import ConsentService
from imaging_gateway.services.federation import FederationService
from imaging_gateway.services.retrieve import RetrieveService
from imaging_gateway.services.search import SearchService
from imaging_gateway.services.stow import StowService
from imaging_gateway.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", TokenAuthority)
ACCESS = web.AppKey("access", AccessService)
ADMIN = web.AppKey("admin", AdminService)
CONSENT = web.AppKey("consent", ConsentService)
FEDERATION = web.AppKey("federation", FederationService)
"""Always set; its federated calls refuse while ``[federation] enabled = false``."""
RETRIEVE = web.AppKey("retrieve", RetrieveService)
SEARCH = web.AppKey("search", SearchService)
STOW = web.AppKey("stow", StowService)
PRINCIPAL = web.RequestKey("principal", Principal)  # request-scoped, set by auth_middleware
# Request-scoped, set by client_certificate_middleware when the connection carries a
# verified client certificate (absent otherwise).
CLIENT_CERTIFICATE = web.RequestKey("client_certificate", ClientCertificate)
# Request-scoped, set by api.federation.authenticate_peer for a verified peer assertion.
PEER_GRANT = web.RequestKey("peer_grant", PeerGrant)

__all__ = [
    "ACCESS",
    "ADMIN",
    "CLIENT_CERTIFICATE",
    "CONSENT",
    "FEDERATION",
    "PEER_GRANT",
    "PRINCIPAL",
    "RETRIEVE",
    "SEARCH",
    "SETTINGS",
    "STOW",
    "TOKENS",
    "ClientCertificate",
    "Principal",
]
