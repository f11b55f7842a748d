"""Object-store adapters verify an https endpoint against system trust plus tls.ca_file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from imaging_gateway.crypto.tls import outbound_context, server_context
from imaging_gateway.errors import ObjectNotFound, StorageError
from imaging_gateway.settings import StoreSettings, TlsSettings
from imaging_gateway.storage.factory import open_store
from tests.support.gateway import free_port
from tests.support.pki import Pki, make_pki


async def no_such_key(request: web.Request) -> web.Response:
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
            b"<Message>no</Message></Error>")
    return web.Response(status=404, body=b"" if request.method == "HEAD" else body,
                        content_type="application/xml")


@pytest.fixture
async def https_endpoint(tmp_path: Path) -> AsyncIterator[tuple[str, Pki]]:
    """An HTTPS server (certificate from a throwaway CA) that has no object at all."""
    pki = make_pki(tmp_path / "pki")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", no_such_key)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    tls = TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key)
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(tls)).start()
    yield f"https://127.0.0.1:{port}", pki
    await runner.cleanup()


@pytest.mark.parametrize("kind", ["s3", "minio"])
async def test_store_trusts_tls_ca_file(https_endpoint: tuple[str, Pki], kind: str) -> None:
    endpoint, pki = https_endpoint
    settings = StoreSettings(name="tls", kind=kind, endpoint=endpoint,  # type: ignore[arg-type]
                             bucket="dicom", retries=0, timeout_s=5.0)
    trusted = open_store(settings, ssl_context=outbound_context(TlsSettings(ca_file=pki.ca),
                                                                endpoint))
    try:
        with pytest.raises(ObjectNotFound):  # verified, connected, and answered
            await trusted.stat("1.2.3/1.dcm")
    finally:
        await trusted.close()
    untrusted = open_store(settings, ssl_context=outbound_context(TlsSettings(), endpoint))
    try:
        with pytest.raises(StorageError) as info:
            await untrusted.stat("1.2.3/1.dcm")
        assert not isinstance(info.value, ObjectNotFound)
    finally:
        await untrusted.close()
