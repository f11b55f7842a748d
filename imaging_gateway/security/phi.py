"""PHI columns of the index: AEAD cells bound to their row, and HMAC blind indexes for lookups.

With ``[encryption] enabled`` every PHI column of the index holds a *sealed cell* instead of
the value: ``$ig1$`` followed by unpadded URL-safe base64 of

    index key number (4, big-endian) || nonce (12) || AEAD ciphertext || tag (16)

sealed with AES-256-GCM or SM4-GCM (the keyring's suite) under an *index data key*: a
random key kept in the index's own ``index_keys`` table only wrapped by the keyring's
key-encryption key (key id and version in the row), as every object's data key is
(envelope encryption). Rotation re-wraps that one row (``SqlIndex.load_phi_keys``, at
every open); no cell is re-encrypted. The associated data binds a cell to its place: the
column (``patients.PatientName``), the row's identity (the stored patient key, the
StudyInstanceUID, SeriesInstanceUID or consent id; never an autoincrement id, which is
unknown before the insert) and the index key number. A cell copied to another row or
column does not open: ``IntegrityError`` names the column, never the value.

Exact lookups go through blind indexes: ``blind`` is the keyring's HMAC (SHA-256 or SM3,
under its separate blind-index secret) of the value in one column's namespace; equal
values of one column give equal indexes, so a dump shows which rows share a PatientID,
never the PatientID.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag

from imaging_gateway.errors import IntegrityError, InvalidQuery
from imaging_gateway.security.aead import NONCE_SIZE, TAG_SIZE, Aead
from imaging_gateway.security.keyring import Keyring

if TYPE_CHECKING:
    from imaging_gateway.settings import Settings

PREFIX = "$ig1$"
"""First characters of every sealed cell (no DICOM value or patient key starts so)."""
BLIND_KEY_PREFIX = "bi:"
"""First characters of a blinded patient key."""
_AAD_LABEL = b"imaging-gateway/index-phi/1\x00"
_WRAP_LABEL = b"imaging-gateway/index-phi-key/1\x00"
_NUMBER = 4


class PhiCodec:
    """Seals, opens and blind-indexes the index's PHI cells with one keyring.

    The index data keys are installed by ``SqlIndex.load_phi_keys`` (unwrapped once, their
    AEAD objects kept): sealing or opening a cell is one AEAD call and a base64 step.
    """

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aeads: dict[int, Aead] = {}
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
        self._aeads[number] = Aead(self.keyring.suite, key)
        self.current = max(self._aeads)
        return key

    def _aead(self, number: int, column: str) -> Aead:
        aead = self._aeads.get(number)
        if aead is None:
            raise IntegrityError(
                f"index column {column}: a sealed cell names index key {number}, which the "
                "index's index_keys table does not hold"
            )
        return aead

    def seal(self, value: str | None, *, column: str, row: str) -> str | None:
        """The sealed cell of ``value`` in ``column`` of the row identified by ``row``."""
        if value is None:
            return None
        if self.current is None:
            raise RuntimeError("no index data key installed (SqlIndex.load_phi_keys)")
        header = self.current.to_bytes(_NUMBER, "big")
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = self._aead(self.current, column).seal(
            nonce, value.encode("utf-8"), _aad(header, column, row)
        )
        return PREFIX + base64.urlsafe_b64encode(header + nonce + sealed).decode("ascii").rstrip(
            "="
        )

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
        nonce, sealed = body[:NONCE_SIZE], body[NONCE_SIZE:]
        aad = _aad(number.to_bytes(_NUMBER, "big"), column, row)
        try:
            plain = self._aead(number, column).open(nonce, sealed, aad)
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


def load_phi_codec(settings: Settings) -> PhiCodec | None:
    """The codec of the index's PHI columns: with ``[encryption] enabled``, over the keyring
    the stores use; else None (the index is plain). Raises ``ConfigError`` as
    ``storage.factory.load_store_keys`` does (a missing keyring names its file)."""
    if not settings.encryption.enabled:
        return None
    from imaging_gateway.storage.factory import load_store_keys

    keyring = load_store_keys(settings)
    assert keyring is not None  # enabled: load_store_keys raises instead
    return PhiCodec(keyring)


def is_sealed(cell: str | None) -> bool:
    """Whether a stored value is a sealed cell."""
    return cell is not None and cell.startswith(PREFIX)


def key_number(cell: str, column: str) -> int:
    """The index data key a sealed cell names. Raises ``IntegrityError`` if malformed."""
    return _parse(cell, column)[0]


def not_searchable(keyword: str, what: str) -> InvalidQuery:
    """The 400 answer to a matching key an encrypted index cannot answer."""
    return InvalidQuery(
        f"{keyword}: {what} is not supported while the index's PHI columns are encrypted"
    )


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
    if len(raw) < _NUMBER + NONCE_SIZE + TAG_SIZE:
        raise IntegrityError(f"index column {column}: a sealed cell is malformed")
    return int.from_bytes(raw[:_NUMBER], "big"), raw[_NUMBER:]
