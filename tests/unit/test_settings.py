"""Settings: defaults, env overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imaging_gateway.errors import ConfigError
from imaging_gateway.settings import load_settings

GOOD = """
[gateway]
province = "440000"
listen = "0.0.0.0:9000"
data_dir = "/var/lib/ig"

[index]
url = "postgresql://ig@db:5432/ig"
password_env = "IG_DB_PASSWORD"

[[stores]]
name = "gz-pacs"
kind = "s3"
endpoint = "https://oss.example.cn"
bucket = "dicom-archive"
prefix = "studies/"
access_key_env = "GZ_KEY"
secret_key_env = "GZ_SECRET"
hospital = "H44010600011"

[[stores]]
name = "local"
kind = "fs"
path = "store"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_need_no_file() -> None:
    s = load_settings(None, environ={})
    assert s.gateway.province == "110000"
    assert s.gateway.transcode_max_bytes == 512 * 1024 * 1024
    assert s.index.url.startswith("sqlite:///")
    assert s.stores == ()


def test_full_file_with_secrets_from_env(tmp_path: Path) -> None:
    env = {"IG_DB_PASSWORD": "pw", "GZ_KEY": "AK", "GZ_SECRET": "SK"}
    s = load_settings(write(tmp_path, GOOD), environ=env)
    gz = s.store("gz-pacs")
    assert (gz.access_key, gz.secret_key, gz.prefix, gz.hospital) == (
        "AK", "SK", "studies/", "H44010600011"
    )
    assert s.index.password == "pw"
    assert s.store("local").path == tmp_path / "store"
    # Secrets never show in a repr (they would end up in logs).
    assert "SK" not in repr(s) and "pw" not in repr(s.index)


