"""Signed cross-province request assertions: who asks a responding imaging gateway, for whom, why.

The initiating imaging gateway (IHE XCA-I) signs one short-lived assertion per HTTP request
it sends to a responding gateway: an Ed25519 JWT (RFC 7519, ``alg`` EdDSA, RFC 8037; typed
``imaging-gateway-assertion+jwt`` per RFC 8725 3.11 so a bearer token of
:mod:`imaging_gateway.security.tokens` can never pass for one). Claims::

    iss             calling province (GB/T 2260 code), whose registered key verifies it
    aud             responding province
    sub             calling gateway (e.g. "imaging-gateway:110000")
    hospital        medical-insurance institution code of the hospital behind the request
    clinician       the clinician, when known
    purpose         one of security.consent.PURPOSES, or "emergency" with break_glass
    patient         the keyed pseudonymous patient token (PatientTokens); never a national id
    consent         {"id", "scope": "all" | [StudyInstanceUID...], "valid_until": epoch s}
    break_glass     the stated emergency reason, when there is no consent grant
    correlation_id  UUID shared by both sides' audit records of this access
    req             {"method", "path", "query_sha256"}: the one request it authorizes
    iat, nbf, exp   validity window: 60 s by default, at most 300 s
    jti             unique id; the responder refuses a second use (ReplayCache)

The request binding makes an assertion useless on any other request: the method, the
URL path as sent (percent-encoded form, without the query) and a SHA-256 over the
query's canonical form (pairs sorted, each ``quote(key)=quote(value)``, joined by
``&``; hashed, because the query carries patient attributes). A reverse proxy in front
of a responding gateway must therefore not rewrite the path.

The responder verifies everything itself (:func:`verify_assertion`) and then applies its
own rules (the gate) to what the consent allows (:meth:`Assertion.allows_study`).
"""

from __future__ import annotations

import hashlib
import heapq
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.domain.qido import is_uid
from imaging_gateway.domain.text import shown_text_problem
from imaging_gateway.errors import Forbidden, InvalidRequest, Unauthenticated
from imaging_gateway.federation.peers import PeerRegistry, is_province_code
from imaging_gateway.index.shared_state import SharedState
from imaging_gateway.security.consent import MAX_SCOPE_STUDIES, PURPOSES, Consent
from imaging_gateway.security.principals import HOSPITAL_CODE

__all__ = [
    "ALGORITHM",
    "ASSERTION_TYPE",
    "DEFAULT_VALIDITY_S",
    "MAX_VALIDITY_S",
    "Assertion",
    "ConsentClaim",
    "IndexReplayCache",
    "MemoryReplayCache",
    "ReplayCache",
    "RequestBinding",
    "issue_assertion",
    "request_binding",
    "verify_assertion",
]

ALGORITHM: Final = "EdDSA"
ASSERTION_TYPE: Final = "imaging-gateway-assertion+jwt"
DEFAULT_VALIDITY_S: Final = 60
MAX_VALIDITY_S: Final = 300
CLOCK_SKEW_S: Final = 10
"""Clock difference between gateways tolerated on ``iat`` / ``nbf`` / ``exp`` (PyJWT's
leeway): gateways keep NTP time, so seconds apart at most; an assertion lives 60 s, and a
larger leeway would mostly lengthen the time a captured one could be tried elsewhere."""
MAX_ASSERTION_CHARS: Final = 7000
"""The assertion travels in a request header; aiohttp refuses header fields over 8190
bytes, so a consent scope of many StudyInstanceUIDs must be narrowed first."""
MAX_REASON: Final = 500
"""As ``security.gate.MAX_REASON`` for a break-glass reason given locally."""
EMERGENCY: Final = "emergency"
PURPOSES_ACROSS: Final[tuple[str, ...]] = (*PURPOSES, EMERGENCY)

_PATIENT_TOKEN_RE = re.compile(r"[0-9a-f]{64}")
_METHOD_RE = re.compile(r"[A-Z]{3,7}")
_CONSENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REQUIRED: Final[list[str]] = [
    "iss",
    "aud",
    "sub",
    "iat",
    "nbf",
    "exp",
    "jti",
    "hospital",
    "purpose",
    "patient",
    "correlation_id",
    "req",
]


