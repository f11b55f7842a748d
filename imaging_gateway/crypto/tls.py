"""TLS contexts: the server's (optionally asking for client certificates) and outbound ones."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import TlsSettings

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
# TLS 1.2 suites of Mozilla's "intermediate" profile without the finite-field DHE ones:
# ECDHE key exchange (forward secrecy) and AEAD ciphers only; no CBC, RC4, 3DES or
# static-RSA key exchange. TLS 1.3 suites are all AEAD and are left to OpenSSL.
_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
_HARDENING = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SSL context the HTTPS server runs with.

    TLS ``tls.min_version`` (1.2 or 1.3) and up, ECDHE + AEAD suites only. With
    ``tls.client_ca_file`` the server asks every client for a certificate and verifies
    any it is given against that bundle (``CERT_OPTIONAL``), so that
    ``tls.client_cert_routes`` can require one per route; without it, it asks none.

    Raises ``ConfigError`` naming the key when TLS is not configured, a file is missing,
    unreadable, not PEM or of the wrong kind, the key is encrypted or open to group or
    others, or the key does not belong to the certificate.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("tls.cert_file", "missing; set tls.cert_file and tls.key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= _HARDENING | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(ctx, tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        _load_trust(ctx, tls.client_ca_file, setting="tls.client_ca_file")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    tls: TlsSettings,
    *,
    peer_ca_file: Path | None = None,
    peer_setting: str = "peer ca_file",
    present_certificate: bool = False,
) -> ssl.SSLContext:
    """An SSL context for outbound calls; it always verifies the chain and the host name.

    Trusts the system store plus ``tls.ca_file``. When ``peer_ca_file`` is given (a
    federation peer's CA bundle, named ``peer_setting`` in errors) it trusts that bundle
    only, so no public CA can vouch for a peer. With ``present_certificate`` it presents
    the gateway's own ``tls.cert_file``/``tls.key_file`` to servers that ask (mTLS to a
    peer; the certificate then needs the clientAuth extended key usage). TLS 1.2 and up.

    Raises ``ConfigError`` naming the key when a bundle, the certificate or the key is
    missing, unreadable or wrong (as ``server_context`` does).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _HARDENING
    if peer_ca_file is not None:
        _load_trust(ctx, peer_ca_file, setting=peer_setting)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.ca_file is not None:
            _load_trust(ctx, tls.ca_file, setting="tls.ca_file")
    if present_certificate:
        if tls.cert_file is None or tls.key_file is None:
            raise ConfigError(
                "tls.cert_file", "missing; presenting a client certificate needs it and key_file"
            )
        _load_identity(ctx, tls.cert_file, tls.key_file)
    # Nothing above may weaken these; a context that does not verify is never handed out.
    if ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname:
        raise AssertionError("outbound TLS context must verify chain and host name")
    return ctx


def outbound_context(tls: TlsSettings, url: str) -> ssl.SSLContext | None:
    """``client_context(tls)`` for an ``https`` URL, None for any other (nothing to verify).

    Raises ``ConfigError`` as ``client_context`` does.
    """
    return client_context(tls) if url.lower().startswith("https://") else None


def _read(path: Path, setting: str) -> bytes:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(setting, f"{path} must be a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(setting, f"{path} does not exist") from None
    except PermissionError:
        raise ConfigError(setting, f"{path} is not readable by the gateway's user") from None
    except OSError as exc:
        raise ConfigError(setting, f"{path} cannot be read ({exc.strerror})") from None


def _certificates(path: Path, setting: str) -> list[x509.Certificate]:
    data = _read(path, setting)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(setting, f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certs


def _load_trust(ctx: ssl.SSLContext, path: Path, *, setting: str) -> None:
    _certificates(path, setting)  # a clear error before OpenSSL's terse one
    try:
        ctx.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(setting, f"{path} is not a usable CA bundle ({exc.reason})") from None


def _load_identity(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load a certificate chain and its key, checking the key file's mode first."""
    leaf = _certificates(cert_file, "tls.cert_file")[0]
    data = _read(key_file, "tls.key_file")
    if key_file.stat().st_mode & 0o077:
        raise ConfigError(
            "tls.key_file", f"{key_file} must be readable by its owner only (chmod 600)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            "tls.key_file", f"{key_file} is encrypted; give the key without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("tls.key_file", f"{key_file} holds no PEM private key") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, raw) != leaf.public_key().public_bytes(pem, raw):
        raise ConfigError(
            "tls.key_file", f"{key_file} is not the key of the certificate in tls.cert_file"
        )
    try:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except ssl.SSLError as exc:
        raise ConfigError(
            "tls.cert_file", f"{cert_file} and tls.key_file cannot be used ({exc.reason})"
        ) from None


# ---------------------------------------------------------------------------
# Client certificates, as the server saw them


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The verified certificate a client presented: who it names and who issued it."""

    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    issuer_common_name: str | None
    serial_number: str
    """Hexadecimal, as OpenSSL prints it."""

    @property
    def subject(self) -> str:
        """The name to know the client by: the CN, else the first SAN; ``""`` if none."""
        for name in (self.common_name, *self.uris, *self.dns_names, *self.ip_addresses):
            if name:
                return name
        return ""


def client_certificate(peercert: Mapping[str, Any] | None) -> ClientCertificate | None:
    """Read ``SSLSocket.getpeercert()`` output; None when the client presented none.

    Only a certificate that passed verification shows up with fields (``getpeercert``
    answers ``{}`` for an unverified one and None for none), so a result here is a
    certificate issued by a CA in ``tls.client_ca_file``.
    """
    if not peercert:
        return None

    def cn(rdns: Any) -> str | None:
        for rdn in rdns or ():
            for attr, value in rdn:
                if attr == "commonName":
                    return str(value)
        return None

    sans: dict[str, list[str]] = {"DNS": [], "URI": [], "IP Address": []}
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in sans:
            sans[kind].append(str(value))
    return ClientCertificate(
        common_name=cn(peercert.get("subject")),
        dns_names=tuple(sans["DNS"]),
        uris=tuple(sans["URI"]),
        ip_addresses=tuple(sans["IP Address"]),
        issuer_common_name=cn(peercert.get("issuer")),
        serial_number=str(peercert.get("serialNumber", "")),
    )


def route_needing_certificate(path: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix of ``tls.client_cert_routes`` that ``path`` falls under, or None.

    Prefixes match whole path segments: ``/admin`` covers ``/admin`` and
    ``/admin/sync-jobs`` but not ``/administrators``.
    """
    for prefix in prefixes:
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            return prefix
    return None


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