def test_env_overrides_keys(tmp_path: Path) -> None:
    env = {
        "IG_DB_PASSWORD": "pw", "GZ_KEY": "AK", "GZ_SECRET": "SK",
        "IMAGING_GATEWAY_GATEWAY__LISTEN": "127.0.0.1:7000",
        "IMAGING_GATEWAY_STORES__GZ_PACS__BUCKET": "other-bucket",
        "IMAGING_GATEWAY_SYNC__CONCURRENCY": "8",
        "IMAGING_GATEWAY_GATEWAY__TRANSCODE_MAX_BYTES": "2097152",
    }
    s = load_settings(write(tmp_path, GOOD), environ=env)
    assert s.gateway.listen_port == 7000
    assert s.store("gz-pacs").bucket == "other-bucket"
    assert s.sync.concurrency == 8
    assert s.gateway.transcode_max_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[gateway]\nprovince = "110100"', "gateway.province"),
        ('[gateway]\nprovince = "990000"', "gateway.province"),
        ('[gateway]\nlisten = "nowhere"', "gateway.listen"),
        ('[gateway]\nlsiten = "x:1"', "gateway.lsiten"),
        ("[gateway]\ntranscode_max_bytes = 1000", "gateway.transcode_max_bytes"),
        ('[gateway]\ntranscode_max_bytes = "big"', "gateway.transcode_max_bytes"),
        ('[index]\nurl = "mysql://x/y"', "index.url"),
        ('[index]\nurl = "postgresql://u:secret@h/db"', "index.url"),
        ('[[stores]]\nname = "a"\nkind = "ftp"', "stores[0].kind"),
        ('[[stores]]\nkind = "fs"\npath = "x"', "stores[0].name"),
        ('[[stores]]\nname = "a"\nkind = "s3"\nendpoint = "http://h"\nbucket = "b"', "stores[0].bucket"),
        ('[[stores]]\nname = "a"\nkind = "s3"\nendpoint = "h:9000"\nbucket = "bbb"', "stores[0].endpoint"),
        ('[[stores]]\nname = "a"\nkind = "s3"\nendpoint = "http://h"\nbucket = "bbb"\nsecret_key = "x"',
         "stores[0].secret_key"),
        ('[[stores]]\nname = "a"\nkind = "s3"\nendpoint = "http://h"\nbucket = "bbb"\naccess_key_env = "NOPE_UNSET"\nsecret_key_env = "NOPE2"',
         "stores[0].access_key_env"),
        ('[sync]\nconcurrency = 0', "sync.concurrency"),
        ('[sync]\npage_size = "many"', "sync.page_size"),
        ('[tls]\ncert_file = "a.crt"', "tls.key_file"),
        ('[tls]\nkey_file = "a.key"', "tls.cert_file"),
        ('[tls]\nclient_ca_file = "ca.pem"', "tls.client_ca_file"),
        ('[tls]\ncert_file = "a"\nkey_file = "b"\nclient_cert_routes = ["/admin"]',
         "tls.client_cert_routes"),
        ('[tls]\ncert_file = "a"\nkey_file = "b"\nclient_ca_file = "c"\nclient_cert_routes = ["admin"]',
         "tls.client_cert_routes"),
        ('[tls]\nmin_version = "TLSv1.1"', "tls.min_version"),
        ('[tls]\nmin_version = "tls1.3"', "tls.min_version"),
        ('[tls]\nkey = "x"', "tls.key"),
        ("[bogus]\nx = 1", "bogus"),
        ("[federation]\ndeadline_ms = 0", "federation.deadline_ms"),
        ('[[federation.peers]]\nprovince = "990000"\nbase_url = "https://a/d"',
         "federation.peers[0].province"),
        ('[[federation.peers]]\nprovince = "110000"\nbase_url = "https://a/d"\n'
         'public_key_file = "k"', "federation.peers[0].province"),
        ('[[federation.peers]]\nprovince = "310000"\nbase_url = "https://a/d"',
         "federation.peers[0].public_key_file"),
        ('[[federation.peers]]\nprovince = "310000"\nbase_url = "ftp://a/d"\n'
         'public_key_file = "k"', "federation.peers[0].base_url"),
        ('[[federation.peers]]\nprovince = "310000"\nkind = "dicomweb"\n'
         'base_url = "https://a/d"\ncredential = "s3cret"', "federation.peers[0].credential"),
        ('[[federation.peers]]\nprovince = "310000"\nkind = "dicomweb"\n'
         'base_url = "https://a/d"\ncredential_env = "UNSET_VAR_X"',
         "federation.peers[0].credential_env"),
        ('[[federation.peers]]\nprovince = "310000"\nkind = "pacs"\nbase_url = "https://a/d"',
         "federation.peers[0].kind"),
        ('[federation]\ncache_store = "nope"', "federation.cache_store"),
        ('[gateway]\nwrite_store = "c"\n[[stores]]\nname = "c"\nkind = "fs"\npath = "c"\n'
         '[encryption]\nenabled = true\n[federation]\ncache_store = "c"', "federation.cache_store"),
        ('[[stores]]\nname = "c"\nkind = "fs"\npath = "c"\n[federation]\ncache_store = "c"',
         "federation.cache_store"),  # unencrypted
        ('[federation]\ncache_max_bytes = 10', "federation.cache_max_bytes"),
        ("not toml [", "gateway.toml"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    msg = str(info.value)
    assert key in msg
    assert "\n" not in msg


def test_tls_defaults_and_full_table(tmp_path: Path) -> None:
    s = load_settings(None, environ={})
    assert not s.tls.enabled and s.tls.client_cert_routes == () and s.tls.min_version == "TLSv1.2"
    text = """
[tls]
cert_file = "tls/gw.crt"
key_file = "/etc/ig/gw.key"
client_ca_file = "tls/peers.pem"
client_cert_routes = ["/federation/", "/admin"]
min_version = "TLSv1.3"
ca_file = "tls/out.pem"
"""
    t = load_settings(write(tmp_path, text), environ={}).tls
    assert t.enabled
    assert (t.cert_file, t.key_file) == (tmp_path / "tls/gw.crt", Path("/etc/ig/gw.key"))
    assert (t.client_ca_file, t.ca_file) == (tmp_path / "tls/peers.pem", tmp_path / "tls/out.pem")
    assert t.client_cert_routes == ("/federation", "/admin")
    assert t.min_version == "TLSv1.3"


def test_tls_env_overrides(tmp_path: Path) -> None:
    env = {
        "IMAGING_GATEWAY_TLS__CERT_FILE": "/run/tls/gw.crt",
        "IMAGING_GATEWAY_TLS__KEY_FILE": "/run/tls/gw.key",
        "IMAGING_GATEWAY_TLS__CLIENT_CA_FILE": "/run/tls/ca.pem",
        "IMAGING_GATEWAY_TLS__CLIENT_CERT_ROUTES": "/admin, /federation",
        "IMAGING_GATEWAY_TLS__MIN_VERSION": "TLSv1.3",
    }
    t = load_settings(None, environ=env).tls
    assert t.cert_file == Path("/run/tls/gw.crt") and t.key_file == Path("/run/tls/gw.key")
    assert t.client_cert_routes == ("/admin", "/federation")
    assert t.min_version == "TLSv1.3"


def test_literal_secret_is_refused_and_not_echoed(tmp_path: Path) -> None:
    text = '[[stores]]\nname = "a"\nkind = "fs"\npath = "x"\npassword = "hunter2"'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert "hunter2" not in str(info.value)
    assert "password_env" in str(info.value)


def test_unknown_store_lists_known(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, '[[stores]]\nname = "a"\nkind = "fs"\npath = "x"'), environ={})
    with pytest.raises(ConfigError, match="known: a"):
        s.store("b")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_cli_config_before_or_after_subcommand(tmp_path: Path) -> None:
    from imaging_gateway.cli import _parser

    cfg = tmp_path / "g.toml"
    for argv in (["index", "--config", str(cfg), "stats"], ["index", "stats", "--config", str(cfg)],
                 ["tokens", "--config", str(cfg), "issue", "--role", "admin"]):
        assert _parser().parse_args(argv).config == cfg
    assert _parser().parse_args(["index", "stats"]).config is None


