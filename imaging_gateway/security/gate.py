"""The one exit for patient data: who may see which study, break-glass, and the audit record.

Deny by default. A hospital sees the studies it produced (``studies.hospital``); any other
study only under an active consent grant for its patient, or a break-glass window its
clinician opened with a stated reason. A patient sees their own studies. A peer (another
province's gateway, its signed assertion verified by ``api.federation``) sees the studies
of the one patient its assertion names by keyed token, within the asserted consent scope
(or all of them under an asserted break-glass reason). Admins see no patient data here.

Every decision is written to the audit log in the same transaction as the access (a
search's committed before it is answered), so an access whose record cannot be written
does not happen. A study that exists but may not be
seen is answered exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, final

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as IntegrityError_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from imaging_gateway.crypto.phi import PhiCodec
from imaging_gateway.domain.qido import QidoPage, QidoQuery, QidoResult
from imaging_gateway.domain.records import InstanceLocation, ParsedHeader
from imaging_gateway.errors import (
    Forbidden,
    IndexUnavailable,
    InvalidQuery,
    NotFound,
)
from imaging_gateway.index import qido
from imaging_gateway.index.break_glass import BreakGlassRepository
from imaging_gateway.index.federation_tokens import FederationTokenRepository
from imaging_gateway.index.schema import (
    break_glass,
    consents,
    federation_patient_tokens,
    patients,
    studies,
)
from imaging_gateway.index.shared_state import SharedState
from imaging_gateway.index.sql import IndexedObject, SqlIndex, stored_patient_key
from imaging_gateway.index.studies import StudyRepository
from imaging_gateway.index.unreachable import unreachable
from imaging_gateway.security.access import (
    MAX_PURPOSE,
    MAX_REASON,
    AccessContext,
    PeerGrant,
    parse_break_glass_reason,
    parse_purpose_of_use,
)
from imaging_gateway.security.audit import AuditEvent, AuditLog
from imaging_gateway.security.consent import Consent, ConsentRequest, ConsentStore, may_manage
from imaging_gateway.security.patient_tokens import PatientTokens
from imaging_gateway.security.principals import Principal

__all__ = [
    "MAX_PURPOSE",
    "MAX_REASON",
    "AccessContext",
    "FederationSubject",
    "Gate",
    "PeerGrant",
    "ReleasedInstances",
    "ReleasedRemoteStudy",
    "parse_break_glass_reason",
    "parse_purpose_of_use",
    "visibility",
]

log = logging.getLogger(__name__)

REFUSAL_WINDOW_S = 60.0
"""Refused tokens: at most one audit record per client address and reason in this window."""


@final
class _GateOnly:
    """The type of the one token that lets a released value be built: this module's."""

    __slots__ = ()


_GATE: Final = _GateOnly()


class _Released:
    """Refuses construction without the gate's token (``_GATE``)."""

    __slots__ = ()

    def _check(self, token: object) -> None:
        if token is not _GATE:
            raise TypeError(
                f"{type(self).__name__} is released by the gate only (security/gate.py)"
            )


@final
@dataclass(frozen=True, slots=True)
class ReleasedInstances(_Released):
    """Instances the gate released to one request, after checking and auditing it.

    The only value the retrieve service reads or streams patient data from (retrieve,
    metadata, frames, bulk data, rendered): built by ``Gate.locate`` alone, so code that
    reaches a store without asking the gate does not type-check, and raises
    ``TypeError`` if it tries anyway. Carries what the follow-up audit record of a
    retrieve that ends short needs (``Gate.retrieve_ended``).
    """

    instances: tuple[InstanceLocation, ...]
    ctx: AccessContext = field(repr=False)
    action: str
    patient_token: str | None = field(repr=False)
    gate_token: _GateOnly = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check(self.gate_token)

    def __iter__(self) -> Iterator[InstanceLocation]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def study_uid(self) -> str:
        return self.instances[0].StudyInstanceUID


@final
@dataclass(frozen=True, slots=True)
class ReleasedRemoteStudy(_Released):
    """A study another province holds, released to one request by ``Gate.release_remote``.

    What the federated relay and the federation cache take before they fetch or serve a
    byte of it (the same rule as ``ReleasedInstances``: only the gate builds one).
    """

    province: str
    StudyInstanceUID: str
    patient_token: str | None = field(repr=False)
    correlation_id: str
    ctx: AccessContext = field(repr=False)
    gate_token: _GateOnly = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check(self.gate_token)


@dataclass(frozen=True, slots=True)
class FederationSubject:
    """The patient a federated search is for, and the grant that lets peers be asked."""

    patient_token: str
    consent: Consent | None
    """The caller's active grant for the patient; None under break-glass."""
    break_glass_reason: str | None