@dataclass(frozen=True, slots=True)
class RequestBinding:
    """The HTTP request an assertion authorizes: method, path, hash of the query."""

    method: str
    path: str
    query_sha256: str

    def as_claim(self) -> dict[str, str]:
        return {"method": self.method, "path": self.path, "query_sha256": self.query_sha256}


def request_binding(
    method: str, path: str, query: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> RequestBinding:
    """The binding of one request; both sides compute it the same way.

    ``path`` is the URL path as sent, without the query (the initiator:
    ``urlsplit(url).path``; the responder: ``request.rel_url.raw_path``); ``query`` the
    decoded pairs (repeated keys allowed; their order does not matter). Raises
    ``InvalidRequest`` for a method or path that cannot be bound.
    """
    upper = method.upper()
    if not _METHOD_RE.fullmatch(upper):
        raise InvalidRequest("assertion: not an HTTP method")
    if not path.startswith("/") or "?" in path or "#" in path or len(path) > 2048:
        raise InvalidRequest("assertion: the path must be an absolute path without a query")
    pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
    canonical = "&".join(
        sorted(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in pairs)
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return RequestBinding(method=upper, path=path, query_sha256=digest)


@dataclass(frozen=True, slots=True)
class ConsentClaim:
    """The consent grant an assertion rests on, as the responder needs it."""

    id: str
    scope: str | tuple[str, ...]
    """``"all"`` or StudyInstanceUIDs."""
    valid_until: datetime

    @classmethod
    def from_consent(cls, consent: Consent) -> ConsentClaim:
        """The claim of a stored grant."""
        return cls(id=consent.id, scope=consent.scope, valid_until=consent.valid_until)

    def as_claim(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope if self.scope == "all" else list(self.scope),
            "valid_until": int(self.valid_until.timestamp()),
        }


@dataclass(frozen=True, slots=True)
class Assertion:
    """A verified assertion: the responding gateway's view of who asks and under what grant."""

    issuer: str
    """The calling province."""
    audience: str
    subject: str
    """The calling gateway."""
    hospital: str
    clinician: str | None
    purpose: str
    patient_token: str
    consent: ConsentClaim | None
    break_glass_reason: str | None
    correlation_id: str
    binding: RequestBinding
    issued_at: datetime
    expires_at: datetime
    jti: str

    def allows_study(self, study_instance_uid: str, *, now: datetime) -> bool:
        """Whether the asserted grant covers this study at ``now``.

        A break-glass assertion covers every study of its patient (the responder audits it
        as such); a consent grant only while valid and within its scope. The responder's
        own rules (the gate) still apply on top.
        """
        if self.break_glass_reason is not None:
            return True
        if self.consent is None or now >= self.consent.valid_until:
            return False
        return self.consent.scope == "all" or study_instance_uid in self.consent.scope


class ReplayCache(Protocol):
    """Remembers the assertion ids already used, each until its expiry plus clock skew.

    :class:`IndexReplayCache` keeps them in the index, shared by every gateway process of
    the province (the gateway uses it). :class:`MemoryReplayCache` serves one process
    only: behind a load balancer a replay sent to another process would pass.
    """

    async def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """Record ``key``; False if it was already recorded and has not expired.

        ``expires_at`` and ``now`` are epoch seconds. Raises ``Unauthenticated`` when it
        cannot record (a bounded cache that is full): refusing is the safe answer.
        """
        ...


class MemoryReplayCache:
    """A bounded in-process :class:`ReplayCache` (single gateway process only)."""

    def __init__(self, *, capacity: int = 100_000, leeway_s: float = CLOCK_SKEW_S) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.leeway_s = leeway_s
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    async def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """See :meth:`ReplayCache.first_use`; raises ``Unauthenticated`` when full."""
        # No await in here: check and insert are atomic on the event loop.
        while self._heap and self._heap[0][0] < now:
            until, old = heapq.heappop(self._heap)
            if self._until.get(old) == until:
                del self._until[old]
        if key in self._until:
            return False
        if len(self._until) >= self.capacity:
            # Evicting a live id would reopen it to replay.
            raise Unauthenticated("too many assertions in flight to record another; retry")
        until = expires_at + self.leeway_s
        self._until[key] = until
        heapq.heappush(self._heap, (until, key))
        return True


class IndexReplayCache:
    """A :class:`ReplayCache` in the index (``federation_assertion_ids``), shared by every
    gateway process on it: the id's insert is the check, so a replay fails whichever
    process it reaches."""

    def __init__(self, state: SharedState, *, leeway_s: float = CLOCK_SKEW_S) -> None:
        self.state = state
        self.leeway_s = leeway_s

    async def first_use(self, key: str, *, expires_at: float, now: float) -> bool:
        """See :meth:`ReplayCache.first_use`; raises ``IndexUnavailable`` when the index
        cannot be written (the assertion is not accepted then either)."""
        return await self.state.first_use(
            key,
            expires_at=datetime.fromtimestamp(expires_at + self.leeway_s, UTC),
            now=datetime.fromtimestamp(now, UTC),
        )


def _check_patient_token(value: object) -> str | None:
    """The reason ``value`` is not a patient token, or None if it is one."""
    if not isinstance(value, str):
        return "the patient token is missing"
    if is_valid_resident_id(value.strip().upper()):
        return "the patient token is a raw national identity number; send the keyed token"
    if not _PATIENT_TOKEN_RE.fullmatch(value):
        return "the patient token is not a keyed patient token (64 lower-case hex digits)"
    return None


def _check_consent(value: object) -> ConsentClaim | str:
    """The consent claim, or the reason it is malformed."""
    if not isinstance(value, Mapping) or set(value) != {"id", "scope", "valid_until"}:
        return "consent must have exactly id, scope and valid_until"
    cid, scope, until = value["id"], value["scope"], value["valid_until"]
    if not isinstance(cid, str) or not _CONSENT_ID_RE.fullmatch(cid):
        return "consent id is malformed"
    if scope != "all" and not (
        isinstance(scope, list)
        and 0 < len(scope) <= MAX_SCOPE_STUDIES
        and all(isinstance(u, str) and is_uid(u) for u in scope)
    ):
        return 'consent scope must be "all" or a list of StudyInstanceUIDs'
    if not isinstance(until, int) or isinstance(until, bool):
        return "consent valid_until must be epoch seconds"
    return ConsentClaim(
        id=cid,
        scope="all" if scope == "all" else tuple(scope),
        valid_until=datetime.fromtimestamp(until, UTC),
    )


def _check_common(
    *,
    subject: object,
    hospital: object,
    clinician: object,
    purpose: object,
    break_glass_reason: object,
    correlation_id: object,
    has_consent: bool,
) -> str | None:
    """The reason these claims are not acceptable, or None."""
    if not isinstance(subject, str) or not 0 < len(subject) <= 128:
        return "sub must be 1-128 characters"
    if not isinstance(hospital, str) or not HOSPITAL_CODE.match(hospital):
        return "hospital must be an institution code such as H11010800028"
    if clinician is not None and (not isinstance(clinician, str) or not 0 < len(clinician) <= 128):
        return "clinician must be 1-128 characters"
    if purpose not in PURPOSES_ACROSS:
        return f"purpose must be one of {', '.join(PURPOSES_ACROSS)}"
    if break_glass_reason is not None and (
        not isinstance(break_glass_reason, str)
        or not break_glass_reason.strip()
        or len(break_glass_reason) > MAX_REASON
    ):
        return f"break_glass must be a reason of 1-{MAX_REASON} characters"
    # Shown to the patient in their access log, as a local caller's would be.
    for name, text in (("sub", subject), ("clinician", clinician),
                       ("break_glass", break_glass_reason)):  # fmt: skip
        problem = (
            shown_text_problem(text, multiline=name == "break_glass")
            if isinstance(text, str)
            else None
        )
        if problem is not None:
            return f"{name}: {problem}"
    if purpose == EMERGENCY and break_glass_reason is None:
        return "purpose emergency needs a break-glass reason"
    if not has_consent and break_glass_reason is None:
        return "either a consent grant or a break-glass reason is required"
    try:
        if not isinstance(correlation_id, str) or str(uuid.UUID(correlation_id)) != correlation_id:
            return "correlation_id must be a UUID in its canonical form"
    except ValueError:
        return "correlation_id must be a UUID in its canonical form"
    return None


def issue_assertion(
    key: Ed25519PrivateKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    hospital: str,
    purpose: str,
    patient_token: str,
    correlation_id: str,
    method: str,
    path: str,
    query: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    consent: ConsentClaim | None = None,
    clinician: str | None = None,
    break_glass_reason: str | None = None,
    validity_s: int = DEFAULT_VALIDITY_S,
    now: datetime | None = None,
) -> str:
    """A signed assertion authorizing one request from ``issuer`` to ``audience``.

    ``patient_token`` is ``PatientTokens.for_national_id(...)``; ``correlation_id`` a UUID
    the caller also writes into its own audit record. Raises ``InvalidRequest`` naming
    the claim that is wrong: provinces, hospital code, purpose, a raw national identity
    number (or anything but a keyed token) as the patient, neither consent nor
    break-glass reason, an expired consent, a validity outside 1-300 s, a request that
    cannot be bound, an assertion too large for a request header.
    """
    issued = now or datetime.now(UTC)
    if not is_province_code(issuer) or not is_province_code(audience) or issuer == audience:
        raise InvalidRequest("assertion: issuer and audience must be two province codes")
    if not 0 < validity_s <= MAX_VALIDITY_S:
        raise InvalidRequest(f"assertion: validity must be 1-{MAX_VALIDITY_S} s")
    problem = _check_patient_token(patient_token) or _check_common(
        subject=subject,
        hospital=hospital,
        clinician=clinician,
        purpose=purpose,
        break_glass_reason=break_glass_reason,
        correlation_id=correlation_id,
        has_consent=consent is not None,
    )
    if problem is not None:
        raise InvalidRequest(f"assertion: {problem}")
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "hospital": hospital,
        "purpose": purpose,
        "patient": patient_token,
        "correlation_id": correlation_id,
        "req": request_binding(method, path, query).as_claim(),
        "iat": int(issued.timestamp()),
        "nbf": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=validity_s)).timestamp()),
        "jti": str(uuid.uuid4()),
    }
    if consent is not None:
        checked = _check_consent(consent.as_claim())
        if isinstance(checked, str):
            raise InvalidRequest(f"assertion: {checked}")
        if consent.valid_until <= issued:
            raise InvalidRequest("assertion: the consent grant has expired")
        claims["consent"] = consent.as_claim()
    if clinician is not None:
        claims["clinician"] = clinician
    if break_glass_reason is not None:
        claims["break_glass"] = break_glass_reason
    token = jwt.encode(
        claims, key, algorithm=ALGORITHM, headers={"typ": ASSERTION_TYPE, "kid": issuer}
    )
    if len(token) > MAX_ASSERTION_CHARS:
        raise InvalidRequest(
            f"assertion: larger than {MAX_ASSERTION_CHARS} characters; narrow the consent scope"
        )
    return token


