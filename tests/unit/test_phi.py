"""The index's PHI cell codec: round trips, binding to the row, blind indexes, name terms."""

from __future__ import annotations

import secrets

import pytest

from imaging_gateway.crypto.aead import Suite
from imaging_gateway.crypto.keyring import Keyring
from imaging_gateway.crypto.phi import PREFIX, PhiCodec, is_sealed, key_number
from imaging_gateway.domain.names import fuzzy_terms, name_search_keys, split_keys
from imaging_gateway.errors import IntegrityError, KeyNotFound


def codec(suite: Suite, key_id: str = "gw") -> PhiCodec:
    ring = Keyring(key_id=key_id, suite=suite, keys={1: secrets.token_bytes(suite.key_size)},
                   current=1, blind_index_key=secrets.token_bytes(32))
    phi = PhiCodec(ring)
    key = secrets.token_bytes(suite.key_size)
    phi.install(1, *phi.wrap_key(1, key))
    return phi


@pytest.mark.parametrize("suite", list(Suite))
def test_cells_round_trip_and_are_bound_to_column_and_row(suite: Suite) -> None:
    phi = codec(suite)
    name = "Zhang^San=张^三"
    cell = phi.seal(name, column="patients.PatientName", row="bi:abc")
    assert cell is not None and is_sealed(cell) and cell.startswith(PREFIX)
    assert "张" not in cell and "Zhang" not in cell
    assert key_number(cell, "patients.PatientName") == 1
    assert phi.open(cell, column="patients.PatientName", row="bi:abc") == name
    assert phi.seal(name, column="patients.PatientName", row="bi:abc") != cell  # random nonce
    assert phi.seal(None, column="x", row="y") is None and phi.open(None, column="x", row="y") is None
    with pytest.raises(IntegrityError, match="moved from another row"):
        phi.open(cell, column="patients.PatientName", row="bi:other")
    with pytest.raises(IntegrityError, match=r"patients\.PatientID"):
        phi.open(cell, column="patients.PatientID", row="bi:abc")
    flipped = cell[:-3] + ("A" if cell[-3] != "A" else "B") + cell[-2:]
    with pytest.raises(IntegrityError):
        phi.open(flipped, column="patients.PatientName", row="bi:abc")
    with pytest.raises(IntegrityError, match="plain value"):
        phi.open("Zhang^San", column="patients.PatientName", row="bi:abc")
    with pytest.raises(IntegrityError, match="malformed"):
        phi.open(PREFIX + "AAAA", column="patients.PatientName", row="bi:abc")
    # Another keyring cannot unwrap this index's key; the error names the key id.
    other = codec(suite, key_id="other")
    with pytest.raises(KeyNotFound, match="'gw'"):
        other.install(1, *phi.wrap_key(1, b"\0" * suite.key_size))


def test_blind_indexes_are_per_column_and_keyed() -> None:
    phi, other = codec(Suite.AES_256_GCM), codec(Suite.AES_256_GCM)
    a = phi.blind("0140502330", column="patients.PatientID")
    assert a == phi.blind("0140502330", column="patients.PatientID") and len(a or "") == 64
    assert a != phi.blind("0140502330", column="studies.AccessionNumber")
    assert a != other.blind("0140502330", column="patients.PatientID")
    assert phi.national_id_index("44010419630207049x") == phi.national_id_index(
        " 44010419630207049X")
    assert phi.national_id_index(None) is None and phi.national_id_index("") is None
    key = phi.patient_key("H1|0140502330")
    assert key.startswith("bi:") and "0140502330" not in key and phi.patient_key(key) == key


def test_fuzzy_terms_must_equal_a_name_key() -> None:
    """What README promises for 张三 on an encrypted index: whole keys, no prefixes."""
    keys = set(split_keys(name_search_keys("Zhang^San=张^三")))
    for query in ("zhang san", "zhangsan", "zhāng sān", "zhang1 san1", "zs", "张三", "张", "三",
                  "Zhang^San"):
        assert set(fuzzy_terms(query)) <= keys, query
    assert not set(fuzzy_terms("zha")) <= keys
