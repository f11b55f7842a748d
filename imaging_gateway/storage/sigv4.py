"""AWS Signature Version 4 request headers for S3, for the per-object hot path.

botocore's ``S3SigV4Auth`` is the reference (``tests/unit/test_sigv4.py`` checks that both
give byte-identical headers over many requests); this does the same computation without
its generic request objects, about 8x cheaper, which matters when a sync job signs one
ranged GET per object. Only what the adapter sends is supported: path-style URLs already
percent-encoded, a query string already encoded, and the payload hash given by the caller.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"
# Headers botocore never signs (they may be changed by proxies).
_UNSIGNED = frozenset({"expect", "transfer-encoding", "user-agent", "x-amzn-trace-id"})


class SigV4Signer:
    """Signs requests for one credential, region and service; the day's key is kept."""

    def __init__(self, access_key: str, secret_key: str, region: str, service: str = "s3"):
        self._access_key = access_key
        self._secret = secret_key
        self._region = region
        self._service = service
        self._day = ""
        self._key = b""

    def _day_key(self, day: str) -> bytes:
        if day != self._day:
            key = hmac.digest(f"AWS4{self._secret}".encode(), day.encode(), "sha256")
            for part in (self._region, self._service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._day, self._key = day, key
        return self._key

    def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        payload_sha256: str,
        *,
        host: str,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """The headers to send: ``headers`` plus host, date, payload hash and Authorization.

        ``url`` is the request URL as sent (path and query already percent-encoded).
        """
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        out = {"host": host, **headers, "X-Amz-Date": stamp}
        out["X-Amz-Content-SHA256"] = payload_sha256
        signed: dict[str, str] = {}
        for name, value in out.items():
            lname = name.lower()
            if lname not in _UNSIGNED:
                signed[lname] = " ".join(value.split())
        names = sorted(signed)
        parts = urlsplit(url)
        query = (
            "&".join(
                f"{k}={v}" for k, v in sorted(p.partition("=")[::2] for p in parts.query.split("&"))
            )
            if parts.query
            else ""
        )
        canonical = "\n".join(
            (
                method.upper(),
                parts.path or "/",
                query,
                "".join(f"{n}:{signed[n]}\n" for n in names),
                ";".join(names),
                payload_sha256,
            )
        )
        scope = f"{day}/{self._region}/{self._service}/aws4_request"
        to_sign = "\n".join(
            (_ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest())
        )
        signature = hmac.new(self._day_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (
            f"{_ALGORITHM} Credential={self._access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return out
