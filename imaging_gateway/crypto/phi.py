"""PHI columns of the index: AEAD cells bound to their row, and HMAC blind indexes for lookups.

With ``[encryption] enabled`` every PHI column of the index holds a *sealed cell* instead of
the value: ``$ig1$`` followed by unpadded URL-safe base64 of

    index key number (4, big-endian) || salt (16) || AEAD ciphertext || tag (16)

sealed with AES-256-GCM or SM4-GCM (the keyring's suite) under a key of its own:
HMAC(index data key, salt) (HMAC-SHA-256, or HMAC-SM3 for SM4), with a fixed nonce, as
each such key seals one cell only. A random 96-bit nonce under one key would be good for
about 2^32 cells, and every sync re-seals the rows it touches; with a random 128-bit salt
2^48 cells collide with a chance of ~2^-33 (the idea of XAES-256-GCM: a key per random
nonce), for ~3 µs a cell. The *index data key* is random, kept in the index's own
``index_keys`` table only wrapped by the keyring's key-encryption key (key id and version
in the row), as every object's data key is (envelope encryption). Rotation re-wraps that one row
(``SqlIndex.load_phi_keys``, at every open); no cell is re-encrypted. The associated
data binds a cell to its place: the column (``patients.PatientName``), the row's identity
(the stored patient key, the StudyInstanceUID, SeriesInstanceUID or consent id; never an
autoincrement id, which is unknown before the insert) and the index key number. A cell
copied to another row or column does not open: ``IntegrityError`` names the column, never
the value.

Exact lookups go through blind indexes: ``blind`` is the keyring's HMAC (SHA-256 or SM3,
under its separate blind-index secret) of the value in one column's namespace; equal
values of one column give equal indexes, so a dump shows which rows share a PatientID,
never the PatientID.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac

from imaging_gateway.crypto.aead import NONCE_SIZE, TAG_SIZE, Aead, Suite
from imaging_gateway.crypto.keyring import Keyring
from imaging_gateway.errors import IntegrityError

PREFIX = "$ig1$"
"""First characters of every sealed cell (no DICOM value or patient key starts so)."""
BLIND_KEY_PREFIX = "bi:"
"""First characters of a blinded patient key."""
_AAD_LABEL = b"imaging-gateway/index-phi/1\x00"
_WRAP_LABEL = b"imaging-gateway/index-phi-key/1\x00"
_CELL_KEY_LABEL = b"imaging-gateway/index-phi-cell/1\x00"
_NUMBER = 4
_SALT = 16
_NONCE = bytes(NONCE_SIZE)  # each cell key seals one cell


class PhiCodec:
    """Seals, opens and blind-indexes the index's PHI cells with one keyring.

    The index data keys are installed by ``SqlIndex.load_phi_keys`` (unwrapped once and
    kept): sealing or opening a cell is one HMAC, one AEAD call and a base64 step.
    """

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._keys: dict[int, bytes] = {}
        self._hash: hashes.HashAlgorithm = (
            hashes.SM3() if keyring.suite is Suite.SM4_GCM else hashes.SHA256()
        )
        self.current: int | None = None
        """The number of the index data key new cells are sealed under."""

    def wrap_key(self, number: int, key: bytes) -> tuple[str, int, bytes]:
        """Wrap index data key ``number`` under the keyring's current key version."""
        return self.keyring.wrap(key, _WRAP_LABEL + number.to_bytes(_NUMBER, "big"))

    def install(self, number: int, key_id: str, version: int, wrapped: bytes) -> bytes:
        """Unwrap index data key ``number`` and use it; returns the key (for a rewrap).

        Raises ``KeyNotFound`` naming the key id and version when the keyring does not
        hold them, ``IntegrityError`` when the wrapped key does not authenticate (another
        keyring under the same id, or an altered row).
        """
        key = self.keyring.unwrap(
            key_id, version, wrapped, _WRAP_LABEL + number.to_bytes(_NUMBER, "big")
        )
        self._keys[number] = key
        self.current = max(self._keys)
        return key

    def _aead(self, number: int, salt: bytes, column: str) -> Aead:
        """The AEAD of one cell: its own key, HMAC(index data key ``number``, salt)."""
        key = self._keys.get(number)
        if key is None:
            raise IntegrityError(
                f"index column {column}: a sealed cell names index key {number}, which the "
                "index's index_keys table does not hold"
            )
        mac = hmac.HMAC(key, self._hash)
        mac.update(_CELL_KEY_LABEL + salt)
        return Aead(self.keyring.suite, mac.finalize()[: self.keyring.suite.key_size])

    def seal(self, value: str | None, *, column: str, row: str) -> str | None:
        """The sealed cell of ``value`` in ``column`` of the row identified by ``row``."""
        if value is None:
            return None
        if self.current is None:
            raise RuntimeError("no index data key installed (SqlIndex.load_phi_keys)")
        header = self.current.to_bytes(_NUMBER, "big")
        salt = secrets.token_bytes(_SALT)
        sealed = self._aead(self.current, salt, column).seal(
            _NONCE, value.encode("utf-8"), _aad(header, column, row)
        )
        cell = base64.urlsafe_b64encode(header + salt + sealed).decode("ascii")
        return PREFIX + cell.rstrip("=")

    def open(self, cell: str | None, *, column: str, row: str) -> str | None:
        """The value of a sealed cell; None for a null cell.

        Raises ``IntegrityError`` naming the column if the cell is not sealed (a plain
        value where a sealed one belongs), malformed, names an index key the index does
        not hold, or does not authenticate for this column and row (altered, or moved
        from another row).
        """
        if cell is None:
            return None
        number, body = _parse(cell, column)
        salt, sealed = body[:_SALT], body[_SALT:]
        aad = _aad(number.to_bytes(_NUMBER, "big"), column, row)
        try:
            plain = self._aead(number, salt, column).open(_NONCE, sealed, aad)
        except InvalidTag:
            raise IntegrityError(
                f"index column {column}: a sealed cell did not authenticate for its row "
                "(altered, or moved from another row)"
            ) from None
        return plain.decode("utf-8")

    def blind(self, value: str | None, *, column: str) -> str | None:
        """The blind index of ``value`` in ``column`` (64 hex digits); None for None."""
        if value is None:
            return None
        return self.keyring.blind_index(value, field=column)

    def national_id_index(self, national_id: str | None) -> str | None:
        """The blind index of a national identity, in the one namespace patients, consents
        and the federation's token rows share (so their rows join on it)."""
        if not national_id:
            return None
        return self.blind(national_id.strip().upper(), column="national_id")

    def patient_key(self, plain_key: str) -> str:
        """The stored form of a patient key (``issuer|PatientID``): blinded, so the key
        column names no PatientID. Idempotent."""
        if plain_key.startswith(BLIND_KEY_PREFIX):
            return plain_key
        return BLIND_KEY_PREFIX + self.keyring.blind_index(plain_key, field="patients.patient_key")


def is_sealed(cell: str | None) -> bool:
    """Whether a stored value is a sealed cell."""
    return cell is not None and cell.startswith(PREFIX)


def key_number(cell: str, column: str) -> int:
    """The index data key a sealed cell names. Raises ``IntegrityError`` if malformed."""
    return _parse(cell, column)[0]


def _aad(header: bytes, column: str, row: str) -> bytes:
    c, r = column.encode("utf-8"), row.encode("utf-8")
    return _AAD_LABEL + len(c).to_bytes(2, "big") + c + len(r).to_bytes(4, "big") + r + header


def _parse(cell: str, column: str) -> tuple[int, bytes]:
    if not cell.startswith(PREFIX):
        raise IntegrityError(
            f"index column {column}: found a plain value where a sealed cell belongs "
            "(run `imaging-gateway seal-index`)"
        )
    text = cell[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise IntegrityError(f"index column {column}: a sealed cell is malformed") from None
    if len(raw) < _NUMBER + _SALT + TAG_SIZE:
        raise IntegrityError(f"index column {column}: a sealed cell is malformed")
    return int.from_bytes(raw[:_NUMBER], "big"), raw[_NUMBER:]
