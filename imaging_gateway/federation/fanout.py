"""Fan-out search: the initiating imaging gateway asks every responding gateway at once, merges.

IHE XCA-I has the initiating gateway query each responding gateway and attribute every
result to its home community. Here every peer is called concurrently under one
per-request deadline; a peer that raises, times out or answers garbage is one failed
outcome, never a failed search. A :class:`CircuitBreaker` per peer stops calling a peer
that keeps failing. :func:`merge_studies` merges the DICOM JSON study results
(PS3.18 F.2), tags each with the province holding it and points its RetrieveURL at this
gateway's proxy; :func:`warning_header` names the peers that failed (PS3.18 8.3, warn-code
299 of RFC 7234 5.5, as the local search does).

Holding-province tag (a private block, PS3.5 7.8.1), in each merged study::

    (0009,0010) LO  private creator "IMAGING_GATEWAY"       reserves elements (0009,10xx)
    (0009,1010) LO  holding province, GB/T 2260 code        e.g. "440000"
    (0009,1011) LO  holding province's display name         when the caller knows it

If a study already carries another private creator at (0009,0010), the first free
creator slot (0009,0011..00FF) is reserved instead, and the elements move with it to
(0009,xx10) and (0009,xx11): readers find the block by its creator value, as PS3.5
7.8.1 requires. Elements of an earlier IMAGING_GATEWAY block in a peer's answer are
replaced, so a peer cannot claim another province's studies.

RetrieveURL (0008,1190) of a study held by another province is
``{retrieve_base}/federation/{province}/studies/{StudyInstanceUID}`` (with
``retrieve_base`` the home gateway's DICOMweb root, e.g. ``https://gw.bj.example/dicomweb``,
so the path is ``/dicomweb/federation/{province}/studies/{uid}``): retrieval goes through
the home gateway, which streams it from the holding province. Local studies keep theirs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote

from imaging_gateway.domain.qido import is_uid
from imaging_gateway.errors import PeerUnavailable
from imaging_gateway.federation.peers import Peer, is_province_code

__all__ = [
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "BreakerState",
    "CircuitBreaker",
    "CircuitBreakers",
    "FanOutResult",
    "MergedStudies",
    "OutcomeStatus",
    "PeerAnswerError",
    "PeerOutcome",
    "fan_out",
    "header_text",
    "holding_province",
    "merge_studies",
    "tag_dataset",
    "warning_header",
    "warning_texts",
]

T = TypeVar("T")
OutcomeStatus = Literal["ok", "timeout", "error", "skipped"]
BreakerState = Literal["closed", "open", "half-open"]

PRIVATE_GROUP: Final = 0x0009
PRIVATE_CREATOR: Final = "IMAGING_GATEWAY"
_PROVINCE_ELEMENT: Final = 0x10
_PROVINCE_NAME_ELEMENT: Final = 0x11
_STUDY_UID: Final = "0020000D"
_STUDY_DATE: Final = "00080020"
_RETRIEVE_URL: Final = "00081190"
_DATE_RE = re.compile(r"[0-9]{8}")
_TAG_RE = re.compile(r"[0-9A-F]{8}")
_MAX_REASON = 120
_STRAGGLER_GRACE_S = 0.05
"""After the deadline, how long cancelled calls get to unwind before the answer goes out."""


class PeerAnswerError(PeerUnavailable):
    """A peer's answer is not usable (malformed, oversized, wrong type, not DICOM JSON).

    Raised by the caller's parser inside a fan-out call. The message is the short reason
    named in the ``Warning`` header and the response metadata, so it must not carry any
    patient data (say "not a JSON array", never the value found).
    """


# -- circuit breaker -----------------------------------------------------------------


class CircuitBreaker:
    """One peer's circuit breaker: closed, open after repeated failure, half-open to probe.

    Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open:
    calls are refused until ``cool_down_s`` have passed, then it is half-open. Half-open:
    one probe call goes through (another only if the probe has not reported within
    ``cool_down_s``, e.g. because its request was abandoned); its success closes the
    breaker, its failure opens it for another cool-down. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        cool_down_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cool_down_s <= 0:
            raise ValueError("failure_threshold must be at least 1 and cool_down_s positive")
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cool-down has passed reads half-open)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cool_down_s:
            self._state = "half-open"
            self._probe_started = None
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state this claims the probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        if self._probe_started is None or now - self._probe_started >= self.cool_down_s:
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: closed, failures forgotten."""
        self._state = "closed"
        self._failures = 0
        self._probe_started = None

    def record_failure(self) -> None:
        """A call failed (error, garbage or timeout)."""
        self._failures += 1
        if self._state == "half-open" or self._failures >= self.failure_threshold:
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_started = None


class CircuitBreakers:
    """The breakers of all peers, by province, created on first use with one configuration."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        cool_down_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, province: str) -> CircuitBreaker:
        breaker = self._breakers.get(province)
        if breaker is None:
            breaker = CircuitBreaker(
                failure_threshold=self.failure_threshold,
                cool_down_s=self.cool_down_s,
                clock=self._clock,
            )
            self._breakers[province] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        """Each known peer's breaker state, for health and metrics."""
        return {p: b.state for p, b in sorted(self._breakers.items())}


