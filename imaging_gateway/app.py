"""create_app(settings): the only place the aiohttp application is built."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from imaging_gateway.api import admin, consent, dicomweb, federation
from imaging_gateway.api.cors import setup_cors
from imaging_gateway.api.keys import (
    CONSENTS,
    FEDERATION,
    GATE,
    INDEX,
    SETTINGS,
    STORES,
    SYNC,
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
from imaging_gateway.security.consent import ConsentStore
from imaging_gateway.security.gate import Gate
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key
from imaging_gateway.services.federation import Federation, LocatedStudies
from imaging_gateway.settings import Settings
from imaging_gateway.storage.base import ObjectStore
from imaging_gateway.storage.factory import load_phi_codec, load_store_keys, open_gateway_store
from imaging_gateway.sync.manager import SyncManager


async def healthz(request: web.Request) -> web.Response:
    """Liveness and index reachability; the only route without a token."""
    await request.app[INDEX].ping()
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
    app[CONSENTS] = ConsentStore(engine, phi=app[INDEX].phi)
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
    app[FEDERATION] = Federation(
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
