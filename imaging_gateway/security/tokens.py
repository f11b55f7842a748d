"""Bearer tokens: Ed25519-signed JWTs issued and verified by this gateway (PyJWT)."""

from __future__ import annotations

import os
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imaging_gateway.errors import ConfigError, InvalidRequest, Unauthenticated
from imaging_gateway.security.principals import Principal, validate_claims

ALGORITHM = "EdDSA"
AUDIENCE = "imaging-gateway"
LEEWAY_S = 30
"""Clock skew PyJWT allows on ``nbf`` / ``exp`` / ``iat``: a token is often issued on the
admin's machine (``imaging-gateway tokens issue``) and used from a PACS, whose clocks may
differ by seconds; 30 s is well under the shortest lifetime worth issuing (minutes)."""
VERIFIED_CACHE_SIZE = 4096
"""Tokens whose signature and claims were checked, kept to skip the check on reuse."""


def load_or_create_signing_key(
    path: Path, *, setting: str = "security.token_key_file"
) -> Ed25519PrivateKey:
    """Load an Ed25519 signing key (PEM), creating it (mode 0600) on first use.

    Used for the token key and the federation assertion key (``setting`` names the
    key in errors). Raises ``ConfigError`` if the file exists but is not an Ed25519
    private key, or cannot be created.
    """
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise  # created meanwhile by another process: as before, not a config error
        except OSError as exc:
            raise ConfigError(setting, f"cannot create {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(setting, "expected a PEM Ed25519 private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(setting, "expected a PEM Ed25519 private key")
    return loaded


class TokenAuthority:
    """Issues and verifies this gateway's bearer tokens."""

    def __init__(self, key: Ed25519PrivateKey, *, province: str, max_ttl_s: int) -> None:
        self._key = key
        self._public: Ed25519PublicKey = key.public_key()
        self.province = province
        self.issuer = f"imaging-gateway:{province}"
        self.max_ttl_s = max_ttl_s
        # token -> (principal, nbf, exp) in epoch seconds, least recent first. A PACS
        # sends the same token with every request: checking its signature and claims
        # each time was ~20% of a search's CPU. Keyed by the whole token string, so a hit
        # is exactly the token that was verified. A hit only skips PyJWT while the token
        # is strictly inside [nbf, exp); outside, PyJWT checks it again with its leeway
        # and decides (so the leeway and every refusal stay PyJWT's).
        self._verified: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()

    def issue(
        self,
        *,
        subject: str,
        role: str,
        hospital: str | None = None,
        national_id: str | None = None,
        ttl_s: int = 24 * 3600,
        now: datetime | None = None,
    ) -> str:
        """A signed token for ``subject`` with ``role``; raises ``InvalidRequest`` on bad claims."""
        checked = validate_claims(role, hospital, national_id)
        if not 0 < ttl_s <= self.max_ttl_s:
            raise InvalidRequest(f"ttl must be between 1 s and {self.max_ttl_s} s")
        if not subject or len(subject) > 128:
            # The audit log records the subject of every access in full.
            raise InvalidRequest("subject must be 1-128 characters")
        issued = now or datetime.now(UTC)
        claims: dict[str, object] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": subject,
            "role": checked,
            "prov": self.province,
            "iat": issued,
            "nbf": issued - timedelta(seconds=30),
            "exp": issued + timedelta(seconds=ttl_s),
            "jti": str(uuid.uuid4()),
        }
        if hospital is not None:
            claims["hosp"] = hospital
        if national_id is not None:
            claims["nid"] = national_id
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        """The principal a token stands for; raises ``Unauthenticated`` if it is not valid."""
        cached = self._verified.get(token)
        if cached is not None:
            principal, not_before, expiry = cached
            if not_before <= time.time() < expiry:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        principal, not_before, expiry = self._check(token)
        self._verified[token] = (principal, not_before, expiry)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _check(self, token: str) -> tuple[Principal, float, float]:
        """Verify signature and claims: the principal, its nbf and exp (epoch seconds)."""
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
                leeway=LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token") from None
        try:
            role = validate_claims(str(claims.get("role")), claims.get("hosp"), claims.get("nid"))
        except InvalidRequest:
            raise Unauthenticated("invalid token") from None
        principal = Principal(
            subject=str(claims["sub"]),
            role=role,
            province=str(claims.get("prov", "")),
            token_id=str(claims["jti"]),
            hospital=claims.get("hosp"),
            national_id=claims.get("nid"),
        )
        return principal, float(claims.get("nbf", claims["iat"])), float(claims["exp"])
