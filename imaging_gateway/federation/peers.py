"""The peer registry: the only source of the addresses an initiating imaging gateway calls.

In IHE XCA-I terms this gateway is the initiating imaging gateway for its own hospitals and
each peer is a responding imaging gateway (``kind="gateway"``, speaks the signed assertion
protocol of :mod:`imaging_gateway.federation.assertions`) or a plain DICOMweb server
(``kind="dicomweb"``, an existing PACS or archive reached with a configured credential).
Each peer is one home community, named by its GB/T 2260 province-level code.

Peer URLs are built here and only here, from the registered base URL and a relative path
whose every segment is checked: no absolute or network-path reference, no ``.`` / ``..``
segment, no percent-encoding (so no encoded slash or dot), no backslash, no userinfo,
no query or fragment smuggled in the path. A RetrieveURL found in a peer's answer is
mapped back to (province, path) only when it lies under that peer's own base URL; the
caller then rebuilds the URL with :meth:`PeerRegistry.url_for`, so an answer can never
steer the gateway to another address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import quote, urlencode, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from imaging_gateway.errors import ConfigError, InvalidRequest, NotFound

__all__ = ["PROVINCE_CODES", "Peer", "PeerKind", "PeerRegistry", "is_province_code"]

PeerKind = Literal["gateway", "dicomweb"]
PEER_KINDS: Final[tuple[PeerKind, ...]] = ("gateway", "dicomweb")

PROVINCE_CODES: Final[frozenset[str]] = frozenset(
    f"{p}0000"
    for p in (
        "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 "
        "50 51 52 53 54 61 62 63 64 65 71 81 82"
    ).split()
)
"""GB/T 2260 province-level administrative division codes (34, Taiwan, Hong Kong and
Macao included)."""

_DEFAULT_PORTS: Final[dict[str, int]] = {"http": 80, "https": 443}
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})(?:\.[a-z0-9](?:[a-z0-9-]{0,62}))*\.?")
_IPV6_RE = re.compile(r"[0-9a-f:.]+")
# Path segments a DICOMweb resource needs: UIDs (digits and dots), resource names,
# frame lists ("1,2,3"). Nothing that a URL parser could read as structure.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._~,=+-]+")
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_PATH = 2048


def is_province_code(code: str) -> bool:
    """Whether ``code`` is a GB/T 2260 province-level code such as ``440000``."""
    return code in PROVINCE_CODES


def _refuse_path(reason: str) -> InvalidRequest:
    return InvalidRequest(f"peer path refused: {reason}")


def _checked_path(path: str) -> str:
    """``path`` as segments joined by ``/`` relative to a base URL.

    Raises ``InvalidRequest`` naming what is wrong (the path itself is not echoed).
    """
    if not isinstance(path, str) or not path:
        raise _refuse_path("empty")
    if len(path) > _MAX_PATH:
        raise _refuse_path(f"longer than {_MAX_PATH} characters")
    if "://" in path:
        raise _refuse_path("an absolute URL")
    if path.startswith("//"):
        raise _refuse_path("a network-path reference (//host)")
    if "\\" in path:
        raise _refuse_path("a backslash")
    if "%" in path:
        raise _refuse_path("percent-encoding (encoded slashes or dots) is not accepted")
    if "?" in path or "#" in path:
        raise _refuse_path("a query or fragment inside the path")
    segments = (path[1:] if path.startswith("/") else path).split("/")
    for segment in segments:
        if segment in (".", ".."):
            raise _refuse_path("a dot segment")
        if not segment:
            raise _refuse_path("an empty segment")
        if not _SEGMENT_RE.fullmatch(segment):
            raise _refuse_path("a character outside letters, digits and . _ ~ , = + -")
    return "/".join(segments)


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    path: str
    """The base path without its trailing slash ("" for the root)."""


def _origin(url: str) -> _Origin | None:
    """The normalized parts of an http(s) URL without userinfo, query or fragment."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url) or "\\" in url or "%" in url:
        return None
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        return None
    scheme = split.scheme.lower()
    if scheme not in _DEFAULT_PORTS or "@" in split.netloc or split.query or split.fragment:
        return None
    if "?" in url or "#" in url:
        # An empty query or fragment ("...?", "...#") still changes what is addressed.
        return None
    host = (split.hostname or "").lower()
    if not host:
        return None
    if ":" in host:
        if not _IPV6_RE.fullmatch(host):
            return None
    elif not _HOST_RE.fullmatch(host):
        return None
    path = split.path.rstrip("/")
    if path:
        try:
            _checked_path(path)
        except InvalidRequest:
            return None
    return _Origin(scheme, host.rstrip("."), port or _DEFAULT_PORTS[scheme], path)


def _format_origin(origin: _Origin) -> str:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    port = "" if origin.port == _DEFAULT_PORTS[origin.scheme] else f":{origin.port}"
    return f"{origin.scheme}://{host}{port}{origin.path}"


