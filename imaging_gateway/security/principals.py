"""Principals: who is calling, as established from a verified credential."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from imaging_gateway.dicom.national_id import is_valid_resident_id
from imaging_gateway.errors import Forbidden, InvalidRequest

Role = Literal["admin", "hospital", "peer", "patient"]
ROLES: tuple[Role, ...] = ("admin", "hospital", "peer", "patient")
HOSPITAL_CODE = re.compile(r"^H\d{11}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``hospital`` is set for role ``hospital`` only; ``national_id`` (the GB 11643 number
    the patient proved, e.g. through the medical-insurance app) for role ``patient`` only.
    """

    subject: str
    role: Role
    province: str
    token_id: str
    hospital: str | None = None
    national_id: str | None = field(default=None, repr=False)

    def require(self, *roles: Role) -> None:
        """Raises ``Forbidden`` unless the principal has one of ``roles``."""
        if self.role not in roles:
            raise Forbidden(f"this needs the role {' or '.join(roles)}")


def validate_claims(role: str, hospital: str | None, national_id: str | None = None) -> Role:
    """Check that a role and its hospital code / national id fit; raises ``InvalidRequest``."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
    if role == "patient":
        if national_id is None or not is_valid_resident_id(national_id):
            raise InvalidRequest("a patient token needs a valid GB 11643 national identity")
    elif national_id is not None:
        raise InvalidRequest("only patient tokens carry a national identity")
    if role == "hospital":
        if hospital is None or not HOSPITAL_CODE.match(hospital):
            raise InvalidRequest(
                "a hospital token needs the medical-insurance institution code, e.g. H11010800028"
            )
    elif hospital is not None:
        raise InvalidRequest("only hospital tokens carry an institution code")
    return role
