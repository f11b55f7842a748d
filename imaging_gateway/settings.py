"""Settings: one TOML file plus ``IMAGING_GATEWAY_*`` variables -> frozen, validated Settings.

This is the only module that reads ``os.environ``; everything else receives Settings.
Every error names the key and what was expected, in one line (``ConfigError``).

Each default is written once, as the default of its dataclass field; the loader reads it
from there (``_Section``). A field is the TOML key of its name in its section, except a
secret (``repr=False``: the key is ``<name>_env``, naming the variable that holds it) and
fields whose ``metadata["toml"]`` says otherwise (another key, or None: not a key).
``config/gateway.example.toml`` documents every key with its default
(tests/unit/test_example_config.py holds the two together).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from imaging_gateway.errors import ConfigError

ENV_PREFIX = "IMAGING_GATEWAY_"
StoreKind = Literal["s3", "minio", "fs"]
STORE_KINDS: tuple[str, ...] = ("s3", "minio", "fs")
Ownership = Literal["store", "prefix", "institution"]
OWNERSHIPS: tuple[Ownership, ...] = ("store", "prefix", "institution")
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
TLS_VERSIONS: tuple[TlsVersion, ...] = ("TLSv1.2", "TLSv1.3")
IPNetwork = IPv4Network | IPv6Network

# Keys that would hold a secret in the file itself. The file names environment
# variables instead (``*_env``), so a leaked config file leaks nothing.
_SECRET_KEYS = frozenset(
    {
        "access_key",
        "secret_key",
        "secret",
        "password",
        "token",
        "session_token",
        "signing_key",
        "credential",
    }
)
# GB/T 2260 province-level codes: two digits of province followed by 0000.
_PROVINCES = frozenset(
    {
        "11",
        "12",
        "13",
        "14",
        "15",
        "21",
        "22",
        "23",
        "31",
        "32",
        "33",
        "34",
        "35",
        "36",
        "37",
        "41",
        "42",
        "43",
        "44",
        "45",
        "46",
        "50",
        "51",
        "52",
        "53",
        "54",
        "61",
        "62",
        "63",
        "64",
        "65",
        "71",
        "81",
        "82",
    }
)
_SECTIONS = frozenset(
    {"gateway", "index", "stores", "sync", "security", "tls", "encryption", "federation"}
)
DATA_DIR = Path("data")
"""Default ``gateway.data_dir``; the default files below live under it and move with it."""
KEYS_DIR = DATA_DIR / "keys"
_STORE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HOSPITAL_CODE = re.compile(r"^H\d{11}$")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    name: str
    """Shown in logs and answers to peers; default ``imaging-gateway <province>``."""
    province: str = "110000"
    listen_host: str = field(default="127.0.0.1", metadata={"toml": "listen"})
    listen_port: int = field(default=8080, metadata={"toml": "listen"})
    data_dir: Path = DATA_DIR
    national_id_issuers: tuple[str, ...] = ("CN-RESIDENT-ID",)
    write_store: str | None = None
    """Name of the store STOW-RS writes into; None: STOW-RS is not enabled."""
    transcode_max_bytes: int = 512 * 1024 * 1024
    """Most memory one WADO-RS transcoding may take (stored plus decoded bytes of an
    instance or frame); larger ones are refused with 406 and are sent only as stored."""
    public_base_url: str | None = None
    """``scheme://host[:port][/prefix]`` clients reach the gateway at, without a trailing
    slash; every absolute URL the gateway writes starts with it. None: derived from each
    request (``api.urls``)."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose ``X-Forwarded-Proto/Host/Prefix`` headers are believed."""
    inflate_max_bytes: int = 64 * 1024 * 1024
    """Most bytes a Deflated Explicit VR Little Endian dataset is inflated to when WADO-RS
    reads it whole (metadata, frames, rendered, bulk data); beyond, 406 (sent only as
    stored). Header parses (sync, STOW) inflate at most ``sync.max_header_bytes``."""


@dataclass(frozen=True, slots=True)
class IndexSettings:
    url: str
    """``sqlite:///path`` or ``postgresql://user@host:port/db`` (no password in the URL)."""
    password: str | None = field(default=None, repr=False)
    echo: bool = False
    create_folder: bool = field(default=False, metadata={"toml": None})
    """Create a missing folder of the SQLite file: only for one in ``gateway.data_dir``,
    which the gateway owns; elsewhere a missing folder is a wrong ``index.url``."""