class Gate:
    """Authorizes, filters and audits every read of patient data, and every store."""

    def __init__(
        self,
        engine: AsyncEngine,
        audit: AuditLog,
        tokens: PatientTokens,
        *,
        break_glass_minutes: int,
        search_engine: AsyncEngine | None = None,
        phi: PhiCodec | None = None,
    ) -> None:
        """``phi``: the index's PHI codec when its PHI columns are encrypted."""
        self.engine = engine
        self.phi = phi
        self.search_engine = search_engine or engine
        self.audit = audit
        self.tokens = tokens
        self.break_glass_window = timedelta(minutes=break_glass_minutes)
        self.state = SharedState(engine)
        """Refused-token counters, shared with the province's other gateway processes."""
        self.consents = ConsentStore(engine, phi=phi)
        """The grants, read and written here only (``record_consent`` and the rest)."""
        self._writes: set[asyncio.Future[None]] = set()
        """Follow-up records being written (held: the loop keeps weak references only)."""
        self._tokens_lock = asyncio.Lock()
        self._tokens_through = 0
        """Patient rows up to this id were given their token by this process or another."""

    # -- unauthenticated callers ---------------------------------------------------------

    async def refused_token(
        self,
        *,
        source: str | None,
        reason: str,
        role: str = "none",
        subject: str = "unauthenticated",
        action: str = "authenticate",
        note: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """Audit a request refused for its bearer token (missing, invalid, expired).

        At most one record per client address and reason per ``REFUSAL_WINDOW_S`` (the
        next one counts those in between), so a flood of bad requests cannot flood the
        log; counted in the index, so this holds across the province's gateway
        processes. ``now``: the time of the refusal (default: the clock). The caller is
        answered 401 whatever happens here: a record that cannot be written is logged,
        not raised.
        """
        at = now or datetime.now(UTC)
        try:
            # Counted in the index: the province's gateway processes share one window.
            since = await self.state.count_refusal(
                source, reason, now=at, window=timedelta(seconds=REFUSAL_WINDOW_S)
            )
        except IndexUnavailable:
            log.warning("a refused token could not be counted in the index")
            return
        if since is None:
            return
        detail = reason if not since else f"{reason} (and {since} more in the last minute)"
        if note is not None:
            # After the reason (which keys the flood limit), e.g. a correlation id.
            detail = f"{detail[:150]} {note}"
        event = AuditEvent(
            subject=subject,
            role=role,
            action=action,
            outcome="denied",
            source=source,
            detail=detail[:240],
        )
        try:
            await self.audit.record([event], at=at)
        except IndexUnavailable:
            log.warning("a refused token could not be recorded in the audit log")

    async def refused_input(self, ctx: AccessContext, *, action: str, reason: str) -> None:
        """Audit a request for patient data refused for malformed input, before any lookup.

        ``reason`` names the parameter, never its value (which may be anything, and
        longer than the log's columns). Recorded as ``denied`` with no study or patient:
        the request named none that could exist. Raises ``IndexUnavailable`` when the
        record cannot be written.
        """
        await self.audit.record([ctx.event(action, "denied", detail=reason[:240])], at=ctx.now)

    async def refused_role(self, ctx: AccessContext, *, action: str, roles: Sequence[str]) -> None:
        """Refuse (``Forbidden``) and audit a caller whose role is not one of ``roles``.

        Returns when it is. Raises ``IndexUnavailable`` when the refusal's record cannot
        be written.
        """
        if ctx.principal.role in roles:
            return
        await self.audit.record([ctx.event(action, "denied", detail="role")], at=ctx.now)
        raise Forbidden(f"this needs the role {' or '.join(roles)}")

    # -- consent grants -------------------------------------------------------------

    async def record_consent(self, ctx: AccessContext, request: ConsentRequest) -> Consent:
        """Record a patient's grant and its audit record in one transaction.

        ``request`` was checked against the caller (``parse_consent_request``). Raises
        ``IndexUnavailable`` when either cannot be written (then neither is).
        """
        with unreachable():
            async with self.engine.begin() as conn:
                consent = await self.consents.create(conn, request, ctx.principal, ctx.now)
                await self.audit.append(
                    conn,
                    [
                        ctx.event(
                            "consent-create",
                            "ok",
                            patient_token=self.tokens.for_national_id(consent.national_id),
                            detail=f"consent={consent.id} grantee={consent.grantee_hospital}",
                        )
                    ],
                    at=ctx.now,
                )
        return consent

    async def _managed_consent(self, ctx: AccessContext, consent_id: str, action: str) -> Consent:
        """The grant ``consent_id`` if the caller may see it (its patient, its grantee
        hospital, an admin); else ``NotFound``, audited (the same for one that does not
        exist)."""
        try:
            consent: Consent | None = await self.consents.get(consent_id)
        except NotFound:
            consent = None
        if consent is not None and may_manage(consent, ctx.principal):
            return consent
        token = None if consent is None else self.tokens.for_national_id(consent.national_id)
        await self.audit.record(
            [
                ctx.event(
                    action,
                    "denied" if consent is not None else "not-found",
                    patient_token=token,
                    detail="consent not the caller's" if consent is not None else None,
                )
            ],
            at=ctx.now,
        )
        raise NotFound("no such consent")

    async def read_consent(self, ctx: AccessContext, consent_id: str) -> Consent:
        """One grant, to its patient, its grantee hospital or an admin; audited.

        Raises ``NotFound`` (audited) for any other caller and for an unknown id.
        """
        consent = await self._managed_consent(ctx, consent_id, "consent-read")
        if ctx.principal.role != "patient":  # the patient reading their own grant: no record
            await self.audit.record(
                [
                    ctx.event(
                        "consent-read",
                        "ok",
                        patient_token=self.tokens.for_national_id(consent.national_id),
                        detail=f"consent={consent.id}",
                    )
                ],
                at=ctx.now,
            )
        return consent

    async def list_consents(
        self, ctx: AccessContext, *, national_id: str | None, grantee_hospital: str | None
    ) -> list[Consent]:
        """Grants (of one patient, to one hospital), newest first, audited.

        One ``ok`` record per patient the answer names; a list naming a patient that
        comes back empty is recorded ``denied`` (the caller holds no grant of theirs).
        The patient listing their own grants leaves no record. Raises
        ``IndexUnavailable``.
        """
        found = await self.consents.list(
            national_id=national_id, grantee_hospital=grantee_hospital
        )
        if ctx.principal.role == "patient":
            return found
        detail = f"results={len(found)}"
        if found:
            tokens = sorted({self.tokens.for_national_id(c.national_id) for c in found})
            events = [
                ctx.event("consent-list", "ok", patient_token=t, detail=detail) for t in tokens
            ]
        elif national_id is not None:
            events = [
                ctx.event(
                    "consent-list",
                    "denied",
                    patient_token=self.tokens.for_national_id(national_id),
                    detail=detail,
                )
            ]
        else:
            events = [ctx.event("consent-list", "ok", detail=detail)]
        await self.audit.record(events, at=ctx.now)
        return found

    async def revoke_consent(self, ctx: AccessContext, consent_id: str) -> Consent:
        """Revoke a grant (its patient, its grantee hospital or an admin), audited in the
        same transaction; effective on the next request. Raises ``NotFound`` (audited)
        for any other caller and for an unknown id, ``IndexUnavailable``.
        """
        consent = await self._managed_consent(ctx, consent_id, "consent-revoke")
        with unreachable():
            async with self.engine.begin() as conn:
                revoked = await self.consents.revoke(conn, consent, ctx.principal, ctx.now)
                await self.audit.append(
                    conn,
                    [
                        ctx.event(
                            "consent-revoke",
                            "ok",
                            patient_token=self.tokens.for_national_id(consent.national_id),
                            detail=f"consent={consent.id}",
                        )
                    ],
                    at=ctx.now,
                )
        return revoked

    async def access_log(
        self, ctx: AccessContext, *, before_seq: int | None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """The patient's own access log (``AuditLog.for_patient``); patients only.

        Raises ``Forbidden`` (audited) for any other caller.
        """
        await self.refused_role(ctx, action="access-log", roles=("patient",))
        national_id = ctx.principal.national_id
        assert national_id is not None  # validate_claims guarantees it
        return await self.audit.for_patient(
            self.tokens.for_national_id(national_id), limit=limit, before_seq=before_seq
        )

    # -- the rule ------------------------------------------------------------------

    def visible(self, principal: Principal, now: datetime) -> ColumnElement[bool]:
        """A condition on ``studies`` rows true exactly for the studies ``principal`` may see.

        The values are bound into the condition; ``visibility`` gives the same rule with
        them apart, which lets SQLAlchemy reuse the compiled statement.
        """
        sealed = self.phi is not None
        if principal.role == "hospital" and principal.hospital:
            return _hospital_rule(
                sa.bindparam(_HOSPITAL, principal.hospital, type_=_TEXT),
                sa.bindparam(_SUBJECT, principal.subject, type_=_TEXT),
                sa.bindparam(_NOW, now, type_=_TIME),
                sealed=sealed,
            )
        if principal.role == "patient" and principal.national_id:
            _, values = visibility(principal, now, phi=self.phi)
            identity = sa.bindparam(_NATIONAL_ID, values[_NATIONAL_ID], type_=_TEXT)
            return _patient_rule(identity, sealed=sealed)
        return sa.false()

    # -- the encrypted index's cells the gate needs in the clear -----------------------

    def _national_id(self, cell: str | None, stored_key: str) -> str | None:
        """A patient row's national identity (opened in an encrypted index)."""
        if self.phi is None:
            return cell
        return self.phi.open(cell, column="patients.national_id", row=stored_key)

    def _patient_id_is(self, value: str) -> ColumnElement[bool]:
        """The condition that a patient row has this PatientID."""
        if self.phi is None:
            return patients.c.PatientID == value
        return patients.c.PatientID_bidx == self.phi.blind(value, column="patients.PatientID")

    # -- federation ------------------------------------------------------------------

    async def refresh_patient_tokens(self, *, batch: int = 5000) -> int:
        """Add the keyed token of every patient indexed since the last refresh.

        Incremental by patient row id: when no patient was added since this process last
        looked, a refresh is one read of the newest patient row id (every peer request
        makes one). Only patients with a national identity get a token (a local key
        never matches another province). Returns the number of rows added; raises
        ``IndexUnavailable`` when the index cannot be written.
        """
        added = 0
        with unreachable():
            async with self.engine.connect() as conn:
                newest = await FederationTokenRepository.newest_patient(conn)
        if newest <= self._tokens_through:
            return 0
        async with self._tokens_lock:
            try:
                while True:
                    async with self.engine.begin() as conn:
                        last = await FederationTokenRepository.newest_tokened(conn)
                        rows = await FederationTokenRepository.patients_after(
                            conn, last or 0, limit=batch
                        )
                        if not rows:
                            self._tokens_through = max(self._tokens_through, last or 0)
                            return added
                        await FederationTokenRepository.insert(
                            conn,
                            [
                                {
                                    "patient_id": r[0],
                                    "patient_key": r[1],
                                    # Never the identity itself in an encrypted index.
                                    "national_id": r[2] if self.phi is None else r[3],
                                    # A row without a national identity holds a token that
                                    # no peer can send (for_national_id never makes it).
                                    "token": self.tokens.for_patient(
                                        self._national_id(r[2], r[1]), r[1]
                                    ),
                                }
                                for r in rows
                            ],
                        )
                        added += len(rows)
                    self._tokens_through = max(self._tokens_through, rows[-1][0])
                    if len(rows) < batch:
                        return added
            except IntegrityError_:
                # Another gateway process of this province added them first.
                return added
            except (SQLAlchemyError, OSError) as exc:
                raise IndexUnavailable(f"index unreachable: {exc.__class__.__name__}") from exc

    async def federation_subject(
        self, ctx: AccessContext, query: QidoQuery, consents_store: ConsentStore
    ) -> FederationSubject | str:
        """The patient a federated search names and the grant to ask peers under, audited.

        The patient is named by PatientID (and IssuerOfPatientID where given) as a single
        value, as this gateway's index knows them; their national identity gives the
        keyed token peers match on. Peers may be asked only under the caller's active
        consent grant for that person (to the caller's hospital, and clinician where the
        grant names one), or with a break-glass reason. Returns the reason, a short text
        without patient data, when peers are not to be asked. Raises
        ``IndexUnavailable`` when the index cannot be read or the record not written.
        """
        p = ctx.principal
        if p.role != "hospital" or not p.hospital:
            return "federated search needs a hospital caller"
        single = {
            m.keyword: m.value
            for m in query.matches
            if m.keyword in ("PatientID", "IssuerOfPatientID") and m.kind == "single"
        }
        if "PatientID" not in single:
            return "federated search needs PatientID as a single value"
        with unreachable():
            async with self.engine.connect() as conn:
                found = await StudyRepository.patients_where(
                    conn,
                    self._patient_id_is(single["PatientID"]),
                    issuer=single.get("IssuerOfPatientID"),
                )
                ids = {self._national_id(r[1], r[2]) for r in found}
        refused = "no consent grant for this patient here; peers not asked"
        if len(ids) != 1 or None in ids:
            # The same answer as for a patient without a grant: a search reveals nothing
            # about who is indexed here.
            return refused
        national_id = next(iter(ids))
        assert national_id is not None
        token = self.tokens.for_national_id(national_id)
        grant: Consent | None = None
        for c in await consents_store.list(national_id=national_id, grantee_hospital=p.hospital):
            if c.active(ctx.now) and c.grantee_clinician in (None, p.subject):
                if grant is None or c.valid_until > grant.valid_until:
                    grant = c
        if grant is None and ctx.break_glass_reason is None:
            await self.audit.record(
                [
                    ctx.event(
                        "federated-search", "denied", patient_token=token, detail="no consent"
                    )
                ],
                at=ctx.now,
            )
            return refused
        detail = f"consent={grant.id}" if grant is not None else "break-glass"
        await self.audit.record(
            [ctx.event("federated-search", "ok", patient_token=token, detail=detail)], at=ctx.now
        )
        return FederationSubject(token, grant, None if grant else ctx.break_glass_reason)

    async def release_remote(
        self,
        ctx: AccessContext,
        *,
        province: str,
        study_uid: str,
        found: bool,
        patient_token: str | None,
        consent_id: str | None,
    ) -> ReleasedRemoteStudy:
        """Release a study another province holds to the caller, audited.

        ``found``: whether the caller's hospital found the study by a federated search
        (unexpired), whose patient token and consent grant (None under break-glass) are
        given; that grant is checked again now. ``ctx`` carries the retrieve's
        correlation id. Raises ``NotFound`` (never found by a search) and ``Forbidden``
        (the grant was revoked or has expired), both audited, and ``IndexUnavailable``.
        """
        if not found:
            await self.audit.record(
                [ctx.event("federated-retrieve", "not-found", StudyInstanceUID=study_uid,
                           detail=f"province={province}")],
                at=ctx.now,
            )  # fmt: skip
            raise NotFound("no such study, series or instance (search with federated=true first)")
        if consent_id is not None:
            try:
                grant: Consent | None = await self.consents.get(consent_id)
            except NotFound:
                grant = None
            if grant is None or not grant.active(ctx.now):
                await self.audit.record(
                    [ctx.event("federated-retrieve", "denied", patient_token=patient_token,
                               StudyInstanceUID=study_uid, detail="consent no longer active")],
                    at=ctx.now,
                )  # fmt: skip
                raise Forbidden("the consent grant for this patient is no longer active")
        await self.audit.record(
            [ctx.event("federated-retrieve", "ok", patient_token=patient_token,
                       StudyInstanceUID=study_uid, detail=f"province={province}")],
            at=ctx.now,
        )  # fmt: skip
        return ReleasedRemoteStudy(
            province, study_uid, patient_token, ctx.correlation_id or "", ctx, _GATE
        )

    # -- retrieve --------------------------------------------------------------------

    async def locate(
        self,
        ctx: AccessContext,
        *,
        action: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> ReleasedInstances:
        """The instances of a study / series / instance the caller may read, audited.

        With a break-glass reason, a hospital clinician opens the study's patient for the
        configured window first. Raises ``NotFound`` (the same for "does not exist" and
        "may not be seen", and audited either way).
        """
        if ctx.peer is not None:
            await self.refresh_patient_tokens()
        async with self.engine.begin() as conn:
            rows = await self._locations(conn, ctx, study_uid, series_uid, sop_uid)
            if not rows and ctx.break_glass_reason is not None:
                if await self._open_break_glass(conn, ctx, study_uid):
                    rows = await self._locations(conn, ctx, study_uid, series_uid, sop_uid)
            if rows:
                token = self.tokens.for_patient(rows[0].national_id, rows[0].patient_key)
                await self.audit.append(
                    conn,
                    [
                        ctx.event(
                            action,
                            "ok",
                            patient_token=token,
                            StudyInstanceUID=study_uid,
                            detail=f"instances={len(rows)}",
                        )
                    ],
                    at=ctx.now,
                )
                return ReleasedInstances(
                    tuple(r.location for r in rows), ctx, action, token, _GATE
                )
            exists = await self._study_patient(conn, study_uid)
            outcome = "denied" if exists is not None else "not-found"
            hidden = self.tokens.for_patient(*exists) if exists is not None else None
            await self.audit.append(
                conn,
                [ctx.event(action, outcome, patient_token=hidden, StudyInstanceUID=study_uid)],
                at=ctx.now,
            )
        raise NotFound("no such study, series or instance")

    async def retrieve_ended(
        self,
        released: ReleasedInstances | ReleasedRemoteStudy,
        *,
        outcome: str,
        bytes_sent: int,
    ) -> None:
        """The follow-up record of a released retrieve that ended short of its body.

        ``Gate.locate`` recorded the access ``ok`` before the first byte went out; this
        says how it ended (``outcome``: ``aborted`` when the gateway cut it, e.g. a store
        failing mid-body; ``client-gone`` when the client closed the connection) and how
        many bytes were sent. The response is over, so a record that cannot be written is
        logged, not raised. The write runs as its own task: a server that cancels the
        handler of a connection the client closed (``handler_cancellation``) cancels the
        wait, never the record.
        """
        if isinstance(released, ReleasedRemoteStudy):
            # Its ctx carries the retrieve's correlation id (both provinces' records).
            action, study_uid = "federated-retrieve", released.StudyInstanceUID
            ctx = released.ctx
        else:
            action, study_uid, ctx = released.action, released.study_uid, released.ctx
        event = ctx.event(
            action,
            "error",
            patient_token=released.patient_token,
            StudyInstanceUID=study_uid,
            detail=f"ended={outcome} bytes={bytes_sent}",
        )
        write = asyncio.ensure_future(self._record_quietly(event))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        await asyncio.shield(write)

    async def _record_quietly(self, event: AuditEvent) -> None:
        try:
            await self.audit.record([event], at=datetime.now(UTC))
        except IndexUnavailable:
            log.warning("the end of a cut-short retrieve could not be recorded")

    async def _locations(
        self,
        conn: AsyncConnection,
        ctx: AccessContext,
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
    ) -> list[_Located]:
        visible, values = visibility(ctx.principal, ctx.now, peer=ctx.peer, phi=self.phi)
        found = await StudyRepository.locations(
            conn, visible, values, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid
        )
        out: list[_Located] = []
        seen: set[str] = set()
        for r in found:
            # Two objects claiming one SOPInstanceUID (see conflicts): serve the first indexed.
            if r["SOPInstanceUID"] in seen:
                continue
            seen.add(r["SOPInstanceUID"])
            out.append(
                _Located(
                    InstanceLocation(
                        StudyInstanceUID=r["StudyInstanceUID"],
                        SeriesInstanceUID=r["SeriesInstanceUID"],
                        SOPInstanceUID=r["SOPInstanceUID"],
                        SOPClassUID=r["SOPClassUID"],
                        TransferSyntaxUID=r["TransferSyntaxUID"],
                        store=r["store"],
                        key=r["key"],
                        etag=r["etag"],
                        size=r["size"],
                        header_bytes=r["header_bytes"],
                        Rows=r["Rows"],
                        Columns=r["Columns"],
                        NumberOfFrames=r["NumberOfFrames"],
                        InstanceNumber=r["InstanceNumber"],
                    ),
                    self._national_id(r["national_id"], r["patient_key"]),
                    r["patient_key"],
                )
            )
        return out

    async def _study_patient(
        self, conn: AsyncConnection, study_uid: str
    ) -> tuple[str | None, str] | None:
        row = await StudyRepository.study_patient(conn, study_uid)
        return None if row is None else (self._national_id(row[1], row[2]), row[2])

    async def _open_break_glass(
        self, conn: AsyncConnection, ctx: AccessContext, study_uid: str
    ) -> bool:
        p = ctx.principal
        if p.role != "hospital" or not p.hospital or ctx.break_glass_reason is None:
            raise Forbidden("only a hospital clinician can open emergency access")
        target = await StudyRepository.study_patient(conn, study_uid)
        if target is None:
            return False
        patient = (target[0], self._national_id(target[1], target[2]), target[2])
        await self._open_window(conn, ctx, patient=patient, study_uid=study_uid)
        return True

    async def _open_window(
        self, conn: AsyncConnection, ctx: AccessContext, *, patient: Any, study_uid: str | None
    ) -> None:
        """Record an emergency window for ``patient`` (row id, national id, patient key)."""
        p = ctx.principal
        await BreakGlassRepository.open_window(
            conn,
            window_id=str(uuid.uuid4()),
            subject=p.subject,
            hospital=p.hospital,
            patient_id=patient[0],
            study_uid=study_uid,
            reason=ctx.break_glass_reason,
            opened_at=ctx.now,
            expires_at=ctx.now + self.break_glass_window,
        )
        await self.audit.append(
            conn,
            [
                ctx.event(
                    "break-glass",
                    "ok",
                    patient_token=self.tokens.for_patient(patient[1], patient[2]),
                    StudyInstanceUID=study_uid,
                    detail=f"window={int(self.break_glass_window.total_seconds())}s"
                    + ("" if study_uid else " from=search"),
                )
            ],
            at=ctx.now,
        )
        log.warning("break-glass access opened by %s of %s", p.subject, p.hospital)

    # -- search ----------------------------------------------------------------------

    async def search(self, ctx: AccessContext, query: QidoQuery, *, max_results: int) -> QidoPage:
        """A QIDO-RS search over the studies the caller may see, audited.

        The search reads on a connection of the index's search engine, then its audit
        records are committed on that connection, or, while other records of this
        process are being written, group-committed with them (``AuditLog.record_if_idle``,
        ``AuditLog.record``): nothing is returned before they are committed. Raises
        ``InvalidQuery`` / ``QueryTooBroad`` from the index search and
        ``IndexUnavailable`` when the audit record cannot be written (then nothing is
        returned).
        """
        if ctx.break_glass_reason is not None:
            await self._open_break_glass_for_search(ctx, query)
        if ctx.peer is not None:
            await self.refresh_patient_tokens()
        visible, values = visibility(ctx.principal, ctx.now, peer=ctx.peer, phi=self.phi)
        # Pooled PostgreSQL search connections are not pinged before use (a round trip
        # per search): one the server closed fails the read-only search statement, which
        # then runs once more on a new one.
        for attempt in (1, 2):
            async with self.search_engine.connect() as conn:
                try:
                    page = await qido.search_in(
                        conn,
                        query,
                        visible=visible,
                        params=values,
                        max_results=max_results,
                        phi=self.phi,
                    )
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
                    continue
                events = self._search_events(ctx, level=query.level, results=page.results)
                if await self.audit.record_if_idle(conn, events, at=ctx.now):
                    return page
            # Other records are being written: join their group commit, the search's
            # connection given back first (the writer may need one of the same pool).
            await self.audit.record(events, at=ctx.now)
            return page
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open_break_glass_for_search(self, ctx: AccessContext, query: QidoQuery) -> None:
        """Open the emergency window for the one patient a search names by PatientID.

        A radiologist in an emergency rarely knows another hospital's StudyInstanceUID;
        the patient's PatientID (with IssuerOfPatientID where IDs repeat across issuers)
        names one patient, whose studies, under every PatientID of the same national
        identity, open for the configured window. Raises ``Forbidden`` for a caller
        other than a hospital clinician and ``InvalidQuery`` when the search does not
        name exactly one patient; both are audited. A PatientID of no patient opens
        nothing (the search then finds nothing, as without the header).
        """
        p = ctx.principal
        if p.role != "hospital" or not p.hospital:
            await self.audit.record(
                [ctx.event("break-glass", "denied", detail="not a hospital clinician")],
                at=ctx.now,
            )
            raise Forbidden("only a hospital clinician can open emergency access")
        single = {
            m.keyword: m.value
            for m in query.matches
            if m.keyword in ("PatientID", "IssuerOfPatientID") and m.kind == "single"
        }
        async with self.engine.begin() as conn:
            rows = (
                await StudyRepository.patients_where(
                    conn,
                    self._patient_id_is(single["PatientID"]),
                    issuer=single.get("IssuerOfPatientID"),
                )
                if "PatientID" in single
                else []
            )
            # One person: one identity (its blind index in an encrypted index), or one row.
            people = {(r[1] if self.phi is None else r[3]) or f"row:{r[0]}" for r in rows}
            if len(people) == 1:
                first = rows[0]
                patient = (first[0], self._national_id(first[1], first[2]), first[2])
                await self._open_window(conn, ctx, patient=patient, study_uid=None)
                return
        if not rows and "PatientID" in single:
            return
        await self.audit.record(
            [ctx.event("break-glass", "denied", detail="search must name one patient")],
            at=ctx.now,
        )
        raise InvalidQuery(
            "emergency access from a search needs one patient: PatientID as a single value"
            " (add IssuerOfPatientID where several issuers use the same ID)"
        )

    def _search_events(
        self, ctx: AccessContext, *, level: str, results: Sequence[QidoResult]
    ) -> list[AuditEvent]:
        """The records of a search: one per patient it returned (one when it returned none)."""
        tokens: Sequence[str | None] = sorted(
            {self.tokens.for_patient(r.national_id, r.patient_key) for r in results}
        ) or [None]
        detail = f"level={level} results={len(results)}"
        return [ctx.event("search", "ok", patient_token=t, detail=detail) for t in tokens]

    async def break_glass_report(
        self, *, since: datetime, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Emergency accesses opened since ``since`` (newest first), for the province's review."""
        async with self.engine.connect() as conn:
            rows = await BreakGlassRepository.opened_since(conn, since, limit=limit)
        return [
            {
                "id": r["id"],
                "subject": r["subject"],
                "hospital": r["hospital"],
                "patient_token": self.tokens.for_patient(
                    self._national_id(r["national_id"], r["patient_key"]), r["patient_key"]
                ),
                "StudyInstanceUID": r["StudyInstanceUID"],
                "reason": r["reason"],
                "opened_at": _iso(r["opened_at"]),
                "expires_at": _iso(r["expires_at"]),
            }
            for r in rows
        ]

    # -- store (STOW-RS) ----------------------------------------------------------------

    async def authorize_store(
        self,
        ctx: AccessContext,
        *,
        store_hospitals: Collection[str] | None,
        study_uid: str | None,
    ) -> None:
        """Only a hospital stores (it produces studies); patients, admins and peers do not.

        ``store_hospitals`` are the hospitals a sync of the write store can make producers
        (its ``hospital``, or the hospitals of its key prefixes); None when any can (the
        objects' institution codes decide). Only those hospitals may store there.
        Raises ``Forbidden`` (audited as denied) otherwise.
        """
        p = ctx.principal
        if p.role != "hospital" or not p.hospital:
            message = "storing instances needs a hospital token"
        elif store_hospitals is not None and p.hospital not in store_hospitals:
            message = "this gateway's write store holds other hospitals' objects only"
        else:
            return
        await self.audit.record(
            [ctx.event("store", "denied", StudyInstanceUID=study_uid, detail="role")], at=ctx.now
        )
        raise Forbidden(message)

    async def check_store(
        self, ctx: AccessContext, header: ParsedHeader, *, store: str
    ) -> StoreCheck:
        """Whether the caller may store ``header``'s instance, before any byte is written.

        A study, series, patient record or SOP Instance of another producer refuses the
        instance: a hospital neither adds to nor overwrites what it did not produce. Raises
        ``IndexUnavailable`` when the index cannot be read.
        """
        with unreachable():
            async with self.engine.connect() as conn:
                return await _store_verdict(
                    conn, ctx.principal, header, store=store, phi=self.phi
                )

    async def record_store(
        self,
        ctx: AccessContext,
        index: SqlIndex,
        *,
        store: str,
        province: str,
        item: IndexedObject,
        note: str,
    ) -> StoreVerdict:
        """Index a stored instance for the caller's hospital and audit it, in one transaction.

        The verdict is checked again after the upsert, in the same transaction, so a study
        another hospital created meanwhile is not taken over (the upsert keeps an existing
        study's producer and series' study); anything but ``new`` rolls back and is
        returned, and nothing is indexed or audited. Returns ``new`` when the instance was
        indexed. Raises ``IndexUnavailable`` when the index write or the audit record
        fails; then nothing is indexed either.
        """
        p = ctx.principal
        h = item.header
        try:
            async with self.engine.begin() as conn:
                await index.index_stored(
                    conn, store=store, province=province, hospital=p.hospital, items=[item]
                )
                check = await _store_verdict(
                    conn, p, h, store=store, own=(store, item.key), phi=self.phi
                )
                if check.verdict != "new":
                    raise _RolledBack(check.verdict)
                token = self.tokens.for_patient(
                    h.patient.national_id, stored_patient_key(h, store, self.phi)
                )
                await self.audit.append(
                    conn,
                    [
                        ctx.event(
                            "store",
                            "ok",
                            patient_token=token,
                            StudyInstanceUID=h.study.StudyInstanceUID,
                            detail=f"result={note}",
                        )
                    ],
                    at=ctx.now,
                )
        except _RolledBack as rolled_back:
            return rolled_back.verdict
        except (SQLAlchemyError, OSError) as exc:
            raise IndexUnavailable(f"index unreachable: {exc.__class__.__name__}") from exc
        return "new"

    async def audit_store(
        self, ctx: AccessContext, *, store: str, attempts: Sequence[StoreAttempt]
    ) -> None:
        """Record the instances of a store request that were not indexed by it.

        One record per study, patient and outcome, with the count of each label in
        ``detail`` (e.g. ``A901=2 identical=1``). Raises ``IndexUnavailable`` when the
        records cannot be written.
        """
        groups: dict[tuple[str | None, str | None, str], dict[str, int]] = {}
        for a in attempts:
            h = a.header
            token = (
                self.tokens.for_patient(
                    h.patient.national_id, stored_patient_key(h, store, self.phi)
                )
                if h is not None
                else None
            )
            study = h.study.StudyInstanceUID if h is not None else None
            counts = groups.setdefault((study, token, a.outcome), {})
            counts[a.label] = counts.get(a.label, 0) + 1
        events = [
            ctx.event(
                "store",
                outcome,
                patient_token=token,
                StudyInstanceUID=study,
                detail=" ".join(f"{label}={n}" for label, n in sorted(counts.items())),
            )
            for (study, token, outcome), counts in groups.items()
        ]
        await self.audit.record(events, at=ctx.now)


# -- the rule ---------------------------------------------------------------------------
#
# Built once: new aliases per request made SQLAlchemy rebuild their column collections and
# the statement's cache key (about 0.8 ms a search). The principal's values and the time
# are bind parameters, given when the statement runs (``visibility``).

_HOSPITAL = "gate_hospital"
_SUBJECT = "gate_subject"
_NATIONAL_ID = "gate_national_id"
_NOW = "gate_now"
_TEXT = sa.String()
_TIME = sa.DateTime(timezone=True)

_consent_patient = patients.alias("consent_patient")
_bg_patient = patients.alias("bg_patient")
_bg_same = patients.alias("bg_same")


def _identity(table: sa.FromClause, *, sealed: bool) -> sa.ColumnElement[Any]:
    """The column that says who a patient or consent row is about: the national identity,
    or in an encrypted index its blind index (equal for equal identities, across tables)."""
    return table.c.national_id_bidx if sealed else table.c.national_id


def _hospital_rule(
    hospital: ColumnElement[str],
    subject: ColumnElement[str],
    now: ColumnElement[datetime],
    *,
    sealed: bool = False,
) -> ColumnElement[bool]:
    """A hospital's studies: its own, consented ones, and break-glass windows it opened."""
    return sa.or_(
        studies.c.hospital == hospital,
        _consented(hospital, subject, now, sealed=sealed),
        _broken_glass(hospital, now, sealed=sealed),
    )


def _consented(
    hospital: ColumnElement[str],
    subject: ColumnElement[str],
    now: ColumnElement[datetime],
    *,
    sealed: bool,
) -> ColumnElement[bool]:
    patient = _consent_patient
    clinician_ok = sa.or_(
        consents.c.grantee_clinician.is_(None),
        consents.c.grantee_clinician == subject,
    )
    # scope is "all" or a JSON list of UIDs; UIDs hold only digits and dots, so a LIKE
    # on the quoted UID cannot match anything else.
    in_scope = sa.or_(
        consents.c.scope == "all",
        consents.c.scope.like(sa.literal('%"') + studies.c.StudyInstanceUID + '"%'),
    )
    return sa.exists(
        sa.select(sa.literal(1))
        .select_from(
            consents.join(
                patient,
                _identity(patient, sealed=sealed) == _identity(consents, sealed=sealed),
            )
        )
        .where(
            patient.c.id == studies.c.patient_id,
            consents.c.grantee_hospital == hospital,
            consents.c.revoked_at.is_(None),
            consents.c.valid_from <= now,
            consents.c.valid_until > now,
            clinician_ok,
            in_scope,
        )
    )


def _broken_glass(
    hospital: ColumnElement[str], now: ColumnElement[datetime], *, sealed: bool
) -> ColumnElement[bool]:
    """An open window for the study's patient: the same patient row, or the same person
    (national identity) seen under another PatientID."""
    opened_for, same = _bg_patient, _bg_same
    person = sa.or_(
        same.c.id == opened_for.c.id,
        sa.and_(
            _identity(opened_for, sealed=sealed).is_not(None),
            _identity(same, sealed=sealed) == _identity(opened_for, sealed=sealed),
        ),
    )
    return sa.exists(
        sa.select(sa.literal(1))
        .select_from(
            break_glass.join(opened_for, opened_for.c.id == break_glass.c.patient_id).join(
                same, person
            )
        )
        .where(
            same.c.id == studies.c.patient_id,
            break_glass.c.hospital == hospital,
            break_glass.c.expires_at > now,
        )
    )


def _patient_rule(national_id: ColumnElement[str], *, sealed: bool = False) -> ColumnElement[bool]:
    """A patient's studies: those of every patient record with their national identity
    (``national_id``: the identity, or in an encrypted index its blind index)."""
    own = (
        sa.select(patients.c.id)
        .where(_identity(patients, sealed=sealed) == national_id)
        .scalar_subquery()
    )
    return studies.c.patient_id.in_(own)


# Each rule twice: for a plain index (False) and for an encrypted one (True).
_HOSPITAL_RULE = {
    sealed: _hospital_rule(
        sa.bindparam(_HOSPITAL, type_=_TEXT),
        sa.bindparam(_SUBJECT, type_=_TEXT),
        sa.bindparam(_NOW, type_=_TIME),
        sealed=sealed,
    )
    for sealed in (False, True)
}
_PATIENT_RULE = {
    sealed: _patient_rule(sa.bindparam(_NATIONAL_ID, type_=_TEXT), sealed=sealed)
    for sealed in (False, True)
}
_NOTHING: ColumnElement[bool] = sa.false()

_PEER_PATIENT_PARAM = "gate_peer_token"
_PEER_SCOPE = "gate_peer_scope"
_peer_tokens = federation_patient_tokens.alias("peer_tokens")
_peer_patient = patients.alias("peer_patient")


def _peer_rules(*, sealed: bool) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The peer rules (all of the patient's studies, the asserted ones) of an index."""
    # A token row counts only while it still describes the patient row (same key and
    # identity; in an encrypted index the token row holds the identity's blind index).
    patients_of_token = (
        sa.select(_peer_tokens.c.patient_id)
        .select_from(
            _peer_tokens.join(
                _peer_patient,
                sa.and_(
                    _peer_patient.c.id == _peer_tokens.c.patient_id,
                    _peer_patient.c.patient_key == _peer_tokens.c.patient_key,
                    _identity(_peer_patient, sealed=sealed) == _peer_tokens.c.national_id,
                ),
            )
        )
        .where(_peer_tokens.c.token == sa.bindparam(_PEER_PATIENT_PARAM, type_=_TEXT))
        .scalar_subquery()
    )
    every = studies.c.patient_id.in_(patients_of_token)
    scoped = sa.and_(
        every,
        studies.c.StudyInstanceUID.in_(sa.bindparam(_PEER_SCOPE, expanding=True, type_=_TEXT)),
    )
    return every, scoped


_PEER_RULES = {sealed: _peer_rules(sealed=sealed) for sealed in (False, True)}


def visibility(
    principal: Principal,
    now: datetime,
    *,
    peer: PeerGrant | None = None,
    phi: PhiCodec | None = None,
) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """The condition on ``studies`` rows true exactly for the studies ``principal`` may see,
    and the parameter values to execute it with (``Gate.visible`` with the values apart).

    The condition is the same object for every caller of a role (and index: ``phi`` for
    an encrypted one): execute it with the values, as in
    ``conn.execute(select(...).where(condition), values)``.
    """
    sealed = phi is not None
    if principal.role == "hospital" and principal.hospital:
        return _HOSPITAL_RULE[sealed], {
            _HOSPITAL: principal.hospital,
            _SUBJECT: principal.subject,
            _NOW: now,
        }
    if principal.role == "patient" and principal.national_id:
        identity = principal.national_id if phi is None else phi.national_id_index(
            principal.national_id
        )
        return _PATIENT_RULE[sealed], {_NATIONAL_ID: identity}
    if principal.role == "peer" and peer is not None:
        # The asserted patient only; every study of theirs under break-glass or an "all"
        # grant, else the grant's StudyInstanceUIDs.
        every, scoped = _PEER_RULES[sealed]
        if peer.break_glass_reason is not None or peer.scope == "all":
            return every, {_PEER_PATIENT_PARAM: peer.patient_token}
        return scoped, {
            _PEER_PATIENT_PARAM: peer.patient_token,
            _PEER_SCOPE: list(peer.scope),
        }
    return _NOTHING, {}


@dataclass(frozen=True, slots=True)
class _Located:
    location: InstanceLocation
    national_id: str | None
    patient_key: str


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


# -- store (STOW-RS) -------------------------------------------------------------------

StoreVerdict = Literal["new", "indexed", "refused", "inconsistent"]
"""What the index says about storing one instance for the caller.

``new``: nothing stands in the way. ``indexed``: the caller's studies already hold this
SOP Instance (see ``StoreCheck.copies``). ``refused``: the study, series, patient record
or SOP Instance belongs to a study of another producer (or of none). ``inconsistent``:
the series belongs to another of the caller's own studies.
"""


@dataclass(frozen=True, slots=True)
class StoredCopy:
    """An indexed object holding a SOP Instance that a store request sends again."""

    store: str
    key: str
    etag: str
    size: int
    header_sha256: str


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """The gate's answer before an instance is written: the verdict and existing copies."""

    verdict: StoreVerdict
    copies: tuple[StoredCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreAttempt:
    """One instance of a store request that was not stored, or was already there, for audit.

    ``label`` is a short, PHI-free word (``identical``, ``A901``, ...); ``header`` is None
    when the part could not be read as DICOM.
    """

    header: ParsedHeader | None
    outcome: str
    label: str


class _RolledBack(Exception):
    def __init__(self, verdict: StoreVerdict) -> None:
        super().__init__(verdict)
        self.verdict = verdict


async def _store_verdict(
    conn: AsyncConnection,
    principal: Principal,
    header: ParsedHeader,
    *,
    store: str,
    own: tuple[str, str] | None = None,
    phi: PhiCodec | None = None,
) -> StoreCheck:
    """The verdict of storing ``header``'s instance into ``store`` for ``principal``.

    ``own`` is the (store, key) just upserted for this instance, which is not a copy;
    ``phi`` the codec of an encrypted index (whose patient keys are blinded).
    """
    me = principal.hospital
    study_uid = header.study.StudyInstanceUID
    owner = await StudyRepository.study_producer(conn, study_uid)
    if owner is not None and owner[0] != me:
        return StoreCheck("refused")
    holder = await StudyRepository.series_study(conn, header.series.SeriesInstanceUID)
    if holder is not None and holder[0] != study_uid:
        return StoreCheck("inconsistent" if holder[1] == me else "refused")
    if await StudyRepository.patient_elsewhere(conn, stored_patient_key(header, store, phi), me):
        return StoreCheck("refused")
    rows = await StudyRepository.copies_of(conn, header.instance.SOPInstanceUID)
    copies: list[StoredCopy] = []
    for r in rows:
        if r[5] != me:
            return StoreCheck("refused")
        if own is not None and (r[0], r[1]) == own:
            continue
        copies.append(StoredCopy(r[0], r[1], r[2], r[3], r[4]))
    return StoreCheck("indexed" if copies else "new", tuple(copies))
