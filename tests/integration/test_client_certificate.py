"""The mTLS middleware in a real TLS server: handlers see the verified client certificate."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from imaging_gateway.api.keys import CLIENT_CERTIFICATE, SETTINGS
from imaging_gateway.api.middlewares import client_certificate_middleware, error_middleware
from imaging_gateway.crypto.tls import server_context
from imaging_gateway.settings import load_settings
from tests.support.gateway import free_port
from tests.support.pki import Pki, make_pki


async def whoami(request: web.Request) -> web.Response:
    cert = request.get(CLIENT_CERTIFICATE)
    if cert is None:
        return web.json_response({"certificate": None})
    return web.json_response({"subject": cert.subject, "dns": list(cert.dns_names),
                              "uris": list(cert.uris), "issuer": cert.issuer_common_name})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, Pki]]:
    pki = make_pki(tmp_path / "pki")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[tls]\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\n'
        f'client_ca_file = "{pki.ca}"\nclient_cert_routes = ["/federation"]\n',
        encoding="utf-8")
    settings = load_settings(cfg, environ={})
    app = web.Application(middlewares=[error_middleware, client_certificate_middleware])
    app[SETTINGS] = settings
    app.router.add_get("/federation/whoami", whoami)
    app.router.add_get("/open/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(settings.tls))
    await site.start()
    yield f"https://127.0.0.1:{port}", pki
    await runner.cleanup()


def trusting(pki: Pki, *, client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return ctx


async def test_handlers_see_the_certificate_subject(server: tuple[str, Pki]) -> None:
    base, pki = server
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/federation/whoami", ssl=trusting(pki, client=True)) as r:
            assert r.status == 200
            assert await r.json() == {
                "subject": "gateway 310000", "dns": ["gw.310000.example"],
                "uris": ["urn:imaging-gateway:province:310000"],
                "issuer": "imaging-gateway test CA",
            }
        # Outside client_cert_routes a certificate is still exposed when given ...
        async with http.get(f"{base}/open/whoami", ssl=trusting(pki, client=True)) as r:
            assert (await r.json())["subject"] == "gateway 310000"
        # ... and not needed.
        async with http.get(f"{base}/open/whoami", ssl=trusting(pki, client=False)) as r:
            assert await r.json() == {"certificate": None}


async def test_missing_certificate_is_a_json_403(server: tuple[str, Pki]) -> None:
    base, pki = server
    async with aiohttp.ClientSession() as http:
        for path in ("/federation/whoami", "/federation"):
            async with http.get(f"{base}{path}", ssl=trusting(pki, client=False)) as r:
                assert r.status == 403
                assert r.content_type == "application/json"
                assert (await r.json())["error"] == "client-certificate-required"
