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
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import jwt

from imaging_gateway.domain.attributes import by_level
from imaging_gateway.domain.qido import Level, QidoQuery, is_uid
from imaging_gateway.errors import (
    ClientCertificateRequired,
    Forbidden,
    GatewayError,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    PeerUnavailable,
    Unauthenticated,
)
from imaging_gateway.federation.assertions import (
    EMERGENCY,
    PURPOSES_ACROSS,
    ConsentClaim,
    ReplayCache,
    verify_assertion,
)
from imaging_gateway.federation.cache import CachedAnswer, Fill, RetrieveCache
from imaging_gateway.federation.client import (
    ASSERTION_HEADER,
    PEER_ERRORS,
    FederatedCaller,
    FederationClient,
    load_peer_json,
)
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
from imaging_gateway.security.access import AccessContext, PeerGrant
from imaging_gateway.security.consent import ConsentStore
from imaging_gateway.security.gate import FederationSubject, Gate, ReleasedRemoteStudy
from imaging_gateway.security.principals import Principal
from imaging_gateway.settings import FederationSettings
from imaging_gateway.storage.base import close_stream

log = logging.getLogger(__name__)

__all__ = [
    "ASSERTION_HEADER",
    "PASS_REQUEST",
    "PATIENT_TOKEN_ISSUER",
    "FederatedPage",
    "Federation",
    "FederationService",
    "LocatedStudies",
    "RelayBroken",
    "RemoteAnswer",
    "RemoteRetrieve",
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


# ---------------------------------------------------------------------------
# The responding side's peer authentication and the retrieving side's relay

_CONDITIONS: Final = ("Range", "If-Range", "If-None-Match")
"""A client's own conditions on a retrieve, passed to the peer as they are."""
PASS_REQUEST: Final = ("Accept", *_CONDITIONS)
"""The client's request headers a federated retrieve passes to the holding province."""
_PASS_RESPONSE: Final = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
)
_PASS_STATUS: Final = frozenset({200, 206, 304, 416})
_CHUNK: Final = 64 * 1024


class RelayBroken(Exception):
    """The holding province's body broke off after its headers were passed on."""


class _CachedCopyUnreadable(Exception):
    """The peer answered 304 but the cached copy failed before its first byte."""


@dataclass(frozen=True, slots=True)
class RemoteRetrieve:
    """A federated retrieve the gate released, and the caller the peer is asked as."""

    released: ReleasedRemoteStudy
    """Only the gate makes one: the relay, the cache and the metadata take nothing else."""
    caller: FederatedCaller


@dataclass(frozen=True, slots=True)
class RemoteAnswer:
    """What a federated retrieve sends back: status, headers and the body's chunks.

    Iterating ``chunks`` raises ``RelayBroken`` when the holding province's body breaks
    off (the client sees a short body: its Content-Length tells), and a ``GatewayError``
    when a cached copy fails mid-body (the caller cuts the connection).
    """

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]
    content_length: int | None = None


