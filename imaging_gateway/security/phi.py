"""PHI columns of the index: AEAD cells bound to their row, and HMAC blind indexes for lookups.

With ``[encryption] enabled`` every PHI column of the index holds a *sealed cell* instead of
the value: ``$ig1$`` followed by unpadded URL-safe base64 of

    key id length (1) || key id || key version (4, big-endian) || nonce (12) || AEAD || tag (16)

sealed with AES-256-GCM or SM4-GCM (the keyring's suite) under a per-version column key
derived from the keyring's key-encryption key by HKDF (``Keyring.derive_key``, purpose
``index-phi/1``). The associated data binds the cell to its place: the column
(``patients.PatientName``), the row's identity (the stored patient key, the
StudyInstanceUID, SeriesInstanceUID or consent id; never an autoincrement id, which is
unknown before the insert) and the cell's own key id and version. A cell copied to another
row or column does not open: ``IntegrityError`` names the column, never the value.

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
from imaging_gateway.security.keyring import Keyring, check_key_id

if TYPE_CHECKING:
    from imaging_gateway.settings import Settings

PREFIX = "$ig1$"
"""First characters of every sealed cell (no DICOM value or patient key starts so)."""
BLIND_KEY_PREFIX = "bi:"
"""First characters of a blinded patient key."""
PURPOSE = "index-phi/1"
_AAD_LABEL = b"imaging-gateway/index-phi/1\x00"


class PhiCodec:
    """Seals, opens and blind-indexes the index's PHI cells with one keyring.

    Column keys and their AEAD objects are derived once per (key id, version) and kept:
    sealing or opening a cell is one AEAD call and a base64 step.
    """

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aeads: dict[tuple[str, int], Aead] = {}

    def _aead(self, key_id: str, version: int) -> Aead:
        """Raises ``KeyNotFound`` naming the key id and version."""
        aead = self._aeads.get((key_id, version))
        if aead is None:
            key = self.keyring.derive_key(key_id, version, purpose=PURPOSE)
            aead = self._aeads[(key_id, version)] = Aead(self.keyring.suite, key)
        return aead

    def seal(self, value: str | None, *, column: str, row: str) -> str | None:
        """The sealed cell of ``value`` in ``column`` of the row identified by ``row``."""
        if value is None:
            return None
        key_id, version = self.keyring.current()
        header = _header(key_id, version)
        nonce = secrets.token_bytes(NONCE_SIZE)
        sealed = self._aead(key_id, version).seal(
            nonce, value.encode("utf-8"), _aad(header, column, row)
        )
        return PREFIX + base64.urlsafe_b64encode(header + nonce + sealed).decode("ascii").rstrip(
            "="
        )

    def open(self, cell: str | None, *, column: str, row: str) -> str | None:
        """The value of a sealed cell; None for a null cell.

        Raises ``IntegrityError`` naming the column if the cell is not sealed (a plain
        value where a sealed one belongs), malformed, or does not authenticate for this
        column and row (altered, or moved from another row); ``KeyNotFound`` naming the key
        id and version when the keyring does not hold them.
        """
        if cell is None:
            return None
        key_id, version, body = _parse(cell, column)
        header = _header(key_id, version)
        nonce, sealed = body[:NONCE_SIZE], body[NONCE_SIZE:]
        try:
            plain = self._aead(key_id, version).open(nonce, sealed, _aad(header, column, row))
        except InvalidTag:
            raise IntegrityError(
                f"index column {column}: a sealed cell did not authenticate for its row under "
                f"key {key_id!r} version {version} (altered, or moved from another row)"
            ) from None
        return plain.decode("utf-8")

    def reseal(self, cell: str | None, *, column: str, row: str) -> str | None:
        """The cell sealed under the current key version: a plain value is sealed, a cell
        under an older version re-sealed, a current one returned as is. Raises as ``open``.
        """
        if cell is None:
            return None
        if not is_sealed(cell):
            return self.seal(cell, column=column, row=row)
        if key_version(cell, column) == self.keyring.current():
            self.open(cell, column=column, row=row)  # refuses a cell moved from another row
            return cell
        return self.seal(self.open(cell, column=column, row=row), column=column, row=row)

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


def key_version(cell: str, column: str) -> tuple[str, int]:
    """The (key id, version) a sealed cell names. Raises ``IntegrityError`` if malformed."""
    key_id, version, _ = _parse(cell, column)
    return key_id, version


def not_searchable(keyword: str, what: str) -> InvalidQuery:
    """The 400 answer to a matching key an encrypted index cannot answer."""
    return InvalidQuery(
        f"{keyword}: {what} is not supported while the index's PHI columns are encrypted"
    )


def _header(key_id: str, version: int) -> bytes:
    raw = check_key_id(key_id)
    return bytes([len(raw)]) + raw + version.to_bytes(4, "big")


def _aad(header: bytes, column: str, row: str) -> bytes:
    c, r = column.encode("utf-8"), row.encode("utf-8")
    return _AAD_LABEL + len(c).to_bytes(2, "big") + c + len(r).to_bytes(4, "big") + r + header


def _parse(cell: str, column: str) -> tuple[str, int, bytes]:
    if not cell.startswith(PREFIX):
        raise IntegrityError(
            f"index column {column}: found a plain value where a sealed cell belongs "
            "(run `imaging-gateway seal-index`)"
        )
    text = cell[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        n = raw[0]
        key_id = raw[1 : 1 + n].decode("utf-8")
        version = int.from_bytes(raw[1 + n : 5 + n], "big")
    except (binascii.Error, ValueError, IndexError):
        raise IntegrityError(f"index column {column}: a sealed cell is malformed") from None
    body = raw[5 + n :]
    if len(body) < NONCE_SIZE + TAG_SIZE or not key_id:
        raise IntegrityError(f"index column {column}: a sealed cell is malformed")
    return key_id, version, body
