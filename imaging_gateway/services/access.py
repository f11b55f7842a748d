"""Authentication refusals: a request refused for its token is audited (flood-limited).

The API's middleware resolves the caller; what it refuses is recorded here, through the
gate (``Gate.refused_token``), so the province's audit log sees every refused caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from imaging_gateway.security.gate import Gate

__all__ = ["AccessService"]


@dataclass(frozen=True, slots=True)
class AccessService:
    """Refused tokens and roles for the API's middleware (one per app)."""

    gate: Gate

    async def refused_token(
        self,
        *,
        source: str | None,
        reason: str,
        role: str = "none",
        subject: str = "unauthenticated",
        action: str = "authenticate",
    ) -> None:
        """Audit a request refused for its bearer token (``Gate.refused_token``: at most
        one record per client address and reason a minute). Never raises."""
        await self.gate.refused_token(
            source=source, reason=reason, role=role, subject=subject, action=action
        )
