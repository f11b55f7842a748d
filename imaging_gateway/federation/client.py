"""The federation client: signed, bounded calls from this gateway to its registered peers.

Every call goes to a URL built by :meth:`PeerRegistry.url_for` (never one taken from a
request or an answer), over the one outbound ``ClientSession`` of the app with the
peer's own TLS context (its CA only; this gateway's certificate presented for mTLS).
A ``gateway`` peer gets an Ed25519 assertion (:func:`issue_assertion`) bound to exactly
that request in the ``X-Federation-Assertion`` header; a ``dicomweb`` peer gets its
configured bearer credential instead. Redirects are never followed, search answers are
read up to ``federation.max_answer_bytes`` and parsed strictly as DICOM JSON (PS3.18
F.2); anything else is a :class:`PeerAnswerError` naming what was wrong, never what it
contained.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from imaging_gateway.crypto.tls import client_context
from imaging_gateway.errors import ConfigError
from imaging_gateway.federation.assertions import ConsentClaim, issue_assertion
from imaging_gateway.federation.fanout import PeerAnswerError
from imaging_gateway.federation.peers import Peer, PeerRegistry
from imaging_gateway.settings import Settings

__all__ = [
    "ASSERTION_HEADER",
    "FederatedCaller",
    "FederationClient",
    "load_registry",
    "parse_dicom_json",
]

ASSERTION_HEADER: Final = "X-Federation-Assertion"
PEER_ERRORS: Final = (aiohttp.ClientError, TimeoutError)
"""What reaching a peer or reading its answer raises (for callers that know no aiohttp)."""
_JSON_TYPES: Final = ("application/dicom+json", "application/json")
_TAG_CHARS: Final = frozenset("0123456789ABCDEF")
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class FederatedCaller:
    """Who a federated request is for: the facts the assertion carries."""

    hospital: str
    clinician: str | None
    purpose: str
    patient_token: str
    correlation_id: str
    consent: ConsentClaim | None = None
    break_glass_reason: str | None = None

    @staticmethod
    def new_correlation_id() -> str:
        return str(uuid.uuid4())


def load_registry(settings: Settings) -> PeerRegistry:
    """The peer registry of ``[[federation.peers]]``, public keys read from their files.

    Raises ``ConfigError`` naming the peer's key when a file is missing or not an
    Ed25519 public key, or a peer is otherwise wrong (see :class:`Peer`).
    """
    peers: list[Peer] = []
    for n, p in enumerate(settings.federation.peers):
        pem: str | None = None
        if p.public_key_file is not None:
            pem = _read_text(p.public_key_file, f"federation.peers[{n}].public_key_file")
        peers.append(
            Peer(
                province=p.province,
                name=p.name,
                base_url=p.base_url,
                kind=p.kind,
                public_key_pem=pem,
                credential=p.credential_env,
            )
        )
    return PeerRegistry(
        peers,
        home_province=settings.gateway.province,
        allow_plain_http=settings.federation.allow_plain_http,
    )


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(setting, f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError):
        raise ConfigError(setting, f"{path} cannot be read as a PEM file") from None


MAX_JSON_DEPTH: Final = 64
"""JSON nesting a peer's DICOM JSON may have: about 20 levels of sequences (each is an
element object, its Value array and an item object). Deeper is no dataset; bounded here
because what is parsed is walked and encoded again (orjson stops at 254 levels)."""


def load_peer_json(body: bytes) -> Any:
    """A peer's JSON answer, parsed by orjson and nested at most ``MAX_JSON_DEPTH`` deep.

    Raises ``PeerAnswerError`` ("answer is not JSON", "answer is nested too deep"); never
    ``RecursionError`` (orjson itself refuses more than 1024 levels).
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PeerAnswerError("answer is not JSON") from None
    # Iteratively: a recursive walk would be what overflows.
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise PeerAnswerError("answer is nested too deep")
        if isinstance(node, dict):
            pending.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            pending.extend((v, depth + 1) for v in node)
    return data


def parse_dicom_json(body: bytes) -> list[dict[str, Any]]:
    """A QIDO-RS answer body as a list of DICOM JSON datasets, checked strictly.

    Raises ``PeerAnswerError`` when it is not UTF-8 JSON (or nested deeper than
    ``MAX_JSON_DEPTH``), not an array, or an entry is
    not an object whose keys are 8 upper-case hex digits each holding an object with a
    string ``vr``.
    """
    data = load_peer_json(body)
    if not isinstance(data, list):
        raise PeerAnswerError("answer is not a JSON array")
    for dataset in data:
        if not isinstance(dataset, dict):
            raise PeerAnswerError("answer entry is not a DICOM JSON object")
        for tag, element in dataset.items():
            if len(tag) != 8 or not set(tag) <= _TAG_CHARS:
                raise PeerAnswerError("answer entry has a key that is not a tag")
            if not isinstance(element, dict) or not isinstance(element.get("vr"), str):
                raise PeerAnswerError("answer element without a VR")
    return data


