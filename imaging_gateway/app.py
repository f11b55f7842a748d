"""create_app(settings): the only place the aiohttp application is built.

The resources (index, gate, stores, sync, federation) are this module's own keys; the
handlers get the services built from them (``api.keys``), never the resources.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from imaging_gateway.api import admin, consent, dicomweb, federation
from imaging_gateway.api.cors import setup_cors
from imaging_gateway.api.keys import (
    ACCESS,
    ADMIN,
    CONSENT,
    FEDERATION,
    RETRIEVE,
    SEARCH,
    SETTINGS,
    STOW,
    TOKENS,
)
from imaging_gateway.api.middlewares import (
    auth_middleware,
    client_certificate_middleware,
    error_middleware,
    input_middleware,
)
from imaging_gateway.api.openapi import openapi_json
from imaging_gateway.crypto.keyfiles import load_or_create_secret
from imaging_gateway.federation.assertions import IndexReplayCache
from imaging_gateway.federation.cache import RetrieveCache
from imaging_gateway.federation.client import FederationClient, load_registry
from imaging_gateway.federation.fanout import CircuitBreakers
from imaging_gateway.index.shared_state import SharedState
from imaging_gateway.index.sql import SqlIndex
from imaging_gateway.security.audit import AuditLog, load_or_create_chain_key
from imaging_gateway.security.gate import Gate
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from imaging_gateway.services.access import AccessService
from imaging_gateway.services.admin import AdminService
from imaging_gateway.services.consent import ConsentService
from imaging_gateway.services.federation import Federation, FederationService, LocatedStudies
from imaging_gateway.services.retrieve import RetrieveService
from imaging_gateway.services.search import SearchService
from imaging_gateway.services.stow import StowService
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.storage.factory import load_phi_codec, load_store_keys, open_gateway_store
from imaging_gateway.sync.manager import SyncManager

# The app's resources: for the services built below, never for a handler.
INDEX = web.AppKey("index", SqlIndex)
STORES = web.AppKey("stores", dict[str, ObjectStore])
SYNC = web.AppKey("sync", SyncManager)
GATE = web.AppKey("gate", Gate)
# Set only when [federation] enabled = true.
PEERS = web.AppKey("peers", Federation)


async def healthz(request: web.Request) -> web.Response:
    """Liveness and index reachability; the only route without a token."""
    await request.app[ADMIN].ping()
    return web.json_response({"status": "ok", "province": request.app[SETTINGS].gateway.province})


def create_app(settings: Settings) -> web.Application:
    """Build the gateway application; resources open and close with it (cleanup_ctx)."""
    app = web.Application(
        middlewares=[
            error_middleware,
            client_certificate_middleware,
            auth_middleware,
            input_middleware,
        ]
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_tokens_ctx)
    app.cleanup_ctx.append(_index_ctx)
    app.cleanup_ctx.append(_security_ctx)
    app.cleanup_ctx.append(_stores_ctx)
    app.cleanup_ctx.append(_sync_ctx)
    app.cleanup_ctx.append(_federation_ctx)
    app.cleanup_ctx.append(_services_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_routes(admin.routes)
    app.router.add_routes(consent.routes)
    app.router.add_routes(federation.routes)
    app.router.add_routes(dicomweb.routes)
    setup_cors(app, settings.security.cors_origins)
    return app


async def _tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    key = load_or_create_signing_key(s.security.token_key_file)
    app[TOKENS] = TokenAuthority(
        key, province=s.gateway.province, max_ttl_s=s.security.token_max_ttl_s
    )
    yield


async def _index_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    index = await SqlIndex.open(settings.index, phi=load_phi_codec(settings))
    app[INDEX] = index
    yield
    await index.close()


async def _security_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS].security
    engine = app[INDEX].engine
    audit_key = load_or_create_chain_key(s.audit_key_file)
    patient_key = load_or_create_secret(
        s.patient_token_key_file, setting="security.patient_token_key_file"
    )
    app[GATE] = Gate(
        engine,
        AuditLog(engine, audit_key, autocommit_engine=app[INDEX].autocommit_engine),
        PatientTokens(patient_key),
        break_glass_minutes=s.break_glass_minutes,
        search_engine=app[INDEX].search_engine,
        phi=app[INDEX].phi,
    )
    yield


async def _stores_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Loaded once: every store of the app shares one keyring (and its rotations).
    keys = load_store_keys(settings)
    stores: dict[str, ObjectStore] = {
        s.name: open_gateway_store(settings, s.name, keys) for s in settings.stores
    }
    app[STORES] = stores
    yield
    for store in stores.values():
        await store.close()


async def _sync_ctx(app: web.Application) -> AsyncIterator[None]:
    manager = SyncManager(app[SETTINGS], app[INDEX], app[STORES])
    app[SYNC] = manager
    yield
    await manager.close()


async def _federation_ctx(app: web.Application) -> AsyncIterator[None]:
    """Peer registry, signing key, breakers, replay cache and the one outbound session."""
    settings = app[SETTINGS]
    f = settings.federation
    if not f.enabled:
        yield
        return
    registry = load_registry(settings)
    key = load_or_create_signing_key(f.signing_key_file, setting="federation.signing_key_file")
    cache = await _retrieve_cache(app)
    state = SharedState(app[INDEX].engine)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, limit_per_host=32),
        # Never the environment's proxies: peers are reached at their registered address.
        trust_env=False,
        auto_decompress=False,
    )
    app[PEERS] = Federation(
        settings=f,
        registry=registry,
        client=FederationClient(settings, registry, key, session),
        breakers=CircuitBreakers(
            failure_threshold=f.breaker_failures, cool_down_s=f.breaker_cool_down_s
        ),
        # Shared through the index by every gateway process of the province.
        replay_cache=IndexReplayCache(state),
        located=LocatedStudies(state),
        cache=cache,
    )
    yield
    await session.close()


async def _retrieve_cache(app: web.Application) -> RetrieveCache | None:
    f = app[SETTINGS].federation
    if f.cache_store is None:
        return None
    cache = RetrieveCache(app[STORES][f.cache_store], max_bytes=f.cache_max_bytes,
                          ttl_s=f.cache_ttl_s)  # fmt: skip
    await cache.load()
    return cache


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    """The use cases the handlers call, over the resources above (nothing to close)."""
    settings = app[SETTINGS]
    gate = app[GATE]
    federation = app.get(PEERS)
    app[ACCESS] = AccessService(gate)
    app[ADMIN] = AdminService(app[INDEX], app[SYNC])
    app[CONSENT] = ConsentService(gate, max_days=settings.security.consent_max_days)
    app[FEDERATION] = FederationService(gate, settings.gateway.province, federation)
    stores = app[STORES]
    app[RETRIEVE] = RetrieveService(
        gate,
        stores,
        transcode_max_bytes=settings.gateway.transcode_max_bytes,
        inflate_max_bytes=settings.gateway.inflate_max_bytes,
    )
    app[SEARCH] = SearchService(
        gate,
        gate.consents,
        max_results=settings.security.search_max_results,
        federation=federation,
    )
    app[STOW] = StowService(gate, app[INDEX], stores, settings)
    yield