@dataclass(frozen=True, slots=True)
class StoreSettings:
    name: str
    kind: StoreKind
    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""
    region: str = "us-east-1"
    path: Path | None = None
    """Root directory, for ``kind = "fs"``."""
    hospital: str | None = None
    """Institution code of the hospital whose objects this store holds, if only one."""
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    max_connections: int = 64
    retries: int = 5
    timeout_s: float = 30.0
    ownership: Ownership = "institution"
    """How the producing hospital of an object is found: the store's ``hospital``, the
    object key's prefix (``hospitals``), or the object's DICOM institution code."""
    hospitals: tuple[tuple[str, str], ...] = ()
    """(key prefix, institution code) pairs, longest prefix first (``prefix`` ownership)."""

    def producer(self, key: str, institution_code: str | None) -> str | None:
        """The producing hospital of the object at ``key`` (relative to ``prefix``).

        ``store``: ``hospital``; ``prefix``: the code of the longest prefix of ``key`` in
        ``hospitals``, None when none matches (the study then has no producer: nobody
        sees it without consent or break-glass); ``institution``: ``institution_code``
        (the header's InstitutionCodeSequence). Raises nothing.
        """
        if self.ownership == "store":
            return self.hospital
        if self.ownership == "prefix":
            return next((code for p, code in self.hospitals if key.startswith(p)), None)
        return institution_code

    @property
    def producing_hospitals(self) -> frozenset[str] | None:
        """The hospitals a sync of this store can make producers; None: any (institution)."""
        if self.ownership == "store":
            return frozenset({self.hospital} if self.hospital else ())
        if self.ownership == "prefix":
            return frozenset(code for _, code in self.hospitals)
        return None

    def key_prefix_for(self, hospital: str, key: str) -> str | None:
        """The first of ``hospital``'s prefixes under which ``key`` is that hospital's.

        Only for ``prefix`` ownership: an object a hospital writes must come back as its
        own when the store is synced (a longer prefix of another hospital could shadow
        it). None when there is no such prefix. Raises nothing.
        """
        for p, code in sorted(self.hospitals, key=lambda pair: (len(pair[0]), pair[0])):
            if code == hospital and self.producer(p + key, None) == hospital:
                return p
        return None


@dataclass(frozen=True, slots=True)
class SyncSettings:
    page_size: int = 1000
    concurrency: int = 32
    header_read_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024 * 1024
    lease_s: int = 60
    """How long a worker's claim on a slice lasts unless renewed (it renews every third)."""


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    token_key_file: Path = KEYS_DIR / "token-signing.pem"
    token_max_ttl_s: int = 90 * 24 * 3600
    patient_token_key_file: Path = KEYS_DIR / "patient-token.key"
    """Secret (32 bytes) of the keyed hash that stands for a patient in logs and federation."""
    audit_key_file: Path = KEYS_DIR / "audit-chain.key"
    """Secret (32 bytes) keying the audit log's hash chain; verify needs it."""
    break_glass_minutes: int = 30
    consent_max_days: int = 365
    search_max_results: int = 1000
    cors_origins: tuple[str, ...] = ()
    """Browser origins (e.g. a viewer's) allowed to call the API; ``"*"`` for any."""


ENCRYPTION_SUITES: tuple[str, ...] = ("AES-256-GCM", "SM4-GCM")
MIN_SEGMENT_SIZE = 4 * 1024
MAX_SEGMENT_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EncryptionSettings:
    keyring_file: Path = KEYS_DIR / "keyring.json"
    """The 0600 keyring file (``imaging-gateway keys init``); keys are never in the TOML."""
    enabled: bool = False
    """Encrypt what the gateway writes; objects already encrypted are read whenever a
    keyring file exists, whatever this says."""
    suite: str = "AES-256-GCM"
    """AEAD suite of new objects and of the keyring: ``AES-256-GCM`` or ``SM4-GCM``."""
    segment_size: int = 64 * 1024
    """Plaintext bytes per authenticated segment of a new encrypted object."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Transport security: the server's certificate, client certificates, outbound trust.

    Files are only named here; ``crypto.tls`` reads and checks them when it builds
    the SSL contexts.
    """

    cert_file: Path | None = None
    """PEM certificate (chain) the server presents; with ``key_file`` the server is HTTPS."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``, unencrypted, readable by its owner only (0600)."""
    client_ca_file: Path | None = None
    """PEM bundle of the CAs whose client certificates the server accepts (mTLS)."""
    client_cert_routes: tuple[str, ...] = ()
    """Path prefixes (``/admin``) that need a verified client certificate; others don't."""
    min_version: TlsVersion = "TLSv1.2"
    """Lowest TLS version the server accepts."""
    ca_file: Path | None = None
    """PEM bundle trusted for outbound calls besides the system store."""

    @property
    def enabled(self) -> bool:
        """Whether the server speaks TLS (both ``cert_file`` and ``key_file`` are set)."""
        return self.cert_file is not None and self.key_file is not None


