"""Consent use cases: record, read, list and revoke a patient's grants; the patient's own
grants and access log; the province's break-glass report.

Every read and write goes through the gate (``Gate.record_consent`` and the rest), which
decides who may see a grant and writes the audit record: a grant names its patient by
national identity, so reading one is reading patient data.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from imaging_gateway.errors import InvalidRequest
from imaging_gateway.security.access import AccessContext
from imaging_gateway.security.consent import Consent, parse_consent_request
from imaging_gateway.security.gate import Gate

__all__ = ["Consent", "ConsentService"]


@dataclass(frozen=True, slots=True)
class ConsentService:
    """Consent grants for the API (one per app)."""

    gate: Gate
    max_days: int
    """``security.consent_max_days``: the longest grant a request may ask for."""

    async def record(self, ctx: AccessContext, body: Any) -> Consent:
        """Record the grant ``body`` (JSON) describes (hospital: to itself; admin: any).

        Raises ``InvalidRequest`` / ``Forbidden`` (``parse_consent_request``) and
        ``IndexUnavailable``.
        """
        request = parse_consent_request(
            body, ctx.principal, now=ctx.now, max_days=self.max_days
        )
        return await self.gate.record_consent(ctx, request)

    async def list(self, ctx: AccessContext, *, patient: str | None) -> builtins.list[Consent]:
        """Grants a hospital holds (optionally for one ``patient``), or any patient's for
        an admin (``patient`` required). Raises ``Forbidden`` (audited) for other roles,
        ``InvalidRequest`` for an admin without ``patient``."""
        await self.gate.refused_role(ctx, action="consent-list", roles=("hospital", "admin"))
        principal = ctx.principal
        if patient is not None:
            patient = patient.strip().upper()
        if principal.role == "admin" and not patient:
            raise InvalidRequest("give ?patient=<national identity>")
        return await self.gate.list_consents(
            ctx,
            national_id=patient,
            grantee_hospital=principal.hospital if principal.role == "hospital" else None,
        )

    async def get(self, ctx: AccessContext, consent_id: str) -> Consent:
        """One grant (``Gate.read_consent``); raises ``NotFound`` (audited)."""
        return await self.gate.read_consent(ctx, consent_id)

    async def revoke(self, ctx: AccessContext, consent_id: str) -> Consent:
        """Revoke a grant (``Gate.revoke_consent``); raises ``NotFound`` (audited)."""
        return await self.gate.revoke_consent(ctx, consent_id)

    async def mine(self, ctx: AccessContext) -> builtins.list[Consent]:
        """A patient's own grants, active and past; raises ``Forbidden`` (audited) for
        any other caller."""
        await self.gate.refused_role(ctx, action="consent-list", roles=("patient",))
        return await self.gate.list_consents(
            ctx, national_id=ctx.principal.national_id, grantee_hospital=None
        )

    async def access_log(
        self, ctx: AccessContext, *, before_seq: int | None
    ) -> builtins.list[dict[str, Any]]:
        """Who opened the patient's images, newest first (``Gate.access_log``)."""
        return await self.gate.access_log(ctx, before_seq=before_seq, limit=200)

    async def break_glass_report(
        self, ctx: AccessContext, *, days: int
    ) -> builtins.list[dict[str, Any]]:
        """Emergency accesses of the last ``days``, for the province's review (admins).

        Raises ``Forbidden`` for any other caller.
        """
        ctx.principal.require("admin")
        since: datetime = ctx.now - timedelta(days=days)
        return await self.gate.break_glass_report(since=since)
