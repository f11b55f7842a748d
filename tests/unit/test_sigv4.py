"""SigV4Signer gives exactly the headers botocore's S3SigV4Auth gives."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock

import pytest
from botocore.auth import EMPTY_SHA256_HASH, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from imaging_gateway.storage.sigv4 import SigV4Signer

NOW = datetime(2026, 11, 24, 7, 5, 9, tzinfo=UTC)
HOST = "127.0.0.1:8333"
BASE = f"http://{HOST}/dicom-bucket"
BODY_HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class _Botocore(S3SigV4Auth):  # type: ignore[misc]
    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


def botocore_headers(
    method: str, url: str, headers: dict[str, str], payload: str, region: str
) -> dict[str, str]:
    request = AWSRequest(method=method, url=url, headers={"host": HOST, **headers})
    request.context["payload_sha256"] = payload
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        _Botocore(
            Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), "s3", region
        ).add_auth(request)
    return dict(request.headers.items())


CASES = [
    ("GET", f"{BASE}/study/1.2.840.1/0001.dcm", {"Range": "bytes=0-65535"}, EMPTY_SHA256_HASH),
    (
        "GET",
        f"{BASE}/a%20b/%E5%BC%A0%E4%B8%89.dcm",
        {"Range": "bytes=65536-131071"},
        EMPTY_SHA256_HASH,
    ),
    ("HEAD", f"{BASE}/k%2Bplus/x~y.dcm", {}, EMPTY_SHA256_HASH),
    (
        "GET",
        f"{BASE}?list-type=2&max-keys=1000&start-after=study%2F9.dcm&encoding-type=url",
        {},
        EMPTY_SHA256_HASH,
    ),
    ("GET", f"{BASE}/x.dcm", {"If-Match": '"abc"', "Range": "bytes=10-20"}, EMPTY_SHA256_HASH),
    (
        "PUT",
        f"{BASE}/up/0001.dcm",
        {"Content-Type": "application/dicom", "Content-Length": "4"},
        BODY_HASH,
    ),
    ("POST", f"{BASE}/up/big.dcm?uploads=", {}, EMPTY_SHA256_HASH),
    (
        "PUT",
        f"{BASE}/up/big.dcm?partNumber=2&uploadId=abc%2Fdef",
        {"Content-Length": "4"},
        BODY_HASH,
    ),
    ("DELETE", f"{BASE}/gone.dcm", {"User-Agent": "x  y"}, EMPTY_SHA256_HASH),
    ("GET", f"{BASE}/spaces.dcm", {"X-Custom": "  a   b  "}, EMPTY_SHA256_HASH),
]


@pytest.mark.parametrize("region", ["us-east-1", "cn-north-1"])
@pytest.mark.parametrize(("method", "url", "headers", "payload"), CASES)
def test_headers_equal_botocore(
    method: str, url: str, headers: dict[str, str], payload: str, region: str
) -> None:
    signer = SigV4Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", region)
    ours = signer.sign(method, url, headers, payload, host=HOST, now=NOW)
    assert ours == botocore_headers(method, url, headers, payload, region)


def test_day_key_follows_the_date() -> None:
    signer = SigV4Signer("AK", "SK", "us-east-1")
    today = signer.sign("GET", f"{BASE}/x", {}, EMPTY_SHA256_HASH, host=HOST, now=NOW)
    tomorrow_now = NOW.replace(day=25)
    tomorrow = signer.sign("GET", f"{BASE}/x", {}, EMPTY_SHA256_HASH, host=HOST, now=tomorrow_now)
    fresh = SigV4Signer("AK", "SK", "us-east-1").sign(
        "GET", f"{BASE}/x", {}, EMPTY_SHA256_HASH, host=HOST, now=tomorrow_now
    )
    assert tomorrow == fresh
    assert today["Authorization"] != tomorrow["Authorization"]
