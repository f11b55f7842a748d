"""Cross-province assertions: issued, verified, and refused for each way they can be wrong."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import time_machine
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.errors import Forbidden, InvalidRequest, Unauthenticated
from imaging_gateway.federation.assertions import (
    ASSERTION_TYPE,
    ConsentClaim,
    MemoryReplayCache,
    issue_assertion,
    request_binding,
    verify_assertion,
)
from imaging_gateway.federation.peers import Peer, PeerRegistry
from imaging_gateway.security.patient_tokens import PatientTokens

NOW = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
NATIONAL_ID = "11010519491231002X"
TOKEN = PatientTokens(b"k" * 32).for_national_id(NATIONAL_ID)
BJ_KEY = Ed25519PrivateKey.generate()
QUERY = [("PatientID", "P-1"), ("StudyDate", "20250101-"), ("includefield", "all")]
PATH = "/dicomweb/studies"


def pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def gd_registry(bj_key: Ed25519PrivateKey = BJ_KEY) -> PeerRegistry:
    """Guangdong's registry: Beijing is a gateway peer, Jiangsu a plain DICOMweb server."""
    return PeerRegistry(
        [
            Peer("110000", "Beijing", "https://gw.bj.example/dicomweb", public_key_pem=pem(bj_key)),
            Peer("320000", "Jiangsu", "https://pacs.js.example", kind="dicomweb"),
        ],
        home_province="440000",
    )


def consent(**kw: Any) -> ConsentClaim:
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "scope": "all",
        "valid_until": NOW + timedelta(days=30),
    }
    values.update(kw)
    return ConsentClaim(**values)


def issue(key: Ed25519PrivateKey = BJ_KEY, **kw: Any) -> str:
    args: dict[str, Any] = {
        "issuer": "110000",
        "audience": "440000",
        "subject": "imaging-gateway:110000",
        "hospital": "H11010800028",
        "clinician": "dr-wang",
        "purpose": "treatment",
        "patient_token": TOKEN,
        "correlation_id": str(uuid.uuid4()),
        "method": "GET",
        "path": PATH,
        "query": QUERY,
        "consent": consent(),
        "now": NOW,
    }
    args.update(kw)
    return issue_assertion(key, **args)


