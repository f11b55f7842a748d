"""Keyring: file and environment loading, permissions, atomic rotation, blind indexes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.envelope import decrypt, encrypt, parse_header, rewrap
from imaging_gateway.crypto.keyring import FileKeyring, Keyring, load_keyring
from imaging_gateway.errors import ConfigError, IntegrityError, KeyNotFound

SETTING = "security.keyring_file"


def new_file(tmp_path: Path, suite: Suite = Suite.AES_256_GCM) -> FileKeyring:
    return FileKeyring.create(
        tmp_path / "keys" / "keyring.json", setting=SETTING, key_id="kek-110000", suite=suite
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the file ---------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [Suite.AES_256_GCM, Suite.SM4_GCM])
def test_create_then_load(tmp_path: Path, suite: Suite) -> None:
    kr = new_file(tmp_path, suite)
    assert kr.path.stat().st_mode & 0o777 == 0o600
    assert kr.path.parent.stat().st_mode & 0o777 == 0o700
    doc = json.loads(kr.path.read_text())
    assert doc["format"] == "imaging-gateway-keyring/1" and doc["suite"] == suite.value
    assert len(base64.b64decode(doc["keys"]["1"])) == suite.key_size
    assert doc["blind_index_key"] != doc["keys"]["1"]
    again = load_keyring(kr.path, setting=SETTING)
    assert (again.key_id, again.suite, again.versions, again.current()) == (
        "kek-110000",
        suite,
        (1,),
        ("kek-110000", 1),
    )
    ct = encrypt(b"pixels", kr, suite=suite)
    assert decrypt(ct, again) == b"pixels"
    with pytest.raises(ConfigError, match="already exists"):
        FileKeyring.create(kr.path, setting=SETTING, key_id="other")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_open_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    kr = new_file(tmp_path)
    kr.path.chmod(mode)
    with pytest.raises(ConfigError, match=r"security.keyring_file: .*chmod 600"):
        load_keyring(kr.path, setting=SETTING)
    with pytest.raises(ConfigError, match="chmod 600"):
        kr.rotate()  # a rewrite re-reads the file and refuses it too


def test_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is missing"):
        load_keyring(tmp_path / "nope.json", setting=SETTING)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match="regular file"):
        load_keyring(tmp_path / "dir.json", setting=SETTING)


def _write(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    path.chmod(0o600)


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": "imaging-gateway-keyring/1",
        "key_id": "kek-1",
        "suite": "AES-256-GCM",
        "current": 1,
        "keys": {"1": b64(b"k" * 32)},
        "blind_index_key": b64(b"b" * 32),
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not a JSON keyring"),
        (_doc(format="v0"), "format"),
        (_doc(suite="DES"), "suite must be one of"),
        (_doc(current=2), "current version 2 is not held"),
        (_doc(current="1"), "current must be an integer"),
        (_doc(keys={}), "keys must be"),
        (_doc(keys={"one": b64(b"k" * 32)}), "is not a number"),
        (_doc(keys={"1": "***"}), r"keys\.1 is not valid base64"),
        (_doc(keys={"1": b64(b"k" * 16)}), "32-byte keys, got 16"),
        (_doc(suite="SM4-GCM"), "16-byte keys, got 32"),
        (_doc(blind_index_key=b64(b"b" * 8)), "blind index key must be 32 bytes"),
        (_doc(key_id=""), "key id must be"),
        (_doc(extra=1), "unknown field 'extra'"),
    ],
)
def test_malformed_file_is_refused_without_key_material(
    tmp_path: Path, doc: object, message: str
) -> None:
    path = tmp_path / "keyring.json"
    _write(path, doc)
    with pytest.raises(ConfigError, match=message) as exc:
        load_keyring(path, setting=SETTING)
    assert str(exc.value).startswith(f"config: {SETTING}: ")
    assert b64(b"k" * 32) not in str(exc.value) and "kkkk" not in str(exc.value)


# --- rotation ---------------------------------------------------------------------------


def test_rotate_keeps_old_versions_and_wraps_with_the_new(tmp_path: Path) -> None:
    kr = new_file(tmp_path)
    old_ct = encrypt(b"before", kr)
    assert kr.rotate() == 2
    assert kr.current() == ("kek-110000", 2) and kr.versions == (1, 2)
    on_disk = load_keyring(kr.path, setting=SETTING)
    assert on_disk.versions == (1, 2) and on_disk.current_version == 2
    assert kr.path.stat().st_mode & 0o777 == 0o600
    new_ct = encrypt(b"after", kr)
    assert parse_header(new_ct).envelope.key_version == 2
    assert decrypt(old_ct, on_disk) == b"before" and decrypt(new_ct, on_disk) == b"after"
    # the blind-index secret survives rotation: existing indexes stay valid
    assert on_disk.blind_index("x", field="f") == kr.blind_index("x", field="f")
    assert not list(kr.path.parent.glob("*.tmp"))


def test_rotate_rewrap_retire(tmp_path: Path) -> None:
    kr = new_file(tmp_path)
    ct = encrypt(b"study", kr)
    h = parse_header(ct)
    kr.rotate()
    env = rewrap(h.envelope, h.fixed, kr)
    assert env.key_version == 2
    with pytest.raises(ConfigError, match="version 2 is current"):
        kr.retire(2)
    kr.retire(1)
    assert load_keyring(kr.path, setting=SETTING).versions == (2,)
    with pytest.raises(KeyNotFound, match="key 'kek-110000' version 1 is not in the keyring"):
        decrypt(ct, kr)
    assert decrypt(ct, kr, envelope=env) == b"study"
    with pytest.raises(ConfigError, match="version 1 is not held"):
        kr.retire(1)


def test_two_processes_rotating_lose_no_version(tmp_path: Path) -> None:
    a = new_file(tmp_path)
    b = load_keyring(a.path, setting=SETTING)
    assert a.rotate() == 2
    assert b.rotate() == 3  # re-read under the lock: builds on a's version 2
    assert load_keyring(a.path, setting=SETTING).versions == (1, 2, 3)
    # a still wraps with 2 until it reloads, but unwraps 3 by re-reading the file once
    ct = encrypt(b"from b", b)
    assert parse_header(ct).envelope.key_version == 3
    assert a.versions == (1, 2)
    assert decrypt(ct, a) == b"from b"
    assert a.current() == ("kek-110000", 3)  # reloaded


def test_rotate_fsyncs_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kr = new_file(tmp_path)
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        calls.append("rename")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    kr.rotate()
    assert calls == ["fsync-file", "rename", "fsync-dir"]


def test_failure_before_rename_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kr = new_file(tmp_path)
    before = kr.path.read_bytes()

    def fail(src: str, dst: object) -> None:
        assert json.loads(Path(src).read_text())["current"] == 2  # the new file was complete
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        kr.rotate()
    assert kr.path.read_bytes() == before
    assert kr.current() == ("kek-110000", 1) and kr.versions == (1,)  # memory follows the file
    assert not list(kr.path.parent.glob("*.tmp"))


def test_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    """A process killed after writing the new file aside but before renaming it."""
    kr = new_file(tmp_path)
    before = kr.path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from imaging_gateway.crypto import keyring
        keyring.os.replace = lambda src, dst: os._exit(17)
        keyring.load_keyring(Path({str(kr.path)!r}), setting="s").rotate()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True)
    assert proc.returncode == 17, proc.stderr
    assert kr.path.read_bytes() == before
    strays = list(kr.path.parent.glob(".keyring.json-*.tmp"))
    assert len(strays) == 1 and json.loads(strays[0].read_text())["current"] == 2
    assert strays[0].stat().st_mode & 0o777 == 0o600
    again = load_keyring(kr.path, setting=SETTING)
    assert again.versions == (1,)
    assert again.rotate() == 2 and load_keyring(kr.path, setting=SETTING).versions == (1, 2)


# --- wrapping ---------------------------------------------------------------------------


def test_wrap_unwrap_binds_aad_and_names_keys() -> None:
    kr = Keyring(
        key_id="k",
        suite=Suite.AES_256_GCM,
        keys={1: os.urandom(32)},
        current=1,
        blind_index_key=os.urandom(32),
    )
    kid, version, wrapped = kr.wrap(b"d" * 32, b"aad")
    assert (kid, version) == ("k", 1)
    assert kr.unwrap("k", 1, wrapped, b"aad") == b"d" * 32
    with pytest.raises(IntegrityError, match="key 'k' version 1 did not authenticate"):
        kr.unwrap("k", 1, wrapped, b"aae")
    with pytest.raises(IntegrityError, match="malformed"):
        kr.unwrap("k", 1, wrapped[:10], b"aad")
    with pytest.raises(
        KeyNotFound, match=r"key 'k' version 7 is not in the keyring \(it holds versions 1\)"
    ):
        kr.unwrap("k", 7, wrapped, b"aad")
    with pytest.raises(
        KeyNotFound, match=r"key 'j' version 1 is not in the keyring \(it holds key 'k'\)"
    ):
        kr.unwrap("j", 1, wrapped, b"aad")


def test_constructor_validation() -> None:
    good: dict[str, Any] = {
        "key_id": "k",
        "suite": Suite.SM4_GCM,
        "keys": {1: b"k" * 16},
        "current": 1,
        "blind_index_key": b"b" * 32,
    }
    Keyring(**good)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"keys": {1: b"k" * 32}}, "16-byte keys"),
        ({"keys": {0: b"k" * 16}, "current": 0}, "out of"),
        ({"current": 2}, "current version 2"),
        ({"key_id": "a\nb"}, "control"),
        ({"key_id": "x" * 256}, "1..255"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            Keyring(**{**good, **bad})


# --- environment ------------------------------------------------------------------------


def test_from_env_reads_only_the_named_variables() -> None:
    k1, k2, bi = os.urandom(32), os.urandom(32), os.urandom(32)
    env = {"GW_KEK_1": b64(k1), "GW_KEK_2": b64(k2), "GW_BLIND": b64(bi), "OTHER": "x"}
    kr = Keyring.from_env(
        env,
        setting="security.kek_env",
        key_id="kek-env",
        suite=Suite.AES_256_GCM,
        kek_vars={1: "GW_KEK_1", 2: "GW_KEK_2"},
        blind_index_var="GW_BLIND",
    )
    assert kr.current() == ("kek-env", 2) and kr.versions == (1, 2)
    pinned = Keyring.from_env(
        env,
        setting="s",
        key_id="kek-env",
        suite=Suite.AES_256_GCM,
        kek_vars={1: "GW_KEK_1", 2: "GW_KEK_2"},
        blind_index_var="GW_BLIND",
        current=1,
    )
    assert pinned.current() == ("kek-env", 1)
    assert decrypt(encrypt(b"x", pinned), kr) == b"x"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GW_BLIND": b64(b"b" * 32)}, "environment variable GW_KEK_1 is not set"),
        ({"GW_KEK_1": "", "GW_BLIND": b64(b"b" * 32)}, "GW_KEK_1 is not set"),
        ({"GW_KEK_1": "!!", "GW_BLIND": b64(b"b" * 32)}, "GW_KEK_1 is not valid base64"),
        (
            {"GW_KEK_1": b64(b"k" * 16), "GW_BLIND": b64(b"b" * 32)},
            "GW_KEK_1 must hold a 32-byte key, found 16",
        ),
        ({"GW_KEK_1": b64(b"k" * 32)}, "GW_BLIND is not set"),
    ],
)
def test_from_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        Keyring.from_env(
            env,
            setting="security.kek_env",
            key_id="kek-env",
            suite=Suite.AES_256_GCM,
            kek_vars={1: "GW_KEK_1"},
            blind_index_var="GW_BLIND",
        )
    assert str(exc.value).startswith("config: security.kek_env: ")
    assert b64(b"k" * 16) not in str(exc.value)


# --- blind indexes ----------------------------------------------------------------------


def test_blind_index_algorithms_and_domain_separation() -> None:
    bik = os.urandom(32)
    aes = Keyring(
        key_id="k",
        suite=Suite.AES_256_GCM,
        keys={1: os.urandom(32)},
        current=1,
        blind_index_key=bik,
    )
    sm4 = Keyring(
        key_id="k", suite=Suite.SM4_GCM, keys={1: os.urandom(16)}, current=1, blind_index_key=bik
    )
    msg = b"\x00\x09PatientID" + b"110101199003077777"
    assert (
        aes.blind_index("110101199003077777", field="PatientID")
        == hmac.new(bik, msg, hashlib.sha256).hexdigest()
    )
    sm3 = chmac.HMAC(bik, hashes.SM3())
    sm3.update(msg)
    assert sm4.blind_index("110101199003077777", field="PatientID") == sm3.finalize().hex()
    assert aes.blind_index("张三", field="PatientName") == aes.blind_index(
        "张三", field="PatientName"
    )
    assert aes.blind_index("x", field="PatientID") != aes.blind_index("x", field="OtherPatientIDs")
    assert aes.blind_index("bc", field="a") != aes.blind_index("c", field="ab")
    other = Keyring(
        key_id="k",
        suite=Suite.AES_256_GCM,
        keys={1: os.urandom(32)},
        current=1,
        blind_index_key=os.urandom(32),
    )
    assert other.blind_index("x", field="f") != aes.blind_index("x", field="f")
    with pytest.raises(ValueError, match="field name"):
        aes.blind_index("x", field="")


def test_blind_index_key_is_not_the_kek(tmp_path: Path) -> None:
    kr = new_file(tmp_path)
    doc = json.loads(kr.path.read_text())
    kek = base64.b64decode(doc["keys"]["1"])
    msg = b"\x00\x01f" + b"x"
    assert kr.blind_index("x", field="f") != hmac.new(kek, msg, hashlib.sha256).hexdigest()
    assert (
        kr.blind_index("x", field="f")
        == hmac.new(base64.b64decode(doc["blind_index_key"]), msg, hashlib.sha256).hexdigest()
    )


def test_a_running_process_sees_a_rotation_on_its_next_wrap(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    admin = FileKeyring.create(path, setting="t", key_id="gw")
    server = load_keyring(path, setting="t")
    assert server.current() == ("gw", 1)
    admin.rotate()
    assert server.current() == ("gw", 2)
    assert server.wrap(b"k" * 32, b"aad")[1] == 2
    admin.retire(1)
    server.current()
    assert server.versions == (2,)
