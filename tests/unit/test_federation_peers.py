"""Peer registry: peers validated; URLs built only under the registered base; answers mapped back."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from imaging_gateway.errors import ConfigError, InvalidRequest, NotFound
from imaging_gateway.federation.peers import Peer, PeerRegistry, is_province_code


def pem() -> str:
    return (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def registry() -> PeerRegistry:
    return PeerRegistry(
        [
            Peer(
                "440000", "Guangdong", "https://GW.gd.example:443/dicomweb/", public_key_pem=pem()
            ),
            Peer("310000", "Shanghai", "https://gw.sh.example:8443/dicomweb", public_key_pem=pem()),
            Peer(
                "320000",
                "Jiangsu PACS",
                "https://pacs.js.example",
                kind="dicomweb",
                credential="jiangsu-pacs",
            ),
        ],
        home_province="110000",
    )


def test_province_codes() -> None:
    assert is_province_code("440000") and is_province_code("820000")
    assert not is_province_code("440100") and not is_province_code("990000")
    assert not is_province_code("44000")


def test_peers_normalized_and_ordered() -> None:
    reg = registry()
    assert [p.province for p in reg] == ["310000", "320000", "440000"]
    assert reg.get("440000").base_url == "https://gw.gd.example/dicomweb"
    assert reg.get("310000").base_url == "https://gw.sh.example:8443/dicomweb"
    assert reg.get("440000").origin == "https://gw.gd.example"
    assert reg.get("440000").public_key is not None
    assert reg.get("320000").public_key is None
    assert "440000" in reg and "110000" not in reg and len(reg) == 3
    with pytest.raises(NotFound):
        reg.get("650000")
    assert reg.find("650000") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"province": "440100"}, "province"),
        ({"name": ""}, "name"),
        ({"kind": "smtp"}, "kind"),
        ({"base_url": "ftp://gw.gd.example"}, "base_url"),
        ({"base_url": "https://user:pw@gw.gd.example"}, "base_url"),
        ({"base_url": "https://gw.gd.example/dicomweb?x=1"}, "base_url"),
        ({"base_url": "https://gw.gd.example/a/../b"}, "base_url"),
        ({"base_url": "https://gw.gd.example/a%2Fb"}, "base_url"),
        ({"base_url": "https:///dicomweb"}, "base_url"),
        ({"public_key_pem": None}, "public_key"),
        ({"public_key_pem": "not a key"}, "public_key"),
        ({"credential": "x"}, "credential"),
    ],
)
def test_bad_peer_refused(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "province": "440000",
        "name": "Guangdong",
        "base_url": "https://gw.gd.example/dicomweb",
        "public_key_pem": pem(),
    }
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        Peer(**args)  # type: ignore[arg-type]
    assert err.value.key.endswith(field)


def test_rsa_key_refused() -> None:
    rsa = (
        generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ConfigError, match="Ed25519"):
        Peer("440000", "Guangdong", "https://gw.gd.example", public_key_pem=rsa)


def test_dicomweb_peer_has_no_key() -> None:
    with pytest.raises(ConfigError):
        Peer("440000", "PACS", "https://pacs.example", kind="dicomweb", public_key_pem=pem())
    with pytest.raises(ConfigError):
        Peer("440000", "PACS", "https://pacs.example", kind="dicomweb", credential="bad name!")


def test_registry_refuses_home_duplicates_and_plain_http() -> None:
    gd = Peer("440000", "Guangdong", "https://gw.gd.example", public_key_pem=pem())
    with pytest.raises(ConfigError, match="own province"):
        PeerRegistry([gd], home_province="440000")
    with pytest.raises(ConfigError, match="one peer per province"):
        PeerRegistry([gd, gd], home_province="110000")
    plain = Peer("440000", "Guangdong", "http://127.0.0.1:8081/dicomweb", public_key_pem=pem())
    with pytest.raises(ConfigError, match="https"):
        PeerRegistry([plain], home_province="110000")
    reg = PeerRegistry([plain], home_province="110000", allow_plain_http=True)
    assert reg.url_for("440000", "studies") == "http://127.0.0.1:8081/dicomweb/studies"


def test_url_for_builds_under_base() -> None:
    reg = registry()
    assert (
        reg.url_for("440000", "studies/1.2.3/series/4.5/instances/6.7/frames/1,2")
        == "https://gw.gd.example/dicomweb/studies/1.2.3/series/4.5/instances/6.7/frames/1,2"
    )
    assert reg.url_for("440000", "/studies") == "https://gw.gd.example/dicomweb/studies"
    assert (
        reg.url_for("320000", "studies", [("PatientID", "A&B=1/x?y"), ("includefield", "all")])
        == "https://pacs.js.example/studies?PatientID=A%26B%3D1%2Fx%3Fy&includefield=all"
    )
    assert reg.url_for("310000", "studies", {}) == "https://gw.sh.example:8443/dicomweb/studies"
    with pytest.raises(NotFound):
        reg.url_for("650000", "studies")


@pytest.mark.parametrize(
    "path",
    [
        "",
        "https://evil.example/studies",
        "//evil.example/studies",
        "http:evil.example",
        "studies/../../admin",
        "../studies",
        "studies/./x",
        "studies/%2e%2e/admin",
        "studies%2F..%2Fadmin",
        "studies%2fx",
        "studies\\..\\admin",
        "studies?PatientID=x",
        "studies#frag",
        "studies//x",
        "@evil.example/x",
        "studies/x y",
        "studies/\u0130",
        "studies/\n",
        "a" * 3000,
    ],
)
def test_url_for_refuses_tricks(path: str) -> None:
    with pytest.raises(InvalidRequest, match="peer path refused"):
        registry().url_for("440000", path)


def test_map_retrieve_url_under_own_base() -> None:
    reg = registry()
    assert reg.map_retrieve_url("440000", "https://gw.gd.example/dicomweb/studies/1.2.3") == (
        "440000",
        "studies/1.2.3",
    )
    # Case and default port do not matter.
    assert reg.map_retrieve_url(
        "440000", "HTTPS://GW.GD.EXAMPLE:443/dicomweb/studies/1.2.3/series/4.5"
    ) == ("440000", "studies/1.2.3/series/4.5")
    assert reg.map_retrieve_url("320000", "https://pacs.js.example/studies/1.2") == (
        "320000",
        "studies/1.2",
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/dicomweb/studies/1.2.3",  # foreign host
        "http://gw.gd.example/dicomweb/studies/1.2.3",  # scheme change
        "https://gw.gd.example:8443/dicomweb/studies/1.2.3",  # other port
        "https://user@gw.gd.example/dicomweb/studies/1.2.3",  # userinfo
        "https://gw.gd.example@evil.example/dicomweb/studies/1.2.3",  # userinfo trick
        "https://gw.gd.example/dicomweb/../admin/keys",  # dot segments
        "https://gw.gd.example/dicomweb/studies/%2e%2e/%2e%2e/admin",  # encoded dots
        "https://gw.gd.example/dicomweb%2Fstudies/1.2.3",  # encoded slash
        "https://gw.gd.example/dicomweb-evil/studies/1.2.3",  # not a segment boundary
        "https://gw.gd.example/other/studies/1.2.3",  # outside the base path
        "https://gw.gd.example/dicomweb",  # the base itself
        "https://gw.gd.example/dicomweb/studies/1.2.3?x=1",  # query
        "https://gw.gd.example/dicomweb/studies/1.2.3#x",  # fragment
        "https://gw.sh.example:8443/dicomweb/studies/1.2.3",  # another peer's base
        "https://gw.gd.example\\@evil.example/dicomweb/studies/1",  # backslash
        "https://gw.gd.example/dicomweb/studies/1.2.3\t",  # control character
        "javascript:alert(1)",
        "/dicomweb/studies/1.2.3",  # relative
        "",
    ],
)
def test_map_retrieve_url_refuses(url: str) -> None:
    assert registry().map_retrieve_url("440000", url) is None


def test_map_retrieve_url_unknown_peer() -> None:
    assert registry().map_retrieve_url("650000", "https://gw.gd.example/dicomweb/studies/1") is None