# -- fan-out -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerOutcome(Generic[T]):
    """What one peer's call came to."""

    province: str
    status: OutcomeStatus
    value: T | None = None
    """The call's value when ``status == "ok"``."""
    reason: str | None = None
    """Why it failed: a short text without patient data."""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        """The failure as a Warning text: ``peer 440000 timed out``."""
        if self.status == "timeout":
            return f"peer {self.province} timed out"
        if self.status == "skipped":
            return f"peer {self.province} skipped: {self.reason or 'circuit open'}"
        if self.status == "error":
            return f"peer {self.province} failed: {self.reason or 'error'}"
        return f"peer {self.province} answered"


@dataclass(frozen=True, slots=True)
class FanOutResult(Generic[T]):
    """Every peer's outcome, in the order the peers were given, and the time it all took."""

    outcomes: tuple[PeerOutcome[T], ...]
    elapsed_s: float

    @property
    def values(self) -> dict[str, T]:
        """Province -> value of the peers that answered."""
        return {o.province: o.value for o in self.outcomes if o.ok and o.value is not None}

    @property
    def failed(self) -> tuple[PeerOutcome[T], ...]:
        """Outcomes that timed out, failed or were skipped."""
        return tuple(o for o in self.outcomes if not o.ok)

    def metadata(self) -> list[dict[str, Any]]:
        """One JSON-ready entry per peer for the response's metadata."""
        return [
            {
                "province": o.province,
                "status": o.status,
                **({"reason": o.reason} if o.reason else {}),
                "elapsed_ms": round(o.elapsed_s * 1000, 1),
            }
            for o in self.outcomes
        ]


def _short(text: str) -> str:
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned[:_MAX_REASON] or "error"


