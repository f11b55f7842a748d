"""Throwaway certificate authorities and certificates for TLS tests (cryptography's x509 builder)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path               # the test CA's certificate (trusted by clients and for mTLS)
    server: Issued         # SAN 127.0.0.1 and localhost, serverAuth + clientAuth
    client: Issued         # a client certificate from the test CA
    other_ca: Path         # a second, unrelated CA
    rogue_client: Issued   # a client certificate from the other CA


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imaging-gateway tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[Key, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca: tuple[Key, x509.Certificate], cn: str, *, dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), uris: tuple[str, ...] = (), server: bool = False,
          client: bool = True) -> tuple[Key, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_cert(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: Key, *, mode: int = 0o600) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(mode)
    return path


def write_issued(directory: Path, name: str, pair: tuple[Key, x509.Certificate]) -> Issued:
    key, cert = pair
    return Issued(write_cert(directory / f"{name}.crt", cert), write_key(directory / f"{name}.key", key))


def make_pki(directory: Path) -> Pki:
    """A test CA with server and client certificates, and an unrelated CA with a client."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("imaging-gateway test CA")
    other = make_ca("some other CA")
    return Pki(
        ca=write_cert(directory / "ca.crt", ca[1]),
        server=write_issued(directory, "server", issue(
            ca, "gateway 110000", dns=("localhost",), ips=("127.0.0.1",), server=True)),
        client=write_issued(directory, "client", issue(
            ca, "gateway 310000", dns=("gw.310000.example",),
            uris=("urn:imaging-gateway:province:310000",))),
        other_ca=write_cert(directory / "other-ca.crt", other[1]),
        rogue_client=write_issued(directory, "rogue", issue(other, "gateway 310000")),
    )