@dataclass(frozen=True, slots=True)
class Peer:
    """One other province's responding gateway, or a plain DICOMweb server.

    ``base_url`` is the DICOMweb service root (``https://gw.gd.example/dicomweb``); it is
    stored normalized (lower-case scheme and host, default port dropped, no trailing
    slash). A ``gateway`` peer has the Ed25519 public key (PEM, SubjectPublicKeyInfo)
    that verifies its assertions; a ``dicomweb`` peer has none and may name a
    credential (the *name* settings resolve to a secret, never the secret itself).

    Raises ``ConfigError`` naming the field that is wrong.
    """

    province: str
    name: str
    base_url: str
    kind: PeerKind = "gateway"
    public_key_pem: str | None = field(default=None, repr=False)
    credential: str | None = None
    public_key: Ed25519PublicKey | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"federation.peers.{self.province}"
        if not is_province_code(self.province):
            raise ConfigError(
                "federation.peers.province", "a GB/T 2260 province-level code such as 440000"
            )
        if not isinstance(self.name, str) or not 0 < len(self.name.strip()) <= 64:
            raise ConfigError(f"{where}.name", "a display name of 1-64 characters")
        if self.kind not in PEER_KINDS:
            raise ConfigError(f"{where}.kind", 'either "gateway" or "dicomweb"')
        origin = _origin(self.base_url) if isinstance(self.base_url, str) else None
        if origin is None:
            raise ConfigError(
                f"{where}.base_url",
                "an http(s) URL with a host, no userinfo, query, fragment, "
                "percent-encoding or dot segments",
            )
        object.__setattr__(self, "base_url", _format_origin(origin))
        if self.kind == "gateway":
            if self.public_key_pem is None:
                raise ConfigError(f"{where}.public_key", "a gateway peer needs its public key")
            if self.credential is not None:
                raise ConfigError(f"{where}.credential", "only dicomweb peers use a credential")
            object.__setattr__(self, "public_key", _public_key(self.public_key_pem, where))
        else:
            if self.public_key_pem is not None:
                raise ConfigError(f"{where}.public_key", "a dicomweb peer does not sign assertions")
            if self.credential is not None and not _CREDENTIAL_RE.fullmatch(self.credential):
                raise ConfigError(
                    f"{where}.credential", "a credential name: letters, digits, '_', '.', '-'"
                )

    @property
    def origin(self) -> str:
        """``scheme://host[:port]`` of the base URL."""
        o = _origin(self.base_url)
        assert o is not None  # normalized in __post_init__
        return _format_origin(_Origin(o.scheme, o.host, o.port, ""))


def _public_key(pem: str, where: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ConfigError(f"{where}.public_key", "a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}.public_key", "a PEM Ed25519 public key")
    return key


class PeerRegistry:
    """The configured peers, by province code; builds every URL the gateway calls a peer on.

    Raises ``ConfigError`` for a duplicate province, the home province among the peers,
    or (unless ``allow_plain_http``, meant for loopback demos and tests) a peer without
    TLS.
    """

    def __init__(
        self, peers: Iterable[Peer], *, home_province: str, allow_plain_http: bool = False
    ) -> None:
        if not is_province_code(home_province):
            raise ConfigError("gateway.province", "a GB/T 2260 province-level code")
        self.home_province = home_province
        self._peers: dict[str, Peer] = {}
        for peer in peers:
            where = f"federation.peers.{peer.province}"
            if peer.province == home_province:
                raise ConfigError(where, "this gateway's own province is not a peer")
            if peer.province in self._peers:
                raise ConfigError(where, "one peer per province")
            if peer.base_url.startswith("http:") and not allow_plain_http:
                raise ConfigError(f"{where}.base_url", "an https URL (peers are called over TLS)")
            self._peers[peer.province] = peer
        # Stable order: by province code.
        self._peers = dict(sorted(self._peers.items()))

    def __contains__(self, province: object) -> bool:
        return province in self._peers

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, province: str) -> Peer:
        """The peer of ``province``; raises ``NotFound`` if there is none."""
        peer = self._peers.get(province)
        if peer is None:
            raise NotFound(f"no federation peer for province {province!r}")
        return peer

    def find(self, province: str) -> Peer | None:
        """The peer of ``province``, or None."""
        return self._peers.get(province)

    def url_for(
        self,
        province: str,
        path: str,
        query: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> str:
        """The URL of ``path`` (relative to the peer's base URL) at ``province``'s peer.

        ``query`` pairs are percent-encoded here; they are never taken from ``path``.
        Raises ``NotFound`` for a province without a peer and ``InvalidRequest`` for a
        path that is absolute, network-path, has dot or empty segments, percent-encoding,
        a backslash, a query or fragment, or characters outside the DICOMweb path set.
        """
        peer = self.get(province)
        relative = _checked_path(path)
        url = f"{peer.base_url}/{relative}"
        if query is not None:
            pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
            if pairs:
                url += "?" + urlencode(pairs, quote_via=quote, safe="")
        # Defence in depth: the result must still be under the registered base URL.
        built = _origin(url.split("?", 1)[0])
        base = _origin(peer.base_url)
        if (
            built is None
            or base is None
            or (built.scheme, built.host, built.port) != (base.scheme, base.host, base.port)
            or not built.path.startswith(base.path + "/")
        ):
            raise _refuse_path("it leaves the peer's base URL")
        return url

    def map_retrieve_url(self, answered_by: str, url: str) -> tuple[str, str] | None:
        """(province, relative path) of a RetrieveURL from ``answered_by``'s answer, or None.

        Only a URL under that peer's own registered base URL maps (same scheme, host and
        port, the base path followed by a segment boundary, no userinfo, query, fragment,
        percent-encoding or dot segments); anything else, a URL under another peer's
        base included, is None. Never raises.
        """
        peer = self._peers.get(answered_by)
        if peer is None or not isinstance(url, str) or len(url) > _MAX_PATH:
            return None
        found = _origin(url)
        base = _origin(peer.base_url)
        if found is None or base is None:
            return None
        if (found.scheme, found.host, found.port) != (base.scheme, base.host, base.port):
            return None
        if not found.path.startswith(base.path + "/"):
            return None
        try:
            relative = _checked_path(found.path[len(base.path) + 1 :])
        except InvalidRequest:
            return None
        return peer.province, relative