async def verify_assertion(
    token: str,
    *,
    registry: PeerRegistry,
    expected_audience: str,
    method: str,
    path: str,
    query: Mapping[str, str] | Iterable[tuple[str, str]],
    replay_cache: ReplayCache,
) -> Assertion:
    """Verify an assertion received by the responding gateway for this request, now.

    Checks, in this order: form and type, a known gateway peer as issuer; then PyJWT: its
    signature with that peer's registered key, the presence of the claims, not before
    ``iat`` / ``nbf``, not after ``exp`` (each with ``CLOCK_SKEW_S`` of leeway), the
    audience (exactly this province); then the claims' form, the validity window (at most
    300 s), the request binding (method, path, query), the patient token's form, the
    consent's expiry and, last, that its ``jti`` was not used before. The clock is the
    system's, as PyJWT reads it (it takes no "now").

    Raises ``Unauthenticated`` (401) with the reason: malformed assertion, unknown
    issuer, bad signature, wrong audience, window too long, not yet valid, expired,
    request binding mismatch, replayed; ``Forbidden`` (403) when the consent grant it
    rests on has expired.
    """
    if not isinstance(token, str) or len(token) > MAX_ASSERTION_CHARS:
        raise Unauthenticated("assertion: malformed")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise Unauthenticated("assertion: malformed") from None
    if header.get("alg") != ALGORITHM or header.get("typ") != ASSERTION_TYPE:
        raise Unauthenticated("assertion: malformed (not an EdDSA federation assertion)")
    issuer = unverified.get("iss")
    peer = registry.find(issuer) if isinstance(issuer, str) else None
    if peer is None or peer.kind != "gateway" or peer.public_key is None:
        raise Unauthenticated("assertion: unknown issuer")
    try:
        claims = jwt.decode(
            token,
            peer.public_key,
            algorithms=[ALGORITHM],
            audience=expected_audience,
            leeway=CLOCK_SKEW_S,
            options={
                # The issuer chose the key above; strict: "aud" is this province, not a
                # list that contains it.
                "verify_iss": False,
                "strict_aud": True,
                "require": _REQUIRED,
            },
        )
    except jwt.InvalidSignatureError:
        raise Unauthenticated("assertion: bad signature") from None
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("assertion: expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthenticated("assertion: not yet valid") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated("assertion: wrong audience") from None
    except jwt.InvalidTokenError:
        raise Unauthenticated("assertion: malformed") from None
    now = datetime.now(UTC)

    times = [claims["iat"], claims["nbf"], claims["exp"]]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in times):
        raise Unauthenticated("assertion: malformed (times must be integers)")
    iat, nbf, exp = (int(t) for t in times)
    consent: ConsentClaim | None = None
    if "consent" in claims:
        checked = _check_consent(claims["consent"])
        if isinstance(checked, str):
            raise Unauthenticated(f"assertion: malformed ({checked})")
        consent = checked
    problem = _check_common(
        subject=claims["sub"],
        hospital=claims["hospital"],
        clinician=claims.get("clinician"),
        purpose=claims["purpose"],
        break_glass_reason=claims.get("break_glass"),
        correlation_id=claims["correlation_id"],
        has_consent=consent is not None,
    )
    if problem is not None:
        raise Unauthenticated(f"assertion: malformed ({problem})")
    req = claims["req"]
    if (
        not isinstance(req, Mapping)
        or set(req) != {"method", "path", "query_sha256"}
        or not all(isinstance(v, str) for v in req.values())
        or not _SHA256_RE.fullmatch(req["query_sha256"])
    ):
        raise Unauthenticated("assertion: malformed (req)")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= 64:
        raise Unauthenticated("assertion: malformed (jti)")

    if exp <= iat or nbf < iat:
        raise Unauthenticated("assertion: malformed (validity window)")
    if exp - iat > MAX_VALIDITY_S:
        raise Unauthenticated(f"assertion: validity window longer than {MAX_VALIDITY_S} s")
    t = now.timestamp()

    try:
        binding = request_binding(method, path, query)
    except InvalidRequest:
        raise Unauthenticated("assertion: request binding mismatch") from None
    if binding.as_claim() != req:
        raise Unauthenticated("assertion: request binding mismatch")

    token_problem = _check_patient_token(claims["patient"])
    if token_problem is not None:
        raise Unauthenticated(f"assertion: malformed ({token_problem})")
    if consent is not None and claims.get("break_glass") is None and consent.valid_until <= now:
        raise Forbidden("assertion: the consent grant has expired")

    if not await replay_cache.first_use(f"{peer.province}:{jti}", expires_at=exp, now=t):
        raise Unauthenticated("assertion: replayed")
    return Assertion(
        issuer=peer.province,
        audience=expected_audience,
        subject=claims["sub"],
        hospital=claims["hospital"],
        clinician=claims.get("clinician"),
        purpose=claims["purpose"],
        patient_token=claims["patient"],
        consent=consent,
        break_glass_reason=claims.get("break_glass"),
        correlation_id=claims["correlation_id"],
        binding=binding,
        issued_at=datetime.fromtimestamp(iat, UTC),
        expires_at=datetime.fromtimestamp(exp, UTC),
        jti=jti,
    )
