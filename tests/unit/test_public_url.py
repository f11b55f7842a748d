"""api.urls.public_base: the configured base, X-Forwarded-* only from trusted proxies, the
Host header (with the connection's port when it has none); bad values refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from imaging_gateway.api.keys import SETTINGS
from imaging_gateway.api.urls import public_authority, public_base
from imaging_gateway.errors import ConfigError, InvalidRequest
from imaging_gateway.settings import load_settings

FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.cn",
             "X-Forwarded-Prefix": "/imaging/"}


def _app(tmp_path: Path, gateway: str = "") -> web.Application:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"[gateway]\n{gateway}\n", encoding="utf-8")
    app = web.Application()
    app[SETTINGS] = load_settings(cfg, environ={})
    return app


def _request(app: web.Application, headers: dict[str, str], *, peer: Any = ("127.0.0.1", 5555),
             local: Any = ("127.0.0.1", 8080), tls: bool = False) -> web.Request:
    transport = mock.Mock()
    extra = {"peername": peer, "sockname": local, "sslcontext": object() if tls else None}
    transport.get_extra_info.side_effect = lambda name, default=None: extra.get(name, default)
    return make_mocked_request("GET", "/dicomweb/studies", headers=headers, app=app,
                               transport=transport, sslcontext=extra["sslcontext"])


def test_configured_base_wins_over_every_header(tmp_path: Path) -> None:
    app = _app(tmp_path, 'public_base_url = "https://gw.bj.example/pacs/"\n'
                         'trusted_proxies = ["127.0.0.1"]')
    r = _request(app, {"Host": "evil.example:1", **FORWARDED})
    assert public_base(r) == "https://gw.bj.example/pacs"
    assert public_authority(r) == "gw.bj.example"


def test_forwarded_headers_are_ignored_from_an_untrusted_peer(tmp_path: Path) -> None:
    for gateway in ("", 'trusted_proxies = ["10.0.0.0/8", "::1"]'):
        r = _request(_app(tmp_path, gateway), {"Host": "127.0.0.1:8080", **FORWARDED})
        assert public_base(r) == "http://127.0.0.1:8080"


def test_forwarded_headers_are_honoured_from_a_trusted_proxy(tmp_path: Path) -> None:
    app = _app(tmp_path, 'trusted_proxies = ["10.0.0.0/8", "2001:db8::/32"]')
    for peer in (("10.1.2.3", 40000), ("2001:db8::7", 40000, 0, 0), ("::ffff:10.9.9.9", 1, 0, 0)):
        r = _request(app, {"Host": "10.0.0.5:8080", **FORWARDED}, peer=peer)
        assert public_base(r) == "https://pacs.example.cn/imaging", peer
    # Each header on its own; the last value is the one the trusted proxy wrote.
    r = _request(app, {"Host": "gw:8080", "X-Forwarded-Proto": "http, https"},
                 peer=("10.1.2.3", 1))
    assert public_base(r) == "https://gw:8080"
    r = _request(app, {"Host": "gw:8080", "X-Forwarded-Host": "a.example, b.example:8443"},
                 peer=("10.1.2.3", 1))
    assert public_base(r) == "http://b.example:8443"
    r = _request(app, {"Host": "gw:8080", "X-Forwarded-Prefix": "/x"}, peer=("10.1.2.3", 1))
    assert public_base(r) == "http://gw:8080/x"


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Forwarded-Proto", "ftp"), ("X-Forwarded-Host", "evil.example/x?y"),
     ("X-Forwarded-Host", "a b"), ("X-Forwarded-Host", "h:99999"),
     ("X-Forwarded-Prefix", "relative"), ("X-Forwarded-Prefix", "/a?b=1"),
     ("X-Forwarded-Prefix", "/a b")],
)
def test_bad_forwarded_values_are_refused_naming_the_header(
    tmp_path: Path, header: str, value: str
) -> None:
    app = _app(tmp_path, 'trusted_proxies = ["127.0.0.1"]')
    with pytest.raises(InvalidRequest) as info:
        public_base(_request(app, {"Host": "gw:8080", header: value}))
    assert header in info.value.message and value not in info.value.message


def test_host_without_a_port_gets_the_connections_port(tmp_path: Path) -> None:
    app = _app(tmp_path)
    # dicomweb-client (requests) sends "Host: 127.0.0.1" to port 8080.
    assert public_base(_request(app, {"Host": "127.0.0.1"})) == "http://127.0.0.1:8080"
    assert public_base(_request(app, {"Host": "[::1]"}, local=("::1", 8080, 0, 0))) == (
        "http://[::1]:8080")
    # The scheme's default port stays implicit; an explicit port is kept as sent.
    assert public_base(_request(app, {"Host": "gw"}, local=("0.0.0.0", 80))) == "http://gw"
    assert public_base(_request(app, {"Host": "gw"}, local=("0.0.0.0", 443), tls=True)) == (
        "https://gw")
    assert public_base(_request(app, {"Host": "gw:9000"})) == "http://gw:9000"


@pytest.mark.parametrize("host", ["evil.example/x", "a b", "gw:http", "gw:0", "user@gw"])
def test_a_bad_host_header_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        public_base(_request(_app(tmp_path), {"Host": host}))
    assert info.value.message.startswith("Host:")


@pytest.mark.parametrize(
    ("gateway", "key"),
    [('public_base_url = "pacs.example.cn"', "gateway.public_base_url"),
     ('public_base_url = "ftp://pacs.example.cn"', "gateway.public_base_url"),
     ('public_base_url = "https://pacs.example.cn/?a=1"', "gateway.public_base_url"),
     ('public_base_url = "https://pacs.example.cn/#x"', "gateway.public_base_url"),
     ('public_base_url = "https://u@pacs.example.cn"', "gateway.public_base_url"),
     ('public_base_url = "https://pacs.example.cn:port"', "gateway.public_base_url"),
     ('public_base_url = "https:///x"', "gateway.public_base_url"),
     ('trusted_proxies = ["10.0.0.0/33"]', "gateway.trusted_proxies"),
     ('trusted_proxies = ["proxy.local"]', "gateway.trusted_proxies"),
     ("trusted_proxies = 5", "gateway.trusted_proxies")],
)
def test_bad_settings_name_the_key(tmp_path: Path, gateway: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _app(tmp_path, gateway)
    assert info.value.key == key


def test_settings_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("", encoding="utf-8")
    s = load_settings(cfg, environ={
        "IMAGING_GATEWAY_GATEWAY__PUBLIC_BASE_URL": "https://pacs.example.cn:8443/",
        "IMAGING_GATEWAY_GATEWAY__TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})
    assert s.gateway.public_base_url == "https://pacs.example.cn:8443"
    assert [str(n) for n in s.gateway.trusted_proxies] == ["10.0.0.0/8", "192.168.1.1/32"]
    d = load_settings(None, environ={})
    assert d.gateway.public_base_url is None and d.gateway.trusted_proxies == ()