PeerKindSetting = Literal["gateway", "dicomweb"]
PEER_KINDS: tuple[str, ...] = ("gateway", "dicomweb")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """One ``[[federation.peers]]`` table: another province's gateway or a DICOMweb server.

    Files are only named here; ``federation.client.load_registry`` reads them at start-up.
    """

    province: str
    name: str
    base_url: str
    """The peer's DICOMweb root, e.g. ``https://gw.sh.example/dicomweb``."""
    kind: PeerKindSetting = "gateway"
    public_key_file: Path | None = None
    """PEM Ed25519 public key verifying the peer's assertions (``gateway`` peers)."""
    ca_file: Path | None = None
    """PEM bundle trusted for this peer's TLS certificate (only it); default ``tls.ca_file``
    plus the system store."""
    certificate_subject: str | None = None
    """When set, the peer's client certificate must name this (CN, else first SAN)."""
    credential_env: str | None = None
    """Name of the environment variable holding a ``dicomweb`` peer's bearer token."""
    credential: str | None = field(default=None, repr=False)
    """The resolved bearer token (from ``credential_env``); never in the TOML."""


@dataclass(frozen=True, slots=True)
class FederationSettings:
    """Cross-province search and retrieve (``[federation]``)."""

    signing_key_file: Path = KEYS_DIR / "federation-signing.pem"
    """Ed25519 private key (PEM, 0600, created if absent) signing this gateway's assertions."""
    enabled: bool = False
    deadline_ms: int = 1500
    """One deadline for the whole fan-out of a federated search."""
    retrieve_timeout_s: float = 300.0
    """Upper bound of one proxied retrieve from a peer."""
    max_answer_bytes: int = 8 * 1024 * 1024
    """A peer's search answer larger than this marks that peer failed for the request."""
    breaker_failures: int = 3
    """Consecutive failures that open a peer's circuit breaker."""
    breaker_cool_down_s: float = 30.0
    """How long an open breaker refuses calls before one probe goes through."""
    assertion_validity_s: int = 60
    allow_plain_http: bool = False
    """Allow ``http://`` peers (loopback demos only; peers are called over TLS)."""
    peers: tuple[PeerSettings, ...] = ()
    cache_store: str | None = None
    """A ``[[stores]]`` table of its own for answers retrieved from peers (needs
    ``[encryption] enabled``); None: no cache (``federation.cache``)."""
    cache_max_bytes: int = 10 * 1024**3
    cache_ttl_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Settings:
    gateway: GatewaySettings
    index: IndexSettings
    stores: tuple[StoreSettings, ...]
    sync: SyncSettings
    security: SecuritySettings
    tls: TlsSettings
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)

    def store(self, name: str) -> StoreSettings:
        """The store called ``name``; ``ConfigError`` naming the known ones otherwise."""
        for s in self.stores:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.stores) or "none configured"
        raise ConfigError("stores", f"no store named {name!r} (known: {known})")


# ---------------------------------------------------------------------------
# Loading


def load_settings(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or the embedded defaults when None), apply env overrides, validate.

    Raises ``ConfigError`` naming the first wrong or missing key.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any]
    if path is None:
        raw = {}
    else:
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"is not valid TOML ({exc})") from None
    raw = _apply_env(raw, env)
    # One rule for every path, from the file or an IMAGING_GATEWAY_* variable: relative to
    # the config file's folder (the current directory without a file), resolved here once,
    # so every later user gets absolute paths and nothing joins them again.
    base_dir = (path.absolute().parent if path is not None else Path.cwd().absolute())
    return _build(raw, env, base_dir)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``IMAGING_GATEWAY_<SECTION>__<KEY>`` and ``IMAGING_GATEWAY_STORES__<NAME>__<KEY>``."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    stores = [dict(s) if isinstance(s, dict) else s for s in raw.get("stores", [])]
    if stores:
        out["stores"] = stores
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] == "stores" and len(parts) == 3:
            wanted = parts[1].replace("_", "-")
            for s in stores:
                if isinstance(s, dict) and str(s.get("name", "")).replace("_", "-") == wanted:
                    s[parts[2]] = value
                    break
            else:
                raise ConfigError(name, "names a store that is not in the config file")
        elif len(parts) == 2 and parts[0] in _SECTIONS - {"stores"}:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(parts[0], "expected a table")
            section[parts[1]] = value
        else:
            raise ConfigError(name, "expected IMAGING_GATEWAY_<SECTION>__<KEY> for a known section")
    return out


def toml_key(f: Field[Any]) -> str | None:
    """The TOML key that sets field ``f`` of a settings dataclass; None: no key sets it.

    ``metadata["toml"]`` when given; else ``<name>_env`` for a secret (``repr=False``),
    else the field's name. Raises nothing.
    """
    if "toml" in f.metadata:
        key: str | None = f.metadata["toml"]
        return key
    return f"{f.name}_env" if not f.repr else f.name


