"""Tokens: issued, verified, and refused when forged, expired or malformed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
import time_machine
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.errors import Forbidden, InvalidRequest, Unauthenticated
from imaging_gateway.security.tokens import TokenAuthority, load_or_create_signing_key


def authority(province: str = "110000") -> TokenAuthority:
    return TokenAuthority(Ed25519PrivateKey.generate(), province=province, max_ttl_s=86400 * 90)


def test_round_trip_hospital() -> None:
    a = authority()
    p = a.verify(a.issue(subject="pacs-1", role="hospital", hospital="H11010800028"))
    assert (p.subject, p.role, p.hospital, p.province) == ("pacs-1", "hospital", "H11010800028", "110000")
    p.require("hospital")
    with pytest.raises(Forbidden):
        p.require("admin")


def test_other_gateways_key_is_refused() -> None:
    token = authority().issue(subject="x", role="admin")
    with pytest.raises(Unauthenticated, match="invalid"):
        authority().verify(token)


def test_other_province_same_key_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    token = TokenAuthority(key, province="440000", max_ttl_s=86400).issue(subject="x", role="admin")
    with pytest.raises(Unauthenticated):
        TokenAuthority(key, province="110000", max_ttl_s=86400).verify(token)


def test_expired() -> None:
    a = authority()
    token = a.issue(subject="x", role="admin", ttl_s=60, now=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(Unauthenticated, match="expired"):
        a.verify(token)


def test_tampered_and_alg_none() -> None:
    a = authority()
    token = a.issue(subject="x", role="hospital", hospital="H11010800028")
    head, body, sig = token.split(".")
    with pytest.raises(Unauthenticated):
        mid = len(sig) // 2
        a.verify(f"{head}.{body}.{sig[:mid]}{'A' if sig[mid] != 'A' else 'B'}{sig[mid + 1:]}")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["role"] = "admin"
    claims.pop("hosp")
    forged = jwt.encode(claims, key=None, algorithm="none")
    with pytest.raises(Unauthenticated):
        a.verify(forged)
    with pytest.raises(Unauthenticated):
        a.verify("garbage")


@pytest.mark.parametrize(
    ("role", "hospital"),
    [("hospital", None), ("hospital", "12345"), ("admin", "H11010800028"), ("root", None)],
)
def test_bad_claims(role: str, hospital: str | None) -> None:
    with pytest.raises(InvalidRequest):
        authority().issue(subject="x", role=role, hospital=hospital)


def test_signing_key_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "k.pem"
    k1 = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    k2 = load_or_create_signing_key(path)
    a1 = TokenAuthority(k1, province="110000", max_ttl_s=86400)
    a2 = TokenAuthority(k2, province="110000", max_ttl_s=86400)
    assert a2.verify(a1.issue(subject="x", role="peer")).role == "peer"


def test_a_verified_token_still_expires_and_forgeries_of_it_are_refused() -> None:
    from imaging_gateway.security import tokens

    a = authority()
    token = a.issue(subject="pacs-1", role="hospital", hospital="H11010800028", ttl_s=600)
    first = a.verify(token)
    assert a.verify(token) is first  # the second check is the cached one
    head, body, sig = token.split(".")
    with pytest.raises(Unauthenticated):
        mid = len(sig) // 2
        a.verify(f"{head}.{body}.{sig[:mid]}{'A' if sig[mid] != 'A' else 'B'}{sig[mid + 1:]}")
    # Later than exp + leeway: refused although it verified before. PyJWT reads the
    # clock itself (no "now" argument), so the test moves the clock.
    later = tokens.time.time() + 600 + tokens.LEEWAY_S + 1
    with time_machine.travel(later, tick=False), pytest.raises(Unauthenticated, match="expired"):
        a.verify(token)
    assert token not in a._verified


def test_a_verified_token_past_its_exp_is_pyjwts_call_with_its_leeway() -> None:
    """Outside [nbf, exp) the cache answers nothing: PyJWT checks again, with LEEWAY_S."""
    from imaging_gateway.security.tokens import LEEWAY_S

    a = authority()
    issued = datetime.now(UTC).replace(microsecond=0)
    token = a.issue(subject="pacs-1", role="hospital", hospital="H11010800028", ttl_s=600,
                    now=issued)
    a.verify(token)
    exp = issued + timedelta(seconds=600)
    with time_machine.travel(exp + timedelta(seconds=LEEWAY_S - 1), tick=False):
        assert a.verify(token).subject == "pacs-1"  # within the leeway
        assert a.verify(token).subject == "pacs-1"
    # PyJWT: expired once exp <= now - leeway (the hand-made check let this second pass).
    with time_machine.travel(exp + timedelta(seconds=LEEWAY_S), tick=False), \
            pytest.raises(Unauthenticated, match="expired"):
        a.verify(token)
    # A clock set back before nbf (issue() sets it 30 s before iat): not a cache hit
    # either; PyJWT refuses an iat further ahead than its leeway.
    token = a.issue(subject="pacs-2", role="admin", ttl_s=600, now=issued)
    a.verify(token)
    with time_machine.travel(issued - timedelta(seconds=LEEWAY_S - 1), tick=False):
        assert a.verify(token).subject == "pacs-2"
    nbf = issued - timedelta(seconds=30)
    with time_machine.travel(nbf - timedelta(seconds=1), tick=False), \
            pytest.raises(Unauthenticated, match="invalid"):
        a.verify(token)


def test_the_verified_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from imaging_gateway.security import tokens

    monkeypatch.setattr(tokens, "VERIFIED_CACHE_SIZE", 3)
    a = authority()
    issued = [a.issue(subject=f"s{i}", role="admin") for i in range(5)]
    for token in issued:
        a.verify(token)
    assert list(a._verified) == issued[2:]