def test_encryption_section(tmp_path: Path) -> None:
    from imaging_gateway.storage.factory import load_store_keys

    cfg = tmp_path / "g.toml"
    cfg.write_text('[encryption]\nsuite = "SM4-GCM"\nsegment_size = 8192\n', encoding="utf-8")
    s = load_settings(cfg, environ={"IMAGING_GATEWAY_ENCRYPTION__ENABLED": "true"})
    assert (s.encryption.enabled, s.encryption.suite, s.encryption.segment_size) == (
        True, "SM4-GCM", 8192
    )
    assert s.encryption.keyring_file == tmp_path / "data" / "keys" / "keyring.json"
    with pytest.raises(ConfigError, match="imaging-gateway keys init"):
        load_store_keys(s)
    off = load_settings(cfg, environ={})
    assert load_store_keys(off) is None  # no keyring, encryption off: bare stores
    for text, key in (
        ('[encryption]\nsuite = "DES"\n', "encryption.suite"),
        ("[encryption]\nsegment_size = 100\n", "encryption.segment_size"),
        ("[encryption]\nkey = 1\n", "encryption.key"),
    ):
        cfg.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_settings(cfg, environ={})
        assert err.value.key == key and "\n" not in err.value.message


STORE = """
[[stores]]
name = "sh-pacs"
kind = "fs"
path = "store"
"""


def test_ownership_defaults_keep_the_old_behaviour(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), environ={"GZ_KEY": "a", "GZ_SECRET": "b",
                                                       "IG_DB_PASSWORD": "p"})
    by_store, by_institution = s.stores
    assert (by_store.ownership, by_store.hospital) == ("store", "H44010600011")
    assert by_store.producer("any/key.dcm", "H99999999999") == "H44010600011"
    assert by_store.producing_hospitals == {"H44010600011"}
    assert by_institution.ownership == "institution"
    assert by_institution.producer("H44010600011/a.dcm", "H31010100002") == "H31010100002"
    assert by_institution.producer("a.dcm", None) is None
    assert by_institution.producing_hospitals is None