def field_default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (its factory called); None when
    the field has none. Raises ``KeyError`` for a name that is not a field."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None
    raise KeyError(f"{cls.__name__} has no field {name!r}")


class _Section:
    """Typed access to one TOML table that remembers which keys were read.

    A key read without an explicit default gets the default of the field of the same
    name of ``cls`` (the dataclass this table builds): each default is written once.
    """

    def __init__(self, where: str, table: Any, cls: type[Any] | None = None) -> None:
        if not isinstance(table, dict):
            raise ConfigError(where, "expected a table")
        self.where = where
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()
        self._names = frozenset(f.name for f in fields(cls)) if cls is not None else frozenset()
        self._cls = cls

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}"

    def default(self, key: str) -> Any:
        """The default of the field called ``key``; None: none (the key is required)."""
        if self._cls is None or key not in self._names:
            return None
        return field_default(self._cls, key)

    def get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.table.get(key, default)

    def _value(self, key: str, default: Any) -> Any:
        """The key's value, else ``default``, else the field's default; ``ConfigError``
        naming the key when there is none of the three."""
        v = self.get(key, self.default(key) if default is None else default)
        if v is None:
            raise ConfigError(self._key(key), "missing")
        return v

    def str_(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        """The string at ``key``; ``required``: even if its field has a default (that
        default then stands for "not applicable", as an fs store's ``endpoint``)."""
        if required:
            default = None
        elif default is None:
            default = self.default(key)
        v = self.get(key, default)
        if v is None:
            raise ConfigError(self._key(key), "missing; expected a string")
        if not isinstance(v, str):
            raise ConfigError(self._key(key), f"expected a string, got {type(v).__name__}")
        return v

    def opt_str(self, key: str) -> str | None:
        v = self.get(key, None)
        if v is None or v == "":
            return None
        if not isinstance(v, str):
            raise ConfigError(self._key(key), f"expected a string, got {type(v).__name__}")
        return v

    def int_(
        self, key: str, default: int | None = None, *, minimum: int = 0, maximum: int = 1 << 40
    ) -> int:
        v = self._value(key, default)
        if isinstance(v, str):
            try:
                v = int(v)
            except ValueError:
                raise ConfigError(self._key(key), f"expected an integer, got {v!r}") from None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(self._key(key), f"expected an integer, got {type(v).__name__}")
        if not minimum <= v <= maximum:
            raise ConfigError(self._key(key), f"expected an integer in [{minimum}, {maximum}]")
        return v

    def float_(self, key: str, default: float | None = None, *, minimum: float = 0.0) -> float:
        v = self._value(key, default)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(self._key(key), f"expected a number, got {v!r}") from None
        if f < minimum:
            raise ConfigError(self._key(key), f"expected a number >= {minimum}")
        return f

    def bool_(self, key: str, default: bool | None = None) -> bool:
        v = self._value(key, default)
        if isinstance(v, str) and v.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return v.lower() in {"true", "1", "yes"}
        if not isinstance(v, bool):
            raise ConfigError(self._key(key), f"expected true or false, got {v!r}")
        return v

    def str_list(self, key: str, default: Sequence[str] | None = None) -> tuple[str, ...]:
        v = self._value(key, default)
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            raise ConfigError(self._key(key), "expected a list of strings")
        return tuple(v)

    def secret_from_env(self, key: str, env: Mapping[str, str]) -> str | None:
        """Resolve ``<key>_env``: the *name* of the variable holding the secret."""
        var = self.opt_str(f"{key}_env")
        if var is None:
            return None
        value = env.get(var)
        if not value:
            raise ConfigError(self._key(f"{key}_env"), f"environment variable {var} is not set")
        return value

    def finish(self) -> None:
        for key in self.table:
            if key in _SECRET_KEYS:
                raise ConfigError(
                    self._key(key),
                    f"a literal secret is refused; set {key}_env to the name of an "
                    "environment variable that holds it",
                )
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise ConfigError(self._key(unknown[0]), "unknown key")


def _path(base: Path, value: str) -> Path:
    """``value`` as an absolute path: relative ones are joined to ``base`` (absolute)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _path_or(section: _Section, key: str, base: Path, default: Path) -> Path:
    """The path at ``key`` (relative to ``base``), else ``default`` (already absolute)."""
    value = section.opt_str(key)
    return default if value is None else _path(base, value)


def _data_file(section: _Section, key: str, base: Path, data_dir: Path) -> Path:
    """The path at ``key``, else the field's default (under ``DATA_DIR``) moved under
    ``data_dir``: the default files follow ``gateway.data_dir``."""
    default: Path = section.default(key)
    return _path_or(section, key, base, data_dir / default.relative_to(DATA_DIR))


def _public_base_url(value: str | None) -> str | None:
    """``gateway.public_base_url`` without its trailing slash; ``ConfigError`` unless it is
    an absolute http(s) URL with a host and no user, query or fragment."""
    if value is None:
        return None
    expected = "an absolute http(s) URL such as https://pacs.example.cn[:port][/prefix]"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError("gateway.public_base_url", expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("gateway.public_base_url", expected)
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError("gateway.public_base_url", f"{expected}, without a query or fragment")
    if parts.username is not None or any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError("gateway.public_base_url", f"{expected}, without user or spaces")
    return value.rstrip("/")


def _networks(key: str, values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """IP addresses or CIDR blocks (``10.0.0.0/8``, ``::1``); ``ConfigError`` naming ``key``."""
    out: list[IPNetwork] = []
    for value in values:
        try:
            out.append(ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                key, f"expected IP addresses or CIDR blocks (10.0.0.0/8), got {value!r}"
            ) from None
    return tuple(out)


def _build(raw: dict[str, Any], env: Mapping[str, str], base: Path) -> Settings:
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown section (expected gateway, index, stores, sync, security, tls, encryption,"
            " federation)",
        )

    g = _Section("gateway", raw.get("gateway", {}), GatewaySettings)
    province = g.str_("province")
    if not (
        re.fullmatch(r"\d{6}", province)
        and province.endswith("0000")
        and province[:2] in _PROVINCES
    ):
        raise ConfigError(
            "gateway.province", "expected a GB/T 2260 province-level code such as 110000"
        )
    listen = g.str_("listen", f"{g.default('listen_host')}:{g.default('listen_port')}")
    host, _, port_s = listen.rpartition(":")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError("gateway.listen", f"expected host:port, got {listen!r}")
    data_dir = _path(base, g.str_("data_dir", str(g.default("data_dir"))))
    gateway = GatewaySettings(
        province=province,
        name=g.str_("name", f"imaging-gateway {province}"),
        listen_host=host.strip("[]"),
        listen_port=int(port_s),
        data_dir=data_dir,
        national_id_issuers=g.str_list("national_id_issuers"),
        write_store=g.opt_str("write_store"),
        transcode_max_bytes=g.int_("transcode_max_bytes", minimum=1024 * 1024, maximum=1 << 36),
        public_base_url=_public_base_url(g.opt_str("public_base_url")),
        trusted_proxies=_networks("gateway.trusted_proxies", g.str_list("trusted_proxies")),
        inflate_max_bytes=g.int_("inflate_max_bytes", minimum=1024 * 1024, maximum=1 << 36),
    )
    g.finish()

    i = _Section("index", raw.get("index", {}), IndexSettings)
    url = i.str_("url", f"sqlite:///{data_dir / 'index.sqlite3'}")
    parts = urlsplit(url)
    create_folder = False
    if parts.scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ConfigError("index.url", "expected sqlite:///PATH")
        if i.opt_str("password_env") is not None:
            raise ConfigError(
                "index.password_env", "only for a postgresql:// index.url; SQLite has no password"
            )
        db_path = url[len("sqlite:///") :]
        if db_path != ":memory:":
            db_file = _path(base, db_path)
            url = f"sqlite:///{db_file}"
            create_folder = db_file.parent == data_dir
    elif parts.scheme in {"postgresql", "postgres"}:
        if parts.password:
            raise ConfigError(
                "index.url", "a password in the URL is refused; set index.password_env instead"
            )
    else:
        raise ConfigError("index.url", f"expected sqlite:///... or postgresql://..., got {url!r}")
    index = IndexSettings(
        url=url,
        password=i.secret_from_env("password", env),
        echo=i.bool_("echo"),
        create_folder=create_folder,
    )
    i.finish()

    stores_raw = raw.get("stores", [])
    if not isinstance(stores_raw, list):
        raise ConfigError("stores", "expected an array of tables ([[stores]])")
    stores: list[StoreSettings] = []
    for n, table in enumerate(stores_raw):
        stores.append(_store(f"stores[{n}]", table, env, base))
    names = [s.name for s in stores]
    for n, name in enumerate(names):
        if name in names[:n]:
            raise ConfigError(f"stores[{n}].name", f"duplicate store name {name!r}")
    if gateway.write_store is not None and gateway.write_store not in names:
        known = ", ".join(names) or "none configured"
        raise ConfigError(
            "gateway.write_store", f"expected the name of a [[stores]] table (known: {known})"
        )

    y = _Section("sync", raw.get("sync", {}), SyncSettings)
    sync = SyncSettings(
        page_size=y.int_("page_size", minimum=1, maximum=1000),
        concurrency=y.int_("concurrency", minimum=1, maximum=1024),
        header_read_bytes=y.int_("header_read_bytes", minimum=1024),
        max_header_bytes=y.int_("max_header_bytes", minimum=1024),
        lease_s=y.int_("lease_s", minimum=3, maximum=3600),
    )
    y.finish()

    s = _Section("security", raw.get("security", {}), SecuritySettings)
    security = SecuritySettings(
        token_key_file=_data_file(s, "token_key_file", base, data_dir),
        token_max_ttl_s=s.int_("token_max_ttl_s", minimum=60),
        patient_token_key_file=_data_file(s, "patient_token_key_file", base, data_dir),
        audit_key_file=_data_file(s, "audit_key_file", base, data_dir),
        break_glass_minutes=s.int_("break_glass_minutes", minimum=1, maximum=24 * 60),
        consent_max_days=s.int_("consent_max_days", minimum=1, maximum=3650),
        search_max_results=s.int_("search_max_results", minimum=1, maximum=100_000),
        cors_origins=s.str_list("cors_origins"),
    )
    s.finish()

    e = _Section("encryption", raw.get("encryption", {}), EncryptionSettings)
    suite = e.str_("suite")
    if suite not in ENCRYPTION_SUITES:
        raise ConfigError(
            "encryption.suite", f"expected one of {', '.join(ENCRYPTION_SUITES)}, got {suite!r}"
        )
    encryption = EncryptionSettings(
        keyring_file=_data_file(e, "keyring_file", base, data_dir),
        enabled=e.bool_("enabled"),
        suite=suite,
        segment_size=e.int_("segment_size", minimum=MIN_SEGMENT_SIZE, maximum=MAX_SEGMENT_SIZE),
    )
    e.finish()
    tls = _tls(_Section("tls", raw.get("tls", {}), TlsSettings), base)
    federation = _federation(raw.get("federation", {}), env, base, gateway.province, data_dir)
    _check_cache_store(federation, gateway, names, encryption)
    return Settings(gateway, index, tuple(stores), sync, security, tls, encryption, federation)


def _federation(
    table: Any, env: Mapping[str, str], base: Path, province: str, data_dir: Path
) -> FederationSettings:
    """The ``[federation]`` table and its ``[[federation.peers]]``; shapes only.

    Raises ``ConfigError`` naming the key: a bad number, a peer without province, base
    URL or key, a duplicate or home province, a credential on a gateway peer, a
    credential variable that is not set.
    """
    f = _Section("federation", table, FederationSettings)
    peers_raw = f.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("federation.peers", "expected an array of tables ([[federation.peers]])")
    peers: list[PeerSettings] = []
    for n, peer_table in enumerate(peers_raw):
        peer = _peer(f"federation.peers[{n}]", peer_table, env, base)
        if peer.province == province:
            raise ConfigError(f"federation.peers[{n}].province", "this gateway's own province")
        if any(p.province == peer.province for p in peers):
            raise ConfigError(f"federation.peers[{n}].province", "one peer per province")
        peers.append(peer)
    federation = FederationSettings(
        signing_key_file=_data_file(f, "signing_key_file", base, data_dir),
        enabled=f.bool_("enabled"),
        deadline_ms=f.int_("deadline_ms", minimum=50, maximum=60_000),
        retrieve_timeout_s=f.float_("retrieve_timeout_s", minimum=1.0),
        max_answer_bytes=f.int_("max_answer_bytes", minimum=1024, maximum=1024 * 1024 * 1024),
        breaker_failures=f.int_("breaker_failures", minimum=1, maximum=1000),
        breaker_cool_down_s=f.float_("breaker_cool_down_s", minimum=0.1),
        assertion_validity_s=f.int_("assertion_validity_s", minimum=5, maximum=300),
        allow_plain_http=f.bool_("allow_plain_http"),
        peers=tuple(peers),
        cache_store=f.opt_str("cache_store"),
        cache_max_bytes=f.int_("cache_max_bytes", minimum=1024**2),
        cache_ttl_s=f.float_("cache_ttl_s", minimum=1.0),
    )
    f.finish()
    return federation


def _check_cache_store(
    federation: FederationSettings, gateway: GatewaySettings, names: Sequence[str],
    encryption: EncryptionSettings,
) -> None:
    """The cache of other provinces' studies: a store of its own, encrypted at rest."""
    name = federation.cache_store
    if name is None:
        return
    if name not in names:
        known = ", ".join(names) or "none configured"
        raise ConfigError(
            "federation.cache_store", f"expected the name of a [[stores]] table (known: {known})"
        )
    if name == gateway.write_store:
        raise ConfigError(
            "federation.cache_store", "must be a store of its own, not the write store"
        )
    if not encryption.enabled:
        raise ConfigError(
            "federation.cache_store",
            "holds other provinces' patient data: turn on [encryption] (enabled = true)",
        )


def _peer(where: str, table: Any, env: Mapping[str, str], base: Path) -> PeerSettings:
    t = _Section(where, table, PeerSettings)
    province = t.str_("province")
    if not (
        re.fullmatch(r"\d{6}", province)
        and province.endswith("0000")
        and province[:2] in _PROVINCES
    ):
        raise ConfigError(f"{where}.province", "expected a GB/T 2260 province-level code")
    kind = t.str_("kind")
    if kind not in PEER_KINDS:
        raise ConfigError(f"{where}.kind", f"expected one of {', '.join(PEER_KINDS)}")
    base_url = t.str_("base_url")
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{where}.base_url", "expected http(s)://host[:port]/dicomweb-root")
    key_file = t.opt_str("public_key_file")
    ca_file = t.opt_str("ca_file")
    credential_env = t.opt_str("credential_env")
    if credential_env is not None and not _ENV_NAME.match(credential_env):
        raise ConfigError(f"{where}.credential_env", "expected an environment variable name")
    if kind == "gateway":
        if key_file is None:
            raise ConfigError(f"{where}.public_key_file", "missing; a gateway peer needs it")
        if credential_env is not None:
            raise ConfigError(f"{where}.credential_env", "only dicomweb peers use a credential")
    elif key_file is not None:
        raise ConfigError(f"{where}.public_key_file", "a dicomweb peer does not sign assertions")
    peer = PeerSettings(
        province=province,
        name=t.str_("name", province),
        base_url=base_url.rstrip("/"),
        kind="gateway" if kind == "gateway" else "dicomweb",
        public_key_file=None if key_file is None else _path(base, key_file),
        ca_file=None if ca_file is None else _path(base, ca_file),
        certificate_subject=t.opt_str("certificate_subject"),
        credential_env=credential_env,
        credential=t.secret_from_env("credential", env),
    )
    t.finish()
    return peer


def _tls(t: _Section, base: Path) -> TlsSettings:
    """The ``[tls]`` table; shapes only (``crypto.tls`` checks the files).

    Raises ``ConfigError`` naming the key: half a certificate/key pair, mTLS settings
    without TLS or without ``client_ca_file``, a route that is not a path, an unknown
    ``min_version``.
    """

    def opt_path(key: str) -> Path | None:
        value = t.opt_str(key)
        return None if value is None else _path(base, value)

    cert_file, key_file = opt_path("cert_file"), opt_path("key_file")
    if (cert_file is None) != (key_file is None):
        missing = "tls.key_file" if key_file is None else "tls.cert_file"
        raise ConfigError(missing, "missing; set both tls.cert_file and tls.key_file, or neither")
    client_ca_file = opt_path("client_ca_file")
    if client_ca_file is not None and cert_file is None:
        raise ConfigError(
            "tls.client_ca_file", "needs tls.cert_file and tls.key_file (mTLS is TLS first)"
        )
    routes: list[str] = []
    for route in t.str_list("client_cert_routes"):
        if not route.startswith("/") or any(c in route for c in "?#* \t"):
            raise ConfigError(
                "tls.client_cert_routes", f"expected path prefixes such as /admin, got {route!r}"
            )
        routes.append(route.rstrip("/") or "/")
    if routes and client_ca_file is None:
        raise ConfigError(
            "tls.client_cert_routes",
            "needs tls.client_ca_file (the CAs whose client certificates are accepted)",
        )
    min_version = t.str_("min_version")
    if min_version not in TLS_VERSIONS:
        raise ConfigError(
            "tls.min_version", f"expected {' or '.join(TLS_VERSIONS)}, got {min_version!r}"
        )
    tls = TlsSettings(
        cert_file=cert_file,
        key_file=key_file,
        client_ca_file=client_ca_file,
        client_cert_routes=tuple(routes),
        min_version="TLSv1.3" if min_version == "TLSv1.3" else "TLSv1.2",
        ca_file=opt_path("ca_file"),
    )
    t.finish()
    return tls


def _store(where: str, table: Any, env: Mapping[str, str], base: Path) -> StoreSettings:
    t = _Section(where, table, StoreSettings)
    name = t.str_("name")
    if not _STORE_NAME.match(name):
        raise ConfigError(f"{where}.name", "expected lowercase letters, digits, '-' or '_'")
    kind = t.str_("kind")
    if kind not in STORE_KINDS:
        raise ConfigError(
            f"{where}.kind", f"expected one of {', '.join(STORE_KINDS)}, got {kind!r}"
        )
    hospital = t.opt_str("hospital")
    if hospital is not None and not _HOSPITAL_CODE.match(hospital):
        raise ConfigError(f"{where}.hospital", "expected an institution code such as H11010800028")
    prefix = t.str_("prefix")
    if prefix.startswith("/"):
        raise ConfigError(f"{where}.prefix", "expected a key prefix without a leading '/'")
    hospitals = _hospitals(f"{where}.hospitals", t.get("hospitals", None))
    ownership = _ownership(where, t.opt_str("ownership"), hospital=hospital, hospitals=hospitals)
    common: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "prefix": prefix,
        "hospital": hospital,
        "ownership": ownership,
        "hospitals": hospitals,
        "retries": t.int_("retries", minimum=0, maximum=20),
        "timeout_s": t.float_("timeout_s", minimum=0.1),
        "max_connections": t.int_("max_connections", minimum=1, maximum=4096),
    }
    if kind == "fs":
        store = StoreSettings(**common, path=_path(base, t.str_("path")))
    else:
        endpoint = t.str_("endpoint", required=True)
        ep = urlsplit(endpoint)
        if ep.scheme not in {"http", "https"} or not ep.hostname:
            raise ConfigError(
                f"{where}.endpoint", f"expected http(s)://host[:port], got {endpoint!r}"
            )
        if ep.username or ep.password:
            raise ConfigError(
                f"{where}.endpoint", "credentials in the URL are refused; use *_env keys"
            )
        bucket = t.str_("bucket", required=True)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ConfigError(f"{where}.bucket", "expected an S3 bucket name (3-63 of a-z 0-9 . -)")
        store = StoreSettings(
            **common,
            endpoint=endpoint.rstrip("/"),
            bucket=bucket,
            region=t.str_("region"),
            verify_tls=t.bool_("verify_tls"),
            access_key=t.secret_from_env("access_key", env),
            secret_key=t.secret_from_env("secret_key", env),
        )
        if (store.access_key is None) != (store.secret_key is None):
            raise ConfigError(
                f"{where}.secret_key_env", "set both access_key_env and secret_key_env, or neither"
            )
    t.finish()
    return store