async def verify(token: str, *, now: datetime = NOW + timedelta(seconds=1), **kw: Any) -> Any:
    """verify_assertion at ``now``: PyJWT reads the clock itself, so the clock is moved."""
    args: dict[str, Any] = {
        "registry": gd_registry(),
        "expected_audience": "440000",
        "method": "GET",
        "path": PATH,
        "query": QUERY,
        "replay_cache": MemoryReplayCache(),
    }
    args.update(kw)
    with time_machine.travel(now, tick=False):
        return await verify_assertion(token, **args)


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def resign(claims: dict[str, Any], key: Ed25519PrivateKey = BJ_KEY, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": ASSERTION_TYPE, **headers})


async def test_round_trip() -> None:
    grant = consent(scope=("1.2.3", "1.2.4"))
    cid = str(uuid.uuid4())
    token = issue(consent=grant, correlation_id=cid)
    a = await verify(token)
    assert (a.issuer, a.audience, a.subject) == ("110000", "440000", "imaging-gateway:110000")
    assert (a.hospital, a.clinician, a.purpose) == ("H11010800028", "dr-wang", "treatment")
    assert a.patient_token == TOKEN and a.correlation_id == cid
    assert a.consent is not None and a.consent.id == grant.id
    assert a.consent.scope == ("1.2.3", "1.2.4") and a.consent.valid_until == grant.valid_until
    assert a.break_glass_reason is None
    assert a.expires_at - a.issued_at == timedelta(seconds=60)
    assert a.binding == request_binding("GET", PATH, QUERY)
    assert a.allows_study("1.2.3", now=NOW) and not a.allows_study("1.2.5", now=NOW)
    assert not a.allows_study("1.2.3", now=grant.valid_until)
    # The national identity never travels: not in any claim.
    assert NATIONAL_ID not in json.dumps(claims_of(token))
    assert jwt.get_unverified_header(token)["typ"] == ASSERTION_TYPE


async def test_break_glass_without_consent() -> None:
    token = issue(consent=None, purpose="emergency", break_glass_reason="unconscious, trauma")
    a = await verify(token)
    assert a.consent is None and a.break_glass_reason == "unconscious, trauma"
    assert a.allows_study("9.9.9", now=NOW)


async def test_query_order_does_not_matter() -> None:
    await verify(issue(), query=list(reversed(QUERY)))
    await verify(issue(query=dict(QUERY)), query=QUERY)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"patient_token": NATIONAL_ID}, "raw national identity"),
        ({"patient_token": NATIONAL_ID.lower()}, "raw national identity"),
        ({"patient_token": "P-1"}, "not a keyed patient token"),
        ({"patient_token": TOKEN.upper()}, "not a keyed patient token"),
        ({"issuer": "110100"}, "province"),
        ({"audience": "110000"}, "province"),
        ({"hospital": "Beijing General"}, "institution code"),
        ({"purpose": "curiosity"}, "purpose"),
        ({"purpose": "emergency"}, "break-glass"),
        ({"consent": None}, "consent grant or a break-glass"),
        ({"consent": consent(valid_until=NOW)}, "expired"),
        ({"consent": consent(scope=("1.02",))}, "scope"),
        ({"correlation_id": "not-a-uuid"}, "correlation_id"),
        ({"validity_s": 301}, "validity"),
        ({"validity_s": 0}, "validity"),
        ({"method": "G T"}, "method"),
        ({"path": "dicomweb/studies"}, "path"),
        ({"break_glass_reason": " "}, "break_glass"),
        # Shown to the patient in their access log: no bidi override, no NUL.
        ({"break_glass_reason": "trauma \u202e", "consent": None, "purpose": "emergency"},
         "break_glass: control and formatting"),
        ({"clinician": "dr\x00wang"}, "clinician: control and formatting"),
        (
            {"consent": consent(scope=tuple(f"1.2.840.{i + 1}{'9' * 50}" for i in range(120)))},
            "larger",
        ),
    ],
)
def test_issue_refuses_bad_claims(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        issue(**kw)


async def test_forged_signature() -> None:
    token = issue()
    head, body, sig = token.split(".")
    claims = claims_of(token)
    claims["hospital"] = "H44010600001"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="bad signature"):
        await verify(f"{head}.{forged_body}.{sig}")
    # One bit of the signature's bytes (editing its last base64 characters may only touch
    # padding bits that decoding drops).
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[10] ^= 0x01
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated, match="bad signature"):
        await verify(f"{head}.{body}.{flipped}")


async def test_wrong_key() -> None:
    with pytest.raises(Unauthenticated, match="bad signature"):
        await verify(issue(key=Ed25519PrivateKey.generate()))


async def test_unknown_or_non_gateway_issuer() -> None:
    with pytest.raises(Unauthenticated, match="unknown issuer"):
        await verify(issue(issuer="650000"))
    # A plain DICOMweb peer holds no key and speaks no assertions.
    with pytest.raises(Unauthenticated, match="unknown issuer"):
        await verify(issue(issuer="320000"))


async def test_other_algorithms_and_types_refused() -> None:
    claims = claims_of(issue())
    hs = jwt.encode(claims, "secret" * 8, algorithm="HS256", headers={"typ": ASSERTION_TYPE})
    with pytest.raises(Unauthenticated, match="malformed"):
        await verify(hs)
    untyped = jwt.encode(claims, BJ_KEY, algorithm="EdDSA")
    with pytest.raises(Unauthenticated, match="malformed"):
        await verify(untyped)
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"typ": ASSERTION_TYPE})
    with pytest.raises(Unauthenticated, match="malformed"):
        await verify(unsigned)
    with pytest.raises(Unauthenticated, match="malformed"):
        await verify("not.a.jwt")


