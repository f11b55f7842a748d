"""Federation client and initiating-side helpers: strict DICOM JSON, peer queries, tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging_gateway.errors import ConfigError
from imaging_gateway.federation.client import load_registry, parse_dicom_json
from imaging_gateway.federation.fanout import PeerAnswerError
from imaging_gateway.services.federation import (
    PATIENT_TOKEN_ISSUER,
    as_token_patient,
    peer_query,
)
from imaging_gateway.settings import load_settings


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'{"0020000D": {"vr": "UI"}}', "not a JSON array"),
        (b"[1]", "not a DICOM JSON object"),
        (b'[{"PatientID": {"vr": "LO"}}]', "not a tag"),
        (b'[{"0020000d": {"vr": "UI"}}]', "not a tag"),
        (b'[{"0020000D": {"Value": ["1.2"]}}]', "without a VR"),
    ],
)
def test_garbage_answers_are_refused_without_echoing_them(body: bytes, reason: str) -> None:
    with pytest.raises(PeerAnswerError) as info:
        parse_dicom_json(body)
    assert reason in info.value.message
    assert "html" not in info.value.message and "PatientID" not in info.value.message


def _nested(depth: int) -> bytes:
    """A DICOM JSON answer whose sequences nest ``depth`` items deep (3 JSON levels each)."""
    inner = b'{"00100020": {"vr": "LO"}}'
    for _ in range(depth):
        inner = b'{"00081115": {"vr": "SQ", "Value": [' + inner + b"]}}"
    return b"[" + inner + b"]"


@pytest.mark.parametrize("depth", [100, 2000])
def test_an_answer_nested_deeper_than_any_dataset_is_refused(depth: int) -> None:
    """json.loads overflowed the stack at 2,000 levels (RecursionError); an answer of 300
    levels parsed but could not be encoded again for the client (orjson stops at 254)."""
    with pytest.raises(PeerAnswerError) as info:
        parse_dicom_json(_nested(depth))
    # Past orjson's own limit (1024 levels) it is its parse error that refuses it.
    assert info.value.message == ("answer is nested too deep" if depth == 100
                                  else "answer is not JSON")


def test_sequences_nested_as_datasets_nest_parse() -> None:
    assert len(parse_dicom_json(_nested(12))) == 1


def test_a_valid_answer_parses() -> None:
    data = [{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100020": {"vr": "LO"}}]
    assert parse_dicom_json(json.dumps(data).encode()) == data
    assert parse_dicom_json(b"[]") == []


def test_gateway_peers_get_no_patient_attribute_and_the_first_offset_plus_limit() -> None:
    pairs = [("PatientID", "0119031140"), ("IssuerOfPatientID", "H11010100013"),
             ("PatientName", "Wang*"), ("00100030", "19491231"), ("StudyDate", "2024-"),
             ("ModalitiesInStudy", "CT"), ("limit", "5"), ("offset", "10"),
             ("includefield", "StudyDescription")]
    sent = peer_query(pairs, kind="gateway", limit=5, offset=10)
    assert sent == [("StudyDate", "2024-"), ("ModalitiesInStudy", "CT"),
                    ("includefield", "StudyDescription"), ("limit", "15")]
    plain = peer_query(pairs, kind="dicomweb", limit=5, offset=10)
    assert ("PatientID", "0119031140") in plain and ("limit", "15") in plain
    assert ("offset", "10") not in plain


def test_a_peer_answer_carries_the_token_not_local_ids() -> None:
    d = {"00100020": {"vr": "LO", "Value": ["0119031140"]},
         "00100021": {"vr": "LO", "Value": ["H11010100013"]},
         "00101002": {"vr": "SQ", "Value": [{"00100020": {"vr": "LO", "Value": ["1101..."]}}]}}
    as_token_patient(d, "ab" * 32)
    assert d == {"00100020": {"vr": "LO", "Value": ["ab" * 32]},
                 "00100021": {"vr": "LO", "Value": [PATIENT_TOKEN_ISSUER]}}


def test_registry_reads_public_keys_and_names_a_bad_file(tmp_path: Path) -> None:
    pub = tmp_path / "310000.pub"
    pub.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        '[federation]\nenabled = true\n[[federation.peers]]\nprovince = "310000"\n'
        'base_url = "https://gw.sh.example/dicomweb"\npublic_key_file = "310000.pub"\n',
        encoding="utf-8")
    registry = load_registry(load_settings(cfg, environ={}))
    assert registry.get("310000").public_key is not None
    pub.write_text("not a key", encoding="ascii")
    with pytest.raises(ConfigError, match="public_key"):
        load_registry(load_settings(cfg, environ={}))
    pub.unlink()
    with pytest.raises(ConfigError, match=r"federation.peers\[0\].public_key_file"):
        load_registry(load_settings(cfg, environ={}))


def test_cli_prints_the_stable_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from imaging_gateway.cli import main

    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[federation]\nsigning_key_file = "fed.pem"\n', encoding="utf-8")
    assert main(["federation", "public-key", "--config", str(cfg)]) == 0
    first = capsys.readouterr().out
    assert main(["federation", "--config", str(cfg), "public-key"]) == 0
    assert capsys.readouterr().out == first
    assert isinstance(serialization.load_pem_public_key(first.encode()), Ed25519PublicKey)
    assert (tmp_path / "fed.pem").stat().st_mode & 0o777 == 0o600
