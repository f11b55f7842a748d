"""A request's caller and circumstances as the gate and the audit log see them, and the
headers that set them (purpose of use, break-glass reason), parsed for the API.

Apart from ``security.gate`` so that a handler can build the context it hands a service
without importing the gate itself (``handlers-call-services`` in pyproject.toml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imaging_gateway.domain.text import check_shown_text
from imaging_gateway.errors import InvalidRequest
from imaging_gateway.security.audit import AuditEvent
from imaging_gateway.security.principals import Principal

MAX_REASON = 500

@dataclass(frozen=True, slots=True)
class PeerGrant:
    """What a verified peer assertion allows: one patient (by token), a scope, a reason."""

    patient_token: str
    scope: str | tuple[str, ...]
    """``"all"`` or the StudyInstanceUIDs of the asserted consent grant."""
    hospital: str
    """The requesting hospital behind the peer gateway (for the audit record)."""
    clinician: str | None = None
    break_glass_reason: str | None = None
    """Set when the peer asserts emergency access instead of a consent grant."""
    purpose: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class AccessContext:
    """One request's caller and circumstances, as the gate and the audit log see them."""

    principal: Principal
    source: str | None = None
    """Client address."""
    purpose: str | None = None
    break_glass_reason: str | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    peer: PeerGrant | None = None
    """For a ``peer`` principal: what its verified assertion allows."""
    correlation_id: str | None = None
    """Shared by both provinces' audit records of one federated access."""

    def event(self, action: str, outcome: str, **kw: Any) -> AuditEvent:
        """An audit event of this request; ``kw`` sets or overrides AuditEvent fields.

        A federated access carries ``correlation=<uuid>`` at the end of ``detail``.
        """
        p = self.principal
        fields: dict[str, Any] = {
            "hospital": self.peer.hospital if self.peer is not None else p.hospital,
            "purpose": self.purpose,
            "break_glass_reason": (
                self.peer.break_glass_reason if self.peer is not None else self.break_glass_reason
            ),
            "source": self.source,
        }
        fields.update(kw)
        if self.correlation_id is not None:
            note = f"correlation={self.correlation_id}"
            detail = fields.get("detail")
            fields["detail"] = f"{detail} {note}" if detail else note
        return AuditEvent(subject=p.subject, role=p.role, action=action, outcome=outcome, **fields)


def parse_break_glass_reason(value: str | None) -> str | None:
    """The emergency reason from the request header (percent-encoded UTF-8 allowed).

    Raises ``InvalidRequest`` when present but empty or too long.
    """
    if value is None:
        return None
    from urllib.parse import unquote

    reason = unquote(value).strip()
    if not reason:
        raise InvalidRequest("the break-glass reason must not be empty")
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"the break-glass reason is limited to {MAX_REASON} characters")
    # The patient reads it in their access log: lines, but no other control characters.
    return check_shown_text(reason, "X-Break-Glass-Reason", multiline=True)


MAX_PURPOSE = 64
"""The audit log's purpose column."""


def parse_purpose_of_use(value: str | None) -> str | None:
    """The purpose of use from the ``X-Purpose-Of-Use`` header, as the audit log records it.

    Raises ``InvalidRequest`` naming the header when it is longer than ``MAX_PURPOSE`` or
    holds control or formatting characters (the patient reads it in their access log).
    """
    if value is None:
        return None
    if len(value) > MAX_PURPOSE:
        raise InvalidRequest(f"X-Purpose-Of-Use: at most {MAX_PURPOSE} characters")
    return check_shown_text(value, "X-Purpose-Of-Use")