def test_prefix_ownership_longest_prefix_wins(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, STORE + """ownership = "prefix"
[stores.hospitals]
"H31010400011/" = "H31010400011"
"ruijin/" = "H31010100002"
"ruijin/north/" = "H31010100003"
"""), environ={})
    (st,) = s.stores
    assert st.ownership == "prefix"
    lengths = [len(p) for p, _ in st.hospitals]
    assert lengths == sorted(lengths, reverse=True) and len(lengths) == 3  # longest first
    assert st.producer("H31010400011/2025/x.dcm", "H31010100002") == "H31010400011"
    assert st.producer("ruijin/2025/x.dcm", None) == "H31010100002"
    assert st.producer("ruijin/north/x.dcm", "H31010100002") == "H31010100003"
    assert st.producer("ruijin-old/x.dcm", "H31010100002") is None  # no match: no producer
    assert st.producer("h31010400011/x.dcm", None) is None  # prefixes are case-sensitive
    assert st.producing_hospitals == {"H31010400011", "H31010100002", "H31010100003"}
    assert st.key_prefix_for("H31010100002", "stow/1/2/3.dcm") == "ruijin/"
    assert st.key_prefix_for("H31010100003", "stow/1/2/3.dcm") == "ruijin/north/"
    assert st.key_prefix_for("H11010800028", "stow/1/2/3.dcm") is None


def test_a_prefix_shadowed_by_a_longer_one_is_not_used_for_writing(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, STORE + """ownership = "prefix"
hospitals = { "a/" = "H31010100002", "a/stow/" = "H31010100003" }
"""), environ={})
    (st,) = s.stores
    assert st.key_prefix_for("H31010100002", "stow/1/2/3.dcm") is None
    assert st.key_prefix_for("H31010100003", "stow/1/2/3.dcm") == "a/stow/"


@pytest.mark.parametrize(("extra", "key", "message"), [
    ('ownership = "prefix"\n', "stores[0].hospitals", "needs it"),
    ('ownership = "store"\n', "stores[0].hospital", "needs it"),
    ('ownership = "owner"\n', "stores[0].ownership", "expected one of"),
    ('hospitals = { "a/" = "H31010100002" }\n', "stores[0].ownership", "needs \"prefix\""),
    ('ownership = "prefix"\nhospitals = {}\n', "stores[0].hospitals", "at least one"),
    ('ownership = "prefix"\nhospitals = "a/=H31010100002"\n', "stores[0].hospitals",
     "expected a table"),
    ('ownership = "prefix"\nhospitals = { "a" = "H31010100002" }\n', 'stores[0].hospitals."a"',
     "ending in '/'"),
    ('ownership = "prefix"\nhospitals = { "/a/" = "H31010100002" }\n',
     'stores[0].hospitals."/a/"', "leading"),
    ('ownership = "prefix"\nhospitals = { "" = "H31010100002" }\n', 'stores[0].hospitals.""',
     "ending in '/'"),
    ('ownership = "prefix"\nhospitals = { "a/" = "ruijin" }\n', 'stores[0].hospitals."a/"',
     "institution code"),
    ('ownership = "prefix"\nhospitals = { "a/" = 3 }\n', 'stores[0].hospitals."a/"',
     "institution code"),
    ('ownership = "prefix"\nhospital = "H31010100002"\nhospitals = { "a/" = "H31010100002" }\n',
     "stores[0].hospital", 'only for ownership = "store"'),
    ('ownership = "institution"\nhospital = "H31010100002"\n', "stores[0].hospital",
     'only for ownership = "store"'),
    ('ownership = "store"\nhospital = "H31010100002"\nhospitals = { "a/" = "H31010100002" }\n',
     "stores[0].hospitals", 'only for ownership = "prefix"'),
])
def test_bad_ownership_names_the_key(tmp_path: Path, extra: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, STORE + extra), environ={})
    assert err.value.key == key
    assert message in err.value.expected


