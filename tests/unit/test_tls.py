"""TLS contexts: what they enforce, and one-line errors naming the key for every bad file."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from imaging_gateway.crypto.tls import (
    client_certificate,
    client_context,
    is_loopback,
    outbound_context,
    route_needing_certificate,
    server_context,
)
from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import TlsSettings
from tests.support.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_for(pki: Pki, **kw: object) -> TlsSettings:
    return TlsSettings(**{"cert_file": pki.server.cert, "key_file": pki.server.key, **kw})  # type: ignore[arg-type]


def test_server_context_defaults(pki: Pki) -> None:
    ctx = server_context(tls_for(pki))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_COMPRESSION
    suites = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all(s.startswith("ECDHE-") for s in suites)
    assert not any("CBC" in s or "SHA" == s[-3:] for s in suites)


def test_server_context_with_client_ca_and_tls13(pki: Pki) -> None:
    ctx = server_context(tls_for(pki, client_ca_file=pki.ca, client_cert_routes=("/admin",),
                                 min_version="TLSv1.3"))
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def _bad(tmp_path: Path, pki: Pki, case: str) -> tuple[TlsSettings, str]:
    other_key = make_pki(tmp_path / "other").server.key
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    garbage.chmod(0o600)
    open_key = tmp_path / "open.key"
    open_key.write_bytes(pki.server.key.read_bytes())
    open_key.chmod(0o644)
    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    encrypted.chmod(0o600)
    cases = {
        "missing cert": (tls_for(pki, cert_file=tmp_path / "nope.crt"), "tls.cert_file"),
        "missing key": (tls_for(pki, key_file=tmp_path / "nope.key"), "tls.key_file"),
        "cert not pem": (tls_for(pki, cert_file=garbage), "tls.cert_file"),
        "key not pem": (tls_for(pki, key_file=garbage), "tls.key_file"),
        "key is a cert": (tls_for(pki, key_file=_private_copy(tmp_path, pki.server.cert)),
                          "tls.key_file"),
        "key open to others": (tls_for(pki, key_file=open_key), "tls.key_file"),
        "key encrypted": (tls_for(pki, key_file=encrypted), "tls.key_file"),
        "key of another cert": (tls_for(pki, key_file=other_key), "tls.key_file"),
        "cert is a directory": (tls_for(pki, cert_file=tmp_path), "tls.cert_file"),
        "client ca missing": (tls_for(pki, client_ca_file=tmp_path / "nope.pem"),
                              "tls.client_ca_file"),
        "client ca not pem": (tls_for(pki, client_ca_file=garbage), "tls.client_ca_file"),
        "not configured": (TlsSettings(), "tls.cert_file"),
    }
    return cases[case]


def _private_copy(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / f"copy-{src.name}"
    dst.write_bytes(src.read_bytes())
    dst.chmod(0o600)
    return dst


@pytest.mark.parametrize("case", [
    "missing cert", "missing key", "cert not pem", "key not pem", "key is a cert",
    "key open to others", "key encrypted", "key of another cert", "cert is a directory",
    "client ca missing", "client ca not pem", "not configured",
])
def test_server_context_errors_name_the_key(tmp_path: Path, pki: Pki, case: str) -> None:
    settings, key = _bad(tmp_path, pki, case)
    with pytest.raises(ConfigError) as info:
        server_context(settings)
    assert info.value.key == key, str(info.value)
    assert "\n" not in str(info.value)
    # Never the key material itself.
    assert "PRIVATE KEY" not in str(info.value)


def test_unreadable_file_names_the_key(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    # Mode 000 does not stop root (these tests may run as root), so refuse the read itself.
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == pki.server.key:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(ConfigError, match=r"^config: tls\.key_file: .* not readable"):
        server_context(tls_for(pki))


def test_client_context_always_verifies(pki: Pki, tmp_path: Path) -> None:
    for ctx in (client_context(TlsSettings()), client_context(TlsSettings(ca_file=pki.ca)),
                client_context(TlsSettings(), peer_ca_file=pki.ca),
                client_context(tls_for(pki), present_certificate=True)):
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    # A peer's bundle replaces the system store: only that CA can vouch for the peer.
    peer = client_context(TlsSettings(), peer_ca_file=pki.ca)
    assert peer.cert_store_stats()["x509_ca"] == 1
    with pytest.raises(ConfigError, match=r"tls\.ca_file"):
        client_context(TlsSettings(ca_file=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"peers\[0\]\.ca_file"):
        client_context(TlsSettings(), peer_ca_file=tmp_path / "nope.pem",
                       peer_setting="peers[0].ca_file")
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        client_context(TlsSettings(), present_certificate=True)
    assert outbound_context(TlsSettings(), "http://127.0.0.1:8333") is None
    assert outbound_context(TlsSettings(), "HTTPS://oss.example.cn") is not None


def test_client_certificate_fields() -> None:
    assert client_certificate(None) is None
    assert client_certificate({}) is None  # what getpeercert() says for an unverified cert
    cert = client_certificate({
        "subject": ((("organizationName", "x"),), (("commonName", "gateway 310000"),)),
        "issuer": ((("commonName", "test CA"),),),
        "subjectAltName": (("DNS", "gw.example"), ("URI", "urn:x"), ("IP Address", "10.0.0.1"),
                           ("email", "a@b")),
        "serialNumber": "0A1B",
    })
    assert cert is not None
    assert (cert.common_name, cert.issuer_common_name, cert.serial_number) == (
        "gateway 310000", "test CA", "0A1B")
    assert (cert.dns_names, cert.uris, cert.ip_addresses) == (("gw.example",), ("urn:x",),
                                                              ("10.0.0.1",))
    assert cert.subject == "gateway 310000"
    no_cn = client_certificate({"subject": (), "subjectAltName": (("DNS", "gw.example"),)})
    assert no_cn is not None and no_cn.subject == "gw.example"


def test_route_prefixes_match_whole_segments() -> None:
    routes = ("/admin", "/federation")
    assert route_needing_certificate("/admin", routes) == "/admin"
    assert route_needing_certificate("/admin/sync-jobs", routes) == "/admin"
    assert route_needing_certificate("/federation/studies", routes) == "/federation"
    assert route_needing_certificate("/administrators", routes) is None
    assert route_needing_certificate("/dicomweb/studies", routes) is None
    assert route_needing_certificate("/healthz", ("/",)) == "/"
    assert route_needing_certificate("/admin", ()) is None


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("gateway.example")


def _serve_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> dict[str, object]:
    from imaging_gateway.api import server
    from imaging_gateway.cli import _serve
    from imaging_gateway.settings import load_settings

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(text, encoding="utf-8")
    seen: dict[str, object] = {}

    async def serve(app: object, **kw: object) -> None:
        seen.update(kw)

    monkeypatch.setattr(server, "serve", serve)
    assert _serve(load_settings(cfg, environ={})) == 0
    return seen


def test_serve_plain_http_warns_off_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _serve_with(tmp_path, monkeypatch, '[gateway]\nlisten = "0.0.0.0:8080"\n')
    assert seen["ssl_context"] is None
    assert any(r.levelname == "WARNING" and "plain HTTP" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    _serve_with(tmp_path, monkeypatch, '[gateway]\nlisten = "127.0.0.1:8080"\n')
    assert not any("plain HTTP" in r.getMessage() for r in caplog.records)


def test_serve_with_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: Pki,
                        caplog: pytest.LogCaptureFixture) -> None:
    seen = _serve_with(
        tmp_path, monkeypatch,
        f'[gateway]\nlisten = "0.0.0.0:8443"\n[tls]\ncert_file = "{pki.server.cert}"\n'
        f'key_file = "{pki.server.key}"\n')
    assert isinstance(seen["ssl_context"], ssl.SSLContext)
    assert not any("plain HTTP" in r.getMessage() for r in caplog.records)