class FederationClient:
    """Calls peers for the app: one session, one TLS context per peer, bounded answers."""

    def __init__(
        self,
        settings: Settings,
        registry: PeerRegistry,
        signing_key: Ed25519PrivateKey,
        session: aiohttp.ClientSession,
    ) -> None:
        self.registry = registry
        self.home = settings.gateway.province
        self.subject = f"imaging-gateway:{self.home}"
        self.max_answer_bytes = settings.federation.max_answer_bytes
        self.validity_s = settings.federation.assertion_validity_s
        self.retrieve_timeout_s = settings.federation.retrieve_timeout_s
        self._key = signing_key
        self._session = session
        self._credentials = {
            p.province: p.credential for p in settings.federation.peers if p.credential
        }
        tls = settings.tls
        self._ssl: dict[str, ssl.SSLContext] = {}
        for n, p in enumerate(settings.federation.peers):
            if p.base_url.lower().startswith("https://"):
                self._ssl[p.province] = client_context(
                    tls,
                    peer_ca_file=p.ca_file,
                    peer_setting=f"federation.peers[{n}].ca_file",
                    present_certificate=tls.enabled and p.kind == "gateway",
                )

    def _headers(
        self, peer: Peer, url: str, query: Sequence[tuple[str, str]], who: FederatedCaller | None
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        if peer.kind == "gateway":
            if who is None:
                raise PeerAnswerError("a gateway peer needs an assertion")
            headers[ASSERTION_HEADER] = issue_assertion(
                self._key,
                issuer=self.home,
                audience=peer.province,
                subject=self.subject,
                hospital=who.hospital,
                clinician=who.clinician,
                purpose=who.purpose,
                patient_token=who.patient_token,
                consent=who.consent,
                break_glass_reason=who.break_glass_reason,
                correlation_id=who.correlation_id,
                method="GET",
                path=urlsplit(url).path,
                query=query,
                validity_s=self.validity_s,
            )
        else:
            credential = self._credentials.get(peer.province)
            if credential is not None:
                headers["Authorization"] = f"Bearer {credential}"
        return headers

    async def search(
        self,
        peer: Peer,
        path: str,
        query: Iterable[tuple[str, str]],
        who: FederatedCaller | None,
        *,
        timeout_s: float,
    ) -> list[dict[str, Any]]:
        """QIDO-RS ``path`` (relative to the peer's DICOMweb root) at ``peer``.

        Returns the datasets (none for 204). Raises ``PeerAnswerError`` for a status
        other than 200/204, a redirect, a non-JSON media type, an answer over the size
        cap or malformed DICOM JSON; ``TimeoutError`` after ``timeout_s``; aiohttp's
        errors when the peer cannot be reached.
        """
        pairs = list(query)
        url = self.registry.url_for(peer.province, path, pairs)
        headers = {"Accept": "application/dicom+json", **self._headers(peer, url, pairs, who)}
        async with self._session.get(
            URL(url, encoded=True),
            headers=headers,
            allow_redirects=False,
            ssl=self._ssl.get(peer.province, True),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status == 204:
                return []
            if resp.status != 200:
                raise PeerAnswerError(f"answered HTTP {resp.status}")
            if resp.content_type not in _JSON_TYPES:
                raise PeerAnswerError("answer is not application/dicom+json")
            if resp.content_length is not None and resp.content_length > self.max_answer_bytes:
                raise PeerAnswerError("answer larger than federation.max_answer_bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > self.max_answer_bytes:
                    raise PeerAnswerError("answer larger than federation.max_answer_bytes")
        return parse_dicom_json(bytes(body))

    def retrieve(
        self,
        peer: Peer,
        path: str,
        query: Iterable[tuple[str, str]],
        who: FederatedCaller | None,
        *,
        headers: dict[str, str],
    ) -> Any:
        """Start a GET of ``path`` at ``peer`` for streaming; use as ``async with``.

        ``headers`` are the client's passed-through ones (Accept, Range, If-Range).
        Raises ``NotFound`` / ``InvalidRequest`` from the registry for an unknown
        province or a path that cannot be a peer path.
        """
        pairs = list(query)
        url = self.registry.url_for(peer.province, path, pairs)
        return self._session.get(
            URL(url, encoded=True),
            headers={**headers, **self._headers(peer, url, pairs, who)},
            allow_redirects=False,
            ssl=self._ssl.get(peer.province, True),
            timeout=aiohttp.ClientTimeout(total=self.retrieve_timeout_s, sock_connect=10),
        )
