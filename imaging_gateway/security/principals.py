"""Principals: who is calling, as established from a verified credential."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from imaging_gateway.errors import Forbidden, InvalidRequest

Role = Literal["admin", "hospital", "peer"]
ROLES: tuple[Role, ...] = ("admin", "hospital", "peer")
HOSPITAL_CODE = re.compile(r"^H\d{11}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``hospital`` is set for role ``hospital`` only."""

    subject: str
    role: Role
    province: str
    token_id: str
    hospital: str | None = None

    def require(self, *roles: Role) -> None:
        """Raises ``Forbidden`` unless the principal has one of ``roles``."""
        if self.role not in roles:
            raise Forbidden(f"this needs the role {' or '.join(roles)}")


def validate_claims(role: str, hospital: str | None) -> Role:
    """Check that a role and its hospital code fit together; raises ``InvalidRequest``."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}")
    if role == "hospital":
        if hospital is None or not HOSPITAL_CODE.match(hospital):
            raise InvalidRequest(
                "a hospital token needs the medical-insurance institution code, e.g. H11010800028"
            )
    elif hospital is not None:
        raise InvalidRequest("only hospital tokens carry an institution code")
    return role
