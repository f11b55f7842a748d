"""The AEAD suites of encryption at rest (AES-256-GCM, SM4-GCM) over ``cryptography``'s primitives.

Shared by the object format (``crypto.envelope``) and the keyring that wraps data keys
(``crypto.keyring``), so neither has to import the other. No cipher code of our own:
AES-GCM is ``AESGCM``; SM4-GCM (GB/T 32907 block cipher in GCM, as GB/T 36624 and RFC 8998
use it) is ``Cipher(algorithms.SM4(key), modes.GCM(nonce, tag))``.
"""

from __future__ import annotations

from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

Bytes = bytes | bytearray | memoryview

NONCE_SIZE = 12
"""Every suite takes a 96-bit nonce (the GCM fast path)."""
TAG_SIZE = 16
"""Every suite appends a full 128-bit tag."""


class Suite(StrEnum):
    """An AEAD suite; the value is its name in key files and configuration."""

    AES_256_GCM = "AES-256-GCM"
    SM4_GCM = "SM4-GCM"

    @property
    def code(self) -> int:
        """The byte that names the suite in an object header."""
        return _CODES[self]

    @property
    def key_size(self) -> int:
        """Key length in bytes: 32 for AES-256, 16 for SM4."""
        return _KEY_SIZES[self]

    @classmethod
    def from_code(cls, code: int) -> Suite | None:
        """The suite a header byte names, or None if it names none."""
        for suite, c in _CODES.items():
            if c == code:
                return suite
        return None


_CODES = {Suite.AES_256_GCM: 1, Suite.SM4_GCM: 2}
_KEY_SIZES = {Suite.AES_256_GCM: 32, Suite.SM4_GCM: 16}


class Aead:
    """One key of one suite: ``seal`` returns ciphertext || tag, ``open`` checks and strips it."""

    __slots__ = ("_aes", "_key", "suite")

    def __init__(self, suite: Suite, key: bytes) -> None:
        """Raises ``ValueError`` if the key is not ``suite.key_size`` bytes."""
        if len(key) != suite.key_size:
            raise ValueError(f"{suite} takes a {suite.key_size}-byte key, got {len(key)} bytes")
        self.suite = suite
        self._key = bytes(key)
        self._aes = AESGCM(self._key) if suite is Suite.AES_256_GCM else None

    def seal(self, nonce: bytes, data: Bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``data`` with ``aad``; the tag is the last 16 bytes."""
        if self._aes is not None:
            return self._aes.encrypt(nonce, data, aad)
        enc = Cipher(algorithms.SM4(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        body = enc.update(data) + enc.finalize()
        return body + enc.tag

    def open(self, nonce: bytes, data: Bytes, aad: bytes) -> bytes:
        """Verify and decrypt ciphertext || tag; nothing is returned unless the tag verifies.

        Raises ``cryptography.exceptions.InvalidTag`` if it does not (callers turn it into
        ``IntegrityError`` with what failed).
        """
        if self._aes is not None:
            return self._aes.decrypt(nonce, data, aad)
        if len(data) < TAG_SIZE:
            raise InvalidTag
        view = memoryview(data)
        dec = self._sm4_decryptor(nonce, view, aad)
        # GCM's decryptor hands out plaintext before finalize() checks the tag; it is held
        # here and only returned once the tag has verified.
        body = dec.update(view[:-TAG_SIZE])
        return body + dec.finalize()

    def open_into(self, nonce: bytes, data: Bytes, aad: bytes, out: memoryview) -> int:
        """``open`` into ``out`` (exactly ``len(data) - TAG_SIZE`` bytes); returns that length.

        ``out`` may hold unverified plaintext when this raises ``InvalidTag``: a caller
        must not use any of it unless this returned. Saves the allocation and the copy
        of ``open``'s result (AES: ``AESGCM.decrypt_into``; SM4: ``update_into``).
        """
        size = len(data) - TAG_SIZE
        if size < 0:
            raise InvalidTag
        if len(out) != size:
            raise ValueError(f"output buffer must be {size} bytes, got {len(out)}")
        if self._aes is not None:
            self._aes.decrypt_into(nonce, data, aad, out)
            return size
        view = memoryview(data)
        dec = self._sm4_decryptor(nonce, view, aad)
        if size:
            dec.update_into(view[:-TAG_SIZE], out)
        dec.finalize()
        return size

    def _sm4_decryptor(self, nonce: bytes, view: memoryview, aad: bytes) -> AEADDecryptionContext:
        """An SM4-GCM decryptor for ciphertext || tag ``view``: its tag and ``aad`` given."""
        dec = Cipher(
            algorithms.SM4(self._key), modes.GCM(nonce, bytes(view[-TAG_SIZE:]))
        ).decryptor()
        dec.authenticate_additional_data(aad)
        return dec
