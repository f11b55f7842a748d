"""Consent grants: a patient's authorization for one hospital to see their studies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.domain.qido import is_uid
from imaging_gateway.domain.text import check_shown_text
from imaging_gateway.errors import Forbidden, InvalidRequest, NotFound
from imaging_gateway.index.consents import ConsentRepository
from imaging_gateway.index.sql import CONSENT_PHI, consent_cells
from imaging_gateway.security.principals import HOSPITAL_CODE, Principal

PURPOSES = ("treatment", "referral", "second-opinion", "emergency-follow-up", "research")
MAX_SCOPE_STUDIES = 500


@dataclass(frozen=True, slots=True)
class Consent:
    """One grant as stored; ``scope`` is ``"all"`` or a tuple of StudyInstanceUIDs."""

    id: str
    national_id: str
    grantee_hospital: str
    grantee_clinician: str | None
    purpose: str
    scope: str | tuple[str, ...]
    valid_from: datetime
    valid_until: datetime
    evidence: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and self.valid_from <= now < self.valid_until

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "patient": {"national_id": self.national_id},
            "grantee_hospital": self.grantee_hospital,
            "grantee_clinician": self.grantee_clinician,
            "purpose": self.purpose,
            "scope": self.scope if self.scope == "all" else list(self.scope),
            "valid_from": self.valid_from.isoformat(),
            "valid_until": self.valid_until.isoformat(),
            "evidence": self.evidence,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "revoked_by": self.revoked_by,
            "active": self.active(now),
        }


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    """A validated ``POST /consents`` body."""

    national_id: str
    grantee_hospital: str
    grantee_clinician: str | None
    purpose: str
    scope: str | tuple[str, ...]
    valid_from: datetime
    valid_until: datetime
    evidence: str


def parse_consent_request(
    body: Mapping[str, Any], principal: Principal, *, now: datetime, max_days: int
) -> ConsentRequest:
    """Validate a consent body against who is asking.

    A hospital records grants to itself (the patient authorizes on site); an admin may
    record one for any hospital. Raises ``InvalidRequest`` naming the field that is wrong,
    ``Forbidden`` for a role that may not create grants.
    """
    principal.require("hospital", "admin")
    if not isinstance(body, Mapping):
        raise InvalidRequest("the body must be a JSON object")
    unknown = set(body) - {
        "national_id",
        "grantee_hospital",
        "grantee_clinician",
        "purpose",
        "scope",
        "valid_from",
        "valid_until",
        "evidence",
    }
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    national_id = _text(body, "national_id", 18).upper()
    if not is_valid_resident_id(national_id):
        raise InvalidRequest("national_id: not a valid GB 11643 identity number")
    grantee = body.get("grantee_hospital", principal.hospital)
    if not isinstance(grantee, str) or not HOSPITAL_CODE.match(grantee):
        raise InvalidRequest("grantee_hospital: an institution code such as H11010800028")
    if principal.role == "hospital" and grantee != principal.hospital:
        raise Forbidden("a hospital records grants to itself only")
    clinician = body.get("grantee_clinician")
    if clinician is not None and (not isinstance(clinician, str) or not 0 < len(clinician) <= 128):
        raise InvalidRequest("grantee_clinician: 1-128 characters")
    if clinician is not None:
        check_shown_text(clinician, "grantee_clinician")
    purpose = _text(body, "purpose", 64)
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose: one of {', '.join(PURPOSES)}")
    scope = _scope(body.get("scope", "all"))
    valid_from = _time(body, "valid_from", default=now)
    valid_until = _time(body, "valid_until", default=None)
    if valid_until <= valid_from:
        raise InvalidRequest("valid_until must be after valid_from")
    if valid_until - valid_from > timedelta(days=max_days):
        raise InvalidRequest(f"a grant may last at most {max_days} days")
    if valid_until <= now:
        raise InvalidRequest("valid_until is in the past")
    # Shown back to the patient (their consents, the QR page): no control or bidi
    # characters that would make it read otherwise than it is stored.
    evidence = _text(body, "evidence", 2000)
    return ConsentRequest(
        national_id=national_id,
        grantee_hospital=grantee,
        grantee_clinician=clinician,
        purpose=purpose,
        scope=scope,
        valid_from=valid_from,
        valid_until=valid_until,
        evidence=evidence,
    )


def _text(body: Mapping[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name}: required, a non-empty string")
    if len(value) > limit:
        raise InvalidRequest(f"{name}: at most {limit} characters")
    # Checked before stripping: str.strip() takes some controls (U+0085) as spaces.
    return check_shown_text(value, name).strip()


def _scope(value: Any) -> str | tuple[str, ...]:
    if value == "all":
        return "all"
    if (
        isinstance(value, list)
        and 0 < len(value) <= MAX_SCOPE_STUDIES
        and all(isinstance(v, str) and is_uid(v) for v in value)
    ):
        return tuple(dict.fromkeys(value))
    raise InvalidRequest(f'scope: "all" or a list of 1-{MAX_SCOPE_STUDIES} StudyInstanceUIDs')


def _time(body: Mapping[str, Any], name: str, *, default: datetime | None) -> datetime:
    value = body.get(name)
    if value is None:
        if default is None:
            raise InvalidRequest(f"{name}: required (ISO 8601 with a time zone)")
        return default
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidRequest(f"{name}: not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{name}: give a time zone, e.g. +08:00")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+14:00 and 9999-12-31T23:59-14:00 have no UTC datetime.
        raise InvalidRequest(f"{name}: out of range once converted to UTC") from None


class ConsentStore:
    """Consent grants in the index database.

    With ``phi`` (an encrypted index) a grant's national_id and evidence are sealed cells
    bound to the grant's id, and grants are found by the identity's blind index.
    """

    def __init__(self, engine: AsyncEngine, *, phi: PhiCodec | None = None) -> None:
        self._engine = engine
        self._phi = phi
        self._repo = ConsentRepository()

    async def create(
        self, conn: AsyncConnection, request: ConsentRequest, principal: Principal, now: datetime
    ) -> Consent:
        """Record a grant within the caller's transaction (with its audit record)."""
        row = {
            "id": str(uuid.uuid4()),
            "national_id": request.national_id,
            "grantee_hospital": request.grantee_hospital,
            "grantee_clinician": request.grantee_clinician,
            "purpose": request.purpose,
            "scope": "all" if request.scope == "all" else json.dumps(list(request.scope)),
            "valid_from": request.valid_from,
            "valid_until": request.valid_until,
            "evidence": request.evidence,
            "created_by": principal.subject,
            "created_at": now,
            "revoked_at": None,
            "revoked_by": None,
        }
        stored = dict(row)
        if self._phi is not None:
            stored.update(consent_cells(self._phi, str(row["id"]), stored))
        await self._repo.insert(conn, stored)
        return _consent(row)

    async def get(self, consent_id: str) -> Consent:
        """Raises ``NotFound``."""
        async with self._engine.connect() as conn:
            row = await self._repo.by_id(conn, consent_id)
        if row is None:
            raise NotFound("no such consent")
        return _consent(self._opened(row))

    async def list(
        self,
        *,
        national_id: str | None = None,
        grantee_hospital: str | None = None,
        limit: int = 200,
    ) -> list[Consent]:
        async with self._engine.connect() as conn:
            if national_id is not None and self._phi is not None:
                rows = await self._repo.newest(
                    conn,
                    patient_column="national_id_bidx",
                    patient=self._phi.national_id_index(national_id),
                    grantee_hospital=grantee_hospital,
                    limit=limit,
                )
            else:
                rows = await self._repo.newest(
                    conn,
                    patient_column=None if national_id is None else "national_id",
                    patient=national_id,
                    grantee_hospital=grantee_hospital,
                    limit=limit,
                )
        return [_consent(self._opened(r)) for r in rows]

    def _opened(self, row: Any) -> dict[str, Any]:
        """A stored row with its sealed cells opened. Raises as ``PhiCodec.open``."""
        out = dict(row)
        if self._phi is not None:
            for column in CONSENT_PHI:
                out[column] = self._phi.open(
                    row[column], column=f"consents.{column}", row=row["id"]
                )
        return out

    async def revoke(
        self, conn: AsyncConnection, consent: Consent, principal: Principal, now: datetime
    ) -> Consent:
        """Revoke within the caller's transaction; takes effect on the next request."""
        if consent.revoked_at is not None:
            return consent
        await self._repo.revoke(conn, consent.id, by=principal.subject, now=now)
        return Consent(**{**_fields(consent), "revoked_at": now, "revoked_by": principal.subject})


def may_manage(consent: Consent, principal: Principal) -> bool:
    """Who may see or revoke a grant: its patient, its grantee hospital, an admin."""
    if principal.role == "admin":
        return True
    if principal.role == "hospital":
        return consent.grantee_hospital == principal.hospital
    if principal.role == "patient":
        return consent.national_id == principal.national_id
    return False


def _fields(consent: Consent) -> dict[str, Any]:
    return {name: getattr(consent, name) for name in Consent.__slots__}


def _consent(row: dict[str, Any]) -> Consent:
    scope_text = row["scope"]
    scope: str | tuple[str, ...] = "all" if scope_text == "all" else tuple(json.loads(scope_text))
    return Consent(
        id=row["id"],
        national_id=row["national_id"],
        grantee_hospital=row["grantee_hospital"],
        grantee_clinician=row["grantee_clinician"],
        purpose=row["purpose"],
        scope=scope,
        valid_from=_utc(row["valid_from"]),
        valid_until=_utc(row["valid_until"]),
        evidence=row["evidence"],
        created_by=row["created_by"],
        created_at=_utc(row["created_at"]),
        revoked_at=_utc(row["revoked_at"]) if row["revoked_at"] else None,
        revoked_by=row["revoked_by"],
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