async def test_expired() -> None:
    token = issue()
    await verify(token, now=NOW + timedelta(seconds=69))  # within the clock skew
    with pytest.raises(Unauthenticated, match="expired"):
        await verify(token, now=NOW + timedelta(seconds=70))
    with pytest.raises(Unauthenticated, match="expired"):
        await verify(token, now=NOW + timedelta(hours=1))


async def test_not_yet_valid() -> None:
    token = issue(now=NOW + timedelta(seconds=30))
    with pytest.raises(Unauthenticated, match="not yet valid"):
        await verify(token, now=NOW)
    await verify(token, now=NOW + timedelta(seconds=20))  # within the clock skew


async def test_window_too_long() -> None:
    claims = claims_of(issue())
    claims["exp"] = claims["iat"] + 301
    with pytest.raises(Unauthenticated, match="longer than 300"):
        await verify(resign(claims))
    claims["exp"] = claims["iat"] + 300
    await verify(resign(claims))


async def test_wrong_audience() -> None:
    with pytest.raises(Unauthenticated, match="wrong audience"):
        await verify(issue(audience="310000"))


async def test_an_audience_list_is_refused_even_with_this_province_in_it() -> None:
    # PyJWT alone accepts any list holding the audience; an assertion is for one province.
    claims = claims_of(issue())
    for aud in (["440000", "310000"], ["440000"]):
        claims["aud"] = aud
        with pytest.raises(Unauthenticated, match="wrong audience"):
            await verify(resign(claims))


async def test_replayed() -> None:
    cache = MemoryReplayCache()
    token = issue()
    await verify(token, replay_cache=cache)
    with pytest.raises(Unauthenticated, match="replayed"):
        await verify(token, replay_cache=cache)
    # Another assertion for the same request is fine.
    await verify(issue(), replay_cache=cache)


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "POST"},
        {"path": "/dicomweb/studies/1.2.3/series"},
        {"path": "/dicomweb/studies/"},
        {"query": [("PatientID", "P-2"), ("StudyDate", "20250101-"), ("includefield", "all")]},
        {"query": QUERY[:2]},
        {"query": [*QUERY, ("limit", "1000")]},
        {"query": []},
    ],
)
async def test_request_binding_mismatch(kw: dict[str, Any]) -> None:
    with pytest.raises(Unauthenticated, match="request binding mismatch"):
        await verify(issue(), **kw)


async def test_raw_national_id_in_signed_claims_refused() -> None:
    # A gateway that signs a raw national id anyway is refused by the responder too.
    claims = claims_of(issue())
    claims["patient"] = NATIONAL_ID
    with pytest.raises(Unauthenticated, match="raw national identity"):
        await verify(resign(claims))


async def test_expired_consent_forbidden() -> None:
    token = issue(consent=consent(valid_until=NOW + timedelta(seconds=5)))
    with pytest.raises(Forbidden, match="consent grant has expired"):
        await verify(token, now=NOW + timedelta(seconds=6))


async def test_malformed_claims_refused() -> None:
    base = claims_of(issue())
    for change in (
        {"iat": "yesterday"},
        {"consent": {"id": "x", "scope": "all"}},
        {"req": {"method": "GET", "path": PATH}},
        {"hospital": None},
        {"correlation_id": "1"},
    ):
        with pytest.raises(Unauthenticated, match="malformed"):
            await verify(resign({**base, **change}))
    without = {k: v for k, v in base.items() if k != "jti"}
    with pytest.raises(Unauthenticated, match="malformed"):
        await verify(resign(without))


async def test_replay_cache_bounded_and_expiring() -> None:
    cache = MemoryReplayCache(capacity=2, leeway_s=10)
    assert await cache.first_use("a", expires_at=100, now=50)
    assert not await cache.first_use("a", expires_at=100, now=60)
    assert await cache.first_use("b", expires_at=200, now=60)
    with pytest.raises(Unauthenticated, match="too many"):
        await cache.first_use("c", expires_at=200, now=60)
    # "a" is kept until its expiry plus leeway, then forgotten, making room.
    assert not await cache.first_use("a", expires_at=100, now=110)
    assert await cache.first_use("c", expires_at=200, now=111)
    assert len(cache) == 2
