"""Federated search and retrieve, the initiating imaging gateway's side (IHE XCA-I).

A hospital's ``federated=true`` search runs the local search as always, then, for the one
patient it names by PatientID, asks every registered peer at once (one deadline) under
the caller's consent grant or break-glass reason, and merges the answers: each study
tagged with its holding province, remote ones with a RetrieveURL through this gateway's
proxy. A peer that fails is named in the Warning header and in ``X-Federation-Peers``
and never fails the search. Retrieving a remote study streams it from its province.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from imaging_gateway.domain.attributes import by_level
from imaging_gateway.domain.qido import Level, QidoQuery, is_uid
from imaging_gateway.federation.assertions import (
    EMERGENCY,
    PURPOSES_ACROSS,
    ConsentClaim,
    ReplayCache,
)
from imaging_gateway.federation.cache import RetrieveCache
from imaging_gateway.federation.client import FederatedCaller, FederationClient
from imaging_gateway.federation.fanout import (
    CircuitBreakers,
    FanOutResult,
    PeerAnswerError,
    fan_out,
    merge_studies,
    tag_dataset,
    warning_texts,
)
from imaging_gateway.federation.peers import Peer, PeerRegistry
from imaging_gateway.index.shared_state import SharedState
from imaging_gateway.security.consent import ConsentStore
from imaging_gateway.security.gate import AccessContext, FederationSubject, Gate
from imaging_gateway.settings import FederationSettings

__all__ = [
    "PATIENT_TOKEN_ISSUER",
    "FederatedPage",
    "Federation",
    "LocatedStudies",
    "as_token_patient",
    "federated_search",
    "peer_query",
]

PATIENT_TOKEN_ISSUER: Final = "IMAGING-GATEWAY-PATIENT-TOKEN"  # noqa: S105 - a name
"""IssuerOfPatientID a responding gateway writes beside the patient token it answers
with in place of its local PatientID."""
_PATIENT_ID: Final = "00100020"
_ISSUER: Final = "00100021"
_OTHER_IDS: Final = ("00101000", "00101002")
_STUDY_UID: Final = "0020000D"
_SERIES_UID: Final = "0020000E"
_SOP_UID: Final = "00080018"
# Patient attributes never sent to a gateway peer: it matches on the asserted token.
# Every patient-level attribute of the index's table (by keyword and by tag), so one
# added there is withheld too, and the other identities.
_PATIENT_KEYS: Final = frozenset(
    {
        *(a.keyword for a in by_level("patient")),
        *(f"{a.tag:08X}" for a in by_level("patient")),
        "OtherPatientIDsSequence",
        "00101002",
    }
)
_PAGING: Final = frozenset({"limit", "offset", "federated"})

_ANSWER_RESERVE_S: Final = 0.12
"""Of the deadline, what is kept for cancelled calls to unwind (fanout's 50 ms grace),
merging, and writing the answer."""
_MIN_PEER_S: Final = 0.05
"""The least time peers get, however much of the deadline the request already spent."""


class LocatedStudies:
    """Remote studies a hospital found by federated search, for its retrieves (with a TTL).

    Knowing a StudyInstanceUID grants nothing: a retrieve through the proxy needs a
    federated search by the same hospital first, whose consent grant is re-checked at
    retrieve time. Kept in the index (``federation_located_studies``), so the search
    and the retrieve may reach different gateway processes of the province.
    """

    def __init__(self, state: SharedState, *, ttl_s: float = 3600.0) -> None:
        self.state = state
        self.ttl_s = ttl_s

    async def remember(
        self,
        hospital: str,
        province: str,
        study_uids: Sequence[str],
        caller: FederatedCaller,
        *,
        now: datetime,
    ) -> None:
        """Remember the finds of one search; raises ``IndexUnavailable``."""
        await self.state.remember_located(
            hospital, province, study_uids, _caller_json(caller),
            expires_at=now + timedelta(seconds=self.ttl_s), now=now,
        )  # fmt: skip

    async def get(
        self, hospital: str, province: str, study_uid: str, *, now: datetime
    ) -> FederatedCaller | None:
        """The caller ``hospital``'s unexpired find of the study was made as, or None.

        Raises ``IndexUnavailable``."""
        found = await self.state.located(hospital, province, study_uid, now=now)
        return None if found is None else _caller_from_json(found)


def _caller_json(caller: FederatedCaller) -> str:
    c = caller.consent
    return json.dumps({
        "hospital": caller.hospital,
        "clinician": caller.clinician,
        "purpose": caller.purpose,
        "patient_token": caller.patient_token,
        "correlation_id": caller.correlation_id,
        "consent": None if c is None else {
            "id": c.id,
            "scope": c.scope if isinstance(c.scope, str) else list(c.scope),
            "valid_until": c.valid_until.isoformat(),
        },
        "break_glass_reason": caller.break_glass_reason,
    }, separators=(",", ":"))  # fmt: skip


def _caller_from_json(text: str) -> FederatedCaller:
    d = json.loads(text)
    c = d["consent"]
    consent = None if c is None else ConsentClaim(
        id=c["id"],
        scope=c["scope"] if isinstance(c["scope"], str) else tuple(c["scope"]),
        valid_until=datetime.fromisoformat(c["valid_until"]),
    )  # fmt: skip
    return FederatedCaller(
        hospital=d["hospital"], clinician=d["clinician"], purpose=d["purpose"],
        patient_token=d["patient_token"], correlation_id=d["correlation_id"],
        consent=consent, break_glass_reason=d["break_glass_reason"],
    )  # fmt: skip


@dataclass(slots=True)
class Federation:
    """The app's federation resources (one per app, built in ``app._federation_ctx``)."""

    settings: FederationSettings
    registry: PeerRegistry
    client: FederationClient
    breakers: CircuitBreakers
    replay_cache: ReplayCache
    located: LocatedStudies
    """Shared with the province's other gateway processes through the index."""
    cache: RetrieveCache | None = None
    """Answers retrieved from peers, kept encrypted (``federation.cache_store``)."""

    @property
    def deadline_s(self) -> float:
        return self.settings.deadline_ms / 1000.0

    def province_names(self) -> dict[str, str]:
        return {p.province: p.name for p in self.registry}


@dataclass(frozen=True, slots=True)
class FederatedPage:
    """A merged page: the datasets, Warning texts, and each peer's outcome."""

    datasets: list[dict[str, Any]]
    warnings: tuple[str, ...]
    peers: list[dict[str, Any]]

    def peers_header(self) -> str:
        """The ``X-Federation-Peers`` value: JSON of every peer's outcome (no patient data)."""
        return json.dumps(self.peers, separators=(",", ":"))


def peer_query(
    pairs: Sequence[tuple[str, str]], *, kind: str, limit: int, offset: int
) -> list[tuple[str, str]]:
    """The query sent to a peer: the caller's matching keys, first ``offset + limit`` matches.

    A gateway peer gets no patient attribute (it matches on the asserted token); a plain
    DICOMweb peer gets the caller's keys as they are (it shares their PatientID domain).
    """
    out = [
        (k, v)
        for k, v in pairs
        if k not in _PAGING and (kind != "gateway" or k not in _PATIENT_KEYS)
    ]
    out.append(("limit", str(offset + limit)))
    return out


def _peer_path(level: Level, study_uid: str | None, series_uid: str | None) -> str:
    if level == "study":
        return "studies"
    resource = "series" if level == "series" else "instances"
    if series_uid is not None and study_uid is not None:
        return f"studies/{study_uid}/series/{series_uid}/{resource}"
    if study_uid is not None:
        return f"studies/{study_uid}/{resource}"
    return resource


def _value(dataset: dict[str, Any], tag: str) -> str | None:
    element = dataset.get(tag)
    if isinstance(element, dict):
        values = element.get("Value")
        if isinstance(values, list) and values and isinstance(values[0], str):
            return values[0]
    return None


def _as_home_patient(dataset: dict[str, Any], patient_id: str, issuer: str | None) -> None:
    """Show a remote dataset under the PatientID the caller searched with."""
    dataset[_PATIENT_ID] = {"vr": "LO", "Value": [patient_id]}
    if issuer is not None:
        dataset[_ISSUER] = {"vr": "LO", "Value": [issuer]}
    else:
        dataset.pop(_ISSUER, None)
    for tag in _OTHER_IDS:
        dataset.pop(tag, None)


def as_token_patient(dataset: dict[str, Any], patient_token: str) -> None:
    """Show a dataset answered to a peer under the asserted token instead of local IDs.

    The responding side's rule: a peer's answer carries PatientID = the keyed patient
    token and IssuerOfPatientID = ``PATIENT_TOKEN_ISSUER``, never the local PatientID or
    other patient IDs (which may be national identity numbers).
    """
    dataset[_PATIENT_ID] = {"vr": "LO", "Value": [patient_token]}
    dataset[_ISSUER] = {"vr": "LO", "Value": [PATIENT_TOKEN_ISSUER]}
    for tag in _OTHER_IDS:
        dataset.pop(tag, None)


def _purpose(ctx: AccessContext, subject: FederationSubject) -> str:
    if subject.consent is None:
        return EMERGENCY
    purpose = ctx.purpose or subject.consent.purpose
    return purpose if purpose in PURPOSES_ACROSS else subject.consent.purpose


async def federated_search(
    *,
    federation: Federation | None,
    gate: Gate,
    consents: ConsentStore,
    ctx: AccessContext,
    level: Level,
    query: QidoQuery,
    pairs: Sequence[tuple[str, str]],
    local: list[dict[str, Any]],
    limit: int,
    offset: int,
    study_uid: str | None,
    series_uid: str | None,
    retrieve_base: str,
) -> FederatedPage:
    """Merge local results with the peers' answers for the patient ``query`` names; page.

    ``local`` holds the local search's first ``offset + limit`` matches; ``limit`` and
    ``offset`` are the caller's, applied to the merged, ordered results as a local search
    applies them. ``pairs`` are the caller's query parameters (without ``federated``);
    ``ctx`` carries the correlation id both sides audit with. Never raises for a peer's
    failure: peers not asked, failed or skipped are named in the Warning texts and the
    peers list. Raises ``IndexUnavailable`` when the local index cannot be read or the
    audit record not written.
    """
    home = ctx.principal.province
    names = federation.province_names() if federation is not None else {}

    def page(remote: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        if level == "study":
            return merge_studies(
                local, remote, home_province=home, retrieve_base=retrieve_base,
                limit=limit, offset=offset, province_names=names,
            ).studies
        return _merge_other(
            level, local, remote, home=home, base=retrieve_base, names=names,
            limit=limit, offset=offset,
        )

    if federation is None:
        return FederatedPage(page({}), ("federation is not enabled on this gateway",), [])
    subject = await gate.federation_subject(ctx, query, consents)
    if isinstance(subject, str):
        return FederatedPage(page({}), (subject,), [])
    principal = ctx.principal
    assert principal.hospital is not None and ctx.correlation_id is not None
    caller = FederatedCaller(
        hospital=principal.hospital,
        clinician=principal.subject,
        purpose=_purpose(ctx, subject),
        patient_token=subject.patient_token,
        correlation_id=ctx.correlation_id,
        consent=ConsentClaim.from_consent(subject.consent) if subject.consent else None,
        break_glass_reason=subject.break_glass_reason,
    )
    single = {m.keyword: m.value for m in query.matches if m.kind == "single"}
    patient_id = single["PatientID"]
    issuer = single.get("IssuerOfPatientID")
    path = _peer_path(level, study_uid, series_uid)
    # The deadline is the whole answer's: what the request has spent so far (the local
    # search, the subject's checks) and what the answer still needs come off the peers'.
    spent = (datetime.now(UTC) - ctx.now).total_seconds()
    budget = max(federation.deadline_s - _ANSWER_RESERVE_S - max(spent, 0.0), _MIN_PEER_S)

    async def call(peer: Peer) -> list[dict[str, Any]]:
        q = peer_query(pairs, kind=peer.kind, limit=limit, offset=offset)
        datasets = await federation.client.search(
            peer, path, q, caller if peer.kind == "gateway" else None, timeout_s=budget
        )
        for d in datasets:
            _as_home_patient(d, patient_id, issuer)
        return datasets

    result: FanOutResult[list[dict[str, Any]]] = await fan_out(
        list(federation.registry), call, deadline_s=budget, breakers=federation.breakers
    )
    remote = result.values
    datasets = page(remote)
    for province, found in remote.items():
        # A peer's answer that is no UID names nothing a retrieve could ask for.
        uids = [u for u in (_value(d, _STUDY_UID) for d in found) if u is not None and is_uid(u)]
        await federation.located.remember(
            principal.hospital, province, uids, replace(caller, correlation_id=""), now=ctx.now
        )
    return FederatedPage(datasets, warning_texts(result), result.metadata())


def _merge_other(
    level: Level,
    local: list[dict[str, Any]],
    remote: dict[str, list[dict[str, Any]]],
    *,
    home: str,
    base: str,
    names: dict[str, str],
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    """Series or instance results: local first, then provinces in code order, de-duplicated."""
    key = _SERIES_UID if level == "series" else _SOP_UID
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for province, datasets in [(home, local), *sorted(remote.items())]:
        for d in datasets:
            uid = _value(d, key)
            if uid is None or uid in seen:
                continue
            seen.add(uid)
            url = None
            if province != home:
                study = _value(d, _STUDY_UID)
                series = _value(d, _SERIES_UID)
                url = f"{base.rstrip('/')}/federation/{province}/studies/{study}"
                if series is not None:
                    url += f"/series/{series}"
                if level == "instance":
                    url += f"/instances/{uid}"
            try:
                out.append(
                    tag_dataset(d, province=province, province_name=names.get(province),
                                retrieve_url=url)
                )
            except PeerAnswerError:
                continue
    return out[offset : offset + limit]