def _hospitals(where: str, table: Any) -> tuple[tuple[str, str], ...]:
    """``[stores.hospitals]``: key prefix -> institution code, longest prefix first.

    Raises ``ConfigError`` naming the key: not a table, empty, a prefix that is empty,
    starts with '/' or does not end with '/', a value that is not an institution code.
    """
    if table is None:
        return ()
    if not isinstance(table, dict):
        raise ConfigError(where, 'expected a table of "key prefix/" = "institution code"')
    if not table:
        raise ConfigError(where, "expected at least one key prefix")
    pairs: list[tuple[str, str]] = []
    for key_prefix, code in table.items():
        at = f'{where}."{key_prefix}"'
        if not key_prefix or key_prefix.startswith("/") or not key_prefix.endswith("/"):
            # The trailing '/' keeps "H1/" from claiming "H10/...".
            raise ConfigError(at, "expected a key prefix ending in '/', without a leading '/'")
        if not isinstance(code, str) or not _HOSPITAL_CODE.match(code):
            raise ConfigError(at, "expected an institution code such as H11010800028")
        pairs.append((key_prefix, code))
    return tuple(sorted(pairs, key=lambda pair: (-len(pair[0]), pair[0])))


def _ownership(
    where: str,
    value: str | None,
    *,
    hospital: str | None,
    hospitals: tuple[tuple[str, str], ...],
) -> Ownership:
    """``ownership``, checked against ``hospital`` and ``hospitals``.

    Unset, it is ``store`` when ``hospital`` is set, else ``institution`` (the behaviour
    before the key existed); ``hospitals`` needs it said explicitly. Raises
    ``ConfigError`` naming the key for an unknown value or a missing or contradicting
    ``hospital`` / ``hospitals``.
    """
    if value is None:
        if hospitals:
            raise ConfigError(f"{where}.ownership", 'missing; [stores.hospitals] needs "prefix"')
        return "store" if hospital is not None else "institution"
    if value not in OWNERSHIPS:
        raise ConfigError(
            f"{where}.ownership", f"expected one of {', '.join(OWNERSHIPS)}, got {value!r}"
        )
    if value == "store" and hospital is None:
        raise ConfigError(f"{where}.hospital", 'missing; ownership = "store" needs it')
    if value == "prefix" and not hospitals:
        raise ConfigError(f"{where}.hospitals", 'missing; ownership = "prefix" needs it')
    if value != "store" and hospital is not None:
        raise ConfigError(f"{where}.hospital", f'only for ownership = "store", not {value!r}')
    if value != "prefix" and hospitals:
        raise ConfigError(f"{where}.hospitals", f'only for ownership = "prefix", not {value!r}')
    return "prefix" if value == "prefix" else "store" if value == "store" else "institution"
