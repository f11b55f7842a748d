"""A real `imaging-gateway serve` over HTTPS: trust, plain HTTP refused, mTLS per route, TLS 1.1."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imaging_gateway.crypto.tls import client_context
from imaging_gateway.settings import TlsSettings
from tests.support.gateway import ForkedGateway, cli, free_port, issue_token
from tests.support.pki import Pki, make_pki

CONFIG = """
[gateway]
province = "110000"
listen = "127.0.0.1:{port}"
data_dir = "data"

[index]
url = "sqlite:///data/index.sqlite3"

[tls]
cert_file = "{pki}/server.crt"
key_file = "{pki}/server.key"
client_ca_file = "{pki}/ca.crt"
client_cert_routes = ["/admin"]
"""


@dataclass
class TlsGateway:
    gw: ForkedGateway
    pki: Pki
    admin: str

    @property
    def port(self) -> int:
        return self.gw.port

    def trusting(self, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context that trusts the test CA (and presents ``cert`` if given)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsGateway]:
    root = tmp_path_factory.mktemp("tls-gateway")
    pki = make_pki(root / "pki")
    port = free_port()
    config = root / "gateway.toml"
    config.write_text(CONFIG.format(port=port, pki=pki.ca.parent), encoding="utf-8")
    gw = ForkedGateway(config, port, ssl_context=ssl.create_default_context(cafile=str(pki.ca)))
    gw.start()
    admin = issue_token(config, "--role", "admin")
    try:
        yield TlsGateway(gw, pki, admin)
    finally:
        gw.stop()


def get(url: str, ctx: ssl.SSLContext | None, token: str | None = None) -> tuple[int, Any]:
    """GET over a new connection; (status, JSON body or None)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


def test_https_with_the_ca(tls_gateway: TlsGateway) -> None:
    ctx = tls_gateway.trusting()
    for host in ("127.0.0.1", "localhost"):
        status, body = get(f"https://{host}:{tls_gateway.port}/healthz", ctx)
        assert (status, body["status"]) == (200, "ok")


def test_client_that_does_not_trust_the_ca_fails(tls_gateway: TlsGateway) -> None:
    with pytest.raises(urllib.error.URLError) as info:
        get(f"{tls_gateway.gw.base}/healthz", ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_to_the_tls_port_fails(tls_gateway: TlsGateway) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        get(f"http://127.0.0.1:{tls_gateway.port}/healthz", None)


def test_client_cert_route_without_certificate_is_403(tls_gateway: TlsGateway) -> None:
    status, body = get(f"{tls_gateway.gw.base}/admin/sync-jobs", tls_gateway.trusting(),
                       tls_gateway.admin)
    assert status == 403
    assert body["error"] == "client-certificate-required"
    assert "Traceback" not in json.dumps(body)


def test_client_cert_route_with_certificate_from_the_ca(tls_gateway: TlsGateway) -> None:
    pki = tls_gateway.pki
    ctx = tls_gateway.trusting(cert=pki.client.cert, key=pki.client.key)
    status, body = get(f"{tls_gateway.gw.base}/admin/sync-jobs", ctx, tls_gateway.admin)
    assert status == 200, body
    # The certificate adds to the token; it does not replace it.
    status, body = get(f"{tls_gateway.gw.base}/admin/sync-jobs", ctx)
    assert status == 401


def test_client_cert_route_with_certificate_from_another_ca(tls_gateway: TlsGateway) -> None:
    pki = tls_gateway.pki
    ctx = tls_gateway.trusting(cert=pki.rogue_client.cert, key=pki.rogue_client.key)
    try:
        status, _ = get(f"{tls_gateway.gw.base}/admin/sync-jobs", ctx, tls_gateway.admin)
    except (OSError, http.client.HTTPException):
        return  # the handshake failed (TLS 1.3 reports it on the first read): refused
    assert status == 403


def test_other_routes_need_no_client_certificate(tls_gateway: TlsGateway) -> None:
    hospital = issue_token(tls_gateway.gw.config, "--role", "hospital",
                           "--hospital", "H11010800028")
    status, _ = get(f"{tls_gateway.gw.base}/dicomweb/studies?PatientID=X", tls_gateway.trusting(),
                    hospital)
    assert 200 <= status < 300


def _handshake(port: int, ctx: ssl.SSLContext) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.version()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused_and_1_2_accepted(tls_gateway: TlsGateway) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as info:
        _handshake(tls_gateway.port, old)
    # The client did offer TLS 1.1 (it did not give up before sending its hello); the
    # server answered with a protocol-version alert or hung up.
    assert "no protocols available" not in str(info.value)
    assert "wrong version number" not in str(info.value)

    v12 = tls_gateway.trusting()
    v12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(tls_gateway.port, v12) == "TLSv1.2"


def test_outbound_context_verifies(tls_gateway: TlsGateway) -> None:
    pki = tls_gateway.pki
    # Without the test CA: the system store does not know it.
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_gateway.port, client_context(TlsSettings()))
    # With it as tls.ca_file: verified; as a peer's own bundle: verified.
    assert _handshake(tls_gateway.port, client_context(TlsSettings(ca_file=pki.ca)))
    assert _handshake(tls_gateway.port, client_context(TlsSettings(), peer_ca_file=pki.ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_gateway.port, client_context(TlsSettings(), peer_ca_file=pki.other_ca))
    # The host name is checked too: the right CA but a name the certificate lacks.
    ctx = client_context(TlsSettings(ca_file=pki.ca))
    with socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError, match="match"):
        ctx.wrap_socket(raw, server_hostname="gateway.other.example")


def test_outbound_context_presents_the_gateway_certificate(tls_gateway: TlsGateway) -> None:
    """What federation will do: a gateway's own certificate opens another's mTLS routes."""
    pki = tls_gateway.pki
    me = TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca)
    ctx = client_context(me, present_certificate=True)
    status, _ = get(f"{tls_gateway.gw.base}/admin/sync-jobs", ctx, tls_gateway.admin)
    assert status == 200


def test_logs_hold_no_secret(tls_gateway: TlsGateway) -> None:
    test_client_cert_route_without_certificate_is_403(tls_gateway)
    logs = tls_gateway.gw.logs()
    assert "serving on https://127.0.0.1" in logs
    assert "client certificates required on: /admin" in logs
    assert "refused: no verified client certificate for /admin routes" in logs
    assert tls_gateway.admin not in logs
    assert "Traceback" not in logs
    assert "PRIVATE KEY" not in logs


def test_bad_key_permissions_stop_start_up(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pki.server.key.chmod(0o640)
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(port=free_port(), pki=pki.ca.parent), encoding="utf-8")
    proc = cli(config, "serve", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "imaging-gateway: config: tls.key_file: ")
    assert "chmod 600" in proc.stderr
    assert "Traceback" not in proc.stderr
