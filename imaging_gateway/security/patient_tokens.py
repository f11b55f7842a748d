"""Pseudonymous patient tokens: a keyed hash standing for one patient in logs and federation."""

from __future__ import annotations

import hashlib
import hmac


class PatientTokens:
    """Derives the patient token of a national identity (or, lacking one, a local patient key).

    HMAC-SHA256 under a secret key, so a token cannot be reversed or recomputed from a
    guessed identity number without the key. Tokens of the same national identity are
    equal wherever the same key is held (federation distributes it); local patient keys
    get a distinct prefix so they can never collide with a national one.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("patient token key must be at least 32 bytes")
        self._key = key

    def for_national_id(self, national_id: str) -> str:
        return self._mac(f"cn-resident-id:{national_id.strip().upper()}")

    def for_patient(self, national_id: str | None, patient_key: str) -> str:
        """The token of an indexed patient: by national identity when the index has one."""
        if national_id:
            return self.for_national_id(national_id)
        return self._mac(f"local:{patient_key}")

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()