async def fan_out(
    peers: Sequence[Peer],
    call: Callable[[Peer], Awaitable[T]],
    *,
    deadline_s: float,
    breakers: CircuitBreakers | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FanOutResult[T]:
    """Run ``call(peer)`` for every peer concurrently; answer by ``deadline_s`` whatever happens.

    Each peer's outcome is ``ok`` (with the value), ``timeout`` (missed the deadline, or
    its call raised ``TimeoutError``), ``error`` (any other exception: a
    ``PeerAnswerError``'s message is the reason, otherwise only the exception's class
    name, since messages may carry URLs or data) or ``skipped`` (its breaker is open). Calls
    still running at the deadline are cancelled; they get 50 ms to unwind, after which
    the answer goes out without them. Outcomes feed each peer's breaker. Raises
    ``ValueError`` for a non-positive deadline or a province given twice; never raises
    for a peer's failure.
    """
    if deadline_s <= 0:
        raise ValueError("deadline_s must be positive")
    provinces = [p.province for p in peers]
    if len(set(provinces)) != len(provinces):
        raise ValueError("a province appears twice among the peers")
    started = clock()
    outcomes: dict[str, PeerOutcome[T]] = {}
    tasks: dict[asyncio.Task[PeerOutcome[T]], Peer] = {}

    async def one(peer: Peer) -> PeerOutcome[T]:
        t0 = clock()
        try:
            value = await call(peer)
        except TimeoutError:
            return PeerOutcome(peer.province, "timeout", elapsed_s=clock() - t0)
        except PeerAnswerError as exc:
            return PeerOutcome(
                peer.province, "error", reason=_short(exc.message), elapsed_s=clock() - t0
            )
        except Exception as exc:
            return PeerOutcome(
                peer.province, "error", reason=type(exc).__name__, elapsed_s=clock() - t0
            )
        return PeerOutcome(peer.province, "ok", value=value, elapsed_s=clock() - t0)

    for peer in peers:
        if breakers is not None and not breakers[peer.province].allow():
            outcomes[peer.province] = PeerOutcome(peer.province, "skipped", reason="circuit open")
            continue
        tasks[asyncio.create_task(one(peer), name=f"federation-{peer.province}")] = peer

    if tasks:
        try:
            done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        except BaseException:
            # This request was abandoned (cancelled): so are its calls.
            for task in tasks:
                task.cancel()
            raise
        for task in done:
            province = tasks[task].province
            if task.cancelled():
                outcomes[province] = PeerOutcome(
                    province, "error", reason="cancelled", elapsed_s=clock() - started
                )
            else:
                outcomes[province] = task.result()
        for task in pending:
            task.cancel()
            province = tasks[task].province
            outcomes[province] = PeerOutcome(province, "timeout", elapsed_s=clock() - started)
        if pending:
            # Give cancelled calls a moment to close their connections; do not wait on
            # one that ignores cancellation.
            await asyncio.wait(pending, timeout=_STRAGGLER_GRACE_S)
            for task in pending:
                task.add_done_callback(_discard)

    if breakers is not None:
        for province, outcome in outcomes.items():
            if outcome.status == "ok":
                breakers[province].record_success()
            elif outcome.status in ("timeout", "error"):
                breakers[province].record_failure()
    return FanOutResult(outcomes=tuple(outcomes[p] for p in provinces), elapsed_s=clock() - started)


def _discard(task: asyncio.Task[Any]) -> None:
    # Retrieve a straggler's result so that asyncio does not log it as never retrieved.
    if not task.cancelled():
        task.exception()


# -- Warning header ------------------------------------------------------------------


def warning_texts(result: FanOutResult[Any]) -> tuple[str, ...]:
    """One text per peer that failed, timed out or was skipped, in the peers' order."""
    return tuple(o.describe() for o in result.failed)


def warning_header(texts: Sequence[str], *, agent: str) -> str | None:
    """A ``Warning`` field value: ``299 {agent} "peer 440000 timed out", ...``; None if empty.

    PS3.18 8.3 / RFC 7234 5.5 warn-code 299 (miscellaneous persistent warning), for the
    local search and the fan-out alike; ``agent`` is the gateway's host or name (other
    characters than a token's become ``-`` so it stays one token), double quotes in
    texts become single quotes. Texts can quote the request (an unknown parameter's
    name): anything but visible ASCII and space is percent-encoded (UTF-8), as are
    ``%`` and ``\\``, so no control character or raw input byte reaches the header
    (aiohttp refuses CR and LF there and would send no answer at all).
    """
    if not texts:
        return None
    token = re.sub(r"[^A-Za-z0-9!#$%&'*+.^_`|~:\[\]-]", "-", agent.strip()) or "imaging-gateway"
    return ", ".join(f'299 {token} "{header_text(t)}"' for t in texts)


# Visible ASCII and space, less the quote (replaced), the escape and percent (encoded).
_HEADER_TEXT_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"%\\')


def header_text(text: str) -> str:
    """``text`` made safe inside a quoted header value: ``"`` -> ``'``, and every byte
    of anything but visible ASCII and space percent-encoded (``a\\rb`` -> ``a%0Db``)."""
    return quote(text.replace('"', "'"), safe=_HEADER_TEXT_SAFE)


# -- merging study results -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MergedStudies:
    """One page of merged study results."""

    studies: list[dict[str, Any]]
    """DICOM JSON datasets, tagged with their holding province."""
    more: bool
    """Matches beyond this page exist among the merged results (OR it with each source's
    own ``more``: a source cut at ``offset + limit`` may hold still more)."""
    duplicates: int = 0
    """Studies dropped because a source earlier in the order held the same UID."""
    dropped: int = 0
    """Remote entries that were not datasets with a valid StudyInstanceUID."""
    provinces: dict[str, int] = field(default_factory=dict)
    """Province -> number of studies of this page it holds."""


def _first_value(dataset: Mapping[str, Any], tag: str) -> Any:
    element = dataset.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    return values[0]


def _study_uid(dataset: Mapping[str, Any]) -> str | None:
    value = _first_value(dataset, _STUDY_UID)
    return value if isinstance(value, str) and is_uid(value) else None


def _creator_tag(block: int) -> str:
    return f"{PRIVATE_GROUP:04X}{block:04X}"


def _block_prefix(block: int) -> str:
    return f"{PRIVATE_GROUP:04X}{block:02X}"


def _drop_own_blocks(dataset: dict[str, Any]) -> None:
    """Remove every IMAGING_GATEWAY block (creator and elements) a source sent."""
    creators = _creator_tag(0)[:6]  # the creator slots (gggg,0010-00FF) share this start
    for creator in [k for k in dataset if k.startswith(creators)]:
        block = int(creator[6:], 16)
        if 0x10 <= block <= 0xFF and _first_value(dataset, creator) == PRIVATE_CREATOR:
            del dataset[creator]
            prefix = _block_prefix(block)
            for key in [k for k in dataset if k.startswith(prefix)]:
                del dataset[key]


def _free_block(dataset: Mapping[str, Any]) -> int | None:
    """The first private creator slot (0x10-0xFF) of group 0009 that nothing uses."""
    for block in range(0x10, 0x100):
        if _creator_tag(block) not in dataset and not any(
            k.startswith(_block_prefix(block)) for k in dataset
        ):
            return block
    return None


def _tag_study(
    dataset: Mapping[str, Any],
    *,
    province: str,
    province_name: str | None,
    retrieve_url: str | None,
) -> dict[str, Any]:
    out = {k: v for k, v in dataset.items() if isinstance(k, str) and _TAG_RE.fullmatch(k)}
    # A source's own tagging is replaced, never trusted.
    _drop_own_blocks(out)
    block = _free_block(out)
    if block is None:
        raise PeerAnswerError("no free private block in group 0009")
    prefix = _block_prefix(block)
    out[_creator_tag(block)] = {"vr": "LO", "Value": [PRIVATE_CREATOR]}
    out[f"{prefix}{_PROVINCE_ELEMENT:02X}"] = {"vr": "LO", "Value": [province]}
    if province_name:
        out[f"{prefix}{_PROVINCE_NAME_ELEMENT:02X}"] = {"vr": "LO", "Value": [province_name]}
    if retrieve_url is not None:
        out[_RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
    return {k: out[k] for k in sorted(out)}


def tag_dataset(
    dataset: Mapping[str, Any],
    *,
    province: str,
    province_name: str | None = None,
    retrieve_url: str | None = None,
) -> dict[str, Any]:
    """A copy of any result dataset (series, instance) tagged as :func:`merge_studies` does.

    The holding-province private block replaces any the source sent; ``retrieve_url``,
    when given, becomes its RetrieveURL. Raises ``PeerAnswerError`` when group 0009 has
    no free private block.
    """
    return _tag_study(
        dataset, province=province, province_name=province_name, retrieve_url=retrieve_url
    )


def holding_province(dataset: Mapping[str, Any]) -> str | None:
    """The holding province a merged study was tagged with, found through its creator."""
    for block in range(0x10, 0x100):
        if _first_value(dataset, _creator_tag(block)) == PRIVATE_CREATOR:
            value = _first_value(dataset, f"{_block_prefix(block)}{_PROVINCE_ELEMENT:02X}")
            return value if isinstance(value, str) else None
    return None


def _order_key(dataset: Mapping[str, Any]) -> tuple[int, int, str]:
    # StudyDate descending, studies without a (well-formed) date last, then UID.
    date = _first_value(dataset, _STUDY_DATE)
    uid = _study_uid(dataset) or ""
    if isinstance(date, str) and _DATE_RE.fullmatch(date):
        return (0, -int(date), uid)
    return (1, 0, uid)


def merge_studies(
    local: Sequence[Mapping[str, Any]],
    remote: Mapping[str, Sequence[Any]],
    *,
    home_province: str,
    retrieve_base: str,
    limit: int,
    offset: int = 0,
    province_names: Mapping[str, str] | None = None,
) -> MergedStudies:
    """Merge local and remote study results (DICOM JSON) into one page.

    De-duplicated by StudyInstanceUID (0020,000D): a local study wins, then provinces in
    code order. Each study is tagged with its holding province (the private block in the
    module docstring); remote ones get RetrieveURL
    ``{retrieve_base}/federation/{province}/studies/{uid}``. Then the same order and
    paging as a local search: StudyDate descending (undated last), then
    StudyInstanceUID, ``offset`` skipped, at most ``limit`` returned. For that meaning
    every source must have been asked for its first ``offset + limit`` matches.
    Remote entries that are not datasets with a valid StudyInstanceUID (or leave no
    private block free) are dropped and counted. Raises ``ValueError`` for a bad limit
    or offset, or the home province or a non-province code among ``remote``.
    """
    if limit < 1 or offset < 0:
        raise ValueError("limit must be positive and offset not negative")
    if home_province in remote or not all(is_province_code(p) for p in remote):
        raise ValueError("remote must be keyed by other provinces' codes")
    names = province_names or {}
    base = retrieve_base.rstrip("/")
    seen: set[str] = set()
    merged: list[dict[str, Any]] = []
    holders: list[str] = []
    duplicates = dropped = 0

    for dataset in local:
        uid = _study_uid(dataset)
        if uid is not None and uid in seen:
            duplicates += 1
            continue
        if uid is not None:
            seen.add(uid)
        merged.append(
            _tag_study(
                dataset,
                province=home_province,
                province_name=names.get(home_province),
                retrieve_url=None,
            )
        )
        holders.append(home_province)
    for province in sorted(remote):
        for dataset in remote[province]:
            uid = _study_uid(dataset) if isinstance(dataset, Mapping) else None
            if uid is None:
                dropped += 1
                continue
            if uid in seen:
                duplicates += 1
                continue
            try:
                tagged = _tag_study(
                    dataset,
                    province=province,
                    province_name=names.get(province),
                    retrieve_url=f"{base}/federation/{province}/studies/{uid}",
                )
            except PeerAnswerError:
                dropped += 1
                continue
            seen.add(uid)
            merged.append(tagged)
            holders.append(province)

    order = sorted(range(len(merged)), key=lambda i: _order_key(merged[i]))
    page = order[offset : offset + limit]
    counts: dict[str, int] = {}
    for i in page:
        counts[holders[i]] = counts.get(holders[i], 0) + 1
    return MergedStudies(
        studies=[merged[i] for i in page],
        more=len(order) > offset + limit,
        duplicates=duplicates,
        dropped=dropped,
        provinces=dict(sorted(counts.items())),
    )