def _unverified(token: str) -> tuple[str, str | None]:
    """(issuer, correlation id) as the token claims them, for the refusal's audit record."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return "unknown", None
    iss = claims.get("iss")
    cid = claims.get("correlation_id")
    issuer = iss if isinstance(iss, str) and iss.isdigit() and len(iss) == 6 else "unknown"
    try:
        correlation = str(uuid.UUID(cid)) if isinstance(cid, str) else None
    except ValueError:
        correlation = None
    return issuer, correlation


@dataclass(frozen=True, slots=True)
class FederationService:
    """Federation for the API (one per app, built whether federation is on or not)."""

    gate: Gate
    province: str
    """This gateway's province (the audience of the assertions it accepts)."""
    federation: Federation | None = None
    """Set only when ``[federation] enabled = true``."""

    async def authenticate_peer(
        self,
        token: str,
        *,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        certificate_subject: str | None,
        has_certificate: bool,
        secure: bool,
        source: str | None,
    ) -> tuple[Principal, PeerGrant]:
        """The ``peer`` principal and what it may see, from its verified assertion.

        ``path`` is the request's raw path; ``has_certificate`` whether the connection
        carries a verified client certificate (of ``certificate_subject``). Refusals are
        audited with the assertion's correlation id. Raises ``Forbidden`` when federation
        is off, ``ClientCertificateRequired`` without a client certificate (except on
        plain HTTP with ``allow_plain_http``), ``Unauthenticated`` for a forged, expired,
        replayed or misbound assertion or a certificate that is not the asserting peer's,
        ``Forbidden`` for an expired grant.
        """
        federation = self.federation
        issuer, correlation = _unverified(token)
        try:
            if federation is None:
                raise Forbidden("federation is not enabled on this gateway")
            if not has_certificate and (secure or not federation.settings.allow_plain_http):
                raise ClientCertificateRequired("a peer must present its client certificate")
            assertion = await verify_assertion(
                token,
                registry=federation.registry,
                expected_audience=self.province,
                method=method,
                path=path,
                query=list(query),
                replay_cache=federation.replay_cache,
            )
            expected = next(
                (p.certificate_subject for p in federation.settings.peers
                 if p.province == assertion.issuer),
                None,
            )  # fmt: skip
            if expected is not None and (not has_certificate or certificate_subject != expected):
                raise Unauthenticated("the client certificate is not the asserting peer's")
        except (Unauthenticated, Forbidden) as exc:
            await self.gate.refused_token(
                source=source,
                reason=exc.message,
                role="peer",
                subject=f"imaging-gateway:{issuer}",
                action="federation",
                note=None if correlation is None else f"correlation={correlation}",
            )
            raise
        principal = Principal(
            subject=assertion.subject,
            role="peer",
            province=assertion.issuer,
            token_id=assertion.jti,
        )
        grant = PeerGrant(
            patient_token=assertion.patient_token,
            scope=assertion.consent.scope if assertion.consent is not None else (),
            hospital=assertion.hospital,
            clinician=assertion.clinician,
            break_glass_reason=assertion.break_glass_reason,
            purpose=assertion.purpose,
            correlation_id=assertion.correlation_id,
        )
        return principal, grant

    async def release(
        self, ctx: AccessContext, *, province: str, study_uid: str, problem: str | None
    ) -> RemoteRetrieve:
        """A study another province holds, released by the gate to a hospital caller.

        Needs a federated search for the study by the same hospital first (its
        RetrieveURL points here); the consent grant it rested on is checked again now.
        ``problem``: what is wrong with the path's UIDs (refused, audited). Raises
        ``Forbidden`` (not a hospital; grant revoked or expired, audited),
        ``InvalidQuery``, ``NotFound`` (unknown province, never-searched study).
        """
        ctx.principal.require("hospital")
        if problem is not None:
            await self.gate.refused_input(ctx, action="federated-retrieve", reason=problem)
            raise InvalidQuery(problem)
        federation = self.federation
        if federation is None or province not in federation.registry:
            raise NotFound("no such study, series or instance")
        assert ctx.principal.hospital is not None
        found = await federation.located.get(ctx.principal.hospital, province, study_uid,
                                             now=ctx.now)  # fmt: skip
        ctx = replace(ctx, correlation_id=str(uuid.uuid4()))
        released = await self.gate.release_remote(
            ctx,
            province=province,
            study_uid=study_uid,
            found=found is not None,
            patient_token=found.patient_token if found is not None else None,
            consent_id=found.consent.id if found is not None and found.consent else None,
        )
        assert found is not None  # else release_remote raised NotFound
        # The peer is asked as the search was made, under this retrieve's correlation id.
        return RemoteRetrieve(released, replace(found, correlation_id=ctx.correlation_id or ""))

    async def ended(self, retrieve: RemoteRetrieve, *, outcome: str, bytes_sent: int) -> None:
        """How a relayed retrieve ended: one short of its body (the holding province's
        body broke off, the cache's copy failed, the client went away) gets its follow-up
        audit record (``Gate.retrieve_ended``); a complete one needs none."""
        if outcome != "complete":
            await self.gate.retrieve_ended(
                retrieve.released, outcome=outcome, bytes_sent=bytes_sent
            )

    def _caller(self, retrieve: RemoteRetrieve) -> tuple[Federation, Peer, FederatedCaller | None]:
        federation = self.federation
        assert federation is not None  # released only when federation is on
        peer = federation.registry.get(retrieve.released.province)
        return federation, peer, retrieve.caller if peer.kind == "gateway" else None

    def _path(self, retrieve: RemoteRetrieve, tail: str | None) -> str:
        return f"studies/{retrieve.released.StudyInstanceUID}" + (f"/{tail}" if tail else "")

    async def metadata(
        self,
        retrieve: RemoteRetrieve,
        *,
        tail: str,
        query: Sequence[tuple[str, str]],
        headers: Mapping[str, str],
        home: str,
    ) -> tuple[str, str]:
        """A peer's metadata answer with its BulkDataURIs pointed at this gateway's proxy
        (under ``home``); returns (JSON text, content type).

        Read whole (bounded by ``federation.max_answer_bytes``): the URIs must be
        rewritten. A URI outside the peer's registered base is dropped, never followed.
        Raises ``NotFound`` / ``PeerUnavailable`` as a retrieve does.
        """
        federation, peer, who = self._caller(retrieve)
        pending = federation.client.retrieve(
            peer, self._path(retrieve, tail), query, who, headers=dict(headers)
        )
        limit = federation.settings.max_answer_bytes
        try:
            async with pending as upstream:
                if upstream.status == 404:
                    raise NotFound("no such study, series or instance")
                if upstream.status != 200:
                    raise PeerUnavailable(f"the holding province answered HTTP {upstream.status}")
                body = bytearray()
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > limit:
                        raise PeerUnavailable("the holding province's metadata is over the cap")
                content_type = upstream.content_type
        except PEER_ERRORS as exc:
            raise PeerUnavailable(
                f"the holding province cannot be reached ({type(exc).__name__})"
            ) from None
        try:
            # Bounded nesting: what is parsed is walked below and encoded again.
            data = load_peer_json(bytes(body))
        except PeerAnswerError as exc:
            reason = exc.message.removeprefix("answer is ")
            raise PeerUnavailable(
                f"the holding province answered metadata that is {reason}"
            ) from None
        registry = federation.registry
        province = retrieve.released.province
        nodes = [data]
        while nodes:
            node = nodes.pop()
            if isinstance(node, list):
                nodes.extend(node)
            elif isinstance(node, dict):
                uri = node.get("BulkDataURI")
                if isinstance(uri, str):
                    mapped = registry.map_retrieve_url(province, uri)
                    if mapped is None:
                        del node["BulkDataURI"]
                    else:
                        node["BulkDataURI"] = f"{home}/{mapped[0]}/{mapped[1]}"
                nodes.extend(node.values())
        return json.dumps(data, ensure_ascii=False), content_type

    @asynccontextmanager
    async def relay(
        self,
        retrieve: RemoteRetrieve,
        *,
        tail: str | None,
        query: Sequence[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> AsyncIterator[RemoteAnswer]:
        """The holding province's answer to a retrieve, chunk by chunk (memory flat).

        ``headers``: the client's ``PASS_REQUEST`` headers. ``Range``, ``If-Range`` and
        ``If-None-Match`` are passed through (and then the cache is not used), so a client
        resumes a broken-off retrieve (206) or learns that it has not changed (304).
        Otherwise, with a retrieve cache: a cached answer is served when the holding
        province confirms it (304 to its ETag), and a whole 200 with an ETag and a length
        is kept while it is relayed. Raises, before the answer: ``NotFound``,
        ``NotAcceptable``, ``PeerUnavailable``.
        """
        federation, peer, who = self._caller(retrieve)
        path = self._path(retrieve, tail)
        pairs = list(query)
        passed = dict(headers)

        def ask(extra: dict[str, str]) -> Any:
            return federation.client.retrieve(peer, path, pairs, who,
                                              headers={**passed, **extra})  # fmt: skip

        cache = federation.cache
        if cache is None or any(h in passed for h in _CONDITIONS):
            async with AsyncExitStack() as stack:
                yield await _open(stack, ask({}))
            return
        key = cache.key(retrieve.released.province, path, pairs, passed.get("Accept"))
        cached = await cache.lookup(key)
        if cached is not None:
            stack = AsyncExitStack()
            try:
                # The holding province decides again; 304 only if it would send these bytes.
                answer = await _open(stack, ask({"If-None-Match": cached.etag}),
                                     cache=(cache, key, cached))  # fmt: skip
            except _CachedCopyUnreadable:
                await stack.aclose()
                await cache.drop(key)
            except BaseException:
                await stack.aclose()
                raise
            else:
                async with stack:
                    yield answer
                return
        async with AsyncExitStack() as stack:
            yield await _open(stack, ask({}), cache=(cache, key, None))


async def _open(
    stack: AsyncExitStack,
    pending: Any,
    *,
    cache: tuple[RetrieveCache, str, CachedAnswer | None] | None = None,
) -> RemoteAnswer:
    """Open the peer's answer within ``stack``; raises ``PeerUnavailable`` and the rest.

    With ``cache`` (the cache, the entry's key, the entry asked about with
    If-None-Match): a 304 serves the entry (``_CachedCopyUnreadable`` when it fails
    before its first byte), and a whole 200 with an ETag and a length is kept as the new
    entry while it is copied.
    """
    try:
        upstream = await stack.enter_async_context(pending)
    except PEER_ERRORS as exc:
        raise PeerUnavailable(
            f"the holding province cannot be reached ({type(exc).__name__})"
        ) from None
    if upstream.status == 304 and cache is not None and cache[2] is not None:
        return await _from_cache(stack, cache[0], cache[2])
    if upstream.status not in _PASS_STATUS:
        if upstream.status == 404:
            raise NotFound("no such study, series or instance")
        if upstream.status == 406:
            raise NotAcceptable("the holding province cannot send that representation")
        raise PeerUnavailable(f"the holding province answered HTTP {upstream.status}")
    out = {h: upstream.headers[h] for h in _PASS_RESPONSE if h in upstream.headers}
    etag, length = upstream.headers.get("ETag"), upstream.content_length
    fill: Fill | None = None
    if cache is not None and upstream.status == 200 and etag and length is not None:
        fill = cache[0].fill(cache[1], etag=etag, length=length,
                             content_type=upstream.headers.get("Content-Type", ""))  # fmt: skip
    finished = [False]
    if fill is not None:
        filling = fill

        async def abort_unfinished() -> None:
            if not finished[0]:  # the copy broke off: no entry
                await filling.abort()

        stack.push_async_callback(abort_unfinished)
    return RemoteAnswer(upstream.status, out, _relayed(upstream, fill, finished))


async def _relayed(upstream: Any, fill: Fill | None, finished: list[bool]) -> AsyncIterator[bytes]:
    # Whatever has arrived, as it arrives (bounded by the socket reader's buffer): fewer,
    # larger writes than fixed-size chunks, memory still flat.
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
            if fill is not None:
                await fill.put(chunk)
    except PEER_ERRORS as exc:
        raise RelayBroken(type(exc).__name__) from None
    if fill is not None:
        finished[0] = True
        await fill.finish()


async def _from_cache(
    stack: AsyncExitStack, cache: RetrieveCache, cached: CachedAnswer
) -> RemoteAnswer:
    """A cached answer the holding province has just confirmed (304).

    Raises ``_CachedCopyUnreadable`` when the entry fails before its first byte (then
    the caller asks the peer for the answer itself).
    """
    body = cache.body(cached)
    stack.push_async_callback(close_stream, body)
    try:
        first = await anext(body, b"")
    except GatewayError as exc:
        log.warning("federation cache: entry unreadable: %s", type(exc).__name__)
        raise _CachedCopyUnreadable from None

    async def chunks() -> AsyncIterator[bytes]:
        yield first
        async for chunk in body:
            yield chunk

    return RemoteAnswer(
        200, {"Content-Type": cached.content_type, "ETag": cached.etag}, chunks(),
        content_length=cached.length,
    )  # fmt: skip
