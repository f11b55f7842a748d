"""Typed application keys for every resource the app holds."""

from __future__ import annotations

from aiohttp import web

from imaging_gateway.crypto.tls import ClientCertificate
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.consent import ConsentStore
from imaging_gateway.security.gate import Gate, PeerGrant
from imaging_gateway.security.principals import Principal
from imaging_gateway.security.tokens import TokenAuthority
from imaging_gateway.services.federation import Federation
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.sync.manager import SyncManager

SETTINGS = web.AppKey("settings", Settings)
INDEX = web.AppKey("index", SqlIndex)
STORES = web.AppKey("stores", dict[str, ObjectStore])
TOKENS = web.AppKey("tokens", TokenAuthority)
SYNC = web.AppKey("sync", SyncManager)
GATE = web.AppKey("gate", Gate)
CONSENTS = web.AppKey("consents", ConsentStore)
# Set only when [federation] enabled = true.
FEDERATION = web.AppKey("federation", Federation)
PRINCIPAL = web.RequestKey("principal", Principal)  # request-scoped, set by auth_middleware
# Request-scoped, set by client_certificate_middleware when the connection carries a
# verified client certificate (absent otherwise).
CLIENT_CERTIFICATE = web.RequestKey("client_certificate", ClientCertificate)
# Request-scoped, set by api.federation.authenticate_peer for a verified peer assertion.
PEER_GRANT = web.RequestKey("peer_grant", PeerGrant)

__all__ = [
    "CLIENT_CERTIFICATE",
    "CONSENTS",
    "FEDERATION",
    "GATE",
    "INDEX",
    "PEER_GRANT",
    "PRINCIPAL",
    "SETTINGS",
    "STORES",
    "SYNC",
    "TOKENS",
    "ClientCertificate",
    "Principal",
]