def test_federation_section(tmp_path: Path) -> None:
    text = """
[federation]
enabled = true
deadline_ms = 900
[[federation.peers]]
province = "310000"
base_url = "https://gw.sh.example/dicomweb/"
public_key_file = "keys/310000.pub"
[[federation.peers]]
province = "320000"
kind = "dicomweb"
base_url = "https://pacs.js.example/dicomweb"
credential_env = "JS_TOKEN"
"""
    s = load_settings(write(tmp_path, text), environ={"JS_TOKEN": "tok-123"}).federation
    assert s.enabled and s.deadline_ms == 900 and s.breaker_failures == 3
    gw, pacs = s.peers
    assert gw.base_url == "https://gw.sh.example/dicomweb"
    assert gw.public_key_file == tmp_path / "keys" / "310000.pub"
    assert pacs.credential == "tok-123" and "tok-123" not in repr(s)
    assert s.signing_key_file == tmp_path / "data" / "keys" / "federation-signing.pem"
    env = {"IMAGING_GATEWAY_FEDERATION__DEADLINE_MS": "300", "JS_TOKEN": "x"}
    assert load_settings(write(tmp_path, text), environ=env).federation.deadline_ms == 300


def _all_paths(s: object) -> list[Path]:
    """Every Path held anywhere in a Settings tree, and the SQLite index file."""
    from dataclasses import fields, is_dataclass

    found: list[Path] = []

    def walk(v: object) -> None:
        if isinstance(v, Path):
            found.append(v)
        elif is_dataclass(v) and not isinstance(v, type):
            for f in fields(v):
                walk(getattr(v, f.name))
        elif isinstance(v, tuple):
            for x in v:
                walk(x)

    walk(s)
    return found


RELATIVE = """
[gateway]
data_dir = "data"
[security]
audit_key_file = "keys/audit.key"
[[stores]]
name = "local"
kind = "fs"
path = "store"
"""


def test_relative_paths_are_joined_to_the_config_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named by a relative path (``--config demo-data/gateway.toml`` from the repo
    root) resolves every path once, against the config's folder: absolute, never doubled."""
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "gateway.toml").write_text(RELATIVE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    s = load_settings(Path("demo-data/gateway.toml"), environ={})
    home = tmp_path / "demo-data"
    assert s.gateway.data_dir == home / "data"
    assert s.security.token_key_file == home / "data" / "keys" / "token-signing.pem"
    assert s.security.audit_key_file == home / "keys" / "audit.key"
    assert s.federation.signing_key_file == home / "data" / "keys" / "federation-signing.pem"
    assert s.encryption.keyring_file == home / "data" / "keys" / "keyring.json"
    assert s.store("local").path == home / "store"
    assert s.index.url == f"sqlite:///{home / 'data' / 'index.sqlite3'}"
    assert all(p.is_absolute() for p in _all_paths(s))
    # The same file named by its absolute path gives the same settings.
    assert load_settings(home / "gateway.toml", environ={}) == s


def test_env_and_default_paths_follow_the_same_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAGING_GATEWAY_* paths are relative to the config's folder; with no file, to the
    current directory; defaults too."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "g.toml").write_text("", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    env = {"IMAGING_GATEWAY_GATEWAY__DATA_DIR": "var",
           "IMAGING_GATEWAY_SECURITY__TOKEN_KEY_FILE": "k/token.pem"}
    s = load_settings(Path("cfg/g.toml"), environ=env)
    assert s.gateway.data_dir == tmp_path / "cfg" / "var"
    assert s.security.token_key_file == tmp_path / "cfg" / "k" / "token.pem"
    assert s.security.audit_key_file == tmp_path / "cfg" / "var" / "keys" / "audit-chain.key"
    bare = load_settings(None, environ=env)
    assert bare.gateway.data_dir == tmp_path / "var"
    assert bare.security.token_key_file == tmp_path / "k" / "token.pem"
    assert bare.index.url == f"sqlite:///{tmp_path / 'var' / 'index.sqlite3'}"
    assert all(p.is_absolute() for p in _all_paths(s) + _all_paths(bare))
